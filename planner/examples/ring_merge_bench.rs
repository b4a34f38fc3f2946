//! What the cost model implies for `mmsp-runtime bench --what 2d` (8 in-process ranks on one
//! GPU, fwd+bwd of 2D attention against one kernel over the whole sequence), next to what was
//! measured: `cargo run --release -p mmsp-planner --example ring_merge_bench -- [BENCH.jsonl]
//! [CALIBRATION]` (defaults: the H100 issue-18 round,
//! `runtime/bench/results/h100-sxm/raw/kern_issue18/2d_new.jsonl`, and `calibration/h100-sxm.json`).
//!
//! Every rank shares the one GPU, so a rank's work adds up over the 8 ranks: the model's time
//! is the measured blocks-only kernel time (the same ring blocks' kernels, back to back) plus
//! the ring's own work of every rank (`cost::ring::ring_merge_rank`, what the planner counts
//! per layer); a second figure adds what the in-process bench moves through HBM and NCCL would
//! move over the links (runtime/src/comm/local.rs: each receive is one `copy_into`; ring K/V
//! in 16 bits forward and backward, dK/dV in fp32 every backward step; with Ulysses, the
//! all-to-all receives and the `cat` that reorders them, runtime/src/ulysses.rs). The bench's
//! shape: batch 1, 32 heads (as many kv heads), head dim 128 (`bench_2d`).

use mmsp_planner::cost::compute::{hbm_rate, layout_rate};
use mmsp_planner::cost::ring::{ring_merge_rank, RingShape};
use mmsp_planner::spec::cluster::ClusterSpec;

const HEADS: f64 = 32.0;
const HEAD_DIM: f64 = 128.0;

/// Seconds of the in-process copies of one rank of a u x r layout at `s` tokens.
fn inprocess_copies_s(spec: &ClusterSpec, s: f64, u: f64, r: f64) -> f64 {
    let copy = |bytes: f64, n: f64| n * bytes / hbm_rate(spec, bytes);
    let cat = |bytes: f64, n: f64| n * bytes / layout_rate(spec, bytes);
    // Ring: a K (or V) block of the rank's heads and 2 chunks, read and written once per
    // receive: K, V forward (r - 1 steps), K, V and fp32 dK, dV backward (dK/dV every step).
    let kv = 2.0 * (HEADS / u) * (s / r) * HEAD_DIM;
    let mut t = 0.0;
    if r > 1.0 {
        t += copy(2.0 * kv, 2.0 * (r - 1.0)) * 2.0 + copy(2.0 * 2.0 * kv, 2.0 * r);
    }
    // Ulysses: q, k, v, o forward and dout, dq, dk, dv backward, each received once (copy)
    // and reordered once (cat), whole heads of the rank's tokens.
    if u > 1.0 {
        let x = 2.0 * HEADS * (s / (u * r)) * HEAD_DIM;
        t += copy(2.0 * x, 8.0) + cat(2.0 * x, 8.0);
    }
    t
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../");
    let bench = args.first().cloned().unwrap_or_else(|| {
        format!("{root}runtime/bench/results/h100-sxm/raw/kern_issue18/2d_new.jsonl")
    });
    let cal = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| format!("{root}calibration/h100-sxm.json"));
    let mut spec = ClusterSpec::load("dgx-h100").expect("preset");
    let c = mmsp_planner::calibration::Calibration::load(&cal).expect("calibration");
    spec.apply_calibration(c).expect("an H100 calibration");
    let text = std::fs::read_to_string(&bench).expect("bench file");
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    println!("| S | u x r | streams | measured | blocks-only | model: + ring's own work | + in-process copies | own work ms | copies ms |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let single = |s: u64| {
        rows.iter()
            .find(|j| j["bench"] == "2d_single_kernel" && j["S"] == s)
            .and_then(|j| j["fwdbwd_ms"].as_f64())
    };
    let bound = |s: u64, u: u64| {
        rows.iter()
            .find(|j| j["bench"] == "2d_blocks_only" && j["S"] == s && j["ulysses"] == u)
            .and_then(|j| j["fwdbwd_ms"].as_f64())
    };
    for j in rows.iter().filter(|j| j["bench"] == "2d_inprocess_one_gpu") {
        let (Some(s), Some(u), Some(r), Some(fb)) = (
            j["S"].as_u64(),
            j["ulysses"].as_u64(),
            j["ring"].as_u64(),
            j["fwdbwd_ms"].as_f64(),
        ) else {
            continue;
        };
        let (Some(k), Some(b)) = (single(s), bound(s, u)) else {
            continue;
        };
        let sh = RingShape {
            ring: r as u32,
            batch: 1.0,
            chunk: s as f64 / (2.0 * r as f64),
            q_heads: HEADS / u as f64,
            kv_heads: HEADS / u as f64,
            head_dim: HEAD_DIM,
        };
        let own_ms: f64 = (0..r as usize)
            .map(|rank| {
                let m = ring_merge_rank(&spec, &sh, rank);
                m.fwd.s + m.bwd.s
            })
            .sum::<f64>()
            * u as f64
            * 1e3;
        let copies_ms =
            (u * r) as f64 * inprocess_copies_s(&spec, s as f64, u as f64, r as f64) * 1e3;
        println!(
            "| {}K | {u}x{r} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} |",
            s / 1024,
            j["streams"].as_str().unwrap_or("?"),
            k / fb,
            k / b,
            k / (b + own_ms),
            k / (b + own_ms + copies_ms),
            own_ms,
            copies_ms
        );
    }
}
