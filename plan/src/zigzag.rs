//! Stage 2 of MM-SP: the zigzag token shards of 2D attention (Ulysses x zigzag ring), the one
//! convention the planner writes into `tokens.ranges_per_rank` and the runtime cuts its
//! tensors by.
//!
//! Each sample of length L is cut into `2*ring` chunks; ring rank r holds chunks `r` and
//! `2*ring-1-r`; each of those chunks is cut into `ulysses` contiguous sub-chunks and Ulysses
//! rank u holds sub-chunk u of both. `sp_rank = ring_idx * ulysses + ulysses_idx`. Packed
//! samples are split individually (varlen zigzag, as LongVILA's `zigzag_ring_varlen`), so a rank
//! holds up to two ranges per sample. When L is not divisible, the `L % (2*ring)` extra tokens
//! go first to the first-half chunks (ring ranks 0, 1, ...) and then to the second-half chunks
//! of ranks 0, 1, ..., so that ring ranks differ by at most one token; inside a chunk, the
//! extra tokens go to the first sub-chunks of a first-half chunk and to the last sub-chunks of
//! a second-half chunk.

use crate::error::{PlanError, Result};

/// A contiguous piece of one sample held by one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset of the sample in the packed sequence.
    pub sample_start: u64,
    /// Half-open range inside the sample.
    pub lo: u64,
    pub hi: u64,
}

/// The most SP ranks the arithmetic accepts (2^20).
pub const MAX_SP: usize = 1 << 20;

fn check_degrees(ulysses: usize, ring: usize) -> Result<()> {
    if ulysses == 0 || ring == 0 {
        return Err(PlanError::shape(
            "sequence-parallel degrees",
            format!("ulysses ({ulysses}) and ring ({ring}) must both be at least 1"),
        ));
    }
    if ulysses.checked_mul(ring).is_none_or(|n| n > MAX_SP) {
        return Err(PlanError::shape(
            "sequence-parallel degrees",
            format!("ulysses x ring = {ulysses} x {ring} is too large (at most {MAX_SP})"),
        ));
    }
    Ok(())
}

/// Boundaries (parts + 1 offsets) of `len` cut into `parts` near-equal pieces, `extra(i)` saying
/// whether piece i gets one of the `len % parts` extra tokens.
fn bounds(len: u64, parts: u64, extra: impl Fn(u64, u64) -> bool) -> Vec<u64> {
    let base = len / parts;
    let rem = len % parts;
    let mut out = Vec::with_capacity(parts as usize + 1);
    let mut at = 0;
    out.push(0);
    for i in 0..parts {
        at += base + u64::from(extra(i, rem));
        out.push(at);
    }
    debug_assert_eq!(at, len);
    out
}

/// The `2 * ring + 1` chunk boundaries of a sample of `len` tokens.
fn chunk_bounds(len: u64, ring: u64) -> Vec<u64> {
    // Extras: first-half chunks c < r for c < rem; then second-half chunk 2r-1-k for k < rem - r.
    bounds(len, 2 * ring, |c, rem| {
        if c < ring {
            c < rem
        } else {
            (2 * ring - 1 - c) < rem.saturating_sub(ring)
        }
    })
}

/// Offset of sub-chunk `s` (of `ulysses`) inside chunk `c` (of `len` tokens) of a ring of
/// `ring`: the `len % ulysses` extra tokens go to the first sub-chunks of a first-half chunk and
/// to the last sub-chunks of a second-half chunk. Arithmetic, so that cutting every chunk of a
/// large ring allocates nothing.
fn sub_offset(len: u64, ulysses: u64, c: u64, ring: u64, s: u64) -> u64 {
    let (base, rem) = (len / ulysses, len % ulysses);
    let extras_before = if c < ring {
        s.min(rem)
    } else {
        s.saturating_sub(ulysses - rem)
    };
    s * base + extras_before
}

/// The `ulysses + 1` sub-chunk boundaries of chunk `c` (of `len` tokens) of a ring of `ring`.
fn sub_bounds(len: u64, ulysses: u64, c: u64, ring: u64) -> Vec<u64> {
    (0..=ulysses)
        .map(|s| sub_offset(len, ulysses, c, ring, s))
        .collect()
}

/// Every SP rank's pieces (indexed by sp_rank), in sample order and, within a sample, the
/// first-half chunk's piece before the second-half chunk's. Empty pieces are omitted.
pub fn pieces_per_rank(
    sample_lens: &[u64],
    ulysses: usize,
    ring: usize,
) -> Result<Vec<Vec<Piece>>> {
    check_degrees(ulysses, ring)?;
    let (u, r) = (ulysses as u64, ring as u64);
    let mut out = vec![Vec::new(); ulysses * ring];
    let mut sample_start: u64 = 0;
    for (i, &len) in sample_lens.iter().enumerate() {
        let chunks = chunk_bounds(len, r);
        for ring_idx in 0..r {
            for chunk in [ring_idx, 2 * r - 1 - ring_idx] {
                let (c_lo, c_hi) = (chunks[chunk as usize], chunks[chunk as usize + 1]);
                let at = |s: u64| c_lo + sub_offset(c_hi - c_lo, u, chunk, r, s);
                for uly_idx in 0..u {
                    let (lo, hi) = (at(uly_idx), at(uly_idx + 1));
                    if hi > lo {
                        out[(ring_idx * u + uly_idx) as usize].push(Piece {
                            sample_start,
                            lo,
                            hi,
                        });
                    }
                }
            }
        }
        sample_start = sample_start.checked_add(len).ok_or_else(|| {
            PlanError::shape(
                "sample lengths",
                format!("the packed sequence overflows u64 at sample {i}"),
            )
        })?;
    }
    Ok(out)
}

/// The token ranges of each SP rank (indexed by `sp_rank = ring_idx * ulysses + ulysses_idx`):
/// half-open `(start, end)` global offsets in the packed sequence, in sample order and, within a
/// sample, first-half chunk before second-half chunk. Empty pieces are omitted. The ranges of
/// all ranks form an exact partition of `[0, sum(sample_lens))`.
pub fn ranges_per_rank(
    sample_lens: &[u64],
    ulysses: usize,
    ring: usize,
) -> Result<Vec<Vec<(u64, u64)>>> {
    Ok(pieces_per_rank(sample_lens, ulysses, ring)?
        .into_iter()
        .map(|ps| {
            ps.into_iter()
                .map(|p| (p.sample_start + p.lo, p.sample_start + p.hi))
                .collect()
        })
        .collect())
}

/// Tokens held by each SP rank.
pub fn tokens_per_rank(ranges: &[Vec<(u64, u64)>]) -> Vec<u64> {
    ranges
        .iter()
        .map(|rs| rs.iter().map(|(a, b)| b - a).sum())
        .collect()
}

/// The shards of one sequence over a ulysses x ring SP group, every shard non-empty: what the
/// runtime cuts its tensors by (`usize` offsets into the sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zigzag {
    pub seq_len: usize,
    pub ulysses: usize,
    pub ring: usize,
    /// The 2 x ring + 1 chunk boundaries.
    chunks: Vec<usize>,
}

impl Zigzag {
    /// Checks that every sub-chunk gets at least one token.
    pub fn new(seq_len: usize, ulysses: usize, ring: usize) -> Result<Zigzag> {
        check_degrees(ulysses, ring)?;
        let parts = 2 * ring * ulysses;
        if seq_len < parts {
            return Err(PlanError::shape(
                "sequence length",
                format!("a sequence of {seq_len} tokens cannot be cut into 2 x ring {ring} x ulysses {ulysses} = {parts} non-empty shards"),
            ));
        }
        let chunks = chunk_bounds(seq_len as u64, ring as u64);
        Ok(Zigzag {
            seq_len,
            ulysses,
            ring,
            chunks: chunks.into_iter().map(|b| b as usize).collect(),
        })
    }

    /// The two chunks of ring rank r.
    pub fn ring_chunks(&self, r: usize) -> [usize; 2] {
        [r, 2 * self.ring - 1 - r]
    }

    /// Length of chunk c.
    pub fn chunk_len(&self, c: usize) -> usize {
        self.chunks[c + 1] - self.chunks[c]
    }

    /// Lengths (a, b) of ring rank r's two chunks.
    pub fn ring_lens(&self, r: usize) -> (usize, usize) {
        let [a, b] = self.ring_chunks(r);
        (self.chunk_len(a), self.chunk_len(b))
    }

    /// Offsets of the sub-chunks of chunk c (ulysses + 1, from 0).
    fn sub_offsets(&self, c: usize) -> Vec<usize> {
        sub_bounds(
            self.chunk_len(c) as u64,
            self.ulysses as u64,
            c as u64,
            self.ring as u64,
        )
        .into_iter()
        .map(|b| b as usize)
        .collect()
    }

    /// Lengths of the sub-chunks of chunk c.
    pub fn sub_lens(&self, c: usize) -> Vec<usize> {
        self.sub_offsets(c)
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect()
    }

    /// (a, b) lengths held by rank (r, u) before the Ulysses all-to-all.
    pub fn local_lens(&self, r: usize, u: usize) -> (usize, usize) {
        let [a, b] = self.local_ranges(r, u);
        (a.1 - a.0, b.1 - b.0)
    }

    /// Token ranges [start, end) of the sequence held by rank (r, u), in local order.
    pub fn local_ranges(&self, r: usize, u: usize) -> [(usize, usize); 2] {
        self.ring_chunks(r).map(|c| {
            let subs = self.sub_offsets(c);
            (self.chunks[c] + subs[u], self.chunks[c] + subs[u + 1])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that the ranges are non-empty and tile [0, total) exactly (no gap, no overlap).
    fn assert_partition(ranges: &[Vec<(u64, u64)>], total: u64) {
        let mut all: Vec<(u64, u64)> = ranges.iter().flatten().copied().collect();
        all.sort_unstable();
        let mut at = 0;
        for &(a, b) in &all {
            assert!(a < b, "empty or reversed range ({a}, {b})");
            assert_eq!(a, at, "gap or overlap");
            at = b;
        }
        assert_eq!(at, total);
    }

    #[test]
    fn hand_checked_layout_u2_r2() {
        // S = 16, 4 chunks of 4: ring 0 holds chunks 0 and 3, ring 1 holds chunks 1 and 2.
        let r = ranges_per_rank(&[16], 2, 2).unwrap();
        assert_eq!(r[0], vec![(0, 2), (12, 14)]);
        assert_eq!(r[1], vec![(2, 4), (14, 16)]);
        assert_eq!(r[2], vec![(4, 6), (8, 10)]);
        assert_eq!(r[3], vec![(6, 8), (10, 12)]);
        // Two packed samples are zigzagged individually.
        let r = ranges_per_rank(&[4, 8], 1, 2).unwrap();
        assert_eq!(r[0], vec![(0, 1), (3, 4), (4, 6), (10, 12)]);
        assert_eq!(r[1], vec![(1, 2), (2, 3), (6, 8), (8, 10)]);
        // 11 tokens on 2 x 2: the 3 extra go to chunks 0, 1 and then 3 (ring rank 0's second).
        let r = ranges_per_rank(&[11], 2, 2).unwrap();
        assert_eq!(r[0], vec![(0, 2), (8, 9)]);
        assert_eq!(r[1], vec![(2, 3), (9, 11)]);
    }

    /// The runtime's per-sequence shards are the plan's ranges, for every length, divisible or
    /// not, and every factorisation up to 24 ranks; they partition the sequence and ranks
    /// differ by at most two tokens.
    #[test]
    fn zigzag_is_the_plans_ranges_for_every_length() {
        for n in 1..=24usize {
            for u in (1..=n).filter(|u| n.is_multiple_of(*u)) {
                let r = n / u;
                for len in [2 * n, 2 * n + 1, 2 * n * 5 + 7, 2 * n * 3 + 2 * n - 1] {
                    let ranges = ranges_per_rank(&[len as u64], u, r).unwrap();
                    assert_partition(&ranges, len as u64);
                    let z = Zigzag::new(len, u, r).unwrap();
                    for ring in 0..r {
                        for uly in 0..u {
                            let got: Vec<(u64, u64)> = z
                                .local_ranges(ring, uly)
                                .iter()
                                .map(|&(a, b)| (a as u64, b as u64))
                                .collect();
                            assert_eq!(got, ranges[ring * u + uly], "len {len} u {u} r {r}");
                        }
                    }
                    let t = tokens_per_rank(&ranges);
                    let (mn, mx) = (t.iter().min().unwrap(), t.iter().max().unwrap());
                    assert!(mx - mn <= 2, "u={u} r={r} S={len}: tokens {mn}..{mx}");
                }
            }
        }
    }

    /// The arithmetic sub-chunk offsets are the extra-token rule written as a deal of the
    /// `len % ulysses` extras (first sub-chunks of a first-half chunk, last of a second-half).
    #[test]
    fn sub_offsets_deal_the_extra_tokens_by_the_rule() {
        for u in 1..=9u64 {
            for len in 0..40u64 {
                for (c, ring) in [(0u64, 2u64), (3, 2)] {
                    let first = c < ring;
                    let rule = bounds(
                        len,
                        u,
                        |s, rem| {
                            if first {
                                s < rem
                            } else {
                                (u - 1 - s) < rem
                            }
                        },
                    );
                    assert_eq!(sub_bounds(len, u, c, ring), rule, "len {len} u {u} c {c}");
                }
            }
        }
    }

    #[test]
    fn bad_degrees_and_lengths_are_errors() {
        assert!(ranges_per_rank(&[10], 0, 2).is_err());
        assert!(ranges_per_rank(&[u64::MAX, 2], 1, 1).is_err());
        assert!(ranges_per_rank(&[10], 1 << 11, 1 << 11).is_err());
        let e = Zigzag::new(7, 2, 2).unwrap_err().to_string();
        assert!(e.contains("8 non-empty shards"), "{e}");
    }
}
