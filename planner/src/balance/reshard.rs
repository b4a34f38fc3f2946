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
    let index = SpanIndex::new(samples, frame_tokens)?;
    check_ranges(ranges_per_rank, index.seq_len)?;
    let mut send = vec![0u64; ranks];
    let mut recv = vec![0u64; ranks];
    // Sample by sample, every rank's ranges starting in it (bucketed in one pass over the
    // ranges): the sample's spans and owners stay in cache, where rank by rank each range was
    // a miss across the whole sequence. The sums are of non-negative terms, saturating, so
    // their order does not change them.
    let mut by_sample: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); index.samples.len()];
    for (dst, ranges) in ranges_per_rank.iter().enumerate() {
        for &(a, b) in ranges.iter().filter(|r| r.0 < r.1) {
            by_sample[index.sample_of(a)].push((a, b, dst));
        }
    }
    for (i, ranges) in by_sample.iter().enumerate() {
        for &(a, b, dst) in ranges {
            let first = index.first_ending_after_in(i, a);
            for &(s, e, f) in index.spans[first..].iter().take_while(|sp| sp.0 < b) {
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

/// Checks that every range lies in the sequence `[0, seq_len)`, naming the first that does not.
fn check_ranges(ranges_per_rank: &[Vec<(u64, u64)>], seq_len: u64) -> Result<()> {
    for (dst, ranges) in ranges_per_rank.iter().enumerate() {
        if let Some(&(a, b)) = ranges.iter().find(|&&(a, b)| a > b || b > seq_len) {
            return Err(Error::invalid(
                "re-shard",
                format!("stage-2 range ({a}, {b}) of rank {dst} is outside [0, {seq_len})"),
            ));
        }
    }
    Ok(())
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

/// The vision tokens' intervals in sequence order and where each sample's lie, so that the
/// first span ending after a token is found in the sample holding it: by a division where the
/// sample's frames all have the same token count (every planner sample: one resolution a
/// sample), else by a binary search of the sample's spans. At 32768 ranks the re-shard looks
/// up 2.6 million ranges; a binary search over every frame's span each time took most of it.
struct SpanIndex {
    /// (start, end, frame) of every frame with tokens, in sequence order.
    spans: Vec<TokenSpan>,
    /// Per sample: its end in the sequence, its first span, its span count, and its frames'
    /// token count when they all have the same (and it is not 0).
    samples: Vec<SampleSpans>,
    /// Length of the packed sequence (text tokens included).
    seq_len: u64,
}

struct SampleSpans {
    start: u64,
    end: u64,
    first_span: usize,
    spans: usize,
    uniform: Option<u64>,
}

impl SpanIndex {
    fn new(samples: &[Sample], frame_tokens: &[u64]) -> Result<Self> {
        let mut spans: Vec<TokenSpan> = Vec::with_capacity(frame_tokens.len());
        let mut table = Vec::with_capacity(samples.len());
        let mut at: u64 = 0;
        let mut g = 0usize;
        let overflow = || Error::invalid("re-shard", "the token sequence overflows u64");
        for s in samples {
            let (start, first_span) = (at, spans.len());
            let tokens = &frame_tokens[g..g + s.frames as usize];
            let uniform = tokens
                .first()
                .filter(|&&t| t > 0 && tokens.iter().all(|&u| u == t))
                .copied();
            for &t in tokens {
                let end = at.checked_add(t).ok_or_else(overflow)?;
                if end > at {
                    spans.push((at, end, g));
                }
                at = end;
                g += 1;
            }
            at = at.checked_add(s.text_tokens).ok_or_else(overflow)?;
            table.push(SampleSpans {
                start,
                end: at,
                first_span,
                spans: spans.len() - first_span,
                uniform,
            });
        }
        Ok(SpanIndex {
            spans,
            samples: table,
            seq_len: at,
        })
    }

    /// The sample holding token `a` (`samples.len()` past the sequence's end).
    fn sample_of(&self, a: u64) -> usize {
        self.samples.partition_point(|s| s.end <= a)
    }

    /// The index of the first span that ends after token `a` (`spans.len()` when none does):
    /// the same as a binary search of all spans, `spans.partition_point(|s| s.1 <= a)`.
    #[cfg(test)]
    fn first_ending_after(&self, a: u64) -> usize {
        self.first_ending_after_in(self.sample_of(a), a)
    }

    /// [`Self::first_ending_after`] for a token `a` of sample `i` ([`Self::sample_of`]).
    fn first_ending_after_in(&self, i: usize, a: u64) -> usize {
        let Some(s) = self.samples.get(i) else {
            return self.spans.len();
        };
        // Spans of earlier samples end at or before this one's start <= a; later samples'
        // spans all end after a. So the answer is in this sample's spans or the next one's first.
        let within = match s.uniform {
            Some(t) => (((a - s.start) / t) as usize).min(s.spans),
            None => self.spans[s.first_span..s.first_span + s.spans]
                .partition_point(|&(_, e, _)| e <= a),
        };
        s.first_span + within
    }
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

    /// The span index finds what a binary search of every span finds, for every token, with
    /// samples of uniform frames, of mixed token counts, of frames without tokens and of none.
    #[test]
    fn span_lookup_is_the_binary_search() {
        let samples = [
            Sample::uniform(3, 2),
            Sample::uniform(0, 4),
            Sample::uniform(4, 0),
            Sample::uniform(2, 3),
            Sample::uniform(3, 1),
        ];
        let tokens = [5, 5, 5, 1, 2, 0, 3, 4, 4, 0, 0, 0];
        let index = SpanIndex::new(&samples, &tokens).unwrap();
        assert_eq!(index.seq_len, 15 + 2 + 4 + 6 + 3 + 8 + 1);
        assert_eq!(index.spans.len(), 8);
        for a in 0..=index.seq_len + 2 {
            let want = index.spans.partition_point(|&(_, e, _)| e <= a);
            assert_eq!(index.first_ending_after(a), want, "token {a}");
        }
    }

    /// Rank by rank with a binary search of every span, as first written.
    fn traffic_rank_by_rank(
        samples: &[Sample],
        frame_tokens: &[u64],
        frames_per_rank: &[Vec<usize>],
        ranges_per_rank: &[Vec<(u64, u64)>],
    ) -> (Vec<u64>, Vec<u64>) {
        let owner = frame_owners(frames_per_rank, frame_tokens.len()).unwrap();
        let spans = SpanIndex::new(samples, frame_tokens).unwrap().spans;
        let (mut send, mut recv) = (
            vec![0; ranges_per_rank.len()],
            vec![0; ranges_per_rank.len()],
        );
        for (dst, ranges) in ranges_per_rank.iter().enumerate() {
            for &(a, b) in ranges {
                let first = spans.partition_point(|&(_, end, _)| end <= a);
                for &(s, e, f) in spans[first..].iter().take_while(|sp| sp.0 < b) {
                    if owner[f] != dst {
                        send[owner[f]] += e.min(b) - s.max(a);
                        recv[dst] += e.min(b) - s.max(a);
                    }
                }
            }
        }
        (send, recv)
    }

    /// Sample by sample gives rank by rank's bytes: zigzag ranges over 1 to 12 ranks, frames
    /// dealt at random, and ranges in any order, crossing samples.
    #[test]
    fn sample_major_traffic_is_rank_by_rank() {
        let mut seed = 5u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (seed >> 33) % m
        };
        for case in 0..200 {
            let samples: Vec<Sample> = (0..1 + next(5))
                .map(|_| Sample::uniform(next(6), next(9)))
                .collect();
            let frames: usize = samples.iter().map(|s| s.frames as usize).sum();
            let tokens: Vec<u64> = samples
                .iter()
                .flat_map(|s| std::iter::repeat_n(1 + next(4), s.frames as usize))
                .collect();
            let (u, r) = (1 + next(3) as usize, 1 + next(4) as usize);
            let mut owners = vec![Vec::new(); u * r];
            for f in 0..frames {
                owners[next((u * r) as u64) as usize].push(f);
            }
            let mut lens = Vec::new();
            let mut g = 0;
            for s in &samples {
                let n = s.frames as usize;
                lens.push(tokens[g..g + n].iter().sum::<u64>() + s.text_tokens);
                g += n;
            }
            let mut ranges = crate::balance::ranges_per_rank(&lens, u, r).unwrap();
            if case % 2 == 1 {
                // Arbitrary ranges: each rank's reversed, one merged across a sample boundary.
                ranges.iter_mut().for_each(|v| v.reverse());
                let total: u64 = lens.iter().sum();
                ranges[0].push((0, total));
            }
            let t = reshard_traffic(&samples, &tokens, &owners, &ranges, 1).unwrap();
            let (send, recv) = traffic_rank_by_rank(&samples, &tokens, &owners, &ranges);
            assert_eq!(
                (t.send_bytes_per_rank, t.recv_bytes_per_rank),
                (send, recv),
                "case {case}"
            );
        }
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
