//! Engine profiles: each peer of `mmsp compare` costed as its own stack runs it, not as
//! mmsp-runtime would run its layout. A profile carries the engine's memory rules (model
//! states, activation accounting, logits), its recompute options, its communication pattern
//! and overlap, and its kernel efficiency against the calibration, each with its source.
//!
//! The time model reuses the cost model's building blocks ([`crate::cost::terms_any_memory`],
//! the same GEMM, attention, memory-bound and collective costs over the same cluster graph)
//! and changes what the engine does differently:
//! - attention kernels: FlashAttention-2 (PyTorch's flash backend, what ring-flash-attention,
//!   yunchang, DeepSpeed-Ulysses and VILA call) ran at [`FA2_OVER_CUDNN`] of the cuDNN kernel
//!   the calibration measured, on one H100 (`validation/engine-kernels-h100.json`, written by
//!   `tools/engine_kernels.py`); Transformer Engine's fused attention is cuDNN's (factor 1);
//! - whole-layer recompute (Korthikanti et al. 2022, Sec. 4.1: keep each layer's input,
//!   recompute the layer, attention and its ring or all-to-all traffic included) where the
//!   engine offers it, instead of mmsp-runtime's recompute outside attention;
//! - ring-flash-attention's per-step merge of outputs and log-sum-exps in PyTorch element-wise
//!   ops (`ring_flash_attn/utils.py`, `update_out_and_lse`) and its fp32 accumulation of dq, dk,
//!   dv per step in backward, as memory-bound time inside each ring step, in place of
//!   mmsp-runtime's ring merge count ([`crate::cost::ring`]); Transformer Engine's
//!   context-parallel ring also merges each step's output through its log-sum-exp
//!   (`flash_attn_fwd_out_correction`, `transformer_engine/pytorch/attention`) and sums its
//!   gradients per step, so the megatron-core profile keeps mmsp-runtime's count as an estimate
//!   of that work;
//! - memory: Megatron-Core's distributed optimizer (6 + 12/d bytes per parameter, d = DP x CP;
//!   Megatron-Core developer guide, "Distributed Optimizer") or DeepSpeed's ZeRO rules
//!   (Rajbhandari et al. 2020, Sec. 5 with bf16 gradients: stage 1 4 + 12/N, stage 2
//!   2 + 14/N, stage 3 16/N); activations by Korthikanti et al. 2022 Table 2 with
//!   FlashAttention (no score term), SwiGLU and GQA
//!   ([`crate::cost::memory::layer_activation_bytes_per_token`]); logits as the engine's loss
//!   holds them over the rank's whole shard (Megatron-Core: bf16 logits and their fp32 copy for
//!   `vocab_parallel_cross_entropy(logits.float(), ...)`, 6 B; Hugging Face models under
//!   DeepSpeed: bf16 logits, `logits.float()` and log-softmax, 10 B).
//!
//! The mmsp-runtime profile is the default and is today's cost model unchanged: its rows in
//! `mmsp compare` come from [`crate::search::search`] as before.

use serde::Serialize;

use crate::cost::compute::{attention_flops_fwd, hbm_rate, ATTN_TRAIN_FACTOR};
use crate::cost::memory::{
    layer_activation_bytes_per_token, ActivationArch, FRAGMENTATION, RUNTIME_RESERVE_BYTES,
};
use crate::cost::{
    compose, head_split, terms_any_memory, Candidate, Estimate, Infeasible, MemoryBreakdown,
    Placement, Recompute, Terms, Workload,
};
use crate::error::{Error, Result};
use crate::multimodal::MultiModal;
use crate::search::{self, Request, Strategy};
use crate::spec::model::ModelSpec;
use crate::topology::Topology;

/// FlashAttention-2's causal fwd+bwd throughput over cuDNN's on one H100 80GB HBM3, 32 heads
/// of 128, bf16: 0.550 / 0.573 / 0.599 at 8K / 32K / 128K tokens, mean 0.574 (measured with
/// PyTorch 2.11's SDPA backends, `validation/engine-kernels-h100.json`; the reference table in
/// `shared/reference/README.md` gives 0.42 / 0.64 / 0.60 for the same pair).
pub const FA2_OVER_CUDNN: f64 = 0.574;

/// FP8 GEMM (cuBLASLt via `torch._scaled_mm`, e4m3, per-tensor scales) over bf16 GEMM time at
/// Llama-2-7B's projection shapes, 4K-16K tokens, TP 1/4/8, one H100: mean 1.734 (range
/// 1.41-2.07; `validation/engine-kernels-h100.json`). Used only for published rows trained in
/// FP8 (`mmsp validate`); the casts and amax updates around Transformer Engine's FP8 GEMMs are
/// not counted.
pub const FP8_GEMM_SPEEDUP: f64 = 1.734;

/// Bytes per logit that each engine's loss holds for the rank's whole shard of tokens.
const MEGATRON_LOGIT_BYTES: f64 = 6.0;
const HF_LOGIT_BYTES: f64 = 10.0;

/// Memory-bound bytes per query element of ring-flash-attention's merge per ring step,
/// forward: `update_out_and_lse` in fp32 (out - block_out, the sigmoid-weighted update and
/// the subtraction: about 30 B read and written per element). Backward: dq accumulated in fp32
/// (8 B per q element) and dk, dv in fp32 (16 B per kv element) per step. An estimate from the
/// code's element-wise ops, not measured.
const MERGE_FWD_BYTES_PER_Q: f64 = 30.0;
const MERGE_BWD_BYTES_PER_Q: f64 = 8.0;
const MERGE_BWD_BYTES_PER_KV: f64 = 16.0;

/// The engines `mmsp compare` and `mmsp validate` cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    MmspRuntime,
    MegatronCore,
    RingFlashAttn,
    Yunchang,
    DeepspeedUlysses,
    VilaMmsp,
}

/// How an engine keeps its model states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatesRule {
    /// mmsp-runtime's own (`crate::cost::memory::runtime_model_states`).
    Runtime,
    /// Megatron-Core's distributed optimizer: 6 + 12/d bytes per parameter.
    DistributedOptimizer,
    /// DeepSpeed ZeRO with bf16 gradients (Rajbhandari et al. 2020, Sec. 5, K = 12).
    DeepSpeedZero,
}

/// One engine's profile.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub engine: Engine,
    /// The row name in `mmsp compare`.
    pub row: &'static str,
    /// Which layouts it runs (the search's layout family).
    #[serde(skip)]
    pub strategy: Strategy,
    pub states: StatesRule,
    pub zero_stages: &'static [u8],
    /// Recompute options besides none: `full` is whole-layer (Korthikanti) for every engine
    /// but mmsp-runtime, whose `full` is its recompute outside attention.
    pub recompute: &'static str,
    pub logit_bytes: f64,
    /// Attention throughput over the calibration's (cuDNN) kernel.
    pub attention_efficiency: f64,
    pub attention_source: &'static str,
    /// Ring steps merged by PyTorch element-wise ops (ring-flash-attention's `update_out_and_lse`).
    pub python_merge: bool,
    /// Only Ulysses groups inside the node (TE's a2a+p2p: a2a in the low level, p2p across).
    pub ulysses_inner_only: bool,
    /// Ulysses degree at most the kv heads (no kv-head replication).
    pub ulysses_within_kv_heads: bool,
    pub communication: &'static str,
}

const FA2: &str =
    "FlashAttention-2 at 0.574 x cuDNN, measured (validation/engine-kernels-h100.json)";

/// Every profile, mmsp-runtime first; rows in `mmsp compare` order.
pub fn profiles() -> Vec<Profile> {
    let p =
        |engine, row, strategy, states, zero_stages, logit_bytes, eff, src, merge, comm| Profile {
            engine,
            row,
            strategy,
            states,
            zero_stages,
            recompute: if engine == Engine::MmspRuntime {
                "none | outside attention"
            } else {
                "none | full (whole layer)"
            },
            logit_bytes,
            attention_efficiency: eff,
            attention_source: src,
            python_merge: merge,
            ulysses_inner_only: false,
            ulysses_within_kv_heads: false,
            communication: comm,
        };
    let rt = "mmsp-runtime's calibration (its own cuDNN kernels, measured)";
    let te = "Transformer Engine fused attention = cuDNN, the calibration's kernel (assumption)";
    let ds = StatesRule::DeepSpeedZero;
    vec![
        p(Engine::MmspRuntime, "2d", Strategy::TwoD, StatesRule::Runtime, &[0, 1, 2, 3], 10.0, 1.0, rt, false,
          "Ulysses all-to-all (exposed) x zigzag ring P2P overlapped with each step's attention"),
        p(Engine::MmspRuntime, "ring", Strategy::Ring, StatesRule::Runtime, &[0, 1, 2, 3], 10.0, 1.0, rt, false,
          "zigzag ring P2P overlapped with each step's attention"),
        p(Engine::MmspRuntime, "ulysses", Strategy::Ulysses, StatesRule::Runtime, &[0, 1, 2, 3], 10.0, 1.0, rt, false,
          "Ulysses all-to-all, exposed"),
        p(Engine::MegatronCore, "megatron-cp-tp", Strategy::MegatronCpTp, StatesRule::DistributedOptimizer, &[1],
          MEGATRON_LOGIT_BYTES, 1.0, te, false,
          "TE p2p CP: KV send/recv overlapped with each step's attention; TP all-gather / reduce-scatter exposed"),
        Profile {
            ulysses_inner_only: true,
            ..p(Engine::MegatronCore, "te-a2a-p2p", Strategy::TeA2aP2p, StatesRule::DistributedOptimizer, &[1],
                MEGATRON_LOGIT_BYTES, 1.0, te, false,
                "TE hierarchical CP (a2a+p2p): all-to-all inside the node, exposed; p2p across nodes overlapped")
        },
        p(Engine::RingFlashAttn, "ring-flash-attn", Strategy::Ring, ds, &[1, 2, 3], HF_LOGIT_BYTES, FA2_OVER_CUDNN, FA2, true,
          "zigzag ring: batch_isend_irecv per step overlapped with that step's kernel, merge in PyTorch"),
        p(Engine::Yunchang, "usp", Strategy::TwoD, ds, &[1, 2, 3], HF_LOGIT_BYTES, FA2_OVER_CUDNN, FA2, true,
          "USP: Ulysses all-to-all (exposed) x zigzag ring (ring-flash-attention's steps and merge)"),
        Profile {
            ulysses_within_kv_heads: true,
            ..p(Engine::DeepspeedUlysses, "ds-ulysses", Strategy::Ulysses, ds, &[1, 2, 3], HF_LOGIT_BYTES, FA2_OVER_CUDNN, FA2, false,
                "DistributedAttention: all-to-all of q, k, v and the output, exposed")
        },
        p(Engine::VilaMmsp, "vila-mmsp", Strategy::TwoD, ds, &[3], HF_LOGIT_BYTES, FA2_OVER_CUDNN, FA2, true,
          "2D attention (Ulysses x zigzag ring) on DeepSpeed ZeRO-3"),
    ]
}

impl Engine {
    pub const ALL: [Engine; 6] = [
        Engine::MmspRuntime,
        Engine::MegatronCore,
        Engine::RingFlashAttn,
        Engine::Yunchang,
        Engine::DeepspeedUlysses,
        Engine::VilaMmsp,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Engine::MmspRuntime => "mmsp-runtime",
            Engine::MegatronCore => "megatron-core",
            Engine::RingFlashAttn => "ring-flash-attn",
            Engine::Yunchang => "yunchang",
            Engine::DeepspeedUlysses => "deepspeed-ulysses",
            Engine::VilaMmsp => "vila-mmsp",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Engine::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Engine::ALL.iter().map(|e| e.name()).collect();
                Error::invalid(
                    "--engine",
                    format!("'{s}' is not one of: {}", names.join(", ")),
                )
            })
    }

    /// A comma-separated list of engines (`--engine a,b`).
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        s.split(',').map(|x| Engine::parse(x.trim())).collect()
    }
}

/// Model states per GPU (bytes) under an engine's rule, `params` per tensor-parallel rank,
/// sharded over `shards` ranks (Megatron: DP x CP; DeepSpeed: its data-parallel group, which
/// with sequence parallelism is DP x SP).
pub fn engine_model_states(rule: StatesRule, params: f64, zero: u8, shards: f64) -> f64 {
    match (rule, zero) {
        // Megatron-Core developer guide, "Distributed Optimizer": bf16 parameters (2) and fp32
        // gradient buffer (4) whole, fp32 master weights and Adam moments (12) sharded.
        (StatesRule::DistributedOptimizer, _) => (6.0 + 12.0 / shards) * params,
        // ZeRO (Rajbhandari et al. 2020, Sec. 5 and Fig. 1, K = 12, 16-bit gradients).
        (_, 1) => (2.0 + 2.0 + 12.0 / shards) * params,
        (_, 2) => (2.0 + 14.0 / shards) * params,
        (_, 3) => 16.0 / shards * params,
        _ => 16.0 * params,
    }
}

/// Activation bytes per GPU of an engine's layers: Korthikanti et al. 2022 (Table 2) with
/// FlashAttention, per token of the rank's `tokens`, split `tp` ways by Megatron's sequence
/// parallelism; under whole-layer recompute each layer keeps its input (2h/t) and the layer
/// in backward holds its whole working set once more.
pub fn engine_activation_bytes(
    arch: &ActivationArch,
    layers: f64,
    tokens: f64,
    tp: f64,
    full: bool,
) -> f64 {
    let none = layer_activation_bytes_per_token(arch, 0.0, tp, Recompute::None);
    if full {
        let kept = layer_activation_bytes_per_token(arch, 0.0, tp, Recompute::Full);
        (layers * kept + none) * tokens
    } else {
        layers * none * tokens
    }
}

/// One candidate costed under a profile: its terms (for the simulator) and estimate.
#[derive(Debug, Clone)]
pub struct EngineScored {
    pub candidate: Candidate,
    pub estimate: Estimate,
    pub terms: Terms,
}

/// The engine's memory per GPU for a candidate whose runtime terms are `t`.
fn engine_memory(p: &Profile, w: &Workload, c: &Candidate, t: &Terms) -> MemoryBreakdown {
    let m = w.model;
    let l = &c.layout;
    let tp = f64::from(l.tp);
    let tokens = f64::from(c.micro_batch) * w.context as f64 / f64::from(l.sp());
    let (_, kv_local) = head_split(m, l.tp, l.ulysses).unwrap_or((1, 1));
    let arch = ActivationArch {
        hidden: m.hidden_size as f64,
        q_dim: m.q_dim() as f64,
        kv_dim: (kv_local * u64::from(l.ulysses) * m.head_dim) as f64 * tp,
        ffn: m.intermediate_size as f64,
        heads: m.num_heads as f64,
        swiglu: true,
        dropout: false,
        flash: true,
    };
    let full = c.recompute != Recompute::None;
    let activations = engine_activation_bytes(&arch, m.num_layers as f64, tokens, tp, full);
    let params = m.params() as f64 / tp;
    let shards = f64::from(l.grad_family().size);
    let states = engine_model_states(p.states, params, c.zero_stage, shards);
    let logits = tokens * m.vocab_size as f64 / tp * p.logit_bytes;
    // The attention's ring and all-to-all buffers as the cost model counts them.
    let comm = t.memory.comm_buffers_bytes;
    let transient = logits.max(comm);
    // The vision encoder's activations and states as the cost model counts them.
    let vision = t.vision.map_or(0.0, |v| v.memory_bytes + v.states_bytes);
    let activations = activations + vision;
    let tensors = states + activations + transient;
    let frag = FRAGMENTATION * tensors;
    MemoryBreakdown {
        weights_bytes: 0.0,
        gradients_bytes: 0.0,
        optimizer_bytes: states,
        activations_bytes: activations,
        logits_bytes: logits,
        comm_buffers_bytes: comm,
        reserved_bytes: RUNTIME_RESERVE_BYTES,
        fragmentation_bytes: frag,
        total_bytes: tensors + frag + RUNTIME_RESERVE_BYTES,
    }
}

/// Changes the runtime's terms of a candidate into the engine's: kernel efficiency, FP8
/// GEMMs (`gemm_speedup`), whole-layer recompute and the ring merge.
fn engine_terms(
    p: &Profile,
    topo: &Topology,
    w: &Workload,
    c: &Candidate,
    gemm_speedup: f64,
) -> Result<Terms, Infeasible> {
    let mut t = terms_any_memory(topo, w, c)?;
    if p.python_merge {
        // ring-flash-attention's merge (below) replaces mmsp-runtime's (`cost::ring`).
        t.ring_merge_fwd_s = 0.0;
        t.ring_merge_bwd_s = 0.0;
    }
    t.gemm_fwd_s /= gemm_speedup;
    t.attn_fwd_s /= p.attention_efficiency;
    let l = &c.layout;
    if p.python_merge && l.ring > 1 {
        let m = w.model;
        let tokens = f64::from(c.micro_batch) * w.context as f64 / f64::from(l.sp());
        let (q_local, kv_local) = head_split(m, l.tp, l.ulysses)?;
        let u = f64::from(l.ulysses);
        let q_el = tokens * u * (q_local * m.head_dim) as f64;
        let kv_el = tokens * u * (kv_local * m.head_dim) as f64;
        let step = MERGE_FWD_BYTES_PER_Q * q_el
            + MERGE_BWD_BYTES_PER_Q * q_el
            + MERGE_BWD_BYTES_PER_KV * kv_el;
        let merge_s = (f64::from(l.ring) - 1.0) * step / hbm_rate(&topo.spec, 4.0 * q_el);
        // Spread over forward and backward as the attention's time is (1 : 2.5).
        t.attn_fwd_s += merge_s / ATTN_TRAIN_FACTOR;
    }
    if p.engine != Engine::MmspRuntime && c.recompute != Recompute::None {
        // Whole-layer recompute: attention forward again (4.5x its forward in all), with its
        // ring traffic (forward K, V again: 2 + 3 blocks instead of 1 + 3) and all-to-alls.
        t.attn_fwd_s *= (ATTN_TRAIN_FACTOR + 1.0) / ATTN_TRAIN_FACTOR;
        // HFU counts the attention forward run again (the GEMMs' is counted by the terms).
        let scale = w.vision.map_or(1.0, |v| v.attention_scale);
        let attn_fwd =
            scale * f64::from(c.micro_batch) * attention_flops_fwd(w.model, w.context as f64)
                / f64::from(l.sp() * l.tp);
        t.hardware_flops += f64::from(l.world()) * t.accum as f64 * t.layers as f64 * attn_fwd;
        t.ring_kv_bytes *= 5.0 / 4.0;
        t.a2a_qkv_bytes *= 1.5;
        t.a2a_o_bytes *= 1.5;
    }
    t.memory = engine_memory(p, w, c, &t);
    if t.memory.total_bytes > topo.spec.hbm_bytes {
        return Err(Infeasible::Memory {
            needed: t.memory.total_bytes,
            available: topo.spec.hbm_bytes,
        });
    }
    Ok(t)
}

/// Whether a candidate's layout is one the engine runs (its ZeRO stages are checked apart).
fn runs_layout(p: &Profile, model: &ModelSpec, c: &Candidate) -> bool {
    let l = &c.layout;
    (!p.ulysses_inner_only || l.ulysses == 1 || l.placement == Placement::UlyssesInner)
        && (!p.ulysses_within_kv_heads || u64::from(l.ulysses * l.tp) <= model.num_kv_heads)
}

/// Costs one candidate under a profile (`gemm_speedup` 1 for bf16).
pub fn evaluate(
    p: &Profile,
    topo: &Topology,
    w: &Workload,
    c: &Candidate,
    gemm_speedup: f64,
) -> Result<EngineScored, Infeasible> {
    let terms = engine_terms(p, topo, w, c, gemm_speedup)?;
    let mut estimate = compose(topo, &terms);
    estimate.memory = terms.memory.clone();
    estimate.memory_per_gpu_bytes = terms.memory.total_bytes;
    Ok(EngineScored {
        candidate: *c,
        estimate,
        terms,
    })
}

/// Every candidate of the profile's layouts (the search's enumeration, filtered), ranked by
/// analytic step time, with the infeasible ones and why.
pub struct EngineSearch {
    pub ranked: Vec<EngineScored>,
    pub infeasible: Vec<(Candidate, Infeasible)>,
    pub global_batch: u64,
}

/// The engine's search of a request, `gemm_speedup` 1 for bf16. With `mm` every candidate
/// carries the vision stage as [`crate::search::search`] costs it.
pub fn search(
    p: &Profile,
    topo: &Topology,
    model: &ModelSpec,
    req: &Request,
    mm: Option<&MultiModal>,
    gemm_speedup: f64,
) -> EngineSearch {
    let (req, global_batch) = engine_request(p, req);
    let mut ranked = Vec::new();
    let mut infeasible = Vec::new();
    for c in search::enumerate(model, &topo.spec, &req) {
        let runnable = head_split(model, c.layout.tp, c.layout.ulysses).is_ok()
            && global_batch.is_multiple_of(u64::from(c.layout.dp) * u64::from(c.micro_batch));
        // A layout the enumeration records as unable to run (heads or batch) keeps its reason
        // whatever ZeRO stage it was recorded with.
        if !runs_layout(p, model, &c) || (runnable && !p.zero_stages.contains(&c.zero_stage)) {
            continue;
        }
        let context = search::candidate_context(req.context, mm, &c.layout);
        let vision = match (mm, runnable) {
            (Some(mm), true) => match mm.stage(topo, model, &c.layout, context) {
                Ok(v) => Some(v),
                Err(e) => {
                    infeasible.push((c, Infeasible::Vision(e)));
                    continue;
                }
            },
            _ => None,
        };
        let w = Workload {
            model,
            context,
            global_batch,
            vision,
        };
        match evaluate(p, topo, &w, &c, gemm_speedup) {
            Ok(s) => ranked.push(s),
            Err(e) => infeasible.push((c, e)),
        }
    }
    ranked.sort_by(|a, b| a.estimate.step_time_s.total_cmp(&b.estimate.step_time_s));
    EngineSearch {
        ranked,
        infeasible,
        global_batch,
    }
}

/// The best few distinct layouts re-ranked by the simulator: (candidate, simulated step time).
pub fn refine(topo: &Topology, s: &EngineSearch) -> Vec<(EngineScored, f64)> {
    let firsts = crate::sim::first_of_each_layout(s.ranked.iter(), |x| x.candidate.layout);
    let mut out: Vec<(EngineScored, f64)> = firsts
        .into_iter()
        .filter_map(|x| {
            let sim = crate::sim::simulate(topo, &x.terms, true).ok()?;
            Some((x.clone(), sim.step_time_s))
        })
        .collect();
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// The request under the profile's strategy, and its global batch (given or the default).
fn engine_request(p: &Profile, req: &Request) -> (Request, u64) {
    let req = Request {
        strategy: p.strategy,
        ..req.clone()
    };
    let global_batch = req
        .global_batch
        .unwrap_or_else(|| search::default_global_batch(req.context));
    (req, global_batch)
}

/// Whether some candidate of the profile runs the request: [`search`] with a ranked
/// candidate, decided by [`engine_terms`] alone (compose never rules a candidate out), stopping
/// at the first; pricing every layout's collectives made `mmsp compare` on 65536 GPUs
/// spend a third of its time in these maxima.
fn any_fits(p: &Profile, topo: &Topology, model: &ModelSpec, req: &Request) -> bool {
    let (req, global_batch) = engine_request(p, req);
    search::enumerate(model, &topo.spec, &req).iter().any(|c| {
        let w = Workload {
            model,
            context: search::candidate_context(req.context, None, &c.layout),
            global_batch,
            vision: None,
        };
        runs_layout(p, model, c)
            && p.zero_stages.contains(&c.zero_stage)
            && engine_terms(p, topo, &w, c, 1.0).is_ok()
    })
}

/// The largest context (a multiple of 2 x GPUs) of which one sequence per micro-batch fits
/// under the profile, by doubling and bisection as [`crate::search::max_context`]. The global
/// batch is one sequence per GPU, so that every DP degree divides it (DeepSpeed-Ulysses, whose
/// degree stops at the kv heads, has DP > 1 on more GPUs than that); memory depends on the
/// micro-batch alone.
pub fn max_context(p: &Profile, topo: &Topology, model: &ModelSpec, req: &Request) -> Option<u64> {
    let granule = 2 * u64::from(req.gpus);
    let fits = |k: u64| {
        let r = Request {
            context: k * granule,
            global_batch: Some(u64::from(req.gpus)),
            ..req.clone()
        };
        any_fits(p, topo, model, &r)
    };
    if !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1u64, 2u64);
    while fits(hi) {
        lo = hi;
        hi *= 2;
        if hi * granule > (1u64 << 40) {
            return Some(lo * granule);
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo * granule)
}

#[cfg(test)]
mod tests;
