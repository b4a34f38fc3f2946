//! Stage 1 of MM-SP: spread the video frames of a step over all GPUs of the sequence-parallel
//! group so that the vision encoder's work (FLOPs per frame, which depend on resolution) is
//! balanced. Frames of one cost form a class and are counted, not listed: greedy
//! longest-processing-time (LPT) by class, a local search of small exchanges, then, up to
//! [`MILP_MAX_RANKS`] ranks, a makespan MILP over the class counts ([`super::milp`]) with a time
//! limit, warm-started from the greedy result and kept only when better.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::Instant;

use serde::Serialize;

use super::milp;
use super::zigzag::imbalance;
use crate::error::{Error, Result};
use crate::spec::samples::Sample;
use crate::spec::vision::VisionSpec;

/// The most ranks the MILP is tried on; above, LPT with local search stands. Measured on the
/// shipped manifest with its frames x 1, x 10 and x 60 (5,280 to 316,800 frames,
/// `milp_gain_over_lpt`), the MILP never beat LPT with local search at 64 to 8192 ranks, and
/// at 1024 to 8192 ranks it ran into its time limit wherever LPT was not provably optimal (0.5
/// to 0.8 s a plan, and an answer that depended on the machine's speed). Below the bound the
/// result is as before.
pub const MILP_MAX_RANKS: usize = 512;

/// How the frame assignment was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The MILP's solution (optimal, within the gap, or the best found in the time limit).
    Milp,
    /// Greedy LPT: the MILP was skipped (LPT already optimal, too large), failed, or was no better.
    Lpt,
}

/// Options of [`balance_frames`].
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceOptions {
    /// Wall-clock limit handed to the MILP solver, in seconds.
    pub time_limit_s: f64,
    /// Relative MIP gap at which the solver may stop.
    pub mip_gap: f64,
    /// Solve the MILP at all (false = LPT only).
    pub use_milp: bool,
}

impl Default for BalanceOptions {
    fn default() -> Self {
        BalanceOptions {
            time_limit_s: 0.5,
            mip_gap: 1e-4,
            use_milp: true,
        }
    }
}

/// The stage-1 frame placement and how good it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameAssignment {
    /// Global frame indices (frames of all samples, in order) per rank, ascending in each rank.
    pub frames_per_rank: Vec<Vec<usize>>,
    /// Cost (training FLOPs of the vision encoder) per rank.
    pub load_per_rank: Vec<f64>,
    /// Max / mean load of the naive contiguous split (equal frame counts, in order).
    pub imbalance_before: f64,
    /// Max / mean load of this assignment.
    pub imbalance_after: f64,
    pub method: Method,
    /// Solver tried: "microlp", "highs", or "none" when the MILP was not attempted.
    pub solver: &'static str,
    /// Time spent in [`balance_frames`] (LPT + MILP), in seconds.
    pub solve_time_s: f64,
}

/// Training FLOPs of every frame of `samples`, in global frame order (sample by sample).
/// Errors when the samples hold no frame at all (nothing for the vision encoder to do).
pub fn frame_costs(samples: &[Sample], vision: &VisionSpec) -> Result<Vec<f64>> {
    let total: u64 = samples.iter().map(|s| s.frames).sum();
    if total == 0 {
        return Err(Error::invalid(
            "samples",
            "no video frames to balance over the vision encoder (every sample has 0 frames)",
        ));
    }
    let total = usize::try_from(total)
        .ok()
        .filter(|&t| t <= 1 << 32)
        .ok_or_else(|| Error::invalid("samples", format!("{total} frames is too many")))?;
    let mut out = Vec::with_capacity(total);
    for s in samples {
        let c = vision.flops_per_frame(s.resolution);
        out.extend(std::iter::repeat_n(c, s.frames as usize));
    }
    Ok(out)
}

/// The naive split: rank r gets the r-th contiguous block of frames (equal counts, the first
/// `frames % ranks` ranks one more).
pub fn contiguous_split(frames: usize, ranks: usize) -> Vec<Vec<usize>> {
    let ranks = ranks.max(1);
    let (base, rem) = (frames / ranks, frames % ranks);
    let mut at = 0;
    (0..ranks)
        .map(|r| {
            let n = base + usize::from(r < rem);
            let v = (at..at + n).collect();
            at += n;
            v
        })
        .collect()
}

#[derive(PartialEq)]
struct Slot(f64, usize);
impl Eq for Slot {}
impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Slot {
    // Min-heap on (load, rank) through BinaryHeap's max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}

/// Greedy longest-processing-time: frames by decreasing cost (ties: lower index first), each to
/// the currently least-loaded rank (ties: lower rank). Within 4/3 of optimal (Graham 1969).
pub fn lpt(frame_costs: &[f64], ranks: usize) -> Vec<Vec<usize>> {
    let ranks = ranks.max(1);
    let mut order: Vec<usize> = (0..frame_costs.len()).collect();
    order.sort_by(|&a, &b| frame_costs[b].total_cmp(&frame_costs[a]).then(a.cmp(&b)));
    let mut heap: BinaryHeap<Slot> = (0..ranks).map(|r| Slot(0.0, r)).collect();
    let mut out = vec![Vec::new(); ranks];
    for f in order {
        if let Some(Slot(load, r)) = heap.pop() {
            out[r].push(f);
            heap.push(Slot(load + frame_costs[f], r));
        }
    }
    for v in &mut out {
        v.sort_unstable();
    }
    out
}

/// The loads of [`contiguous_split`] (the same sums), without listing its frames.
fn contiguous_loads(frame_costs: &[f64], ranks: usize) -> Vec<f64> {
    let ranks = ranks.max(1);
    let (base, rem) = (frame_costs.len() / ranks, frame_costs.len() % ranks);
    let mut at = 0;
    (0..ranks)
        .map(|r| {
            let n = base + usize::from(r < rem);
            at += n;
            frame_costs[at - n..at].iter().sum()
        })
        .collect()
}

fn loads(frame_costs: &[f64], assignment: &[Vec<usize>]) -> Vec<f64> {
    assignment
        .iter()
        .map(|fs| fs.iter().map(|&f| frame_costs[f]).sum())
        .collect()
}

/// Assign frames (with per-frame costs, e.g. from [`frame_costs`]) to `ranks` ranks, minimising
/// the maximum load. Ranks left without frames are fine (more ranks than frames).
pub fn balance_frames(
    frame_costs: &[f64],
    ranks: usize,
    opts: &BalanceOptions,
) -> Result<FrameAssignment> {
    let start = Instant::now();
    if ranks == 0 {
        return Err(Error::invalid("ranks", "need at least one rank"));
    }
    if frame_costs.is_empty() {
        return Err(Error::invalid(
            "frames",
            "no video frames to balance over the vision encoder",
        ));
    }
    if let Some((i, c)) = frame_costs
        .iter()
        .enumerate()
        .find(|(_, c)| !(c.is_finite() && **c >= 0.0))
    {
        return Err(Error::invalid(
            "frame cost",
            format!("frame {i} has cost {c}; costs must be finite and non-negative"),
        ));
    }

    let before = imbalance(&contiguous_loads(frame_costs, ranks));
    let classes = Classes::new(frame_costs);
    // Greedy LPT, then pairwise move/swap local search on the per-class counts.
    let mut counts = classes.lpt_counts(ranks);
    improve_counts(&classes.costs, &mut counts);
    let greedy = classes.expand(&counts, ranks);
    let greedy_loads = loads(frame_costs, &greedy);
    let greedy_max = greedy_loads.iter().copied().fold(0.0, f64::max);

    // Lower bound on the makespan: max(mean load, largest frame).
    let total: f64 = frame_costs.iter().sum();
    let biggest = frame_costs.iter().copied().fold(0.0, f64::max);
    let bound = (total / ranks as f64).max(biggest);
    let lpt_is_optimal = greedy_max <= bound * (1.0 + opts.mip_gap) + 1e-12 * bound;

    let mut best = (greedy, greedy_loads, Method::Lpt);
    let mut solver = "none";
    if opts.use_milp && ranks <= MILP_MAX_RANKS && !lpt_is_optimal && total > 0.0 {
        solver = milp::SOLVER_NAME;
        // Zero-cost frames are free: show them to the solver with a tiny positive cost.
        let cmax = classes.costs.iter().copied().fold(0.0, f64::max);
        let solver_costs: Vec<f64> = classes.costs.iter().map(|&c| c.max(cmax * 1e-9)).collect();
        let class_counts = classes.counts.clone();
        let solved = milp::solve_counts(
            &solver_costs,
            &class_counts,
            ranks,
            &counts,
            opts.time_limit_s,
            opts.mip_gap,
        );
        if let Ok(x) = solved {
            let assign = classes.expand(&x, ranks);
            let l = loads(frame_costs, &assign);
            let m = l.iter().copied().fold(0.0, f64::max);
            // Keep the MILP's answer only when it is strictly better than the warm start.
            if m < greedy_max * (1.0 - 1e-12) {
                best = (assign, l, Method::Milp);
            }
        }
    }
    let (frames_per_rank, load_per_rank, method) = best;
    Ok(FrameAssignment {
        imbalance_after: imbalance(&load_per_rank),
        frames_per_rank,
        load_per_rank,
        imbalance_before: before,
        method,
        solver,
        solve_time_s: start.elapsed().as_secs_f64(),
    })
}

/// Frames grouped by identical cost (exact f64 equality).
struct Classes {
    costs: Vec<f64>,
    /// Frames of each class.
    counts: Vec<u64>,
    /// The class of each frame (at most 2^32 frames, so classes).
    frame_class: Vec<u32>,
}

impl Classes {
    fn new(frame_costs: &[f64]) -> Self {
        let mut class_of: HashMap<u64, usize> = HashMap::new();
        let mut c = Classes {
            costs: Vec::new(),
            counts: Vec::new(),
            frame_class: Vec::with_capacity(frame_costs.len()),
        };
        // A sample's frames come in a run of one cost: one lookup a run.
        let mut last: Option<(u64, usize)> = None;
        for &cost in frame_costs {
            let bits = cost.to_bits();
            let k = match last {
                Some((b, k)) if b == bits => k,
                _ => *class_of.entry(bits).or_insert_with(|| {
                    c.counts.push(0);
                    c.costs.push(cost);
                    c.costs.len() - 1
                }),
            };
            last = Some((bits, k));
            c.counts[k] += 1;
            c.frame_class.push(k as u32);
        }
        c
    }

    /// `x[k][r]`: frames of class k on rank r.
    #[cfg(test)]
    fn counts_of(&self, assignment: &[Vec<usize>], ranks: usize) -> Vec<Vec<u64>> {
        let mut x = vec![vec![0u64; ranks]; self.costs.len()];
        for (r, fs) in assignment.iter().enumerate() {
            for &f in fs {
                x[self.frame_class[f] as usize][r] += 1;
            }
        }
        x
    }

    /// `x[k][r]` of [`lpt`]'s assignment (`counts_of(&lpt(costs, ranks), ranks)`), without
    /// listing frames: LPT takes the frames by decreasing cost, so class by class (a class is
    /// one cost), and which frame of a class goes where does not change a count. The least
    /// loaded rank is updated in place at the heap's top (one sift instead of a pop and a
    /// push); (load, rank) is a total order, so every heap picks the same rank.
    fn lpt_counts(&self, ranks: usize) -> Vec<Vec<u64>> {
        let ranks = ranks.max(1);
        let mut by_cost: Vec<usize> = (0..self.costs.len()).collect();
        by_cost.sort_by(|&a, &b| self.costs[b].total_cmp(&self.costs[a]));
        let mut heap: BinaryHeap<Slot> = (0..ranks).map(|r| Slot(0.0, r)).collect();
        let mut max_load: f64 = 0.0;
        let mut x = vec![vec![0u64; ranks]; self.costs.len()];
        for k in by_cost {
            let (c, row) = (self.costs[k], &mut x[k]);
            let mut left = self.counts[k] as usize;
            while left > 0 {
                let min_load = heap.peek().map_or(0.0, |s| s.0);
                if left >= ranks && min_load + c > max_load {
                    // Whole rounds: each rank taken once, in heap order (see below).
                    let mut slots = heap.into_vec();
                    while left >= ranks && slots.iter().all(|s| s.0 + c > max_load) {
                        for s in &mut slots {
                            s.0 += c;
                            row[s.1] += 1;
                            max_load = max_load.max(s.0);
                        }
                        left -= ranks;
                    }
                    heap = BinaryHeap::from(slots);
                    continue;
                }
                if let Some(mut top) = heap.peek_mut() {
                    row[top.1] += 1;
                    top.0 += c;
                    max_load = max_load.max(top.0);
                }
                left -= 1;
            }
        }
        x
    }

    /// Counts back to frames: each class's frames, ascending, are dealt to ranks in rank order
    /// (a rank gets contiguous runs of each class, which keeps a sample's frames together).
    /// The frames are visited in ascending order, each to the rank its class is dealing to,
    /// so every rank's list comes out ascending without a sort.
    fn expand(&self, x: &[Vec<u64>], ranks: usize) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = (0..ranks)
            .map(|r| Vec::with_capacity(x.iter().map(|xk| xk[r] as usize).sum()))
            .collect();
        // Per class: the rank dealt to and how many more frames it takes.
        let mut at: Vec<(usize, u64)> = x.iter().map(|row| (0, row[0])).collect();
        for (f, &k) in self.frame_class.iter().enumerate() {
            let k = k as usize;
            let (r, left) = &mut at[k];
            while *left == 0 && *r + 1 < ranks {
                *r += 1;
                *left = x[k][*r];
            }
            if *left > 0 {
                out[*r].push(f);
                *left -= 1;
            }
        }
        out
    }
}

/// Exchange vectors for [`improve_counts`]: `d[k] > 0` moves `d[k]` class-k frames from the
/// loaded rank to its partner, `d[k] < 0` moves `-d[k]` back; all non-zero vectors of L1 norm at
/// most 3 (2 when there are many classes, 1 beyond that).
fn exchange_vectors(classes: usize) -> Vec<Vec<i64>> {
    let radius = match classes {
        0..=12 => 3,
        13..=60 => 2,
        _ => 1,
    };
    let mut out = Vec::new();
    let mut d = vec![0i64; classes];
    fn rec(k: usize, left: i64, d: &mut Vec<i64>, out: &mut Vec<Vec<i64>>) {
        if k == d.len() {
            if d.iter().any(|&v| v != 0) {
                out.push(d.clone());
            }
            return;
        }
        for v in -left..=left {
            d[k] = v;
            rec(k + 1, left - v.abs(), d, out);
        }
        d[k] = 0;
    }
    rec(0, radius, &mut d, &mut out);
    out
}

/// Local search on class counts: while the most-loaded rank can be relieved by exchanging a few
/// frames (see [`exchange_vectors`]) with one of the least-loaded ranks so that both end strictly
/// below the old maximum, apply the best such exchange. Each step lowers the maximum or the
/// number of ranks at it, so it terminates; it is capped anyway.
///
/// The most-loaded rank is the highest-numbered one at the maximum; its partners are the first
/// [`PARTNERS`] ranks of a list sorted by load whose ties keep the list's previous order (a
/// stable re-sort each step, starting from rank order). Both are kept in ordered sets
/// ([`RankOrder`]), so a step costs O(moves + log ranks) instead of a sort of every rank: the
/// search at 32768 ranks went from seconds to milliseconds, with the same exchanges (tested
/// against the re-sorting search).
fn improve_counts(costs: &[f64], x: &mut [Vec<u64>]) {
    let Some(ranks) = x.first().map(Vec::len) else {
        return;
    };
    let moves = positive_moves(costs);
    let mut order = RankOrder::new(rank_loads(costs, x));
    for _ in 0..(50 * ranks + 1000) {
        let Some(hi) = order.most_loaded() else {
            return;
        };
        let lmax = order.load[hi];
        // Best exchange: (new pair max, partner, index into moves).
        let mut best: Option<(f64, usize, usize)> = None;
        for lo in order.least_loaded(PARTNERS) {
            if order.load[lo] >= lmax {
                continue;
            }
            for (i, (delta, d)) in moves.iter().enumerate() {
                let m = (lmax - delta).max(order.load[lo] + delta);
                if m >= lmax || best.is_some_and(|b| m >= b.0) {
                    continue;
                }
                if exchange_feasible(x, d, hi, lo) {
                    best = Some((m, lo, i));
                }
            }
        }
        let Some((_, lo, i)) = best else {
            return;
        };
        let (delta, d) = &moves[i];
        for (k, &v) in d.iter().enumerate() {
            x[k][hi] = x[k][hi].wrapping_add_signed(-v);
            x[k][lo] = x[k][lo].wrapping_add_signed(v);
        }
        order.exchange(hi, lo, *delta);
    }
}

/// Partners the most-loaded rank may exchange frames with in [`improve_counts`].
const PARTNERS: usize = 8;

/// The exchange vectors that move work from the loaded rank to its partner, with that work.
fn positive_moves(costs: &[f64]) -> Vec<(f64, Vec<i64>)> {
    exchange_vectors(costs.len())
        .into_iter()
        .map(|d| (d.iter().zip(costs).map(|(&v, c)| v as f64 * c).sum(), d))
        .filter(|(delta, _)| *delta > 0.0)
        .collect()
}

/// Each rank's load under the class counts `x[k][r]`.
fn rank_loads(costs: &[f64], x: &[Vec<u64>]) -> Vec<f64> {
    let ranks = x.first().map_or(0, Vec::len);
    (0..ranks)
        .map(|r| {
            costs
                .iter()
                .zip(x.iter())
                .map(|(c, xk)| c * xk[r] as f64)
                .sum()
        })
        .collect()
}

/// Whether rank `hi` holds the frames `d` sends and rank `lo` those it sends back.
fn exchange_feasible(x: &[Vec<u64>], d: &[i64], hi: usize, lo: usize) -> bool {
    d.iter().enumerate().all(|(k, &v)| {
        (v >= 0 || x[k][lo] >= v.unsigned_abs()) && (v <= 0 || x[k][hi] >= v.unsigned_abs())
    })
}

/// A load as a key that orders like `f64::total_cmp`.
fn load_key(load: f64) -> i64 {
    let b = load.to_bits() as i64;
    b ^ ((((b >> 63) as u64) >> 1) as i64)
}

/// The ranks of [`improve_counts`] in two orders: by (load, rank), whose last is the
/// most-loaded rank, and by (load, tie), the stable order: a rank whose load fell (the loaded
/// one) sorts after the ranks already at its new load, since it came after them before; a rank
/// whose load rose (the partner) sorts before them, since it came before them.
struct RankOrder {
    load: Vec<f64>,
    by_rank: BTreeSet<(i64, usize)>,
    stable: BTreeSet<(i64, i64, usize)>,
    tie: Vec<i64>,
    /// Next tie of a rank whose load rose (counts down) and of one whose load fell (counts up).
    next_rose: i64,
    next_fell: i64,
}

impl RankOrder {
    fn new(load: Vec<f64>) -> Self {
        let ranks = load.len();
        let tie: Vec<i64> = (0..ranks as i64).collect();
        RankOrder {
            by_rank: (0..ranks).map(|r| (load_key(load[r]), r)).collect(),
            stable: (0..ranks).map(|r| (load_key(load[r]), tie[r], r)).collect(),
            load,
            tie,
            next_rose: -1,
            next_fell: ranks as i64,
        }
    }

    /// The highest-numbered rank at the maximum load.
    fn most_loaded(&self) -> Option<usize> {
        self.by_rank.last().map(|&(_, r)| r)
    }

    /// The first `n` ranks of the stable order.
    fn least_loaded(&self, n: usize) -> Vec<usize> {
        self.stable.iter().take(n).map(|&(_, _, r)| r).collect()
    }

    /// Move `delta` of load from rank `hi` to rank `lo`.
    fn exchange(&mut self, hi: usize, lo: usize, delta: f64) {
        for (r, new, rose) in [
            (hi, self.load[hi] - delta, false),
            (lo, self.load[lo] + delta, true),
        ] {
            let old = load_key(self.load[r]);
            if load_key(new) == old {
                // A move below the load's precision: the rank keeps its place.
                continue;
            }
            self.by_rank.remove(&(old, r));
            self.stable.remove(&(old, self.tie[r], r));
            self.tie[r] = if rose {
                self.next_rose -= 1;
                self.next_rose + 1
            } else {
                self.next_fell += 1;
                self.next_fell - 1
            };
            self.load[r] = new;
            let key = load_key(new);
            self.by_rank.insert((key, r));
            self.stable.insert((key, self.tie[r], r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_is_partition(a: &FrameAssignment, frames: usize) {
        let mut all: Vec<usize> = a.frames_per_rank.iter().flatten().copied().collect();
        for fs in &a.frames_per_rank {
            assert!(fs.windows(2).all(|w| w[0] < w[1]), "not ascending: {fs:?}");
        }
        all.sort_unstable();
        assert_eq!(all, (0..frames).collect::<Vec<_>>());
    }

    /// The search as first written: a stable re-sort of every rank each step. The fast one must
    /// make the same exchanges.
    fn improve_counts_by_sorting(costs: &[f64], x: &mut [Vec<u64>]) {
        let ranks = x[0].len();
        let moves = positive_moves(costs);
        let mut load = rank_loads(costs, x);
        let mut order: Vec<usize> = (0..ranks).collect();
        for _ in 0..(50 * ranks + 1000) {
            let hi = (0..ranks)
                .max_by(|&a, &b| load[a].total_cmp(&load[b]))
                .unwrap();
            order.sort_by(|&a, &b| load[a].total_cmp(&load[b]));
            let lmax = load[hi];
            let mut best: Option<(f64, usize, usize)> = None;
            for &lo in order.iter().take(PARTNERS).filter(|&&r| load[r] < lmax) {
                for (i, (delta, d)) in moves.iter().enumerate() {
                    let m = (lmax - delta).max(load[lo] + delta);
                    if m >= lmax || best.is_some_and(|b| m >= b.0) {
                        continue;
                    }
                    if exchange_feasible(x, d, hi, lo) {
                        best = Some((m, lo, i));
                    }
                }
            }
            let Some((_, lo, i)) = best else {
                return;
            };
            let (delta, d) = &moves[i];
            for (k, &v) in d.iter().enumerate() {
                x[k][hi] = x[k][hi].wrapping_add_signed(-v);
                x[k][lo] = x[k][lo].wrapping_add_signed(v);
            }
            load[hi] -= delta;
            load[lo] += delta;
        }
    }

    #[test]
    fn ordered_local_search_makes_the_sorting_searchs_exchanges() {
        let mut seed = 777u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (seed >> 33) % m
        };
        let pools: [&[f64]; 3] = [
            &[2.0, 3.0, 5.0, 7.0],
            &[1.0, 1.5, 2.25, 3.375, 0.0],
            &[0.1, 0.2, 0.30000000000000004, 0.7],
        ];
        let mut searched = 0;
        for case in 0..300 {
            let pool = pools[case % pools.len()];
            let ranks = 2 + next(40) as usize;
            let n = 1 + next(12 * ranks as u64) as usize;
            let costs: Vec<f64> = (0..n)
                .map(|_| pool[next(pool.len() as u64) as usize])
                .collect();
            let classes = Classes::new(&costs);
            let start = classes.counts_of(&lpt(&costs, ranks), ranks);
            let (mut fast, mut slow) = (start.clone(), start.clone());
            improve_counts(&classes.costs, &mut fast);
            improve_counts_by_sorting(&classes.costs, &mut slow);
            assert_eq!(fast, slow, "case {case}: {n} frames on {ranks} ranks");
            searched += usize::from(slow != start);
        }
        assert!(
            searched >= 50,
            "only {searched} of 300 cases made an exchange"
        );
    }

    #[test]
    fn class_lpt_and_contiguous_loads_are_the_frame_by_frame_ones() {
        let mut seed = 99u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (seed >> 33) % m
        };
        let pool = [0.0, 1.0, 0.1, 0.30000000000000004, 7.5, 2.0];
        for case in 0..200 {
            let ranks = 1 + next(50) as usize;
            let n = 1 + next(20 * ranks as u64) as usize;
            let costs: Vec<f64> = (0..n).map(|_| pool[next(6) as usize]).collect();
            let classes = Classes::new(&costs);
            let want = classes.counts_of(&lpt(&costs, ranks), ranks);
            assert_eq!(classes.lpt_counts(ranks), want, "case {case}");
            // Dealing each class's frames in rank order, then sorting each rank's.
            let mut dealt: Vec<Vec<usize>> = vec![Vec::new(); ranks];
            for (k, row) in want.iter().enumerate() {
                let members = (0..n).filter(|&f| classes.frame_class[f] as usize == k);
                let mut it = members.into_iter();
                for (r, &n) in row.iter().enumerate() {
                    dealt[r].extend(it.by_ref().take(n as usize));
                }
            }
            dealt.iter_mut().for_each(|v| v.sort_unstable());
            assert_eq!(classes.expand(&want, ranks), dealt, "case {case}");
            let contiguous = loads(&costs, &contiguous_split(n, ranks));
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&contiguous_loads(&costs, ranks)), bits(&contiguous));
        }
    }

    /// What the MILP gains over LPT with local search on the shipped manifest (frames x 1, 10
    /// and 60) over 64 to 8192 ranks (max load, LPT over MILP), the measurement behind
    /// [`MILP_MAX_RANKS`]; fails if the MILP gains 0.1% or more above the bound. Slow (the
    /// MILP's time limit each time) and meant for a release build:
    /// `cargo test --release -p mmsp-planner --lib milp_gain -- --ignored --nocapture`.
    /// [`balance_frames`] with the MILP tried whatever the rank count (its warm start and
    /// acceptance as there).
    fn milp_anyway(costs: &[f64], ranks: usize) -> FrameAssignment {
        let start = Instant::now();
        let classes = Classes::new(costs);
        let mut counts = classes.lpt_counts(ranks);
        improve_counts(&classes.costs, &mut counts);
        let n = classes.counts.clone();
        let o = BalanceOptions::default();
        let lpt = classes.expand(&counts, ranks);
        let x = milp::solve_counts(
            &classes.costs,
            &n,
            ranks,
            &counts,
            o.time_limit_s,
            o.mip_gap,
        );
        let l = loads(costs, &lpt);
        let top = |l: &[f64]| l.iter().copied().fold(0.0, f64::max);
        let (mut frames_per_rank, mut load_per_rank, mut method) = (lpt, l, Method::Lpt);
        if let Ok(x) = x {
            let a = classes.expand(&x, ranks);
            let m = loads(costs, &a);
            if top(&m) < top(&load_per_rank) * (1.0 - 1e-12) {
                (frames_per_rank, load_per_rank, method) = (a, m, Method::Milp);
            }
        }
        FrameAssignment {
            imbalance_after: imbalance(&load_per_rank),
            imbalance_before: imbalance(&contiguous_loads(costs, ranks)),
            frames_per_rank,
            load_per_rank,
            method,
            solver: milp::SOLVER_NAME,
            solve_time_s: start.elapsed().as_secs_f64(),
        }
    }

    #[test]
    #[ignore]
    fn milp_gain_over_lpt() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/samples.jsonl"
        ))
        .unwrap();
        let base = crate::spec::samples::parse_manifest(&text, "samples.jsonl").unwrap();
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        let no_milp = BalanceOptions {
            use_milp: false,
            ..Default::default()
        };
        for scale in [1, 10, 60] {
            let samples: Vec<Sample> = base
                .iter()
                .map(|s| Sample {
                    frames: s.frames * scale,
                    ..*s
                })
                .collect();
            let costs = frame_costs(&samples, &v).unwrap();
            for ranks in [64, 128, 256, 512, 1024, 2048, 4096, 8192] {
                let max = |a: &FrameAssignment| a.load_per_rank.iter().copied().fold(0.0, f64::max);
                let l = balance_frames(&costs, ranks, &no_milp).unwrap();
                let m = milp_anyway(&costs, ranks);
                println!(
                    "x{scale} frames {} ranks {ranks}: lpt {:.6} milp {:.6} gain {:.4}% ({:?}, {:.3} s; lpt {:.3} s)",
                    costs.len(),
                    l.imbalance_after,
                    m.imbalance_after,
                    100.0 * (max(&l) / max(&m) - 1.0),
                    m.method,
                    m.solve_time_s,
                    l.solve_time_s
                );
                assert!(ranks <= MILP_MAX_RANKS || max(&l) < 1.001 * max(&m));
            }
        }
    }

    #[test]
    fn load_keys_order_like_total_cmp() {
        let v = [-3.5, -0.0, 0.0, 1e-300, 0.5, 1.0, 2.0, 1e300, f64::INFINITY];
        for a in v {
            for b in v {
                assert_eq!(load_key(a).cmp(&load_key(b)), a.total_cmp(&b), "{a} {b}");
            }
        }
    }

    #[test]
    fn mixed_costs_get_balanced() {
        // Samples of different resolutions in order: the contiguous split is badly unbalanced.
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        let samples = [
            Sample {
                frames: 40,
                text_tokens: 10,
                resolution: Some((448, 448)),
            },
            Sample {
                frames: 50,
                text_tokens: 10,
                resolution: Some((224, 224)),
            },
            Sample::uniform(31, 5),
        ];
        let costs = frame_costs(&samples, &v).unwrap();
        assert_eq!(costs.len(), 121);
        let a = balance_frames(&costs, 8, &BalanceOptions::default()).unwrap();
        assert_is_partition(&a, 121);
        assert!(a.imbalance_before > 1.2, "{}", a.imbalance_before);
        assert!(a.imbalance_after < a.imbalance_before);
        assert!(a.imbalance_after < 1.05, "{}", a.imbalance_after);
        let recomputed = loads(&costs, &a.frames_per_rank);
        assert_eq!(recomputed, a.load_per_rank);
    }

    #[test]
    fn local_search_fixes_graham_instance() {
        // Graham's LPT example: 3,3,2,2,2 on 2 ranks; plain LPT gives 7, a 1-1 swap gives 6.
        let costs = [3.0, 3.0, 2.0, 2.0, 2.0];
        let greedy = loads(&costs, &lpt(&costs, 2));
        assert_eq!(greedy.iter().copied().fold(0.0, f64::max), 7.0);
        let no_milp = BalanceOptions {
            use_milp: false,
            ..Default::default()
        };
        let b = balance_frames(&costs, 2, &no_milp).unwrap();
        assert_eq!((b.method, b.solver), (Method::Lpt, "none"));
        assert_eq!(b.load_per_rank.iter().copied().fold(0.0, f64::max), 6.0);
        assert_is_partition(&b, 5);
    }

    #[test]
    fn milp_beats_lpt_with_local_search() {
        // 7,7 + seven 2s on 2 ranks: LPT gives {7,2,2,2,2} = 15 vs {7,2,2,2} = 13; the optimum
        // {7,7} / {2 x 7} = 14 needs a 1-for-3 exchange (4 frames), beyond the local search.
        let costs = [7.0, 7.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0];
        let no_milp = BalanceOptions {
            use_milp: false,
            ..Default::default()
        };
        let b = balance_frames(&costs, 2, &no_milp).unwrap();
        assert_eq!(b.load_per_rank.iter().copied().fold(0.0, f64::max), 15.0);
        let a = balance_frames(&costs, 2, &BalanceOptions::default()).unwrap();
        assert_eq!((a.method, a.solver), (Method::Milp, milp::SOLVER_NAME));
        assert_eq!(a.load_per_rank.iter().copied().fold(0.0, f64::max), 14.0);
        assert_eq!(a.imbalance_after, 1.0);
        assert_is_partition(&a, 9);
    }

    fn brute_force_makespan(costs: &[f64], ranks: usize) -> f64 {
        let n = costs.len() as u32;
        let mut best = f64::INFINITY;
        for code in 0..(ranks as u64).pow(n) {
            let mut l = vec![0.0; ranks];
            let mut c = code;
            for &cost in costs {
                l[(c % ranks as u64) as usize] += cost;
                c /= ranks as u64;
            }
            best = best.min(l.iter().copied().fold(0.0, f64::max));
        }
        best
    }

    #[test]
    fn small_instances_reach_the_optimum() {
        let mut seed = 12345u64;
        let mut next = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (seed >> 33) % m
        };
        for _ in 0..40 {
            let ranks = 2 + next(2) as usize;
            let n = 3 + next(6) as usize;
            let classes = [2.0, 3.0, 5.0, 7.0, 11.0];
            let costs: Vec<f64> = (0..n).map(|_| classes[next(5) as usize]).collect();
            let a = balance_frames(&costs, ranks, &BalanceOptions::default()).unwrap();
            assert_is_partition(&a, n);
            let got = a.load_per_rank.iter().copied().fold(0.0, f64::max);
            let opt = brute_force_makespan(&costs, ranks);
            assert!(
                (got - opt).abs() < 1e-9,
                "{costs:?} on {ranks}: {got} vs {opt}"
            );
        }
    }

    #[test]
    fn more_ranks_than_frames_is_fine() {
        let a = balance_frames(&[1.0, 2.0, 3.0], 8, &BalanceOptions::default()).unwrap();
        assert_is_partition(&a, 3);
        assert_eq!(a.frames_per_rank.iter().filter(|f| f.is_empty()).count(), 5);
        assert_eq!(a.method, Method::Lpt); // max frame = lower bound: LPT is optimal
    }

    #[test]
    fn bad_inputs_are_errors() {
        let o = BalanceOptions::default();
        assert!(balance_frames(&[], 4, &o).is_err());
        assert!(balance_frames(&[1.0], 0, &o).is_err());
        assert!(balance_frames(&[1.0, f64::NAN], 2, &o).is_err());
        assert!(balance_frames(&[1.0, -1.0], 2, &o).is_err());
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        assert!(frame_costs(&[Sample::uniform(0, 100)], &v).is_err());
    }

    #[test]
    fn contiguous_split_is_exact() {
        for (f, r) in [(10, 3), (3, 10), (0, 4), (256, 256)] {
            let s = contiguous_split(f, r);
            assert_eq!(s.len(), r);
            let all: Vec<usize> = s.into_iter().flatten().collect();
            assert_eq!(all, (0..f).collect::<Vec<_>>());
        }
    }
}
