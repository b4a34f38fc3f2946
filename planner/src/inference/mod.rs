//! Inference planning (`mmsp plan --mode inference`): one long sequence served by all GPUs as
//! one sequence-parallel group (ulysses x ring = GPUs, dp = 1). Prefill runs 2D attention over
//! the zigzag shards and every rank keeps the K/V of its own tokens; decoding attends over the
//! sharded cache (each rank a partial attention of the new query over its shard, merged by
//! log-sum-exp through an all-gather). The search tries every (ulysses, ring) factorisation,
//! both placements, and replicated or ZeRO-3-style sharded weights, drops what does not fit,
//! and ranks the rest by prefill time + `decode_tokens` x decode time per token.
//!
//! Cost terms are the forward halves of the training model's ([`crate::cost::terms`]): the same
//! FLOP counts ([`crate::cost::compute`]), kernel rates, elementwise roofline, Ulysses
//! all-to-all, ring p2p overlap and ZeRO-3 weight gathers routed over the same topology. No
//! gradients, optimizer states or backward. Decoding is costed as what `mmsp-runtime infer`
//! launches for one token ([`chain`]): on several ranks a chain of dependent kernels in one
//! stream ([`decode_kernels`]), each taking the longer of its bytes over the achieved HBM
//! bandwidth at its size (roofline, Williams et al. 2009) and the per-kernel floor
//! ([`kernel_floor_s`]: launch-bound small calls), plus the merge all-gather of every layer
//! and the broadcast of the sampled token; on one rank the step the runtime replays from a
//! CUDA graph ([`decode_graph_kernels`]), each replayed kernel the longer of its bytes over
//! the bandwidth and the calibration's graph-replayed kernel of its size and kind
//! ([`crate::cost::compute::graph_kernel_s`]), the few the host still launches at the floor.
//!
//! KV layout (what `mmsp-runtime infer` keeps): each rank holds the K/V of its zigzag tokens
//! for *all* kv heads, i.e. the layout of the attention inputs before the Ulysses all-to-all.
//! So `kv_heads_held` = kv heads and `tokens_per_rank` = context / sp. The head layout (after
//! the all-to-all) would hold max(kv, ulysses)/ulysses heads for context/ring tokens, which is
//! the same when kv >= ulysses and `ulysses/kv` times more when Ulysses replicates kv heads;
//! [`kv_cache_bytes`] takes either, and [`head_layout_kv_bytes`] gives the latter for
//! comparison. Tokens decoded after the prompt are appended round-robin: position p >= prompt
//! length goes to SP rank (p - prompt) mod sp, so shards stay within one token of each other.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cost::compute::{
    attention_flops_fwd, graph_kernel_s, hbm_rate, head_flops_fwd, layer_gemm_flops_fwd,
    layer_traffic_fwd, layout_rate,
};
/// The per-kernel floor and a kernel's time live with the other memory-bound costs
/// ([`crate::cost::compute`]), which training's ring merge prices with them too.
pub use crate::cost::compute::{kernel_floor_s, kernel_s, DEFAULT_KERNEL_FLOOR_S};
use crate::cost::memory::{
    layer_activation_bytes_per_token, model_states, ActivationArch, FRAGMENTATION,
    RUNTIME_RESERVE_BYTES, WEIGHT_BYTES,
};
use crate::cost::{
    split_heads_and_context, Candidate, Estimate, Infeasible, Layout, MemoryBreakdown, Placement,
    Recompute, TimeBreakdown,
};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::search::Scored;
use crate::spec::model::ModelSpec;
use crate::topology::Topology;
use crate::units::{fmt_gib, fmt_tokens};

/// Bytes per K/V element in the cache (bf16).
pub const KV_BYTES: f64 = 2.0;

mod chain;
pub use chain::{
    cache_chunk_len, decode_graph_kernels, decode_kernels, DecodeKernel, GraphChain, KernelKind,
};

pub use mmsp_plan::{InferenceEstimate, InferenceMemory, WeightSharding};

/// What to plan.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    pub gpus: u32,
    /// KV capacity in tokens: prompt + generated tokens. Prefill is predicted for a prompt of
    /// this length, decoding at a full cache (worst cases).
    pub context: u64,
    /// Tokens decoded per request, weighting decode against prefill in the ranking.
    pub decode_tokens: u64,
}

/// One point of the search space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InferenceCandidate {
    pub layout: Layout,
    pub weights: WeightSharding,
}

/// 2 (K and V) x layers x kv heads held x head dim x tokens per rank x 2 bytes (bf16).
pub fn kv_cache_bytes(layers: u64, kv_heads_held: u64, head_dim: u64, tokens_per_rank: u64) -> f64 {
    2.0 * layers as f64 * kv_heads_held as f64 * head_dim as f64 * tokens_per_rank as f64 * KV_BYTES
}

/// Weight bytes one decoded token reads from HBM (bf16): every layer's parameters, the final
/// norm and the LM head (vocab x hidden), plus one row of the input embedding (a lookup reads
/// only that row). With tied embeddings the head is the embedding table, read once as the head.
pub fn decode_weight_bytes(m: &ModelSpec) -> f64 {
    let head = m.vocab_size * m.hidden_size;
    let params = m.num_layers * m.layer_params() + m.hidden_size + head + m.hidden_size;
    WEIGHT_BYTES * params as f64
}

/// KV bytes per GPU if the cache were kept in the head layout (after the Ulysses all-to-all):
/// max(kv, ulysses)/ulysses heads (kv-head replication when ulysses > kv heads) for the ring
/// rank's context/ring tokens.
pub fn head_layout_kv_bytes(m: &ModelSpec, l: &Layout, context: u64) -> f64 {
    let u = u64::from(l.ulysses);
    let held = m.num_kv_heads.max(u) / u;
    kv_cache_bytes(m.num_layers, held, m.head_dim, context / u64::from(l.ring))
}

/// Per-rank sizes of one candidate that its memory, prefill and decode costs share.
struct RankShape {
    /// Query and kv heads per rank after the Ulysses all-to-all ([`crate::cost::head_split`]).
    q_heads_local: u64,
    kv_heads_local: u64,
    /// Ring and SP degrees.
    r: f64,
    sp: f64,
    /// Context tokens and the rank's share of them (S / SP).
    s: f64,
    tokens: f64,
    /// K/V tokens the rank's cache holds (context / SP).
    kv_tokens: u64,
    /// K/V width per token with Ulysses-replicated kv heads, and the query width.
    kv_dim_eff: f64,
    q_dim_local: f64,
    /// Elements of one ring K/V block (one of K or V): S/R tokens of the local kv heads.
    kv_block: f64,
}

impl RankShape {
    fn new(
        m: &ModelSpec,
        l: &Layout,
        context: u64,
        q_heads_local: u64,
        kv_heads_local: u64,
    ) -> Self {
        let (u, r, sp) = (f64::from(l.ulysses), f64::from(l.ring), f64::from(l.sp()));
        let s = context as f64;
        let hd = m.head_dim as f64;
        RankShape {
            q_heads_local,
            kv_heads_local,
            r,
            sp,
            s,
            tokens: s / sp,
            kv_tokens: context / u64::from(l.sp()),
            kv_dim_eff: kv_heads_local as f64 * u * hd,
            q_dim_local: q_heads_local as f64 * u * hd,
            kv_block: (s / r) * kv_heads_local as f64 * hd,
        }
    }
}

/// Predicts one candidate, or says why it cannot run.
pub fn evaluate(
    topo: &Topology,
    m: &ModelSpec,
    req: &InferenceRequest,
    c: &InferenceCandidate,
) -> std::result::Result<InferenceEstimate, Infeasible> {
    let l = &c.layout;
    let (q_heads_local, kv_heads_local) = split_heads_and_context(m, l, req.context)?;
    let shape = RankShape::new(m, l, req.context, q_heads_local, kv_heads_local);
    let memory = inference_memory(m, c, &shape);
    if memory.total_bytes > topo.spec.hbm_bytes {
        return Err(Infeasible::Memory {
            needed: memory.total_bytes,
            available: topo.spec.hbm_bytes,
        });
    }
    let p = prefill_cost(topo, m, c, &shape);
    let d = decode_cost(topo, m, c, &shape, p.prefill.zero_gather_s);
    let decode_s = d.kernels_s + d.comm_s + d.weight_gather_s;
    Ok(InferenceEstimate {
        weights: c.weights,
        kv_heads_held: m.num_kv_heads,
        kv_tokens_per_rank: shape.kv_tokens,
        kv_append_rule:
            "round_robin: position p >= prompt length goes to sp rank (p - prompt) mod sp".into(),
        prefill_s: p.prefill_s,
        prefill_tokens_per_s: shape.s / p.prefill_s,
        decode_s_per_token: decode_s,
        decode_tokens: req.decode_tokens,
        request_s: p.prefill_s + req.decode_tokens as f64 * decode_s,
        memory,
        prefill: p.prefill,
        decode_kernels_s: d.kernels_s,
        decode_kernels_per_token: d.kernels_per_token,
        decode_kernel_floor_s: d.kernel_floor_s,
        decode_cuda_graph: d.cuda_graph,
        decode_bytes_per_token: d.bytes_per_token,
        decode_hbm_s: d.hbm_s,
        decode_floor_s: d.floor_s,
        decode_comm_s: d.comm_s,
        decode_weight_gather_s: d.weight_gather_s,
        prefill_flops: p.flops,
    })
}

/// Memory per GPU of one candidate: weights, its K/V shard, one layer's prefill activations,
/// the last position's logits and the ring / Ulysses buffers, with fragmentation and the
/// runtime's reserve.
fn inference_memory(m: &ModelSpec, c: &InferenceCandidate, shape: &RankShape) -> InferenceMemory {
    let l = &c.layout;
    let (s, r, tokens) = (shape.s, shape.r, shape.tokens);
    let (h, hd) = (m.hidden_size as f64, m.head_dim as f64);
    let kv = kv_cache_bytes(m.num_layers, m.num_kv_heads, m.head_dim, shape.kv_tokens);
    let shards = f64::from(l.sp());
    let params = m.params() as f64;
    let weights = match c.weights {
        WeightSharding::Replicated => WEIGHT_BYTES * params,
        // The weight part of ZeRO-3 model states: a 1/sp shard plus two gathered layers.
        WeightSharding::Sharded => model_states(params, m.layer_params() as f64, 3, shards).0,
    };
    // One layer's forward tensors at a time: everything a training layer would keep
    // (Korthikanti et al. 2022 accounting, with Ulysses-replicated kv width), freed after the
    // layer, plus the residual stream in and out (2 x 2h bytes per token).
    let arch = ActivationArch {
        hidden: h,
        q_dim: m.q_dim() as f64,
        kv_dim: shape.kv_dim_eff,
        ffn: m.intermediate_size as f64,
        heads: m.num_heads as f64,
        swiglu: true,
        dropout: false,
        flash: true,
    };
    let activations =
        (layer_activation_bytes_per_token(&arch, s, 1.0, Recompute::None) + 4.0 * h) * tokens;
    // Logits of the last position only, fp32.
    let logits = m.vocab_size as f64 * 4.0;
    // Forward ring: the K/V block in flight double-buffered (send + receive, bf16) and fp32
    // accumulators for the output and log-sum-exp of the ring rank's queries; Ulysses staging of
    // one q-sized tensor (as in cost::terms, without the backward's dK/dV).
    let ring_buf = if l.ring > 1 {
        2.0 * 2.0 * shape.kv_block * 2.0
    } else {
        0.0
    };
    let acc = (s / r) * shape.q_heads_local as f64 * (hd + 1.0) * 4.0;
    let a2a_buf = if l.ulysses > 1 {
        tokens * shape.q_dim_local * 2.0
    } else {
        0.0
    };
    let comm_buffers = ring_buf + acc + a2a_buf;
    let tensors = weights + kv + activations + logits + comm_buffers;
    let frag = FRAGMENTATION * tensors;
    InferenceMemory {
        weights_bytes: weights,
        kv_cache_bytes: kv,
        activations_bytes: activations,
        logits_bytes: logits,
        comm_buffers_bytes: comm_buffers,
        reserved_bytes: RUNTIME_RESERVE_BYTES,
        fragmentation_bytes: frag,
        total_bytes: tensors + frag + RUNTIME_RESERVE_BYTES,
    }
}

/// Prefill of the whole context: its time, the breakdown and the FLOPs the ranks run.
struct PrefillCost {
    prefill_s: f64,
    prefill: TimeBreakdown,
    flops: f64,
}

/// Prefill: the forward terms of cost::terms, per layer, over the rank's tokens.
fn prefill_cost(
    topo: &Topology,
    m: &ModelSpec,
    c: &InferenceCandidate,
    shape: &RankShape,
) -> PrefillCost {
    let (l, spec) = (&c.layout, &topo.spec);
    let (s, r, sp, tokens) = (shape.s, shape.r, shape.sp, shape.tokens);
    let (q_heads_local, q_dim_local) = (shape.q_heads_local, shape.q_dim_local);
    let layers = m.num_layers as f64;
    let h = m.hidden_size as f64;
    let gemm_flops = layer_gemm_flops_fwd(m, tokens, 1.0);
    let gemm_s = gemm_flops / spec.gemm_rate(tokens);
    let attn_flops = attention_flops_fwd(m, s) / sp;
    // Ring step 0 is causal over S/R tokens, every other zigzag step a full block (tokens ~
    // (S/R)/sqrt 2), each at its kernel's measured rate (as cost::terms does).
    let step_flops = attn_flops / r;
    let heads_call = q_heads_local as f64;
    let attn_s = step_flops / spec.attention_rate(heads_call, s / r, true)
        + (r - 1.0) * step_flops / spec.attention_rate(heads_call, s / r / 2f64.sqrt(), false);
    // Memory-bound work as the training model costs it (cost::terms): the forward's streaming
    // kernels at the bandwidth of a residual add over the rank's tokens and its layout copies at
    // the layout curve, plus what only inference
    // does: K and V copied into the cache (read and write, `KvCache::append`). The embedding
    // row gathers (read and write h per token) come once, before the layers.
    let act_call = tokens * 3.0 * h * 2.0;
    let cache_write = 2.0 * 2.0 * m.kv_dim() as f64 * KV_BYTES;
    let fwd = layer_traffic_fwd(m, 1.0, q_heads_local > shape.kv_heads_local);
    let elem_s = tokens * (fwd.stream + cache_write) / hbm_rate(spec, act_call)
        + tokens * fwd.layout / layout_rate(spec, tokens * q_dim_local * 4.0);
    let embed_s = tokens * 2.0 * h * 2.0 / hbm_rate(spec, tokens * 2.0 * h * 2.0);
    // Head (final norm + logits) on the last token only.
    let head_flops = head_flops_fwd(m, 1.0, 1.0);
    let head_s = head_flops / spec.gemm_rate(1.0);
    // Ulysses all-to-all of q, k, v before attention and the output after (Jacobs et al. 2023).
    let uly = l.ulysses_family();
    let a2a_s = topo.all_to_all(uly, tokens * 2.0 * (q_dim_local + 2.0 * shape.kv_dim_eff))
        + topo.all_to_all(uly, tokens * 2.0 * q_dim_local);
    // The ring forward's own work around its kernels (kv repeats, LSE merges), as training
    // counts it (`cost::ring`), on the compute stream.
    let merge_s = crate::cost::ring::ring_merge(
        spec,
        &crate::cost::ring::RingShape {
            ring: l.ring,
            batch: 1.0,
            chunk: s / (2.0 * r),
            q_heads: q_heads_local as f64,
            kv_heads: shape.kv_heads_local as f64,
            head_dim: m.head_dim as f64,
        },
    )
    .fwd
    .s;
    // Ring: R-1 K/V transfers per layer, each overlapped with one step's attention (Liu et al.
    // 2023, Sec. 3) and its share of the merge work.
    let (mut ring_s, mut ring_exposed) = (0.0, 0.0);
    if l.ring > 1 {
        let c_fwd = topo.ring_p2p(l.ring_family(), 2.0 * shape.kv_block * 2.0);
        ring_s = (r - 1.0) * c_fwd;
        ring_exposed = (r - 1.0) * (c_fwd - (attn_s + merge_s) / r).max(0.0);
    }
    let layer_compute = gemm_s + attn_s + merge_s;
    let param_bytes = WEIGHT_BYTES * m.params() as f64;
    // ZeRO-3: every layer's weights gathered once in prefill, prefetched a layer ahead (exposed:
    // the first layer, or what compute cannot hide), as in cost::compose.
    let (gather, gather_exposed) = match c.weights {
        WeightSharding::Replicated => (0.0, 0.0),
        WeightSharding::Sharded => {
            let g = topo.all_gather(l.grad_family(), param_bytes);
            let last = 1.0 / layers;
            (g, (g - layers * layer_compute * (1.0 - last)).max(g * last))
        }
    };
    let prefill_s = layers * (gemm_s + attn_s + merge_s + elem_s + a2a_s + ring_exposed)
        + embed_s
        + head_s
        + gather_exposed;
    let prefill = TimeBreakdown {
        gemm_s: layers * gemm_s,
        attention_s: layers * attn_s,
        ring_merge_s: layers * merge_s,
        elementwise_s: layers * elem_s + embed_s,
        head_s,
        ulysses_all_to_all_s: layers * a2a_s,
        ring_p2p_s: layers * ring_s,
        ring_exposed_s: layers * ring_exposed,
        zero_gather_s: gather,
        zero_gather_exposed_s: gather_exposed,
        ..TimeBreakdown::default()
    };
    PrefillCost {
        prefill_s,
        prefill,
        flops: layers * (gemm_flops + attn_flops) * sp + head_flops,
    }
}

/// One decoded token on one rank: the parts of [`InferenceEstimate`]'s `decode_*` fields.
struct DecodeCost {
    kernels_s: f64,
    kernels_per_token: u64,
    kernel_floor_s: f64,
    cuda_graph: bool,
    bytes_per_token: f64,
    hbm_s: f64,
    floor_s: f64,
    comm_s: f64,
    weight_gather_s: f64,
}

/// Decode, per token: the rank's kernel chain, the merge all-gathers and the token broadcast;
/// `weight_gather_s` is the ZeRO-3 weight gather of prefill (0 with replicated weights), run
/// again for every token.
fn decode_cost(
    topo: &Topology,
    m: &ModelSpec,
    c: &InferenceCandidate,
    shape: &RankShape,
    weight_gather_s: f64,
) -> DecodeCost {
    let (l, spec) = (&c.layout, &topo.spec);
    // The rank's kernel chain (decode_kernels): dependent kernels in one stream, so their
    // times add. Each is memory bound (roofline, Williams et al. 2009: bytes over the achieved
    // HBM bandwidth at its call size) or, when small, launch bound at the per-kernel floor.
    // Every rank reads its KV shard once (and the fp32 scores a few times) and every weight
    // it multiplies once (gathered ones too): the layers, the final norm and the LM head, of
    // the input embedding only the one row it looks up. Ranks on other GPUs run their chains
    // at the same time; only one plan rank per GPU is modelled.
    let floor = kernel_floor_s(spec);
    // One rank replays its step from a CUDA graph (runtime/src/infer/graph.rs, `graph::fits`:
    // FlashAttention's head dims, a multiple of 8 up to 256): what the graph launches costs a
    // dependent kernel's own time, what the host launches the floor.
    let graph = l.sp() == 1 && m.head_dim.is_multiple_of(8) && m.head_dim <= 256;
    let (mut hbm_s, mut floor_s, mut n_kernels, mut bytes) = (0.0, 0.0, 0u64, 0.0);
    let mut add = |k: &DecodeKernel, t: f64| {
        let n = k.count as f64;
        let roof = k.bytes / hbm_rate(spec, k.bytes);
        hbm_s += n * roof;
        floor_s += n * (t - roof);
        n_kernels += k.count;
        bytes += n * k.bytes;
    };
    let kernel_floor = if graph {
        let chain = decode_graph_kernels(m, shape.kv_tokens);
        // Pipelined greedy generation: the host queues each step's copies and replay ahead of
        // the device (each at the floor of back-to-back launched kernels), and its own part
        // of a step (the calibration's measured `host_token_s`) overlaps the device's: a
        // token takes the longer of the two.
        for k in &chain.stream {
            add(k, kernel_s(spec, k.bytes, floor));
        }
        for k in &chain.graph {
            add(k, graph_kernel_s(spec, k.bytes, k.kind, floor));
        }
        let host = spec
            .calibration
            .as_ref()
            .and_then(|c| c.graph_times())
            .and_then(|g| g.host_token_s())
            .unwrap_or(0.0);
        floor_s += (host - hbm_s - floor_s).max(0.0);
        graph_kernel_s(spec, 1.0, KernelKind::Op, floor)
    } else {
        for k in &decode_kernels(m, shape.kv_tokens, l.sp()) {
            add(k, kernel_s(spec, k.bytes, floor));
        }
        floor
    };
    // Per layer: all-gather over the SP group of every rank's partial output and its
    // log-sum-exp, both fp32 as `mmsp-runtime infer` packs them (q heads x (head dim + 1) x 4
    // bytes per rank); per token: the sampled token id broadcast as an all-reduce of one int64.
    // NCCL ring costs, (n - 1) latency hops plus (n - 1)/n of the bytes (topology::all_gather,
    // all_reduce = 2 x all_gather; nccl-tests doc/PERFORMANCE.md).
    let sp_family = l.grad_family();
    let partial = m.num_heads as f64 * (m.head_dim as f64 + 1.0) * 4.0;
    let comm_s = m.num_layers as f64 * topo.all_gather(sp_family, shape.sp * partial)
        + topo.all_reduce(sp_family, 8.0);
    DecodeCost {
        kernels_s: hbm_s + floor_s,
        kernels_per_token: n_kernels,
        kernel_floor_s: kernel_floor,
        cuda_graph: graph,
        bytes_per_token: bytes,
        hbm_s,
        floor_s,
        comm_s,
        weight_gather_s,
    }
}

/// Every candidate: sp = GPUs, each (ulysses, ring) factorisation, both placements when both
/// degrees exceed 1, replicated or sharded weights.
pub fn enumerate(req: &InferenceRequest) -> Vec<InferenceCandidate> {
    let mut out = Vec::new();
    for u in (1..=req.gpus).filter(|d| req.gpus.is_multiple_of(*d)) {
        let ring = req.gpus / u;
        let placements: &[Placement] = if u > 1 && ring > 1 {
            &[Placement::UlyssesInner, Placement::RingInner]
        } else {
            &[Placement::UlyssesInner]
        };
        for &placement in placements {
            for weights in [WeightSharding::Replicated, WeightSharding::Sharded] {
                out.push(InferenceCandidate {
                    layout: Layout {
                        ulysses: u,
                        ring,
                        dp: 1,
                        tp: 1,
                        placement,
                    },
                    weights,
                });
            }
        }
    }
    out
}

/// Outcome of an inference search.
#[derive(Debug)]
pub struct InferenceSearch {
    /// Feasible candidates, fastest request first.
    pub ranked: Vec<(InferenceCandidate, InferenceEstimate)>,
    pub infeasible: Vec<(InferenceCandidate, Infeasible)>,
}

/// Evaluates every candidate and ranks the feasible ones by request time.
pub fn search(topo: &Topology, m: &ModelSpec, req: &InferenceRequest) -> InferenceSearch {
    let (mut ranked, mut infeasible) = (Vec::new(), Vec::new());
    for c in enumerate(req) {
        match evaluate(topo, m, req, &c) {
            Ok(e) => ranked.push((c, e)),
            Err(e) => infeasible.push((c, e)),
        }
    }
    ranked.sort_by(|a, b| a.1.request_s.total_cmp(&b.1.request_s));
    InferenceSearch { ranked, infeasible }
}

/// The error when nothing fits, naming the closest miss.
pub fn no_plan_error(m: &ModelSpec, req: &InferenceRequest, s: &InferenceSearch) -> Error {
    let miss = Infeasible::closest_memory_miss(s.infeasible.iter().map(|(_, e)| e));
    let why = match miss {
        Some((n, a)) => format!(
            "the smallest needs {} per GPU, {} available",
            fmt_gib(n),
            fmt_gib(a)
        ),
        None => s
            .infeasible
            .first()
            .map_or("no candidates".into(), |(_, e)| e.to_string()),
    };
    Error::NoFeasiblePlan(format!(
        "no inference layout of {} at {} tokens fits on {} GPUs: {why}",
        m.name,
        fmt_tokens(req.context),
        req.gpus
    ))
}

/// The inference plan of a candidate: mesh, groups and zigzag shards come from
/// [`crate::plan::build`]; `mode` is inference, `predicted` holds the prefill figures (step =
/// prefill; memory total includes the KV cache, counted in `activations_bytes`) and
/// `inference` the whole estimate.
pub fn build_plan(
    topo: &Topology,
    topology_arg: &str,
    m: &ModelSpec,
    context: u64,
    c: &InferenceCandidate,
    e: &InferenceEstimate,
) -> Result<Plan> {
    let world = c.layout.world();
    let mem = &e.memory;
    // Prefill runs forward only and recomputes nothing: model and hardware FLOPs are one.
    let mfu = e.prefill_flops / (e.prefill_s * f64::from(world) * topo.spec.peak_flops);
    let estimate = Estimate {
        step_time_s: e.prefill_s,
        tokens_per_s: e.prefill_tokens_per_s,
        mfu,
        hfu: mfu,
        memory_per_gpu_bytes: mem.total_bytes,
        memory: MemoryBreakdown {
            weights_bytes: mem.weights_bytes,
            gradients_bytes: 0.0,
            optimizer_bytes: 0.0,
            activations_bytes: mem.activations_bytes + mem.kv_cache_bytes,
            logits_bytes: mem.logits_bytes,
            comm_buffers_bytes: mem.comm_buffers_bytes,
            reserved_bytes: mem.reserved_bytes,
            fragmentation_bytes: mem.fragmentation_bytes,
            total_bytes: mem.total_bytes,
        },
        time: e.prefill.clone(),
        comm_exposed_s: e.prefill.ulysses_all_to_all_s
            + e.prefill.ring_exposed_s
            + e.prefill.zero_gather_exposed_s,
        comm_overlapped_s: (e.prefill.ring_p2p_s - e.prefill.ring_exposed_s)
            + (e.prefill.zero_gather_s - e.prefill.zero_gather_exposed_s),
        grad_accum_steps: 1,
        model_flops: e.prefill_flops,
        hardware_flops: e.prefill_flops,
    };
    let scored = Scored {
        candidate: Candidate {
            layout: c.layout,
            zero_stage: match c.weights {
                WeightSharding::Replicated => 0,
                WeightSharding::Sharded => 3,
            },
            recompute: Recompute::None,
            micro_batch: 1,
        },
        estimate,
    };
    let mut plan = crate::plan::build(topo, topology_arg, m, context, 1, &scored)?;
    plan.mode = crate::plan::Mode::Inference;
    // No backward, so nothing is recomputed (sharded weights included).
    plan.recompute = Recompute::None;
    plan.recompute_scope = None;
    plan.inference = Some(e.clone());
    Ok(plan)
}

fn layout_name(l: &Layout) -> String {
    format!(
        "ulysses {} x ring {} ({})",
        l.ulysses,
        l.ring,
        l.placement.as_str()
    )
}

fn ms(s: f64) -> String {
    format!("{:.3} ms", s * 1e3)
}

/// The table's "Memory per GPU" section.
fn write_memory(o: &mut String, mem: &InferenceMemory) {
    let _ = writeln!(o, "Memory per GPU");
    for (name, b) in [
        ("weights", mem.weights_bytes),
        ("KV cache", mem.kv_cache_bytes),
        ("activations", mem.activations_bytes),
        ("logits", mem.logits_bytes),
        ("comm buffers", mem.comm_buffers_bytes),
        ("reserved", mem.reserved_bytes),
        ("fragmentation", mem.fragmentation_bytes),
        ("total", mem.total_bytes),
    ] {
        let _ = writeln!(o, "  {name:<14}{}", fmt_gib(b));
    }
}

/// The table's "Predicted" section: prefill, decode per token and the whole request.
fn write_predicted(o: &mut String, e: &InferenceEstimate) {
    let _ = writeln!(o, "Predicted");
    // The ring's merges, shown where there is a ring.
    let merge = if e.prefill.ring_merge_s > 0.0 {
        format!(", ring merge {:.3} s", e.prefill.ring_merge_s)
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "  prefill       {:.3} s ({:.0} tokens/s): gemm {:.3} s, attention {:.3} s, all-to-all {:.3} s, ring exposed {:.3} s{merge}",
        e.prefill_s,
        e.prefill_tokens_per_s,
        e.prefill.gemm_s,
        e.prefill.attention_s,
        e.prefill.ulysses_all_to_all_s,
        e.prefill.ring_exposed_s
    );
    let _ = writeln!(
        o,
        "  decode        {} per token: kernels {} ({} kernels{}, {}: HBM {} + floor {} at {:.1} us each), merge {}, weight gather {}",
        ms(e.decode_s_per_token),
        ms(e.decode_kernels_s),
        e.decode_kernels_per_token,
        if e.decode_cuda_graph {
            " in a CUDA graph, greedy and pipelined"
        } else {
            ""
        },
        fmt_gib(e.decode_bytes_per_token),
        ms(e.decode_hbm_s),
        ms(e.decode_floor_s),
        e.decode_kernel_floor_s * 1e6,
        ms(e.decode_comm_s),
        ms(e.decode_weight_gather_s)
    );
    let _ = writeln!(o, "  request       {:.3} s", e.request_s);
}

/// Table output of an inference plan: the best candidate, its memory and times, runners-up.
pub fn table(
    topo: &Topology,
    m: &ModelSpec,
    req: &InferenceRequest,
    s: &InferenceSearch,
    top: usize,
) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "mmsp plan --mode inference: {} at {} tokens on {} x {} ({}), {} decoded tokens per request",
        m.name,
        fmt_tokens(req.context),
        req.gpus,
        topo.spec.name,
        topo.spec.gpu_model,
        req.decode_tokens
    );
    let _ = writeln!(
        o,
        "searched {} candidates: {} feasible, {} infeasible",
        s.ranked.len() + s.infeasible.len(),
        s.ranked.len(),
        s.infeasible.len()
    );
    let Some((c, e)) = s.ranked.first() else {
        return o;
    };
    let _ = writeln!(o);
    let _ = writeln!(o, "Best plan");
    let _ = writeln!(
        o,
        "  layout        {}, sp {}",
        layout_name(&c.layout),
        c.layout.sp()
    );
    let _ = writeln!(o, "  weights       {}", e.weights.as_str());
    let _ = writeln!(
        o,
        "  KV cache      {} kv heads x {} tokens per rank, new tokens round-robin over sp ranks",
        e.kv_heads_held,
        fmt_tokens(e.kv_tokens_per_rank)
    );
    let _ = writeln!(o);
    write_memory(&mut o, &e.memory);
    let _ = writeln!(o);
    write_predicted(&mut o, e);
    if s.ranked.len() > 1 && top > 0 {
        let _ = writeln!(o);
        let _ = writeln!(o, "Runners-up");
        for (c, e) in s.ranked.iter().skip(1).take(top) {
            let _ = writeln!(
                o,
                "  {:<40} {:<17} prefill {:>8.3} s  decode {:>10}  {:>9}/GPU",
                layout_name(&c.layout),
                e.weights.as_str(),
                e.prefill_s,
                ms(e.decode_s_per_token),
                fmt_gib(e.memory.total_bytes)
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::cluster::ClusterSpec;

    /// A 1M-token request decoding 128 tokens on `gpus`.
    fn request_1m(gpus: u32) -> InferenceRequest {
        InferenceRequest {
            gpus,
            context: 1 << 20,
            decode_tokens: 128,
        }
    }

    fn setup(gpus: u32) -> (Topology, ModelSpec) {
        let cluster = ClusterSpec::load("dgx-h100").unwrap();
        (
            Topology::build(&cluster, gpus),
            crate::spec::model::load("llama3-8b").unwrap(),
        )
    }

    #[test]
    fn kv_bytes_hand_computed() {
        // llama3-8b: 32 layers, 8 kv heads, head dim 128; 1M tokens over 8 ranks = 131072 each:
        // 2 * 32 * 8 * 128 * 131072 * 2 = 17_179_869_184 bytes = 16 GiB.
        assert_eq!(kv_cache_bytes(32, 8, 128, 131_072), 17_179_869_184.0);
        let (topo, m) = setup(8);
        let req = request_1m(8);
        let c = InferenceCandidate {
            layout: Layout {
                ulysses: 8,
                ring: 1,
                dp: 1,
                tp: 1,
                placement: Placement::UlyssesInner,
            },
            weights: WeightSharding::Replicated,
        };
        let e = evaluate(&topo, &m, &req, &c).unwrap();
        assert_eq!(e.memory.kv_cache_bytes, 17_179_869_184.0);
        assert_eq!(e.kv_tokens_per_rank, 131_072);
        // Head layout with ulysses 8 = kv heads: one head per rank over the whole 1M tokens,
        // the same bytes; with ulysses 8 over 4 kv heads it would replicate (2x).
        assert_eq!(
            head_layout_kv_bytes(&m, &c.layout, 1 << 20),
            17_179_869_184.0
        );
        let mut m4 = m.clone();
        m4.num_kv_heads = 4;
        assert_eq!(
            head_layout_kv_bytes(&m4, &c.layout, 1 << 20),
            2.0 * kv_cache_bytes(32, 4, 128, 131_072)
        );
    }

    fn one_gpu() -> InferenceCandidate {
        InferenceCandidate {
            layout: Layout {
                ulysses: 1,
                ring: 1,
                dp: 1,
                tp: 1,
                placement: Placement::UlyssesInner,
            },
            weights: WeightSharding::Replicated,
        }
    }

    /// The kernel chain of one decode step, counted from the runtime: 8 per token + 37 per
    /// layer at 64K keys in whole chunks (+ 2 + 19 per layer when sp > 1), 40 when
    /// the last chunk is partly held; its bytes are the KV shard and the weights
    /// (hand-computed for llama3-8b, the embedding table except one row not read): the
    /// FlashAttention path keeps the scores on chip.
    #[test]
    fn decode_kernels_are_the_runtime_chain() {
        let m = crate::spec::model::load("llama3-8b").unwrap();
        let count = |sp| {
            decode_kernels(&m, 64 * 1024, sp)
                .iter()
                .map(|k| k.count)
                .sum::<u64>()
        };
        assert_eq!(count(1), 8 + 37 * 32);
        assert_eq!(count(8), 8 + 2 + 56 * 32);
        let partial: u64 = decode_kernels(&m, 64 * 1024 + 5, 1)
            .iter()
            .map(|k| k.count)
            .sum();
        assert_eq!(partial, 8 + 40 * 32);
        // 32 layers x 218_112_000 + norm 4096 + head 128256 x 4096 + one embedding row 4096.
        let w = 2.0 * (32.0 * 218_112_000.0 + 4096.0 + 128_256.0 * 4096.0 + 4096.0);
        assert_eq!(m.layer_params(), 218_112_000);
        assert_eq!(decode_weight_bytes(&m), w);
        assert!(decode_weight_bytes(&m) < WEIGHT_BYTES * m.params() as f64);
        // 64K keys over 8 kv heads: chunks of 1024 keys, 64 of them, no padding.
        assert_eq!(cache_chunk_len(64 * 1024, 8), 1024);
        assert_eq!(cache_chunk_len(1000, 2), 256);
        let kv = kv_cache_bytes(32, 8, 128, 64 * 1024);
        let total: f64 = decode_kernels(&m, 64 * 1024, 1)
            .iter()
            .map(|k| k.count as f64 * k.bytes)
            .sum();
        // The rest: activations, the per-chunk query copies and partial outputs, the logits.
        let rest = total - kv - w;
        assert!(rest > 0.0 && rest < 0.01 * total, "{rest} of {total}");
        // The CUDA-graph step: 5 queued by the host, 16 + 40 per layer replayed, the same KV
        // and weights read; its projections are the eager chain's.
        let g = decode_graph_kernels(&m, 64 * 1024);
        let n = |ks: &[DecodeKernel]| ks.iter().map(|k| k.count).sum::<u64>();
        assert_eq!((n(&g.stream), n(&g.graph)), (5, 16 + 40 * 32));
        let bytes = |ks: &[DecodeKernel]| ks.iter().map(|k| k.count as f64 * k.bytes).sum::<f64>();
        let rest = bytes(&g.stream) + bytes(&g.graph) - kv - w;
        assert!(rest > 0.0 && rest < 0.01 * total, "{rest} of {total}");
        let proj = |ks: &[DecodeKernel]| {
            ks.iter()
                .filter(|k| k.kind == KernelKind::Projection)
                .map(|k| (k.name, k.count))
                .collect::<Vec<_>>()
        };
        assert_eq!(proj(&g.graph), proj(&decode_kernels(&m, 64 * 1024, 1)));
        assert_eq!(proj(&g.graph).len(), 6);
    }

    /// Decode of llama3-8b on one GPU: the kernels' bytes over bandwidth plus what the floor
    /// adds, no collectives; at least the KV shard and weights over the streaming bandwidth.
    #[test]
    fn decode_is_the_kernel_chain() {
        let (topo, m) = setup(1);
        let req = InferenceRequest {
            gpus: 1,
            context: 64 * 1024,
            decode_tokens: 16,
        };
        let e = evaluate(&topo, &m, &req, &one_gpu()).unwrap();
        // One rank: the CUDA-graph step, pipelined: what the host queues at the floor, what
        // the graph replays at its measured times; the host's own part of a step (the shipped
        // calibration's `host_token_s`) hides behind the device's 8B step.
        assert!(e.decode_cuda_graph);
        let g = decode_graph_kernels(&m, 64 * 1024);
        let floor = kernel_floor_s(&topo.spec);
        let spec = &topo.spec;
        let want: f64 = g
            .stream
            .iter()
            .map(|k| k.count as f64 * kernel_s(spec, k.bytes, floor))
            .chain(
                g.graph
                    .iter()
                    .map(|k| k.count as f64 * graph_kernel_s(spec, k.bytes, k.kind, floor)),
            )
            .sum();
        let host = spec
            .calibration
            .as_ref()
            .and_then(|c| c.graph_times())
            .and_then(|t| t.host_token_s())
            .expect("the shipped H100 calibration measures the host's part");
        assert!(host > 5.0 * floor && host < want, "{host} {want}");
        assert!((e.decode_kernels_s - want).abs() < 1e-12 * want);
        assert!((e.decode_hbm_s + e.decode_floor_s - want).abs() < 1e-12 * want);
        assert_eq!(e.decode_kernels_per_token, 21 + 40 * 32);
        let kv = kv_cache_bytes(32, 8, 128, 64 * 1024);
        let bw = topo.spec.hbm_bytes_per_s * crate::cost::compute::HBM_EFFICIENCY;
        assert!(e.decode_hbm_s > (kv + decode_weight_bytes(&m)) / bw);
        assert_eq!(e.decode_comm_s, 0.0);
        assert_eq!(e.decode_s_per_token, e.decode_kernels_s);
    }

    /// The floor counts: a tiny model's decode step is launch bound, every kernel at the
    /// floor, so it takes kernels x floor (the default floor without a measured bandwidth
    /// curve, the calibration's smallest call with one), however few bytes it moves.
    #[test]
    fn tiny_decode_is_kernels_times_floor() {
        let cluster = ClusterSpec::load("dgx-h100").unwrap();
        let mut m = crate::spec::model::load("llama3-8b").unwrap();
        (
            m.hidden_size,
            m.intermediate_size,
            m.num_heads,
            m.num_kv_heads,
        ) = (64, 128, 2, 1);
        (m.head_dim, m.num_layers, m.vocab_size) = (32, 2, 256);
        let req = InferenceRequest {
            gpus: 1,
            context: 1024,
            decode_tokens: 1,
        };
        let text = r#"{"device": "x", "gemm": [{"tokens": 1024, "n": 1, "k": 1, "tflops": 500}],
            "attention": [{"backend": "a", "heads": 8, "tokens": 1024, "causal": false, "tflops": 400},
            {"backend": "a", "heads": 8, "tokens": 1024, "causal": true, "tflops": 300}],
            "memory_bandwidth": [{"op": "copy", "bytes": 2097152, "gb_per_s": 200},
            {"op": "copy", "bytes": 2147483648, "gb_per_s": 3000}]}"#;
        let cal = crate::calibration::Calibration::from_json(text, "t").unwrap();
        let mut calibrated = cluster.clone();
        calibrated.calibration = Some(std::sync::Arc::new(cal));
        // Without a calibration (the shipped one has a memory_bandwidth section): the default.
        let mut plain = cluster.clone();
        plain.calibration = None;
        for (c, floor) in [
            (&plain, DEFAULT_KERNEL_FLOOR_S),
            (&calibrated, 2097152.0 / 200e9),
        ] {
            let topo = Topology::build(c, 1);
            let e = evaluate(&topo, &m, &req, &one_gpu()).unwrap();
            assert_eq!(e.decode_kernel_floor_s, floor);
            // 1024 keys in 4 whole chunks of 256; no graph points: every kernel at the floor.
            let n = (21 + 40 * 2) as f64;
            assert_eq!(e.decode_kernels_per_token, 101);
            assert!(e.decode_s_per_token >= n * floor * (1.0 - 1e-12));
            assert!(e.decode_s_per_token < 1.01 * n * floor, "{e:?}");
            assert!(e.decode_floor_s > 100.0 * e.decode_hbm_s);
        }
        // With graph points, what the graph replays costs its measured time (1 us copies,
        // 2 us projections here: the one point's time, these weights being smaller; the
        // attention, not measured, as a small op) and only the 5 host kernels the eager floor.
        let graph = text.replace(
            r#""memory_bandwidth""#,
            r#""launch": {"graph_copy": [{"bytes": 2048, "seconds": 1e-6}, {"bytes": 1048576, "seconds": 1e-6}],
            "graph_gemv": [{"weight_bytes": 1048576, "seconds": 2e-6}]},
            "memory_bandwidth""#,
        );
        let cal = crate::calibration::Calibration::from_json(&graph, "t").unwrap();
        calibrated.calibration = Some(std::sync::Arc::new(cal));
        let e = evaluate(&Topology::build(&calibrated, 1), &m, &req, &one_gpu()).unwrap();
        let floor = 2097152.0 / 200e9;
        let projections = 7 * 2 + 1;
        let want = 5.0 * floor + (101 - 5 - projections) as f64 * 1e-6 + projections as f64 * 2e-6;
        assert_eq!(e.decode_kernel_floor_s, 1e-6);
        assert!(e.decode_cuda_graph);
        // A head dim FlashAttention does not take (36, not a multiple of 8): the runtime
        // decodes eagerly, and so is it costed.
        let mut odd = m.clone();
        odd.head_dim = 36;
        let e36 = evaluate(&Topology::build(&calibrated, 1), &odd, &req, &one_gpu()).unwrap();
        assert!(!e36.decode_cuda_graph);
        assert_eq!(e36.decode_kernels_per_token, 82);
        assert!(
            (e.decode_s_per_token - want).abs() < 1e-3 * want,
            "{} {want}",
            e.decode_s_per_token
        );
        // The host's own part of a step (`host_token_s`) overlaps the device's: a shorter one
        // changes nothing, a longer one sets the token's time.
        for (host, took) in [(3e-5, want), (1e-3, 1e-3)] {
            let hosted = graph.replace(
                r#""graph_gemv""#,
                &format!(r#""host_token_s": {host}, "graph_gemv""#),
            );
            let cal = crate::calibration::Calibration::from_json(&hosted, "t").unwrap();
            calibrated.calibration = Some(std::sync::Arc::new(cal));
            let e = evaluate(&Topology::build(&calibrated, 1), &m, &req, &one_gpu()).unwrap();
            assert!(
                (e.decode_s_per_token - took).abs() < 1e-3 * took,
                "{host}: {} {took}",
                e.decode_s_per_token
            );
        }
    }

    #[test]
    fn more_gpus_less_kv_per_gpu() {
        let m = crate::spec::model::load("llama3-8b").unwrap();
        let cluster = ClusterSpec::load("dgx-h100").unwrap();
        let mut last = f64::INFINITY;
        for gpus in [8, 16, 32] {
            let topo = Topology::build(&cluster, gpus);
            let req = request_1m(gpus);
            let s = search(&topo, &m, &req);
            let (_, e) = s.ranked.first().expect("fits");
            assert!(
                e.memory.kv_cache_bytes < last,
                "{gpus}: {}",
                e.memory.kv_cache_bytes
            );
            assert!(e.prefill_s > 0.0 && e.decode_s_per_token > 0.0);
            last = e.memory.kv_cache_bytes;
        }
    }

    #[test]
    fn sharded_weights_when_replicated_do_not_fit() {
        // llama3-70b at 1M on 8 GPUs: 141 GB of bf16 weights cannot be replicated on 80 GB.
        let cluster = ClusterSpec::load("dgx-h100").unwrap();
        let m = crate::spec::model::load("llama3-70b").unwrap();
        let topo = Topology::build(&cluster, 8);
        let req = InferenceRequest {
            gpus: 8,
            context: 256 * 1024,
            decode_tokens: 16,
        };
        let s = search(&topo, &m, &req);
        assert!(s
            .infeasible
            .iter()
            .any(|(c, _)| c.weights == WeightSharding::Replicated));
        if let Some((c, _)) = s.ranked.first() {
            assert_eq!(c.weights, WeightSharding::Sharded);
        }
        // And replicated wins where it fits (it saves the gathers).
        let (topo, m) = setup(8);
        let req = request_1m(8);
        let s = search(&topo, &m, &req);
        assert_eq!(s.ranked[0].0.weights, WeightSharding::Replicated);
    }

    #[test]
    fn plan_json_is_inference_mode() {
        let (topo, m) = setup(8);
        let req = request_1m(8);
        let s = search(&topo, &m, &req);
        let (c, e) = &s.ranked[0];
        let plan = build_plan(&topo, "dgx-h100", &m, req.context, c, e).unwrap();
        let v = serde_json::to_value(&plan).unwrap();
        assert_eq!(v["mode"], "inference");
        assert_eq!(v["world_size"], 8);
        assert_eq!(v["context_tokens"], 1 << 20);
        assert_eq!(
            v["inference"]["memory"]["kv_cache_bytes"].as_f64(),
            Some(e.memory.kv_cache_bytes)
        );
    }
}
