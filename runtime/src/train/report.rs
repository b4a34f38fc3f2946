//! The report of a training run as one typed value: what `mmsp-runtime run` prints and
//! writes (`--out`), and what [`crate::train::run::run_vlm`] returns on rank 0. The JSON
//! keys are the field names; readers of report files (the benchmark tables, the tests)
//! deserialize it back into [`RunReport`] or read it by key. Built in `run/report.rs`.
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// Everything a run measured, beside what its plan predicted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `inprocess` (threads on one device) or `nccl` (one process per GPU).
    pub launch: String,
    pub ranks: usize,
    /// Devices the ranks ran on (1 for in-process ranks).
    pub devices: f64,
    pub layout: LayoutSummary,
    pub zero_stage: u32,
    pub recompute: String,
    pub model: ModelSummary,
    pub context_tokens: usize,
    pub steps: usize,
    pub first_step_index: usize,
    /// Rank 0's loss at each step (a resumed run's earlier losses first).
    pub losses: Vec<f64>,
    pub first_step_s: f64,
    /// Mean step time after the first step (warm-up) of rank 0.
    pub micro_step_s: f64,
    pub tokens_per_s: f64,
    pub tokens_per_s_per_gpu: f64,
    /// Model FLOPs utilisation (PaLM's counting, Chowdhery et al. 2022, Appendix B).
    pub mfu: f64,
    /// Hardware FLOPs utilisation (attention at 3.5x, recompute counted).
    pub hfu: f64,
    pub peak_flops_per_device: f64,
    pub attention_s_rank0: f64,
    pub grad_sync_and_optimizer_s_rank0: f64,
    pub communication_s_rank0: f64,
    pub communication_note: String,
    pub phases_rank0: crate::train::Phases,
    pub per_rank: Vec<RankSummary>,
    pub peak_device_memory_used_bytes: Option<f64>,
    pub memory_note: String,
    pub device_memory_total_bytes: Option<f64>,
    pub peak_allocated_bytes_rank0: Option<f64>,
    pub peak_reserved_bytes_rank0: Option<f64>,
    pub allocator_note: String,
    pub deterministic: bool,
    pub allocator_conf: Option<String>,
    /// The kernel profile's summary of the last step (`--kernel-trace`): the summary file's
    /// own JSON (`train::kernel_profile`) with its trace path and step added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_profile: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<CheckpointRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointRef>,
    /// The plan's predictions and the measured error against each (plans with `predicted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<AgainstPredicted>,
    /// The Chrome trace of the steps (`--trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightsSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataSummary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl RunReport {
    /// The report as JSON (for reading by key).
    pub fn to_json(&self) -> Value {
        // A struct of plain fields and maps with string keys always serializes.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutSummary {
    pub ulysses: usize,
    pub ring: usize,
    pub dp: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub params: usize,
}

/// One rank's means over the steps after the first, and its peaks over all steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankSummary {
    pub rank: usize,
    pub step_s: f64,
    pub communication_s: f64,
    pub attention_s: f64,
    pub grad_sync_and_optimizer_s: f64,
    pub peak_device_memory_used_bytes: Option<f64>,
    pub peak_allocated_bytes: Option<f64>,
    pub peak_reserved_bytes: Option<f64>,
    pub held_weight_bytes_after_forward: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub dir: PathBuf,
    pub step: usize,
}

/// The plan's figures, per rank and micro-step, and the measured error against each.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AgainstPredicted {
    pub micro_step_s: f64,
    pub tokens_per_s_per_gpu: f64,
    pub mfu: f64,
    pub hfu: Option<f64>,
    pub memory_per_gpu_bytes: f64,
    pub error_pct: ErrorPct,
}

/// (measured - predicted) / predicted, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ErrorPct {
    pub micro_step_s: f64,
    pub tokens_per_s_per_gpu: f64,
    pub mfu: f64,
    pub hfu: Option<f64>,
    /// Absent off CUDA (no device memory figure).
    pub memory: Option<f64>,
}

/// The weights a run read (`--model DIR`): one model's bytes in all when ZeRO shards them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsSummary {
    pub dir: PathBuf,
    pub bytes_read: u64,
    pub model_bytes: u64,
}

/// The data a run read (`--data`): a token dataset or a video manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequences_per_epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_samples: Option<usize>,
}

/// The vision stage (MM-SP stage 1) of a VLM run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionReport {
    pub encoder: String,
    pub encoder_config: EncoderSummary,
    pub tokens_per_frame: usize,
    pub frames: usize,
    pub samples: usize,
    pub padding_tokens: usize,
    pub train_vision: bool,
    pub frames_per_rank: Vec<usize>,
    pub loss: String,
    pub stage2: Stage2Summary,
    pub measured_rank0: VisionTimes,
    pub measured_slowest_rank: VisionTimes,
    pub mfu_with_encoder: f64,
    pub note: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<VisionPredicted>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderSummary {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub pooling: String,
    pub params: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage2Summary {
    pub ranges: String,
    pub sample_lens: Vec<usize>,
    /// Whether the runtime's shards are the plan's (None: the plan has no token ranges).
    pub plan_ranges_match: Option<bool>,
}

/// Seconds of the vision stage's phases (mean over the steps after the first).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct VisionTimes {
    pub encode_s: f64,
    pub reshard_s: f64,
    pub reshard_backward_s: f64,
    pub encoder_backward_s: f64,
    pub encoder_optimizer_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VisionPredicted {
    pub encoder_s: f64,
    pub reshard_s: f64,
    pub gather_s: f64,
    pub error_pct: VisionErrorPct,
}

/// Measured against predicted in percent (None where the prediction is 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VisionErrorPct {
    #[serde(rename = "encoder_s (encode_s + encoder_backward_s, slowest rank)")]
    pub encoder_s: Option<f64>,
    pub reshard_s: Option<f64>,
    #[serde(rename = "gather_s (reshard_backward_s)")]
    pub gather_s: Option<f64>,
}
