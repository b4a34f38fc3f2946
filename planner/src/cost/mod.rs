//! The analytic cost model: for one candidate (layout, placement, ZeRO stage, recompute,
//! micro-batch) it predicts memory per GPU and the time of one training step, composed from
//! compute ([`compute`]), memory ([`memory`]) and communication phases routed over the
//! cluster graph ([`crate::topology`]). An infeasible candidate is an [`Infeasible`] value.

pub mod compute;
pub mod memory;
pub mod ring;

use serde::{Deserialize, Serialize};

use crate::spec::cluster::ClusterSpec;
use crate::spec::model::ModelSpec;
use crate::topology::Topology;
use compute::*;
use memory::*;
pub use memory::{runtime_recompute, MemoryBreakdown, Recompute};
pub use mmsp_plan::{Coords, GroupKind, Layout, Placement, TimeBreakdown, VisionStage};

/// One point of the search space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    pub layout: Layout,
    pub zero_stage: u8,
    pub recompute: Recompute,
    /// Sequences per micro-batch.
    pub micro_batch: u32,
}

/// A feasible candidate and its prediction.
#[derive(Debug, Clone)]
pub struct Scored {
    pub candidate: Candidate,
    pub estimate: Estimate,
}

/// What is being trained: the model, the sequence length and the global batch in sequences.
#[derive(Debug, Clone)]
pub struct Workload<'a> {
    pub model: &'a ModelSpec,
    pub context: u64,
    pub global_batch: u64,
    /// Per-step time of the vision stage (encoder, gather, re-shard) if the input is video.
    pub vision: Option<VisionStage>,
}

/// Why a candidate cannot run. The search skips these and reports the reasons.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Infeasible {
    #[error("needs {:.1} GiB per GPU, {:.1} GiB available", needed / crate::units::GIB, available / crate::units::GIB)]
    Memory { needed: f64, available: f64 },
    #[error("{heads} query / {kv_heads} kv heads cannot be split {ways} ways (tp x ulysses)")]
    Heads {
        heads: u64,
        kv_heads: u64,
        ways: u64,
    },
    #[error(
        "context {context} is not a multiple of {multiple} (2 x ring x ulysses zigzag chunks)"
    )]
    Divisibility { context: u64, multiple: u64 },
    #[error("vision stage: {0}")]
    Vision(String),
    #[error(
        "global batch {global_batch} is not a multiple of dp {dp} x micro-batch {micro_batch}"
    )]
    Batch {
        global_batch: u64,
        dp: u32,
        micro_batch: u32,
    },
}

impl Infeasible {
    /// Of candidates that missed, the memory miss that needed least: (needed, available) bytes.
    pub fn closest_memory_miss<'a>(
        misses: impl IntoIterator<Item = &'a Infeasible>,
    ) -> Option<(f64, f64)> {
        misses
            .into_iter()
            .filter_map(|e| match e {
                Infeasible::Memory { needed, available } => Some((*needed, *available)),
                _ => None,
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }
}

/// The prediction for one feasible candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation: [`Estimate::model_flops`] per second over the GPUs' peak.
    pub mfu: f64,
    /// Hardware FLOPs utilisation: [`Estimate::hardware_flops`] per second over the peak.
    pub hfu: f64,
    pub memory_per_gpu_bytes: f64,
    pub memory: MemoryBreakdown,
    pub time: TimeBreakdown,
    pub comm_exposed_s: f64,
    pub comm_overlapped_s: f64,
    pub grad_accum_steps: u64,
    /// FLOPs of one step that the model needs, as the field counts them for MFU
    /// ([`model_flops`]).
    pub model_flops: f64,
    /// FLOPs the kernels of one step execute, for HFU ([`hardware_flops`]).
    pub hardware_flops: f64,
}

/// FLOPs of a step as MFU counts them (Chowdhery et al. 2022, PaLM, Appendix B; Megatron-LM
/// and NeMo count the same): the GEMMs 3 x forward (6 x params x tokens) and causal attention
/// at 3 x its forward ([`ATTN_MODEL_FACTOR`]), nothing recomputed. `layer_gemm_fwd`,
/// `head_fwd` and `layer_attn_fwd` are one rank's forward FLOPs per micro-batch; `ranks_steps`
/// is world x micro-batches.
pub fn model_flops(
    ranks_steps: f64,
    layers: f64,
    layer_gemm_fwd: f64,
    head_fwd: f64,
    layer_attn_fwd: f64,
) -> f64 {
    ranks_steps
        * (GEMM_TRAIN_FACTOR * (layers * layer_gemm_fwd + head_fwd)
            + ATTN_MODEL_FACTOR * layers * layer_attn_fwd)
}

/// FLOPs of a step as its kernels execute them, for HFU: attention at FlashAttention-2's
/// 3.5 x forward ([`ATTN_TRAIN_FACTOR`], its backward recomputes the scores) and, under the
/// runtime's recompute outside attention, each layer's forward GEMMs once more. The step time
/// comes from these (the kernels' measured curves), not from [`model_flops`].
pub fn hardware_flops(
    ranks_steps: f64,
    layers: f64,
    layer_gemm_fwd: f64,
    head_fwd: f64,
    layer_attn_fwd: f64,
    recompute: Recompute,
) -> f64 {
    let again = if recompute == Recompute::None {
        0.0
    } else {
        1.0
    };
    ranks_steps
        * ((GEMM_TRAIN_FACTOR + again) * layers * layer_gemm_fwd
            + GEMM_TRAIN_FACTOR * head_fwd
            + ATTN_TRAIN_FACTOR * layers * layer_attn_fwd)
}

/// Heads per rank after tensor and Ulysses splitting: (query heads, kv heads held, including
/// Ulysses replication of kv heads when the Ulysses degree exceeds them, as DeepSpeed-Ulysses
/// and LongVILA do for GQA). Errors if the split is impossible.
pub fn head_split(m: &ModelSpec, tp: u32, ulysses: u32) -> Result<(u64, u64), Infeasible> {
    let (tp, u) = (u64::from(tp), u64::from(ulysses));
    let err = Infeasible::Heads {
        heads: m.num_heads,
        kv_heads: m.num_kv_heads,
        ways: tp * u,
    };
    if !m.num_heads.is_multiple_of(tp * u) || !m.num_kv_heads.is_multiple_of(tp) {
        return Err(err);
    }
    let kvt = m.num_kv_heads / tp;
    if !kvt.is_multiple_of(u) && u % kvt != 0 {
        return Err(err);
    }
    Ok((m.num_heads / (tp * u), kvt.max(u) / u))
}

/// [`head_split`] of a layout, then the check that `context` splits into its 2 x SP zigzag
/// chunks, in that order: the heads each rank holds (query, kv) or why the layout cannot run.
pub fn split_heads_and_context(
    m: &ModelSpec,
    l: &Layout,
    context: u64,
) -> Result<(u64, u64), Infeasible> {
    let heads = head_split(m, l.tp, l.ulysses)?;
    let zig = 2 * u64::from(l.sp());
    if !context.is_multiple_of(zig) {
        return Err(Infeasible::Divisibility {
            context,
            multiple: zig,
        });
    }
    Ok(heads)
}

/// The per-micro-batch building blocks of a step, shared by the analytic composition
/// ([`evaluate`]) and the discrete-event simulator (`crate::sim`). Times are seconds on one
/// rank; bytes are per rank.
#[derive(Debug, Clone)]
pub struct Terms {
    pub layout: Layout,
    pub zero_stage: u8,
    /// The recompute the runtime runs ([`runtime_recompute`]): [`Recompute::None`] or
    /// [`Recompute::OutsideAttention`], which keeps the attention's outputs, so a layer's
    /// attention (with its all-to-all and ring traffic) runs forward once either way.
    pub recompute: Recompute,
    pub layers: u64,
    pub accum: u64,
    /// One layer's forward GEMMs, and the QKV and output-projection shares of them.
    pub gemm_fwd_s: f64,
    pub qkv_share: f64,
    pub o_share: f64,
    /// One layer's forward attention (all ring steps together).
    pub attn_fwd_s: f64,
    /// The ring's own memory-bound work around its kernels in one layer's forward (block
    /// output merges, kv-head repeats) and backward (fp32 dQ and dK/dV accumulation, repeats
    /// and head sums), on its slowest rank, on the compute stream ([`ring::ring_merge`]); 0 for
    /// a ring of one.
    pub ring_merge_fwd_s: f64,
    pub ring_merge_bwd_s: f64,
    /// A third of one layer's memory-bound work per micro-batch: forward, backward and the
    /// fp32 accumulation of its weight gradients. The step builders charge it once to each
    /// forward pass and twice to the backward (so a layer's total is 3x this; the recompute
    /// outside attention is charged the same third again).
    pub elem_fwd_s: f64,
    /// Output head GEMM forward (whole) plus a third of the work outside the layers that is
    /// charged with it: the cross-entropy softmax over the vocabulary, the embedding gather and
    /// gradient scatter, and the fp32 accumulation of the embedding, head and final-norm
    /// gradients (the step builders charge 3x this for head forward + backward).
    pub head_fwd_s: f64,
    /// Ulysses all-to-all bytes per layer: q, k, v in, output back.
    pub a2a_qkv_bytes: f64,
    pub a2a_o_bytes: f64,
    /// K + V block a ring step forwards (backward moves 3x: K, V and fp32 dK, dV).
    pub ring_kv_bytes: f64,
    /// One tensor-parallel all-gather / reduce-scatter (full activation, bf16).
    pub tp_bytes: f64,
    /// Whole-model gradient bytes (fp32) and weight bytes (bf16) of the local shard.
    pub grad_bytes: f64,
    pub param_bytes: f64,
    /// The part of `param_bytes` in the decoder layers (the rest: embedding, final norm, head).
    /// ZeRO-3 gathers the layers twice per micro-batch and the rest once.
    pub layers_param_bytes: f64,
    /// bf16 bytes of the embedding unit (the table) and of the final unit (final norm, and the
    /// head when untied): `param_bytes - layers_param_bytes` split by the runtime's units.
    pub embed_param_bytes: f64,
    pub head_param_bytes: f64,
    /// Per step: zeroing the fp32 gradients, the AdamW update and the 16-bit weight cast.
    pub optimizer_s: f64,
    pub vision: Option<VisionStage>,
    pub memory: MemoryBreakdown,
    /// FLOPs of one step as MFU counts them ([`model_flops`]).
    pub model_flops: f64,
    /// FLOPs of one step the kernels execute ([`hardware_flops`]).
    pub hardware_flops: f64,
    pub tokens_per_step: f64,
}

impl Terms {
    /// Backward attention of one layer (FlashAttention-2 counting: 2.5x forward).
    pub fn attn_bwd_s(&self) -> f64 {
        self.attn_fwd_s * (ATTN_TRAIN_FACTOR - 1.0)
    }
    /// One layer's forward compute per micro-batch (GEMMs, attention, memory-bound work): what
    /// a ZeRO-3 gather prefetched during it can hide behind.
    pub fn layer_fwd_compute_s(&self) -> f64 {
        self.gemm_fwd_s + self.attn_fwd_s + self.ring_merge_fwd_s + self.elem_fwd_s
    }
    /// One layer's backward compute per micro-batch, with its recompute outside attention when
    /// it has one: what the reduce-scatter of the later unit and the prefetched gather of the
    /// earlier layer can hide behind.
    pub fn layer_bwd_compute_s(&self) -> f64 {
        let again = if self.recompute == Recompute::None {
            0.0
        } else {
            self.gemm_fwd_s + self.elem_fwd_s
        };
        2.0 * self.gemm_fwd_s
            + self.attn_bwd_s()
            + self.ring_merge_bwd_s
            + 2.0 * self.elem_fwd_s
            + again
    }
    /// One layer's ring merge work per micro-batch, forward and backward.
    pub fn ring_merge_s(&self) -> f64 {
        self.ring_merge_fwd_s + self.ring_merge_bwd_s
    }
    pub fn vision_s(&self) -> f64 {
        self.vision
            .map_or(0.0, |v| v.encoder_s + v.gather_s + v.reshard_s)
    }
}

/// Checks a candidate and computes its [`Terms`] (memory included), or says why it cannot run.
pub fn terms(topo: &Topology, w: &Workload, c: &Candidate) -> Result<Terms, Infeasible> {
    terms_checked(topo, w, c, true)
}

/// [`terms`] without the memory check against the GPU's HBM (the memory is still counted as
/// mmsp-runtime holds it): for engine profiles (`crate::engines`) that count memory by their
/// own rules and check it themselves.
pub fn terms_any_memory(topo: &Topology, w: &Workload, c: &Candidate) -> Result<Terms, Infeasible> {
    terms_checked(topo, w, c, false)
}

fn terms_checked(
    topo: &Topology,
    w: &Workload,
    c: &Candidate,
    check_memory: bool,
) -> Result<Terms, Infeasible> {
    let m = w.model;
    let l = &c.layout;
    let spec = &topo.spec;
    let sh = RankShape::new(w, c)?;
    // What the runtime runs: no recompute, or its recompute of each layer outside attention
    // (whatever else is asked), a choice under every ZeRO stage.
    let recompute = runtime_recompute(c.recompute);
    let (tp, h, tokens, layers) = (sh.tp, sh.h, sh.tokens, sh.layers);

    // ---- memory ----
    let act = activation_memory(m, l, &sh, recompute);
    let states = rank_model_states(m, c, tp);
    let (comm_buffers, kv_block) = attention_buffer_bytes(l, &sh);
    let vision = vision_per_micro_batch(w, sh.mb);
    let memory = rank_memory(&act, &states, comm_buffers, vision);
    if check_memory && memory.total_bytes > spec.hbm_bytes {
        return Err(Infeasible::Memory {
            needed: memory.total_bytes,
            available: spec.hbm_bytes,
        });
    }

    // ---- compute, per layer and micro-batch ----
    let gemm_fwd = layer_gemm_flops_fwd(m, tokens, tp);
    let (attn_fwd, attn_fwd_s) = attention_fwd(spec, w, &sh);
    let head_fwd = head_flops_fwd(m, tokens, tp);
    // The head's GEMMs run one loss chunk of rows at a time (the runtime's `chunked_loss`).
    let head_rate = spec.head_gemm_rate(tokens.min(LOSS_CHUNK_TOKENS));
    let mem_bound = memory_bound_times(spec, m, c, &sh, &states);
    let merge = ring::ring_merge(spec, &sh.ring_shape());
    let (gemm_fwd_s, qkv_share, o_share) = gemm_fwd_time(spec, m, &sh, gemm_fwd);
    let params_local = states.units.params;
    Ok(Terms {
        layout: *l,
        zero_stage: c.zero_stage,
        recompute,
        layers: m.num_layers,
        accum: sh.accum,
        gemm_fwd_s,
        qkv_share,
        o_share,
        // Forward alone runs at the fwd+bwd throughput in this model (one efficiency figure).
        attn_fwd_s,
        ring_merge_fwd_s: merge.fwd.s,
        ring_merge_bwd_s: merge.bwd.s,
        elem_fwd_s: mem_bound.layer_s,
        head_fwd_s: head_fwd / head_rate + mem_bound.outside_layers_s,
        // Ulysses: all-to-all of q, k, v before attention and of the output after, per layer
        // (Jacobs et al. 2023, DeepSpeed-Ulysses, Sec. 3.1); backward mirrors them.
        a2a_qkv_bytes: tokens * 2.0 * (sh.q_dim_local + 2.0 * sh.kv_dim_eff),
        a2a_o_bytes: tokens * 2.0 * sh.q_dim_local,
        ring_kv_bytes: 2.0 * kv_block * 2.0,
        tp_bytes: tokens * h * 2.0,
        grad_bytes: params_local * GRAD_BYTES,
        param_bytes: params_local * WEIGHT_BYTES,
        layers_param_bytes: layers * states.units.layer * WEIGHT_BYTES,
        embed_param_bytes: states.units.embedding * WEIGHT_BYTES,
        head_param_bytes: states.units.head * WEIGHT_BYTES,
        optimizer_s: mem_bound.optimizer_s + vision.map_or(0.0, |v| v.encoder_optimizer_s),
        vision,
        memory,
        model_flops: model_flops(
            f64::from(l.world()) * sh.accum as f64,
            layers,
            gemm_fwd,
            head_fwd,
            attn_fwd,
        ),
        hardware_flops: hardware_flops(
            f64::from(l.world()) * sh.accum as f64,
            layers,
            gemm_fwd,
            head_fwd,
            attn_fwd,
            recompute,
        ),
        tokens_per_step: (w.global_batch * w.context) as f64,
    })
}

/// A candidate's sizes on one rank: its heads after TP and Ulysses, the tokens it holds, its
/// accumulation steps, and the degrees and model sizes as floats for the formulas.
struct RankShape {
    q_heads_local: u64,
    kv_heads_local: u64,
    accum: u64,
    tp: f64,
    r: f64,
    sp: f64,
    mb: f64,
    s: f64,
    layers: f64,
    hd: f64,
    h: f64,
    /// Tokens each rank holds outside attention.
    tokens: f64,
    /// kv width each rank holds per local token, after Ulysses replication: max(kv/tp, u) heads.
    kv_dim_eff: f64,
    /// q width each rank holds per local token (= q_dim / tp).
    q_dim_local: f64,
}

impl RankShape {
    /// The shape of the rank's ring attention call: zigzag chunks of s / 2r tokens.
    fn ring_shape(&self) -> ring::RingShape {
        ring::RingShape {
            ring: self.r as u32,
            batch: self.mb,
            chunk: self.s / (2.0 * self.r),
            q_heads: self.q_heads_local as f64,
            kv_heads: self.kv_heads_local as f64,
            head_dim: self.hd,
        }
    }

    /// The shape, or why there is none, checked in this order: the heads split over TP x
    /// Ulysses, the context into 2 x SP zigzag chunks, the global batch into DP x micro-batches.
    fn new(w: &Workload, c: &Candidate) -> Result<RankShape, Infeasible> {
        let m = w.model;
        let l = &c.layout;
        let (q_heads_local, kv_heads_local) = split_heads_and_context(m, l, w.context)?;
        let seqs_per_dp = u64::from(l.dp) * u64::from(c.micro_batch);
        if !w.global_batch.is_multiple_of(seqs_per_dp) {
            return Err(Infeasible::Batch {
                global_batch: w.global_batch,
                dp: l.dp,
                micro_batch: c.micro_batch,
            });
        }
        let (tp, u, sp) = (f64::from(l.tp), f64::from(l.ulysses), f64::from(l.sp()));
        let (mb, s) = (f64::from(c.micro_batch), w.context as f64);
        let hd = m.head_dim as f64;
        Ok(RankShape {
            q_heads_local,
            kv_heads_local,
            accum: w.global_batch / seqs_per_dp,
            tp,
            r: f64::from(l.ring),
            sp,
            mb,
            s,
            layers: m.num_layers as f64,
            hd,
            h: m.hidden_size as f64,
            tokens: mb * s / sp,
            kv_dim_eff: (kv_heads_local as f64) * u * hd,
            q_dim_local: (q_heads_local as f64) * u * hd,
        })
    }
}

/// Activation memory per rank as mmsp-runtime holds it (bytes).
struct ActivationMemory {
    /// Every layer's kept activations, the embedding output and the loss's hidden-state buffers.
    activations: f64,
    /// The one live chunk of the loss's logits.
    logits: f64,
    /// The peak inside the last layer's backward beyond what the loss frees.
    backward_peak: f64,
}

/// The activations, logits and backward peak of one rank under the runtime's recompute.
fn activation_memory(
    m: &ModelSpec,
    l: &Layout,
    sh: &RankShape,
    recompute: Recompute,
) -> ActivationMemory {
    let (tp, s, h, tokens, layers) = (sh.tp, sh.s, sh.h, sh.tokens, sh.layers);
    let arch = ActivationArch {
        hidden: h,
        q_dim: m.q_dim() as f64,
        kv_dim: sh.kv_dim_eff * tp,
        ffn: m.intermediate_size as f64,
        heads: m.num_heads as f64,
        swiglu: true,
        dropout: false,
        flash: true,
    };
    let recomputes = recompute != Recompute::None;
    let per_tok = if recomputes {
        // The runtime's recompute outside attention (the only other `runtime_recompute`).
        layer_activation_bytes_per_token(&arch, s, tp, Recompute::OutsideAttention)
            + outside_attention_extra_bytes_per_token(&arch, l.ulysses, tp)
    } else {
        // What the runtime's graph holds without recompute.
        runtime_layer_activation_bytes_per_token(&arch, l.ulysses, tp)
    };
    // Kept activations of all layers, plus, under the recompute outside attention, the graph
    // that the layer in backward holds from its re-run forward
    // (`outside_attention_working_bytes_per_token`).
    let working = if recomputes {
        outside_attention_working_bytes_per_token(&arch, m.kv_dim() as f64, tp) * tokens
    } else {
        0.0
    };
    // Plus the embedding output (the first layer's input), and at the loss the final norm's
    // output and the gradient buffer of the shard's hidden states (2 bytes x h each; the
    // allocator timeline grows by these at the embedding and at the loss, runF).
    let activations = layers * per_tok * tokens + 3.0 * 2.0 * h * tokens / tp;
    // Logits: the loss is computed LOSS_CHUNK_TOKENS rows at a time with its gradient formed in
    // the same pass, so only one chunk's logits are ever live. At its peak the runtime holds the
    // 16-bit logits (2 B), their fp32 copy (4 B) and the fp32 log-probabilities (4 B) per
    // vocabulary entry (`chunked_loss`: ATen's log-softmax has no bf16-to-fp32 path on CUDA; the
    // 16-bit gradient is written after the logits are freed): 10 B, the 5.25 GB transient of a
    // 4096 x 128256 chunk the H100 timeline shows (runF). This is the chunked / fused linear
    // cross-entropy of Liger Kernel (Hsu et al. 2024, arXiv:2410.10989, Sec. 3.3); a loss over
    // the whole shard at once would hold tokens x V x 6 B or more.
    let logits = tokens.min(LOSS_CHUNK_TOKENS) * (m.vocab_size as f64 / tp) * 10.0;
    // Inside the last layer's backward: its recomputed graph (if any) and the backward's own
    // transient (`runtime_backward_transient_bytes_per_token`), the final norm's output gone.
    let bwd = runtime_backward_transient_bytes_per_token(&arch, tp) * tokens;
    let backward_peak = (working + bwd - 2.0 * h * tokens / tp).max(0.0);
    ActivationMemory {
        activations,
        logits,
        backward_peak,
    }
}

/// The model states of one rank: the runtime's units (parameters per TP rank), the ZeRO
/// shards, and the bytes of weights, gradients and optimizer states at the candidate's stage.
struct RankStates {
    units: StateUnits,
    shards: f64,
    weights: f64,
    gradients: f64,
    optimizer: f64,
}

/// [`RankStates`] of a candidate at tensor-parallel degree `tp`.
fn rank_model_states(m: &ModelSpec, c: &Candidate, tp: f64) -> RankStates {
    let l = &c.layout;
    let params_local = m.params() as f64 / tp;
    let layer_params_local = m.layer_params() as f64 / tp;
    let shards = f64::from(l.grad_family().size);
    // The runtime's units (`runtime/src/train/shards.rs`, `units`): the embedding table, each
    // layer, and the final norm with the head (untied; tied, the table is the head).
    let table = (m.vocab_size * m.hidden_size) as f64 / tp;
    let final_norm = m.hidden_size as f64 / tp;
    let units = StateUnits {
        params: params_local,
        layer: layer_params_local,
        embedding: table,
        head: final_norm + if m.tie_word_embeddings { 0.0 } else { table },
        tied: m.tie_word_embeddings,
    };
    let states = runtime_model_states(&units, c.zero_stage, shards);
    // ZeRO-0 casts the layers, the norms and the head to 16 bits but looks up the untied
    // embedding in the fp32 table itself (`Decoder::embed`), so that table has no 16-bit copy;
    // the sharded stages keep (or gather) every unit's bf16 weights, the table's included.
    let wb = if c.zero_stage == 0 && !m.tie_word_embeddings {
        states.weights - WEIGHT_BYTES * table
    } else {
        states.weights
    };
    let (gb, ob) = (states.gradients, states.optimizer);
    RankStates {
        units,
        shards,
        weights: wb,
        gradients: gb,
        optimizer: ob,
    }
}

/// Attention's communication and accumulation buffers per rank (bytes), and the elements of
/// K (or V) in one ring block.
fn attention_buffer_bytes(l: &Layout, sh: &RankShape) -> (f64, f64) {
    let (mb, s, r, hd, tokens) = (sh.mb, sh.s, sh.r, sh.hd, sh.tokens);
    let (q_heads_local, kv_heads_local, q_dim_local) =
        (sh.q_heads_local, sh.kv_heads_local, sh.q_dim_local);
    // Ring attention double-buffers the KV block in flight (send + receive), in backward with
    // fp32 dK/dV (ring-flash-attention accumulates them in fp32): 2 x (2 + 2 x 2) bytes per kv
    // element; fp32 accumulators for dQ, dK, dV of the ring rank's chunk.
    let kv_block = (mb * s / r) * kv_heads_local as f64 * hd; // elements of K (or V) per block
    let ring_buf = if l.ring > 1 {
        2.0 * 2.0 * kv_block * (2.0 + 4.0)
    } else {
        0.0
    };
    let acc = (mb * s / r) * hd * (q_heads_local as f64 + 2.0 * kv_heads_local as f64) * 4.0;
    // Ulysses all-to-all output staging: one q-sized tensor.
    let a2a_buf = if l.ulysses > 1 {
        tokens * q_dim_local * 2.0
    } else {
        0.0
    };
    let comm_buffers = ring_buf + acc + a2a_buf;
    (comm_buffers, kv_block)
}

/// The workload's vision stage per micro-batch of `mb` sequences.
fn vision_per_micro_batch(w: &Workload, mb: f64) -> Option<VisionStage> {
    // The vision stage runs once per sequence of the micro-batch.
    w.vision.map(|v| VisionStage {
        encoder_s: v.encoder_s * mb,
        encoder_gemm_s: v.encoder_gemm_s * mb,
        encoder_attention_s: v.encoder_attention_s * mb,
        encoder_memory_bound_s: v.encoder_memory_bound_s * mb,
        gather_s: v.gather_s * mb,
        reshard_s: v.reshard_s * mb,
        memory_bytes: v.memory_bytes * mb,
        ..v
    })
}

/// Memory per rank: the model states, the activations, the largest transient, the vision
/// stage's, fragmentation and the runtime's reserve; `total_bytes` is what must fit.
fn rank_memory(
    act: &ActivationMemory,
    states: &RankStates,
    comm_buffers: f64,
    vision: Option<VisionStage>,
) -> MemoryBreakdown {
    let (activations, logits, backward_peak) = (act.activations, act.logits, act.backward_peak);
    let (wb, gb, ob) = (states.weights, states.gradients, states.optimizer);
    let vision_mem = vision.map_or(0.0, |v| v.memory_bytes + v.states_bytes);
    // The loss's logits (between the last forward layer and the first backward one) and the
    // attention's communication and fp32 accumulation buffers (inside each layer's attention)
    // are never live together, so the peak holds the larger; the H100 timeline peaks at the
    // loss with every layer's activations held (runF).
    // A layer's backward (its recomputed graph and its transient) likewise comes after the
    // loss: short shards peak at the loss, long ones in the backward (one H200, 128K tokens,
    // runtime/bench/results/h200/raw/h200_runI/).
    let transient = logits.max(comm_buffers).max(backward_peak);
    let tensors = wb + gb + ob + activations + transient + vision_mem;
    let frag = FRAGMENTATION * tensors;
    let needed = tensors + frag + RUNTIME_RESERVE_BYTES;
    MemoryBreakdown {
        weights_bytes: wb,
        gradients_bytes: gb,
        optimizer_bytes: ob,
        activations_bytes: activations + backward_peak + vision_mem,
        logits_bytes: logits,
        comm_buffers_bytes: comm_buffers,
        reserved_bytes: RUNTIME_RESERVE_BYTES,
        fragmentation_bytes: frag,
        total_bytes: needed,
    }
}

/// Forward attention of one rank per layer and micro-batch: its FLOPs and its time over the
/// ring's zigzag steps at the measured kernel throughput.
fn attention_fwd(spec: &ClusterSpec, w: &Workload, sh: &RankShape) -> (f64, f64) {
    let m = w.model;
    let (mb, s, r, sp, tp, hd) = (sh.mb, sh.s, sh.r, sh.sp, sh.tp, sh.hd);
    let q_heads_local = sh.q_heads_local;
    // Attention work of the ring rank's zigzag chunks is balanced: 1/sp of the sequence's
    // causal work per rank (each of the micro-batch's sequences separately).
    let attn_scale = w.vision.map_or(1.0, |v| v.attention_scale);
    let attn_fwd = attn_scale * mb * attention_flops_fwd(m, s) / (sp * tp);
    // Attention kernel calls: a ring rank's S/R tokens (per sequence) with its q heads; step 0
    // is causal, every other zigzag step a full 2c x c block (tokens ~ (S/R)/sqrt 2). Equal
    // work per step; each step at its kernel's measured throughput (fwd+bwd rates, so the
    // forward share is 1/3.5 of the same time scale).
    let call_tokens = s / r;
    let heads_call = q_heads_local as f64;
    // The kernel computes at its padded head dimension (no change at 128, the calibration's).
    let step_flops = attn_fwd / r * attention_head_dim_padded(m.head_dim) as f64 / hd;
    let attn_fwd_s = step_flops / spec.attention_rate(heads_call, call_tokens, true)
        + (r - 1.0) * step_flops
            / spec.attention_rate(heads_call, call_tokens / 2f64.sqrt(), false);
    (attn_fwd, attn_fwd_s)
}

/// The memory-bound work's times: per layer (elementwise kernels and the weight-gradient
/// passes, forward-equivalent: a third of forward + backward), outside the layers (loss,
/// embedding, head), and the optimizer step.
struct MemoryBoundTimes {
    layer_s: f64,
    outside_layers_s: f64,
    optimizer_s: f64,
}

/// [`MemoryBoundTimes`] of one rank per micro-batch (the optimizer per step).
fn memory_bound_times(
    spec: &ClusterSpec,
    m: &ModelSpec,
    c: &Candidate,
    sh: &RankShape,
    states: &RankStates,
) -> MemoryBoundTimes {
    let (tp, h, tokens, q_dim_local) = (sh.tp, sh.h, sh.tokens, sh.q_dim_local);
    let (q_heads_local, kv_heads_local) = (sh.q_heads_local, sh.kv_heads_local);
    let (params_local, layer_params_local, shards) =
        (states.units.params, states.units.layer, states.shards);
    // Memory-bound work: bytes over the achieved HBM bandwidth (see `compute`).
    // Each group at the bandwidth of its typical kernel call: a residual add over the rank's
    // tokens (read two, write one h-wide tensor), the loss over a vocabulary shard, one weight
    // matrix's gradient, the optimizer over its whole shard.
    let bw = |bytes: f64, call: f64| bytes / hbm_rate(spec, call);
    let act_call = tokens * 3.0 * h * 2.0 / tp;
    // Streaming kernels at the streaming curve, layout copies at the layout curve, each at the
    // size of a typical call (an h-wide add; a q-wide transpose).
    let traffic = |t: Traffic, n: f64| {
        bw(n * t.stream, act_call) + n * t.layout / layout_rate(spec, tokens * q_dim_local * 4.0)
    };
    // The kernel call repeats kv heads up to its q heads when it has fewer (`Prepared`).
    let kv_expand = q_heads_local > kv_heads_local;
    let elem_fwd = traffic(layer_traffic_fwd(m, tp, kv_expand), tokens);
    let elem_bwd = traffic(layer_traffic_bwd(m, tp, kv_expand), tokens);
    // Weight gradients accumulate in fp32 every micro-batch; under ZeRO-2/3 into the shard
    // this rank keeps (after the reduce-scatter), else into the whole local gradient.
    let grad_held = if c.zero_stage >= 2 { 1.0 / shards } else { 1.0 };
    let matrix_call =
        (m.hidden_size * m.intermediate_size) as f64 / tp * grad_held * GRAD_ACCUMULATE_BYTES;
    // Per micro-batch the layer's fp32 weights are cast to 16 bits and, in backward, their
    // gradients brought back into the fp32 buffer.
    let layer_grad = bw(
        layer_params_local * (grad_held * GRAD_ACCUMULATE_BYTES + WEIGHT_CAST_BYTES),
        matrix_call,
    );
    // Outside the layers: the loss over the vocabulary, the embedding lookup and gradient
    // scatter, and the gradient accumulation of the embedding, head and final norm.
    let loss_call = tokens.min(LOSS_CHUNK_TOKENS) * (m.vocab_size as f64 / tp) * 6.0;
    let ce = cross_entropy_traffic(m, tp);
    let loss =
        bw(tokens * ce.stream, loss_call) + tokens * ce.layout / layout_rate(spec, loss_call);
    let embed = bw(tokens * embedding_bytes(m, tp), act_call);
    // The runtime accumulates the head's weight gradient in its GEMM's fp32 epilogue and the
    // embedding's by an indexed add (`chunked_loss`, `add_head_grad`; the embedding backward's
    // `index_put_`), so neither has an accumulation pass; the head's weights are cast to 16
    // bits once per micro-batch (the embedding rows are cast as gathered, in `embedding_bytes`).
    let head_params = (m.vocab_size * m.hidden_size) as f64 / tp;
    let other_grad = bw(head_params * WEIGHT_CAST_BYTES, matrix_call);
    // Per step: zero the fp32 gradients held, then the AdamW update and the 16-bit cast over
    // the optimizer shard.
    let opt_params = if c.zero_stage >= 1 {
        params_local / shards
    } else {
        params_local
    };
    let opt_bytes = opt_params * OPTIMIZER_STEP_BYTES + params_local * grad_held * GRAD_ZERO_BYTES;
    MemoryBoundTimes {
        layer_s: (elem_fwd + elem_bwd + layer_grad) / 3.0,
        outside_layers_s: (loss + embed + other_grad) / 3.0,
        optimizer_s: bw(opt_bytes, opt_bytes),
    }
}

/// Forward GEMM time per layer and micro-batch of `gemm_fwd` FLOPs, with the time shares of
/// the q/k/v and o projections.
fn gemm_fwd_time(
    spec: &ClusterSpec,
    m: &ModelSpec,
    sh: &RankShape,
    gemm_fwd: f64,
) -> (f64, f64, f64) {
    let (tokens, tp) = (sh.tokens, sh.tp);
    let hq = (m.hidden_size * m.q_dim()) as f64;
    let lp = m.layer_matmul_params() as f64;
    // Dense GEMMs at the rank's tokens; a mixture's routed experts at the rows each expert
    // gets (`expert_gemm_fwd`), the shares of q/k/v and o then by time.
    let (gemm_fwd_s, qkv_share, o_share) = match expert_gemm_fwd(m, tokens, tp) {
        None => (
            gemm_fwd / spec.gemm_rate(tokens),
            (hq + 2.0 * (m.hidden_size * m.kv_dim()) as f64) / lp,
            hq / lp,
        ),
        Some((expert_flops, rows)) => {
            let dense_s = (gemm_fwd - expert_flops) / spec.gemm_rate(tokens);
            let total = dense_s + expert_flops / spec.gemm_rate(rows);
            let per_param = dense_s / (lp - expert_flops / (2.0 * tokens / tp)) / total;
            (
                total,
                (hq + 2.0 * (m.hidden_size * m.kv_dim()) as f64) * per_param,
                hq * per_param,
            )
        }
    };
    (gemm_fwd_s, qkv_share, o_share)
}

/// Predicts one candidate on a topology, or says why it cannot run: the analytic composition
/// of its [`Terms`], with communication overlap assumed where the schedule allows it.
pub fn evaluate(topo: &Topology, w: &Workload, c: &Candidate) -> Result<Estimate, Infeasible> {
    let t = terms(topo, w, c)?;
    Ok(compose(topo, &t))
}

/// The analytic step time of a candidate's terms.
pub fn compose(topo: &Topology, t: &Terms) -> Estimate {
    let l = &t.layout;
    let spec = &topo.spec;
    let layers = t.layers as f64;
    let recomputes = t.recompute != Recompute::None;
    let gemm_t = GEMM_TRAIN_FACTOR * layers * t.gemm_fwd_s;
    let attn_t = layers * (t.attn_fwd_s + t.attn_bwd_s());
    // The ring's merges and accumulations run on the compute stream between its kernels.
    let merge_t = layers * t.ring_merge_s();
    let head_t = GEMM_TRAIN_FACTOR * t.head_fwd_s;
    let elem_t = 3.0 * layers * t.elem_fwd_s;
    // Recompute in backward, per layer: mmsp-runtime's recompute outside attention re-runs the
    // forward's GEMMs (QKV, output projection, MLP) and its memory-bound work (norms, RoPE,
    // SwiGLU, residual adds) but not attention, whose outputs are kept
    // (`runtime/src/train/mod.rs`: `pre_attention_with` and `post_attention_with` run again
    // before the layer's backward). Korthikanti et al.'s selective and whole-layer recompute
    // are not what the runtime runs, so no estimate is costed with them.
    let recompute_t = if recomputes {
        layers * (t.gemm_fwd_s + t.elem_fwd_s)
    } else {
        0.0
    };
    // Attention runs forward once (its outputs are kept under the recompute) and backward once.
    let uly = l.ulysses_family();
    let a2a_t = layers
        * 2.0
        * (topo.all_to_all(uly, t.a2a_qkv_bytes) + topo.all_to_all(uly, t.a2a_o_bytes));
    // Ring: ring-1 transfers of the KV block per layer, each overlapped with the attention of
    // one ring step (Liu et al. 2023, Ring Attention, Sec. 3); zigzag gives every step equal
    // work (ring-flash-attention's zigzag). Backward moves K, V and the fp32 dK, dV (3x the
    // bytes) against the backward step's compute.
    let (mut ring_t, mut ring_exposed) = (0.0, 0.0);
    if l.ring > 1 {
        let r = f64::from(l.ring);
        let ring = l.ring_family();
        // A step's window: its kernels and its share of the ring's own work on the compute
        // stream (in backward each step's accumulations; the forward's merges are spread so).
        let step_fwd = (t.attn_fwd_s + t.ring_merge_fwd_s) / r;
        let step_bwd = (t.attn_bwd_s() + t.ring_merge_bwd_s) / r;
        let c_fwd = topo.ring_p2p(ring, t.ring_kv_bytes);
        let c_bwd = topo.ring_p2p(ring, 3.0 * t.ring_kv_bytes);
        let steps = r - 1.0;
        ring_t = layers * steps * (c_fwd + c_bwd);
        ring_exposed = layers * steps * ((c_fwd - step_fwd).max(0.0) + (c_bwd - step_bwd).max(0.0));
    }
    // Megatron tensor + sequence parallel: 2 all-gathers and 2 reduce-scatters of the
    // activations per layer forward, mirrored in backward (Korthikanti et al. 2022, Sec. 4.2.2);
    // a recompute of the layer outside attention re-runs its forward's four as well.
    let tp_passes = 2.0 + if recomputes { 1.0 } else { 0.0 };
    let tp_t = if l.tp > 1 {
        layers * tp_passes * 4.0 * topo.all_gather(l.tp_family(), t.tp_bytes)
    } else {
        0.0
    };
    let micro =
        gemm_t + attn_t + merge_t + head_t + elem_t + recompute_t + a2a_t + ring_exposed + tp_t;

    // ---- gradients, ZeRO, optimizer (Rajbhandari et al. 2020, Sec. 7) ----
    let accum_f = t.accum as f64;
    let z = optimizer_collectives(topo, t);
    let vision_t = t.vision_s();
    let step = accum_f * (micro + vision_t) + z.grad_exposed + z.gather_exposed + t.optimizer_s;
    let (grad_sync, gather, grad_exposed, gather_exposed) =
        (z.grad, z.gather, z.grad_exposed, z.gather_exposed);
    let time = TimeBreakdown {
        gemm_s: accum_f * gemm_t,
        attention_s: accum_f * attn_t,
        ring_merge_s: accum_f * merge_t,
        elementwise_s: accum_f * elem_t,
        head_s: accum_f * head_t,
        recompute_s: accum_f * recompute_t,
        vision_s: accum_f * vision_t,
        ulysses_all_to_all_s: accum_f * a2a_t,
        ring_p2p_s: accum_f * ring_t,
        ring_exposed_s: accum_f * ring_exposed,
        tp_comm_s: accum_f * tp_t,
        grad_sync_s: grad_sync,
        grad_sync_exposed_s: grad_exposed,
        zero_gather_s: gather,
        zero_gather_exposed_s: gather_exposed,
        optimizer_s: t.optimizer_s,
    };
    let exposed = time.ulysses_all_to_all_s
        + time.ring_exposed_s
        + time.tp_comm_s
        + grad_exposed
        + gather_exposed;
    let total_comm =
        time.ulysses_all_to_all_s + time.ring_p2p_s + time.tp_comm_s + grad_sync + gather;
    Estimate {
        step_time_s: step,
        tokens_per_s: t.tokens_per_step / step,
        mfu: t.model_flops / (step * f64::from(l.world()) * spec.peak_flops),
        hfu: t.hardware_flops / (step * f64::from(l.world()) * spec.peak_flops),
        memory_per_gpu_bytes: t.memory.total_bytes,
        memory: t.memory.clone(),
        time,
        comm_exposed_s: exposed,
        comm_overlapped_s: (total_comm - exposed).max(0.0),
        grad_accum_steps: t.accum,
        model_flops: t.model_flops,
        hardware_flops: t.hardware_flops,
    }
}

/// The optimizer's collectives of one step, in seconds: the gradient reduction (all-reduce or
/// reduce-scatters) and the weight all-gathers, each in all and the part left exposed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OptimizerCollectives {
    pub grad: f64,
    pub grad_exposed: f64,
    pub gather: f64,
    pub gather_exposed: f64,
}

/// The time of one communication that may run beside `compute` seconds of compute on another
/// stream: (hidden, exposed) = (min(comm, compute), the rest).
fn overlap(comm: f64, compute: f64) -> (f64, f64) {
    let hidden = comm.min(compute.max(0.0));
    (hidden, comm - hidden)
}

/// The optimizer's collectives as mmsp-runtime runs them over the grad group (SP x DP ranks,
/// `runtime/src/train/shards.rs`), per unit (the embedding table, each layer, the final norm
/// with the head):
/// - ZeRO-0: the fp32 gradients all-reduced once after the whole backward of the step's last
///   micro-batch, exposed;
/// - ZeRO-1 and 2: in every micro-batch each unit's fp32 gradient is reduce-scattered as soon
///   as its backward is done, on the communication stream, overlapped with the backward of the
///   next (earlier) unit: the head's behind the last layer's backward, layer l's behind layer
///   l-1's; the first layer's and the embedding's have no backward left to hide behind and are
///   exposed. After the update the updated bf16 shards are all-gathered into the whole bf16
///   parameters (2 B per parameter), exposed (Megatron-Core's distributed optimizer does the
///   same: reduce-scatter of the gradient buckets overlapped with backward, all-gather of the
///   parameters after the step);
/// - ZeRO-3 (Zhao et al. 2023, PyTorch FSDP, Sec. 3.3: forward and backward prefetch of the
///   next unit's all-gather): the embedding table gathered for the lookup and the first layer
///   before its forward, exposed; layer l's gather prefetched during layer l-1's forward
///   (hidden up to that compute); the final norm and head gathered for the loss, exposed, and
///   the last layer's backward gather prefetched during the loss; in backward each layer's
///   gather prefetched during the later layer's backward, which also hides the reduce-scatter
///   of the layer after it (both share that window); the head's reduce-scatter, the first
///   layer's and the embedding's exposed. No parameter all-gather after the update.
///
/// The simulator (`crate::sim`) puts the same collectives on their own streams with these
/// dependencies, so the overlap (and contention with the ring's traffic) comes out of its
/// schedule.
pub fn optimizer_collectives(topo: &Topology, t: &Terms) -> OptimizerCollectives {
    let gf = t.layout.grad_family();
    let accum = t.accum as f64;
    let layers = t.layers;
    let layer_bf16 = t.layers_param_bytes / layers as f64;
    let grad_per_bf16 = GRAD_BYTES / WEIGHT_BYTES;
    let rs = |bf16: f64| topo.all_gather(gf, bf16 * grad_per_bf16);
    let ag = |bf16: f64| topo.all_gather(gf, bf16);
    let (rs_layer, rs_head, rs_embed) = (
        rs(layer_bf16),
        rs(t.head_param_bytes),
        rs(t.embed_param_bytes),
    );
    let bwd = t.layer_bwd_compute_s();
    let mut o = OptimizerCollectives::default();
    match t.zero_stage {
        0 => {
            o.grad = topo.all_reduce(gf, t.grad_bytes);
            o.grad_exposed = o.grad;
        }
        1 | 2 => {
            // Per micro-batch, in backward order: the head's behind the last layer, layer l's
            // behind layer l-1 (l >= 1), layer 0's and the embedding's exposed.
            let mut exposed = 0.0;
            for unit in 0..=layers {
                let comm = if unit == 0 { rs_head } else { rs_layer };
                let window = if unit < layers { bwd } else { 0.0 };
                exposed += overlap(comm, window).1;
            }
            exposed += rs_embed;
            o.grad = accum * (rs_head + layers as f64 * rs_layer + rs_embed);
            o.grad_exposed = accum * exposed;
            o.gather = ag(t.param_bytes);
            o.gather_exposed = o.gather;
        }
        _ => {
            let (g_layer, g_head, g_embed) = (
                ag(layer_bf16),
                ag(t.head_param_bytes),
                ag(t.embed_param_bytes),
            );
            let fwd = t.layer_fwd_compute_s();
            // Forward: the table and layer 0 exposed, layer l behind layer l-1's forward.
            let mut gather_exposed = g_embed + g_layer;
            for _ in 1..layers {
                gather_exposed += overlap(g_layer, fwd).1;
            }
            // The loss: the head gathered (exposed), the last layer's backward gather behind
            // the head's forward and backward, the head's reduce-scatter exposed.
            gather_exposed += g_head + overlap(g_layer, GEMM_TRAIN_FACTOR * t.head_fwd_s).1;
            let mut grad_exposed = rs_head;
            // Backward of layer l hides the gather of layer l-1 and the reduce-scatter of
            // layer l+1; what is left is split between them by their times.
            for l in (0..layers).rev() {
                let g = if l > 0 { g_layer } else { 0.0 };
                let r = if l + 1 < layers { rs_layer } else { 0.0 };
                let ex = overlap(g + r, bwd).1;
                if g + r > 0.0 {
                    gather_exposed += ex * g / (g + r);
                    grad_exposed += ex * r / (g + r);
                }
            }
            grad_exposed += rs_layer + rs_embed;
            o.gather = accum * (g_embed + g_head + 2.0 * layers as f64 * g_layer);
            o.gather_exposed = accum * gather_exposed;
            o.grad = accum * (rs_head + layers as f64 * rs_layer + rs_embed);
            o.grad_exposed = accum * grad_exposed;
        }
    }
    o
}

#[cfg(test)]
mod tests;
