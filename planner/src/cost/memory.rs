//! Memory per GPU: weights, gradients and optimizer states under ZeRO stages, activations per
//! token per layer under each recompute policy, logits and loss buffers, communication buffers
//! and a runtime reserve, with an allocator fragmentation margin.
//!
//! Activation accounting follows Korthikanti et al. 2022, "Reducing Activation Recomputation
//! in Large Transformer Models", Sec. 4.1 and Table 2: every tensor a layer keeps for its
//! backward, in bytes per token. The general form below reduces exactly to their
//! `s*b*h*(34 + 5*a*s/h)` for a GPT layer (dropout, GeLU MLP of 4h, MHA, no FlashAttention);
//! for a Llama-style layer (no dropout, SwiGLU, GQA, FlashAttention) the score term becomes the
//! per-head log-sum-exp and the MLP keeps three intermediate tensors. Its selective and full
//! recompute forms are the paper's, kept as that reference: the cost model never uses them.
//!
//! mmsp-runtime has two behaviours, no recompute and its recompute of each layer outside
//! attention ([`Recompute::OutsideAttention`]), which it runs for every plan whose `recompute`
//! is not `none`, under every ZeRO stage (`runtime/src/train/run/mod.rs`,
//! `TrainPlan::recomputes`: any value but none; ZeRO-3 keeps a layer's graph across the release and
//! re-gather of its weights, `runtime/src/train/shards.rs`). So the planner searches exactly those two ([`Recompute::SEARCHED`]) and costs any other
//! request as the runtime runs it ([`runtime_recompute`]). The kept tensors and the working set
//! of the recomputed layer are counted from what the runtime's trainer holds
//! (`runtime/src/train/mod.rs`, `LayerState`; `runtime/src/ring.rs`, `RingCtx`;
//! `runtime/src/model/decoder.rs`, `pre_attention_with` / `post_attention_with`), see
//! [`layer_activation_bytes_per_token`] and [`outside_attention_working_bytes_per_token`].

/// Architecture features that change what a layer keeps for backward.
#[derive(Debug, Clone, Copy)]
pub struct ActivationArch {
    pub hidden: f64,
    pub q_dim: f64,
    /// K (or V) width held per token, after any kv-head replication for Ulysses.
    pub kv_dim: f64,
    pub ffn: f64,
    pub heads: f64,
    pub swiglu: bool,
    pub dropout: bool,
    pub flash: bool,
}

pub use mmsp_plan::predicted::{Recompute, SELECTIVE_REFUSED};

/// The recompute mmsp-runtime runs for a candidate that asks for `requested`, at every ZeRO
/// stage: [`Recompute::None`] when nothing is asked, else [`Recompute::OutsideAttention`], its
/// one recompute (`runtime/src/train/run/mod.rs`, `TrainPlan::recomputes`: any value but none). ZeRO-3
/// does not force it: the runtime keeps a layer's autograd graph across the release and
/// re-gather of its weights (`runtime/src/train/shards.rs`). Every estimate is costed with this.
pub fn runtime_recompute(requested: Recompute) -> Recompute {
    if requested != Recompute::None {
        Recompute::OutsideAttention
    } else {
        Recompute::None
    }
}

/// Bytes kept per token per layer for backward, at 2 bytes per element (16-bit), sharded `t`
/// ways by tensor + sequence parallelism (Korthikanti et al. 2022, Table 2, last row: every
/// term divided by t). `seq` is the attention length each query sees (only used without
/// FlashAttention). [`Recompute::None`], [`Recompute::Selective`] and [`Recompute::Full`] are
/// the paper's counts (the reference the unit tests reduce to Table 2; the cost model counts
/// no recompute as the runtime's graph holds it, [`runtime_layer_activation_bytes_per_token`]).
///
/// [`Recompute::OutsideAttention`] keeps what mmsp-runtime's `LayerState` holds under its
/// recompute (`runtime/src/train/mod.rs`): the layer input `x_in` (2h); the attention context
/// `RingCtx` (`runtime/src/ring.rs`): Q, K and V in the attention's layout (2q + 4kv, K and V
/// with any Ulysses replication of kv heads), the attention output (2q) and the fp32
/// log-sum-exp (4 bytes x heads); and the output `a` handed back to the sequence layout, a
/// tensor of its own (2q) only when a Ulysses all-to-all made it (`a_copy`; with one Ulysses
/// rank `head_to_seq` returns the attention output itself, `runtime/src/ulysses.rs`).
pub fn layer_activation_bytes_per_token(
    a: &ActivationArch,
    seq: f64,
    t: f64,
    recompute: Recompute,
) -> f64 {
    let h = a.hidden;
    // Attention block (Korthikanti Sec. 4.1): inputs of the QKV GEMM (2h), Q and K (2q + 2kv),
    // V (2kv), the attention output = input of the output projection (2q).
    let attn_gemm = 2.0 * h + 2.0 * a.q_dim + 4.0 * a.kv_dim + 2.0 * a.q_dim;
    // Score tensors: softmax output 2as, dropout mask as and output 2as without flash; with
    // FlashAttention only the fp32 log-sum-exp per head (4 bytes x heads).
    let core = if a.flash {
        4.0 * a.heads
    } else {
        (2.0 + if a.dropout { 3.0 } else { 0.0 }) * a.heads * seq
    };
    // MLP: its input (2h); GeLU keeps its input and output (2 x 2f); SwiGLU keeps gate and up
    // outputs and their product (3 x 2f).
    let mlp = 2.0 * h + if a.swiglu { 6.0 } else { 4.0 } * a.ffn;
    // The two norm inputs (2 x 2h) and, with dropout, two masks of 1 byte per element.
    let norms = 4.0 * h;
    let masks = if a.dropout { 2.0 * h } else { 0.0 };
    let all = attn_gemm + core + mlp + norms + masks;
    match recompute {
        Recompute::None => all / t,
        // Drop the two norm outputs (QKV and MLP inputs, 2h each) and the SwiGLU product (2f).
        Recompute::Selective => {
            let product = if a.swiglu { 2.0 * a.ffn } else { 0.0 };
            (all - 4.0 * h - product) / t
        }
        Recompute::Full => 2.0 * h / t,
        Recompute::OutsideAttention => {
            (2.0 * h + 2.0 * a.q_dim + 4.0 * a.kv_dim + 2.0 * a.q_dim + 4.0 * a.heads) / t
        }
    }
}

/// Bytes per token one layer keeps for backward without recompute as mmsp-runtime runs it
/// (16-bit elements, split `t` ways), counted from what its autograd graph and the trainer hold
/// (`runtime/src/train/mod.rs`, `LayerState` and `release_copied_roots`;
/// `runtime/src/model/decoder.rs`, `pre_attention_with` / `post_attention_with`;
/// `csrc/optim_shim.cpp`, `SwiGlu`; `runtime/src/ring.rs`, `RingCtx`) and matched by the
/// caching allocator's timeline of a step (`MMSP_MEM_TRACE=1`; H200:
/// `runtime/bench/results/h200/raw/h200_runI/timeline_*.txt`, 144.1 KB per token per layer
/// measured at 16K-64K tokens for the llama3-8b shape, 144.1 KB counted; before the two
/// savings below the H100 timeline `results/h100-sxm/raw/h100_runF_memory_timeline.txt`
/// measured 184.1 KB):
/// - before attention: the RMSNorm output the Q, K, V projections keep (2h); q, k, v after
///   RoPE stay only as the backward's roots, their storage released once the attention has
///   its dense copies;
/// - the attention context: q, k, v made contiguous in the attention's layout (2q + 4kv, kv
///   after any Ulysses replication), its output (2q) and the fp32 log-sum-exp (4 x heads); with
///   a Ulysses degree above one the output handed back to the sequence layout is a tensor of its
///   own (2q);
/// - after attention: the output made contiguous for the output projection (2q), the residual
///   sum the second RMSNorm keeps (2h), that norm's output (2h), gate and up kept by the
///   one-node SwiGLU (which recomputes silu(gate) in its backward) and their product kept by
///   the down projection (3 x 2f), and the layer output, the next layer's input (2h).
///
/// That is 8h + 6q + 4kv + 6f + 4 heads (+ 2q with Ulysses): for the llama3-8b shape 3% below
/// the textbook count of [`layer_activation_bytes_per_token`] (which keeps silu's output and
/// not the attention kernel's contiguous copies).
pub fn runtime_layer_activation_bytes_per_token(a: &ActivationArch, ulysses: u32, t: f64) -> f64 {
    let h = a.hidden;
    let pre = 2.0 * h;
    let ctx = 2.0 * a.q_dim + 4.0 * a.kv_dim + 2.0 * a.q_dim + 4.0 * a.heads;
    let a_copy = outside_attention_extra_bytes_per_token(a, ulysses, 1.0);
    let post = 2.0 * a.q_dim + 2.0 * h + 2.0 * h + 6.0 * a.ffn + 2.0 * h;
    (pre + ctx + a_copy + post) / t
}

/// Bytes per token (16-bit, split `t` ways) that a layer's backward holds for a moment beyond
/// what the layers keep, at its largest node, the one-node SwiGLU (`csrc/optim_shim.cpp`,
/// `SwiGlu::backward`): the gradient of the down projection's input (2f), and du and dg written
/// over their own temporaries (2f each), while the down projection's saved input is already
/// freed (-2f): 4f. The attention backward's dq, dk, dv and its output-gradient copies are
/// smaller for every model here. It competes with the loss's chunk transient for the step's
/// peak: at a layer's backward the final norm's output and the logits chunk are gone.
pub fn runtime_backward_transient_bytes_per_token(a: &ActivationArch, t: f64) -> f64 {
    4.0 * a.ffn / t
}

/// Whether the attention output `a` that [`Recompute::OutsideAttention`] keeps is a tensor of its
/// own besides the attention context's: with a Ulysses degree above one the all-to-all back to
/// the sequence layout writes a new tensor (`runtime/src/ulysses.rs`, `head_to_seq`).
pub fn outside_attention_extra_bytes_per_token(a: &ActivationArch, ulysses: u32, t: f64) -> f64 {
    if ulysses > 1 {
        2.0 * a.q_dim / t
    } else {
        0.0
    }
}

/// Bytes per token (16-bit, split `t` ways) of the graph one layer holds while it is in
/// backward under [`Recompute::OutsideAttention`]: its forward outside attention re-run with
/// autograd (`runtime/src/train/mod.rs`, backward loop; `runtime/src/model/decoder.rs`):
/// - `pre_attention_with`: the RMSNorm output that the Q, K and V projections keep (2h) and the
///   q, k, v it returns, after RoPE, in the sequence layout with the model's kv heads
///   (2q + 4 `kv_model`);
/// - `post_attention_with`: the attention output made contiguous for the output projection
///   (2q), the residual sum the second RMSNorm keeps (2h), that norm's output kept by the gate
///   and up projections (2h), gate and up kept by the one-node SwiGLU (4f), the product kept
///   by the down projection (2f), and the layer output `y` that the backward is seeded from
///   (2h).
///
/// That is 8h + 4q + 4kv + 6f bytes; the layer's kept tensors
/// ([`layer_activation_bytes_per_token`]) are counted besides.
pub fn outside_attention_working_bytes_per_token(a: &ActivationArch, kv_model: f64, t: f64) -> f64 {
    let h = a.hidden;
    let pre = 2.0 * h + 2.0 * a.q_dim + 4.0 * kv_model;
    let post = 2.0 * a.q_dim + 2.0 * h + 2.0 * h + 6.0 * a.ffn + 2.0 * h;
    (pre + post) / t
}

pub use mmsp_plan::MemoryBreakdown;

/// CUDA context, cuBLAS/cuDNN workspaces and NCCL internal buffers, per GPU. An assumption
/// (about what a PyTorch + NCCL process holds before its first tensor), to be replaced by a
/// calibration; the GPU machine reports 78 GiB usable of an 80 GiB H100.
pub const RUNTIME_RESERVE_BYTES: f64 = 2.0 * 1024.0 * 1024.0 * 1024.0;

/// Caching-allocator fragmentation margin on top of what tensors need (assumption: 5%).
pub const FRAGMENTATION: f64 = 0.05;

/// Token rows of the cross-entropy computed at a time (the runtime's `LOSS_CHUNK`): only one
/// chunk's logits are live, whatever the tokens per GPU.
pub const LOSS_CHUNK_TOKENS: f64 = 4096.0;

/// Bytes per parameter in mixed-precision Adam training (shared/reference/README.md; Rajbhandari
/// et al. 2020, ZeRO, Sec. 3.1 with fp32 gradients): bf16 weights, fp32 gradients, fp32 master
/// weights and two fp32 Adam moments.
pub const WEIGHT_BYTES: f64 = 2.0;
pub const GRAD_BYTES: f64 = 4.0;
pub const OPTIMIZER_BYTES: f64 = 12.0;

/// The units mmsp-runtime shards and gathers its parameters by (`runtime/src/train/shards.rs`,
/// `units`): the embedding table, each decoder layer, and the final norm with the head (the
/// head only when untied; tied, the table is the head). Parameter counts per tensor-parallel
/// rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateUnits {
    /// All parameters.
    pub params: f64,
    /// One decoder layer.
    pub layer: f64,
    /// The embedding table.
    pub embedding: f64,
    /// The final norm, with the head when untied.
    pub head: f64,
    /// Whether the head is the embedding table.
    pub tied: bool,
}

/// Model states per GPU as mmsp-runtime keeps them, by category: the 16-bit working weights
/// (whole, or gathered per use), the fp32 gradients (whole or this rank's shard, with the
/// transient gradients of the units in backward) and the optimizer state (fp32 master weights
/// and both Adam moments, whole or sharded).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ModelStates {
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
}

impl ModelStates {
    pub fn total(&self) -> f64 {
        self.weights + self.gradients + self.optimizer
    }
}

/// Model states per GPU as mmsp-runtime keeps them under ZeRO stage `zero` over the grad group
/// of `shards` = SP x DP ranks (`runtime/src/train/shards.rs`, `adamw.rs`), fp32 masters, bf16
/// compute. Bytes per parameter (P all parameters, L one layer's, E the embedding table's, H
/// the final norm and head's):
/// - ZeRO-0: bf16 working copies (2), fp32 gradients (4), fp32 masters and both Adam moments
///   (12): 18 P;
/// - ZeRO-1, Megatron-Core's distributed optimizer ("Distributed Optimizer" in the
///   Megatron-Core developer guide: 6 + 12/d bytes per parameter with bf16 parameters and fp32
///   gradients): bf16 parameters whole (2), the fp32 gradient buffer whole (4), masters and
///   moments sharded (12/N); transient: the bf16 weight gradients of the layer in backward
///   (2 L). 6 P + 12 P/N + 2 L;
/// - ZeRO-2 (Rajbhandari et al. 2020, ZeRO, Sec. 5.2: gradients partitioned as well): bf16
///   parameters whole (2), masters, gradient shard and moments sharded (16/N); transient: each
///   unit's full fp32 gradient vector from its backward until its reduce-scatter finishes, at
///   most two units at once (the reduce-scatter of one unit is in flight while the next,
///   earlier one runs its backward: adjacent units in backward order, head and last layer,
///   two layers, first layer and embedding), plus the bf16 weight gradients of one layer:
///   2 P + 16 P/N + 4 max(H + L, 2L, L + E) + 2 L;
/// - ZeRO-3 (Rajbhandari et al. 2020, Sec. 5.3; its prefetch window as in Zhao et al. 2023,
///   PyTorch FSDP, Sec. 3.3 and 4.2, forward and backward prefetch of one unit): 16 P/N
///   persistent, and a transient window of **two gathered layers** at once (the one computing
///   and the next, prefetched), with the bf16 weight gradients of one layer and the fp32
///   gradients of two layers in flight: 2 x 2 L + 2 L + 2 x 4 L = 14 L in backward; at the
///   embedding lookup the table gathered (2 E; tied, it stays gathered until the loss, beside
///   the forward's two-layer window, 2 E + 4 L); at the loss the final norm and head gathered
///   with their fp32 gradient (6 H; tied, the table's 6 E). The window counted is the largest
///   of these.
///
/// The caller adds the activations and the other transients; the window is counted beside them
/// (its phases are not told apart from the loss's or a layer's working set).
pub fn runtime_model_states(u: &StateUnits, zero: u8, shards: f64) -> ModelStates {
    let p = u.params;
    match zero {
        0 => ModelStates {
            weights: WEIGHT_BYTES * p,
            gradients: GRAD_BYTES * p,
            optimizer: OPTIMIZER_BYTES * p,
        },
        1 => ModelStates {
            weights: WEIGHT_BYTES * p,
            gradients: GRAD_BYTES * p + WEIGHT_BYTES * u.layer,
            optimizer: OPTIMIZER_BYTES * p / shards,
        },
        2 => {
            let in_flight = (u.head + u.layer)
                .max(2.0 * u.layer)
                .max(u.layer + u.embedding);
            ModelStates {
                weights: WEIGHT_BYTES * p,
                gradients: GRAD_BYTES * p / shards
                    + GRAD_BYTES * in_flight
                    + WEIGHT_BYTES * u.layer,
                optimizer: OPTIMIZER_BYTES * p / shards,
            }
        }
        _ => {
            let w = zero3_window(u);
            ModelStates {
                weights: w.weights,
                gradients: GRAD_BYTES * p / shards + w.gradients,
                optimizer: OPTIMIZER_BYTES * p / shards,
            }
        }
    }
}

/// The transient part of ZeRO-3's model states (see [`runtime_model_states`]): the largest of
/// the backward's two-layer window (gathered bf16 weights of two layers, one layer's bf16
/// weight gradients, two layers' fp32 gradients), the embedding lookup's gathered table (tied:
/// held through the forward's two-layer window) and the loss's gathered head with its fp32
/// gradient, as (16-bit weights, gradients).
pub fn zero3_window(u: &StateUnits) -> ModelStates {
    let l = u.layer;
    let backward = (
        2.0 * WEIGHT_BYTES * l,
        WEIGHT_BYTES * l + 2.0 * GRAD_BYTES * l,
    );
    let lookup = if u.tied {
        (WEIGHT_BYTES * (u.embedding + 2.0 * l), 0.0)
    } else {
        (WEIGHT_BYTES * u.embedding, 0.0)
    };
    let head = if u.tied { u.embedding } else { u.head };
    let loss = (WEIGHT_BYTES * head, GRAD_BYTES * head);
    let (weights, gradients) = [backward, lookup, loss]
        .into_iter()
        .max_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)))
        .unwrap_or_default();
    ModelStates {
        weights,
        gradients,
        optimizer: 0.0,
    }
}

/// Model states per GPU under ZeRO stage `zero` with states sharded over `shards` ranks
/// (Rajbhandari et al. 2020, Sec. 5: stage 1 shards optimizer states, 2 also gradients, 3 also
/// weights). `layer_params` sizes the gathered-weight and gradient buckets of stage 3.
pub fn model_states(params: f64, layer_params: f64, zero: u8, shards: f64) -> (f64, f64, f64) {
    let w = if zero >= 3 {
        WEIGHT_BYTES * (params / shards + 2.0 * layer_params)
    } else {
        WEIGHT_BYTES * params
    };
    let g = if zero >= 2 {
        GRAD_BYTES * (params / shards + layer_params)
    } else {
        GRAD_BYTES * params
    };
    let o = if zero >= 1 {
        OPTIMIZER_BYTES * params / shards
    } else {
        OPTIMIZER_BYTES * params
    };
    (w, g, o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt(h: f64, a: f64, flash: bool) -> ActivationArch {
        ActivationArch {
            hidden: h,
            q_dim: h,
            kv_dim: h,
            ffn: 4.0 * h,
            heads: a,
            swiglu: false,
            dropout: true,
            flash,
        }
    }

    /// Korthikanti et al. 2022, Table 2: no parallelism sbh(34 + 5as/h); tensor + sequence
    /// parallel sbh/t (34 + 5as/h); full recompute 2sbh.
    #[test]
    fn reduces_to_korthikanti_table_2() {
        // GPT-3 175B shapes from their Table 3: h = 12288, a = 96, s = 2048, t = 8.
        let (h, a, s, t) = (12288.0, 96.0, 2048.0, 8.0);
        let arch = gpt(h, a, false);
        let none = layer_activation_bytes_per_token(&arch, s, 1.0, Recompute::None);
        assert_eq!(none, h * (34.0 + 5.0 * a * s / h));
        let tsp = layer_activation_bytes_per_token(&arch, s, t, Recompute::None);
        assert_eq!(tsp, h / t * (34.0 + 5.0 * a * s / h));
        let full = layer_activation_bytes_per_token(&arch, s, 1.0, Recompute::Full);
        assert_eq!(full, 2.0 * h);
        // Per layer for one 2048-token sequence, b = 1, no parallelism: hand-computed.
        let per_layer = none * s;
        assert_eq!(
            per_layer,
            2048.0 * 12288.0 * 34.0 + 5.0 * 96.0 * 2048.0 * 2048.0
        );
    }

    #[test]
    fn flash_removes_the_score_term() {
        let (h, a) = (4096.0, 32.0);
        let f = layer_activation_bytes_per_token(&gpt(h, a, true), 1e6, 1.0, Recompute::None);
        assert_eq!(f, 34.0 * h + 4.0 * a);
    }

    #[test]
    fn recompute_orders_memory() {
        let arch = ActivationArch {
            hidden: 4096.0,
            q_dim: 4096.0,
            kv_dim: 1024.0,
            ffn: 14336.0,
            heads: 32.0,
            swiglu: true,
            dropout: false,
            flash: true,
        };
        let b = |r| layer_activation_bytes_per_token(&arch, 0.0, 1.0, r);
        assert_eq!(
            b(Recompute::None),
            8.0 * 4096.0 + 4.0 * 4096.0 + 4.0 * 1024.0 + 6.0 * 14336.0 + 4.0 * 32.0
        );
        assert!(b(Recompute::Full) < b(Recompute::Selective));
        assert!(b(Recompute::Selective) < b(Recompute::None));
    }

    #[test]
    fn runtime_layer_matches_the_measured_timeline() {
        // llama3-8b shape, one Ulysses rank: 8h + 6q + 4kv + 6f + 4 heads bytes per token,
        // 144.1 KB per token per layer in the H200 allocator timeline (runI).
        let arch = ActivationArch {
            hidden: 4096.0,
            q_dim: 4096.0,
            kv_dim: 1024.0,
            ffn: 14336.0,
            heads: 32.0,
            swiglu: true,
            dropout: false,
            flash: true,
        };
        let b = runtime_layer_activation_bytes_per_token(&arch, 1, 1.0);
        assert_eq!(
            b,
            8.0 * 4096.0 + 6.0 * 4096.0 + 4.0 * 1024.0 + 6.0 * 14336.0 + 4.0 * 32.0
        );
        assert!((b / 1024.0 - 144.1).abs() < 0.2, "{}", b / 1024.0);
        // Ulysses adds the output's copy back in the sequence layout.
        let u = runtime_layer_activation_bytes_per_token(&arch, 2, 1.0);
        assert_eq!(u - b, 2.0 * 4096.0);
        assert!(b > layer_activation_bytes_per_token(&arch, 0.0, 1.0, Recompute::None));
    }

    /// llama3-8b's units (untied): 32 layers of 218.1M, a 525.3M table, a 525.3M head.
    fn llama3_8b_units() -> StateUnits {
        let (h, v, f, kv) = (4096.0, 128256.0, 14336.0, 1024.0);
        let layer = 2.0 * h * h + 2.0 * h * kv + 3.0 * h * f + 2.0 * h;
        let table = v * h;
        StateUnits {
            params: 32.0 * layer + 2.0 * table + h,
            layer,
            embedding: table,
            head: table + h,
            tied: false,
        }
    }

    #[test]
    fn zero0_keeps_18_bytes_per_parameter() {
        let u = llama3_8b_units();
        assert_eq!(runtime_model_states(&u, 0, 64.0).total(), 18.0 * u.params);
    }

    /// Megatron-Core's distributed optimizer: 6 + 12/d B per parameter (bf16 parameters and
    /// fp32 gradients whole, masters and moments sharded), plus one layer's bf16 gradients.
    #[test]
    fn zero1_is_the_distributed_optimizers_6_plus_12_over_n() {
        let u = llama3_8b_units();
        for n in [1.0, 2.0, 8.0, 256.0] {
            let s = runtime_model_states(&u, 1, n);
            assert_eq!(s.weights, 2.0 * u.params);
            assert_eq!(s.gradients, 4.0 * u.params + 2.0 * u.layer);
            assert_eq!(s.optimizer, 12.0 * u.params / n);
            let want = (6.0 + 12.0 / n) * u.params + 2.0 * u.layer;
            assert!((s.total() - want).abs() <= 1e-9 * want, "N = {n}");
        }
    }

    /// ZeRO-2: 2 + 16/N B per parameter, plus two units' fp32 gradients in flight (for
    /// llama3-8b the head's and the last layer's, the largest adjacent pair) and one layer's
    /// bf16 gradients.
    #[test]
    fn zero2_is_2_plus_16_over_n_and_two_units_in_flight() {
        let u = llama3_8b_units();
        for n in [2.0, 16.0, 256.0] {
            let s = runtime_model_states(&u, 2, n);
            assert_eq!(s.weights, 2.0 * u.params);
            let want = (2.0 + 16.0 / n) * u.params + 4.0 * (u.head + u.layer) + 2.0 * u.layer;
            assert!((s.total() - want).abs() <= 1e-9 * want, "N = {n}");
        }
        // A model whose layers outweigh its head and table: two layers in flight.
        let big = StateUnits {
            layer: 2.0 * u.head,
            ..u
        };
        let s = runtime_model_states(&big, 2, 8.0);
        let want = (2.0 + 2.0) * big.params + 4.0 * 2.0 * big.layer + 2.0 * big.layer;
        assert!((s.total() - want).abs() <= 1e-9 * want);
    }

    /// ZeRO-3: 16/N B per parameter and the window: two gathered layers (2 x 2 B), one layer's
    /// bf16 gradients (2 B) and two layers' fp32 gradients (2 x 4 B): 14 B x layer; or at the
    /// loss the head gathered with its fp32 gradient (6 B x head); or the table at the lookup.
    #[test]
    fn zero3_is_16_over_n_plus_the_two_layer_window() {
        let u = llama3_8b_units();
        let n = 256.0;
        let s = runtime_model_states(&u, 3, n);
        assert_eq!(s.optimizer, 12.0 * u.params / n);
        let window = (14.0 * u.layer).max(6.0 * u.head).max(2.0 * u.embedding);
        let want = 16.0 * u.params / n + window;
        assert!((s.total() - want).abs() <= 1e-9 * want);
        // llama3-8b: the loss's head (6 x 525.3M = 3.15 GB) just outweighs the layers'
        // window (14 x 218.1M = 3.05 GB).
        assert_eq!(window, 6.0 * u.head);
        // Layers larger than the head: the two-layer window itself.
        let big = StateUnits { layer: u.head, ..u };
        let w = zero3_window(&big);
        assert_eq!(w.weights, 2.0 * 2.0 * big.layer);
        assert_eq!(w.gradients, 2.0 * big.layer + 2.0 * 4.0 * big.layer);
        // Tied: the table stays gathered through the forward and is the head at the loss.
        let tied = StateUnits {
            tied: true,
            head: 4096.0,
            ..u
        };
        assert_eq!(zero3_window(&tied).total(), 6.0 * tied.embedding);
    }

    #[test]
    fn recompute_is_a_choice_at_every_stage() {
        assert_eq!(runtime_recompute(Recompute::None), Recompute::None);
        for rc in [
            Recompute::Selective,
            Recompute::Full,
            Recompute::OutsideAttention,
        ] {
            assert_eq!(runtime_recompute(rc), Recompute::OutsideAttention);
        }
    }

    #[test]
    fn zero_stages_shard_more_states() {
        let p = 8e9;
        let totals: Vec<f64> = (0..=3)
            .map(|z| {
                let (w, g, o) = model_states(p, 2e8, z, 64.0);
                w + g + o
            })
            .collect();
        assert_eq!(totals[0], 18.0 * p);
        assert!(totals.windows(2).all(|w| w[1] < w[0]), "{totals:?}");
    }
}
