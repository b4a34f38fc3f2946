//! Search latency benchmark: `cargo run --release -p mmsp-planner --example search_bench`.
//! Prints one JSON line per case with the median wall time of repeated full searches
//! (topology build + enumeration + cost model + ranking). Targets: 256 GPUs / 2M <= 100 ms,
//! 4096 GPUs / 16M <= 1 s.

use std::time::Instant;

use mmsp_planner::search::{search, Request, Strategy};
use mmsp_planner::spec::cluster::ClusterSpec;
use mmsp_planner::topology::Topology;

fn main() {
    let model = mmsp_planner::spec::model::load("llama3-8b").expect("preset");
    let cluster = ClusterSpec::load("dgx-h100").expect("preset");
    for (gpus, context, target_s) in [(256u32, 2u64 << 20, 0.1), (4096, 16 << 20, 1.0)] {
        let mut times = Vec::new();
        let mut candidates = 0;
        for _ in 0..7 {
            let t0 = Instant::now();
            let topo = Topology::build(&cluster, gpus);
            let req = Request {
                gpus,
                context,
                global_batch: None,
                recompute: None,
                strategy: Strategy::TwoD,
                pin: None,
                zero: None,
            };
            let r = search(&topo, &model, &req, None);
            candidates = r.ranked.len() + r.infeasible.len();
            assert!(r.best().is_some());
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{{\"bench\":\"plan_search\",\"gpus\":{gpus},\"context_tokens\":{context},\"candidates\":{candidates},\"median_s\":{:.4},\"min_s\":{:.4},\"target_s\":{target_s},\"met\":{}}}",
            times[3], times[0], times[3] <= target_s
        );
    }
}
