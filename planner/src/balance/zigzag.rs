//! Stage 2 of MM-SP: zigzag token sharding of the merged sequence for 2D attention
//! (Ulysses x zigzag ring), and each rank's causal attention work under it.
//!
//! The shards themselves are the plan contract's ([`mmsp_plan::zigzag`], which the runtime cuts
//! its tensors by): this module re-exports them and adds what the cost model needs, each rank's
//! causal attention work. The planner's multi-modal plans pad every sample to a multiple of
//! 2 x ulysses x ring first ([`super::sample_padding`]), as mmsp-runtime's packed attention
//! requires, so their pieces are all equal.

use crate::error::Result;

pub use mmsp_plan::zigzag::{tokens_per_rank, Piece};

/// [`mmsp_plan::zigzag::ranges_per_rank`], with the planner's error.
pub fn ranges_per_rank(
    sample_lens: &[u64],
    ulysses: usize,
    ring: usize,
) -> Result<Vec<Vec<(u64, u64)>>> {
    Ok(mmsp_plan::zigzag::ranges_per_rank(
        sample_lens,
        ulysses,
        ring,
    )?)
}

/// Causal attention work of query positions `[lo, hi)` of one sample: query i attends to the
/// i + 1 keys at or before it, so the work is `sum_{i=lo}^{hi-1} (i+1) = (hi(hi+1) - lo(lo+1))/2`
/// query-key pairs (the causal half of the s^2 score matrix; Narayanan et al. 2021 count
/// attention as 4*s^2*h FLOPs per layer forward, i.e. proportional to these pairs).
fn causal_pairs(lo: u64, hi: u64) -> f64 {
    let (lo, hi) = (lo as u128, hi as u128);
    ((hi * (hi + 1) - lo * (lo + 1)) / 2) as f64
}

/// Each SP rank's causal attention work, in query-key pairs (multiply by `4 * head_dim * heads`
/// per layer for forward FLOPs). In zigzag ring attention a ring rank's query chunks attend, over
/// the ring steps, to all keys of the same sample at or before them; the `ulysses` ranks of a
/// ring rank split the heads after the all-to-all, so each gets an equal share of that work.
pub fn causal_work_per_rank(sample_lens: &[u64], ulysses: usize, ring: usize) -> Result<Vec<f64>> {
    let ranges = ranges_per_rank(sample_lens, ulysses, ring)?;
    Ok(causal_work_of_ranges(sample_lens, &ranges, ulysses))
}

/// [`causal_work_per_rank`] from the ranks' ranges ([`ranges_per_rank`] of the same
/// `sample_lens`, over a ring of `ranges.len() / ulysses` ranks), so a caller that holds them
/// does not cut the samples a second time. Each range lies in one sample (the zigzag never
/// crosses a sample's end) and a rank's ranges come in sample order, so one walk over the
/// sample starts per rank places them.
pub fn causal_work_of_ranges(
    sample_lens: &[u64],
    ranges: &[Vec<(u64, u64)>],
    ulysses: usize,
) -> Vec<f64> {
    let mut ends = Vec::with_capacity(sample_lens.len());
    let mut at = 0u64;
    for &l in sample_lens {
        at += l;
        ends.push(at);
    }
    let ulysses = ulysses.max(1);
    let mut out = Vec::with_capacity(ranges.len());
    for group in ranges.chunks(ulysses) {
        // -0.0, the neutral element `Sum` starts from: a rank with no token gets -0.0 as before.
        let mut ring_work = -0.0;
        for rank in group {
            let mut i = 0;
            for &(a, b) in rank {
                while ends[i] <= a {
                    i += 1;
                }
                let start = ends[i] - sample_lens[i];
                ring_work += causal_pairs(a - start, b - start);
            }
        }
        out.extend(std::iter::repeat_n(ring_work / ulysses as f64, group.len()));
    }
    out
}

/// Max over mean of a per-rank load (1.0 for a perfectly balanced or an all-zero load).
pub fn imbalance(loads: &[f64]) -> f64 {
    if loads.is_empty() {
        return 1.0;
    }
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    let max = loads.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 {
        max / mean
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Checks that the ranges are non-empty and tile [0, total) exactly (no gap, no overlap).
    fn assert_partition(ranges: &[Vec<(u64, u64)>], total: u64) -> std::result::Result<(), String> {
        let mut all: Vec<(u64, u64)> = ranges.iter().flatten().copied().collect();
        all.sort_unstable();
        let mut at = 0;
        for &(a, b) in &all {
            if a >= b {
                return Err(format!("empty or reversed range ({a}, {b})"));
            }
            if a != at {
                return Err(format!("gap or overlap at {at}: next range starts at {a}"));
            }
            at = b;
        }
        if at != total {
            return Err(format!("ranges end at {at}, expected {total}"));
        }
        Ok(())
    }

    fn factorisations(n: usize) -> impl Iterator<Item = (usize, usize)> {
        (1..=n)
            .filter(move |u| n.is_multiple_of(*u))
            .map(move |u| (u, n / u))
    }

    #[test]
    fn every_factorisation_up_to_64_partitions_and_balances() {
        for n in 1..=64usize {
            for (u, r) in factorisations(n) {
                // Divisible single sample: exact partition and causal work within 1% of the mean.
                let s = (2 * n * 5) as u64;
                let ranges = ranges_per_rank(&[s], u, r).unwrap();
                assert_eq!(ranges.len(), n);
                assert_partition(&ranges, s).unwrap_or_else(|e| panic!("u={u} r={r}: {e}"));
                let tokens = tokens_per_rank(&ranges);
                assert!(tokens.iter().all(|&t| t == s / n as u64), "u={u} r={r}");
                let work = causal_work_per_rank(&[s], u, r).unwrap();
                let mean = work.iter().sum::<f64>() / n as f64;
                for (k, w) in work.iter().enumerate() {
                    assert!(
                        (w - mean).abs() <= 0.01 * mean,
                        "u={u} r={r} rank {k}: work {w} vs mean {mean}"
                    );
                }
                // Not divisible: still an exact partition, ranks within 2 tokens of each other.
                for extra in [1u64, 7, (2 * n - 1) as u64] {
                    let s2 = s + extra;
                    let ranges = ranges_per_rank(&[s2], u, r).unwrap();
                    assert_partition(&ranges, s2).unwrap_or_else(|e| panic!("u={u} r={r}: {e}"));
                    let t = tokens_per_rank(&ranges);
                    let (mn, mx) = (t.iter().min().unwrap(), t.iter().max().unwrap());
                    assert!(mx - mn <= 2, "u={u} r={r} S={s2}: tokens {mn}..{mx}");
                }
            }
        }
    }

    #[test]
    fn work_is_conserved_and_ulysses_shares_equally() {
        let lens = [1000u64, 37, 4096, 1];
        let total: f64 = lens.iter().map(|&l| causal_pairs(0, l)).sum();
        for (u, r) in factorisations(12) {
            let w = causal_work_per_rank(&lens, u, r).unwrap();
            let sum: f64 = w.iter().sum();
            assert!((sum - total).abs() <= 1e-9 * total, "u={u} r={r}");
            for g in w.chunks(u) {
                assert!(g.iter().all(|&x| x == g[0]));
            }
        }
    }

    #[test]
    fn zigzag_beats_contiguous_split() {
        // Contiguous split of one causal sample over 8 ranks: last rank does 15/8 of the mean.
        let s = 8192u64;
        let contiguous: Vec<f64> = (0..8)
            .map(|k| causal_pairs(k * s / 8, (k + 1) * s / 8))
            .collect();
        let zig = causal_work_per_rank(&[s], 1, 8).unwrap();
        assert!(imbalance(&contiguous) > 1.8);
        assert!(imbalance(&zig) < 1.001);
    }

    #[test]
    fn bad_degrees_are_errors() {
        assert!(ranges_per_rank(&[10], 0, 2).is_err());
        assert!(causal_work_per_rank(&[10], 2, 0).is_err());
        assert!(ranges_per_rank(&[u64::MAX, 2], 1, 1).is_err());
    }

    /// The work as first computed, from the contract's pieces (each knows its sample).
    fn causal_work_of_pieces(sample_lens: &[u64], ulysses: usize, ring: usize) -> Vec<f64> {
        let pieces = mmsp_plan::zigzag::pieces_per_rank(sample_lens, ulysses, ring).unwrap();
        let mut out = Vec::new();
        for group in pieces.chunks(ulysses) {
            let w: f64 = group
                .iter()
                .flatten()
                .map(|p| causal_pairs(p.lo, p.hi))
                .sum();
            out.extend(std::iter::repeat_n(w / ulysses as f64, ulysses));
        }
        out
    }

    proptest! {
        #[test]
        fn work_from_ranges_is_the_pieces_work(
            lens in proptest::collection::vec(0u64..3000, 0..12),
            u in 1usize..9,
            r in 1usize..9,
        ) {
            let w = causal_work_per_rank(&lens, u, r).unwrap();
            let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
            prop_assert_eq!(bits(w), bits(causal_work_of_pieces(&lens, u, r)));
        }

        #[test]
        fn varlen_partition_is_exact(
            lens in proptest::collection::vec(0u64..3000, 0..12),
            u in 1usize..9,
            r in 1usize..9,
        ) {
            let ranges = ranges_per_rank(&lens, u, r).unwrap();
            prop_assert_eq!(ranges.len(), u * r);
            let total: u64 = lens.iter().sum();
            prop_assert!(assert_partition(&ranges, total).is_ok(), "{:?}", assert_partition(&ranges, total));
            // No range crosses a sample boundary.
            let mut starts = vec![0u64];
            for l in &lens { starts.push(starts.last().unwrap() + l); }
            for &(a, b) in ranges.iter().flatten() {
                let i = starts.partition_point(|&x| x <= a) - 1;
                prop_assert!(b <= starts[i + 1]);
            }
        }
    }
}
