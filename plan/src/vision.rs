//! The multi-modal section of a plan (`mmsp plan --frames N` / `--samples`): stage 1 (frames
//! per rank for the vision encoder) and stage 2 (the packed samples the LLM attends within),
//! as the planner balanced them and the runtime executes them.

use serde::{Deserialize, Serialize};

/// Stage 1 and 2 as they go into the plan, for the runtime to execute exactly this split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionPlan {
    pub encoder: String,
    pub tokens_per_frame: u64,
    pub frames: u64,
    pub samples: u64,
    /// LLM tokens of each sample as stage 2 runs it, padding included (a multiple of
    /// 2 x ulysses x ring; plans of older planners hold the unpadded lengths).
    pub sample_lens: Vec<u64>,
    /// Padding tokens at the end of each sample, in `sample_lens`: ids of any token, no loss
    /// (absent in plans of older planners: no padding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_tokens_per_sample: Option<Vec<u64>>,
    /// Frames of each sample, in packing order (absent in plans of older planners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_per_sample: Option<Vec<u64>>,
    /// Text tokens of each sample, in packing order (absent in plans of older planners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_tokens_per_sample: Option<Vec<u64>>,
    pub train_vision: bool,
    /// Stage 1: global frame indices per SP rank (the same in every DP replica).
    pub frames_per_rank: Vec<Vec<usize>>,
    pub encoder_imbalance_before: f64,
    pub encoder_imbalance_after: f64,
    pub balance_method: String,
    pub solver: String,
    pub solve_time_s: f64,
    /// Stage 2: causal attention work max / mean over SP ranks.
    pub attention_imbalance: f64,
    pub reshard_bytes: u64,
    pub stage: VisionStage,
}

/// The vision stage's cost for one layout, computed by the planner (`mmsp_planner::multimodal`) and added to each
/// micro-batch.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionStage {
    /// Vision encoder time on the most loaded rank (stage 1).
    pub encoder_s: f64,
    /// Embedding gradients returning to their frames' ranks in backward (0 when frozen).
    pub gather_s: f64,
    /// Embeddings moving from stage-1 ranks to their stage-2 zigzag shards.
    pub reshard_s: f64,
    /// Encoder activations per GPU for one sequence's frames.
    pub memory_bytes: f64,
    /// Encoder model states per GPU (weights, and gradients and optimizer states if trained).
    pub states_bytes: f64,
    /// Attention work relative to one sequence of the padded context: sum(len^2)/S^2 of the
    /// packed samples, times the zigzag's max/mean imbalance.
    pub attention_scale: f64,
    /// `encoder_s` split: the encoder's and projector's GEMMs, its attention, and its
    /// memory-bound kernels with the weight casts (absent in plans of older planners).
    #[serde(default)]
    pub encoder_gemm_s: f64,
    #[serde(default)]
    pub encoder_attention_s: f64,
    #[serde(default)]
    pub encoder_memory_bound_s: f64,
    /// The encoder's own AdamW step per step when trained (absent in plans of older planners).
    #[serde(default)]
    pub encoder_optimizer_s: f64,
}
