//! The kernels of one decode step on one rank, as `mmsp-runtime infer` launches them, with
//! the bytes each reads plus writes in HBM: the eager chain ([`decode_kernels`], several SP
//! ranks: every kernel launched by the host) and the fixed-shape chain replayed from one CUDA
//! graph ([`decode_graph_kernels`], one rank: runtime/src/infer/graph.rs). Counted by reading
//! the runtime's code; ATen composites (`logsumexp`, `isfinite`) as ATen implements them.
//! Weights are held in the compute dtype (`infer` builds the decoder with master = compute =
//! bf16, so the per-call `to_kind` casts of `Decoder::p` are no-ops), RMSNorm is ATen's fused
//! `rms_norm` (one kernel on CUDA), views (reshape of contiguous tensors, narrow, transpose,
//! squeeze) launch nothing. Bytes: weights and activations 2 per element, log-sum-exps and
//! merged outputs fp32; FlashAttention reads only the keys held. Small kernels' bytes are
//! upper estimates; they sit at the floor anyway.
pub use crate::calibration::KernelKind;
use crate::spec::model::ModelSpec;

/// Batches (chunks x kv heads) the runtime's KV-cache chunk length aims at, and its shortest
/// chunk: `TARGET_BATCHES` and `MIN_CHUNK` of runtime/src/infer/cache.rs.
const CACHE_TARGET_BATCHES: u64 = 512;
const CACHE_MIN_CHUNK: u64 = 256;

/// bf16 and fp32 bytes per element.
const B: f64 = 2.0;
const F: f64 = 4.0;

/// The key chunk length `mmsp-runtime infer` gives a cache of `capacity` tokens over
/// `kv_heads` heads (`chunk_len` of runtime/src/infer/cache.rs): about 512 chunk-head
/// batches, a multiple of 64, at least 256 keys.
pub fn cache_chunk_len(capacity: u64, kv_heads: u64) -> u64 {
    let per = (capacity * kv_heads).div_ceil(CACHE_TARGET_BATCHES);
    (per.div_ceil(64).max(1) * 64).max(CACHE_MIN_CHUNK)
}

/// One kind of kernel of a decode step: how many are launched per token, the bytes each
/// reads plus writes in HBM, and what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeKernel {
    pub name: &'static str,
    pub count: u64,
    pub bytes: f64,
    pub kind: KernelKind,
}

fn k(name: &'static str, count: u64, bytes: f64) -> DecodeKernel {
    DecodeKernel {
        name,
        count,
        bytes,
        kind: KernelKind::Op,
    }
}

/// A one-token projection.
fn p(name: &'static str, count: u64, bytes: f64) -> DecodeKernel {
    DecodeKernel {
        kind: KernelKind::Projection,
        ..k(name, count, bytes)
    }
}

/// A decode attention call.
fn a(name: &'static str, count: u64, bytes: f64) -> DecodeKernel {
    DecodeKernel {
        kind: KernelKind::Attention,
        ..k(name, count, bytes)
    }
}

/// A model's sizes as the chain uses them.
struct Dims {
    h: f64,
    f: f64,
    v: f64,
    hq: f64,
    d: f64,
    qd: f64,
    kvd: f64,
    bias: f64,
    layers: u64,
}

impl Dims {
    fn of(m: &ModelSpec) -> Dims {
        let (hq, hkv, d) = (m.num_heads as f64, m.num_kv_heads as f64, m.head_dim as f64);
        Dims {
            h: m.hidden_size as f64,
            f: m.intermediate_size as f64,
            v: m.vocab_size as f64,
            hq,
            d,
            qd: hq * d,
            kvd: hkv * d,
            bias: if m.qkv_bias { 1.0 } else { 0.0 },
            layers: m.num_layers,
        }
    }

    /// A one-token projection: its weight (and bias), input and output.
    fn proj(&self, n_in: f64, n_out: f64, b: f64) -> f64 {
        B * (n_in * n_out + b * n_out + n_in + n_out)
    }

    /// A FlashAttention call over `keys` keys (K and V read once) for `batch` query rows of
    /// every q head (the output written, the fp32 lse written).
    fn flash(&self, keys: f64, batch: f64) -> f64 {
        B * (2.0 * keys * self.kvd + 2.0 * batch * self.qd) + F * batch * self.hq
    }

    /// Every layer's kernels outside attention, as both chains launch them:
    /// `Decoder::pre_attention_with`: RMSNorm (1), q, k, v projections (3), `Rope::apply` to q
    /// and to k: neg, cat, two multiplies, add (2 x 5); the merged output cast to bf16 (1);
    /// `Decoder::post_attention_with`: o projection (1; the transpose of a one-token output
    /// is already contiguous), residual add (1), RMSNorm (1), gate and up projections (2),
    /// silu (1), multiply (1), down projection (1), residual add (1). 24 per layer.
    fn layer_body(&self) -> Vec<DecodeKernel> {
        let (h, f, qd, kvd, l) = (self.h, self.f, self.qd, self.kvd, self.layers);
        vec![
            k("rmsnorm", 2 * l, B * 3.0 * h),
            p("q projection", l, self.proj(h, qd, self.bias)),
            p("k and v projections", 2 * l, self.proj(h, kvd, self.bias)),
            k("rope on q", 5 * l, B * 3.0 * qd),
            k("rope on k", 5 * l, B * 3.0 * kvd),
            k("attention to bf16", l, (F + B) * qd),
            p("o projection", l, self.proj(qd, h, 0.0)),
            k("residual add", 2 * l, B * 3.0 * h),
            p("gate and up projections", 2 * l, self.proj(h, f, 0.0)),
            k("silu", l, B * 2.0 * f),
            k("silu x up", l, B * 3.0 * f),
            p("down projection", l, self.proj(f, h, 0.0)),
        ]
    }

    /// `Decoder::head`: the final RMSNorm and the LM head GEMM.
    fn head(&self) -> [DecodeKernel; 2] {
        [
            k("final rmsnorm", 1, B * 3.0 * self.h),
            p("lm head", 1, self.proj(self.h, self.v, 0.0)),
        ]
    }

    /// The logits cast to f64 (`RankInference::decode` leaves them on the device).
    fn logits_f64(&self) -> DecodeKernel {
        k("logits to f64", 1, self.v * (B + 8.0))
    }

    /// The greedy choice: the argmax over the f64 logits, on the device.
    fn greedy_argmax(&self) -> DecodeKernel {
        k("greedy argmax", 1, self.v * 8.0 + 8.0)
    }

    /// `Sampler::pick`, greedy: the argmax, and the token id read by the host (the token's
    /// one synchronisation).
    fn greedy_pick(&self) -> [DecodeKernel; 2] {
        [self.greedy_argmax(), k("token to host", 1, 8.0)]
    }
}

/// The eager chain, `RankInference::decode_step_probed` (runtime/src/infer/mod.rs), over a
/// cache of `kv_tokens` on this rank in an SP group of `sp` ranks. Per token:
/// - before the layers: the token id and the position's RoPE row (`Rope::at_position`, made
///   on the host) copied to the device (2); `Decoder::embed`: the embedding row gather (1);
/// - per layer, the body ([`Dims::layer_body`], 24) and
///   - `KvCache::append` of the one new token on its owner rank: K and V copied into the
///     chunk in place (2; on the critical path, since the merge waits for the owner);
///   - `KvCache::attend` on CUDA (`attend_flash`) over f full chunks of L keys and t keys
///     held in the last one: when f > 0 the query repeated per chunk (1 copy) and one
///     FlashAttention call over the f chunks (1, reading their K/V once; the scores stay on
///     chip), when t > 0 one call over those t keys (1), when both the two partials
///     concatenated (out and lse: 2), then their log-sum-exp merge: max, subtract, exp, sum,
///     multiply, sum, divide, log, add (9): 10 to 14;
///   - `merge::merge_over` when sp > 1: pack out and lse (cat, 1), the all-gather (costed
///     with the collectives, not here), `merge_partials`: `logsumexp` (amax, abs, eq,
///     masked_fill, sub, exp, sum, log, add: 9), `isfinite` (eq, abs, ne, mul: 4), where (1),
///     subtract (1), exp (1), multiply (1), sum (1): 19;
/// - after the layers, the head (2) and the logits cast to f64 (1); then the greedy pick
///   of the next token (`Sampler::pick`: argmax, token to host: 2) and, when sp > 1, its
///   broadcast (`broadcast_i64`: the id to the device and back, 2; the all-reduce itself is
///   costed with the collectives).
///
/// That is 8 + 36 to 40 per layer (+ 2 + 19 per layer when sp > 1) kernels.
pub fn decode_kernels(m: &ModelSpec, kv_tokens: u64, sp: u32) -> Vec<DecodeKernel> {
    let dm = Dims::of(m);
    let (qd, kvd, hq, l) = (dm.qd, dm.kvd, dm.hq, dm.layers);
    let chunk = cache_chunk_len(kv_tokens, m.num_kv_heads);
    let (full, held) = (kv_tokens / chunk, kv_tokens % chunk);
    let parts = u64::from(full > 0) + u64::from(held > 0);
    // The partial results merged: one per full chunk and one for the last chunk's keys.
    let n = (full + u64::from(held > 0)) as f64;
    let mut out = vec![
        k("token id and rope row to device", 2, 8.0 + 2.0 * B * dm.d),
        k("embedding row", 1, 2.0 * B * dm.h),
    ];
    out.extend(dm.layer_body());
    out.extend([
        k("cache append", 2 * l, B * 2.0 * kvd),
        k(
            "query per chunk",
            u64::from(full > 0) * l,
            B * (qd + full as f64 * qd),
        ),
        a(
            "flash attention over the full chunks",
            u64::from(full > 0) * l,
            dm.flash((full * chunk) as f64, full as f64),
        ),
        a(
            "flash attention over the last chunk's keys",
            u64::from(held > 0) * l,
            dm.flash(held as f64, 1.0),
        ),
        k(
            "partials concatenated",
            2 * u64::from(parts == 2) * l,
            2.0 * n * (B * qd + F * hq),
        ),
        k("merge max, subtract, exp, sum", 4 * l, 2.0 * n * F * hq),
        k("merge weighted outputs", l, n * qd * (B + F) + F * hq * n),
        k("merge sum over chunks", l, F * (n * qd + qd)),
        k("normalise", l, F * (2.0 * qd + hq)),
        k("log-sum-exp", 2 * l, F * 3.0 * hq),
    ]);
    if sp > 1 {
        let gathered = f64::from(sp) * (qd + hq) * F;
        out.push(k("merge pack", l, 2.0 * (qd + hq) * F));
        out.push(k("merge of the gathered partials", 18 * l, 2.0 * gathered));
        out.push(k("token broadcast in and out", 2, 8.0));
    }
    out.extend(dm.head());
    out.push(dm.logits_f64());
    out.extend(dm.greedy_pick());
    out
}

/// The decode step of one rank replayed from a CUDA graph: what the host queues on the
/// stream per token (ahead of the device: greedy generation is pipelined), and what the graph
/// replays.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphChain {
    pub stream: Vec<DecodeKernel>,
    pub graph: Vec<DecodeKernel>,
}

/// The fixed-shape chain of `DecodeGraph::step` (runtime/src/infer/graph.rs) over a cache
/// of `kv_tokens` on the one rank, whose capacity is that many tokens, as greedy generation
/// runs it pipelined (runtime/src/infer/pipelined.rs). Per token:
/// - queued by the host on the stream, ahead of the device: the step's inputs (position, the
///   new token's slot rows, the keys used per (chunk, kv head): one int64 buffer) from pinned
///   memory to the device and into the graph's buffer (2), the token the step before chose
///   copied in (1), the replay (1), the chosen token copied to the host (1): 5;
/// - replayed: the keys used cast to int32 (1), the RoPE row made from the position
///   (`Rope::from_inv`: cast, outer product, cat, cos, sin, scale and cast of each: 9), the
///   embedding row (1); per layer the body ([`Dims::layer_body`], 24), K and V
///   written at their slot rows by `index_copy_` (2), the query repeated per chunk (1), one
///   varlen FlashAttention call over every (chunk, kv head) (1), then the merge over the
///   chunks: `isfinite` (eq, abs, ne, mul: 4), where (1), max, subtract, exp, sum (4),
///   multiply, sum, divide (3): 40 per layer; the head (2), the logits cast to f64 (1), the
///   greedy argmax (1) and the layers' outputs stacked (1): 16 + 40 per layer. Kernels
///   FlashAttention may launch besides its own (layout copies of a swapped query) are not
///   counted, nor the copy of the attention outputs that only a probing caller (`needle`)
///   asks for.
pub fn decode_graph_kernels(m: &ModelSpec, kv_tokens: u64) -> GraphChain {
    let dm = Dims::of(m);
    let (qd, kvd, hq, l) = (dm.qd, dm.kvd, dm.hq, dm.layers);
    let hkv = m.num_kv_heads as f64;
    let chunk = cache_chunk_len(kv_tokens, m.num_kv_heads);
    let chunks = kv_tokens.div_ceil(chunk).max(1) as f64;
    let outs = l as f64 * qd * F;
    // The int64 input buffer: token, position, slot rows, keys used.
    let inputs = 8.0 * (2.0 + hkv + chunks * hkv);
    let stream = vec![
        k("step inputs to the device", 1, inputs),
        k("into the graph's input buffer", 1, 2.0 * inputs),
        k("token chosen before copied in", 1, 16.0),
        k("graph replay", 1, 0.0),
        k("token to host", 1, 8.0),
    ];
    let mut graph = vec![
        k("keys used to int32", 1, 12.0 * chunks * hkv),
        k("rope row from the position", 9, 8.0 * 3.0 * dm.d),
        k("embedding row", 1, 2.0 * B * dm.h),
    ];
    graph.extend(dm.layer_body());
    graph.extend([
        k(
            "k and v written at their slots",
            2 * l,
            B * 2.0 * kvd + 8.0 * hkv,
        ),
        k("query per chunk", l, B * (qd + chunks * qd)),
        a(
            "flash attention over every chunk",
            l,
            dm.flash(kv_tokens as f64, chunks),
        ),
        k("merge isfinite and where", 5 * l, 2.0 * chunks * F * hq),
        k(
            "merge max, subtract, exp, sum",
            4 * l,
            2.0 * chunks * F * hq,
        ),
        k(
            "merge weighted outputs",
            l,
            chunks * qd * (B + F) + F * hq * chunks,
        ),
        k("merge sum over chunks", l, F * (chunks * qd + qd)),
        k("normalise", l, F * (2.0 * qd + hq)),
    ]);
    graph.extend(dm.head());
    graph.push(dm.logits_f64());
    graph.push(dm.greedy_argmax());
    graph.push(k("attention outputs stacked", 1, 2.0 * outs));
    GraphChain { stream, graph }
}
