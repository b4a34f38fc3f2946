//! The re-shard between MM-SP stage 1 (frames encoded where [`super::frames`] put them) and
//! stage 2 (the merged sequence zigzag-sharded for the LLM by [`super::zigzag`]): how many
//! embedding bytes each rank sends and receives.
//!
//! Token layout of the merged sequence: samples packed in order, each sample = its frames'
//! tokens (frame by frame) followed by its text tokens. Text tokens are embedded by the LLM's
//! embedding table on the rank that owns them in stage 2 (every rank has the token ids), so only
//! vision tokens move, and only those whose stage-1 rank differs from their stage-2 rank. This
//! is the point-to-point (all-to-all) volume; an all-gather of all embeddings followed by a
//! local slice, as a simple implementation does, moves more.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::spec::samples::Sample;

/// Bytes each rank sends and receives in the re-shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReshardTraffic {
    pub send_bytes_per_rank: Vec<u64>,
    pub recv_bytes_per_rank: Vec<u64>,
    /// Sum of all sends (= sum of all receives).
    pub total_bytes: u64,
}

/// Bytes of one token's embedding entering the LLM: `hidden_size_llm * 2` (bf16).
pub fn embedding_bytes_per_token(hidden_size_llm: u64) -> u64 {
    hidden_size_llm.saturating_mul(2)
}

/// Re-shard traffic. `frame_tokens[g]` = LLM tokens of global frame g (frames of all samples in
/// order); `frames_per_rank` = stage-1 placement (a partition of the frames); `ranges_per_rank` =
/// stage-2 token ranges (same rank indexing, same number of ranks).
pub fn reshard_traffic(
    samples: &[Sample],
    frame_tokens: &[u64],
    frames_per_rank: &[Vec<usize>],
    ranges_per_rank: &[Vec<(u64, u64)>],
    bytes_per_token: u64,
) -> Result<ReshardTraffic> {
    let ranks = frames_per_rank.len();
    if ranges_per_rank.len() != ranks {
        return Err(Error::invalid(
            "re-shard",
            format!(
                "stage 1 has {ranks} ranks but stage 2 has {}",
                ranges_per_rank.len()
            ),
        ));
    }
    let total_frames: u64 = samples.iter().map(|s| s.frames).sum();
    if total_frames != frame_tokens.len() as u64 {
        return Err(Error::invalid(
            "re-shard",
            format!(
                "the samples have {total_frames} frames but {} frame token counts were given",
                frame_tokens.len()
            ),
        ));
    }
    let owner = frame_owners(frames_per_rank, frame_tokens.len())?;
    let (spans, seq_len) = vision_spans(samples, frame_tokens)?;

    let mut send = vec![0u64; ranks];
    let mut recv = vec![0u64; ranks];
    for (dst, ranges) in ranges_per_rank.iter().enumerate() {
        for &(a, b) in ranges {
            if a > b || b > seq_len {
                return Err(Error::invalid(
                    "re-shard",
                    format!("stage-2 range ({a}, {b}) of rank {dst} is outside [0, {seq_len})"),
                ));
            }
            let first = spans.partition_point(|&(_, end, _)| end <= a);
            for &(s, e, f) in spans[first..].iter().take_while(|&&(s, _, _)| s < b) {
                let src = owner[f];
                if src != dst {
                    let bytes = (e.min(b) - s.max(a)).saturating_mul(bytes_per_token);
                    send[src] = send[src].saturating_add(bytes);
                    recv[dst] = recv[dst].saturating_add(bytes);
                }
            }
        }
    }
    let total_bytes = send.iter().fold(0u64, |t, &x| t.saturating_add(x));
    Ok(ReshardTraffic {
        send_bytes_per_rank: send,
        recv_bytes_per_rank: recv,
        total_bytes,
    })
}

/// The stage-1 rank of each of `frames` frames, checking that `frames_per_rank` assigns every
/// frame to exactly one rank.
fn frame_owners(frames_per_rank: &[Vec<usize>], frames: usize) -> Result<Vec<usize>> {
    let mut owner = vec![usize::MAX; frames];
    for (r, fs) in frames_per_rank.iter().enumerate() {
        for &f in fs {
            match owner.get_mut(f) {
                Some(o) if *o == usize::MAX => *o = r,
                Some(_) => {
                    return Err(Error::invalid(
                        "re-shard",
                        format!("frame {f} is assigned to more than one rank"),
                    ))
                }
                None => {
                    return Err(Error::invalid(
                        "re-shard",
                        format!("frame {f} does not exist ({frames} frames)"),
                    ))
                }
            }
        }
    }
    if let Some(f) = owner.iter().position(|&o| o == usize::MAX) {
        return Err(Error::invalid(
            "re-shard",
            format!("frame {f} is not assigned to any rank"),
        ));
    }
    Ok(owner)
}

/// One frame's vision tokens in the packed sequence: (start, end, frame).
type TokenSpan = (u64, u64, usize);

/// The vision tokens' intervals (start, end, frame) in sequence order, frames without tokens
/// left out, and the length of the packed sequence (text tokens included).
fn vision_spans(samples: &[Sample], frame_tokens: &[u64]) -> Result<(Vec<TokenSpan>, u64)> {
    let mut spans: Vec<TokenSpan> = Vec::with_capacity(frame_tokens.len());
    let mut at: u64 = 0;
    let mut g = 0usize;
    let overflow = || Error::invalid("re-shard", "the token sequence overflows u64");
    for s in samples {
        for _ in 0..s.frames {
            let end = at.checked_add(frame_tokens[g]).ok_or_else(overflow)?;
            if end > at {
                spans.push((at, end, g));
            }
            at = end;
            g += 1;
        }
        at = at.checked_add(s.text_tokens).ok_or_else(overflow)?;
    }
    Ok((spans, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    // One sample: 4 frames of 2 tokens, then 4 text tokens (S = 12):
    // f0 [0,2) f1 [2,4) f2 [4,6) f3 [6,8) text [8,12).
    fn one() -> Vec<Sample> {
        vec![Sample::uniform(4, 4)]
    }
    const HALVES: [&[(u64, u64)]; 2] = [&[(0, 6)], &[(6, 12)]];

    fn ranges(r: [&[(u64, u64)]; 2]) -> Vec<Vec<(u64, u64)>> {
        r.iter().map(|x| x.to_vec()).collect()
    }

    #[test]
    fn contiguous_frames_move_one_frame() {
        // Rank 0 encoded f0, f1; rank 1 encoded f2, f3. Rank 0 needs f2 (from rank 1).
        let t = reshard_traffic(
            &one(),
            &[2; 4],
            &[vec![0, 1], vec![2, 3]],
            &ranges(HALVES),
            10,
        )
        .unwrap();
        assert_eq!(t.send_bytes_per_rank, vec![0, 20]);
        assert_eq!(t.recv_bytes_per_rank, vec![20, 0]);
        assert_eq!(t.total_bytes, 20);
    }

    #[test]
    fn interleaved_frames_and_partial_overlap() {
        // Rank 0 has f1, f3; rank 1 has f0, f2. Rank 0 needs f0, f2 (4 tokens from rank 1);
        // rank 1 needs f3 (2 tokens from rank 0).
        let t = reshard_traffic(
            &one(),
            &[2; 4],
            &[vec![1, 3], vec![0, 2]],
            &ranges(HALVES),
            1,
        )
        .unwrap();
        assert_eq!(t.send_bytes_per_rank, vec![2, 4]);
        assert_eq!(t.recv_bytes_per_rank, vec![4, 2]);
        // A range cutting frames: rank 0 holds [1,3) and [7,12), rank 1 the rest.
        let r: [&[(u64, u64)]; 2] = [&[(1, 3), (7, 12)], &[(0, 1), (3, 7)]];
        let t = reshard_traffic(&one(), &[2; 4], &[vec![0, 1], vec![2, 3]], &ranges(r), 1).unwrap();
        // Rank 0 needs token 7 (f3, rank 1): 1. Rank 1 needs token 0 (f0) and 3 (f1): 2.
        assert_eq!(t.recv_bytes_per_rank, vec![1, 2]);
        assert_eq!(t.send_bytes_per_rank, vec![2, 1]);
        assert_eq!(t.total_bytes, 3);
    }

    #[test]
    fn text_only_and_same_rank_move_nothing() {
        let s = vec![
            Sample::uniform(2, 3),
            Sample::uniform(0, 5),
            Sample::uniform(1, 0),
        ];
        // Tokens: f0 [0,4) f1 [4,8) text [8,11) text [11,16) f2 [16,20).
        let r: [&[(u64, u64)]; 2] = [&[(0, 8)], &[(8, 20)]];
        let t = reshard_traffic(&s, &[4; 3], &[vec![0, 1], vec![2]], &ranges(r), 3).unwrap();
        assert_eq!(t.total_bytes, 0);
        let t = reshard_traffic(&s, &[4; 3], &[vec![0], vec![1, 2]], &ranges(r), 3).unwrap();
        assert_eq!(t.send_bytes_per_rank, vec![0, 12]);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let one = one();
        let ok = ranges(HALVES);
        assert!(reshard_traffic(&one, &[2; 3], &[vec![0, 1], vec![2, 3]], &ok, 1).is_err());
        assert!(reshard_traffic(&one, &[2; 4], &[vec![0, 1], vec![2]], &ok, 1).is_err());
        assert!(reshard_traffic(&one, &[2; 4], &[vec![0, 1, 2], vec![2, 3]], &ok, 1).is_err());
        assert!(reshard_traffic(&one, &[2; 4], &[vec![0, 1, 2, 3]], &ok, 1).is_err());
        let far: [&[(u64, u64)]; 2] = [&[(0, 6)], &[(6, 13)]];
        assert!(
            reshard_traffic(&one, &[2; 4], &[vec![0, 1], vec![2, 3]], &ranges(far), 1).is_err()
        );
    }
}
