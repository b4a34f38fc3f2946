//! Zigzag ring attention over one ring group: blockwise causal attention whose partial
//! outputs are merged through their log-sum-exp, forward and backward. K/V travel around the
//! ring (rank r receives from r-1 and sends to r+1); in the backward, dK/dV travel with them
//! and come home after a full turn. With the zigzag sharding every block is either a square
//! causal block (the rank's own K/V) or a full block, so no work is wasted on masked tiles.
//!
//! Communication for step j+1 is issued before step j's attention and waited for (on the
//! device, through an event, for NCCL) only when its data is needed.
use crate::comm::{Communicator, P2p, Work};
use crate::error::{Result, RuntimeError};
use crate::kernel::{attention_bwd, attention_fwd, Backend};
use crate::shard::Zigzag;
use tch::{Kind, Tensor};

/// One attention block of a ring step: rows [q_off, q_off+q_len) of the local queries against
/// columns [kv_off, kv_off+kv_len) of the K/V currently held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub q_off: i64,
    pub q_len: i64,
    pub kv_off: i64,
    pub kv_len: i64,
    pub causal: bool,
}

/// Blocks that ring rank `r` computes against the K/V of ring rank `src`.
pub fn blocks(zz: &Zigzag, r: usize, src: usize) -> Vec<Block> {
    let (a, b) = zz.ring_lens(r);
    let (sa, sb) = zz.ring_lens(src);
    let (a, b, sa, sb) = (a as i64, b as i64, sa as i64, sb as i64);
    let blk = |q_off, q_len, kv_off, kv_len, causal| Block {
        q_off,
        q_len,
        kv_off,
        kv_len,
        causal,
    };
    if src == r {
        if a == b {
            vec![blk(0, a + b, 0, a + b, true)]
        } else {
            // Uneven chunks: the local causal mask is not a plain triangle; split it.
            vec![
                blk(0, a, 0, a, true),
                blk(a, b, 0, a, false),
                blk(a, b, a, b, true),
            ]
        }
    } else if src < r {
        // K/V chunk `src` precedes both query chunks; chunk 2R-1-src follows both.
        vec![blk(0, a + b, 0, sa, false)]
    } else {
        // Both K/V chunks precede query chunk 2R-1-r and follow query chunk r.
        vec![blk(a, b, 0, sa + sb, false)]
    }
}

/// Dense copies of row ranges of the log-sum-exp, made once per call (the kernels take the
/// 3-dim log-sum-exp dense; every step after the first uses the same ranges again). The
/// (B, H, S, D) tensors are passed as row views: see `kernel::kernel_layout_ok`.
#[derive(Default)]
struct RowCache(std::collections::HashMap<(i64, i64), Tensor>);

impl RowCache {
    fn get(&mut self, t: &Tensor, off: i64, len: i64) -> Tensor {
        if off == 0 && len == t.size()[2] {
            return t.shallow_clone();
        }
        self.0
            .entry((off, len))
            .or_insert_with(|| t.narrow(2, off, len).contiguous())
            .shallow_clone()
    }
}

fn acc_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// A partial attention result: output and log-sum-exp of local query rows [off, off+len)
/// against some of the keys.
struct Part {
    off: i64,
    len: i64,
    o: Tensor,
    lse: Tensor,
}

impl Part {
    fn covers(&self, rows: i64) -> bool {
        self.off == 0 && self.len == rows
    }
}

/// Most block outputs the forward holds before folding them into one partial result (a
/// ring of n holds n blocks, about n/2 local outputs, at most this many).
const MAX_PARTS: usize = 8;

/// Merges partial results through their log-sum-exp, reading each block output once:
/// lse = log sum_j exp(lse_j), out = sum_j exp(lse_j - lse) * o_j, accumulated in `ak`
/// (float32 for 16-bit inputs) with one fused multiply-add per block (`addcmul`, which
/// reads the block output in its own dtype), the last one written straight in `out_kind`.
/// A single part covering every row is returned as it is (a ring of 1 costs nothing here).
/// Rows that no part covers get lse -inf and output 0.
fn merge_parts(mut parts: Vec<Part>, rows: i64, ak: Kind, out_kind: Kind) -> Result<Part> {
    let Some(i) = parts
        .iter()
        .rposition(|p| p.covers(rows))
        .or(parts.len().checked_sub(1))
    else {
        return Err(RuntimeError::Shape(
            "ring attention: no blocks to merge".into(),
        ));
    };
    // A part covering every row goes last, so that the final addcmul writes the whole output.
    let last = parts.remove(i);
    if parts.is_empty() && last.covers(rows) {
        return Ok(Part {
            o: last.o.f_to_kind(out_kind)?,
            ..last
        });
    }
    let (os, ls) = (last.o.size(), last.lse.size());
    let dev = last.o.device();
    let lse = if last.covers(rows) {
        last.lse.copy()
    } else {
        Tensor::full(
            [ls[0], ls[1], rows],
            f64::NEG_INFINITY,
            (last.lse.kind(), dev),
        )
    };
    let others = || parts.iter().chain((!last.covers(rows)).then_some(&last));
    for p in others() {
        let l = lse.narrow(2, p.off, p.len);
        let _ = l.f_logaddexp_out(&l, &p.lse)?;
    }
    let weight = |p: &Part| -> Result<Tensor> {
        Ok(p.lse
            .f_sub(&lse.narrow(2, p.off, p.len))?
            .f_exp()?
            .f_unsqueeze(-1)?)
    };
    let mut acc: Option<Tensor> = None;
    for p in others() {
        let w = weight(p)?;
        match &acc {
            None if p.covers(rows) => acc = Some(p.o.f_mul(&w)?.f_to_kind(ak)?),
            None => {
                let a = Tensor::zeros([os[0], os[1], rows, os[3]], (ak, dev));
                let _ = a.narrow(2, p.off, p.len).f_addcmul_(&p.o, &w)?;
                acc = Some(a);
            }
            Some(a) => {
                let _ = a.narrow(2, p.off, p.len).f_addcmul_(&p.o, &w)?;
            }
        }
    }
    let acc = acc.ok_or_else(|| RuntimeError::Shape("ring attention: empty merge".into()))?;
    let out = if last.covers(rows) {
        let out = Tensor::empty([os[0], os[1], rows, os[3]], (out_kind, dev));
        acc.f_addcmul_out(&out, &last.o, &weight(&last)?)?
    } else {
        acc.f_to_kind(out_kind)?
    };
    Ok(Part {
        off: 0,
        len: rows,
        o: out,
        lse,
    })
}

/// Saved forward state for [`ring_bwd`].
pub struct RingCtx {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Merged output, in the input dtype.
    pub out: Tensor,
    /// Merged log-sum-exp (B, H, S_local).
    pub lse: Tensor,
}

fn check_local(zz: &Zigzag, r: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let (a, b) = zz.ring_lens(r);
    let want = (a + b) as i64;
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        let s = t.size();
        if s.len() != 4 || s[2] != want {
            return Err(RuntimeError::Shape(format!(
                "ring rank {r}: {name} is {s:?}, expected (B, H, {want}, D) for a sequence of {}",
                zz.seq_len
            )));
        }
    }
    Ok(())
}

fn kv_buffer(like: &Tensor, len: usize) -> Tensor {
    let s = like.size();
    Tensor::empty([s[0], s[1], len as i64, s[3]], (like.kind(), like.device()))
}

/// One step of the ring: sends `send` to the next rank and receives into `recv` from the
/// previous one, as one batched operation.
fn rotate(comm: &dyn Communicator, send: [&Tensor; 2], recv: [&Tensor; 2]) -> Result<Work> {
    let (n, r) = (comm.size(), comm.rank());
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let sends = send.into_iter().map(|t| P2p::Send {
        peer: next,
        tensor: t.shallow_clone(),
    });
    let recvs = recv.into_iter().map(|t| P2p::Recv {
        peer: prev,
        tensor: t.shallow_clone(),
    });
    comm.send_recv(&sends.chain(recvs).collect::<Vec<_>>())
}

/// Ring attention forward. `q` (B, Hq, a+b, D), `k`, `v` (B, Hkv, a+b, D) hold this ring
/// rank's two zigzag chunks (the full chunks, for the heads this rank owns).
pub fn ring_fwd(
    comm: &dyn Communicator,
    zz: &Zigzag,
    backend: Backend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, RingCtx)> {
    let (n, r) = (comm.size(), comm.rank());
    if n != zz.ring {
        return Err(RuntimeError::Layout(format!(
            "ring group of {n} ranks, sharding for {}",
            zz.ring
        )));
    }
    check_local(zz, r, q, k, v)?;
    let ak = acc_kind(q.kind());
    let rows = q.size()[2];
    let mut parts: Vec<Part> = Vec::with_capacity(n.min(MAX_PARTS) + 2);
    let mut cur_k = k.shallow_clone();
    let mut cur_v = v.shallow_clone();
    for j in 0..n {
        let src = (r + n - j) % n;
        let pending = if j + 1 < n {
            let nsrc = (r + 2 * n - j - 1) % n;
            let (na, nb) = zz.ring_lens(nsrc);
            let nk = kv_buffer(k, na + nb);
            let nv = kv_buffer(v, na + nb);
            let w = rotate(comm, [&cur_k, &cur_v], [&nk, &nv])?;
            Some((w, nk, nv))
        } else {
            None
        };
        for blk in blocks(zz, r, src) {
            let qb = q.narrow(2, blk.q_off, blk.q_len);
            let kb = cur_k.narrow(2, blk.kv_off, blk.kv_len);
            let vb = cur_v.narrow(2, blk.kv_off, blk.kv_len);
            let (o, lse) = attention_fwd(backend, &qb, &kb, &vb, blk.causal, scale)?;
            parts.push(Part {
                off: blk.q_off,
                len: blk.q_len,
                o,
                lse,
            });
        }
        if parts.len() >= MAX_PARTS && j + 1 < n {
            // Bound the memory held: fold what is there into one partial result.
            let folded = merge_parts(std::mem::take(&mut parts), rows, ak, ak)?;
            parts.push(folded);
        }
        if let Some((w, nk, nv)) = pending {
            w.wait()?;
            cur_k = nk;
            cur_v = nv;
        }
    }
    let Part { o: out, lse, .. } = merge_parts(parts, rows, ak, q.kind())?;
    let ctx = RingCtx {
        q: q.shallow_clone(),
        k: k.shallow_clone(),
        v: v.shallow_clone(),
        out: out.shallow_clone(),
        lse,
    };
    Ok((out, ctx))
}

/// Adds `part` (the gradient of rows [off, off+len)) into `acc`, which a part covering every
/// row of `like` starts by a cast (no zero fill), any other by zeros.
fn add_rows(
    acc: &mut Option<Tensor>,
    part: &Tensor,
    like: &Tensor,
    off: i64,
    len: i64,
    ak: Kind,
) -> Result<()> {
    match acc {
        None if off == 0 && len == like.size()[2] => *acc = Some(part.f_to_kind(ak)?),
        None => {
            let a = Tensor::zeros(like.size(), (ak, like.device()));
            let _ = a.narrow(2, off, len).f_add_(part)?;
            *acc = Some(a);
        }
        Some(a) => {
            let _ = a.narrow(2, off, len).f_add_(part)?;
        }
    }
    Ok(())
}

/// dK/dV of the K/V block held now: this step's block gradients added to what the earlier
/// ranks accumulated for it (`incoming`, waited for only now, so that its transfer overlapped
/// with this step's kernels), or, at the first step, the start of the sums.
fn fold_dkv(
    incoming: Option<(Work, Tensor, Tensor)>,
    grads: Vec<(Block, Tensor, Tensor)>,
    cur_k: &Tensor,
    cur_v: &Tensor,
    ak: Kind,
) -> Result<(Tensor, Tensor)> {
    let (mut dk_acc, mut dv_acc) = match incoming {
        Some((w, dk_in, dv_in)) => {
            w.wait()?;
            (Some(dk_in), Some(dv_in))
        }
        None => (None, None),
    };
    for (blk, dk, dv) in grads {
        add_rows(&mut dk_acc, &dk, cur_k, blk.kv_off, blk.kv_len, ak)?;
        add_rows(&mut dv_acc, &dv, cur_v, blk.kv_off, blk.kv_len, ak)?;
    }
    match (dk_acc, dv_acc) {
        (Some(dk), Some(dv)) => Ok((dk, dv)),
        _ => Err(RuntimeError::Comm(
            "ring backward: a step with no blocks".into(),
        )),
    }
}

/// Ring attention backward: returns (dq, dk, dv) for this rank's q, k, v.
pub fn ring_bwd(
    comm: &dyn Communicator,
    zz: &Zigzag,
    backend: Backend,
    ctx: &RingCtx,
    dout: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, r) = (comm.size(), comm.rank());
    if dout.size() != ctx.out.size() {
        return Err(RuntimeError::Shape(format!(
            "output gradient {:?} does not match the output {:?}",
            dout.size(),
            ctx.out.size()
        )));
    }
    let dout = dout.to_kind(ctx.out.kind());
    let (q, k, v) = (&ctx.q, &ctx.k, &ctx.v);
    let ak = acc_kind(q.kind());
    // Allocated (as zeros) only if the first step does not cover every row.
    let mut dq_acc: Option<Tensor> = None;
    let mut lse_rows = RowCache::default();
    let mut cur_k = k.shallow_clone();
    let mut cur_v = v.shallow_clone();
    let mut pending_dkv: Option<(crate::comm::Work, Tensor, Tensor)> = None;
    let mut final_dkv: Option<(Tensor, Tensor)> = None;
    for j in 0..n {
        let src = (r + n - j) % n;
        let nsrc = (r + 2 * n - j - 1) % n;
        let (na, nb) = zz.ring_lens(nsrc);
        let pending_kv = if j + 1 < n {
            let nk = kv_buffer(k, na + nb);
            let nv = kv_buffer(v, na + nb);
            let w = rotate(comm, [&cur_k, &cur_v], [&nk, &nv])?;
            Some((w, nk, nv))
        } else {
            None
        };
        let mut grads = Vec::new();
        for blk in blocks(zz, r, src) {
            let cols = |t: &Tensor| t.narrow(2, blk.kv_off, blk.kv_len);
            let rows = |t: &Tensor| t.narrow(2, blk.q_off, blk.q_len);
            let (dq, dk, dv) = attention_bwd(
                backend,
                &rows(&dout),
                &rows(q),
                &cols(&cur_k),
                &cols(&cur_v),
                &rows(&ctx.out),
                &lse_rows.get(&ctx.lse, blk.q_off, blk.q_len),
                blk.causal,
                scale,
            )?;
            add_rows(&mut dq_acc, &dq, q, blk.q_off, blk.q_len, ak)?;
            grads.push((blk, dk, dv));
        }
        // dK/dV of the block held now: add to what earlier ranks accumulated for it (waited
        // for only now, so that its transfer overlapped with this step's kernels).
        let (dk_blk, dv_blk) = fold_dkv(pending_dkv.take(), grads, &cur_k, &cur_v, ak)?;
        if n > 1 {
            // Pass the partial dK/dV on with the K/V; after the last step they reach home.
            let ks = cur_k.size();
            let dk_next = Tensor::empty([ks[0], ks[1], (na + nb) as i64, ks[3]], (ak, q.device()));
            let dv_next = dk_next.empty_like();
            let w = rotate(comm, [&dk_blk, &dv_blk], [&dk_next, &dv_next])?;
            pending_dkv = Some((w, dk_next, dv_next));
        } else {
            final_dkv = Some((dk_blk, dv_blk));
        }
        if let Some((w, nk, nv)) = pending_kv {
            w.wait()?;
            cur_k = nk;
            cur_v = nv;
        }
    }
    let (dk, dv) = match (pending_dkv, final_dkv) {
        (Some((w, dk, dv)), _) => {
            w.wait()?;
            (dk, dv)
        }
        (None, Some(x)) => x,
        (None, None) => return Err(RuntimeError::Comm("ring backward produced no dK/dV".into())),
    };
    let dq = dq_acc.ok_or_else(|| RuntimeError::Comm("ring backward produced no dQ".into()))?;
    Ok((
        dq.to_kind(q.kind()),
        dk.to_kind(k.kind()),
        dv.to_kind(v.kind()),
    ))
}
