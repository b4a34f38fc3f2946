//! The ring attention's own work around its kernels, as mmsp-runtime runs it
//! (`runtime/src/ring.rs`, `runtime/src/kernel.rs`): per layer, on the compute stream, the
//! memory-bound kernels a ring of R > 1 adds to what a ring of one runs. Counted from the code,
//! kernel by kernel, each priced at its own size as the other memory-bound work is
//! ([`super::compute`]: bytes over the calibration's streaming or layout-copy bandwidth at
//! that call size) and never faster than the per-kernel floor ([`kernel_floor_s`]).
//!
//! Ring rank r of R holds zigzag chunks r and 2R-1-r (c tokens each per sequence). Its step 0
//! is its own causal block (all 2c rows against its 2c keys); at steps j = 1..R-1 it holds the
//! K/V of rank src = r - j (mod R): for src < r all 2c rows against src's first chunk (a
//! "covering" block, c keys), for src > r its second chunk's c rows against src's 2c keys (a
//! "half" block) (`ring::blocks`). So rank r has r covering and R-1-r half blocks, and the
//! ranks' merge and accumulation work differs; the step waits for its neighbours (K/V and,
//! in backward, dK/dV arrive from rank r-1), so the slowest rank sets the layer's time:
//! [`ring_merge`] takes the maximum over the ranks, forward and backward apart.
//!
//! Forward (`ring_fwd`):
//! - every block after step 0 repeats its K and V columns to the q heads when the rank holds
//!   fewer kv heads (`kernel::attention_fwd` -> `Prepared::new` -> `expand_kv`,
//!   `repeat_interleave`: read the kv heads, write the q heads; a strided copy, layout class);
//! - the block outputs are merged through their log-sum-exp by `merge_parts` at the end of the
//!   ring, and folded into one fp32 partial result whenever 8 are held (`MAX_PARTS`): the
//!   running lse copied (`lse.copy()`), per other part one `logaddexp_out` and its weight
//!   `exp(lse_p - lse)` (a sub and an exp on the lse rows), the first part scaled into an fp32
//!   accumulator (`mul`, or a zero fill and an `addcmul_` when it does not cover every row),
//!   the others added by `addcmul_`, and the last written by `addcmul_out` in the output
//!   dtype (fp32 for a fold). A ring of one returns its block as it is.
//!
//! Backward (`ring_bwd`, `add_rows`, `fold_dkv`): for every block after step 0, K and V
//! repeated again and dK, dV summed back to the kv heads (`kernel::attention_bwd`,
//! `reduce_kv`); its dQ rows added into the fp32 dQ accumulator (`add_`: read 4 + 2, write 4
//! bytes per element); its dK, dV added into the fp32 sums that travel with the K/V block
//! (`fold_dkv`, the same 10 bytes per element); and once per call the log-sum-exp rows of the
//! half blocks copied dense (`RowCache`). Step 0's casts to fp32 and the final casts back are
//! what a ring of one runs too, so they are not counted here. The sends and receives of K/V
//! and dK/dV are NCCL's (priced as ring p2p); an in-process ring copies them through HBM
//! instead, which this does not count.
//!
//! Where, at commit 2a4b3a7: runtime/src/ring.rs `MAX_PARTS` line 101, `merge_parts` lines
//! 109-177, `ring_fwd` lines 228-294 (the fold at 274-278), `add_rows` 298-318, `fold_dkv`
//! 323-347, `ring_bwd` 350-439 (the lse rows at 399); runtime/src/kernel.rs `expand_kv` line
//! 104, `Prepared` 110-123, `reduce_kv` 125-134, `attention_fwd` 137, `attention_bwd` 189.
//!
//! Not counted: packed samples run one ring call per sample (`runtime/src/packed.rs`), so their
//! kernels are more and smaller than one call of the micro-batch's tokens (same bytes, more
//! floors); uneven zigzag chunks (the planner pads contexts to a multiple of 2 x SP) split the
//! own block in three.

use super::compute::{hbm_rate, kernel_floor_s, layout_rate};
use crate::spec::cluster::ClusterSpec;

/// Block outputs the runtime's ring forward holds before folding them into one partial
/// result (`MAX_PARTS` in runtime/src/ring.rs).
pub const MAX_PARTS: usize = 8;

/// Bytes of a 16-bit activation element and of an fp32 accumulator element.
const B16: f64 = 2.0;
const F32: f64 = 4.0;

/// One ring rank's attention call: its ring, the sequences of the micro-batch, the tokens of
/// one zigzag chunk of a sequence (context / (2 x ring)) and its heads after TP and Ulysses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RingShape {
    pub ring: u32,
    pub batch: f64,
    pub chunk: f64,
    pub q_heads: f64,
    pub kv_heads: f64,
    pub head_dim: f64,
}

/// The ring's own memory-bound work of one layer on one rank (or the slowest rank): seconds,
/// bytes read plus written, and kernels launched.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RingWork {
    pub s: f64,
    pub bytes: f64,
    pub kernels: f64,
}

impl RingWork {
    fn max(self, o: RingWork) -> RingWork {
        if o.s > self.s {
            o
        } else {
            self
        }
    }
    fn times(self, k: f64) -> RingWork {
        RingWork {
            s: self.s * k,
            bytes: self.bytes * k,
            kernels: self.kernels * k,
        }
    }
    fn plus(self, o: RingWork) -> RingWork {
        RingWork {
            s: self.s + o.s,
            bytes: self.bytes + o.bytes,
            kernels: self.kernels + o.kernels,
        }
    }
}

/// Forward and backward of one layer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RingMerge {
    pub fwd: RingWork,
    pub bwd: RingWork,
}

/// Prices kernel calls: max(bytes over the bandwidth at that call size, the per-kernel floor).
struct Pricer<'a> {
    spec: &'a ClusterSpec,
    floor: f64,
}

impl<'a> Pricer<'a> {
    fn new(spec: &'a ClusterSpec) -> Self {
        Pricer {
            spec,
            floor: kernel_floor_s(spec),
        }
    }

    /// `n` calls of `bytes` each, layout copies when `layout`.
    fn work(&self, n: f64, bytes: f64, layout: bool) -> RingWork {
        if n <= 0.0 {
            return RingWork::default();
        }
        let rate = if layout {
            layout_rate(self.spec, bytes)
        } else {
            hbm_rate(self.spec, bytes)
        };
        RingWork {
            s: n * (bytes / rate).max(self.floor),
            bytes: n * bytes,
            kernels: n,
        }
    }
}

/// Elements per row of a block output (B x Hq x D), of its log-sum-exp (B x Hq), and per key
/// column of a K block as held (B x Hkv x D).
fn widths(sh: &RingShape) -> (f64, f64, f64) {
    (
        sh.batch * sh.q_heads * sh.head_dim,
        sh.batch * sh.q_heads,
        sh.batch * sh.kv_heads * sh.head_dim,
    )
}

/// A block's K and V repeated to the q heads (`expand_kv`), or nothing when the rank holds as
/// many kv heads as q heads: two layout copies of `cols` keys.
fn expand(p: &Pricer, sh: &RingShape, cols: f64) -> RingWork {
    let (pq, _, pk) = widths(sh);
    if sh.kv_heads >= sh.q_heads {
        return RingWork::default();
    }
    p.work(2.0, B16 * (pk + pq) * cols, true)
}

/// One merge by `merge_parts` of a head part (covering every row, `head_bytes` per element:
/// the own block in 16 bits or a folded fp32 result) followed by `cov` covering and `half`
/// half blocks in that order (the order rank r receives them), written in `out_bytes`.
fn merge_group(
    p: &Pricer,
    sh: &RingShape,
    head_bytes: f64,
    (cov, half): (f64, f64),
    out_bytes: f64,
) -> RingWork {
    let (pq, pl, _) = widths(sh);
    let (c, rows) = (sh.chunk, 2.0 * sh.chunk);
    // The last covering part goes last (`rposition`): a covering block when there is one,
    // else the head. The others are merged in order; the first starts the fp32 accumulator.
    let (last_bytes, others_cov) = if cov > 0.0 {
        (B16, cov - 1.0)
    } else {
        (head_bytes, 0.0)
    };
    let others_head = if cov > 0.0 { 1.0 } else { 0.0 };
    // Other parts' rows: the head's and covering ones' 2c, the half blocks' c.
    let lse_rows_cov = others_head + others_cov;
    let mut w = p.work(1.0, 2.0 * F32 * pl * rows, false); // lse = last.lse.copy()
    for (n, len) in [(lse_rows_cov, rows), (half, c)] {
        // logaddexp_out (read 2, write 1 fp32) and the weight: sub (3 fp32), exp (2 fp32).
        w = w.plus(p.work(n, 3.0 * F32 * pl * len, false));
        w = w.plus(p.work(n, 3.0 * F32 * pl * len, false));
        w = w.plus(p.work(n, 2.0 * F32 * pl * len, false));
    }
    // The accumulator: o_head * w into fp32 when the head is another part, else a zero fill
    // and the first half block's addcmul_ like the rest.
    if others_head > 0.0 {
        w = w.plus(p.work(1.0, (head_bytes + F32) * pq * rows + F32 * pl * rows, false));
    } else {
        w = w.plus(p.work(1.0, F32 * pq * rows, false));
    }
    // addcmul_: read the accumulator (fp32) and the block output, write fp32; w broadcast.
    let addcmul = |b: f64, len: f64| (F32 + b + F32) * pq * len + F32 * pl * len;
    w = w.plus(p.work(others_cov, addcmul(B16, rows), false));
    w = w.plus(p.work(half, addcmul(B16, c), false));
    // The last part: its weight (sub, exp) and addcmul_out into the output dtype.
    w = w.plus(p.work(1.0, 3.0 * F32 * pl * rows, false));
    w = w.plus(p.work(1.0, 2.0 * F32 * pl * rows, false));
    w.plus(p.work(
        1.0,
        (F32 + last_bytes + out_bytes) * pq * rows + F32 * pl * rows,
        false,
    ))
}

/// Steps `from..=upto` of rank `r` split into (covering, half) blocks: steps j <= r are
/// covering.
fn split(r: usize, from: usize, upto: usize) -> (usize, usize) {
    let cov = upto.min(r).saturating_sub(from - 1);
    (cov, upto + 1 - from - cov)
}

/// One ring's shape with its per-block works priced once and its merges counted once per
/// distinct shape (ranks share most of them): a merge is indexed by its head (fp32 or not),
/// covering and half blocks (at most `MAX_PARTS - 1` together) and output (fp32 or not).
struct Ring<'a> {
    p: Pricer<'a>,
    sh: RingShape,
    groups: Vec<Option<RingWork>>,
    /// A covering and a half block's kv repeats (forward, and again in backward).
    expand_cov: RingWork,
    expand_half: RingWork,
    /// A covering and a half block's backward beyond its kernel.
    bwd_cov: RingWork,
    bwd_half: RingWork,
    /// The half blocks' log-sum-exp rows copied dense, once per call.
    lse_rows: RingWork,
}

impl<'a> Ring<'a> {
    fn new(spec: &'a ClusterSpec, sh: RingShape) -> Self {
        let p = Pricer::new(spec);
        let (pq, pl, pk) = widths(&sh);
        let c = sh.chunk;
        // Per block: K, V repeated and dK, dV summed back to the kv heads (when repeated), its
        // dQ rows added into the fp32 dQ, its dK, dV into the travelling fp32 sums (`add_`:
        // read 4 + 2, write 4 bytes per element).
        let acc = F32 + B16 + F32;
        let block = |rows: f64, cols: f64| {
            let sums = if sh.kv_heads < sh.q_heads {
                p.work(2.0, B16 * (pq + pk) * cols, false)
            } else {
                RingWork::default()
            };
            expand(&p, &sh, cols)
                .plus(sums)
                .plus(p.work(1.0, acc * pq * rows, false))
                .plus(p.work(2.0, acc * pk * cols, false))
        };
        Ring {
            expand_cov: expand(&p, &sh, c),
            expand_half: expand(&p, &sh, 2.0 * c),
            bwd_cov: block(2.0 * c, c),
            bwd_half: block(c, 2.0 * c),
            lse_rows: p.work(1.0, 2.0 * F32 * pl * c, false),
            groups: vec![None; 4 * MAX_PARTS * MAX_PARTS],
            p,
            sh,
        }
    }

    /// [`merge_group`] of a head (fp32 when `head_f32`), `cov` and `half` blocks, into fp32
    /// when `out_f32`, counted once.
    fn merge(&mut self, head_f32: bool, (cov, half): (usize, usize), out_f32: bool) -> RingWork {
        let i = ((usize::from(head_f32) * 2 + usize::from(out_f32)) * MAX_PARTS + cov) * MAX_PARTS
            + half;
        if let Some(w) = self.groups[i] {
            return w;
        }
        let bytes = |f32: bool| if f32 { F32 } else { B16 };
        let w = merge_group(
            &self.p,
            &self.sh,
            bytes(head_f32),
            (cov as f64, half as f64),
            bytes(out_f32),
        );
        self.groups[i] = Some(w);
        w
    }

    /// The forward merges of rank `r`, as `ring_fwd` runs them step by step: a fold of the
    /// parts held whenever there are `MAX_PARTS` and steps remain, then the final merge into
    /// the 16-bit output. The reference for [`Ring::forward_merges`].
    #[cfg(test)]
    fn forward_merges_by_step(&mut self, r: usize) -> RingWork {
        let n = self.sh.ring as usize;
        let mut w = RingWork::default();
        let (mut head_f32, mut held, mut from) = (false, 1usize, 1usize);
        for j in 1..n {
            held += 1;
            if held >= MAX_PARTS && j + 1 < n {
                w = w.plus(self.merge(head_f32, split(r, from, j), true));
                (head_f32, held, from) = (true, 1, j + 1);
            }
        }
        w.plus(self.merge(head_f32, split(r, from, n - 1), false))
    }

    /// The forward merges of rank `r` (what [`Ring::forward_merges_by_step`] walks, in O(1)):
    /// fold k >= 1 merges the parts of steps 7(k-1)+1 ..= 7k (with `MAX_PARTS` = 8: the held
    /// result and 7 blocks) into fp32 while 7k <= R - 2; the final merge takes the rest. Folds
    /// after the first start from an fp32 result and are all covering blocks below rank r's
    /// boundary step and all half blocks above it, so they are counted by kind.
    fn forward_merges(&mut self, r: usize) -> RingWork {
        let n = self.sh.ring as usize;
        let per = MAX_PARTS - 1;
        let folds = if n > MAX_PARTS { (n - 2) / per } else { 0 };
        let range = |k: usize| (per * (k - 1) + 1, per * k);
        let mut w = RingWork::default();
        if folds >= 1 {
            let (a, b) = range(1);
            w = w.plus(self.merge(false, split(r, a, b), true));
        }
        // Folds 2..=folds: covering below the one holding step r, half above it.
        let boundary = r.div_ceil(per);
        if folds >= 2 {
            let below = boundary.saturating_sub(1).min(folds).saturating_sub(1);
            let above = folds - boundary.max(1).min(folds);
            let cov = self.merge(true, (per, 0), true);
            let half = self.merge(true, (0, per), true);
            w = w
                .plus(cov.times(below as f64))
                .plus(half.times(above as f64));
            if (2..=folds).contains(&boundary) {
                let (a, b) = range(boundary);
                w = w.plus(self.merge(true, split(r, a, b), true));
            }
        }
        w.plus(self.merge(folds > 0, split(r, per * folds + 1, n - 1), false))
    }

    /// Rank `r`'s forward: the kv repeats of its blocks after step 0 and its merges.
    fn forward_rank(&mut self, r: usize) -> RingWork {
        let (cov, half) = split(r, 1, self.sh.ring as usize - 1);
        let repeats = self
            .expand_cov
            .times(cov as f64)
            .plus(self.expand_half.times(half as f64));
        repeats.plus(self.forward_merges(r))
    }

    /// Rank `r`'s backward beyond step 0: its blocks' work and, with half blocks, the lse rows.
    fn backward_rank(&self, r: usize) -> RingWork {
        let (cov, half) = split(r, 1, self.sh.ring as usize - 1);
        let w = self
            .bwd_cov
            .times(cov as f64)
            .plus(self.bwd_half.times(half as f64));
        if half > 0 {
            w.plus(self.lse_rows)
        } else {
            w
        }
    }
}

/// Rank `r`'s ring work of one layer (zero for a ring of one).
pub fn ring_merge_rank(spec: &ClusterSpec, sh: &RingShape, r: usize) -> RingMerge {
    if sh.ring <= 1 {
        return RingMerge::default();
    }
    let mut ring = Ring::new(spec, *sh);
    RingMerge {
        fwd: ring.forward_rank(r),
        bwd: ring.backward_rank(r),
    }
}

/// The ranks whose forward can be the largest: the first three folds' and the last four
/// folds' worth of ranks. A rank's forward is linear in its covering blocks (its kv repeats)
/// plus its merges; between the first and the last folds, ranks the same offset into a fold
/// differ only in how many middle folds are covering rather than half, linearly, so their
/// largest is at one end (checked against every rank in the tests). The backward is linear in
/// the covering blocks but for the last rank's missing lse copy: its largest is at an end.
fn candidate_ranks(n: usize) -> impl Iterator<Item = usize> {
    let edge = 4 * (MAX_PARTS - 1);
    let low = (3 * (MAX_PARTS - 1)).min(n);
    (0..low).chain(n.saturating_sub(edge).max(low)..n)
}

/// The ring's own work of one layer on its slowest rank, forward and backward apart (zero for
/// a ring of one).
pub fn ring_merge(spec: &ClusterSpec, sh: &RingShape) -> RingMerge {
    let mut out = RingMerge::default();
    if sh.ring <= 1 {
        return out;
    }
    let n = sh.ring as usize;
    let mut ring = Ring::new(spec, *sh);
    for r in candidate_ranks(n) {
        out.fwd = out.fwd.max(ring.forward_rank(r));
    }
    out.bwd = ring.backward_rank(0).max(ring.backward_rank(n - 1));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(ring: u32, kv_heads: f64) -> RingShape {
        RingShape {
            ring,
            batch: 1.0,
            chunk: 4096.0,
            q_heads: 32.0,
            kv_heads,
            head_dim: 128.0,
        }
    }

    fn spec() -> ClusterSpec {
        ClusterSpec::load("dgx-h100").unwrap()
    }

    /// Bytes of rank r's forward and backward for a ring of n <= MAX_PARTS (one merge), by
    /// hand from runtime/src/ring.rs: P, L, K elements per row of o, of lse, per key of K.
    fn by_hand(n: f64, r: f64, g: bool, (p, l, k): (f64, f64, f64), c: f64) -> (f64, f64) {
        let (cov, half, rows) = (r, n - 1.0 - r, 2.0 * c);
        let cols = cov * c + half * 2.0 * c;
        let expand = if g { 2.0 * 2.0 * (k + p) * cols } else { 0.0 };
        // lse copy, 32 B per lse element of every other part, the last's weight and addcmul_out.
        let lse = 8.0 * l * rows + 32.0 * l * (cov * rows + half * c) + 20.0 * l * rows;
        let last = (4.0 + 2.0 + 2.0) * p * rows + 4.0 * l * rows;
        let adds = 10.0 * p * ((cov - 1.0).max(0.0) * rows + half * c)
            + 4.0 * l * ((cov - 1.0).max(0.0) * rows + half * c);
        let first = if r > 0.0 {
            6.0 * p * rows + 4.0 * l * rows // the own block times its weight, into fp32
        } else {
            4.0 * p * rows // zero fill
        };
        let fwd = expand + lse + last + adds + first;
        let dq = 10.0 * p * (cov * rows + half * c);
        let dkv = 2.0 * 10.0 * k * cols;
        let lse_rows = if half > 0.0 { 8.0 * l * c } else { 0.0 };
        let bwd = 2.0 * expand + dq + dkv + lse_rows;
        (fwd, bwd)
    }

    #[test]
    fn a_ring_of_one_costs_nothing() {
        let s = spec();
        for kv in [8.0, 32.0] {
            assert_eq!(ring_merge(&s, &shape(1, kv)), RingMerge::default());
            assert_eq!(ring_merge_rank(&s, &shape(1, kv), 0), RingMerge::default());
        }
    }

    #[test]
    fn bytes_and_kernels_follow_the_runtime_code() {
        let s = spec();
        for kv in [8.0, 32.0] {
            for n in 2..=MAX_PARTS as u32 {
                let sh = shape(n, kv);
                let w = (128.0 * 32.0, 32.0, 128.0 * kv);
                for r in 0..n as usize {
                    let got = ring_merge_rank(&s, &sh, r);
                    let (f, b) = by_hand(f64::from(n), r as f64, kv < 32.0, w, sh.chunk);
                    assert!((got.fwd.bytes - f).abs() < 1e-6 * f, "n {n} r {r}");
                    assert!((got.bwd.bytes - b).abs() < 1e-6 * b, "n {n} r {r}");
                    // Forward: 4 kernels per part merged (one more for a zero fill), 2 kv
                    // repeats per block after the first; backward: 3 adds and 4 repeats/sums
                    // per block after the first, one lse copy when there are half blocks.
                    let (m, g) = (f64::from(n), if kv < 32.0 { 1.0 } else { 0.0 });
                    let zero = if r == 0 { 1.0 } else { 0.0 };
                    assert_eq!(got.fwd.kernels, 4.0 * m + zero + 2.0 * g * (m - 1.0));
                    let half = if r + 1 < n as usize { 1.0 } else { 0.0 };
                    assert_eq!(got.bwd.kernels, (3.0 + 4.0 * g) * (m - 1.0) + half);
                }
            }
        }
    }

    #[test]
    fn the_counted_folds_equal_the_step_by_step_walk() {
        let s = spec();
        for n in 2..=60u32 {
            for kv in [8.0, 32.0] {
                let mut ring = Ring::new(&s, shape(n, kv));
                for r in 0..n as usize {
                    let (a, b) = (ring.forward_merges(r), ring.forward_merges_by_step(r));
                    assert_eq!(a.kernels, b.kernels, "ring {n} rank {r}");
                    assert!(
                        (a.bytes - b.bytes).abs() <= 1e-9 * b.bytes,
                        "ring {n} rank {r}"
                    );
                    assert!((a.s - b.s).abs() <= 1e-9 * b.s, "ring {n} rank {r}");
                }
            }
        }
    }

    #[test]
    fn the_slowest_rank_is_among_the_candidates() {
        let s = spec();
        for n in (2..=80u32).chain([97, 150, 257]) {
            for kv in [8.0, 32.0] {
                let sh = shape(n, kv);
                let mut all = RingMerge::default();
                for r in 0..n as usize {
                    let w = ring_merge_rank(&s, &sh, r);
                    all.fwd = all.fwd.max(w.fwd);
                    all.bwd = all.bwd.max(w.bwd);
                }
                assert_eq!(ring_merge(&s, &sh), all, "ring {n} kv {kv}");
            }
        }
    }

    #[test]
    fn grows_with_ring_steps_and_folds_every_max_parts() {
        let s = spec();
        // At a fixed chunk every step adds blocks to merge and accumulate.
        let mut last = RingMerge::default();
        for n in 2..=32 {
            let m = ring_merge(&s, &shape(n, 8.0));
            assert!(m.fwd.s > last.fwd.s && m.bwd.s > last.bwd.s, "ring {n}");
            assert!(m.fwd.bytes > last.fwd.bytes && m.bwd.bytes > last.bwd.bytes);
            last = m;
        }
        // Ring of 9, last rank (every block covering), MHA: one fold of 8 parts (32 kernels)
        // into fp32, then the fold and one block (8 kernels).
        let w = ring_merge_rank(&s, &shape(9, 32.0), 8);
        assert_eq!(w.fwd.kernels, 32.0 + 8.0);
        // Each kernel takes at least the floor and its bytes over the fastest rate.
        let floor = kernel_floor_s(&s);
        assert!(w.fwd.s >= w.fwd.kernels * floor);
        assert!(w.bwd.s >= w.bwd.bytes / s.hbm_bytes_per_s);
    }
}
