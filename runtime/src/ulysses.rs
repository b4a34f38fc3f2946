//! Ulysses sequence <-> head all-to-all inside one Ulysses group, for the zigzag layout:
//! before, Ulysses rank u holds sub-chunk u of its ring rank's two chunks for all heads;
//! after, it holds both full chunks (in order) for heads [u*H/U, (u+1)*H/U). Sub-chunks may
//! differ in length (uneven splits).
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::shard::{offsets, Zigzag};
use tch::Tensor;

fn heads_per_rank(h: i64, n: usize) -> Result<i64> {
    if h % n as i64 != 0 {
        return Err(RuntimeError::Layout(format!(
            "{h} heads cannot be split over {n} Ulysses ranks"
        )));
    }
    Ok(h / n as i64)
}

/// (B, H, la_u + lb_u, D) -> (B, H/U, A + B, D) for ring rank `r`.
pub fn seq_to_head(comm: &dyn Communicator, zz: &Zigzag, r: usize, x: &Tensor) -> Result<Tensor> {
    let n = comm.size();
    if n == 1 {
        return Ok(x.shallow_clone());
    }
    let s = x.size();
    let hper = heads_per_rank(s[1], n)?;
    let [ca, cb] = zz.ring_chunks(r);
    let (sub_a, sub_b) = (zz.sub_lens(ca), zz.sub_lens(cb));
    let send: Vec<Tensor> = (0..n)
        .map(|p| x.narrow(1, p as i64 * hper, hper).contiguous())
        .collect();
    let recv: Vec<Tensor> = (0..n)
        .map(|p| {
            Tensor::empty(
                [s[0], hper, (sub_a[p] + sub_b[p]) as i64, s[3]],
                (x.kind(), x.device()),
            )
        })
        .collect();
    comm.all_to_all(&send, &recv)?.wait()?;
    let mut parts: Vec<Tensor> = Vec::with_capacity(2 * n);
    for (p, t) in recv.iter().enumerate() {
        parts.push(t.narrow(2, 0, sub_a[p] as i64));
    }
    for (p, t) in recv.iter().enumerate() {
        parts.push(t.narrow(2, sub_a[p] as i64, sub_b[p] as i64));
    }
    Ok(Tensor::cat(&parts, 2))
}

/// (B, H/U, A + B, D) -> (B, H, la_u + lb_u, D): the inverse of [`seq_to_head`].
pub fn head_to_seq(comm: &dyn Communicator, zz: &Zigzag, r: usize, y: &Tensor) -> Result<Tensor> {
    let n = comm.size();
    if n == 1 {
        return Ok(y.shallow_clone());
    }
    let u = comm.rank();
    let s = y.size();
    let [ca, cb] = zz.ring_chunks(r);
    let (sub_a, sub_b) = (zz.sub_lens(ca), zz.sub_lens(cb));
    let (off_a, off_b) = (offsets(&sub_a), offsets(&sub_b));
    let a_len = zz.chunk_len(ca) as i64;
    if s[2] != a_len + zz.chunk_len(cb) as i64 {
        return Err(RuntimeError::Shape(format!(
            "head_to_seq: {s:?} does not hold chunks {ca} and {cb}"
        )));
    }
    let send: Vec<Tensor> = (0..n)
        .map(|p| {
            Tensor::cat(
                &[
                    y.narrow(2, off_a[p] as i64, sub_a[p] as i64),
                    y.narrow(2, a_len + off_b[p] as i64, sub_b[p] as i64),
                ],
                2,
            )
        })
        .collect();
    let mine = (sub_a[u] + sub_b[u]) as i64;
    let out = Tensor::empty([s[0], s[1] * n as i64, mine, s[3]], (y.kind(), y.device()));
    // Peer p's heads are rows [p*H/U, (p+1)*H/U) of the output: with batch 1 those slices are
    // dense, so the peers' pieces land in place (no concatenation afterwards).
    let views: Vec<Tensor> = (0..n)
        .map(|p| out.narrow(1, p as i64 * s[1], s[1]))
        .collect();
    if views.iter().all(Tensor::is_contiguous) {
        comm.all_to_all(&send, &views)?.wait()?;
        return Ok(out);
    }
    let recv: Vec<Tensor> = (0..n)
        .map(|_| Tensor::empty([s[0], s[1], mine, s[3]], (y.kind(), y.device())))
        .collect();
    comm.all_to_all(&send, &recv)?.wait()?;
    Ok(Tensor::cat(&recv, 1))
}
