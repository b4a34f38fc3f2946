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
        for blk in blocks(zz, r, src) {
            let qb = q.narrow(2, blk.q_off, blk.q_len);
            let kb = cur_k.narrow(2, blk.kv_off, blk.kv_len);
            let vb = cur_v.narrow(2, blk.kv_off, blk.kv_len);
            let (o, l) = attention_fwd(backend, &qb, &kb, &vb, blk.causal, scale)?;
            lse_kind = l.kind();
            let o_rows = out_acc.narrow(2, blk.q_off, blk.q_len);
            let l_rows = lse_acc.narrow(2, blk.q_off, blk.q_len);
            let lb = l.to_kind(ak);
            let w = (&lb - &l_rows).sigmoid().unsqueeze(-1);
            let new_o = &o_rows - w * (&o_rows - o.to_kind(ak));
            let new_l = l_rows.logaddexp(&lb);
            out_acc.narrow(2, blk.q_off, blk.q_len).f_copy_(&new_o)?;
            lse_acc.narrow(2, blk.q_off, blk.q_len).f_copy_(&new_l)?;
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
        let mut dk_blk = Tensor::zeros(cur_k.size(), (ak, q.device()));
        let mut dv_blk = Tensor::zeros(cur_v.size(), (ak, q.device()));
        for blk in blocks(zz, r, src) {
            let rows = |t: &Tensor| t.narrow(2, blk.q_off, blk.q_len);
            let cols = |t: &Tensor| t.narrow(2, blk.kv_off, blk.kv_len);
            let (dq, dk, dv) = attention_bwd(
                backend,
                &rows(&dout),
                &rows(q),
                &cols(&cur_k),
                &cols(&cur_v),
                &rows(&ctx.out),
                &rows(&ctx.lse),
                blk.causal,
                scale,
            )?;
            let _ = rows(&dq_acc).f_add_(&dq.to_kind(ak))?;
            let _ = cols(&dk_blk).f_add_(&dk.to_kind(ak))?;
            let _ = cols(&dv_blk).f_add_(&dv.to_kind(ak))?;
        }
        // dK/dV of the block held now: add what earlier ranks accumulated for it.
        if let Some((w, dk_in, dv_in)) = pending_dkv.take() {
            w.wait()?;
            dk_blk += dk_in;
            dv_blk += dv_in;
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
