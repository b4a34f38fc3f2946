//! 2D sequence-parallel attention: Ulysses inside (sequence <-> head all-to-all) x zigzag
//! ring across, with GQA (kv heads replicated when the Ulysses degree exceeds them, and the
//! gradients of the copies summed). Every shape and layout check happens in
//! [`Attention2d::new`] / before the first collective of a call.
//!
//! Before the first data collective of a context, the ranks agree on what they were given:
//! each all-gathers a small descriptor (its configured shape, its group sizes and ranks, the
//! dtypes and sizes of its inputs) over its Ulysses group and then that table over its ring
//! group, so every rank holds every rank's descriptor and checks all of them the same way. A
//! mismatch is the same [`RuntimeError::Shape`] on every rank, naming the rank(s) and the
//! field, instead of a hang or garbage in a later all-to-all. The agreed descriptor is cached,
//! so the hot loop pays for this once.
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::ring::{ring_bwd, ring_fwd, RingCtx};
use crate::shard::Zigzag;
use crate::ulysses::{head_to_seq, seq_to_head};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

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
    /// This rank's forward / backward descriptors once every rank agreed on them.
    agreed_fwd: Mutex<Option<Vec<i64>>>,
    agreed_bwd: Mutex<Option<Vec<i64>>>,
}

/// Fields of the cross-rank descriptor, in order (names used in error messages).
const CONFIG_FIELDS: [&str; 7] = [
    "seq_len",
    "batch",
    "q_heads",
    "kv_heads",
    "head_dim",
    "ulysses size",
    "ring size",
];
/// Index of the ulysses rank, ring rank and first input field after the config fields.
const F_ULY_RANK: usize = 7;
const F_RING_RANK: usize = 8;
const F_INPUTS: usize = 9;
/// Per input tensor: dtype code then 4 sizes (-1 where the tensor has fewer dims; a 5th
/// slot holds the number of dims).
const PER_INPUT: usize = 6;

fn dtype_code(k: Kind) -> i64 {
    match k {
        Kind::BFloat16 => 1,
        Kind::Half => 2,
        Kind::Float => 3,
        Kind::Double => 4,
        _ => 0,
    }
}

fn dtype_name(c: i64) -> &'static str {
    match c {
        1 => "bf16",
        2 => "f16",
        3 => "f32",
        4 => "f64",
        _ => "other",
    }
}

fn push_input(d: &mut Vec<i64>, t: &Tensor) {
    let s = t.size();
    d.push(dtype_code(t.kind()));
    for i in 0..4 {
        d.push(s.get(i).copied().unwrap_or(-1));
    }
    d.push(s.len() as i64);
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
            agreed_fwd: Mutex::new(None),
            agreed_bwd: Mutex::new(None),
        })
    }

    /// This rank's descriptor: configured shape, group sizes and ranks, then per input its
    /// dtype and sizes.
    fn descriptor(&self, inputs: &[&Tensor]) -> Vec<i64> {
        let sh = self.shape;
        let mut d = vec![
            sh.seq_len as i64,
            sh.batch as i64,
            sh.q_heads as i64,
            sh.kv_heads as i64,
            sh.head_dim as i64,
            self.ulysses.size() as i64,
            self.ring.size() as i64,
            self.ulysses.rank() as i64,
            self.ring.rank() as i64,
        ];
        for t in inputs {
            push_input(&mut d, t);
        }
        d
    }

    /// Agrees with every rank of both groups on the inputs `names` (with the head counts
    /// they should have), once per context: see the module header.
    fn agree(
        &self,
        cache: &Mutex<Option<Vec<i64>>>,
        names: &[&str],
        heads: &[usize],
        inputs: &[&Tensor],
        device: Device,
    ) -> Result<()> {
        let mine = self.descriptor(inputs);
        let mut agreed = cache.lock().unwrap_or_else(|e| e.into_inner());
        match agreed.as_ref() {
            Some(a) if *a == mine => return Ok(()),
            Some(a) => {
                return Err(RuntimeError::Shape(format!(
                    "rank (ring {}, ulysses {}): inputs {names:?} changed after the ranks agreed on them ({a:?} then {mine:?}); make a new Attention2d for a new shape",
                    self.ring.rank(),
                    self.ulysses.rank()
                )))
            }
            None => {}
        }
        let f = mine.len() as i64;
        let (u, r) = (self.ulysses.size() as i64, self.ring.size() as i64);
        let one = Tensor::from_slice(&mine).reshape([1, f]).to(device);
        let uly_table = Tensor::zeros([u, f], (Kind::Int64, device));
        self.ulysses.all_gather(&one, &uly_table)?;
        let table = Tensor::zeros([u * r, f], (Kind::Int64, device));
        self.ring.all_gather(&uly_table, &table)?;
        let flat = Vec::<i64>::try_from(table.to(Device::Cpu).reshape([-1]))?;
        let rows: Vec<&[i64]> = flat.chunks(mine.len()).collect();
        check_table(&rows, names, heads)?;
        *agreed = Some(mine);
        Ok(())
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
        let sh = self.shape;
        self.agree(
            &self.agreed_fwd,
            &["q", "k", "v"],
            &[sh.q_heads, sh.kv_heads, sh.kv_heads],
            &[q, k, v],
            q.device(),
        )?;
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
        self.agree(
            &self.agreed_bwd,
            &["dout"],
            &[self.shape.q_heads],
            &[dout],
            dout.device(),
        )?;
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

/// Checks every rank's descriptor (rows of the gathered table) the same way on every rank:
/// the configuration must be one, and each rank's inputs must have the dtype of rank 0's
/// first input and the sizes its place in the zigzag sharding gives. The first problem found
/// becomes the error, naming every rank that has it.
fn check_table(rows: &[&[i64]], names: &[&str], heads: &[usize]) -> Result<()> {
    let who = |row: &[i64]| format!("(ring {}, ulysses {})", row[F_RING_RANK], row[F_ULY_RANK]);
    let list = |bad: &[&[i64]]| bad.iter().map(|r| who(r)).collect::<Vec<_>>().join(", ");
    let base = rows[0];
    for (i, field) in CONFIG_FIELDS.iter().enumerate() {
        let bad: Vec<&[i64]> = rows.iter().copied().filter(|r| r[i] != base[i]).collect();
        if !bad.is_empty() {
            return Err(RuntimeError::Shape(format!(
                "ranks disagree on {field}: rank(s) {} have {}, rank {} has {}",
                list(&bad),
                bad[0][i],
                who(base),
                base[i]
            )));
        }
    }
    let cfg = |i: usize| base[i] as usize;
    let zz = Zigzag::new(cfg(0), cfg(5), cfg(6))?;
    let dtype_at = |row: &[i64], t: usize| row[F_INPUTS + t * PER_INPUT];
    let want_dtype = dtype_at(base, 0);
    for (t, name) in names.iter().enumerate() {
        let bad: Vec<&[i64]> = rows
            .iter()
            .copied()
            .filter(|r| dtype_at(r, t) != want_dtype)
            .collect();
        if !bad.is_empty() {
            return Err(RuntimeError::Shape(format!(
                "ranks disagree on the dtype of {name}: rank(s) {} have {}, rank {} has {} for {}",
                list(&bad),
                dtype_name(dtype_at(bad[0], t)),
                who(base),
                dtype_name(want_dtype),
                names[0]
            )));
        }
    }
    for (t, name) in names.iter().enumerate() {
        let mut bad = Vec::new();
        let mut detail = String::new();
        for r in rows {
            let (ring_rank, uly_rank) = (r[F_RING_RANK] as usize, r[F_ULY_RANK] as usize);
            let (la, lb) = zz.local_lens(ring_rank, uly_rank);
            let want = [base[1], heads[t] as i64, (la + lb) as i64, base[4], 4];
            let o = F_INPUTS + t * PER_INPUT + 1;
            let got = &r[o..o + 5];
            if got != want {
                if bad.is_empty() {
                    let dims = got[4].clamp(0, 4) as usize;
                    detail = format!(
                        "{name} is {:?}, expected {:?} (B, H, local S, D)",
                        &got[..dims],
                        &want[..4]
                    );
                }
                bad.push(*r);
            }
        }
        if !bad.is_empty() {
            return Err(RuntimeError::Shape(format!(
                "rank(s) {} got wrong input shapes: at {}, {detail}",
                list(&bad),
                who(bad[0])
            )));
        }
    }
    Ok(())
}
