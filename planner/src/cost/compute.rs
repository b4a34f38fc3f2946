//! Compute cost: FLOPs of the GEMMs and of causal attention per layer, and the time they take
//! at the GPU's achieved throughput (the efficiency profile of the cluster spec, measured
//! kernel figures by default), plus memory-bound elementwise work at achieved HBM bandwidth.

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

/// Forward FLOPs of the output head (logits) for `tokens` tokens.
pub fn head_flops_fwd(m: &ModelSpec, tokens: f64, tp: f64) -> f64 {
    2.0 * tokens * (m.hidden_size * m.vocab_size) as f64 / tp
}

/// Bytes moved by the memory-bound elementwise ops of one layer's forward, per token: the two
/// RMSNorms (read and write h each), RoPE on q and k (read and write), the SwiGLU product (read
/// gate and up, write the product) and the two residual adds (read 2h, write h). Roofline
/// accounting (Williams et al. 2009): time = bytes / achieved bandwidth. Backward moves about
/// twice as much.
pub fn layer_elementwise_bytes_fwd(m: &ModelSpec, tp: f64) -> f64 {
    let h = m.hidden_size as f64;
    let norms = 2.0 * (2.0 * h + 2.0 * h);
    let rope = 2.0 * 2.0 * (m.q_dim() + m.kv_dim()) as f64 / tp;
    let swiglu = 2.0 * 3.0 * m.intermediate_size as f64 / tp;
    let residual = 2.0 * 3.0 * 2.0 * h;
    norms + rope + swiglu + residual
}

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
    fn attention_flops_match_reference_counting() {
        // shared/reference: 32 heads x 128 at 8192 tokens, fwd 0.91 ms at 606 TFLOP/s.
        let m = ModelSpec::load("llama3-8b").unwrap();
        let f = attention_flops_fwd(&m, 8192.0);
        let tflops = f / 0.91e-3 / 1e12;
        assert!((tflops - 606.0).abs() < 5.0, "{tflops}");
    }
}
