//! Preallocated KV cache of one layer on one rank, and the decode attention over it.
//!
//! Layout: K and V are each (chunks, kv heads, chunk length L, head dim), chunk-major, with
//! room for `capacity` tokens (a whole number of chunks) allocated once after prefill. Token
//! i of the rank's shard lives in chunk i / L at offset i mod L. A decoded token's K/V is
//! written in place (`narrow` + `copy_`); nothing is concatenated. The first `c` chunks are a
//! contiguous prefix, so viewing them as (c x kv heads) batches costs nothing.
//!
//! Decode attention ([`KvCache::attend`]) is GQA-native: the new token's query (1, Hq, 1, D)
//! is viewed as (kv heads, group, D), the group of q heads that share a kv head
//! (`repeat_interleave` order, as [`crate::kernel`] expands K/V), and multiplied against each
//! kv head's keys directly, so K/V are never repeated. Per chunk and kv head:
//! s = q K^T (group x L, in the accumulation dtype: fp32 for bf16, through `bmm` with an fp32
//! output), the tail of the last chunk masked to -inf, one max m and one sum l over all chunks
//! of exp(scale (s - m)) in fp32, then P V per chunk (P in the compute dtype, as FlashAttention
//! feeds P to its second GEMM) summed over chunks and divided by l; lse = scale m + log l.
//! This is split-K ("flash-decoding", Dao et al. 2023) written with batched GEMMs.
//!
//! Why chunks (reasoning, not yet measured): P V is a reduction over the keys with an output
//! of only group x D per kv head; as one batched GEMM it would have kv-heads batches of one
//! output tile each, i.e. a handful of thread blocks streaming the whole shard, unless the
//! BLAS library picks a split-K kernel on its own. Cutting the keys into chunks turns the
//! reduction into chunks x kv-heads independent GEMMs (then one small sum), so the GPU's
//! streaming multiprocessors (132 on an H100) all read V. [`chunk_len`] aims at about 512
//! batches (several waves) with chunks of at least 256 keys (64 KB of bf16 V per batch at
//! D = 128), so per-batch set-up stays small against the bytes read. q K^T does not need the
//! split (its output, the scores, is as long as the shard), but it uses the same chunked view.
//! No host synchronisation: lengths are host integers, every operation is queued.
//!
//! On CUDA with a 16-bit cache (the `infer` and `needle` case) [`KvCache::attend`] runs
//! FlashAttention instead (`attend_flash`): the chunks are its batch, the held part of the
//! last chunk a second call, the partials merged by log-sum-exp; the scores stay on chip and
//! the kv heads are not repeated. The GEMM path below stays for the CPU and float32/64 (and
//! is taken if the FlashAttention call fails). Measured on one H100 at 1M tokens (needle,
//! runtime/README.md): decode ms/token within noise of the GEMM path, though it moves about
//! 0.5 GB less per token: the chain is bound by its launches, not by HBM.
//!
//! Traffic of the GEMM path beyond K/V (not fused, so counted here): per key and q head the fp32 scores are
//! written once and passed over about six more times (max, subtract, scale, exp, sum, cast
//! to the compute dtype, read by P V), about 40 bytes against the 4 D / group bytes of K/V
//! per key and q head (128 bytes at D = 128 and group 4): roughly a third more HBM traffic
//! than the K/V reads alone. A fused decode kernel would remove it.
use super::merge::{acc_kind, merge_chunks};
use crate::error::{Result, RuntimeError};
use crate::kernel::attention_fwd_gqa_flash;
use tch::{Device, Kind, Tensor};

/// Batches (chunks x kv heads) the chunk length aims at.
const TARGET_BATCHES: usize = 512;
/// Shortest chunk chosen by [`chunk_len`] (keys).
const MIN_CHUNK: usize = 256;

/// Chunk length for a cache of `capacity` tokens over `kv_heads` heads: about
/// [`TARGET_BATCHES`] chunk-head batches, at least [`MIN_CHUNK`] keys, a multiple of 64.
pub fn chunk_len(capacity: usize, kv_heads: usize) -> usize {
    let per = (capacity * kv_heads).div_ceil(TARGET_BATCHES);
    per.div_ceil(64).max(1).saturating_mul(64).max(MIN_CHUNK)
}

/// Batched matmul with the product in `acc` (fp32 out of bf16 inputs on CUDA without
/// rounding the product to bf16).
fn bmm_acc(a: &Tensor, b: &Tensor, acc: Kind) -> Result<Tensor> {
    if a.kind() == acc {
        Ok(a.f_bmm(b)?)
    } else if a.device() != Device::Cpu {
        match a.f_bmm_dtype(b, acc) {
            Ok(t) => Ok(t),
            Err(e) => {
                // Should not happen on CUDA (bmm.dtype takes bf16/fp16 to fp32); if it does,
                // say so once and fall back to a product rounded to the compute dtype.
                static WARN: std::sync::Once = std::sync::Once::new();
                WARN.call_once(|| {
                    eprintln!("warning: bmm with {acc:?} output failed ({e}); decode scores are rounded to {:?}", a.kind())
                });
                Ok(a.f_bmm(b)?.to_kind(acc))
            }
        }
    } else {
        Ok(a.to_kind(acc).f_bmm(&b.to_kind(acc))?)
    }
}

/// One layer's K/V on one rank, with room for `capacity` tokens.
pub struct KvCache {
    /// (chunks, Hkv, L, D) each.
    k: Tensor,
    v: Tensor,
    len: usize,
    chunk: usize,
}

impl KvCache {
    /// An empty cache (zeros) for `capacity` tokens of `kv_heads` x `head_dim`, in chunks of
    /// `chunk` tokens.
    pub fn new(
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        chunk: usize,
        kind: Kind,
        device: Device,
    ) -> Result<KvCache> {
        if chunk == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(RuntimeError::Shape(format!(
                "KV cache of {kv_heads} heads x {head_dim} in chunks of {chunk}"
            )));
        }
        let chunks = capacity.div_ceil(chunk).max(1) as i64;
        let shape = [chunks, kv_heads as i64, chunk as i64, head_dim as i64];
        // Zeros: masked keys get probability 0, and 0 x 0 stays 0 (no NaN from garbage).
        Ok(KvCache {
            k: Tensor::f_zeros(shape, (kind, device))?,
            v: Tensor::f_zeros(shape, (kind, device))?,
            len: 0,
            chunk,
        })
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens that fit without reallocating.
    pub fn capacity(&self) -> usize {
        self.k.size()[0] as usize * self.chunk
    }

    /// Chunk length (keys).
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Bytes of the tokens held (K and V).
    pub fn bytes_used(&self) -> usize {
        let s = self.k.size();
        2 * self.len * (s[1] * s[3]) as usize * self.k.kind().elt_size_in_bytes()
    }

    /// Bytes allocated (K and V, the whole capacity).
    pub fn bytes_allocated(&self) -> usize {
        2 * self.k.numel() * self.k.kind().elt_size_in_bytes()
    }

    /// Grows the capacity to at least `need` tokens (doubling): one copy of the cache. Only
    /// reached when more tokens are decoded than the cache was sized for.
    fn grow(&mut self, need: usize) -> Result<()> {
        let s = self.k.size();
        let chunks = need.div_ceil(self.chunk).max(2 * s[0] as usize).max(1) as i64;
        let shape = [chunks, s[1], s[2], s[3]];
        let (k, v) = (
            Tensor::f_zeros(shape, (self.k.kind(), self.k.device()))?,
            Tensor::f_zeros(shape, (self.v.kind(), self.v.device()))?,
        );
        k.narrow(0, 0, s[0]).f_copy_(&self.k)?;
        v.narrow(0, 0, s[0]).f_copy_(&self.v)?;
        self.k = k;
        self.v = v;
        Ok(())
    }

    /// Appends `k`, `v` (1, Hkv, n, D) or (Hkv, n, D) after the tokens held: at most three
    /// in-place copies each (the rest of the current chunk, whole chunks, the start of the
    /// last one).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (k, v) = if k.dim() == 4 {
            (k.squeeze_dim(0), v.squeeze_dim(0))
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let s = self.k.size();
        if k.size() != v.size() || k.dim() != 3 || k.size()[0] != s[1] || k.size()[2] != s[3] {
            return Err(RuntimeError::Shape(format!(
                "KV append of {:?} / {:?} into a cache of {} heads x {}",
                k.size(),
                v.size(),
                s[1],
                s[3]
            )));
        }
        let n = k.size()[1] as usize;
        if self.len + n > self.capacity() {
            self.grow(self.len + n)?;
        }
        let l = self.chunk;
        let (hkv, d) = (s[1], s[3]);
        let mut done = 0usize;
        while done < n {
            let pos = self.len + done;
            let (c, o) = ((pos / l) as i64, pos % l);
            if o == 0 && n - done >= l {
                // Whole chunks in one copy: (Hkv, f L, D) viewed as (f, Hkv, L, D).
                let f = (n - done) / l;
                let src = |t: &Tensor| {
                    t.narrow(1, done as i64, (f * l) as i64)
                        .view([hkv, f as i64, l as i64, d])
                        .permute([1, 0, 2, 3])
                };
                self.k.narrow(0, c, f as i64).f_copy_(&src(&k))?;
                self.v.narrow(0, c, f as i64).f_copy_(&src(&v))?;
                done += f * l;
            } else {
                let m = (l - o).min(n - done);
                let dst = |t: &Tensor| t.select(0, c).narrow(1, o as i64, m as i64);
                dst(&self.k).f_copy_(&k.narrow(1, done as i64, m as i64))?;
                dst(&self.v).f_copy_(&v.narrow(1, done as i64, m as i64))?;
                done += m;
            }
        }
        self.len += n;
        Ok(())
    }

    /// The K and V storage, (chunks, Hkv, L, D) each (the fixed-shape decode writes into it).
    pub fn storage(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    /// Counts `n` tokens written after the held ones by [`super::graph::write_slots`].
    pub fn advance(&mut self, n: usize) -> Result<()> {
        if self.len + n > self.capacity() {
            return Err(RuntimeError::Shape(format!(
                "KV cache of {} tokens cannot hold {} more after {}",
                self.capacity(),
                n,
                self.len
            )));
        }
        self.len += n;
        Ok(())
    }

    /// Forgets the last `n` tokens held (a decode step undone); their slots are written again
    /// by the next tokens.
    pub fn retreat(&mut self, n: usize) -> Result<()> {
        if n > self.len {
            return Err(RuntimeError::Shape(format!(
                "KV cache holds {} tokens, cannot forget {n}",
                self.len
            )));
        }
        self.len -= n;
        Ok(())
    }

    /// The tokens held as (1, Hkv, len, D) K and V (copies; for checks and references).
    pub fn to_contiguous(&self) -> (Tensor, Tensor) {
        let s = self.k.size();
        let f = |t: &Tensor| {
            t.permute([1, 0, 2, 3])
                .reshape([s[1], -1, s[3]])
                .narrow(1, 0, self.len as i64)
                .unsqueeze(0)
        };
        (f(&self.k), f(&self.v))
    }

    /// Attention of the new token's query `q` (1, Hq, 1, D) over every cached key (no mask:
    /// every cached key precedes it): (out (1, Hq, 1, D), lse (1, Hq, 1)) in the accumulation
    /// dtype. An empty cache gives out = 0 and lse = -inf, which the merge ignores.
    pub fn attend(&self, q: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        let qs = q.size();
        let s = self.k.size();
        let (hkv, l, d) = (s[1], s[2], s[3]);
        if qs.len() != 4 || qs[0] != 1 || qs[2] != 1 || qs[3] != d || qs[1] % hkv != 0 {
            return Err(RuntimeError::Shape(format!(
                "decode query must be (1, Hq, 1, {d}) with Hq a multiple of {hkv}, got {qs:?}"
            )));
        }
        let hq = qs[1];
        let g = hq / hkv;
        let ak = acc_kind(q.kind());
        let dev = q.device();
        if self.len == 0 {
            return Ok((
                Tensor::zeros([1, hq, 1, d], (ak, dev)),
                Tensor::full([1, hq, 1], f64::NEG_INFINITY, (ak, dev)),
            ));
        }
        // Set once a FlashAttention call failed (e.g. a GPU it does not support): the process
        // decodes with the GEMM path from then on instead of failing a call per token.
        static FLASH_FAILED: std::sync::atomic::AtomicBool =
            std::sync::atomic::AtomicBool::new(false);
        if flash_decode_fits(q.device(), q.kind(), d)
            && !FLASH_FAILED.load(std::sync::atomic::Ordering::Relaxed)
        {
            match self.attend_flash(q, scale) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    if !FLASH_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        eprintln!("warning: FlashAttention decode failed ({e}); decoding with batched GEMMs");
                    }
                }
            }
        }
        let c = self.len.div_ceil(l as usize) as i64;
        let b = c * hkv;
        // (c Hkv, g, D): the query group of each kv head, once per chunk (a small copy).
        let qb = q
            .reshape([1, hkv, g, d])
            .expand([c, hkv, g, d], false)
            .reshape([b, g, d]);
        let kc = self.k.narrow(0, 0, c).view([b, l, d]);
        let vc = self.v.narrow(0, 0, c).view([b, l, d]);
        // Scores (c, Hkv, g, L) in the accumulation dtype, unscaled.
        let sc = bmm_acc(&qb, &kc.transpose(1, 2), ak)?.view([c, hkv, g, l]);
        let tail = self.len as i64 - (c - 1) * l;
        if tail < l {
            let _ = sc
                .select(0, c - 1)
                .narrow(-1, tail, l - tail)
                .f_fill_(f64::NEG_INFINITY)?;
        }
        let m = sc.amax([0i64, 3].as_slice(), true); // (1, Hkv, g, 1)
                                                     // In place: the scores are the largest temporary (4 bytes per key and q head).
        let mut p = sc;
        let _ = p.f_sub_(&m)?.f_mul_scalar_(scale)?.f_exp_()?;
        let lsum = p.sum_dim_intlist([0i64, 3].as_slice(), true, ak); // (1, Hkv, g, 1)
        let pv = bmm_acc(&p.to_kind(q.kind()).view([b, g, l]), &vc, ak)?; // (b, g, D)
        let out = pv
            .view([c, hkv, g, d])
            .sum_dim_intlist([0i64].as_slice(), true, ak)
            .f_div(&lsum)?
            .reshape([1, hq, 1, d]);
        let lse = (m * scale + lsum.log()).reshape([1, hq, 1]);
        Ok((out, lse))
    }
}

/// Whether decode attention takes the FlashAttention path ([`KvCache::attend`], and the
/// fixed-shape step of [`super::graph`]): CUDA, a 16-bit dtype and a head dim FlashAttention
/// runs (a multiple of 8, at most 256).
pub fn flash_decode_fits(device: Device, kind: Kind, head_dim: i64) -> bool {
    matches!(device, Device::Cuda(_))
        && matches!(kind, Kind::BFloat16 | Kind::Half)
        && head_dim % 8 == 0
        && head_dim <= 256
}

impl KvCache {
    /// [`KvCache::attend`] on CUDA: one FlashAttention call over the full chunks, the chunks
    /// as the batch ((c, Hkv, L, D) is already that layout; the query is repeated per chunk,
    /// a few KB), one over the held part of the last chunk, then one log-sum-exp merge over
    /// the chunks' partial results (c x Hq rows of D). FlashAttention keeps the scores on
    /// chip, so the fp32 score passes of the GEMM path (about 40 bytes per key and q head,
    /// see the module header) go away; the kv heads are not repeated
    /// ([`crate::kernel::attention_fwd_gqa_flash`]).
    fn attend_flash(&self, q: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        let s = self.k.size();
        let (hkv, l, d) = (s[1], s[2], s[3]);
        let hq = q.size()[1];
        let (full, tail) = (
            (self.len / l as usize) as i64,
            (self.len % l as usize) as i64,
        );
        let (mut outs, mut lses) = (Vec::with_capacity(2), Vec::with_capacity(2));
        if full > 0 {
            let qb = q.expand([full, hq, 1, d], false).contiguous();
            let kv = |t: &Tensor| t.narrow(0, 0, full);
            let (o, lse) = attention_fwd_gqa_flash(&qb, &kv(&self.k), &kv(&self.v), scale)?;
            outs.push(o);
            lses.push(lse);
        }
        if tail > 0 {
            let kv = |t: &Tensor| t.narrow(0, full, 1).narrow(2, 0, tail);
            let (o, lse) = attention_fwd_gqa_flash(q, &kv(&self.k), &kv(&self.v), scale)?;
            outs.push(o);
            lses.push(lse);
        }
        let cat = |ts: &[Tensor]| {
            if ts.len() == 1 {
                ts[0].shallow_clone()
            } else {
                Tensor::cat(ts, 0)
            }
        };
        // (n, Hq, 1, D) and (n, Hq, 1); every chunk holds keys: no -inf rows.
        let (o, lse) = (cat(&outs), cat(&lses));
        let (out, m, sum) = merge_chunks(&o, &lse, acc_kind(q.kind()))?;
        debug_assert_eq!(hq % hkv, 0);
        Ok((out, m + sum.log()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::merge::partial_attention;
    use crate::kernel::Backend;

    /// Appends in pieces that straddle chunk edges, then attends; equals attention over the
    /// same K/V held contiguously (the path with repeated kv heads), in f64 and f32.
    #[test]
    fn cache_attention_equals_contiguous_attention() {
        for (kind, tol) in [(Kind::Double, 1e-12), (Kind::Float, 1e-5)] {
            let opt = (kind, Device::Cpu);
            let (hq, hkv, d) = (8, 2, 16);
            let (k, v, q) = crate::rng::seeded(3, || {
                (
                    Tensor::randn([1, hkv, 61, d], opt),
                    Tensor::randn([1, hkv, 61, d], opt),
                    Tensor::randn([1, hq, 1, d], opt),
                )
            });
            let scale = 1.0 / (d as f64).sqrt();
            for chunk in [1usize, 4, 7, 16, 64, 256] {
                // Capacity smaller than the data: the cache must grow.
                let mut c =
                    KvCache::new(hkv as usize, d as usize, 20, chunk, kind, Device::Cpu).unwrap();
                let mut at = 0i64;
                for piece in [13i64, 1, 1, 30, 16] {
                    c.append(&k.narrow(2, at, piece), &v.narrow(2, at, piece))
                        .unwrap();
                    at += piece;
                    let (ck, cv) = c.to_contiguous();
                    assert_eq!(
                        (&ck - &k.narrow(2, 0, at)).abs().max().double_value(&[]),
                        0.0
                    );
                    assert_eq!(
                        (&cv - &v.narrow(2, 0, at)).abs().max().double_value(&[]),
                        0.0
                    );
                    let (o, l) = c.attend(&q, scale).unwrap();
                    let (ro, rl) = partial_attention(
                        Backend::CpuMath,
                        &q,
                        &k.narrow(2, 0, at),
                        &v.narrow(2, 0, at),
                        scale,
                    )
                    .unwrap();
                    let eo = (&o - &ro).abs().max().double_value(&[]);
                    let el = (&l - &rl).abs().max().double_value(&[]);
                    assert!(
                        eo < tol && el < tol,
                        "{kind:?} chunk {chunk} at {at}: {eo} {el}"
                    );
                }
                assert_eq!(c.len(), 61);
                assert!(c.capacity() >= 61);
                assert_eq!(
                    c.bytes_used(),
                    2 * 61 * (hkv * d) as usize * kind.elt_size_in_bytes()
                );
            }
        }
    }

    #[test]
    fn empty_cache_and_bad_shapes() {
        let c = KvCache::new(2, 8, 10, 4, Kind::Double, Device::Cpu).unwrap();
        let q = Tensor::ones([1, 4, 1, 8], (Kind::Double, Device::Cpu));
        let (o, l) = c.attend(&q, 1.0).unwrap();
        assert_eq!(o.abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert!(l.double_value(&[0, 0, 0]).is_infinite());
        assert!(c
            .attend(
                &Tensor::ones([1, 3, 1, 8], (Kind::Double, Device::Cpu)),
                1.0
            )
            .is_err());
        let mut c = c;
        let bad = Tensor::ones([1, 3, 2, 8], (Kind::Double, Device::Cpu));
        assert!(c.append(&bad, &bad).is_err());
        assert!(KvCache::new(2, 8, 10, 0, Kind::Double, Device::Cpu).is_err());
    }

    /// A step undone (pipelined decode past the end of the sequence): the token is forgotten,
    /// attention is over the tokens before it again, and the next token takes its slot.
    #[test]
    fn retreat_forgets_the_last_tokens() {
        let opt = (Kind::Double, Device::Cpu);
        let mut c = KvCache::new(2, 8, 10, 4, Kind::Double, Device::Cpu).unwrap();
        let kv = |x: f64| Tensor::full([1, 2, 1, 8], x, opt);
        c.append(&kv(1.0), &kv(1.0)).unwrap();
        let q = Tensor::ones([1, 4, 1, 8], opt);
        let (before, _) = c.attend(&q, 1.0).unwrap();
        c.append(&kv(5.0), &kv(5.0)).unwrap();
        c.retreat(1).unwrap();
        assert_eq!(c.len(), 1);
        let (after, _) = c.attend(&q, 1.0).unwrap();
        assert_eq!(f64::try_from((before - after).abs().max()).unwrap(), 0.0);
        assert!(c.retreat(2).is_err());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn chunk_length_policy() {
        // 1M tokens, 2 kv heads: 4096-key chunks, 256 x 2 = 512 batches.
        assert_eq!(chunk_len(1 << 20, 2), 4096);
        // Short caches: the minimum chunk.
        assert_eq!(chunk_len(40, 2), MIN_CHUNK);
        assert_eq!(chunk_len(0, 8), MIN_CHUNK);
        assert_eq!(chunk_len((1 << 17) + 1, 8) % 64, 0);
    }
}
