//! 2D (Ulysses x zigzag ring) attention on the CPU with in-process ranks against
//! single-device float64 attention: every world size 1..=8, every (ulysses, ring)
//! factorisation, MHA and GQA, causal, float32 and float64, even and uneven shards. Also:
//! the ranks' agreement on shapes before the first collective (a mismatch on one rank is the
//! same error on every rank, never a hang) and one-line errors for bad shapes.
use mmsp_runtime::attn2d::{Attention2d, AttnShape};
use mmsp_runtime::comm::local::LocalComm;
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::plan::{GroupKind, Layout, Placement};
use mmsp_runtime::shard::Zigzag;
use mmsp_runtime::testing::{errors, reference, run_2d_local, Problem};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn factorisations(w: usize) -> Vec<(usize, usize)> {
    (1..=w)
        .filter(|u| w.is_multiple_of(*u))
        .map(|u| (u, w / u))
        .collect()
}

fn check(layout: Layout, shape: AttnShape, kind: Kind, tol: f64, seed: i64) {
    let p = Problem::random(shape, kind, Device::Cpu, seed);
    let g = run_2d_local(layout, shape, Backend::CpuMath, &p)
        .unwrap_or_else(|e| panic!("{layout:?} {shape:?} {kind:?}: {e}"));
    let r = reference(&p).unwrap();
    let e = errors(&g, &r);
    for (name, x) in ["out", "dq", "dk", "dv"].iter().zip(e) {
        assert!(
            x < tol,
            "{name} rel err {x:e} >= {tol:e} for ulysses {} ring {} {shape:?} {kind:?}",
            layout.ulysses,
            layout.ring
        );
    }
}

fn sweep(kind: Kind, tol: f64, gqa: bool) {
    tch::set_num_threads(1);
    let mut n = 0;
    for w in 1..=8 {
        for (u, r) in factorisations(w) {
            let placement = if n % 2 == 0 {
                Placement::UlyssesInner
            } else {
                Placement::RingInner
            };
            // Even: 3 tokens per sub-chunk; uneven: 5 extra tokens spread over the chunks.
            for extra in [0, 5] {
                // Heads must split over u. GQA: 4 q heads per kv head; for even u there are
                // fewer kv heads than Ulysses ranks, so they are replicated.
                let (q_heads, kv_heads) = match (gqa, u % 2) {
                    (false, _) => (2 * u, 2 * u),
                    (true, 0) => (2 * u, u / 2),
                    (true, _) => (4 * u, u),
                };
                let shape = AttnShape {
                    batch: 1,
                    seq_len: 2 * r * u * 3 + extra,
                    q_heads,
                    kv_heads,
                    head_dim: 16,
                };
                check(Layout::sp(u, r, placement), shape, kind, tol, 1000 + n);
                n += 1;
            }
        }
    }
    assert_eq!(n, 40, "every factorisation of 1..=8 twice");
}

#[test]
fn mha_f64_all_factorisations() {
    sweep(Kind::Double, 1e-10, false);
}

#[test]
fn gqa_f64_all_factorisations() {
    sweep(Kind::Double, 1e-10, true);
}

#[test]
fn mha_f32_all_factorisations() {
    sweep(Kind::Float, 2e-5, false);
}

#[test]
fn gqa_f32_all_factorisations() {
    sweep(Kind::Float, 2e-5, true);
}

#[test]
fn batch_two_and_longer_sequence() {
    tch::set_num_threads(1);
    let shape = AttnShape {
        batch: 2,
        seq_len: 100,
        q_heads: 4,
        kv_heads: 1,
        head_dim: 8,
    };
    check(
        Layout::sp(2, 3, Placement::RingInner),
        shape,
        Kind::Double,
        1e-10,
        7,
    );
    // GQA with more kv heads than Ulysses ranks: split, not replicated.
    let shape = AttnShape {
        batch: 2,
        seq_len: 64,
        q_heads: 8,
        kv_heads: 4,
        head_dim: 8,
    };
    check(
        Layout::sp(2, 2, Placement::UlyssesInner),
        shape,
        Kind::Float,
        2e-5,
        8,
    );
}

#[test]
fn bf16_error_is_bounded_and_reported() {
    // bf16 inputs; the reference sees the same bf16-rounded inputs in float64.
    tch::set_num_threads(1);
    for r in [1, 2, 4, 8] {
        let shape = AttnShape {
            batch: 1,
            seq_len: 256,
            q_heads: 2,
            kv_heads: 2,
            head_dim: 32,
        };
        let p = Problem::random(shape, Kind::BFloat16, Device::Cpu, 42);
        let g = run_2d_local(
            Layout::sp(1, r, Placement::RingInner),
            shape,
            Backend::CpuMath,
            &p,
        )
        .unwrap();
        let e = errors(&g, &reference(&p).unwrap());
        eprintln!(
            "bf16 ring {r}: out {:.3e} dq {:.3e} dk {:.3e} dv {:.3e}",
            e[0], e[1], e[2], e[3]
        );
        for x in e {
            assert!(x < 2e-2, "bf16 ring {r}: rel err {x:e}");
        }
    }
}

/// Each rank's inputs for the agreement tests: (ring rank, ulysses rank, shape it was given,
/// and the q, k, v it passes).
type RankInput = (AttnShape, Tensor, Tensor, Tensor);

/// Runs the forward of 2D attention on every rank of `layout` in its own thread, with short
/// communicator timeouts, and returns every rank's result (as a string), failing the test if
/// any rank has not answered by the deadline (a hang).
fn run_ranks(layout: Layout, inputs: Vec<RankInput>) -> Vec<Result<(), String>> {
    let w = layout.world_size();
    let mut uly: Vec<Option<LocalComm>> = (0..w).map(|_| None).collect();
    let mut ring: Vec<Option<LocalComm>> = (0..w).map(|_| None).collect();
    for (kind, slots) in [(GroupKind::Ulysses, &mut uly), (GroupKind::Ring, &mut ring)] {
        for g in layout.all_groups(kind) {
            let comms = LocalComm::group_with_timeout(g.len(), Duration::from_secs(20));
            for (m, c) in g.iter().zip(comms) {
                slots[*m] = Some(c);
            }
        }
    }
    let (tx, rx) = mpsc::channel();
    for (rank, ((uc, rc), (shape, q, k, v))) in uly.into_iter().zip(ring).zip(inputs).enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let (uc, rc) = (uc.unwrap(), rc.unwrap());
            let r = Attention2d::new(&uc, &rc, Backend::CpuMath, shape)
                .and_then(|a| a.forward(&q, &k, &v).map(|_| ()))
                .map_err(|e| {
                    assert!(e.is_bad_input(), "rank {rank}: not a bad-input error: {e}");
                    e.to_string()
                });
            let _ = tx.send((rank, r));
        });
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out: Vec<Option<Result<(), String>>> = (0..w).map(|_| None).collect();
    for _ in 0..w {
        let left = deadline.saturating_duration_since(Instant::now());
        let (rank, r) = rx
            .recv_timeout(left)
            .expect("a rank neither finished nor failed before the deadline (hang)");
        out[rank] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// The inputs every rank of `layout` should pass for `shape` (f64, random).
fn good_inputs(layout: Layout, shape: AttnShape) -> Vec<RankInput> {
    let p = Problem::random(shape, Kind::Double, Device::Cpu, 3);
    let zz = Zigzag::new(shape.seq_len, layout.ulysses, layout.ring).unwrap();
    (0..layout.world_size())
        .map(|rank| {
            let c = layout.coords(rank);
            let sh = |t: &Tensor| mmsp_runtime::shard::shard(&zz, t, 2, c.ring, c.ulysses).unwrap();
            (shape, sh(&p.q), sh(&p.k), sh(&p.v))
        })
        .collect()
}

fn shape_2x2() -> AttnShape {
    AttnShape {
        batch: 1,
        seq_len: 48,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 8,
    }
}

/// Every rank returns the same one-line error, which contains `needle`.
fn all_fail_alike(res: &[Result<(), String>], needle: &str) {
    let first = res[0].clone().expect_err("rank 0 should fail");
    for (rank, r) in res.iter().enumerate() {
        let e = r.clone().expect_err("every rank should fail");
        assert_eq!(e, first, "rank {rank} reports a different error");
    }
    assert!(!first.contains('\n'), "not one line: {first}");
    assert!(
        first.contains(needle),
        "{first:?} does not mention {needle:?}"
    );
}

#[test]
fn agreement_passes_for_matching_ranks() {
    tch::set_num_threads(1);
    let layout = Layout::sp(2, 2, Placement::UlyssesInner);
    let res = run_ranks(layout, good_inputs(layout, shape_2x2()));
    assert!(res.iter().all(Result::is_ok), "{res:?}");
}

#[test]
fn agreement_one_rank_with_another_sequence_length() {
    tch::set_num_threads(1);
    let layout = Layout::sp(2, 2, Placement::UlyssesInner);
    let mut inputs = good_inputs(layout, shape_2x2());
    // Rank 3 believes the sequence is 56 tokens long and passes a shard that fits that.
    let other = AttnShape {
        seq_len: 56,
        ..shape_2x2()
    };
    inputs[3] = good_inputs(layout, other).remove(3);
    let c = layout.coords(3);
    let who = format!("(ring {}, ulysses {})", c.ring, c.ulysses);
    let res = run_ranks(layout, inputs);
    all_fail_alike(&res, "seq_len");
    assert!(res[0].as_ref().unwrap_err().contains(&who), "{res:?}");
}

#[test]
fn agreement_one_rank_with_a_wrong_local_shard() {
    tch::set_num_threads(1);
    let layout = Layout::sp(2, 2, Placement::RingInner);
    let mut inputs = good_inputs(layout, shape_2x2());
    // Same configuration, but rank 2's q has two tokens too many.
    let q = &inputs[2].1;
    let s = q.size();
    inputs[2].1 = Tensor::zeros([s[0], s[1], s[2] + 2, s[3]], (Kind::Double, Device::Cpu));
    let c = layout.coords(2);
    let who = format!("(ring {}, ulysses {})", c.ring, c.ulysses);
    let res = run_ranks(layout, inputs);
    all_fail_alike(&res, "wrong input shapes");
    assert!(res[0].as_ref().unwrap_err().contains(&who), "{res:?}");
}

#[test]
fn agreement_one_rank_with_another_dtype() {
    tch::set_num_threads(1);
    let layout = Layout::sp(1, 4, Placement::RingInner);
    let mut inputs = good_inputs(layout, shape_2x2());
    let (sh, q, k, v) = inputs.remove(1);
    let f = |t: Tensor| t.to_kind(Kind::Float);
    inputs.insert(1, (sh, f(q), f(k), f(v)));
    let res = run_ranks(layout, inputs);
    all_fail_alike(&res, "dtype");
}

/// Bad input that every rank sees alike fails in `Attention2d::new` (or the first call)
/// with a one-line bad-input error, before any collective.
#[test]
fn bad_shapes_fail_in_one_line() {
    let cases: [(usize, usize, AttnShape, &str); 5] = [
        // q heads that ulysses cannot split
        (
            4,
            1,
            AttnShape {
                q_heads: 6,
                kv_heads: 6,
                ..shape_2x2()
            },
            "cannot be split",
        ),
        // kv heads >= ulysses that it cannot split
        (
            2,
            1,
            AttnShape {
                q_heads: 6,
                kv_heads: 3,
                ..shape_2x2()
            },
            "kv heads cannot be split",
        ),
        // kv heads < ulysses that do not divide it
        (
            6,
            1,
            AttnShape {
                q_heads: 12,
                kv_heads: 4,
                ..shape_2x2()
            },
            "replicated",
        ),
        // q heads not a multiple of kv heads
        (
            1,
            1,
            AttnShape {
                q_heads: 4,
                kv_heads: 3,
                ..shape_2x2()
            },
            "multiple",
        ),
        // a sequence too short for 2 * ring * ulysses sub-chunks
        (
            2,
            4,
            AttnShape {
                seq_len: 8,
                ..shape_2x2()
            },
            "seq",
        ),
    ];
    for (u, r, shape, needle) in cases {
        let uc = LocalComm::group(u);
        let rc = LocalComm::group(r);
        let e = Attention2d::new(&uc[0], &rc[0], Backend::CpuMath, shape)
            .err()
            .unwrap_or_else(|| panic!("ulysses {u} ring {r} {shape:?} should be refused"));
        let msg = e.to_string();
        assert!(e.is_bad_input(), "{msg}");
        assert!(!msg.contains('\n'), "not one line: {msg}");
        assert!(
            msg.to_lowercase().contains(needle),
            "{msg:?} does not mention {needle:?}"
        );
    }
}

/// A plan for 2 ranks launched as a world of 1: the binary says so in one line and exits 2,
/// before any communication.
#[test]
fn binary_exits_2_on_launch_mismatch() {
    let plan = std::env::temp_dir().join(format!("mmsp-plan-w2-{}.json", std::process::id()));
    std::fs::write(&plan, mmsp_runtime::testing::plan_json(1, 2, 1, 0, 64)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"))
        .args(["nccl-check", "--plan", plan.to_str().unwrap()])
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "29513")
        .output()
        .expect("running mmsp-runtime");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("launch does not match the plan"), "{err}");
    let _ = std::fs::remove_file(&plan);
}
