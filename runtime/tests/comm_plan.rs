//! In-process communicator collectives, plan parsing and rank arithmetic, and bad input
//! that must fail with a clear error before any collective (never hang).
use mmsp_runtime::attn2d::{Attention2d, AttnShape};
use mmsp_runtime::comm::local::LocalComm;
use mmsp_runtime::comm::{Communicator, P2p};
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::plan::{GroupKind, Layout, Placement, Plan};
use mmsp_runtime::RuntimeError;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn on_ranks<T: Send>(n: usize, f: impl Fn(LocalComm) -> T + Sync) -> Vec<T> {
    let comms = LocalComm::group_with_timeout(n, Duration::from_secs(30));
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

#[test]
fn all_to_all_uneven_splits() {
    let n = 4;
    let out = on_ranks(n, |c| {
        let me = c.rank();
        // Rank i sends (i + j + 1) elements of value 100 i + j to rank j.
        let send: Vec<Tensor> = (0..n)
            .map(|j| {
                Tensor::full(
                    [(me + j + 1) as i64],
                    (100 * me + j) as f64,
                    (Kind::Float, Device::Cpu),
                )
            })
            .collect();
        let recv: Vec<Tensor> = (0..n)
            .map(|i| Tensor::full([(i + me + 1) as i64], -1.0, (Kind::Float, Device::Cpu)))
            .collect();
        c.all_to_all(&send, &recv).unwrap().wait().unwrap();
        recv.iter().map(vals).collect::<Vec<_>>()
    });
    for (me, got) in out.iter().enumerate() {
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v.len(), i + me + 1);
            assert!(
                v.iter().all(|&x| x == (100 * i + me) as f64),
                "rank {me} from {i}: {v:?}"
            );
        }
    }
}

#[test]
fn send_recv_ring_and_reductions() {
    let n = 5;
    let out = on_ranks(n, |c| {
        let me = c.rank();
        let x = Tensor::from_slice(&[me as f64, 1.0]);
        let got = Tensor::zeros([2], (Kind::Double, Device::Cpu));
        c.send_recv(&[
            P2p::Send {
                peer: (me + 1) % n,
                tensor: x.shallow_clone(),
            },
            P2p::Recv {
                peer: (me + n - 1) % n,
                tensor: got.shallow_clone(),
            },
        ])
        .unwrap()
        .wait()
        .unwrap();
        let ar = Tensor::from_slice(&[me as f64 + 1.0]);
        c.all_reduce(&ar).unwrap();
        let ag = Tensor::zeros([n as i64, 2], (Kind::Double, Device::Cpu));
        c.all_gather(&x.reshape([1, 2]), &ag).unwrap();
        // reduce_scatter: rank i contributes i + j to slot j.
        let rs_in = Tensor::from_slice(&(0..n).map(|j| (me + j) as f64).collect::<Vec<_>>());
        let rs_out = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        c.reduce_scatter(&rs_in, &rs_out).unwrap();
        c.barrier().unwrap();
        (vals(&got), vals(&ar), vals(&ag), vals(&rs_out))
    });
    let total: f64 = (1..=n).map(|i| i as f64).sum();
    for (me, (got, ar, ag, rs)) in out.iter().enumerate() {
        assert_eq!(got, &vec![((me + n - 1) % n) as f64, 1.0]);
        assert_eq!(ar, &vec![total]);
        let want_ag: Vec<f64> = (0..n).flat_map(|i| [i as f64, 1.0]).collect();
        assert_eq!(ag, &want_ag);
        let want_rs: f64 = (0..n).map(|i| (i + me) as f64).sum();
        assert_eq!(rs, &vec![want_rs]);
    }
}

#[test]
fn rank_that_leaves_makes_peers_fail_not_hang() {
    let out = on_ranks(3, |c| {
        if c.rank() == 2 {
            drop(c);
            return None;
        }
        Some(c.barrier())
    });
    for r in out.into_iter().flatten() {
        assert!(matches!(r, Err(RuntimeError::PeerGone(_))), "got {r:?}");
    }
}

#[test]
fn plan_parsing_maps_ranks_and_refuses_unknown_fields() {
    let text = mmsp_runtime::testing::plan_json(4, 2, 2, 0, 64);
    let p = Plan::from_json(&text).unwrap();
    let l = p.layout;
    assert_eq!((l.ulysses, l.ring, l.dp), (4, 2, 2));
    // ulysses_inner: rank = dp*8 + ring*4 + u.
    assert_eq!(l.ulysses_group(13), vec![12, 13, 14, 15]);
    assert_eq!(l.ring_group(13), vec![9, 13]);
    assert_eq!(l.dp_group(13), vec![5, 13]);
    assert_eq!(l.sp_rank(13), 5);
    let ri = Layout {
        placement: Placement::RingInner,
        ..l
    };
    // ring_inner: rank = dp*8 + u*2 + ring.
    assert_eq!(ri.ring_group(13), vec![12, 13]);
    assert_eq!(ri.ulysses_group(13), vec![9, 11, 13, 15]);
    assert_eq!(ri.sp_rank(13), 4 + 2);
    for layout in [l, ri] {
        for kind in [GroupKind::Ulysses, GroupKind::Ring, GroupKind::Dp] {
            let gs = layout.all_groups(kind);
            let mut all: Vec<usize> = gs.concat();
            all.sort();
            assert_eq!(
                all,
                (0..16).collect::<Vec<_>>(),
                "{kind:?} groups partition the world"
            );
        }
        for r in 0..16 {
            assert_eq!(layout.global_rank(layout.coords(r)), r);
        }
    }
    assert!(matches!(p.check_launch(8), Err(RuntimeError::Launch(_))));
    assert!(p.check_launch(16).is_ok());
    // One contract: a field the plan does not define is refused by name, not ignored.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["score"] = 1.5.into();
    match Plan::from_json(&v.to_string()) {
        Err(RuntimeError::Plan(m)) => assert!(m.contains("score"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// A valid plan's JSON, changed by `f`, through the runtime's reader.
fn mutated(f: impl Fn(&mut serde_json::Value)) -> Result<Plan, RuntimeError> {
    let mut v: serde_json::Value =
        serde_json::from_str(&mmsp_runtime::testing::plan_json(2, 2, 1, 0, 64)).unwrap();
    f(&mut v);
    Plan::from_json(&v.to_string())
}

#[test]
fn bad_plans_are_rejected() {
    let wrong_size = mutated(|v| v["world_size"] = 6.into());
    assert!(
        matches!(wrong_size, Err(RuntimeError::Plan(_))),
        "{wrong_size:?}"
    );
    let bad_place = mutated(|v| v["layout"]["placement"] = "diagonal".into());
    assert!(bad_place.is_err());
    // Groups or token ranges that disagree with the layout are refused, naming the field.
    let groups = mutated(|v| v["groups"]["ring"][0] = serde_json::json!([1, 0]));
    assert!(format!("{groups:?}").contains("groups.ring"), "{groups:?}");
    let ranges = mutated(|v| v["tokens"]["ranges_per_rank"][0][0] = serde_json::json!([0, 9]));
    assert!(
        format!("{ranges:?}").contains("ranges_per_rank[0]"),
        "{ranges:?}"
    );
    // Tensor parallelism is the contract's, not the runtime's: refused as a layout.
    let layout = mmsp_plan::Layout {
        ulysses: 1,
        ring: 2,
        dp: 1,
        tp: 2,
        placement: Placement::RingInner,
    };
    let model = mmsp_runtime::model::ModelConfig::tiny().to_plan_model("tiny");
    let tp = mmsp_plan::Plan::skeleton(model, layout, 8, 64, 1).unwrap();
    let tp = Plan::from_json(&serde_json::to_string(&tp).unwrap());
    assert!(matches!(tp, Err(RuntimeError::Layout(_))), "{tp:?}");
    // Another format or version is refused in one line naming what is expected.
    for (edit, want) in [
        (None, "not an mmsp plan"),
        (
            Some(("schema", serde_json::json!("other"))),
            "not an mmsp plan",
        ),
        (
            Some(("schema_version", serde_json::Value::Null)),
            "schema_version",
        ),
        (
            Some(("schema_version", serde_json::json!(2))),
            "schema version 2 is not supported",
        ),
    ] {
        let r = mutated(|v| match &edit {
            None => {
                v.as_object_mut().unwrap().remove("schema");
            }
            Some((k, x)) => v[*k] = x.clone(),
        });
        match r {
            Err(RuntimeError::Plan(m)) => assert!(m.contains(want) && !m.contains('\n'), "{m}"),
            other => panic!("{edit:?}: {other:?}"),
        }
    }
}

#[test]
fn reads_the_plans_the_planner_writes() {
    // A plan `mmsp plan` wrote (tests/data/plan4_2x2.json), and one the planner's pipeline
    // makes now: the runtime reads both through the same contract.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/plan4_2x2.json"
    ))
    .unwrap();
    let p = Plan::from_json(&text).unwrap();
    assert_eq!(p.world_size, 4);
    use mmsp_planner::search::{Request, Strategy};
    let model = mmsp_planner::spec::model::load("llama3-8b").unwrap();
    let cluster = mmsp_planner::spec::cluster::ClusterSpec::load("dgx-h100").unwrap();
    let topo = mmsp_planner::topology::Topology::build(&cluster, 16);
    let req = Request {
        gpus: 16,
        context: 1 << 17,
        global_batch: None,
        recompute: None,
        strategy: Strategy::TwoD,
        pin: None,
        zero: None,
    };
    let planned =
        mmsp_planner::pipeline::plan_training(&topo, "dgx-h100", &model, &req, None).unwrap();
    let text = serde_json::to_string(&planned.plan).unwrap();
    let p = Plan::from_json(&text).unwrap();
    assert_eq!(p.world_size, 16);
    assert_eq!(p.contract, planned.plan);
    let tp = mmsp_runtime::train::run::TrainPlan::of(&p).unwrap();
    assert_eq!(tp.context_tokens, 1 << 17);
    assert!(tp.predicted.is_some());
    // An inference plan of the planner: the same reader, its typed estimate carried through.
    use mmsp_planner::inference::{build_plan, search, InferenceRequest};
    let topo = mmsp_planner::topology::Topology::build(&cluster, 8);
    let req = InferenceRequest {
        gpus: 8,
        context: 1 << 20,
        decode_tokens: 128,
    };
    let found = search(&topo, &model, &req);
    let (c, e) = found.ranked.first().unwrap();
    let plan = build_plan(&topo, "dgx-h100", &model, req.context, c, e).unwrap();
    let ip = mmsp_runtime::infer::InferPlan::from_json(&serde_json::to_string(&plan).unwrap());
    let ip = ip.unwrap();
    assert_eq!((ip.context_tokens, &ip.estimate), (1 << 20, e));
    // ... and refused where a training plan is wanted.
    assert!(mmsp_runtime::train::run::TrainPlan::of(&ip.plan).is_err());
}

/// Builds a 2D layer on every rank of a (u, r) group and returns each rank's result of `f`;
/// the communicators time out after 5 s so that a hang fails the test.
fn on_layout<T: Send>(
    u: usize,
    r: usize,
    f: impl Fn(&dyn Communicator, &dyn Communicator) -> T + Sync,
) -> Vec<T> {
    let layout = Layout::sp(u, r, Placement::UlyssesInner);
    let uly = mmsp_runtime::comm::local::local_groups(&layout, GroupKind::Ulysses);
    let ring = mmsp_runtime::comm::local::local_groups(&layout, GroupKind::Ring);
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = uly
            .into_iter()
            .zip(ring)
            .map(|(a, b)| s.spawn(move || f(&a, &b)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn bad_shapes_fail_before_any_collective() {
    let shape = |q_heads, kv_heads, seq_len| AttnShape {
        batch: 1,
        seq_len,
        q_heads,
        kv_heads,
        head_dim: 8,
    };
    let cases = [
        (shape(6, 6, 64), "q heads not divisible by ulysses 4"),
        (shape(8, 6, 64), "q heads not a multiple of kv heads"),
        (
            shape(8, 3, 48),
            "kv heads neither divide nor are divided by ulysses",
        ),
        (shape(8, 8, 10), "sequence shorter than 2 x ring x ulysses"),
    ];
    for (s, why) in cases {
        let res = on_layout(4, 2, |a, b| {
            Attention2d::new(a, b, Backend::CpuMath, s).map(|_| ())
        });
        for r in res {
            assert!(r.is_err(), "{why}: accepted");
        }
    }
    // Local shard of the wrong length: an error on the bad rank, and the others are not left
    // waiting for it forever (they see it leave).
    let s = shape(8, 8, 64);
    let res = on_layout(2, 2, |a, b| {
        let attn = Attention2d::new(a, b, Backend::CpuMath, s)?;
        let len = if a.rank() == 1 && b.rank() == 0 {
            15
        } else {
            16
        };
        let t = Tensor::randn([1, 8, len, 8], (Kind::Float, Device::Cpu));
        attn.forward(&t, &t, &t).map(|_| ())
    });
    assert!(
        matches!(res[1], Err(RuntimeError::Shape(_))),
        "{:?}",
        res[1]
    );
    assert!(res.iter().all(|r| r.is_err()));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn rendezvous_exchanges_values_and_times_out_on_missing_keys() {
    use mmsp_runtime::comm::rendezvous::Rendezvous;
    let port = free_port();
    let t = Duration::from_secs(3);
    let got = std::thread::scope(|s| {
        let r0 = s.spawn(move || {
            let mut st = Rendezvous::connect("127.0.0.1", port, 0, t).unwrap();
            st.set("id/0", b"from rank 0").unwrap();
            let v = st.get("id/1").unwrap();
            let missing = st.get("never-set");
            (v, missing.is_err())
        });
        let r1 = s.spawn(move || {
            // Connects before or after rank 0 listens: it retries.
            let mut st = Rendezvous::connect("127.0.0.1", port, 1, t).unwrap();
            st.set("id/1", &[7u8; 128]).unwrap();
            st.get("id/0").unwrap()
        });
        (r0.join().unwrap(), r1.join().unwrap())
    });
    assert_eq!(got.0 .0, vec![7u8; 128]);
    assert!(got.0 .1, "a key nobody sets must time out with an error");
    assert_eq!(got.1, b"from rank 0".to_vec());
}

#[test]
fn nccl_world_rejects_a_plan_for_another_world_size_before_any_communication() {
    use mmsp_runtime::comm::nccl::{LaunchEnv, NcclWorld};
    let plan = Plan::from_json(&mmsp_runtime::testing::plan_json(2, 2, 1, 0, 64)).unwrap();
    // Nobody listens on this port: reaching the rendezvous would fail differently (or wait).
    let env = LaunchEnv {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    let t0 = std::time::Instant::now();
    let r = NcclWorld::init(&plan, env, Duration::from_secs(30));
    assert!(matches!(r, Err(RuntimeError::Launch(_))), "{:?}", r.err());
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn local_collective_times_out_instead_of_hanging() {
    // Rank 1 never joins the barrier but stays alive: rank 0 must get a timeout error.
    let comms = LocalComm::group_with_timeout(2, Duration::from_millis(300));
    let mut it = comms.into_iter();
    let (c0, c1) = (it.next().unwrap(), it.next().unwrap());
    let r = c0.barrier();
    assert!(matches!(r, Err(RuntimeError::Timeout(..))), "{r:?}");
    drop(c1);
}
