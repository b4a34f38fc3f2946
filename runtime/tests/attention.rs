//! 2D (Ulysses x zigzag ring) attention on the CPU with in-process ranks against
//! single-device float64 attention: every world size 1..=8, every (ulysses, ring)
//! factorisation, MHA and GQA, causal, float32 and float64, even and uneven shards.
use mmsp_runtime::attn2d::AttnShape;
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::plan::{Layout, Placement};
use mmsp_runtime::testing::{errors, reference, run_2d_local, Problem};
use tch::{Device, Kind};

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
