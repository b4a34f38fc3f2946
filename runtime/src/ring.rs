//! Zigzag ring attention over one ring group: blockwise causal attention whose partial
//! outputs are merged through their log-sum-exp, forward and backward. K/V travel around the
//! ring (rank r receives from r-1 and sends to r+1); in the backward, dK/dV travel with them
//! and come home after a full turn. With the zigzag sharding every block is either a square
//! causal block (the rank's own K/V) or a full block, so no work is wasted on masked tiles.
//!
//! Communication for step j+1 is issued before step j's attention and waited for (on the
//! device, through an event, for NCCL) only when its data is needed.
use crate::comm::{Communicator, P2p};
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

/// Dense copies of row ranges of a tensor, made once per call: the CUDA kernels want dense
/// inputs and every step after the first uses the same ranges again.
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
    let qs = q.size();
    let out_acc = Tensor::zeros([qs[0], qs[1], qs[2], qs[3]], (ak, q.device()));
    let lse_acc = Tensor::full([qs[0], qs[1], qs[2]], f64::NEG_INFINITY, (ak, q.device()));
    let mut lse_kind = Kind::Float;
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let mut cur_k = k.shallow_clone();
    let mut cur_v = v.shallow_clone();
    let mut q_rows = RowCache::default();
    for j in 0..n {
        let src = (r + n - j) % n;
        let pending = if j + 1 < n {
            let nsrc = (r + 2 * n - j - 1) % n;
            let (na, nb) = zz.ring_lens(nsrc);
            let nk = kv_buffer(k, na + nb);
            let nv = kv_buffer(v, na + nb);
            let w = comm.send_recv(&[
                P2p::Send {
                    peer: next,
                    tensor: cur_k.shallow_clone(),
                },
                P2p::Send {
                    peer: next,
                    tensor: cur_v.shallow_clone(),
                },
                P2p::Recv {
                    peer: prev,
                    tensor: nk.shallow_clone(),
                },
                P2p::Recv {
                    peer: prev,
                    tensor: nv.shallow_clone(),
                },
            ])?;
            Some((w, nk, nv))
        } else {
            None
        };
        let blks = blocks(zz, r, src);
        let first = j == 0 && blks.len() == 1;
        for blk in blks {
            let qb = q_rows.get(q, blk.q_off, blk.q_len);
            let kb = cur_k.narrow(2, blk.kv_off, blk.kv_len);
            let vb = cur_v.narrow(2, blk.kv_off, blk.kv_len);
            let (o, l) = attention_fwd(backend, &qb, &kb, &vb, blk.causal, scale)?;
            lse_kind = l.kind();
            let mut o_rows = out_acc.narrow(2, blk.q_off, blk.q_len);
            let mut l_rows = lse_acc.narrow(2, blk.q_off, blk.q_len);
            if first {
                // The first block covers every row: nothing to merge with yet.
                o_rows.f_copy_(&o)?;
                l_rows.f_copy_(&l)?;
                continue;
            }
            // out += sigmoid(lse_b - lse) * (o_b - out); lse = logaddexp(lse, lse_b), in place.
            let w = (&l - &l_rows).sigmoid().unsqueeze(-1);
            let mut diff = o.f_sub(&o_rows)?;
            let _ = diff.f_mul_(&w)?;
            let _ = o_rows.f_add_(&diff)?;
            let new_l = l_rows.logaddexp(&l);
            l_rows.f_copy_(&new_l)?;
        }
        if let Some((w, nk, nv)) = pending {
            w.wait()?;
            cur_k = nk;
            cur_v = nv;
        }
    }
    let out = out_acc.to_kind(q.kind());
    let lse = lse_acc.to_kind(lse_kind);
    let ctx = RingCtx {
        q: q.shallow_clone(),
        k: k.shallow_clone(),
        v: v.shallow_clone(),
        out: out.shallow_clone(),
        lse,
    };
    Ok((out, ctx))
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
    let dq_acc = Tensor::zeros(q.size(), (ak, q.device()));
    let (mut q_rows, mut dout_rows, mut out_rows, mut lse_rows) = (
        RowCache::default(),
        RowCache::default(),
        RowCache::default(),
        RowCache::default(),
    );
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
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
            let w = comm.send_recv(&[
                P2p::Send {
                    peer: next,
                    tensor: cur_k.shallow_clone(),
                },
                P2p::Send {
                    peer: next,
                    tensor: cur_v.shallow_clone(),
                },
                P2p::Recv {
                    peer: prev,
                    tensor: nk.shallow_clone(),
                },
                P2p::Recv {
                    peer: prev,
                    tensor: nv.shallow_clone(),
                },
            ])?;
            Some((w, nk, nv))
        } else {
            None
        };
        let mut grads = Vec::new();
        for blk in blocks(zz, r, src) {
            let cols = |t: &Tensor| t.narrow(2, blk.kv_off, blk.kv_len);
            let (dq, dk, dv) = attention_bwd(
                backend,
                &dout_rows.get(&dout, blk.q_off, blk.q_len),
                &q_rows.get(q, blk.q_off, blk.q_len),
                &cols(&cur_k),
                &cols(&cur_v),
                &out_rows.get(&ctx.out, blk.q_off, blk.q_len),
                &lse_rows.get(&ctx.lse, blk.q_off, blk.q_len),
                blk.causal,
                scale,
            )?;
            let _ = dq_acc.narrow(2, blk.q_off, blk.q_len).f_add_(&dq)?;
            grads.push((blk, dk, dv));
        }
        // dK/dV of the block held now: add to what earlier ranks accumulated for it (waited
        // for only now, so that its transfer overlapped with this step's kernels).
        let (dk_blk, dv_blk) = match pending_dkv.take() {
            Some((w, dk_in, dv_in)) => {
                w.wait()?;
                (dk_in, dv_in)
            }
            None => (
                Tensor::zeros(cur_k.size(), (ak, q.device())),
                Tensor::zeros(cur_v.size(), (ak, q.device())),
            ),
        };
        for (blk, dk, dv) in grads {
            let _ = dk_blk.narrow(2, blk.kv_off, blk.kv_len).f_add_(&dk)?;
            let _ = dv_blk.narrow(2, blk.kv_off, blk.kv_len).f_add_(&dv)?;
        }
        if n > 1 {
            // Pass the partial dK/dV on with the K/V; after the last step they reach home.
            let ks = cur_k.size();
            let dk_next = Tensor::empty([ks[0], ks[1], (na + nb) as i64, ks[3]], (ak, q.device()));
            let dv_next = dk_next.empty_like();
            let w = comm.send_recv(&[
                P2p::Send {
                    peer: next,
                    tensor: dk_blk.shallow_clone(),
                },
                P2p::Send {
                    peer: next,
                    tensor: dv_blk.shallow_clone(),
                },
                P2p::Recv {
                    peer: prev,
                    tensor: dk_next.shallow_clone(),
                },
                P2p::Recv {
                    peer: prev,
                    tensor: dv_next.shallow_clone(),
                },
            ])?;
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
    Ok((
        dq_acc.to_kind(q.kind()),
        dk.to_kind(k.kind()),
        dv.to_kind(v.kind()),
    ))
}
