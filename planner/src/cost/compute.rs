//! Compute cost: FLOPs of the GEMMs and of causal attention per layer, and the time they take
//! at the GPU's achieved throughput (the efficiency profile of the cluster spec, measured
//! kernel figures by default), plus memory-bound work (norms, RoPE, SwiGLU, residuals, the loss
//! softmax, the embedding, gradient accumulation and the optimizer) as bytes moved over the
//! achieved HBM bandwidth.

use super::memory::{GRAD_BYTES, OPTIMIZER_BYTES, WEIGHT_BYTES};
use crate::spec::cluster::ClusterSpec;
use crate::spec::model::ModelSpec;

/// Achieved fraction of nominal HBM bandwidth for streaming elementwise kernels: measured
/// device-to-device copy of 3.0 TB/s on an H100 with 3.35 TB/s nominal
/// (shared/reference/README.md).
pub const HBM_EFFICIENCY: f64 = 3.0 / 3.35;

/// Backward costs twice the forward for GEMMs (dX and dW), so fwd+bwd = 3x forward
/// (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
/// Using Megatron-LM", Sec. 5.1 / Appendix: 6 x params FLOPs per token for training).
pub const GEMM_TRAIN_FACTOR: f64 = 3.0;

/// FlashAttention's backward costs 2.5x its forward, so fwd+bwd = 3.5x forward (the counting
/// of FlashAttention-2, Dao 2023, Sec. 4.1, used by shared/reference/README.md).
pub const ATTN_TRAIN_FACTOR: f64 = 3.5;

/// Forward GEMM FLOPs of one layer for `tokens` tokens, split over `tp` tensor-parallel ranks:
/// 2 FLOPs per weight per token (Kaplan et al. 2020, Sec. 2.1).
pub fn layer_gemm_flops_fwd(m: &ModelSpec, tokens: f64, tp: f64) -> f64 {
    2.0 * tokens * m.layer_matmul_params() as f64 / tp
}

/// Forward FLOPs of causal attention of one layer over one sequence of `seq` tokens: QK^T and
/// PV are 2 * 2 * S^2 * (heads * head_dim) FLOPs, of which causality keeps half:
/// 2 * S^2 * H * D (FlashAttention-2, Dao 2023, Sec. 4.1 counting, halved for causal masks).
pub fn attention_flops_fwd(m: &ModelSpec, seq: f64) -> f64 {
    2.0 * seq * seq * m.q_dim() as f64
}

/// The head dimension an attention kernel computes with for heads of dimension `d`: `d`
/// rounded up to a multiple of 64. The calibrated attention curves are measured at head
/// dimension 128; a head dimension between tiles costs the next tile's time. Measured on an
/// H100 with the runtime's cuDNN attention (`mmsp-runtime calibrate` at head dimension 72, the
/// SigLIP so400m encoder's, against 128 at the same heads and tokens): 0.55-0.62 of the
/// 128-dimension FLOP rate counted at 72, i.e. the time of dimension 128 (72 / 128 = 0.56),
/// and the kernels PyTorch's scaled_dot_product_attention picks there are cuDNN's sm90 flash
/// kernels tiled 128 wide in the head dimension (`..._64x128x128`). Hopper flash-attention
/// kernels are built for a few head dimensions only (FlashAttention-3, Shah et al. 2024,
/// arXiv:2407.08608: 64, 128 and 256 in its first release).
pub fn attention_head_dim_padded(d: u64) -> u64 {
    d.max(1).div_ceil(64) * 64
}

/// Forward FLOPs of the output head (logits) for `tokens` tokens.
pub fn head_flops_fwd(m: &ModelSpec, tokens: f64, tp: f64) -> f64 {
    2.0 * tokens * (m.hidden_size * m.vocab_size) as f64 / tp
}

// ---- memory-bound work: bytes moved, at the achieved HBM bandwidth ----
//
// Roofline accounting (Williams et al. 2009, "Roofline: an insightful visual performance model
// for multicore architectures"): a kernel with little arithmetic per byte takes
// bytes / achieved bandwidth. Every count below is bytes read plus bytes written, one kernel
// per operator (each operator reads its inputs and writes its output once: RMSNorm, RoPE and
// the SwiGLU product as single fused kernels, as Megatron-LM / Apex / Transformer Engine run
// them), in the mixed-precision recipe of the memory model (`super::memory`): 16-bit
// activations and weights, fp32 gradients, fp32 master weights and Adam moments. Activation
// widths per token are those of Korthikanti et al. 2022, Sec. 4.1 (h for the residual stream
// and norm outputs, q + 2 kv for the attention inputs, the MLP's intermediate width f).

/// Bytes of one 16-bit activation element.
const ACT_BYTES: f64 = 2.0;

/// Achieved HBM bandwidth (bytes/s) of a memory-bound kernel call moving `bytes_per_call`:
/// the calibration's measured curve, else the cluster spec's nominal HBM bandwidth derated by
/// the measured copy efficiency [`HBM_EFFICIENCY`].
pub fn hbm_rate(spec: &ClusterSpec, bytes_per_call: f64) -> f64 {
    spec.calibration
        .as_ref()
        .and_then(|c| c.memory_bandwidth(bytes_per_call))
        .unwrap_or(spec.hbm_bytes_per_s * HBM_EFFICIENCY)
}

/// Bytes moved by the memory-bound ops of one layer's forward, per token (of the rank's
/// tokens; tensor + sequence parallelism splits every one of them `tp` ways, Korthikanti et
/// al. 2022, Sec. 4.2.2):
/// - two RMSNorms (Zhang & Sennrich 2019): read x, write the normalised x: 2 x (h + h);
/// - RoPE on q and k (Su et al. 2021): read and write q and k: 2 x (q + kv);
/// - the SwiGLU product silu(gate) * up (Shazeer 2020): read gate and up, write the product:
///   3f;
/// - two residual adds: read the stream and the branch, write the sum: 2 x 3h;
///
/// all at 2 bytes per element.
pub fn layer_elementwise_bytes_fwd(m: &ModelSpec, tp: f64) -> f64 {
    let h = m.hidden_size as f64;
    let norms = 2.0 * (h + h);
    let rope = 2.0 * (m.q_dim() + m.kv_dim()) as f64;
    let swiglu = 3.0 * m.intermediate_size as f64;
    let residual = 2.0 * 3.0 * h;
    ACT_BYTES * (norms + rope + swiglu + residual) / tp
}

/// Bytes moved by the backward of the ops of [`layer_elementwise_bytes_fwd`], per token:
/// - RMSNorm backward: read x and dy, write dx: 2 x 3h (the weight gradient is a reduction of
///   the same reads);
/// - RoPE backward (the inverse rotation of dq and dk): read and write: 2 x (q + kv);
/// - SwiGLU backward: read d(product), gate and up, write d(gate) and d(up): 5f;
/// - the residual stream's gradient joining each branch's input gradient: read two, write one:
///   2 x 3h (the stream's gradient passes through the add itself unchanged).
pub fn layer_elementwise_bytes_bwd(m: &ModelSpec, tp: f64) -> f64 {
    let h = m.hidden_size as f64;
    let norms = 2.0 * 3.0 * h;
    let rope = 2.0 * (m.q_dim() + m.kv_dim()) as f64;
    let swiglu = 5.0 * m.intermediate_size as f64;
    let residual = 2.0 * 3.0 * h;
    ACT_BYTES * (norms + rope + swiglu + residual) / tp
}

/// Bytes a selective recompute redoes per token and layer: the two RMSNorm outputs and the
/// SwiGLU product (the tensors [`super::memory::Recompute::Selective`] drops), read inputs and
/// write outputs as in their forward.
pub fn selective_recompute_bytes(m: &ModelSpec, tp: f64) -> f64 {
    let h = m.hidden_size as f64;
    ACT_BYTES * (2.0 * (h + h) + 3.0 * m.intermediate_size as f64) / tp
}

/// Bytes per token of the cross-entropy over the vocabulary (its shard of `vocab / tp` under
/// Megatron's vocab-parallel loss), forward and backward: the softmax is formed in fp32 from
/// the 16-bit logits the head GEMM wrote (read 2 bytes, write 4 bytes per entry: the fp32
/// buffer the memory model counts with the logits, 6 bytes per entry), and its backward reads
/// the fp32 probabilities and writes the 16-bit logit gradient, softmax - onehot (4 + 2 bytes
/// per entry; the onehot touches one entry per token). The online normaliser (Milakov &
/// Gimelshein 2018) lets the max and the sum share one read of the logits.
pub fn cross_entropy_bytes(m: &ModelSpec, tp: f64) -> f64 {
    let v = m.vocab_size as f64 / tp;
    v * (ACT_BYTES + 4.0) + v * (4.0 + ACT_BYTES)
}

/// Bytes per token of the embedding lookup and its gradient: forward gathers a row of the
/// 16-bit table and writes it (2 x h); backward reads the row's gradient and adds it into the
/// table's gradient (read dx, read and write the row: 3 x h).
pub fn embedding_bytes(m: &ModelSpec, tp: f64) -> f64 {
    let h = m.hidden_size as f64;
    ACT_BYTES * (2.0 * h + 3.0 * h) / tp
}

/// Bytes per step of zeroing the embedding table's 16-bit gradient before the scatter of
/// [`embedding_bytes`] (PyTorch's dense embedding backward writes the whole table).
pub fn embedding_grad_zero_bytes(m: &ModelSpec, tp: f64) -> f64 {
    ACT_BYTES * (m.vocab_size * m.hidden_size) as f64 / tp
}

/// Bytes per parameter, per micro-batch, of accumulating a weight gradient into the fp32
/// gradient buffer: read the 16-bit gradient the weight-gradient GEMM wrote, read and write
/// the fp32 accumulator (Megatron-LM's `main_grad.add_(grad)`; Micikevicius et al. 2018,
/// "Mixed Precision Training", Sec. 3.1: half-precision gradients, fp32 master update).
pub const GRAD_ACCUMULATE_BYTES: f64 = WEIGHT_BYTES + 2.0 * GRAD_BYTES;

/// Bytes per gradient element per step of zeroing the fp32 gradient buffer before the first
/// micro-batch accumulates into it.
pub const GRAD_ZERO_BYTES: f64 = GRAD_BYTES;

/// Bytes per parameter of the optimizer shard per step: the AdamW update (Loshchilov & Hutter
/// 2019, "Decoupled Weight Decay Regularization", Algorithm 2) reads the fp32 master weight,
/// gradient and both moments and writes the weight and both moments (4 x 4 + 3 x 4 bytes);
/// then the 16-bit working copy is cast from the updated master (read 4, write 2 bytes).
pub const OPTIMIZER_STEP_BYTES: f64 =
    (OPTIMIZER_BYTES + GRAD_BYTES) + OPTIMIZER_BYTES + (4.0 + WEIGHT_BYTES);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_flops_follow_six_n_rule() {
        let m = ModelSpec::load("llama3-8b").unwrap();
        let per_token_train = GEMM_TRAIN_FACTOR * layer_gemm_flops_fwd(&m, 1.0, 1.0);
        assert_eq!(per_token_train, 6.0 * m.layer_matmul_params() as f64);
    }

    #[test]
    fn memory_bound_bytes_are_counted_by_hand() {
        // llama3-8b: h 4096, q 4096, kv 1024, f 14336, vocab 128256.
        let m = ModelSpec::load("llama3-8b").unwrap();
        let (h, qkv, f) = (4096.0, 5120.0, 14336.0);
        // Forward: norms 4h, RoPE 2(q+kv), SwiGLU 3f, residuals 6h elements of 2 bytes.
        let fwd = 2.0 * (4.0 * h + 2.0 * qkv + 3.0 * f + 6.0 * h);
        assert_eq!(layer_elementwise_bytes_fwd(&m, 1.0), fwd);
        assert_eq!(layer_elementwise_bytes_fwd(&m, 4.0), fwd / 4.0);
        // Backward: norms 6h, RoPE 2(q+kv), SwiGLU 5f, residual joins 6h.
        let bwd = 2.0 * (6.0 * h + 2.0 * qkv + 5.0 * f + 6.0 * h);
        assert_eq!(layer_elementwise_bytes_bwd(&m, 1.0), bwd);
        // Loss: 2 + 4 bytes forward and 4 + 2 backward per vocabulary entry.
        assert_eq!(cross_entropy_bytes(&m, 1.0), 12.0 * 128256.0);
        assert_eq!(embedding_bytes(&m, 1.0), 10.0 * h);
        // AdamW reads p, g, m, v and writes p, m, v (fp32); the bf16 cast reads 4, writes 2.
        assert_eq!(OPTIMIZER_STEP_BYTES, 7.0 * 4.0 + 6.0);
        assert_eq!(GRAD_ACCUMULATE_BYTES, 10.0);
    }

    #[test]
    fn hbm_rate_falls_back_to_the_derated_spec() {
        let spec = ClusterSpec::load("pcie-l40s").unwrap();
        assert!(spec.calibration.is_none());
        assert_eq!(hbm_rate(&spec, 1e9), spec.hbm_bytes_per_s * HBM_EFFICIENCY);
    }

    #[test]
    fn attention_head_dims_pad_to_the_kernel_tile() {
        // SigLIP so400m's 72 runs as 128 (measured: 0.56-0.62 of the 128 rate counted at 72).
        assert_eq!(attention_head_dim_padded(72), 128);
        assert_eq!(attention_head_dim_padded(128), 128);
        assert_eq!(attention_head_dim_padded(64), 64);
        assert_eq!(attention_head_dim_padded(80), 128);
        assert_eq!(attention_head_dim_padded(0), 64);
    }

    #[test]
    fn attention_flops_match_reference_counting() {
        // shared/reference: 32 heads x 128 at 8192 tokens, fwd 0.91 ms at 606 TFLOP/s.
        let m = ModelSpec::load("llama3-8b").unwrap();
        let f = attention_flops_fwd(&m, 8192.0);
        let tflops = f / 0.91e-3 / 1e12;
        assert!((tflops - 606.0).abs() < 5.0, "{tflops}");
    }
}
