//! Kernel calibration: measured throughput curves that replace the cluster spec's constant
//! efficiency figures. GEMM throughput depends on the token count of the projections; attention
//! throughput on the heads and tokens of each kernel call, which is what makes many small ring
//! steps (or few heads per Ulysses rank) slower than one large kernel.
//!
//! Memory-bound work (norms, RoPE, activations, residual adds, the loss softmax, the optimizer)
//! runs at the achieved HBM bandwidth, measured over the bytes one kernel call moves: the
//! streaming curve (ops "copy", "add", "mul") for elementwise kernels, and the layout curve
//! (ops "transpose", "cat": a heads-to-front copy and RoPE's rotate-half cat, where the
//! calibration has them) for the layout copies of the runtime's layers, which run at about half
//! the streaming rate on an H100 (1.5-1.7 against 3.0 TB/s, `runtime/bench/results/h100-sxm/raw/
//! h100-sxm-2layer-v2.json`). The output head's GEMM (`"proj": "lm_head"`, measured at the loss's
//! chunk of rows) has its own curve when the file has it.
//!
//! The file is the JSON written by `mmsp-runtime calibrate --out FILE` (or printed by
//! `tools/calibrate_kernels.py`) on the GPU machine: `{"device": ..., "gemm": [{"tokens", "n",
//! "k", "tflops"}], "attention": [{"backend", "heads", "tokens", "causal", "tflops"}],
//! "memory_bandwidth": [{"op", "bytes", "gb_per_s"}]}` (points with an "error" are skipped;
//! `memory_bandwidth` is optional, older files have none).

use serde::Deserialize;

use crate::error::{Error, Result};

/// Bytes moved by a memory-bound call beyond which no current GPU's L2 cache can hold its
/// operands (H100: 50 MB, B200: 126 MB), so its rate is HBM's: the peak check applies there.
pub const L2_BOUND_BYTES: f64 = 256.0 * 1024.0 * 1024.0;

/// Calibrations measured on the GPU machine and shipped with the tool.
pub const EMBEDDED: &[(&str, &str)] = &[
    ("h100-sxm", include_str!("../../calibration/h100-sxm.json")),
    // One H200 of the GPU machine (`runtime/bench/calibrate.sh`): streaming kernels at 4.2-4.4
    // TB/s against the H100's 3.0, layout copies 1.65-1.85 TB/s; no collectives section.
    ("h200-sxm", include_str!("../../calibration/h200-sxm.json")),
];

#[derive(Debug, Deserialize)]
struct RawCalibration {
    device: String,
    #[serde(default)]
    torch: Option<String>,
    gemm: Vec<RawGemm>,
    attention: Vec<RawAttention>,
    /// Achieved bandwidth of memory-bound kernels (absent from older files).
    #[serde(default)]
    memory_bandwidth: Vec<RawBandwidth>,
    /// NCCL collectives over the GPUs of one host (`mmsp-runtime calibrate-comm`; optional).
    #[serde(default)]
    collectives: Option<RawCollectives>,
    /// Per-kernel times of dependent kernels, eager and replayed from a CUDA graph
    /// (`mmsp-runtime calibrate-launch`; optional).
    #[serde(default)]
    launch: Option<RawLaunch>,
}

#[derive(Debug, Deserialize)]
struct RawLaunch {
    /// Copies of several sizes, each reading what the one before wrote, replayed from one
    /// CUDA graph.
    #[serde(default)]
    graph_copy: Vec<RawGraphCopy>,
    /// One-token projections of several weight sizes, each on the output of the one before,
    /// replayed from one CUDA graph.
    #[serde(default)]
    graph_gemv: Vec<RawGraphGemv>,
    /// Small ATen ops in graph-replayed chains: seconds per op by kind and their median.
    #[serde(default)]
    graph_small_ops: Option<RawSmallOps>,
    /// The decode attention call over caches of several sizes, replayed from one CUDA graph.
    #[serde(default)]
    graph_decode_attention: Vec<RawGraphAttention>,
    /// Seconds of the host's part of one decode step replayed from a graph, device idle
    /// meanwhile: the step's inputs copied in, the replay, the greedy argmax and the token
    /// read back.
    #[serde(default)]
    host_token_s: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawSmallOps {
    median_s: f64,
}

#[derive(Debug, Deserialize)]
struct RawGraphAttention {
    /// K/V bytes one call reads.
    kv_bytes: f64,
    /// Seconds per call.
    seconds: f64,
}

#[derive(Debug, Deserialize)]
struct RawGraphGemv {
    /// Bytes of the weight read.
    weight_bytes: f64,
    /// Seconds per projection.
    seconds: f64,
}

#[derive(Debug, Deserialize)]
struct RawGraphCopy {
    /// Bytes one copy reads plus writes.
    bytes: f64,
    /// Seconds per copy.
    seconds: f64,
}

#[derive(Debug, Deserialize)]
struct RawCollectives {
    /// GPUs the collectives spanned (one NVLink domain).
    gpus: u32,
    points: Vec<RawCollective>,
}

#[derive(Debug, Deserialize)]
struct RawCollective {
    /// "all_gather", "reduce_scatter", "all_reduce" or "all_to_all".
    op: String,
    /// Bytes of the whole tensor (all ranks' data).
    bytes: f64,
    /// nccl-tests bus bandwidth, 10^9 bytes/s.
    bus_gb_per_s: f64,
}

#[derive(Debug, Deserialize)]
struct RawBandwidth {
    /// The op measured ("copy", "add", "mul": streaming; "transpose", "cat": layout copies).
    #[serde(default)]
    op: Option<String>,
    /// Bytes one kernel call reads plus writes.
    bytes: f64,
    /// Achieved bandwidth, 10^9 bytes/s.
    #[serde(default)]
    gb_per_s: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawGemm {
    /// Which projection ("lm_head": the output head, kept apart from the layers' mean).
    #[serde(default)]
    proj: Option<String>,
    tokens: f64,
    #[serde(default)]
    tflops: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawAttention {
    heads: f64,
    tokens: f64,
    causal: bool,
    #[serde(default)]
    tflops: Option<f64>,
}

/// Throughput curves (FLOP/s) from measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub name: String,
    pub device: String,
    /// (log tokens, FLOP/s), ascending: mean over the projection shapes measured.
    gemm: Vec<(f64, f64)>,
    /// Per causal flag: (log of heads x tokens^2, FLOP/s), ascending. A call's throughput is
    /// set by how much work it has to spread over the GPU (small calls are launch- and
    /// occupancy-bound), so the measured points are keyed by work; beyond the largest call
    /// measured the rate stays at that call's.
    attention: [Vec<(f64, f64)>; 2],
    /// (log bytes moved per kernel call, bytes/s), ascending: mean over the ops measured.
    /// Empty when the file has no `memory_bandwidth` section.
    bandwidth: Vec<(f64, f64)>,
    /// The same for the layout copies ("transpose", "cat"); empty when not measured.
    layout: Vec<(f64, f64)>,
    /// (log tokens, FLOP/s) of the output head's GEMMs; empty when not measured.
    head: Vec<(f64, f64)>,
    /// Bus bandwidth (bytes/s) of ring collectives inside one fabric domain at the largest
    /// size measured, and the GPUs measured; None without a `collectives` section.
    fabric_bus: Option<(f64, u32)>,
    /// Decode kernels replayed from a CUDA graph; None without a `launch` section with graph
    /// points.
    graph: Option<GraphTimes>,
}

/// What a decode kernel is, for the graph-replayed times the calibration measures per kind
/// (`mmsp-runtime calibrate-launch`; the planner's decode chains tag their kernels with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// A small ATen op or copy (elementwise, reduction, cast, concatenation, index write).
    Op,
    /// A one-token projection (a GEMV over a weight).
    Projection,
    /// The decode attention over the KV cache (FlashAttention).
    Attention,
}

/// Per-kernel times of a decode step's kernels replayed from a CUDA graph, each after the one
/// before (the `launch` section of `mmsp-runtime calibrate-launch`).
#[derive(Debug, Clone, PartialEq)]
pub struct GraphTimes {
    /// (log bytes moved, seconds) of copies, ascending.
    copy: Vec<(f64, f64)>,
    /// (log weight bytes, bytes/s) of one-token projections, ascending.
    gemv: Vec<(f64, f64)>,
    /// (log K/V bytes, bytes/s) of the decode attention, ascending.
    attention: Vec<(f64, f64)>,
    /// Seconds of a small ATen op (the median over the kinds measured).
    small_op_s: Option<f64>,
    /// Seconds of the host's part of a step ([`GraphTimes::host_token_s`]).
    host_token_s: Option<f64>,
}

impl GraphTimes {
    /// Seconds of the host's own work per greedy decode step (the step's inputs copied in,
    /// the replay launched, the token read back), measured whole around a graph of one small
    /// kernel with the device waiting on it; pipelined generation overlaps it with the
    /// device's step. None if not measured.
    pub fn host_token_s(&self) -> Option<f64> {
        self.host_token_s
    }

    /// Seconds of one kernel of `kind` moving `bytes`: a projection or the attention at the
    /// achieved bandwidth measured at that size (held beyond the sizes measured, never under
    /// the smallest call's time), a small op the larger of the measured small op and a copy
    /// of that size. None when the file measured nothing for that kind.
    pub fn kernel_s(&self, bytes: f64, kind: KernelKind) -> Option<f64> {
        let x = bytes.max(1.0).ln();
        let by_rate = |curve: &[(f64, f64)]| {
            let first = curve.first()?;
            Some((bytes / interp(curve, x)).max(first.0.exp() / first.1))
        };
        match kind {
            KernelKind::Projection if !self.gemv.is_empty() => by_rate(&self.gemv),
            KernelKind::Attention if !self.attention.is_empty() => by_rate(&self.attention),
            _ => {
                let copy = (!self.copy.is_empty()).then(|| interp(&self.copy, x));
                match (copy, self.small_op_s) {
                    (Some(c), Some(o)) => Some(c.max(o)),
                    (c, o) => c.or(o),
                }
            }
        }
    }
}

/// Whether a `memory_bandwidth` op is a layout copy rather than a streaming kernel.
fn is_layout_op(op: Option<&str>) -> bool {
    matches!(op, Some("transpose") | Some("cat"))
}

/// Attention curves per causal flag from the measured calls: the best backend per (causal,
/// heads, tokens), keyed by work (heads x tokens^2) as [`Calibration`]'s `attention` is.
fn attention_curves(raw: &[RawAttention]) -> [Vec<(f64, f64)>; 2] {
    let mut best: std::collections::BTreeMap<(bool, u64, u64), f64> = Default::default();
    for a in raw {
        if let Some(t) = a.tflops.filter(|&t| plausible(t)) {
            let e = best
                .entry((a.causal, a.heads as u64, a.tokens as u64))
                .or_default();
            *e = e.max(t * 1e12);
        }
    }
    let mut by_work: [std::collections::BTreeMap<u64, (f64, f64)>; 2] = Default::default();
    for ((causal, heads, tokens), f) in best {
        if heads == 0 || tokens == 0 {
            continue;
        }
        let work = heads as f64 * (tokens as f64).powi(2);
        // Bucket by 1/100 of a natural-log unit so equal-work shapes average.
        let key = (work.ln() * 100.0).round() as u64;
        let e = by_work[usize::from(causal)].entry(key).or_default();
        e.0 += f;
        e.1 += 1.0;
    }
    by_work.map(|m| {
        m.into_iter()
            .map(|(k, (sum, n))| (k as f64 / 100.0, sum / n))
            .collect::<Vec<_>>()
    })
}

/// The ring collectives' (all-gather, reduce-scatter) bus bandwidth at the largest tensor
/// measured, the regime of gradient and weight traffic (mean of the two), and the GPUs they
/// spanned; None with fewer than two GPUs or no such point.
fn ring_bus_bandwidth(c: &RawCollectives) -> Option<(f64, u32)> {
    let ring: Vec<&RawCollective> = c
        .points
        .iter()
        .filter(|p| matches!(p.op.as_str(), "all_gather" | "reduce_scatter"))
        .filter(|p| plausible(p.bus_gb_per_s))
        .collect();
    let top = ring.iter().map(|p| p.bytes).fold(0.0, f64::max);
    let at: Vec<f64> = ring
        .iter()
        .filter(|p| p.bytes == top)
        .map(|p| p.bus_gb_per_s * 1e9)
        .collect();
    (!at.is_empty() && c.gpus > 1).then(|| (at.iter().sum::<f64>() / at.len() as f64, c.gpus))
}

/// Mean of the values at each key, as (ln key, mean) ascending.
fn mean_curve(points: impl Iterator<Item = (u64, f64)>) -> Vec<(f64, f64)> {
    let mut by: std::collections::BTreeMap<u64, (f64, f64)> = Default::default();
    for (k, v) in points {
        let e = by.entry(k).or_default();
        e.0 += v;
        e.1 += 1.0;
    }
    by.into_iter()
        .filter(|(k, _)| *k > 0)
        .map(|(k, (sum, n))| ((k as f64).ln(), sum / n))
        .collect()
}

/// The graph-replayed times of a `launch` section, if it has any.
fn graph_times(l: &RawLaunch) -> Option<GraphTimes> {
    let rate = |c: Vec<(f64, f64)>| c.into_iter().map(|(lb, s)| (lb, lb.exp() / s)).collect();
    let g = GraphTimes {
        copy: seconds_curve(l.graph_copy.iter().map(|p| (p.bytes, p.seconds))),
        gemv: rate(seconds_curve(
            l.graph_gemv.iter().map(|p| (p.weight_bytes, p.seconds)),
        )),
        attention: rate(seconds_curve(
            l.graph_decode_attention
                .iter()
                .map(|p| (p.kv_bytes, p.seconds)),
        )),
        small_op_s: l
            .graph_small_ops
            .as_ref()
            .map(|o| o.median_s)
            .filter(|&s| s > 0.0 && s < 1.0),
        host_token_s: l.host_token_s.filter(|&s| s > 0.0 && s < 1.0),
    };
    let any = !g.copy.is_empty() || !g.gemv.is_empty() || !g.attention.is_empty();
    (any || g.small_op_s.is_some() || g.host_token_s.is_some()).then_some(g)
}

/// (log bytes, seconds) from measured (bytes, seconds) pairs: physical ones only, ascending,
/// the mean where a size was measured more than once ([`mean_curve`]).
fn seconds_curve(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    mean_curve(
        points
            .filter(|&(b, s)| b >= 1.0 && b.is_finite() && s > 0.0 && s < 1.0)
            .map(|(b, s)| (b as u64, s)),
    )
}

/// Piecewise-linear interpolation in x, clamped at the ends.
fn interp(points: &[(f64, f64)], x: f64) -> f64 {
    match points {
        [] => f64::NAN,
        [only] => only.1,
        _ => {
            if x <= points[0].0 {
                return points[0].1;
            }
            for w in points.windows(2) {
                if x <= w[1].0 {
                    let f = (x - w[0].0) / (w[1].0 - w[0].0);
                    return w[0].1 + f * (w[1].1 - w[0].1);
                }
            }
            points[points.len() - 1].1
        }
    }
}

impl Calibration {
    /// A shipped calibration by name, or a JSON file by path.
    pub fn load(arg: &str) -> Result<Self> {
        if let Some((name, text)) = EMBEDDED.iter().find(|(n, _)| *n == arg) {
            return Self::from_json(text, name);
        }
        let text = std::fs::read_to_string(arg).map_err(|e| Error::Io {
            path: arg.into(),
            msg: e.to_string(),
        })?;
        Self::from_json(&text, arg)
    }

    pub fn from_json(text: &str, name: &str) -> Result<Self> {
        let bad = |msg: String| Error::Parse {
            path: name.into(),
            msg,
        };
        let raw: RawCalibration = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "not a kernel calibration (see tools/calibrate_kernels.py): {e}"
            ))
        })?;
        let _ = raw.torch;
        // GEMM: mean throughput per token count, the layers' projections and the output head
        // apart.
        let gemm_points = |head: bool| {
            raw.gemm
                .iter()
                .filter(move |g| (g.proj.as_deref() == Some("lm_head")) == head)
                .filter_map(|g| {
                    g.tflops
                        .filter(|&t| plausible(t))
                        .map(|t| (g.tokens as u64, t * 1e12))
                })
        };
        let gemm = mean_curve(gemm_points(false));
        let head = mean_curve(gemm_points(true));
        let attention = attention_curves(&raw.attention);
        // Memory bandwidth: mean over the ops measured at each call size, streaming kernels and
        // layout copies apart.
        let bw_points = |layout: bool| {
            raw.memory_bandwidth
                .iter()
                .filter(move |b| is_layout_op(b.op.as_deref()) == layout)
                .filter(|b| b.bytes.is_finite() && b.bytes >= 1.0)
                .filter_map(|b| {
                    b.gb_per_s
                        .filter(|&g| plausible(g))
                        .map(|g| (b.bytes as u64, g * 1e9))
                })
        };
        let bandwidth = mean_curve(bw_points(false));
        let layout = mean_curve(bw_points(true));
        let fabric_bus = raw.collectives.as_ref().and_then(ring_bus_bandwidth);
        let graph = raw.launch.as_ref().and_then(graph_times);
        if gemm.is_empty() || attention.iter().any(Vec::is_empty) {
            return Err(bad(
                "needs GEMM points and causal and non-causal attention points with tflops".into(),
            ));
        }
        Ok(Calibration {
            name: name.into(),
            device: raw.device,
            gemm,
            attention,
            bandwidth,
            layout,
            head,
            fabric_bus,
            graph,
        })
    }

    /// The highest memory bandwidth measured (bytes/s) by a call that cannot be served from
    /// the on-chip L2 cache (at least [`L2_BOUND_BYTES`] moved), if the file has any. Smaller
    /// calls may legitimately exceed the HBM figure: an H100 has 50 MB of L2 (NVIDIA H100
    /// Tensor Core GPU Architecture whitepaper, 2022), and a 16 MiB copy measured 3.6 TB/s.
    pub fn max_bandwidth(&self) -> Option<f64> {
        self.bandwidth
            .iter()
            .filter(|p| p.0 >= L2_BOUND_BYTES.ln())
            .map(|p| p.1)
            .reduce(f64::max)
    }

    /// Checks that the measured memory bandwidth is physical for a GPU whose HBM delivers
    /// `peak` bytes/s (the vendor's figure): a file above it was measured on another GPU.
    pub fn check_bandwidth(&self, gpu_model: &str, peak: f64) -> Result<()> {
        match self.max_bandwidth() {
            Some(bw) if bw > peak * 1.02 => Err(Error::invalid(
                "calibration",
                format!(
                    "{} (measured on {}) reaches {:.2} TB/s of memory bandwidth, above the {:.2} TB/s HBM peak of {gpu_model}: calibrate on that GPU",
                    self.name,
                    self.device,
                    bw / 1e12,
                    peak / 1e12
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Achieved memory bandwidth (bytes/s) of a memory-bound kernel call that moves `bytes`
    /// (reads plus writes), or None when the file has no `memory_bandwidth` section. Small
    /// calls are launch-bound; beyond the largest call measured the rate stays at its value.
    pub fn memory_bandwidth(&self, bytes: f64) -> Option<f64> {
        (!self.bandwidth.is_empty()).then(|| interp(&self.bandwidth, bytes.max(1.0).ln()))
    }

    /// Achieved bandwidth (bytes/s) of a layout copy (a transpose or a cat) moving `bytes`, or
    /// None when the file has no such points.
    pub fn layout_bandwidth(&self, bytes: f64) -> Option<f64> {
        (!self.layout.is_empty()).then(|| interp(&self.layout, bytes.max(1.0).ln()))
    }

    /// The measured bus bandwidth (bytes/s) of ring collectives inside one fabric domain and
    /// the GPUs it was measured on, if the file has a `collectives` section
    /// (`mmsp-runtime calibrate-comm`).
    pub fn fabric_bus_bandwidth(&self) -> Option<(f64, u32)> {
        self.fabric_bus
    }

    /// The output head's GEMM throughput (FLOP/s) over `tokens` rows, or None when the file has
    /// no `lm_head` points.
    pub fn head_gemm_rate(&self, tokens: f64) -> Option<f64> {
        (!self.head.is_empty()).then(|| interp(&self.head, tokens.max(1.0).ln()))
    }

    /// The decode kernels' graph-replayed times (`mmsp-runtime calibrate-launch`), if measured.
    pub fn graph_times(&self) -> Option<&GraphTimes> {
        self.graph.as_ref()
    }

    /// The per-kernel floor (seconds): the time of the smallest memory-bound call measured,
    /// i.e. its bytes over its achieved bandwidth (mean over the ops measured at that size), or
    /// None when the file has no `memory_bandwidth` section. The sweep's calls are issued
    /// back to back from the host through the runtime's own tensor library, so for a call this
    /// small the time is launch-bound (host dispatch, launch and the kernel's minimum time),
    /// not set by its bytes: no call of the same path finishes faster.
    pub fn kernel_floor_s(&self) -> Option<f64> {
        self.bandwidth.first().map(|&(lb, bw)| lb.exp() / bw)
    }

    /// The highest throughput any curve reaches (FLOP/s).
    pub fn max_rate(&self) -> f64 {
        self.gemm
            .iter()
            .chain(self.attention.iter().flatten())
            .map(|p| p.1)
            .fold(0.0, f64::max)
    }

    /// Checks that the curves are physical for a GPU of `peak` dense bf16 FLOP/s.
    pub fn check_against(&self, gpu_model: &str, peak: f64) -> Result<()> {
        if self.max_rate() > peak * 1.02 {
            return Err(Error::invalid(
                "calibration",
                format!(
                    "{} (measured on {}) reaches {:.0} TFLOP/s, above the {:.0} TFLOP/s peak of {gpu_model}: calibrate on that GPU",
                    self.name,
                    self.device,
                    self.max_rate() / 1e12,
                    peak / 1e12
                ),
            ));
        }
        Ok(())
    }

    /// bf16 GEMM throughput (FLOP/s) for projections over `tokens` rows.
    pub fn gemm_rate(&self, tokens: f64) -> f64 {
        interp(&self.gemm, tokens.max(1.0).ln())
    }

    /// Attention forward+backward throughput (FLOP/s) of one kernel call over `tokens` query
    /// (and key) tokens with `heads` heads of dimension 128.
    pub fn attention_rate(&self, heads: f64, tokens: f64, causal: bool) -> f64 {
        let work = heads.max(1.0) * tokens.max(1.0).powi(2);
        interp(&self.attention[usize::from(causal)], work.ln())
    }
}

/// A measured rate (TFLOP/s or GB/s) that a GPU can reach: positive, finite and below 10^6
/// (a petabyte or exaflop per second). Points outside are skipped like failed measurements: a
/// file with 1e308 GB/s made every memory-bound time 0 and the step "NaN" (fuzz test).
fn plausible(rate: f64) -> bool {
    rate.is_finite() && rate > 0.0 && rate <= 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_and_clamps() {
        let text = r#"{"device": "x", "gemm": [{"tokens": 1024, "n": 1, "k": 1, "tflops": 100},
            {"tokens": 4096, "n": 1, "k": 1, "tflops": 300}, {"tokens": 4096, "n": 2, "k": 1, "tflops": 500}],
            "attention": [
            {"backend": "a", "heads": 8, "tokens": 1024, "causal": false, "tflops": 100},
            {"backend": "b", "heads": 8, "tokens": 1024, "causal": false, "tflops": 200},
            {"backend": "a", "heads": 8, "tokens": 4096, "causal": false, "tflops": 400},
            {"backend": "a", "heads": 32, "tokens": 1024, "causal": false, "tflops": 300},
            {"backend": "a", "heads": 32, "tokens": 4096, "causal": false, "tflops": 500},
            {"backend": "a", "heads": 8, "tokens": 1024, "causal": true, "error": "no"},
            {"backend": "a", "heads": 8, "tokens": 1024, "causal": true, "tflops": 50}]}"#;
        let c = Calibration::from_json(text, "t").unwrap();
        assert_eq!(c.gemm_rate(1024.0), 100e12);
        assert_eq!(c.gemm_rate(4096.0), 400e12); // mean of two shapes
        assert!((c.gemm_rate(2048.0) - 250e12).abs() < 1e3); // halfway in log tokens
        assert_eq!(c.gemm_rate(64.0), 100e12); // clamped
        let near = |a: f64, b: f64| (a - b).abs() / b < 0.01;
        assert!(near(c.attention_rate(8.0, 1024.0, false), 200e12)); // best backend
                                                                     // 16 heads x 1024 tokens: work halfway (in log) between 8 x 1024 and 32 x 1024.
        let mid = c.attention_rate(16.0, 1024.0, false);
        assert!(mid > 200e12 && mid < 300e12, "{mid}");
        // Beyond the largest call measured, the largest call's rate; below, the smallest's.
        assert!(near(c.attention_rate(1.0, 1e6, false), 500e12));
        assert!(near(c.attention_rate(1.0, 16.0, false), 200e12));
        assert!(near(c.attention_rate(8.0, 1024.0, true), 50e12));
    }

    #[test]
    fn memory_bandwidth_is_optional_interpolated_and_checked() {
        let base = r#"{"device": "x", "gemm": [{"tokens": 1024, "n": 1, "k": 1, "tflops": 100}],
            "attention": [{"backend": "a", "heads": 8, "tokens": 1024, "causal": false, "tflops": 100},
            {"backend": "a", "heads": 8, "tokens": 1024, "causal": true, "tflops": 50}]"#;
        let old = Calibration::from_json(&format!("{base}}}"), "old").unwrap();
        assert_eq!(old.memory_bandwidth(1e9), None);
        assert!(old.check_bandwidth("g", 1e12).is_ok());
        let bw = r#", "memory_bandwidth": [
            {"op": "copy", "bytes": 1048576, "gb_per_s": 1000},
            {"op": "add", "bytes": 1048576, "gb_per_s": 2000},
            {"op": "copy", "bytes": 1073741824, "gb_per_s": 3000},
            {"op": "add", "bytes": 4096, "error": "oom"}]}"#;
        let c = Calibration::from_json(&format!("{base}{bw}"), "new").unwrap();
        let near = |a: f64, b: f64| (a - b).abs() / b < 1e-9;
        // The floor: the smallest call's time, 1 MiB at the mean 1.5 TB/s.
        assert!(near(c.kernel_floor_s().unwrap(), 1048576.0 / 1.5e12));
        assert_eq!(old.kernel_floor_s(), None);
        assert!(near(c.memory_bandwidth(1048576.0).unwrap(), 1.5e12)); // mean of the ops
        assert!(near(c.memory_bandwidth(1.0).unwrap(), 1.5e12)); // clamped below
        assert!(near(c.memory_bandwidth(1e12).unwrap(), 3e12)); // and above
        let mid = c.memory_bandwidth(32.0 * 1048576.0).unwrap(); // halfway in log bytes
        assert!(near(mid, 2.25e12), "{mid}");
        assert!(c.check_bandwidth("g", 3.35e12).is_ok());
        // A small call served from L2 may exceed the HBM figure; only large ones are checked.
        assert!(c.check_bandwidth("g", 1.8e12).is_err());
        let l2 = Calibration::from_json(
            &format!(
                "{base}{}",
                r#", "memory_bandwidth": [{"op": "copy", "bytes": 33554432, "gb_per_s": 3600},
                {"op": "copy", "bytes": 1073741824, "gb_per_s": 3000}]}"#
            ),
            "l2",
        )
        .unwrap();
        assert!(l2.check_bandwidth("g", 3.35e12).is_ok());
        let e = c.check_bandwidth("g", 2.0e12).unwrap_err().to_string();
        assert!(
            e.contains("3.00 TB/s") && e.contains("2.00 TB/s HBM peak of g"),
            "{e}"
        );
    }

    #[test]
    fn collectives_give_the_fabric_bus_bandwidth() {
        let base = r#"{"device": "x", "gemm": [{"tokens": 1024, "n": 1, "k": 1, "tflops": 100}],
            "attention": [{"heads": 1, "tokens": 1024, "causal": true, "tflops": 100},
                          {"heads": 1, "tokens": 1024, "causal": false, "tflops": 100}]"#;
        let c = Calibration::from_json(&format!("{base}}}"), "t").unwrap();
        assert_eq!(c.fabric_bus_bandwidth(), None);
        let with = format!(
            r#"{base}, "collectives": {{"gpus": 4, "points": [
                {{"op": "all_gather", "bytes": 1e6, "bus_gb_per_s": 100}},
                {{"op": "all_gather", "bytes": 1e9, "bus_gb_per_s": 360}},
                {{"op": "reduce_scatter", "bytes": 1e9, "bus_gb_per_s": 340}},
                {{"op": "all_to_all", "bytes": 1e9, "bus_gb_per_s": 200}}]}}}}"#
        );
        let c = Calibration::from_json(&with, "t").unwrap();
        assert_eq!(c.fabric_bus_bandwidth(), Some((350e9, 4)));
    }

    #[test]
    fn rejects_other_json() {
        assert!(Calibration::from_json("{\"a\": 1}", "x.json").is_err());
        assert!(Calibration::load("/nonexistent.json").is_err());
    }

    #[test]
    fn shipped_calibrations_parse() {
        for (name, _) in EMBEDDED {
            let c = Calibration::load(name).unwrap();
            assert!(c.gemm_rate(8192.0) > 1e14);
        }
    }
}
