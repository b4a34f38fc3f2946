//! Tests of the cost model: mesh coordinates, head splits, memory and placement orderings.
use super::*;
use crate::spec::cluster::ClusterSpec;

fn setup(world: u32) -> (Topology, ModelSpec) {
    let spec = ClusterSpec::load("dgx-h100").unwrap();
    (
        Topology::build(&spec, world),
        ModelSpec::load("llama3-8b").unwrap(),
    )
}

fn cand(u: u32, r: u32, dp: u32, placement: Placement, zero: u8, rc: Recompute) -> Candidate {
    Candidate {
        layout: Layout {
            ulysses: u,
            ring: r,
            dp,
            tp: 1,
            placement,
        },
        zero_stage: zero,
        recompute: rc,
        micro_batch: 1,
    }
}

#[test]
fn coords_cover_the_mesh_once() {
    for placement in [Placement::UlyssesInner, Placement::RingInner] {
        let l = Layout {
            ulysses: 4,
            ring: 2,
            dp: 3,
            tp: 2,
            placement,
        };
        let mut seen = std::collections::HashSet::new();
        for rank in 0..l.world() {
            assert!(seen.insert(l.coords(rank)));
        }
        // Families agree with coordinates: ranks of a Ulysses group differ only in ulysses.
        for g in l.ulysses_family().groups(l.world()) {
            let c0 = l.coords(g[0]);
            for (k, &rank) in g.iter().enumerate() {
                let c = l.coords(rank);
                assert_eq!((c.0, c.1, c.2, c.3), (c0.0, k as u32, c0.2, c0.3));
            }
        }
        for g in l.ring_family().groups(l.world()) {
            let c0 = l.coords(g[0]);
            for (k, &rank) in g.iter().enumerate() {
                let c = l.coords(rank);
                assert_eq!((c.0, c.1, c.2, c.3), (c0.0, c0.1, k as u32, c0.3));
            }
        }
    }
}

#[test]
fn gqa_kv_heads_replicate_beyond_kv_count() {
    let m = ModelSpec::load("llama3-8b").unwrap(); // 32 q, 8 kv heads
    assert_eq!(head_split(&m, 1, 4).unwrap(), (8, 2));
    assert_eq!(head_split(&m, 1, 16).unwrap(), (2, 1));
    assert!(head_split(&m, 1, 64).is_err());
    let q = ModelSpec::load("qwen2-7b").unwrap(); // 28 q, 4 kv heads
    assert!(head_split(&q, 1, 8).is_err());
    assert_eq!(head_split(&q, 1, 4).unwrap(), (7, 1));
}

#[test]
fn memory_grows_with_context_and_shrinks_with_recompute() {
    let (t, m) = setup(64);
    let c = cand(8, 8, 1, Placement::UlyssesInner, 3, Recompute::None);
    let mem = |ctx: u64, rc| {
        let w = Workload {
            model: &m,
            context: ctx,
            global_batch: 1,
            vision: None,
        };
        let mut c = c;
        c.recompute = rc;
        match evaluate(&t, &w, &c) {
            Ok(e) => e.memory_per_gpu_bytes,
            Err(Infeasible::Memory { needed, .. }) => needed,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(mem(1 << 20, Recompute::None) > mem(1 << 19, Recompute::None));
    assert!(mem(1 << 20, Recompute::Full) < mem(1 << 20, Recompute::Selective));
    assert!(mem(1 << 20, Recompute::Selective) < mem(1 << 20, Recompute::None));
}

#[test]
fn ulysses_inside_nodes_beats_ulysses_across_nodes() {
    let (t, m) = setup(64);
    let w = Workload {
        model: &m,
        context: 1 << 19,
        global_batch: 1,
        vision: None,
    };
    let inner = evaluate(
        &t,
        &w,
        &cand(8, 8, 1, Placement::UlyssesInner, 3, Recompute::None),
    )
    .unwrap();
    let outer = evaluate(
        &t,
        &w,
        &cand(8, 8, 1, Placement::RingInner, 3, Recompute::None),
    )
    .unwrap();
    assert!(inner.time.ulysses_all_to_all_s < outer.time.ulysses_all_to_all_s / 4.0);
    assert!(inner.step_time_s < outer.step_time_s);
}

#[test]
fn mfu_is_physical() {
    let (t, m) = setup(256);
    let w = Workload {
        model: &m,
        context: 1 << 21,
        global_batch: 1,
        vision: None,
    };
    let e = evaluate(
        &t,
        &w,
        &cand(8, 32, 1, Placement::UlyssesInner, 3, Recompute::None),
    )
    .unwrap();
    assert!(e.mfu > 0.1 && e.mfu < 797.0 / 989.0, "{}", e.mfu);
    let tokens = (1u64 << 21) as f64;
    assert!((e.tokens_per_s * e.step_time_s - tokens).abs() < 1.0);
}

#[test]
fn batch_and_divisibility_are_typed() {
    let (t, m) = setup(64);
    let w = Workload {
        model: &m,
        context: 1000,
        global_batch: 3,
        vision: None,
    };
    let e = evaluate(
        &t,
        &w,
        &cand(8, 8, 1, Placement::UlyssesInner, 3, Recompute::None),
    );
    assert!(matches!(e, Err(Infeasible::Divisibility { .. })));
    let w = Workload {
        model: &m,
        context: 1 << 16,
        global_batch: 3,
        vision: None,
    };
    let e = evaluate(
        &t,
        &w,
        &cand(8, 4, 2, Placement::UlyssesInner, 3, Recompute::None),
    );
    assert!(matches!(e, Err(Infeasible::Batch { .. })));
}
