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

/// A merge's shape: the head part's bytes per element, its covering and half blocks, the
/// output's bytes per element.
type GroupKey = (f64, f64, f64, f64);

/// Prices kernel calls: max(bytes over the bandwidth at that call size, the per-kernel floor),
/// each distinct call size priced once, each distinct merge counted once (ranks share most).
struct Pricer<'a> {
    spec: &'a ClusterSpec,
    floor: f64,
    cache: Vec<(f64, bool, f64)>,
    groups: Vec<(GroupKey, RingWork)>,
}

impl<'a> Pricer<'a> {
    fn new(spec: &'a ClusterSpec) -> Self {
        Pricer {
            spec,
            floor: kernel_floor_s(spec),
            cache: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// One call of `bytes`, a layout copy when `layout`.
    fn call_s(&mut self, bytes: f64, layout: bool) -> f64 {
        if let Some(&(_, _, s)) = self
            .cache
            .iter()
            .find(|(b, l, _)| *b == bytes && *l == layout)
        {
            return s;
        }
        let rate = if layout {
            layout_rate(self.spec, bytes)
        } else {
            hbm_rate(self.spec, bytes)
        };
        let s = (bytes / rate).max(self.floor);
        self.cache.push((bytes, layout, s));
        s
    }

    /// `n` calls of `bytes` each.
    fn work(&mut self, n: f64, bytes: f64, layout: bool) -> RingWork {
        if n <= 0.0 {
            return RingWork::default();
        }
        RingWork {
            s: n * self.call_s(bytes, layout),
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
fn expand(p: &mut Pricer, sh: &RingShape, blocks: f64, cols: f64) -> RingWork {
    let (pq, _, pk) = widths(sh);
    if sh.kv_heads >= sh.q_heads {
        return RingWork::default();
    }
    p.work(2.0 * blocks, B16 * (pk + pq) * cols, true)
}

/// [`merge_group`], counted once per distinct shape.
fn merge_group_once(
    p: &mut Pricer,
    sh: &RingShape,
    head_bytes: f64,
    (cov, half): (f64, f64),
    out_bytes: f64,
) -> RingWork {
    let key = (head_bytes, cov, half, out_bytes);
    if let Some(&(_, w)) = p.groups.iter().find(|(k, _)| *k == key) {
        return w;
    }
    let w = merge_group(p, sh, head_bytes, (cov, half), out_bytes);
    p.groups.push((key, w));
    w
}

/// One merge by `merge_parts` of a head part (covering every row, `head_bytes` per element:
/// the own block in 16 bits or a folded fp32 result) followed by `cov` covering and `half`
/// half blocks in that order (the order rank r receives them), written in `out_bytes`.
fn merge_group(
    p: &mut Pricer,
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

/// Steps 1..=`upto` of rank `r` split into (covering, half) blocks: steps j <= r are covering.
fn split(r: usize, from: usize, upto: usize) -> (f64, f64) {
    let cov = upto.min(r).saturating_sub(from - 1);
    (cov as f64, (upto + 1 - from - cov) as f64)
}

/// The forward merges of rank `r`: a fold of every `MAX_PARTS` parts held while steps remain,
/// then the final merge into the 16-bit output.
fn forward_merges(p: &mut Pricer, sh: &RingShape, r: usize) -> RingWork {
    let n = sh.ring as usize;
    let mut w = RingWork::default();
    let (mut head, mut held, mut from) = (B16, 1usize, 1usize);
    for j in 1..n {
        held += 1;
        if held >= MAX_PARTS && j + 1 < n {
            w = w.plus(merge_group_once(p, sh, head, split(r, from, j), F32));
            (head, held, from) = (F32, 1, j + 1);
        }
    }
    w.plus(merge_group_once(p, sh, head, split(r, from, n - 1), B16))
}

/// Rank `r`'s forward: the kv repeats of its blocks after step 0 and its merges.
fn forward_rank(p: &mut Pricer, sh: &RingShape, r: usize) -> RingWork {
    let (cov, half) = split(r, 1, sh.ring as usize - 1);
    let c = sh.chunk;
    expand(p, sh, cov, c)
        .plus(expand(p, sh, half, 2.0 * c))
        .plus(forward_merges(p, sh, r))
}

/// Rank `r`'s backward beyond step 0: per block the kv repeats and the dK/dV head sums, the
/// dQ rows into the fp32 dQ, dK and dV into the travelling fp32 sums; the half blocks'
/// log-sum-exp rows copied once.
fn backward_rank(p: &mut Pricer, sh: &RingShape, r: usize) -> RingWork {
    let (pq, pl, pk) = widths(sh);
    let (cov, half) = split(r, 1, sh.ring as usize - 1);
    let c = sh.chunk;
    let acc = F32 + B16 + F32;
    let mut w = RingWork::default();
    // (blocks, q rows, kv columns) of the covering and the half blocks.
    for (n, rows, cols) in [(cov, 2.0 * c, c), (half, c, 2.0 * c)] {
        w = w.plus(expand(p, sh, n, cols));
        if sh.kv_heads < sh.q_heads {
            w = w.plus(p.work(2.0 * n, B16 * (pq + pk) * cols, false));
        }
        w = w.plus(p.work(n, acc * pq * rows, false));
        w = w.plus(p.work(2.0 * n, acc * pk * cols, false));
    }
    if half > 0.0 {
        w = w.plus(p.work(1.0, 2.0 * F32 * pl * c, false));
    }
    w
}

/// Rank `r`'s ring work of one layer (zero for a ring of one).
pub fn ring_merge_rank(spec: &ClusterSpec, sh: &RingShape, r: usize) -> RingMerge {
    if sh.ring <= 1 {
        return RingMerge::default();
    }
    let mut p = Pricer::new(spec);
    RingMerge {
        fwd: forward_rank(&mut p, sh, r),
        bwd: backward_rank(&mut p, sh, r),
    }
}

/// The ring's own work of one layer on its slowest rank, forward and backward apart (zero for
/// a ring of one).
pub fn ring_merge(spec: &ClusterSpec, sh: &RingShape) -> RingMerge {
    let mut out = RingMerge::default();
    if sh.ring <= 1 {
        return out;
    }
    let mut p = Pricer::new(spec);
    for r in 0..sh.ring as usize {
        out.fwd = out.fwd.max(forward_rank(&mut p, sh, r));
        out.bwd = out.bwd.max(backward_rank(&mut p, sh, r));
    }
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
