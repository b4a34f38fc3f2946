//! The inference section of a plan (`mmsp plan --mode inference`): how the weights are held
//! and what the planner predicts for prefill and decode.

use serde::{Deserialize, Serialize};

use crate::predicted::TimeBreakdown;

/// How the weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightSharding {
    /// Every GPU holds all weights.
    Replicated,
    /// ZeRO-3 style: each GPU holds 1/sp of the weights and gathers a layer before using it
    /// (Rajbhandari et al. 2020, Sec. 5).
    Sharded,
}

impl WeightSharding {
    pub fn as_str(&self) -> &'static str {
        match self {
            WeightSharding::Replicated => "replicated",
            WeightSharding::Sharded => "sharded (ZeRO-3)",
        }
    }
}
/// Memory per GPU, bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceMemory {
    pub weights_bytes: f64,
    pub kv_cache_bytes: f64,
    /// One layer's prefill activations at a time (no gradients kept).
    pub activations_bytes: f64,
    pub logits_bytes: f64,
    pub comm_buffers_bytes: f64,
    pub reserved_bytes: f64,
    pub fragmentation_bytes: f64,
    pub total_bytes: f64,
}

/// Prediction for one feasible candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceEstimate {
    pub weights: WeightSharding,
    /// K/V held per rank: heads (all kv heads, token layout) and tokens.
    pub kv_heads_held: u64,
    pub kv_tokens_per_rank: u64,
    /// Rule for tokens decoded after the prompt.
    pub kv_append_rule: String,
    pub prefill_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_s_per_token: f64,
    pub decode_tokens: u64,
    /// prefill_s + decode_tokens x decode_s_per_token: the ranking key.
    pub request_s: f64,
    pub memory: InferenceMemory,
    pub prefill: TimeBreakdown,
    /// Decode per token: the rank's kernel chain (the planner's `decode_kernels`), each kernel the
    /// longer of its bytes over bandwidth and the floor: `decode_hbm_s + decode_floor_s`.
    pub decode_kernels_s: f64,
    /// Kernels launched per token on one rank.
    pub decode_kernels_per_token: u64,
    /// The per-kernel floor used, seconds: the eager one (the planner's `kernel_floor_s`),
    /// or with `decode_cuda_graph` that of the smallest kernel replayed from a graph.
    pub decode_kernel_floor_s: f64,
    /// Whether decode is costed as the runtime's CUDA-graph step (one rank) rather than
    /// eager launches (absent from older plans: false).
    #[serde(default)]
    pub decode_cuda_graph: bool,
    /// HBM bytes the kernels of one token read and write on one rank: KV shard, weights, the
    /// fp32 scores' passes and the small tensors.
    pub decode_bytes_per_token: f64,
    /// Decode per token: every kernel's bytes over the achieved bandwidth at its size (the
    /// roofline time, no floor).
    pub decode_hbm_s: f64,
    /// Decode per token: what the floor adds over the roofline time, the sum over kernels of
    /// max(0, floor - bytes / bandwidth) (launch-bound small kernels).
    pub decode_floor_s: f64,
    /// Decode per token: merge all-gathers (every layer) and the token broadcast.
    pub decode_comm_s: f64,
    /// Decode per token: ZeRO-3 weight gathers (0 when replicated).
    pub decode_weight_gather_s: f64,
    pub prefill_flops: f64,
}
