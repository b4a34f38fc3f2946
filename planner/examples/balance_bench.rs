//! Stage-1 balancing benchmark: 6,000 video frames of mixed resolutions (fixed seed) over 256
//! ranks with the SigLIP so400m encoder; prints one JSON object with the balance it reached.
//!
//! `cargo run --release -p mmsp-planner --example balance_bench`

use std::time::Instant;

use mmsp_planner::balance::{balance_frames, frame_costs, BalanceOptions};
use mmsp_planner::spec::samples::Sample;
use mmsp_planner::spec::vision::VisionSpec;

/// Knuth's MMIX linear congruential generator (no external rng crate needed).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn main() -> mmsp_planner::Result<()> {
    const FRAMES: u64 = 6000;
    const RANKS: usize = 256;
    let resolutions = [(224, 224), (336, 336), (384, 384), (448, 448)];
    let vision = VisionSpec::preset("siglip-so400m")?;
    let mut rng = Lcg(0x5eed);
    let mut samples = Vec::new();
    let mut left = FRAMES;
    while left > 0 {
        let frames = (8 + rng.next() % 249).min(left);
        let resolution = resolutions[(rng.next() % resolutions.len() as u64) as usize];
        samples.push(Sample {
            frames,
            text_tokens: 256 + rng.next() % 1024,
            resolution: Some(resolution),
        });
        left -= frames;
    }
    let start = Instant::now();
    let costs = frame_costs(&samples, &vision)?;
    let a = balance_frames(&costs, RANKS, &BalanceOptions::default())?;
    let wall = start.elapsed().as_secs_f64();
    let lpt_only = BalanceOptions {
        use_milp: false,
        ..BalanceOptions::default()
    };
    let greedy = balance_frames(&costs, RANKS, &lpt_only)?;
    let out = serde_json::json!({
        "frames": costs.len(),
        "samples": samples.len(),
        "ranks": RANKS,
        "resolutions": resolutions.len(),
        "imbalance_before": a.imbalance_before,
        "imbalance_after": a.imbalance_after,
        "imbalance_lpt": greedy.imbalance_after,
        "method": a.method,
        "solver": a.solver,
        "solve_time_s": a.solve_time_s,
        "wall_s": wall,
    });
    println!("{out}");
    Ok(())
}
