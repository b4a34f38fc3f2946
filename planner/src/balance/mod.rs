//! Two-stage MM-SP balancing (LongVILA's multi-modal sequence parallelism):
//!
//! 1. [`frames`]: video frames are spread over all GPUs of the SP group so the vision encoder's
//!    FLOPs are balanced (LPT and a local search on class counts, the class-count MILP in
//!    [`milp`] up to [`frames::MILP_MAX_RANKS`] ranks);
//! 2. [`zigzag`]: the merged token sequence is zigzag-sharded for 2D attention (Ulysses x ring)
//!    so causal attention work is balanced, each sample on its own after padding it at its end
//!    to a multiple of 2 x ulysses x ring ([`sample_padding`]), as mmsp-runtime's packed
//!    attention requires;
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
    /// LLM sequence length of each sample as the layout runs it: its frames' tokens, its text
    /// tokens and its padding ([`sample_padding`]), a multiple of 2 x ulysses x ring.
    pub sample_lens: Vec<u64>,
    /// Padding tokens at the end of each sample (in `sample_lens`).
    pub pad_tokens_per_sample: Vec<u64>,
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

/// Tokens that pad a sample of `len` tokens at its end to a multiple of `2 * sp`, so that it
/// cuts into 2 x sp equal zigzag pieces: mmsp-runtime shards every sample of a packed sequence
/// on its own and requires that (`runtime/src/packed.rs`, `Packing::new`). The padding tokens
/// carry no loss, and under causal masking no real token attends to the padding after it, so
/// the sample trains exactly as unpadded; the padding is computed, and costed.
pub fn sample_padding(len: u64, sp: u64) -> u64 {
    let g = 2 * sp.max(1);
    len.div_ceil(g) * g - len
}

/// Stage 2 and the re-shard for a given stage-1 placement (`frames`, over `ulysses * ring`
/// ranks): the search balances frames once per SP degree and reuses them for every
/// Ulysses x ring split of it. Each sample is padded at its end ([`sample_padding`]); the
/// padding sits after its text, where no frame moves.
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
    let mut pads = Vec::with_capacity(samples.len());
    // The samples as the re-shard sees them: padding is text-like (embedded where it lands).
    let mut padded = Vec::with_capacity(samples.len());
    let sp = (ulysses as u64).saturating_mul(ring as u64);
    for s in samples {
        let t = vision.tokens_for(s.resolution);
        frame_tokens.extend(std::iter::repeat_n(t, s.frames as usize));
        let overflow = || Error::invalid("samples", "a sample's token count overflows u64");
        let len = s
            .frames
            .checked_mul(t)
            .and_then(|v| v.checked_add(s.text_tokens))
            .ok_or_else(overflow)?;
        let pad = sample_padding(len, sp);
        sample_lens.push(len.checked_add(pad).ok_or_else(overflow)?);
        pads.push(pad);
        padded.push(Sample {
            text_tokens: s.text_tokens + pad,
            ..*s
        });
    }
    let ranges = ranges_per_rank(&sample_lens, ulysses, ring)?;
    let work = zigzag::causal_work_of_ranges(&sample_lens, &ranges, ulysses);
    let reshard = reshard_traffic(
        &padded,
        &frame_tokens,
        &frames.frames_per_rank,
        &ranges,
        embedding_bytes_per_token(hidden_size_llm),
    )?;
    Ok(TwoStageBalance {
        frames,
        sample_lens,
        pad_tokens_per_sample: pads,
        tokens_per_rank: tokens_per_rank(&ranges),
        attention_imbalance: imbalance(&work),
        attention_work_per_rank: work,
        ranges_per_rank: ranges,
        reshard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples of odd lengths are padded at their end to a multiple of 2 x sp, so each cuts into
    /// 2 x sp equal zigzag pieces (the runtime's packed sharding).
    #[test]
    fn samples_are_padded_to_whole_zigzag_pieces() {
        assert_eq!(sample_padding(399, 4), 1);
        assert_eq!(sample_padding(400, 4), 0);
        assert_eq!(sample_padding(593, 2), 3);
        assert_eq!(sample_padding(5, 1), 1);
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        let samples = [Sample::uniform(2, 7), Sample::uniform(3, 5)];
        for (u, r) in [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (4, 2)] {
            let sp = (u * r) as u64;
            let b = plan_two_stage(&samples, &v, u, r, 4096, &BalanceOptions::default()).unwrap();
            let raw = [2 * 196 + 7, 3 * 196 + 5];
            for (i, &want) in raw.iter().enumerate() {
                let (len, pad) = (b.sample_lens[i], b.pad_tokens_per_sample[i]);
                assert_eq!(len, want + pad, "u{u} r{r}");
                assert!(
                    len.is_multiple_of(2 * sp) && pad < 2 * sp,
                    "u{u} r{r}: {len}"
                );
            }
            // Every rank: one piece from each half of each sample, len / (2 sp) tokens each.
            for ranges in &b.ranges_per_rank {
                let sizes: Vec<u64> = ranges.iter().map(|(a, z)| z - a).collect();
                let want: Vec<u64> = b
                    .sample_lens
                    .iter()
                    .flat_map(|&l| [l / (2 * sp); 2])
                    .collect();
                assert_eq!(sizes, want, "u{u} r{r}");
            }
            assert!(b.attention_imbalance < 1.0 + 1e-9, "u{u} r{r}");
        }
    }
}
