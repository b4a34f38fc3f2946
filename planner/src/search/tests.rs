//! Tests of the search: strategy constraints, defaults, infeasibility reasons, properties.
use super::Strategy;
use super::*;
use proptest::prelude::*;

fn h100(gpus: u32) -> (Topology, ModelSpec) {
    let c = ClusterSpec::load("dgx-h100").unwrap();
    (
        Topology::build(&c, gpus),
        crate::spec::model::load("llama3-8b").unwrap(),
    )
}

fn req(gpus: u32, context: u64) -> Request {
    Request {
        gpus,
        context,
        global_batch: None,
        recompute: None,
        strategy: Strategy::TwoD,
        pin: None,
        zero: None,
    }
}

/// A batch is refused past gpus x 8 x 1024 sequences; the context the refusal names as the
/// nearest accepted one is accepted and the one below it is not, on several cluster sizes.
#[test]
fn batches_past_the_accumulation_bound_are_refused_at_the_nearest_boundary() {
    for gpus in [1u32, 8, 72, 4096, 65536] {
        let most = u64::from(gpus) * 8 * 1024;
        let given = |b: u64| Request {
            global_batch: Some(b),
            ..req(gpus, 128 << 10)
        };
        assert!(check_batch(&given(most)).is_ok());
        let e = check_batch(&given(most + 1)).unwrap_err().to_string();
        assert!(e.contains(&format!("--global-batch {most}")), "{e}");
        // The default batch: find the context the message names.
        match check_batch(&req(gpus, 1)) {
            Ok(()) => assert!(default_global_batch(1) <= most),
            Err(e) => {
                let e = e.to_string();
                let at = e.find("--context ").unwrap() + "--context ".len();
                let ctx: u64 = e[at..].split(' ').next().unwrap().parse().unwrap();
                assert!(check_batch(&req(gpus, ctx)).is_ok(), "{gpus}: {e}");
                assert!(check_batch(&req(gpus, ctx - 1)).is_err(), "{gpus}: {e}");
            }
        }
    }
}

/// The largest context's memory-only check agrees with a full search having a ranked
/// candidate, on both sides of the largest context and under pinned layouts and ZeRO stages;
/// max_context's candidate is the full search's best at that context.
#[test]
fn max_context_check_agrees_with_the_full_search() {
    for (gpus, pin, zero) in [
        (8, None, None),
        (64, None, Some(3)),
        (
            16,
            Some(LayoutPin {
                ulysses: 8,
                ring: 2,
            }),
            None,
        ),
    ] {
        let (t, m) = h100(gpus);
        let r = Request {
            pin,
            zero,
            ..req(gpus, 0)
        };
        let (max, best) = max_context(&t, &m, &r).unwrap();
        assert_eq!(max_context_tokens(&t, &m, &r), Some(max));
        for ctx in [
            max / 4,
            max - 2 * u64::from(gpus),
            max,
            max + 2 * u64::from(gpus),
            2 * max,
        ] {
            let full = search(&t, &m, &at_context(&r, ctx), None);
            assert_eq!(
                fits(&t, &m, &r, ctx),
                full.best().is_some(),
                "{gpus} GPUs at {ctx}"
            );
            if ctx == max {
                assert_eq!(full.best().unwrap().candidate, best.candidate);
            }
        }
    }
}

/// The fewest-GPUs search names no size over the 65536 GPUs a request may name: 4600M tokens
/// fit only past it (the fuzz test's manifest of 2^32 - 1 text tokens was told "131072 GPUs
/// would fit"), 4000M on 65536.
#[test]
fn fewest_gpus_stop_at_the_largest_request() {
    let (t, m) = h100(128);
    let one = |context| Request {
        global_batch: Some(1),
        ..req(128, context)
    };
    assert_eq!(fewest_gpus(&t.spec, &m, &one(4000 * MI)), Some(MAX_GPUS));
    assert_eq!(fewest_gpus(&t.spec, &m, &one(4600 * MI)), None);
}

#[test]
fn default_batch_is_four_million_tokens() {
    assert_eq!(default_global_batch(2 << 20), 2);
    assert_eq!(default_global_batch(128 << 10), 32);
    assert_eq!(default_global_batch(16 << 20), 1);
    assert_eq!(default_global_batch(3 << 20), 1);
}

#[test]
fn strategies_constrain_the_layout() {
    let (t, m) = h100(64);
    for s in Strategy::ALL {
        let r = Request {
            strategy: s,
            ..req(64, 1 << 19)
        };
        let cands = enumerate(&m, &t.spec, &r);
        assert!(!cands.is_empty(), "{s:?}");
        for c in cands {
            let l = c.layout;
            assert_eq!(l.world(), 64);
            match s {
                Strategy::Ring => assert!(l.ulysses == 1 && l.tp == 1),
                Strategy::Ulysses => assert!(l.ring == 1 && l.tp == 1),
                Strategy::TwoD => assert_eq!(l.tp, 1),
                // Megatron-Core's distributed optimizer: the runtime's ZeRO-1 rule.
                Strategy::MegatronCpTp => assert!(l.ulysses == 1 && c.zero_stage == 1),
                Strategy::TeA2aP2p => assert_eq!(c.zero_stage, 1),
            }
        }
    }
}

/// 2M tokens of llama3-8b fit 256 H100s without activation recompute (issue 13): ZeRO-3 keeps
/// 16/N B per parameter and two gathered layers, and recomputes only when asked.
#[test]
fn two_million_tokens_fit_256_h100s_without_recompute() {
    let (t, m) = h100(256);
    let none = Request {
        recompute: Some(Recompute::None),
        ..req(256, 2 << 20)
    };
    let res = search(&t, &m, &none, None);
    let best = res.best().expect("2M fits 256 H100s without recompute");
    assert_eq!(best.candidate.recompute, Recompute::None);
    assert_eq!(best.candidate.zero_stage, 3);
    assert_eq!(best.estimate.time.recompute_s, 0.0);
    assert_eq!(best.candidate.layout.world(), 256);
    assert!(best.estimate.memory_per_gpu_bytes <= t.spec.hbm_bytes);
    // Ranked fastest first.
    assert!(res
        .ranked
        .windows(2)
        .all(|w| w[0].estimate.step_time_s <= w[1].estimate.step_time_s));
    // Searching both, the plan does not recompute either (recompute only adds time here).
    let both = search(&t, &m, &req(256, 2 << 20), None);
    assert_eq!(
        both.best().unwrap().candidate.recompute,
        Recompute::None,
        "{:?}",
        both.best().unwrap().candidate
    );
}

#[test]
fn nothing_fits_names_limits() {
    let (t, m) = h100(8);
    let r = req(8, 16 << 20);
    let res = search(&t, &m, &r, None);
    assert!(res.best().is_none());
    let e = no_plan_error(&t, &m, &r, &res).to_string();
    assert!(e.contains("largest context that fits on 8 GPUs"), "{e}");
    assert!(e.contains("GPUs would fit 16M"), "{e}");
}

#[test]
fn runner_up_reasons_are_words() {
    let (t, m) = h100(64);
    let res = search(&t, &m, &req(64, 1 << 19), None);
    let best = res.best().unwrap();
    let other = res
        .ranked
        .iter()
        .find(|s| s.estimate.step_time_s > 1.01 * best.estimate.step_time_s)
        .unwrap();
    let why = why_slower(&t, best, other);
    assert!(why.contains("slower"), "{why}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// More GPUs never shrink the max context.
    #[test]
    fn more_gpus_never_shrink_max_context(nodes in 1u32..8) {
        let m = crate::spec::model::load("llama3-8b").unwrap();
        let c = ClusterSpec::load("dgx-h100").unwrap();
        let mc = |g: u32| {
            let t = Topology::build(&c, g);
            max_context(&t, &m, &Request { recompute: Some(Recompute::None), ..req(g, 0) }).map(|x| x.0).unwrap_or(0)
        };
        let a = mc(8 * nodes);
        let b = mc(16 * nodes);
        prop_assert!(b >= a, "{} GPUs: {}, {} GPUs: {}", 8 * nodes, a, 16 * nodes, b);
    }

    /// Every feasible plan's mesh multiplies to the world size, and memory grows with context.
    #[test]
    fn meshes_multiply_and_memory_grows(nodes in 1u32..5, k in 1u64..6) {
        let gpus = 8 * nodes;
        let (t, m) = h100(gpus);
        let ctx = k * 32768;
        let res = search(&t, &m, &req(gpus, ctx), None);
        for s in &res.ranked {
            let l = s.candidate.layout;
            prop_assert_eq!(l.tp * l.ulysses * l.ring * l.dp, gpus);
        }
        if let Some(best) = res.best() {
            let w2 = crate::cost::Workload { model: &m, context: 2 * ctx, global_batch: res.global_batch, vision: None };
            let bigger = match crate::cost::evaluate(&t, &w2, &best.candidate) {
                Ok(e) => e.memory_per_gpu_bytes,
                Err(Infeasible::Memory { needed, .. }) => needed,
                Err(_) => f64::INFINITY,
            };
            prop_assert!(bigger > best.estimate.memory_per_gpu_bytes);
        }
    }
}

#[test]
fn head_limits_are_typed_reasons() {
    let (t, m) = h100(64);
    let r = Request {
        strategy: Strategy::Ulysses,
        global_batch: Some(1),
        ..req(64, 1 << 20)
    };
    let res = search(&t, &m, &r, None);
    assert!(res.ranked.is_empty());
    assert!(res
        .infeasible
        .iter()
        .any(|(_, e)| matches!(e, Infeasible::Heads { .. })));
}

/// mmsp-runtime runs no recompute or its recompute of each layer outside attention: the search
/// (every strategy) enumerates exactly those, each once, and a forced policy is the runtime's.
#[test]
fn searches_only_the_recompute_the_runtime_runs() {
    let (t, m) = h100(64);
    for s in Strategy::ALL {
        let r = Request {
            strategy: s,
            ..req(64, 1 << 19)
        };
        let cands = enumerate(&m, &t.spec, &r);
        let distinct: std::collections::HashSet<_> = cands.iter().collect();
        assert_eq!(distinct.len(), cands.len(), "{s:?}: duplicate candidates");
        for c in &cands {
            assert!(Recompute::SEARCHED.contains(&c.recompute), "{s:?}: {c:?}");
        }
        // At every ZeRO stage, every (layout, stage, micro-batch) that can run has both.
        let batch = default_global_batch(r.context);
        let runnable = |c: &Candidate| {
            head_split(&m, c.layout.tp, c.layout.ulysses).is_ok()
                && batch.is_multiple_of(u64::from(c.layout.dp))
        };
        for c in cands.iter().filter(|c| runnable(c)) {
            for rc in Recompute::SEARCHED {
                let other = Candidate {
                    recompute: rc,
                    ..*c
                };
                assert!(cands.contains(&other), "{s:?}: {other:?} missing");
            }
        }
        let res = search(&t, &m, &r, None);
        assert!(!res.ranked.is_empty(), "{s:?}");
        for x in &res.ranked {
            assert!(Recompute::SEARCHED.contains(&x.candidate.recompute));
        }
        // A forced selective or full recompute is the runtime's.
        for rc in [Recompute::Selective, Recompute::Full] {
            let forced = Request {
                recompute: Some(rc),
                ..r.clone()
            };
            for c in enumerate(&m, &t.spec, &forced) {
                assert_eq!(c.recompute, Recompute::OutsideAttention, "{s:?} {rc:?}");
            }
        }
    }
}

/// Recompute is a choice under ZeRO-3 as under every stage: both are enumerated, and
/// `--recompute none` plans ZeRO-3 without it. Every stage is searched (stage 2 apart from 1).
#[test]
fn zero3_recompute_is_a_choice() {
    let (t, m) = h100(16);
    let r = req(16, 1 << 17);
    let cands = enumerate(&m, &t.spec, &r);
    for z in 0..=3u8 {
        assert!(cands.iter().any(|c| c.zero_stage == z), "ZeRO-{z} searched");
    }
    for rc in Recompute::SEARCHED {
        assert!(
            cands.iter().any(|c| c.zero_stage == 3 && c.recompute == rc),
            "{rc:?}"
        );
    }
    let none = Request {
        recompute: Some(Recompute::None),
        ..r.clone()
    };
    let res = search(&t, &m, &none, None);
    assert!(res
        .ranked
        .iter()
        .any(|s| s.candidate.zero_stage == 3 && s.estimate.time.recompute_s == 0.0));
    assert!(res
        .ranked
        .iter()
        .all(|s| s.candidate.recompute == Recompute::None));
    // --recompute full with --zero 3: the runtime's recompute, costed.
    let full = Request {
        recompute: Some(Recompute::Full),
        zero: Some(3),
        ..r
    };
    let res = search(&t, &m, &full, None);
    assert!(!res.ranked.is_empty());
    for s in &res.ranked {
        assert_eq!(s.candidate.recompute, Recompute::OutsideAttention);
        assert!(s.estimate.time.recompute_s > 0.0);
    }
}

/// The shortcuts of issue 17 (all-to-all loads counted instead of routed, fair sharing over
/// link classes instead of links) choose the plan, and simulate its step time, of the slow
/// path: on small clusters of every shipped topology, text and video requests.
#[test]
fn fast_paths_choose_the_slow_paths_plan() {
    for (topology, gpus, context, frames) in [
        ("dgx-h100", 16, 256 << 10, None),
        ("dgx-h100", 64, 1 << 20, None),
        ("gb200-nvl72", 72, 1 << 20, None),
        ("pcie-l40s", 16, 128 << 10, None),
        ("dgx-a100", 32, 512 << 10, None),
        ("dgx-h100", 32, 0, Some((256, 2048))),
    ] {
        let cluster = ClusterSpec::load(topology).unwrap();
        let model = crate::spec::model::load("llama3-8b").unwrap();
        let mm = frames.map(|(f, text)| {
            crate::multimodal::MultiModal::new(
                crate::spec::vision::VisionSpec::load("siglip-so400m").unwrap(),
                vec![crate::spec::samples::Sample::uniform(f, text)],
                true,
            )
            .unwrap()
        });
        let ctx = mm.as_ref().map_or(context, |m| m.padded_context(gpus));
        let r = req(gpus, ctx);
        let fast_topo = Topology::build(&cluster, gpus);
        let fast =
            crate::pipeline::plan_training(&fast_topo, topology, &model, &r, mm.as_ref()).unwrap();
        let slow_topo = Topology::build(&cluster, gpus).routing_all_to_alls();
        let slow = crate::sim::per_link_sharing(|| {
            crate::pipeline::plan_training(&slow_topo, topology, &model, &r, mm.as_ref())
        })
        .unwrap();
        let at = format!("{topology} {gpus} GPUs {ctx} tokens");
        assert_eq!(fast.best.candidate, slow.best.candidate, "{at}");
        let (a, b) = (
            fast.plan
                .predicted
                .as_ref()
                .unwrap()
                .simulated_step_time_s
                .unwrap(),
            slow.plan
                .predicted
                .as_ref()
                .unwrap()
                .simulated_step_time_s
                .unwrap(),
        );
        assert!((a - b).abs() <= 1e-9 * b, "{at}: {a} vs {b}");
        let (a, b) = (
            fast.plan.predicted.as_ref().unwrap().step_time_s,
            slow.plan.predicted.as_ref().unwrap().step_time_s,
        );
        assert!((a - b).abs() <= 1e-9 * b, "{at}: analytic {a} vs {b}");
        assert_eq!(fast.result.ranked.len(), slow.result.ranked.len(), "{at}");
    }
}

/// The search as it costed samples before the floor and stage-1 shortcuts: every runnable
/// candidate's whole vision stage, then its estimate.
fn search_costing_every_stage(
    topo: &Topology,
    model: &ModelSpec,
    req: &Request,
    mm: &MultiModal,
) -> (Vec<Scored>, Vec<(Candidate, Infeasible)>) {
    let global_batch = req
        .global_batch
        .unwrap_or_else(|| default_global_batch(req.context));
    let (mut ranked, mut infeasible) = (Vec::new(), Vec::new());
    for c in enumerate(model, &topo.spec, req) {
        let mut w = Workload {
            model,
            context: candidate_context(req.context, Some(mm), &c.layout),
            global_batch,
            vision: None,
        };
        let runnable = head_split(model, c.layout.tp, c.layout.ulysses).is_ok()
            && global_batch.is_multiple_of(u64::from(c.layout.dp) * u64::from(c.micro_batch));
        if runnable {
            match mm.stage(topo, model, &c.layout, w.context) {
                Ok(v) => w.vision = Some(v),
                Err(e) => {
                    infeasible.push((c, Infeasible::Vision(e)));
                    continue;
                }
            }
        }
        match evaluate(topo, &w, &c) {
            Ok(estimate) => ranked.push(Scored {
                candidate: c,
                estimate,
            }),
            Err(e) => infeasible.push((c, e)),
        }
    }
    (ranked, infeasible)
}

/// Samples searched with the shortcuts (out of memory on the stage's floor, then on its exact
/// memory, before stage 2; misses costed from the lowest floor up) rank the same candidates
/// with the same estimates, count the same causes and name the same closest miss as costing
/// every stage, where some candidates fit and where none does; and the floor did spare work.
#[test]
fn sample_shortcuts_keep_the_ranking_causes_and_closest_miss() {
    let vision = crate::spec::vision::VisionSpec::load("siglip-so400m").unwrap();
    let (mut spared, mut fitting) = (0, [0, 0]);
    for (gpus, frames) in [(16, 256), (16, 3000), (64, 20000), (8, 200_000)] {
        let (t, m) = h100(gpus);
        let samples = vec![
            crate::spec::samples::Sample::uniform(frames, 2048),
            crate::spec::samples::Sample {
                resolution: Some((224, 224)),
                ..crate::spec::samples::Sample::uniform(frames / 3 + 1, 100)
            },
        ];
        let mm = MultiModal::new(vision.clone(), samples, true).unwrap();
        let r = req(gpus, mm.padded_context(gpus));
        let fast = search(&t, &m, &r, Some(&mm));
        let (ranked, infeasible) = search_costing_every_stage(&t, &m, &r, &mm);
        let at = format!("{frames} frames on {gpus} GPUs");
        let key = |s: &Scored| (s.candidate, s.estimate.step_time_s.to_bits());
        let want: Vec<_> = {
            let mut v = ranked;
            v.sort_by(|a, b| {
                let e = |s: &Scored| (s.estimate.step_time_s, s.estimate.memory_per_gpu_bytes);
                let (x, y) = (e(a), e(b));
                x.0.total_cmp(&y.0).then(x.1.total_cmp(&y.1))
            });
            v.iter().map(key).collect()
        };
        let got: Vec<_> = fast.ranked.iter().map(key).collect();
        assert_eq!(got, want, "{at}");
        fitting[usize::from(got.is_empty())] += 1;
        let slow = SearchResult {
            ranked: Vec::new(),
            infeasible,
            global_batch: fast.global_batch,
        };
        assert_eq!(fast.infeasible_summary(), slow.infeasible_summary(), "{at}");
        assert_eq!(
            fast.closest_memory_miss(),
            slow.closest_memory_miss(),
            "{at}"
        );
        spared += fast
            .infeasible
            .iter()
            .filter(|(c, e)| !slow.infeasible.contains(&(*c, e.clone())))
            .count();
    }
    assert!(spared > 0, "no miss kept its floor");
    assert!(
        fitting[0] > 0 && fitting[1] > 0,
        "cases that fit and none: {fitting:?}"
    );
}
