//! Two-stage MM-SP balancing (LongVILA's multi-modal sequence parallelism):
//!
//! 1. [`frames`]: video frames are spread over all GPUs of the SP group so the vision encoder's
//!    FLOPs are balanced (class-count MILP in [`milp`], LPT fallback);
//! 2. [`zigzag`]: the merged token sequence is zigzag-sharded for 2D attention (Ulysses x ring)
//!    so causal attention work is balanced;
//! 3. [`reshard`]: the embedding traffic between the two layouts.
//!
//! [`plan_two_stage`] runs all three for a batch of samples; the planner puts its result in the
//! plan and its cost.

pub mod frames;
pub mod milp;
pub mod reshard;
pub mod zigzag;

use serde::Serialize;

pub use frames::{balance_frames, frame_costs, BalanceOptions, FrameAssignment, Method};
pub use reshard::{embedding_bytes_per_token, reshard_traffic, ReshardTraffic};
pub use zigzag::{causal_work_per_rank, imbalance, ranges_per_rank, tokens_per_rank};

use crate::error::{Error, Result};
use crate::spec::samples::Sample;
use crate::spec::vision::VisionSpec;

/// Both MM-SP stages and the re-shard between them, for one step's samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TwoStageBalance {
    /// Stage 1: frames per SP rank and the vision encoder's load balance.
    pub frames: FrameAssignment,
    /// LLM sequence length of each sample (its frames' tokens + its text tokens).
    pub sample_lens: Vec<u64>,
    /// Stage 2: token ranges per SP rank (zigzag, varlen).
    pub ranges_per_rank: Vec<Vec<(u64, u64)>>,
    pub tokens_per_rank: Vec<u64>,
    /// Causal attention work per SP rank, in query-key pairs.
    pub attention_work_per_rank: Vec<f64>,
    /// Max / mean of `attention_work_per_rank`.
    pub attention_imbalance: f64,
    /// Embedding traffic of the re-shard between the two stages.
    pub reshard: ReshardTraffic,
}

/// Balance a step: `samples` over an SP group of `ulysses * ring` ranks, with `vision` encoding
/// the frames and an LLM of hidden size `hidden_size_llm` (bf16 embeddings) consuming the tokens.
pub fn plan_two_stage(
    samples: &[Sample],
    vision: &VisionSpec,
    ulysses: usize,
    ring: usize,
    hidden_size_llm: u64,
    opts: &BalanceOptions,
) -> Result<TwoStageBalance> {
    let ranks = ulysses
        .checked_mul(ring)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::invalid(
                "sequence-parallel degrees",
                format!("ulysses ({ulysses}) x ring ({ring}) must be a positive rank count"),
            )
        })?;
    let frames = balance_frames(&frame_costs(samples, vision)?, ranks, opts)?;
    second_stage(samples, vision, frames, ulysses, ring, hidden_size_llm)
}

/// Stage 2 and the re-shard for a given stage-1 placement (`frames`, over `ulysses * ring`
/// ranks): the search balances frames once per SP degree and reuses them for every
/// Ulysses x ring split of it.
pub fn second_stage(
    samples: &[Sample],
    vision: &VisionSpec,
    frames: FrameAssignment,
    ulysses: usize,
    ring: usize,
    hidden_size_llm: u64,
) -> Result<TwoStageBalance> {
    let mut frame_tokens = Vec::new();
    let mut sample_lens = Vec::with_capacity(samples.len());
    for s in samples {
        let t = vision.tokens_for(s.resolution);
        frame_tokens.extend(std::iter::repeat_n(t, s.frames as usize));
        let len = s
            .frames
            .checked_mul(t)
            .and_then(|v| v.checked_add(s.text_tokens))
            .ok_or_else(|| Error::invalid("samples", "a sample's token count overflows u64"))?;
        sample_lens.push(len);
    }
    let ranges = ranges_per_rank(&sample_lens, ulysses, ring)?;
    let work = causal_work_per_rank(&sample_lens, ulysses, ring)?;
    let reshard = reshard_traffic(
        samples,
        &frame_tokens,
        &frames.frames_per_rank,
        &ranges,
        embedding_bytes_per_token(hidden_size_llm),
    )?;
    Ok(TwoStageBalance {
        frames,
        sample_lens,
        tokens_per_rank: tokens_per_rank(&ranges),
        attention_imbalance: imbalance(&work),
        attention_work_per_rank: work,
        ranges_per_rank: ranges,
        reshard,
    })
}
