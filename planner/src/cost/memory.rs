//! Memory per GPU: weights, gradients and optimizer states under ZeRO stages, activations per
//! token per layer under each recompute policy, logits and loss buffers, communication buffers
//! and a runtime reserve, with an allocator fragmentation margin.
//!
//! Activation accounting follows Korthikanti et al. 2022, "Reducing Activation Recomputation
//! in Large Transformer Models", Sec. 4.1 and Table 2: every tensor a layer keeps for its
//! backward, in bytes per token. The general form below reduces exactly to their
//! `s*b*h*(34 + 5*a*s/h)` for a GPT layer (dropout, GeLU MLP of 4h, MHA, no FlashAttention);
//! for a Llama-style layer (no dropout, SwiGLU, GQA, FlashAttention) the score term becomes the
//! per-head log-sum-exp and the MLP keeps three intermediate tensors.

use serde::Serialize;

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

/// How much of a layer's activations are kept rather than recomputed in backward.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep everything.
    None,
    /// Recompute the cheap, memory-bound tensors: the RMSNorm outputs (GEMM inputs) and the
    /// SwiGLU product; keep every GEMM and attention output.
    Selective,
    /// Keep only each layer's input and recompute the whole layer (Korthikanti et al. 2022,
    /// Sec. 4.1: 2*s*b*h per layer).
    Full,
}

impl Recompute {
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];

    pub fn as_str(&self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

/// Bytes kept per token per layer for backward, at 2 bytes per element (16-bit), sharded `t`
/// ways by tensor + sequence parallelism (Korthikanti et al. 2022, Table 2, last row: every
/// term divided by t). `seq` is the attention length each query sees (only used without
/// FlashAttention).
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
    }
}

/// Memory per GPU, in bytes, by category.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryBreakdown {
    pub weights_bytes: f64,
    pub gradients_bytes: f64,
    pub optimizer_bytes: f64,
    pub activations_bytes: f64,
    pub logits_bytes: f64,
    pub comm_buffers_bytes: f64,
    pub reserved_bytes: f64,
    pub fragmentation_bytes: f64,
    pub total_bytes: f64,
}

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
