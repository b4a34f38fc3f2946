//! Tests of the simulator: collapsed = full, invariants, orderings physics decides, traces.
use super::*;
use crate::cost::{compose, terms, Candidate, Layout, Placement, Workload};
use crate::spec::cluster::ClusterSpec;

#[allow(clippy::too_many_arguments)]
fn terms_for(
    topo: &Topology,
    model: &str,
    ctx: u64,
    u: u32,
    r: u32,
    dp: u32,
    p: Placement,
    zero: u8,
    rc: Recompute,
    gb: u64,
) -> Terms {
    let m = crate::spec::model::load(model).unwrap();
    let w = Workload {
        model: &m,
        context: ctx,
        global_batch: gb,
        vision: None,
    };
    let c = Candidate {
        layout: Layout {
            ulysses: u,
            ring: r,
            dp,
            tp: 1,
            placement: p,
        },
        zero_stage: zero,
        recompute: rc,
        micro_batch: 1,
    };
    terms(topo, &w, &c).unwrap()
}

fn topo(name: &str, gpus: u32) -> Topology {
    Topology::build(&ClusterSpec::load(name).unwrap(), gpus)
}

#[test]
fn collapsed_equals_full_simulation() {
    for (u, r, dp, p, zero) in [
        (2, 4, 2, Placement::UlyssesInner, 3),
        (2, 4, 2, Placement::RingInner, 1),
        (1, 16, 1, Placement::UlyssesInner, 1),
        (8, 2, 1, Placement::UlyssesInner, 2),
    ] {
        let t = topo("dgx-h100", 16);
        let tm = terms_for(
            &t,
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../runtime/tests/data/llama3-8b-2layer.json"
            ),
            1 << 16,
            u,
            r,
            dp,
            p,
            zero,
            Recompute::OutsideAttention,
            u64::from(dp),
        );
        let a = simulate(&t, &tm, true).unwrap();
        let b = simulate(&t, &tm, false).unwrap();
        let rel = (a.step_time_s - b.step_time_s).abs() / b.step_time_s;
        assert!(
            rel < 1e-9,
            "u{u} r{r} dp{dp}: collapsed {} full {}",
            a.step_time_s,
            b.step_time_s
        );
    }
}

#[test]
fn middle_micro_batches_extrapolate_to_the_full_simulation() {
    // 12 accumulation steps (global batch 24 over dp 2), every ZeRO stage: simulating the
    // first, one middle and the last micro-batch and repeating the middle one's period gives
    // the step, busy time and bytes of simulating all twelve.
    let t = topo("dgx-h100", 16);
    for zero in [0, 1, 2, 3] {
        let tm = terms_for(
            &t,
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../runtime/tests/data/llama3-8b-2layer.json"
            ),
            1 << 15,
            2,
            4,
            2,
            Placement::UlyssesInner,
            zero,
            Recompute::None,
            24,
        );
        assert_eq!(tm.accum, 12);
        let short = simulate(&t, &tm, true).unwrap();
        let full = simulate_micro(&t, &tm, true, u64::MAX).unwrap();
        assert!(full.ops > 3 * short.ops, "{} vs {}", full.ops, short.ops);
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
        assert!(
            rel(short.step_time_s, full.step_time_s) < 1e-6,
            "ZeRO-{zero}: {} vs {}",
            short.step_time_s,
            full.step_time_s
        );
        assert!(
            rel(short.compute_busy_s, full.compute_busy_s) < 1e-6,
            "ZeRO-{zero}"
        );
        for ((n, a), (_, b)) in short.sent_bytes.iter().zip(&full.sent_bytes) {
            assert!(rel(*a, *b) < 1e-6, "ZeRO-{zero} {n}: {a} vs {b}");
        }
    }
}

#[test]
fn grouped_ring_steps_stay_within_a_percent_of_every_step() {
    // Ring 16 and 32 under ZeRO-3 (its gathers share the links with the ring) and ZeRO-1:
    // the middle ring steps simulated in groups give the step of simulating each one.
    for (u, r, zero, gpus) in [(1, 16, 3, 16), (2, 16, 1, 32), (1, 32, 3, 32)] {
        let t = topo("dgx-h100", gpus);
        let tm = terms_for(
            &t,
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../runtime/tests/data/llama3-8b-2layer.json"
            ),
            1 << 19,
            u,
            r,
            1,
            Placement::UlyssesInner,
            zero,
            Recompute::None,
            1,
        );
        let grouped = simulate(&t, &tm, true).unwrap();
        let exact = simulate_micro(&t, &tm, true, u64::MAX).unwrap();
        assert!(exact.ops > grouped.ops);
        let rel = (grouped.step_time_s - exact.step_time_s).abs() / exact.step_time_s;
        eprintln!(
            "u{u} r{r} z{zero}: {} ops grouped, {} every step, relative difference {rel:e}",
            grouped.ops, exact.ops
        );
        assert!(
            rel < 0.01,
            "u{u} r{r} z{zero}: {} vs {}",
            grouped.step_time_s,
            exact.step_time_s
        );
    }
}

#[test]
fn invariants_hold() {
    let t = topo("dgx-h100", 32);
    let tm = terms_for(
        &t,
        "llama3-8b",
        1 << 18,
        4,
        8,
        1,
        Placement::UlyssesInner,
        3,
        Recompute::OutsideAttention,
        1,
    );
    let s = simulate(&t, &tm, false).unwrap();
    let sched = s.schedule.as_ref().unwrap();
    assert!(
        s.max_link_utilisation <= 1.0 + 1e-6,
        "{}",
        s.max_link_utilisation
    );
    for (i, o) in s.engine_ops.iter().enumerate() {
        for &d in &o.deps {
            assert!(
                sched.start[i] >= sched.end[d] - 1e-12,
                "{} before {}",
                o.name,
                s.engine_ops[d].name
            );
        }
    }
    // Bytes sent by rank 0 equal the analytic volumes.
    let sent = |name: &str| {
        s.sent_bytes
            .iter()
            .find(|(n, _)| n == name)
            .map(|x| x.1)
            .unwrap_or(0.0)
    };
    let l = tm.layers as f64;
    // Attention's all-to-alls and ring steps run once forward (the recompute keeps its
    // outputs) and once backward.
    let passes = 2.0;
    let a2a = l * passes * (tm.a2a_qkv_bytes + tm.a2a_o_bytes) * 3.0 / 4.0;
    assert!((sent("all-to-all") - a2a).abs() / a2a < 1e-9);
    let ring = l * 7.0 * (1.0 + 3.0) * tm.ring_kv_bytes;
    assert!((sent("ring p2p") - ring).abs() / ring < 1e-9);
    let n = 32.0;
    let grad = tm.grad_bytes * (n - 1.0) / n;
    assert!((sent("grad sync") - grad).abs() / grad < 1e-9);
}

#[test]
fn simulation_tracks_the_analytic_model() {
    let t = topo("dgx-h100", 64);
    for (u, r, p) in [
        (8, 8, Placement::UlyssesInner),
        (8, 8, Placement::RingInner),
        (1, 64, Placement::UlyssesInner),
    ] {
        let tm = terms_for(&t, "llama3-8b", 1 << 19, u, r, 1, p, 3, Recompute::None, 1);
        let s = simulate(&t, &tm, true).unwrap().step_time_s;
        let a = compose(&t, &tm).step_time_s;
        assert!(
            (s - a).abs() / a < 0.15,
            "u{u} r{r} {p:?}: sim {s} analytic {a}"
        );
    }
}

#[test]
fn pcie_box_punishes_all_to_all_heavy_layouts() {
    let t = topo("pcie-l40s", 8);
    // At long context the ring's quadratic compute hides its linear traffic; the all-to-all
    // is never hidden and crosses the shared PCIe switch uplinks.
    let heavy = terms_for(
        &t,
        "llama3-8b",
        3 << 15,
        8,
        1,
        1,
        Placement::UlyssesInner,
        3,
        Recompute::OutsideAttention,
        1,
    );
    let light = terms_for(
        &t,
        "llama3-8b",
        3 << 15,
        1,
        8,
        1,
        Placement::UlyssesInner,
        3,
        Recompute::OutsideAttention,
        1,
    );
    let (h, l) = (
        simulate(&t, &heavy, true).unwrap(),
        simulate(&t, &light, true).unwrap(),
    );
    assert!(
        h.step_time_s > l.step_time_s,
        "a2a {} ring {}",
        h.step_time_s,
        l.step_time_s
    );
}

#[test]
fn mha_ring_is_exposed_sooner_than_gqa() {
    // Same shapes but MHA (llama2-7b: 32 kv heads) versus GQA (llama3-8b: 8 kv heads): the
    // ring carries 4x the KV per step, so at a context where GQA hides it MHA does not.
    let t = topo("dgx-h100", 64);
    let exposed = |model: &str| {
        let tm = terms_for(
            &t,
            model,
            1 << 17,
            1,
            64,
            1,
            Placement::UlyssesInner,
            3,
            Recompute::OutsideAttention,
            1,
        );
        let s = simulate(&t, &tm, true).unwrap();
        s.exposed_s / s.step_time_s
    };
    let (gqa, mha) = (exposed("llama3-8b"), exposed("llama2-7b"));
    assert!(mha > gqa + 0.05, "mha {mha} gqa {gqa}");
}

#[test]
fn trace_has_a_track_per_stream() {
    let t = topo("dgx-h100", 16);
    let tm = terms_for(
        &t,
        "llama3-8b",
        1 << 16,
        2,
        8,
        1,
        Placement::UlyssesInner,
        3,
        Recompute::None,
        1,
    );
    let s = simulate(&t, &tm, true).unwrap();
    let v = trace::chrome_trace(&s, "test");
    let ev = v["traceEvents"].as_array().unwrap();
    assert!(ev.iter().any(|e| e["name"]
        .as_str()
        .unwrap_or("")
        .contains("ring send/recv 0")));
    assert!(ev.iter().all(|e| e["ph"] == "X" || e["ph"] == "M"));
    let x: Vec<_> = ev.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(x.len(), s.ops);
}

#[test]
fn zero3_simulation_runs_the_recompute() {
    let t = topo("dgx-h100", 16);
    let tm = terms_for(
        &t,
        "llama3-8b",
        1 << 16,
        2,
        4,
        2,
        Placement::UlyssesInner,
        3,
        Recompute::OutsideAttention,
        2,
    );
    assert_eq!(tm.recompute, Recompute::OutsideAttention);
    let s = simulate(&t, &tm, true).unwrap();
    assert!(s.engine_ops.iter().any(|o| o.name.contains("recompute")));
    let mut dropped = tm.clone();
    dropped.recompute = Recompute::None;
    let d = simulate(&t, &dropped, true).unwrap();
    let a = compose(&t, &tm);
    assert!(
        s.step_time_s - d.step_time_s > 0.9 * a.time.recompute_s,
        "sim {} without recompute {} (recompute {})",
        s.step_time_s,
        d.step_time_s,
        a.time.recompute_s
    );
    assert!((s.step_time_s - a.step_time_s).abs() / a.step_time_s < 0.05);
}

/// ZeRO-3 in the simulator: each layer's gather on the gather stream one layer ahead of its
/// compute, each reduce-scatter on the grad stream behind the next layer's backward, so most
/// of the traffic overlaps compute, as the analytic model says (`cost::optimizer_collectives`).
#[test]
fn zero3_gathers_and_reduce_scatters_overlap_in_the_simulator() {
    let t = topo("dgx-h100", 16);
    let tm = terms_for(
        &t,
        "llama3-8b",
        1 << 17,
        2,
        8,
        1,
        Placement::UlyssesInner,
        3,
        Recompute::OutsideAttention,
        1,
    );
    let s = simulate(&t, &tm, true).unwrap();
    let a = compose(&t, &tm);
    let busy = |name: &str| {
        s.stream_busy_s
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |x| x.1)
    };
    let comm = busy("zero gather") + busy("grad sync");
    assert!(comm > 0.0);
    // Most of it hidden: the step exceeds compute by far less than the collectives take.
    assert!(
        s.exposed_s < 0.5 * comm,
        "exposed {} of {comm}",
        s.exposed_s
    );
    assert!(a.time.zero_gather_exposed_s < 0.5 * a.time.zero_gather_s);
    assert!(
        (s.step_time_s - a.step_time_s).abs() / a.step_time_s < 0.05,
        "sim {} analytic {}",
        s.step_time_s,
        a.step_time_s
    );
    // Every layer gathered twice, every unit reduce-scattered once.
    let n = |pat: &str| s.engine_ops.iter().filter(|o| o.name.contains(pat)).count();
    assert_eq!(n("zero-3 gather"), 2 * 32 + 2);
    assert_eq!(n("reduce-scatter"), 32 + 2);
    assert_eq!(n("weight all-gather"), 0);
}

/// Sharing bandwidth over classes of alike links ([`engine::Engine::merge_links`]) gives the
/// schedule of sharing it over every directed link, op for op and bit for bit: collapsed and
/// full simulations, every ZeRO stage, both placements, NVLink, NVL72 and PCIe topologies.
#[test]
fn merged_links_give_the_per_link_schedule() {
    let small = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../runtime/tests/data/llama3-8b-2layer.json"
    );
    for (name, gpus, u, r, dp, p, zero, collapse) in [
        ("dgx-h100", 16, 2, 4, 2, Placement::UlyssesInner, 3, false),
        ("dgx-h100", 16, 2, 4, 2, Placement::RingInner, 1, false),
        ("dgx-h100", 256, 8, 16, 2, Placement::UlyssesInner, 2, true),
        ("dgx-h100", 256, 4, 8, 8, Placement::RingInner, 0, true),
        (
            "gb200-nvl72",
            144,
            4,
            4,
            9,
            Placement::UlyssesInner,
            3,
            true,
        ),
        ("gb200-nvl72", 144, 2, 8, 9, Placement::RingInner, 1, true),
        ("pcie-l40s", 16, 4, 2, 2, Placement::RingInner, 1, false),
    ] {
        let t = topo(name, gpus);
        let tm = terms_for(
            &t,
            small,
            1 << 16,
            u,
            r,
            dp,
            p,
            zero,
            Recompute::OutsideAttention,
            u64::from(2 * dp),
        );
        let a = simulate_opts(&t, &tm, collapse, SIMULATED_MICRO_BATCHES, true).unwrap();
        let b = simulate_opts(&t, &tm, collapse, SIMULATED_MICRO_BATCHES, false).unwrap();
        let at = format!("{name} {gpus} u{u} r{r} dp{dp} {p:?} ZeRO-{zero}");
        assert_eq!(a.step_time_s.to_bits(), b.step_time_s.to_bits(), "{at}");
        let (sa, sb) = (a.schedule.unwrap(), b.schedule.unwrap());
        assert_eq!(sa.end.len(), sb.end.len(), "{at}");
        for (x, y) in sa.end.iter().zip(&sb.end) {
            assert_eq!(x.to_bits(), y.to_bits(), "{at}");
        }
        assert_eq!(
            sa.max_link_utilisation.to_bits(),
            sb.max_link_utilisation.to_bits(),
            "{at}"
        );
        for (x, y) in sa.link_bytes.iter().zip(&sb.link_bytes) {
            assert_eq!(x.to_bits(), y.to_bits(), "{at}");
        }
    }
}
