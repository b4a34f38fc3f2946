//! Simulator benchmark: `cargo run --release -p mmsp-planner --example sim_bench`.
//! Simulates one step of llama3-8b (32 layers) on 256 dgx-h100 ranks at 2M tokens for several
//! layouts (collapsed, see `mmsp_planner::sim`), and a 16-rank case both collapsed and in full,
//! printing JSON lines with wall times. Target: 256 ranks x 32 layers in <= 1 s.

use std::time::Instant;

use mmsp_planner::cost::{terms, Candidate, Layout, Placement, Recompute, Workload};
use mmsp_planner::sim::simulate;
use mmsp_planner::spec::cluster::ClusterSpec;
use mmsp_planner::topology::Topology;

fn main() {
    let model = mmsp_planner::spec::model::load("llama3-8b").expect("preset");
    let cluster = ClusterSpec::load("dgx-h100").expect("preset");
    let cases: [(u32, u64, u32, u32, bool); 4] = [
        (256, 2 << 20, 8, 32, true),
        (256, 2 << 20, 1, 256, true),
        (256, 2 << 20, 32, 8, true),
        (16, 1 << 17, 2, 8, false),
    ];
    for (gpus, ctx, u, r, collapse_only) in cases {
        let topo = Topology::build(&cluster, gpus);
        let w = Workload {
            model: &model,
            context: ctx,
            global_batch: 1,
            vision: None,
        };
        let c = Candidate {
            layout: Layout {
                ulysses: u,
                ring: r,
                dp: gpus / (u * r),
                tp: 1,
                placement: Placement::UlyssesInner,
            },
            zero_stage: 3,
            recompute: Recompute::None,
            micro_batch: 1,
        };
        let t = terms(&topo, &w, &c).expect("feasible");
        for collapse in [true, false] {
            if !collapse && collapse_only {
                continue;
            }
            let t0 = Instant::now();
            let s = simulate(&topo, &t, collapse).expect("the bench step completes");
            let wall = t0.elapsed().as_secs_f64();
            println!(
                "{{\"bench\":\"simulate\",\"gpus\":{gpus},\"layers\":{},\"ulysses\":{u},\"ring\":{r},\"collapsed\":{collapse},\"ops\":{},\"simulated_step_s\":{:.4},\"wall_s\":{wall:.4},\"target_s\":1.0}}",
                t.layers, s.ops, s.step_time_s
            );
        }
    }
}
