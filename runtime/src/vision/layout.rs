//! The packed token sequence of a multi-modal step and the two MM-SP placements over it:
//! stage 1 (which SP rank encodes which frame) and stage 2 (which SP rank holds which token
//! ranges for the LLM), and the map between them that the re-shard executes.
//!
//! Token layout, as the planner's (`planner/src/balance/reshard.rs`): samples packed in
//! order, each sample = its frames' tokens (frame by frame, `tokens_per_frame` each) followed
//! by its text tokens. Frames are numbered globally (frames of all samples, in order). Ranks
//! are SP ranks (`ring_idx * ulysses + ulysses_idx`).
use crate::error::{Result, RuntimeError};

/// One sample of the packed sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSpec {
    pub frames: usize,
    pub text_tokens: usize,
}

/// Where every frame's tokens sit in the packed sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLayout {
    pub samples: Vec<SampleSpec>,
    pub tokens_per_frame: usize,
    /// Global position of each frame's first token.
    frame_starts: Vec<usize>,
    seq_len: usize,
}

impl TokenLayout {
    pub fn new(samples: &[SampleSpec], tokens_per_frame: usize) -> Result<TokenLayout> {
        if tokens_per_frame == 0 {
            return Err(RuntimeError::Config("tokens_per_frame must be >= 1".into()));
        }
        let mut frame_starts = Vec::new();
        let mut at = 0usize;
        let overflow = || RuntimeError::Shape("the packed sequence overflows usize".into());
        for s in samples {
            for _ in 0..s.frames {
                frame_starts.push(at);
                at = at.checked_add(tokens_per_frame).ok_or_else(overflow)?;
            }
            at = at.checked_add(s.text_tokens).ok_or_else(overflow)?;
        }
        Ok(TokenLayout {
            samples: samples.to_vec(),
            tokens_per_frame,
            frame_starts,
            seq_len: at,
        })
    }

    /// Tokens of the packed sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Frames of all samples.
    pub fn frames(&self) -> usize {
        self.frame_starts.len()
    }

    /// LLM tokens of each sample.
    pub fn sample_lens(&self) -> Vec<usize> {
        self.samples
            .iter()
            .map(|s| s.frames * self.tokens_per_frame + s.text_tokens)
            .collect()
    }

    /// Token range [start, end) of global frame `g`.
    pub fn frame_span(&self, g: usize) -> (usize, usize) {
        let s = self.frame_starts[g];
        (s, s + self.tokens_per_frame)
    }

    /// Whether each position of the sequence is a vision token.
    pub fn vision_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.seq_len];
        for &s in &self.frame_starts {
            m[s..s + self.tokens_per_frame].fill(true);
        }
        m
    }
}

/// Stage 1 when the plan gives no `vision.frames_per_rank`: what the planner's
/// `balance_frames` returns for frames of equal cost (one resolution, as the runtime's
/// encoder has): LPT deals them round-robin, which no exchange improves, and the class
/// expansion hands each rank a contiguous run, the first `frames % ranks` ranks one more.
pub fn balanced_frames(frames: usize, ranks: usize) -> Result<Vec<Vec<usize>>> {
    if ranks == 0 {
        return Err(RuntimeError::Layout("need at least one SP rank".into()));
    }
    let (base, rem) = (frames / ranks, frames % ranks);
    let mut at = 0;
    Ok((0..ranks)
        .map(|r| {
            let n = base + usize::from(r < rem);
            let v = (at..at + n).collect();
            at += n;
            v
        })
        .collect())
}

/// A run of vision tokens that moves from the rank that encoded it to the rank that holds it
/// for the LLM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub src: usize,
    pub dst: usize,
    /// Global position of the first token.
    pub pos: usize,
    pub len: usize,
    /// Row of the first token in the source's encoder output (its frames in the order of
    /// `frames_per_rank[src]`, `tokens_per_frame` rows each).
    pub src_row: usize,
    /// Row of the first token in the destination's local shard.
    pub dst_row: usize,
}

/// Stage 1 -> stage 2 for every SP rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReshardMap {
    pub ranks: usize,
    /// Vision-token runs, by destination rank, then in the destination's local order.
    pub segments: Vec<Segment>,
    /// Per rank: local rows of its text tokens, ascending.
    pub text_rows: Vec<Vec<usize>>,
    /// Per rank: tokens of its local shard.
    pub local_len: Vec<usize>,
    /// Per rank: rows of its encoder output (frames x tokens_per_frame).
    pub encoded_rows: Vec<usize>,
}

impl ReshardMap {
    /// `frames_per_rank[r]`: the global frames rank r encodes, in its encoder-output order;
    /// `ranges_per_rank[r]`: rank r's token ranges [start, end) in local order. The frames
    /// must be a partition of the layout's frames and the ranges one of [0, seq_len).
    pub fn new(
        layout: &TokenLayout,
        frames_per_rank: &[Vec<usize>],
        ranges_per_rank: &[Vec<(usize, usize)>],
    ) -> Result<ReshardMap> {
        let ranks = frames_per_rank.len();
        if ranks == 0 || ranges_per_rank.len() != ranks {
            return Err(RuntimeError::Layout(format!(
                "stage 1 has {ranks} ranks and stage 2 has {}; they must be the same SP group",
                ranges_per_rank.len()
            )));
        }
        let nf = layout.frames();
        let t = layout.tokens_per_frame;
        // Owner and encoder-output row of every frame.
        let mut owner = vec![(usize::MAX, 0usize); nf];
        for (r, fs) in frames_per_rank.iter().enumerate() {
            for (i, &f) in fs.iter().enumerate() {
                match owner.get_mut(f) {
                    Some(o) if o.0 == usize::MAX => *o = (r, i * t),
                    Some(_) => {
                        return Err(RuntimeError::Layout(format!(
                            "frame {f} is assigned to more than one rank"
                        )))
                    }
                    None => {
                        return Err(RuntimeError::Layout(format!(
                            "frame {f} does not exist ({nf} frames)"
                        )))
                    }
                }
            }
        }
        if let Some(f) = owner.iter().position(|o| o.0 == usize::MAX) {
            return Err(RuntimeError::Layout(format!(
                "frame {f} is not assigned to any rank"
            )));
        }
        // The ranges must tile the sequence.
        let mut all: Vec<(usize, usize, usize)> = ranges_per_rank
            .iter()
            .enumerate()
            .flat_map(|(r, rs)| rs.iter().map(move |&(a, b)| (a, b, r)))
            .collect();
        all.sort_unstable();
        let mut at = 0;
        for &(a, b, r) in &all {
            if a > b || a != at {
                return Err(RuntimeError::Layout(format!(
                    "stage-2 ranges do not tile [0, {}): rank {r} has ({a}, {b}) where {at} was expected",
                    layout.seq_len()
                )));
            }
            at = b;
        }
        if at != layout.seq_len() {
            return Err(RuntimeError::Layout(format!(
                "stage-2 ranges end at {at}, the sequence has {} tokens",
                layout.seq_len()
            )));
        }

        let starts = &layout.frame_starts;
        let mut segments = Vec::new();
        let mut text_rows = Vec::with_capacity(ranks);
        let mut local_len = Vec::with_capacity(ranks);
        for (dst, rs) in ranges_per_rank.iter().enumerate() {
            let mut row = 0;
            let mut text = Vec::new();
            for &(a, b) in rs {
                // Frames overlapping [a, b): from the last frame starting at or before a.
                let mut g = starts.partition_point(|&s| s + t <= a);
                let mut p = a;
                while p < b {
                    let (fs, fe) = match starts.get(g) {
                        Some(&s) => (s, s + t),
                        None => (usize::MAX, usize::MAX),
                    };
                    if p < fs {
                        // Text up to the next frame (or the end of the range).
                        let e = fs.min(b);
                        text.extend((p - a + row)..(e - a + row));
                        p = e;
                    } else {
                        let e = fe.min(b);
                        let (src, base) = owner[g];
                        segments.push(Segment {
                            src,
                            dst,
                            pos: p,
                            len: e - p,
                            src_row: base + (p - fs),
                            dst_row: row + (p - a),
                        });
                        p = e;
                        g += 1;
                    }
                }
                row += b - a;
            }
            text_rows.push(text);
            local_len.push(row);
        }
        Ok(ReshardMap {
            ranks,
            segments,
            text_rows,
            local_len,
            encoded_rows: frames_per_rank.iter().map(|f| f.len() * t).collect(),
        })
    }

    /// Vision tokens each rank sends to each rank (`[src][dst]`), self included.
    pub fn traffic_tokens(&self) -> Vec<Vec<usize>> {
        let mut m = vec![vec![0; self.ranks]; self.ranks];
        for s in &self.segments {
            m[s.src][s.dst] += s.len;
        }
        m
    }
}

/// The runtime LLM's stage-2 ranges by SP rank for one unpacked sequence of `seq_len`
/// tokens: its zigzag shards ([`crate::shard::Zigzag`], as [`crate::train::Trainer::new`]
/// holds them). Packed samples: [`crate::packed::Packing::ranges_per_sp_rank`].
pub fn zigzag_ranges(
    seq_len: usize,
    ulysses: usize,
    ring: usize,
) -> Result<Vec<Vec<(usize, usize)>>> {
    let z = crate::shard::Zigzag::new(seq_len, ulysses, ring)?;
    Ok((0..ring * ulysses)
        .map(|sp| z.local_ranges(sp / ulysses, sp % ulysses).to_vec())
        .collect())
}

/// For each SP rank of DP replica `dp`, its rank in the world group of `layout` (to run the
/// re-shard over the world communicator when there is no SP-group communicator).
pub fn world_ranks_of_sp(layout: &crate::plan::Layout, dp: usize) -> Vec<usize> {
    (0..layout.sp_size())
        .map(|sp| {
            layout.global_rank(crate::plan::Coords {
                dp,
                ring: sp / layout.ulysses,
                ulysses: sp % layout.ulysses,
            })
        })
        .collect()
}
