//! One decode step as a captured CUDA graph (issue 18). On one SP rank on CUDA the per-token
//! chain (the embedding row, every layer's projections, RoPE, the K/V write, attention over
//! the cache and the MLP, then the LM head) is about 80 small kernels whose time was the host's
//! per-op work rather than the GPU's (runtime/README.md: about 18 us a kernel at 1M tokens
//! against the calibrated 5.5 us floor). Captured once and replayed, it is one launch a token.
//!
//! A graph replays fixed shapes at fixed addresses, so the step here is written in a
//! fixed-shape form:
//! - the token id, its position and where the new K/V go are one int64 device buffer
//!   refilled before each replay (a copy from pinned memory the host does not wait for; the
//!   token may instead be the step before's choice, copied on the device: [`TokenIn`]); the
//!   RoPE row is made in the graph from the position, in float64 as `Rope::new` makes it;
//! - the new token's K/V are written at rows named by a device index (`index_copy_`), not at
//!   a `narrow` of a host offset;
//! - attention runs over every chunk of the cache as one varlen FlashAttention call in which
//!   each (chunk, kv head) is a sequence of its own with that kv head's group of q heads as
//!   its heads (GQA without repeating K/V), the keys each holds (`seqused_k`) a device tensor;
//!   the partial results are merged by log-sum-exp, empty chunks weighted 0;
//! - the logits are cast to float64 and their argmax (the greedy choice) taken in the graph.
//!
//! The graph is captured right after one eager run of the same fixed-shape step (which does
//! that token's work and initialises the kernels' libraries), and made again if the cache
//! grows. Several ranks (an all-gather per layer between them) and the CPU decode eagerly.
use super::cache::{flash_decode_fits, KvCache};
use super::merge::{acc_kind, merge_chunks};
use crate::error::{Result, RuntimeError};
use crate::ffi::{self, CudaGraph};
use crate::model::rope::inv_freq;
use crate::model::{Decoder, Input, Rope};
use tch::{Device, Kind, Tensor};

/// Whether the fixed-shape step can run for `model`: CUDA, a 16-bit compute dtype and a head
/// dim FlashAttention takes, in a build with CUDA graphs.
pub fn fits(model: &Decoder) -> bool {
    flash_decode_fits(model.device(), model.compute, model.cfg.head_dim as i64)
        && ffi::cuda_graphs_built()
}

/// Where the token at shard index `pos` goes: the row, in the (chunks x Hkv x L, D) view of
/// a cache with chunks of `chunk` keys, of each kv head's slot.
pub fn slot_rows(pos: usize, kv_heads: usize, chunk: usize) -> Vec<i64> {
    let (c, o) = (pos / chunk, pos % chunk);
    (0..kv_heads)
        .map(|h| ((c * kv_heads + h) * chunk + o) as i64)
        .collect()
}

/// Keys held by each (chunk, kv head) sequence, chunk-major, when the cache holds `len`.
pub fn used_keys(len: usize, chunks: usize, kv_heads: usize, chunk: usize) -> Vec<i32> {
    (0..chunks)
        .flat_map(|c| {
            let n = len.saturating_sub(c * chunk).min(chunk) as i32;
            std::iter::repeat_n(n, kv_heads)
        })
        .collect()
}

/// Writes one token's `k`, `v` (1, Hkv, 1, D) into the cache at `slots` (device int64, from
/// [`slot_rows`]); the cache's length is advanced by the caller.
pub fn write_slots(cache: &KvCache, slots: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let (ck, cv) = cache.storage();
    let s = ck.size();
    let (hkv, d) = (s[1], s[3]);
    for (dst, src) in [(ck, k), (cv, v)] {
        let mut flat = dst.view([-1, d]);
        let _ = flat.f_index_copy_(0, slots, &src.reshape([hkv, d]))?;
    }
    Ok(())
}

/// The varlen starts of a cache's (chunk, kv head) sequences: one query each (`cu_q`) and
/// `chunk` keys apart (`cu_k`), int32 on the cache's device.
pub fn varlen_starts(cache: &KvCache) -> (Tensor, Tensor) {
    let (k, _) = cache.storage();
    let s = k.size();
    let b = s[0] * s[1];
    let opt = (Kind::Int, k.device());
    let cu_q = Tensor::arange(b + 1, opt);
    (cu_q.shallow_clone(), cu_q * s[2])
}

/// Attention of `q` (1, Hq, 1, D) over the keys `used` (device int32, from [`used_keys`]):
/// (1, Hq, 1, D) in the accumulation dtype. See the module header.
fn attend_fixed(
    cache: &KvCache,
    q: &Tensor,
    used: &Tensor,
    cu: &(Tensor, Tensor),
    scale: f64,
) -> Result<Tensor> {
    let (k, v) = cache.storage();
    let s = k.size();
    let (chunks, hkv, l, d) = (s[0], s[1], s[2], s[3]);
    let hq = q.size()[1];
    let g = hq / hkv;
    let b = chunks * hkv;
    // (b, g, D): each kv head's group of q heads, once per chunk.
    let qb = q
        .reshape([1, hkv, g, d])
        .expand([chunks, hkv, g, d], false)
        .reshape([b, g, d]);
    let kv = |t: &Tensor| t.view([b * l, 1, d]);
    let (o, lse) = ffi::flash_varlen_fwd(&qb, &kv(k), &kv(v), &cu.0, &cu.1, used, 1, l, scale)?;
    // lse (g, b) -> (chunks, Hkv, g); a chunk with no keys has a non-finite lse: weight 0.
    let lse = lse.view([g, chunks, hkv]).permute([1, 2, 0]);
    let lse = lse.where_scalarother(&lse.isfinite(), f64::NEG_INFINITY);
    let (out, _, _) = merge_chunks(&o.view([chunks, hkv, g, d]), &lse, acc_kind(q.kind()))?;
    Ok(out.reshape([1, hq, 1, d]))
}

/// An int64 device buffer refilled from the host without the host waiting for the device:
/// the values go to a pinned host buffer, whose copy is queued, then into `packed` on the
/// device (a fixed address a graph can read). The pinned buffer is rewritten only after the
/// event recorded behind its last copy has passed. `calibrate-launch` times this same refill.
pub struct StagedInput {
    packed: Tensor,
    staging: Tensor,
    staged: ffi::TimingEvent,
    device: usize,
}

impl StagedInput {
    /// A zeroed buffer of `width` values on `cuda:device`.
    pub fn new(width: i64, device: usize) -> Result<StagedInput> {
        Ok(StagedInput {
            packed: Tensor::f_zeros([width], (Kind::Int64, Device::Cuda(device)))?,
            staging: ffi::pinned_i64(width)?,
            staged: ffi::TimingEvent::new()?,
            device,
        })
    }

    /// The device buffer.
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// Queues the copy of `values` (as many as the buffer holds) into the device buffer.
    pub fn load(&self, values: &[i64]) -> Result<()> {
        self.staged.synchronize()?;
        let mut staging = self.staging.shallow_clone();
        staging.f_copy_(&Tensor::f_from_slice(values)?)?;
        let dev = self.packed.device();
        let on_device = staging.f_to_device_(dev, Kind::Int64, true, false)?;
        self.staged.record(self.device)?;
        let mut dst = self.packed.shallow_clone();
        Ok(dst.f_copy_(&on_device)?)
    }
}

/// The inputs a replay reads: one int64 buffer refilled from the host before each replay
/// ([`StagedInput`]), laid out as [token, position, the new token's slot rows (Hkv, from
/// [`slot_rows`]), keys used per (chunk, kv head) with it held (chunks x Hkv, from
/// [`used_keys`])], and what stays fixed.
struct Inputs {
    packed: StagedInput,
    kv_heads: i64,
    batches: i64,
    /// RoPE's inverse frequencies (float64, on the device) and attention scale: the graph
    /// makes the position's row as `Rope::new` does.
    inv: Tensor,
    rope_scale: f64,
    cu: (Tensor, Tensor),
}

/// The fixed-shape decode step and, once captured, its graph (one per [`RankInference`]).
///
/// [`RankInference`]: super::RankInference
pub struct DecodeGraph {
    device: usize,
    /// Chunks of the caches the inputs were made for (a grown cache needs a new graph).
    chunks: i64,
    inputs: Inputs,
    /// The graph and its outputs.
    captured: Option<(CudaGraph, Step)>,
}

/// The token a step is fed: known on the host, or the greedy choice of the step before,
/// still on the device (its `Step::next`), so that the host can queue the step without
/// waiting for the one before.
pub enum TokenIn<'a> {
    Host(i64),
    Device(&'a Tensor),
}

/// What a step returns, on the device.
pub struct Step {
    /// The logits (vocab,) in float64.
    pub logits: Tensor,
    /// Every layer's merged attention output (layers, Hq, D) in the accumulation dtype.
    pub outs: Tensor,
    /// The greedy choice of the next token (the logits' argmax), int64 (1,).
    pub next: Tensor,
}

impl Step {
    fn shallow_clone(&self) -> Step {
        Step {
            logits: self.logits.shallow_clone(),
            outs: self.outs.shallow_clone(),
            next: self.next.shallow_clone(),
        }
    }
}

impl DecodeGraph {
    /// Inputs for `model` over caches shaped like `cache` (nothing captured yet).
    pub fn new(model: &Decoder, cache: &KvCache) -> Result<DecodeGraph> {
        let device = match model.device() {
            Device::Cuda(i) => i,
            d => {
                return Err(RuntimeError::Cuda(format!(
                    "CUDA graphs need CUDA, not {d:?}"
                )))
            }
        };
        let (k, _) = cache.storage();
        let s = k.size();
        let dev = model.device();
        let (inv, rope_scale) = inv_freq(&model.cfg);
        let width = 2 + s[1] + s[0] * s[1];
        let inputs = Inputs {
            packed: StagedInput::new(width, device)?,
            kv_heads: s[1],
            batches: s[0] * s[1],
            inv: Tensor::f_from_slice(&inv)?.f_to(dev)?,
            rope_scale,
            cu: varlen_starts(cache),
        };
        Ok(DecodeGraph {
            device,
            chunks: s[0],
            inputs,
            captured: None,
        })
    }

    /// Whether this step was made for caches shaped like `cache`.
    pub fn fits_cache(&self, cache: &KvCache) -> bool {
        cache.storage().0.size()[0] == self.chunks
    }

    /// Whether the graph is captured (later steps replay it).
    pub fn is_captured(&self) -> bool {
        self.captured.is_some()
    }

    /// Queues the copy of the step's inputs: `token` at global position `pos`, stored at
    /// shard index `len` of every cache (whose length is `len` before the step). The host
    /// does not wait for the device, except for the previous copy to have left the staging.
    fn fill(&self, cache: &KvCache, token: i64, pos: usize, len: usize) -> Result<()> {
        let s = cache.storage().0.size();
        let (chunks, hkv, l) = (s[0] as usize, s[1] as usize, s[2] as usize);
        let mut v = Vec::with_capacity(self.inputs.packed.packed().numel());
        v.extend([token, pos as i64]);
        v.extend(slot_rows(len, hkv, l));
        v.extend(
            used_keys(len + 1, chunks, hkv, l)
                .into_iter()
                .map(i64::from),
        );
        self.inputs.packed.load(&v)
    }

    /// The fixed-shape step, queued on the current stream (run or captured).
    fn chain(&self, model: &Decoder, caches: &[KvCache], scale: f64) -> Result<Step> {
        let cfg = &model.cfg;
        let i = &self.inputs;
        let packed = i.packed.packed();
        let token = packed.narrow(0, 0, 1).view([1, 1]);
        let pos = packed.narrow(0, 1, 1);
        let slots = packed.narrow(0, 2, i.kv_heads);
        let used = packed
            .narrow(0, 2 + i.kv_heads, i.batches)
            .f_to_kind(Kind::Int)?;
        let rope = Rope::from_inv(&pos, &i.inv, i.rope_scale, model.compute);
        let mut x = model.embed(Input::Ids(&token))?;
        let mut outs = Vec::with_capacity(caches.len());
        for (l, cache) in caches.iter().enumerate() {
            let (q, k, v) = model.pre_attention(l, &x, &rope);
            write_slots(cache, &slots, &k, &v)?;
            let a = attend_fixed(cache, &q, &used, &i.cu, scale)?;
            outs.push(a.reshape([cfg.num_heads as i64, cfg.head_dim as i64]));
            x = model.post_attention(l, &x, &a.to_kind(model.compute))?;
        }
        let logits = model
            .head(&x)
            .reshape([cfg.vocab_size as i64])
            .f_to_kind(Kind::Double)?;
        let next = logits.f_argmax(0, false)?.f_reshape([1])?;
        Ok(Step {
            logits,
            outs: Tensor::stack(&outs, 0),
            next,
        })
    }

    /// Decodes `token` at global position `pos`: replays the graph, or on the first call
    /// runs the step eagerly and then captures it. Returns the step's outputs on the device,
    /// the graph's own buffers that the next replay overwrites (the attention outputs a copy
    /// when `keep_outs`); nothing waits for the device. The caller advances the caches by one
    /// token.
    pub fn step(
        &mut self,
        model: &Decoder,
        caches: &[KvCache],
        (token, pos): (TokenIn<'_>, usize),
        scale: f64,
        keep_outs: bool,
    ) -> Result<Step> {
        let first = caches
            .first()
            .ok_or_else(|| RuntimeError::Shape("decode before prefill".into()))?;
        if !caches.iter().all(|c| self.fits_cache(c)) {
            return Err(RuntimeError::Shape(
                "decode graph made for caches of another size".into(),
            ));
        }
        let host_token = match token {
            TokenIn::Host(t) => t,
            TokenIn::Device(_) => 0,
        };
        self.fill(first, host_token, pos, first.len())?;
        if let TokenIn::Device(t) = token {
            // Queued after the step that chose it, before this one reads it.
            let mut slot = self.inputs.packed.packed().narrow(0, 0, 1);
            slot.f_copy_(t)?;
        }
        let mut out = match &self.captured {
            Some((g, out)) => {
                g.replay()?;
                out.shallow_clone()
            }
            None => {
                let eager = self.chain(model, caches, scale)?;
                let (g, out) =
                    CudaGraph::capture(self.device, || self.chain(model, caches, scale))?;
                self.captured = Some((g, out));
                eager
            }
        };
        if keep_outs {
            out.outs = out.outs.copy();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writing at `slot_rows` and counting with `used_keys` places tokens exactly where
    /// `KvCache::append` does, across chunk edges.
    #[test]
    fn slots_and_counts_match_append() {
        let (hkv, d, chunk) = (3i64, 4i64, 5usize);
        let opt = (Kind::Double, Device::Cpu);
        let mut by_append =
            KvCache::new(hkv as usize, d as usize, 33, chunk, opt.0, opt.1).unwrap();
        let mut by_slots = KvCache::new(hkv as usize, d as usize, 33, chunk, opt.0, opt.1).unwrap();
        let prompt = Tensor::arange(hkv * 7 * d, opt).view([1, hkv, 7, d]);
        by_append.append(&prompt, &prompt).unwrap();
        by_slots.append(&prompt, &prompt).unwrap();
        for t in 0..14i64 {
            let k = Tensor::full([1, hkv, 1, d], 1000.0 + t as f64, opt);
            let v = -&k;
            by_append.append(&k, &v).unwrap();
            let slots = Tensor::from_slice(&slot_rows(by_slots.len(), hkv as usize, chunk));
            write_slots(&by_slots, &slots, &k, &v).unwrap();
            by_slots.advance(1).unwrap();
            let (a, b) = (by_append.storage(), by_slots.storage());
            assert_eq!(
                (a.0 - b.0).abs().max().double_value(&[]),
                0.0,
                "K after token {t}"
            );
            assert_eq!(
                (a.1 - b.1).abs().max().double_value(&[]),
                0.0,
                "V after token {t}"
            );
        }
        assert_eq!(by_slots.len(), 21);
        let chunks = by_slots.storage().0.size()[0] as usize;
        let used = used_keys(21, chunks, hkv as usize, chunk);
        assert_eq!(used.len(), chunks * hkv as usize);
        // 21 tokens in chunks of 5: four full chunks, then one token, then empty chunks.
        let mut want = vec![5; 12];
        want.extend([1, 1, 1]);
        want.resize(chunks * hkv as usize, 0);
        assert_eq!(used, want);
        assert_eq!(
            used.iter().map(|&n| n as usize).sum::<usize>(),
            21 * hkv as usize
        );
        // Past the capacity: an error, not a silent overwrite.
        let mut full = by_slots;
        assert!(full.advance(1000).is_err());
    }
}
