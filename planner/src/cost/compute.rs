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

/// Causal attention's forward + backward as MFU counts it: 3x the forward, as for a GEMM
/// (Chowdhery et al. 2022, PaLM, Appendix B: 6N + 12LHQT model FLOPs per token, whose
/// attention term 12LHQT is 3 x the forward's 4LHQT of QK^T and AV; Megatron-LM and NeMo
/// count causal attention as half of that, as [`attention_flops_fwd`] does), not the 3.5x
/// FlashAttention-2 executes ([`ATTN_TRAIN_FACTOR`]), which counts towards HFU and step time.
pub const ATTN_MODEL_FACTOR: f64 = 3.0;

/// Forward GEMM FLOPs of one layer for `tokens` tokens, split over `tp` tensor-parallel ranks:
/// 2 FLOPs per weight per token (Kaplan et al. 2020, Sec. 2.1).
pub fn layer_gemm_flops_fwd(m: &ModelSpec, tokens: f64, tp: f64) -> f64 {
    2.0 * tokens * m.layer_matmul_params() as f64 / tp
}

/// Of a mixture of experts' forward GEMM FLOPs of one layer for `tokens` tokens split `tp`
/// ways: the routed experts' share and the rows each expert's GEMM gets, tokens x experts per
/// token / experts on average (the balanced routing the auxiliary load-balancing loss aims at:
/// Fedus et al. 2022, Switch Transformers, Sec. 2.2; Megatron-Core and vLLM run the experts as
/// one grouped GEMM of that many rows each). None without experts.
pub fn expert_gemm_fwd(m: &ModelSpec, tokens: f64, tp: f64) -> Option<(f64, f64)> {
    let e = m.moe.as_ref()?;
    let k = e.experts_per_token as f64;
    let routed = 3.0 * (m.hidden_size * e.expert_intermediate_size) as f64 * k;
    let flops = 2.0 * tokens * routed / tp;
    Some((flops, tokens * k / e.num_experts as f64))
}

/// Forward FLOPs of causal attention of one layer over one sequence of `seq` tokens: QK^T and
/// PV are 2 * 2 * S^2 * (heads * head_dim) FLOPs, of which causality keeps half:
/// 2 * S^2 * H * D (FlashAttention-2, Dao 2023, Sec. 4.1 counting, halved for causal masks).
/// With sliding-window layers, the band their kernels compute, averaged over the layers
/// ([`ModelSpec::attention_work_fraction`]).
pub fn attention_flops_fwd(m: &ModelSpec, seq: f64) -> f64 {
    let full = 2.0 * seq * seq * m.q_dim() as f64;
    let fraction = m.attention_work_fraction(seq);
    if fraction < 1.0 {
        full * fraction
    } else {
        full
    }
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

/// Achieved bandwidth (bytes/s) of a layout copy (transpose, concatenation, dtype change)
/// moving `bytes_per_call`: the calibration's layout curve when it has one, else the streaming
/// rate [`hbm_rate`] (older calibrations and spec-only clusters).
pub fn layout_rate(spec: &ClusterSpec, bytes_per_call: f64) -> f64 {
    spec.calibration
        .as_ref()
        .and_then(|c| c.layout_bandwidth(bytes_per_call))
        .unwrap_or_else(|| hbm_rate(spec, bytes_per_call))
}

/// Per-kernel floor (seconds) when the calibration has no `memory_bandwidth` section: 3.8 us
/// per kernel for short kernels launched back to back into one stream without host
/// synchronisation, as measured in NVIDIA's "Getting Started with CUDA Graphs" (A. Gray,
/// NVIDIA Technical Blog, 2019; a 2.9 us kernel took 3.8 us per launch). That is plain CUDA
/// C++; a framework adds its dispatch on top, so for the runtime (tch / ATen eager) this is a
/// lower bound: `mmsp-runtime calibrate` measures the runtime's own floor (7.4 us per call on
/// an H100 80GB HBM3 with PyTorch 2.11), which [`kernel_floor_s`] uses when present.
pub const DEFAULT_KERNEL_FLOOR_S: f64 = 3.8e-6;

/// The per-kernel floor (seconds): the calibration's smallest memory-bound call
/// ([`crate::calibration::Calibration::kernel_floor_s`]), else [`DEFAULT_KERNEL_FLOOR_S`].
pub fn kernel_floor_s(spec: &ClusterSpec) -> f64 {
    spec.calibration
        .as_ref()
        .and_then(|c| c.kernel_floor_s())
        .unwrap_or(DEFAULT_KERNEL_FLOOR_S)
}

/// Time of one kernel moving `bytes`: the longer of its bytes over the achieved HBM bandwidth
/// at that call size ([`hbm_rate`]) and the per-kernel `floor`.
pub fn kernel_s(spec: &ClusterSpec, bytes: f64, floor: f64) -> f64 {
    (bytes / hbm_rate(spec, bytes)).max(floor)
}

/// Time of one decode kernel of `kind` moving `bytes` that a replayed CUDA graph launches
/// after another: the longer of its bytes over the streaming bandwidth ([`hbm_rate`]) and
/// the calibration's graph-replayed time for its kind (`mmsp-runtime calibrate-launch`,
/// [`crate::calibration::GraphTimes`]): a one-token projection of that weight size, the
/// decode attention over that many K/V bytes, or for a small op the larger of the measured
/// small ATen op and a copy of that size (a dependent kernel's own latency: no host launch
/// on the path). Without graph points, [`kernel_s`] at `eager_floor`: an upper bound.
pub fn graph_kernel_s(
    spec: &ClusterSpec,
    bytes: f64,
    kind: crate::calibration::KernelKind,
    eager_floor: f64,
) -> f64 {
    match spec
        .calibration
        .as_ref()
        .and_then(|c| c.graph_times())
        .and_then(|g| g.kernel_s(bytes, kind))
    {
        Some(t) => t.max(bytes / hbm_rate(spec, bytes)),
        None => kernel_s(spec, bytes, eager_floor),
    }
}

/// Memory-bound traffic per token (or per parameter), in bytes read plus written, split by the
/// kind of kernel that moves it: streaming elementwise kernels (at the calibration's streaming
/// bandwidth) and layout copies (transposes, concatenations, dtype-changing copies: at its
/// layout bandwidth, about half the streaming one on an H100).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub stream: f64,
    pub layout: f64,
}

impl Traffic {
    fn scaled(self, k: f64) -> Traffic {
        Traffic {
            stream: self.stream * k,
            layout: self.layout * k,
        }
    }
}

/// The memory-bound kernels of one layer's forward as mmsp-runtime runs it, per token of the
/// rank (split `tp` ways under tensor + sequence parallelism), counted from its code
/// (`runtime/src/model/decoder.rs`: `norm`, `Rope::apply`, `pre_attention_with`,
/// `post_attention_with`; `runtime/src/train/mod.rs`, `step_input`; `runtime/src/kernel.rs`,
/// `Prepared`) and checked against the kernels of a profiled step (`mmsp-runtime run
/// --kernel-trace`, `runtime/bench/results/h100-sxm/raw/h100_runE_kernel_trace_32K.json.gz`).
/// Elements of 2 bytes:
/// - two RMSNorms, ATen's fused kernel: reads its input twice (the mean square, then the
///   scaling) and writes once: 2 x 3h (0.25 ms for 32K x 4096 on the H100, 3.2 TB/s counted so);
/// - RoPE on q and k (width w = q, kv): the rotate-half's negated half (w), x cos and
///   rot x sin (2w each), their sum (3w): 8w streaming, and the rotate-half `cat` (2w, layout);
/// - two residual adds (3h each) and SwiGLU's silu (2f) and product (3f);
/// - layout copies for the attention kernel: q, k and v to the heads-first layout
///   (2q + 4kv), the kv heads repeated to the q heads when the kernel call has fewer
///   (`kv_expand`: 2 x (kv + q)), and the output back to the sequence layout (2q).
pub fn layer_traffic_fwd(m: &ModelSpec, tp: f64, kv_expand: bool) -> Traffic {
    let h = m.hidden_size as f64;
    let (q, kv, f) = (
        m.q_dim() as f64,
        m.kv_dim() as f64,
        m.intermediate_size as f64,
    );
    let stream = 2.0 * 3.0 * h + 8.0 * (q + kv) + 2.0 * 3.0 * h + 5.0 * f;
    let expand = if kv_expand { 2.0 * (kv + q) } else { 0.0 };
    let layout = 2.0 * (q + kv) + (2.0 * q + 4.0 * kv) + expand + 2.0 * q;
    Traffic {
        stream: ACT_BYTES * stream / tp,
        layout: ACT_BYTES * layout / tp,
    }
}

/// The memory-bound kernels of one layer's backward (same sources as [`layer_traffic_fwd`]):
/// - SwiGLU, one node (`csrc/optim_shim.cpp`, `SwiGlu`): silu(gate) recomputed (2f), the
///   product's two input gradients and silu's backward (3 x 3f);
/// - two RMSNorm backwards: the input gradient (reads x twice and dy, writes dx: 4h) and the
///   weight gradient (reads x and dy: 2h), 2 x 6h;
/// - gradient sums where a tensor feeds several ops (the norm output into q, k, v and into
///   gate, up; the residual streams into their norm and their skip): five adds of 3h;
/// - RoPE's backward on dq and dk as its forward (8w streaming, 2w layout);
/// - the kv-head gradient sums of a repeated call (`kv_expand`: read q, write kv, for dk, dv);
/// - layout copies: the output gradient to the heads-first layout and the kernel's contiguous
///   copy of it (2 x 2q), dq, dk, dv back to the sequence layout (2q + 4kv), and the residual
///   gradient's copy (2h).
pub fn layer_traffic_bwd(m: &ModelSpec, tp: f64, kv_expand: bool) -> Traffic {
    let h = m.hidden_size as f64;
    let (q, kv, f) = (
        m.q_dim() as f64,
        m.kv_dim() as f64,
        m.intermediate_size as f64,
    );
    let expand = if kv_expand { 2.0 * (q + kv) } else { 0.0 };
    let stream = 11.0 * f + 2.0 * 6.0 * h + 5.0 * 3.0 * h + 8.0 * (q + kv) + expand;
    let layout = 2.0 * 2.0 * q + (2.0 * q + 4.0 * kv) + 2.0 * (q + kv) + 2.0 * h;
    Traffic {
        stream: ACT_BYTES * stream / tp,
        layout: ACT_BYTES * layout / tp,
    }
}

/// Traffic per token of the runtime's chunked cross-entropy over the vocabulary (its shard of
/// `vocab / tp`), forward and backward together (`runtime/src/train/mod.rs`, `chunked_loss`,
/// whose kernels the profiled step shows): the 16-bit logits the head GEMM wrote are copied to
/// fp32 (read 2, write 4 bytes per entry: a dtype-changing copy, layout class, 1.8 TB/s
/// measured; ATen's `_log_softmax` has no bf16-to-fp32 path on CUDA), the log-softmax reads
/// them three times (max, sum, output pass) and writes fp32 (16 bytes), and the gradient
/// softmax - onehot is `exp` of the log-probabilities written in 16 bits (4 + 2 bytes).
/// Without the copy (a fused bf16-input softmax) this would be 12 bytes.
pub fn cross_entropy_traffic(m: &ModelSpec, tp: f64) -> Traffic {
    let v = m.vocab_size as f64 / tp;
    Traffic {
        stream: v * (16.0 + 6.0),
        layout: v * (ACT_BYTES + 4.0),
    }
}

/// Traffic per token of `n` layers' forward and backward, for callers that want one figure.
pub fn layers_traffic(m: &ModelSpec, tp: f64, kv_expand: bool, n: f64) -> Traffic {
    let (f, b) = (
        layer_traffic_fwd(m, tp, kv_expand),
        layer_traffic_bwd(m, tp, kv_expand),
    );
    Traffic {
        stream: f.stream + b.stream,
        layout: f.layout + b.layout,
    }
    .scaled(n)
}

/// Bytes per token of the embedding lookup and its gradient: forward gathers a row of the
/// 16-bit table and writes it (2 x h); backward reads the row's gradient and adds it into the
/// table's gradient (read dx, read and write the row: 3 x h).
pub fn embedding_bytes(m: &ModelSpec, tp: f64) -> f64 {
    let h = m.hidden_size as f64;
    ACT_BYTES * (2.0 * h + 3.0 * h) / tp
}

/// Bytes per parameter, per micro-batch, of bringing a weight gradient into the fp32 gradient
/// buffer as mmsp-runtime does: autograd's backward of the fp32-to-16-bit weight cast writes the
/// 16-bit gradient out as fp32 (read 2, write 4 bytes), then accumulates it into `.grad` (read
/// 4 + 4, write 4): the two kernels per weight of the profiled step
/// (`runtime/bench/results/h100-sxm/raw/h100_runE_kernel_trace_32K.json.gz`). Mixed-precision
/// recipe of Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.1; Megatron-LM's fused
/// `main_grad.add_(grad)` moves 10 bytes.
pub const GRAD_ACCUMULATE_BYTES: f64 = (WEIGHT_BYTES + GRAD_BYTES) + 3.0 * GRAD_BYTES;

/// Bytes per parameter, per micro-batch, of the runtime's cast of the fp32 master weights to
/// the 16-bit working copy its layers compute with (read 4, write 2).
pub const WEIGHT_CAST_BYTES: f64 = GRAD_BYTES + WEIGHT_BYTES;

/// Bytes per gradient element per step of zeroing the fp32 gradient buffer before the first
/// micro-batch accumulates into it.
pub const GRAD_ZERO_BYTES: f64 = GRAD_BYTES;

/// Bytes per parameter of the optimizer shard per step: the AdamW update (Loshchilov & Hutter
/// 2019, "Decoupled Weight Decay Regularization", Algorithm 2) reads the fp32 master weight,
/// gradient and both moments and writes the weight and both moments (4 x 4 + 3 x 4 bytes), in
/// ATen's fused multi-tensor kernel as the runtime runs it (`runtime/src/train/adamw.rs`). The
/// 16-bit working copy is cast at the next forward ([`WEIGHT_CAST_BYTES`]).
pub const OPTIMIZER_STEP_BYTES: f64 = (OPTIMIZER_BYTES + GRAD_BYTES) + OPTIMIZER_BYTES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_flops_follow_six_n_rule() {
        let m = crate::spec::model::load("llama3-8b").unwrap();
        let per_token_train = GEMM_TRAIN_FACTOR * layer_gemm_flops_fwd(&m, 1.0, 1.0);
        assert_eq!(per_token_train, 6.0 * m.layer_matmul_params() as f64);
    }

    #[test]
    fn memory_bound_bytes_are_counted_by_hand() {
        // llama3-8b: h 4096, q 4096, kv 1024, f 14336, vocab 128256.
        let m = crate::spec::model::load("llama3-8b").unwrap();
        let (h, q, kv, f) = (4096.0, 4096.0, 1024.0, 14336.0);
        // Forward: norms 2 x 3h, RoPE 8(q+kv), residuals 6h, SwiGLU 5f streaming; RoPE's cat
        // 2(q+kv), heads-first q, k, v (2q + 4kv), kv expansion 2(kv+q), output 2q layout.
        let fwd = layer_traffic_fwd(&m, 1.0, true);
        assert_eq!(
            fwd.stream,
            2.0 * (6.0 * h + 8.0 * (q + kv) + 6.0 * h + 5.0 * f)
        );
        assert_eq!(
            fwd.layout,
            2.0 * (2.0 * (q + kv) + 2.0 * q + 4.0 * kv + 2.0 * (kv + q) + 2.0 * q)
        );
        let no_expand = layer_traffic_fwd(&m, 1.0, false);
        assert_eq!(fwd.layout - no_expand.layout, 2.0 * 2.0 * (kv + q));
        assert_eq!(layer_traffic_fwd(&m, 4.0, true).stream, fwd.stream / 4.0);
        // Backward: SwiGLU 11f (silu recomputed), norms 12h, five sums 15h, RoPE 8(q+kv),
        // kv sums 2(q+kv).
        let bwd = layer_traffic_bwd(&m, 1.0, true);
        assert_eq!(
            bwd.stream,
            2.0 * (11.0 * f + 12.0 * h + 15.0 * h + 8.0 * (q + kv) + 2.0 * (q + kv))
        );
        assert_eq!(
            bwd.layout,
            2.0 * (4.0 * q + 2.0 * q + 4.0 * kv + 2.0 * (q + kv) + 2.0 * h)
        );
        // Loss: 22 streaming + 6 layout bytes per vocabulary entry.
        let ce = cross_entropy_traffic(&m, 1.0);
        assert_eq!((ce.stream, ce.layout), (22.0 * 128256.0, 6.0 * 128256.0));
        assert_eq!(embedding_bytes(&m, 1.0), 10.0 * h);
        // Fused AdamW reads p, g, m, v and writes p, m, v (fp32); the cast reads 4, writes 2;
        // the gradient's cast backward 2 + 4 and its accumulation 3 x 4.
        assert_eq!(OPTIMIZER_STEP_BYTES, 7.0 * 4.0);
        assert_eq!(WEIGHT_CAST_BYTES, 6.0);
        assert_eq!(GRAD_ACCUMULATE_BYTES, 18.0);
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
        let m = crate::spec::model::load("llama3-8b").unwrap();
        let f = attention_flops_fwd(&m, 8192.0);
        let tflops = f / 0.91e-3 / 1e12;
        assert!((tflops - 606.0).abs() < 5.0, "{tflops}");
    }
}
