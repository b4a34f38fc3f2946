//! 2D sequence-parallel attention: Ulysses inside (sequence <-> head all-to-all) x zigzag
//! ring across, with GQA (kv heads replicated when the Ulysses degree exceeds them, and the
//! gradients of the copies summed). Every shape and layout check happens in
//! [`Attention2d::new`] / before the first collective of a call.
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::ring::{ring_bwd, ring_fwd, RingCtx};
use crate::shard::Zigzag;
use crate::ulysses::{head_to_seq, seq_to_head};
use tch::Tensor;

/// Problem shape, the same on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One rank's view of a 2D attention layer.
pub struct Attention2d<'a> {
    ulysses: &'a dyn Communicator,
    ring: &'a dyn Communicator,
    backend: Backend,
    shape: AttnShape,
    zz: Zigzag,
    /// How many Ulysses ranks share each kv head (1 when kv heads >= ulysses).
    kv_rep: usize,
    scale: f64,
}

/// Saved state between forward and backward.
pub struct Attn2dCtx {
    ring: RingCtx,
}

impl<'a> Attention2d<'a> {
    /// Validates the shape against the groups; fails before any communication.
    pub fn new(
        ulysses: &'a dyn Communicator,
        ring: &'a dyn Communicator,
        backend: Backend,
        shape: AttnShape,
    ) -> Result<Attention2d<'a>> {
        let (u, r) = (ulysses.size(), ring.size());
        let zz = Zigzag::new(shape.seq_len, u, r)?;
        let AttnShape {
            q_heads: hq,
            kv_heads: hkv,
            ..
        } = shape;
        if hq == 0 || hkv == 0 || shape.head_dim == 0 || shape.batch == 0 {
            return Err(RuntimeError::Shape(format!("empty dimension in {shape:?}")));
        }
        if hq % hkv != 0 {
            return Err(RuntimeError::Shape(format!(
                "{hq} q heads are not a multiple of {hkv} kv heads"
            )));
        }
        if hq % u != 0 {
            return Err(RuntimeError::Layout(format!(
                "{hq} q heads cannot be split over ulysses = {u} ranks"
            )));
        }
        let kv_rep = if hkv >= u {
            if hkv % u != 0 {
                return Err(RuntimeError::Layout(format!(
                    "{hkv} kv heads cannot be split over ulysses = {u} ranks"
                )));
            }
            1
        } else {
            if u % hkv != 0 {
                return Err(RuntimeError::Layout(format!(
                    "ulysses = {u} is not a multiple of the {hkv} kv heads, so they cannot be replicated evenly"
                )));
            }
            u / hkv
        };
        Ok(Attention2d {
            ulysses,
            ring,
            backend,
            shape,
            zz,
            kv_rep,
            scale: 1.0 / (shape.head_dim as f64).sqrt(),
        })
    }

    /// The zigzag sharding used.
    pub fn sharding(&self) -> &Zigzag {
        &self.zz
    }

    fn check_input(&self, name: &str, t: &Tensor, heads: usize) -> Result<()> {
        let (la, lb) = self.zz.local_lens(self.ring.rank(), self.ulysses.rank());
        let want = [
            self.shape.batch as i64,
            heads as i64,
            (la + lb) as i64,
            self.shape.head_dim as i64,
        ];
        if t.size() != want {
            return Err(RuntimeError::Shape(format!(
                "rank (ring {}, ulysses {}): {name} is {:?}, expected {want:?}",
                self.ring.rank(),
                self.ulysses.rank(),
                t.size()
            )));
        }
        Ok(())
    }

    /// Forward on this rank's shard: q (B, Hq, s_local, D), k and v (B, Hkv, s_local, D).
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Attn2dCtx)> {
        self.check_input("q", q, self.shape.q_heads)?;
        self.check_input("k", k, self.shape.kv_heads)?;
        self.check_input("v", v, self.shape.kv_heads)?;
        if k.kind() != q.kind() || v.kind() != q.kind() {
            return Err(RuntimeError::Shape("q, k and v must have one dtype".into()));
        }
        let r = self.ring.rank();
        let rep = |t: &Tensor| {
            if self.kv_rep == 1 {
                t.shallow_clone()
            } else {
                t.repeat_interleave_self_int(self.kv_rep as i64, 1, None)
            }
        };
        let qh = seq_to_head(self.ulysses, &self.zz, r, q)?;
        let kh = seq_to_head(self.ulysses, &self.zz, r, &rep(k))?;
        let vh = seq_to_head(self.ulysses, &self.zz, r, &rep(v))?;
        let (oh, ring) = ring_fwd(self.ring, &self.zz, self.backend, &qh, &kh, &vh, self.scale)?;
        let out = head_to_seq(self.ulysses, &self.zz, r, &oh)?;
        Ok((out, Attn2dCtx { ring }))
    }

    /// Backward: returns (dq, dk, dv) for this rank's shard.
    pub fn backward(&self, ctx: &Attn2dCtx, dout: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        self.check_input("dout", dout, self.shape.q_heads)?;
        let r = self.ring.rank();
        let doh = seq_to_head(self.ulysses, &self.zz, r, dout)?;
        let (dqh, dkh, dvh) = ring_bwd(
            self.ring,
            &self.zz,
            self.backend,
            &ctx.ring,
            &doh,
            self.scale,
        )?;
        let dq = head_to_seq(self.ulysses, &self.zz, r, &dqh)?;
        let dk = head_to_seq(self.ulysses, &self.zz, r, &dkh)?;
        let dv = head_to_seq(self.ulysses, &self.zz, r, &dvh)?;
        let unrep = |t: Tensor| {
            if self.kv_rep == 1 {
                t
            } else {
                let s = t.size();
                let g = self.kv_rep as i64;
                t.reshape([s[0], s[1] / g, g, s[2], s[3]])
                    .sum_dim_intlist(2, false, t.kind())
            }
        };
        Ok((dq, unrep(dk), unrep(dv)))
    }
}
