//! Packed multi-sample sequences with document-masked attention. A packed sequence is several
//! samples laid end to end; each sample of length L_j is zigzag-sharded on its own over the
//! SP group ([`Zigzag`] of L_j: 2 x ring chunks, ring rank r holds chunks r and 2R-1-r, each
//! cut into `ulysses` sub-chunks of which Ulysses rank u holds sub-chunk u), and a rank's local
//! shard is the concatenation, sample by sample, of its two pieces of that sample: the order
//! of the planner's `tokens.ranges_per_rank` (`mmsp_plan::zigzag`, the contract crate).
//!
//! Attention is per sample (a document mask): [`PackedAttention`] runs [`Attention2d`] on each
//! sample's local rows (a zigzag-sharded sequence of L_j tokens over the SP group) and writes
//! the outputs back in place, so no token attends to another sample; one 2D attention call
//! (its all-to-alls and its ring) per sample. RoPE positions restart at 0 in each sample
//! ([`Packing::positions`]), the usual packed-training convention; the single-rank reference
//! in the tests uses the same. (Under the document mask RoPE's relative rotation makes this
//! equal, up to rounding, to positions running on through the packed sequence.)
//!
//! One sample is exactly the single zigzag sequence of before: any length of at least
//! 2 x ring x ulysses tokens (parts may differ by one token), one attention call on the
//! rank's tensors as they are. With two or more samples, every sample's length must be a
//! multiple of 2 x ring x ulysses (there the runtime's split and the planner's coincide, and
//! every rank holds 2 x L_j / (2 x ring x ulysses) rows of each sample); otherwise
//! [`Packing::new`] is a [`RuntimeError::Shape`].
use crate::attn2d::{Attention2d, Attn2dCtx, AttnShape};
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::shard::Zigzag;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The per-sample zigzag sharding of a packed sequence over a ulysses x ring SP group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    pub ulysses: usize,
    pub ring: usize,
    /// Each sample's zigzag sharding.
    samples: Vec<Zigzag>,
    /// Global position of each sample's first token.
    starts: Vec<usize>,
    seq_len: usize,
}

impl Packing {
    /// Checks the samples against the SP group (see the module header); fails with
    /// [`RuntimeError::Shape`] (or `Layout` for zero degrees) before any communication.
    pub fn new(sample_lens: &[usize], ulysses: usize, ring: usize) -> Result<Packing> {
        if ulysses == 0 || ring == 0 {
            return Err(RuntimeError::Layout(
                "ulysses and ring degrees must be >= 1".into(),
            ));
        }
        if sample_lens.is_empty() {
            return Err(RuntimeError::Shape(
                "a packed sequence needs at least one sample".into(),
            ));
        }
        let parts = 2 * ulysses * ring;
        let packed = sample_lens.len() > 1;
        let mut samples = Vec::with_capacity(sample_lens.len());
        let mut starts = Vec::with_capacity(sample_lens.len());
        let mut at = 0usize;
        for (j, &len) in sample_lens.iter().enumerate() {
            if packed && (len == 0 || !len.is_multiple_of(parts)) {
                return Err(RuntimeError::Shape(format!(
                    "packed sample {j} has {len} tokens, not a positive multiple of 2 x ring {ring} x ulysses {ulysses} = {parts} (each sample is zigzag-sharded on its own)"
                )));
            }
            samples.push(Zigzag::new(len, ulysses, ring)?);
            starts.push(at);
            at = at
                .checked_add(len)
                .ok_or_else(|| RuntimeError::Shape("the packed sequence overflows usize".into()))?;
        }
        Ok(Packing {
            ulysses,
            ring,
            samples,
            starts,
            seq_len: at,
        })
    }

    /// Tokens of the packed sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of samples.
    pub fn num_samples(&self) -> usize {
        self.samples.len()
    }

    /// Each sample's length.
    pub fn sample_lens(&self) -> Vec<usize> {
        self.samples.iter().map(|z| z.seq_len).collect()
    }

    /// Sample j's zigzag sharding (positions relative to the sample's start).
    pub fn sample(&self, j: usize) -> &Zigzag {
        &self.samples[j]
    }

    /// Global position of sample j's first token.
    pub fn sample_start(&self, j: usize) -> usize {
        self.starts[j]
    }

    /// Rows of each sample in rank (r, u)'s local shard, in sample order.
    pub fn local_lens(&self, r: usize, u: usize) -> Vec<usize> {
        self.samples
            .iter()
            .map(|z| {
                let (a, b) = z.local_lens(r, u);
                a + b
            })
            .collect()
    }

    /// Rows of rank (r, u)'s local shard.
    pub fn local_len(&self, r: usize, u: usize) -> usize {
        self.local_lens(r, u).iter().sum()
    }

    /// Token ranges [start, end) of the packed sequence held by rank (r, u), in local order:
    /// two per sample (its first-half chunk's piece, then its second-half chunk's).
    pub fn local_ranges(&self, r: usize, u: usize) -> Vec<(usize, usize)> {
        self.samples
            .iter()
            .zip(&self.starts)
            .flat_map(|(z, &s)| z.local_ranges(r, u).map(|(a, b)| (s + a, s + b)))
            .collect()
    }

    /// Every SP rank's ranges, by SP rank `ring_idx * ulysses + ulysses_idx` (the plan's
    /// `tokens.ranges_per_rank`).
    pub fn ranges_per_sp_rank(&self) -> Vec<Vec<(usize, usize)>> {
        (0..self.ring * self.ulysses)
            .map(|sp| self.local_ranges(sp / self.ulysses, sp % self.ulysses))
            .collect()
    }

    /// RoPE positions of rank (r, u)'s local rows: each token's position inside its sample
    /// (positions restart at 0 in every sample).
    pub fn positions(&self, r: usize, u: usize) -> Vec<i64> {
        self.samples
            .iter()
            .flat_map(|z| z.local_ranges(r, u))
            .flat_map(|(a, b)| (a as i64)..(b as i64))
            .collect()
    }

    /// Local rows of rank (r, u) that hold the last token of a sample (ascending).
    pub fn last_rows(&self, r: usize, u: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut row = 0;
        for z in &self.samples {
            for (a, b) in z.local_ranges(r, u) {
                if b == z.seq_len && b > a {
                    out.push(row + (b - a) - 1);
                }
                row += b - a;
            }
        }
        out
    }

    /// Rank (r, u)'s shard of a full tensor whose dimension `dim` is the packed sequence.
    pub fn shard(&self, full: &Tensor, dim: i64, r: usize, u: usize) -> Result<Tensor> {
        crate::shard::shard_ranges(full, dim, self.seq_len, &self.local_ranges(r, u))
    }

    /// Reassembles the full tensor from every rank's shard (`shards[r][u]`).
    pub fn unshard(&self, shards: &[Vec<Tensor>], dim: i64) -> Result<Tensor> {
        crate::shard::unshard_ranges(shards, dim, |r, u| self.local_ranges(r, u))
    }

    /// A fixed-size summary every rank must share: samples, tokens, and a hash of the lengths.
    fn descriptor(&self) -> [i64; 3] {
        // FNV-1a over the lengths.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for z in &self.samples {
            for b in (z.seq_len as u64).to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        [
            self.samples.len() as i64,
            self.seq_len as i64,
            (h >> 1) as i64,
        ]
    }
}

/// One rank's view of document-masked 2D attention over a packed sequence.
pub struct PackedAttention<'a> {
    ulysses: &'a dyn Communicator,
    ring: &'a dyn Communicator,
    packing: Packing,
    /// One [`Attention2d`] per distinct sample length, and each sample's.
    attns: Vec<Attention2d<'a>>,
    which: Vec<usize>,
    /// Each sample's (first local row, local rows) on this rank.
    rows: Vec<(i64, i64)>,
    /// Whether every rank of both groups agreed on the packing (once, before the first
    /// per-sample call, so that ranks with different samples fail alike instead of hanging).
    agreed: Mutex<bool>,
}

/// Saved state between forward and backward: one context per sample.
pub struct PackedCtx {
    ctx: Vec<Attn2dCtx>,
}

impl<'a> PackedAttention<'a> {
    /// `shape.seq_len` must be the packed length (the sum of `sample_lens`); every check
    /// happens here, before any communication.
    pub fn new(
        ulysses: &'a dyn Communicator,
        ring: &'a dyn Communicator,
        backend: Backend,
        shape: AttnShape,
        sample_lens: &[usize],
    ) -> Result<PackedAttention<'a>> {
        let packing = Packing::new(sample_lens, ulysses.size(), ring.size())?;
        if packing.seq_len() != shape.seq_len {
            return Err(RuntimeError::Shape(format!(
                "the samples {sample_lens:?} hold {} tokens, the attention shape has {}",
                packing.seq_len(),
                shape.seq_len
            )));
        }
        let mut attns: Vec<Attention2d<'a>> = Vec::new();
        let mut lens: Vec<usize> = Vec::new();
        let mut which = Vec::with_capacity(sample_lens.len());
        for &len in sample_lens {
            let i = match lens.iter().position(|&l| l == len) {
                Some(i) => i,
                None => {
                    let s = AttnShape {
                        seq_len: len,
                        ..shape
                    };
                    attns.push(Attention2d::new(ulysses, ring, backend, s)?);
                    lens.push(len);
                    attns.len() - 1
                }
            };
            which.push(i);
        }
        let (r, u) = (ring.rank(), ulysses.rank());
        let mut rows = Vec::with_capacity(sample_lens.len());
        let mut at = 0i64;
        for n in packing.local_lens(r, u) {
            rows.push((at, n as i64));
            at += n as i64;
        }
        Ok(PackedAttention {
            ulysses,
            ring,
            packing,
            attns,
            which,
            rows,
            agreed: Mutex::new(false),
        })
    }

    /// The per-sample sharding used.
    pub fn packing(&self) -> &Packing {
        &self.packing
    }

    /// Rows of this rank's shard.
    fn local_len(&self) -> i64 {
        self.rows.iter().map(|r| r.1).sum()
    }

    /// Agrees on the packing with every rank of both groups, once (see the field).
    fn agree(&self, device: Device) -> Result<()> {
        let mut agreed = self.agreed.lock().unwrap_or_else(|e| e.into_inner());
        if *agreed {
            return Ok(());
        }
        let mine = self.packing.descriptor();
        let (u, r) = (self.ulysses.size() as i64, self.ring.size() as i64);
        let one = Tensor::from_slice(&mine).reshape([1, 3]).to(device);
        let uly = Tensor::zeros([u, 3], (Kind::Int64, device));
        self.ulysses.all_gather(&one, &uly)?;
        let table = Tensor::zeros([u * r, 3], (Kind::Int64, device));
        self.ring.all_gather(&uly, &table)?;
        let flat = Vec::<i64>::try_from(table.to(Device::Cpu).reshape([-1]))?;
        let rows: Vec<&[i64]> = flat.chunks(3).collect();
        let bad: Vec<String> = rows
            .iter()
            .enumerate()
            .filter(|(_, row)| **row != rows[0])
            .map(|(i, _)| format!("(ring {}, ulysses {})", i as i64 / u, i as i64 % u))
            .collect();
        if !bad.is_empty() {
            return Err(RuntimeError::Shape(format!(
                "ranks disagree on the packed samples: rank(s) {} differ from rank (ring 0, ulysses 0), which has {} samples of {} tokens",
                bad.join(", "),
                rows[0][0],
                rows[0][1]
            )));
        }
        *agreed = true;
        Ok(())
    }

    fn check_rows(&self, name: &str, t: &Tensor) -> Result<()> {
        let n = self.local_len();
        if t.dim() != 4 || t.size()[2] != n {
            return Err(RuntimeError::Shape(format!(
                "rank (ring {}, ulysses {}): {name} is {:?}, expected {n} local rows in dim 2",
                self.ring.rank(),
                self.ulysses.rank(),
                t.size()
            )));
        }
        Ok(())
    }

    /// Forward on this rank's shard: q (B, Hq, s_local, D), k and v (B, Hkv, s_local, D),
    /// rows in [`Packing::local_ranges`] order. One sample: [`Attention2d::forward`] on the
    /// tensors as given.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, PackedCtx)> {
        self.agree(q.device())?;
        if self.rows.len() == 1 {
            let (o, c) = self.attns[0].forward(q, k, v)?;
            return Ok((o, PackedCtx { ctx: vec![c] }));
        }
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            self.check_rows(name, t)?;
        }
        let out = q.empty_like();
        let mut ctx = Vec::with_capacity(self.rows.len());
        for (j, &(off, n)) in self.rows.iter().enumerate() {
            let part = |t: &Tensor| t.narrow(2, off, n).contiguous();
            let (o, c) = self.attns[self.which[j]].forward(&part(q), &part(k), &part(v))?;
            out.narrow(2, off, n).f_copy_(&o)?;
            ctx.push(c);
        }
        Ok((out, PackedCtx { ctx }))
    }

    /// Backward: (dq, dk, dv) for this rank's shard.
    pub fn backward(&self, ctx: &PackedCtx, dout: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if ctx.ctx.len() != self.rows.len() {
            return Err(RuntimeError::Shape(format!(
                "a context of {} samples for a packing of {}",
                ctx.ctx.len(),
                self.rows.len()
            )));
        }
        if self.rows.len() == 1 {
            return self.attns[0].backward(&ctx.ctx[0], dout);
        }
        self.check_rows("dout", dout)?;
        let mut grads: [Vec<Tensor>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for (j, &(off, n)) in self.rows.iter().enumerate() {
            let d = dout.narrow(2, off, n).contiguous();
            let (dq, dk, dv) = self.attns[self.which[j]].backward(&ctx.ctx[j], &d)?;
            for (g, t) in grads.iter_mut().zip([dq, dk, dv]) {
                g.push(t);
            }
        }
        let [dq, dk, dv] = grads.map(|g| Tensor::cat(&g, 2));
        Ok((dq, dk, dv))
    }
}
