//! Training over sequence parallelism on the CPU (threads as ranks): every (ulysses, ring)
//! factorisation of 2, 4 and 8 ranks that the tiny model's heads allow gives the same losses
//! and parameters as one rank (float64); one rank's hand-written backward matches plain
//! autograd; ZeRO-1 matches ZeRO-0; ZeRO-3 (parameters, gradients and moments sharded,
//! weights gathered per layer) matches ZeRO-0 for SP 1, 2, 3 (uneven unit padding), 4 and
//! DP 2, with untied and tied embeddings and with QKV biases; DP averages; the loss falls on a synthetic task; the
//! fused AdamW kernel (ATen `_fused_adamw_` through the shim) matches the plain one, alone
//! (on the CPU, and on CUDA when present) and inside training; the per-phase times add up.
use mmsp_runtime::comm::local::{local_groups, LocalComm};
use mmsp_runtime::comm::Communicator;
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::model::decoder::autograd_causal;
use mmsp_runtime::model::{Decoder, Input, ModelConfig, Rope};
use mmsp_runtime::plan::{GroupKind, Layout, Placement};
use mmsp_runtime::train::adamw::{self_check, AdamW, AdamWConfig, AdamWKernel};
use mmsp_runtime::train::{Groups, StepStats, TrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

const SEQ: usize = 53;
const SEED: i64 = 7;

/// Step `step`'s sequence of replica `dp`: a noisy counting task, and its next-token labels.
fn data(step: usize, dp: usize, vocab: i64) -> (Tensor, Tensor) {
    let s = SEQ as i64;
    let start = (step as i64 * 11 + dp as i64 * 5) % vocab;
    let ids: Vec<i64> = (0..s)
        .map(|i| (start + 3 * i + (i * i) % 2) % vocab)
        .collect();
    let mut labels: Vec<i64> = ids[1..].to_vec();
    labels.push(-100);
    (
        Tensor::from_slice(&ids).view([1, s]),
        Tensor::from_slice(&labels).view([1, s]),
    )
}

fn shard(t: &Tensor, ranges: &[(usize, usize)]) -> Tensor {
    let parts: Vec<Tensor> = ranges
        .iter()
        .map(|&(a, b)| t.narrow(1, a as i64, (b - a) as i64))
        .collect();
    Tensor::cat(&parts, 1)
}

struct Run {
    losses: Vec<f64>,
    params: Vec<(String, Tensor)>,
}

fn opt(lr: f64) -> AdamWConfig {
    AdamWConfig {
        lr,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    }
}

/// Trains `steps` steps (on one repeated sequence when `fixed_data`) with one thread per rank; returns rank 0's losses and parameters.
fn train(
    layout: Layout,
    zero: u32,
    steps: usize,
    kind: Kind,
    lr: f64,
    recompute: bool,
    fixed_data: bool,
) -> Run {
    train_with(
        layout,
        zero,
        steps,
        kind,
        lr,
        recompute,
        fixed_data,
        AdamWKernel::Plain,
    )
}

/// [`train`] with a chosen AdamW kernel.
#[allow(clippy::too_many_arguments)]
fn train_with(
    layout: Layout,
    zero: u32,
    steps: usize,
    kind: Kind,
    lr: f64,
    recompute: bool,
    fixed_data: bool,
    kernel: AdamWKernel,
) -> Run {
    train_model(
        ModelConfig::tiny(),
        layout,
        zero,
        steps,
        kind,
        lr,
        recompute,
        fixed_data,
        kernel,
    )
}

/// [`train_with`] on a chosen model shape.
#[allow(clippy::too_many_arguments)]
fn train_model(
    mcfg: ModelConfig,
    layout: Layout,
    zero: u32,
    steps: usize,
    kind: Kind,
    lr: f64,
    recompute: bool,
    fixed_data: bool,
    kernel: AdamWKernel,
) -> Run {
    let cfg = TrainConfig {
        optimizer: AdamWConfig { kernel, ..opt(lr) },
        ..cpu_config(lr, zero, recompute)
    };
    let mut runs = on_each_rank(mcfg, (kind, kind), layout, cfg, |_, t| {
        let vocab = t.model.cfg.vocab_size as i64;
        let mut losses = vec![];
        for step in 0..steps {
            // Same data on every DP replica (so dp = 2 must equal dp = 1).
            let (ids, labels) = data(if fixed_data { 0 } else { step }, 0, vocab);
            let rg = t.local_ranges();
            let st = t.step(&shard(&ids, &rg), &shard(&labels, &rg)).unwrap();
            assert_eq!(st.tokens, (SEQ - 1) as f64);
            losses.push(st.loss);
        }
        // Gathered over the grad group with ZeRO-3 (every rank calls it).
        let params = t.full_parameters().unwrap();
        Run { losses, params }
    });
    runs.swap_remove(0)
}

/// One thread per rank of `layout` over local communicators, each with a trainer of a
/// `mcfg` model (seed [`SEED`], parameters and compute in `kinds`): every rank's `f(rank,
/// trainer)`, in rank order.
fn on_each_rank<T: Send>(
    mcfg: ModelConfig,
    kinds: (Kind, Kind),
    layout: Layout,
    cfg: TrainConfig,
    f: impl Fn(usize, &mut Trainer<'_>) -> T + Sync,
) -> Vec<T> {
    let uly = local_groups(&layout, GroupKind::Ulysses);
    let ring = local_groups(&layout, GroupKind::Ring);
    let world = LocalComm::group(layout.world_size());
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = uly
            .into_iter()
            .zip(ring)
            .zip(world)
            .enumerate()
            .map(|(rank, ((u, r), g))| {
                let mcfg = mcfg.clone();
                s.spawn(move || {
                    let model = Decoder::random(mcfg, Device::Cpu, kinds.0, kinds.1, SEED).unwrap();
                    let groups = Groups {
                        ulysses: &u as &dyn Communicator,
                        ring: &r,
                        grad: &g,
                        dp: layout.dp,
                    };
                    let mut t = Trainer::new(model, groups, SEQ, cfg).unwrap();
                    f(rank, &mut t)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The CPU trainer's configuration: plain AdamW at `lr`, ZeRO `zero`, CPU attention.
fn cpu_config(lr: f64, zero: u32, recompute: bool) -> TrainConfig {
    TrainConfig {
        optimizer: opt(lr),
        zero_stage: zero,
        recompute,
        backend: Backend::CpuMath,
        profile: false,
        mem_trace: false,
    }
}

/// One step of `t` on step 0's sequence (vocabulary 128), sharded as the trainer holds it.
fn one_step(t: &mut Trainer<'_>) -> StepStats {
    let (ids, labels) = data(0, 0, 128);
    let rg = t.local_ranges();
    t.step(&shard(&ids, &rg), &shard(&labels, &rg)).unwrap()
}

fn max_rel(a: &Run, b: &Run) -> (f64, f64) {
    let mut lerr: f64 = 0.0;
    for (x, y) in a.losses.iter().zip(&b.losses) {
        lerr = lerr.max((x - y).abs() / y.abs());
    }
    let mut perr: f64 = 0.0;
    for ((n, x), (m, y)) in a.params.iter().zip(&b.params) {
        assert_eq!(n, m);
        let e = (x - y).norm().double_value(&[]) / y.norm().double_value(&[]);
        perr = perr.max(e);
    }
    (lerr, perr)
}

const STEPS: usize = 3;

#[test]
fn sp_layouts_match_one_rank_f64() {
    let one = train(
        Layout::sp(1, 1, Placement::UlyssesInner),
        0,
        STEPS,
        Kind::Double,
        1e-2,
        false,
        false,
    );
    assert_eq!(one.losses.len(), STEPS);
    // The parameters moved: the comparison below is not between initial values.
    let init = Decoder::random(
        ModelConfig::tiny(),
        Device::Cpu,
        Kind::Double,
        Kind::Double,
        SEED,
    )
    .unwrap();
    let moved = (init.named_parameters()[1].1.detach() - &one.params[1].1)
        .abs()
        .max()
        .double_value(&[]);
    assert!(moved > 1e-3, "parameters did not move: {moved}");
    let cases = [
        (1, 2, Placement::UlyssesInner, 0),
        (2, 1, Placement::UlyssesInner, 1),
        (1, 4, Placement::RingInner, 0),
        (2, 2, Placement::UlyssesInner, 1),
        (2, 2, Placement::RingInner, 0),
        (4, 1, Placement::UlyssesInner, 0),
        (1, 8, Placement::UlyssesInner, 1),
        (2, 4, Placement::UlyssesInner, 0),
        (4, 2, Placement::RingInner, 1),
    ];
    for (u, r, pl, zero) in cases {
        let got = train(
            Layout::sp(u, r, pl),
            zero,
            STEPS,
            Kind::Double,
            1e-2,
            false,
            false,
        );
        let (le, pe) = max_rel(&got, &one);
        assert!(
            le < 1e-10 && pe < 1e-10,
            "u{u} r{r} {pl:?} zero{zero}: loss err {le:e}, param err {pe:e}"
        );
    }
}

#[test]
fn recompute_and_dp_match() {
    let base = train(
        Layout::sp(2, 2, Placement::UlyssesInner),
        0,
        2,
        Kind::Double,
        1e-2,
        false,
        false,
    );
    let rec = train(
        Layout::sp(2, 2, Placement::UlyssesInner),
        1,
        2,
        Kind::Double,
        1e-2,
        true,
        false,
    );
    let (le, pe) = max_rel(&rec, &base);
    assert!(le < 1e-10 && pe < 1e-10, "recompute: {le:e} {pe:e}");
    // dp = 2 with the same data on both replicas equals dp = 1 (gradients averaged).
    let dp = Layout {
        dp: 2,
        ..Layout::sp(2, 1, Placement::UlyssesInner)
    };
    let d = train(dp, 1, 2, Kind::Double, 1e-2, false, false);
    let (le, pe) = max_rel(
        &d,
        &train(
            Layout::sp(2, 1, Placement::UlyssesInner),
            0,
            2,
            Kind::Double,
            1e-2,
            false,
            false,
        ),
    );
    assert!(le < 1e-10 && pe < 1e-10, "dp: {le:e} {pe:e}");
}

#[test]
fn hand_backward_matches_autograd() {
    // Plain autograd through matmul-softmax attention over the whole sequence, then the same
    // AdamW step, against the trainer on one rank.
    let kind = Kind::Double;
    let model = Decoder::random(ModelConfig::tiny(), Device::Cpu, kind, kind, SEED).unwrap();
    let (ids, labels) = data(0, 0, 128);
    let pos = Rope::positions(&[(0, SEQ)], Device::Cpu);
    let logits = model
        .forward(Input::Ids(&ids), &pos, &mut |_, q, k, v| {
            Ok(autograd_causal(q, k, v))
        })
        .unwrap();
    let loss = logits.view([-1, 128]).cross_entropy_loss::<Tensor>(
        &labels.view([-1]),
        None,
        tch::Reduction::Mean,
        -100,
        0.0,
    );
    loss.backward();
    let params: Vec<Tensor> = model.parameters();
    let g1 = LocalComm::group(1).pop().unwrap();
    let mut o = AdamW::new(&params, opt(1e-2)).unwrap();
    o.step(&g1, 1.0).unwrap();
    let reference = Run {
        losses: vec![loss.double_value(&[])],
        params: model
            .named_parameters()
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect(),
    };
    let got = train(
        Layout::sp(1, 1, Placement::UlyssesInner),
        0,
        1,
        kind,
        1e-2,
        false,
        false,
    );
    let (le, pe) = max_rel(&got, &reference);
    assert!(
        le < 1e-10 && pe < 1e-10,
        "loss err {le:e}, param err {pe:e}"
    );
}

#[test]
fn loss_falls_f32() {
    // One fixed sequence, which the model memorises.
    let run = train(
        Layout::sp(2, 2, Placement::UlyssesInner),
        1,
        25,
        Kind::Float,
        4e-3,
        false,
        true,
    );
    let (first, last) = (run.losses[0], *run.losses.last().unwrap());
    assert!(first > 4.0, "initial loss {first} should be near ln(128)");
    assert!(last < 0.5 * first, "loss did not fall: {:?}", run.losses);
}

/// A 1 x 2 plan of the tiny model (ZeRO-1, 4 micro-steps, 64 tokens) with a prediction, its
/// token ranges replaced by `ranges` when given.
fn plan_json(ranges: Option<&str>) -> String {
    let mut p = mmsp_runtime::testing::plan(1, 2, 1, 1, 64);
    (p.global_batch, p.grad_accum_steps) = (4, 4);
    let mut v = serde_json::to_value(&p).unwrap();
    v["predicted"] = serde_json::json!({"step_time_s": 1.0, "tokens_per_s": 256.0, "mfu": 0.5,
        "memory_per_gpu_bytes": 1e9, "memory": {"weights_bytes": 0.0, "gradients_bytes": 0.0,
        "optimizer_bytes": 0.0, "activations_bytes": 0.0, "logits_bytes": 0.0,
        "comm_buffers_bytes": 0.0, "reserved_bytes": 0.0, "fragmentation_bytes": 0.0,
        "total_bytes": 0.0}, "time": {"gemm_s": 0.0, "attention_s": 0.0, "elementwise_s": 0.0,
        "head_s": 0.0, "recompute_s": 0.0, "vision_s": 0.0, "ulysses_all_to_all_s": 0.0,
        "ring_p2p_s": 0.0, "ring_exposed_s": 0.0, "tp_comm_s": 0.0, "grad_sync_s": 0.0,
        "grad_sync_exposed_s": 0.0, "zero_gather_s": 0.0, "zero_gather_exposed_s": 0.0,
        "optimizer_s": 0.0}, "comm_exposed_s": 0.0, "comm_overlapped_s": 0.0});
    if let Some(r) = ranges {
        v["tokens"]["ranges_per_rank"] = serde_json::from_str(r).unwrap();
    }
    v.to_string()
}

#[test]
fn run_subcommand_inprocess_cpu() {
    use mmsp_runtime::train::run::{run, ModelSource, RunOptions};
    use mmsp_runtime::RuntimeError;
    let dir = std::env::temp_dir().join(format!("mmsp-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        plan_json(Some("[[[0,16],[48,64]],[[16,32],[32,48]]]")),
    )
    .unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, plan_json(Some("[[[0,32]],[[32,64]]]"))).unwrap();
    let opts = |plan: &std::path::Path, n: usize| RunOptions {
        plan: plan.to_path_buf(),
        steps: 2,
        model: ModelSource::Tiny,
        inprocess: Some(n),
        cpu: true,
        lr: 1e-3,
        peak_flops: 1e12,
        out: Some(dir.join("run.json")),
    };
    let r = run(&opts(&good, 2))
        .unwrap()
        .expect("in-process runs report");
    assert_eq!(r.losses.len(), 2);
    assert!(r.micro_step_s > 0.0);
    let p = r.predicted.expect("the plan predicts");
    assert!(p.error_pct.micro_step_s.is_finite());
    // The file is the same report, and reads back into the type.
    let written: mmsp_runtime::train::report::RunReport =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap();
    assert_eq!((written.ranks, written.losses.len()), (2, 2));
    for (a, b) in written.losses.iter().zip(&r.losses) {
        assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
    }
    assert!(written.predicted.is_some() && written.vision.is_none());
    assert!(matches!(run(&opts(&good, 4)), Err(RuntimeError::Launch(_))));
    assert!(matches!(run(&opts(&bad, 2)), Err(RuntimeError::Plan(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fused_adamw_matches_plain() {
    // ATen's fused AdamW against the tch-op update: same formula, another evaluation order.
    let e64 = self_check(Device::Cpu, Kind::Double, 10_000, 4).unwrap();
    assert!(e64 < 1e-12, "f64 CPU: {e64:e}");
    let e32 = self_check(Device::Cpu, Kind::Float, 10_000, 4).unwrap();
    assert!(e32 < 1e-4, "f32 CPU: {e32:e}");
    if tch::Cuda::is_available() {
        let e = self_check(Device::Cuda(0), Kind::Float, 1 << 22, 4).unwrap();
        eprintln!("fused AdamW vs plain on CUDA, 4M fp32 parameters, 4 steps: rel {e:e}");
        assert!(e < 1e-4, "f32 CUDA: {e:e}");
    }
}

#[test]
fn fused_adamw_in_training_matches_plain() {
    // ZeRO-0 and ZeRO-1 (the update on a slice), f64, SP 2 x 2.
    for zero in [0, 1] {
        let plain = train(
            Layout::sp(2, 2, Placement::UlyssesInner),
            zero,
            STEPS,
            Kind::Double,
            1e-2,
            false,
            false,
        );
        let fused = train_with(
            Layout::sp(2, 2, Placement::UlyssesInner),
            zero,
            STEPS,
            Kind::Double,
            1e-2,
            false,
            false,
            AdamWKernel::Fused,
        );
        let (le, pe) = max_rel(&fused, &plain);
        assert!(le < 1e-10 && pe < 1e-10, "zero {zero}: {le:e} {pe:e}");
    }
}

#[test]
fn phases_add_up() {
    let g = LocalComm::group(1).pop().unwrap();
    let model = Decoder::random(
        ModelConfig::tiny(),
        Device::Cpu,
        Kind::Float,
        Kind::Float,
        SEED,
    )
    .unwrap();
    let groups = Groups {
        ulysses: &g as &dyn Communicator,
        ring: &g,
        grad: &g,
        dp: 1,
    };
    let cfg = TrainConfig {
        profile: true,
        mem_trace: false,
        ..cpu_config(1e-3, 0, false)
    };
    let mut t = Trainer::new(model, groups, SEQ, cfg).unwrap();
    let (ids, labels) = data(0, 0, 128);
    let st = t.step(&ids, &labels).unwrap();
    let p = st.phases;
    for (name, v) in p.to_json().as_object().unwrap() {
        assert!(v.as_f64().unwrap() >= 0.0, "{name} = {v}");
    }
    assert!(p.fwd_s > 0.0 && p.bwd_s > 0.0 && p.loss_s > 0.0 && p.optimizer_s > 0.0);
    assert!(p.attn_fwd_s > 0.0 && p.attn_bwd_s > 0.0);
    assert!((st.attention_s - p.attn_fwd_s - p.attn_bwd_s).abs() < 1e-12);
    // The phases partition the step, up to the host work between the laps.
    let total = p.total_s();
    assert!(
        total <= st.step_s * 1.0001 && total > 0.8 * st.step_s,
        "phases {total} s of a {} s step: {:?}",
        st.step_s,
        p
    );
}

#[test]
fn bf16_compute_follows_f32() {
    // fp32 master weights with bf16 compute (the GPU configuration, here on the CPU): the
    // chunked loss's mixed-dtype path (bf16 logits, fp32 log-softmax, exp written to bf16,
    // fp32 head-gradient accumulation) tracks the all-fp32 run within bf16 rounding.
    let run = |compute: Kind| {
        let g = LocalComm::group(1).pop().unwrap();
        let model =
            Decoder::random(ModelConfig::tiny(), Device::Cpu, Kind::Float, compute, SEED).unwrap();
        let groups = Groups {
            ulysses: &g as &dyn Communicator,
            ring: &g,
            grad: &g,
            dp: 1,
        };
        let cfg = cpu_config(4e-3, 0, false);
        let mut t = Trainer::new(model, groups, SEQ, cfg).unwrap();
        let (ids, labels) = data(0, 0, 128);
        (0..6)
            .map(|_| t.step(&ids, &labels).unwrap().loss)
            .collect::<Vec<f64>>()
    };
    let (f32_losses, bf16_losses) = (run(Kind::Float), run(Kind::BFloat16));
    for (a, b) in f32_losses.iter().zip(&bf16_losses) {
        assert!(
            (a - b).abs() < 0.03 * a.abs(),
            "{f32_losses:?} vs {bf16_losses:?}"
        );
    }
    assert!(bf16_losses[5] < bf16_losses[0], "{bf16_losses:?}");
}

#[test]
fn sharded_stages_match_zero0_f64() {
    // ZeRO-1 (distributed optimizer), ZeRO-2 (gradients sharded too) and ZeRO-3 (parameters
    // sharded, each layer's weights gathered around its forward and again before its
    // backward), each with and without recompute: same losses and parameters as ZeRO-0
    // without recompute, over SP x DP factorisations of 1 to 8 ranks: every Ulysses x ring
    // split of SP 8 the tiny model's 4 heads allow (1x8, 2x4, 4x2) and SP 4 x DP 2 (2x2, 1x4).
    let cases = [
        (Layout::sp(1, 1, Placement::UlyssesInner), "sp1"),
        (Layout::sp(1, 2, Placement::UlyssesInner), "sp1x2"),
        (Layout::sp(2, 1, Placement::UlyssesInner), "sp2x1"),
        (
            Layout::sp(1, 3, Placement::UlyssesInner),
            "sp1x3 (units padded)",
        ),
        (Layout::sp(2, 2, Placement::RingInner), "sp2x2"),
        (Layout::sp(4, 1, Placement::UlyssesInner), "sp4x1"),
        (
            Layout {
                dp: 2,
                ..Layout::sp(2, 1, Placement::UlyssesInner)
            },
            "dp2 x sp2x1",
        ),
        (
            Layout {
                dp: 2,
                ..Layout::sp(1, 1, Placement::UlyssesInner)
            },
            "dp2",
        ),
        (
            Layout {
                dp: 2,
                ..Layout::sp(2, 2, Placement::UlyssesInner)
            },
            "dp2 x sp2x2 (8 ranks)",
        ),
        (
            Layout {
                dp: 2,
                ..Layout::sp(1, 4, Placement::UlyssesInner)
            },
            "dp2 x sp1x4 (8 ranks)",
        ),
        (Layout::sp(1, 8, Placement::UlyssesInner), "sp1x8"),
        (Layout::sp(2, 4, Placement::UlyssesInner), "sp2x4"),
        (Layout::sp(4, 2, Placement::RingInner), "sp4x2"),
    ];
    for (layout, name) in cases {
        let z0 = train(layout, 0, STEPS, Kind::Double, 1e-2, false, false);
        for zero in [1, 2, 3] {
            for rec in [false, true] {
                let z = train(layout, zero, STEPS, Kind::Double, 1e-2, rec, false);
                let (le, pe) = max_rel(&z, &z0);
                eprintln!("ZeRO-{zero} recompute {rec} vs ZeRO-0, {name}: {le:e} {pe:e}");
                assert!(
                    le < 1e-10 && pe < 1e-10,
                    "ZeRO-{zero} recompute {rec}, {name}: loss err {le:e}, param err {pe:e}"
                );
            }
        }
    }
}

#[test]
fn zero3_tied_and_bias_match_zero0_f64() {
    // Tied embeddings (the gathered table is the head; its gradient collects both uses) and
    // QKV biases, fused AdamW, SP 2 x 2.
    let mcfg = ModelConfig {
        tie_word_embeddings: true,
        qkv_bias: true,
        ..ModelConfig::tiny()
    };
    let layout = Layout::sp(2, 2, Placement::UlyssesInner);
    for kernel in [AdamWKernel::Plain, AdamWKernel::Fused] {
        let run = |zero| {
            train_model(
                mcfg.clone(),
                layout,
                zero,
                STEPS,
                Kind::Double,
                1e-2,
                false,
                false,
                kernel,
            )
        };
        let (z0, z3) = (run(0), run(3));
        assert!(z3.params.iter().any(|(n, _)| n.ends_with("q_proj.bias")));
        let (le, pe) = max_rel(&z3, &z0);
        assert!(le < 1e-10 && pe < 1e-10, "{kernel:?}: {le:e} {pe:e}");
    }
}

#[test]
fn zero3_frees_gathered_weights_between_forward_and_backward() {
    // When the forward ends, ZeRO-3 without recompute holds no gathered layer weights (each
    // layer released its storage; the backward gathers again); ZeRO-2 keeps its resident
    // weights (every layer unit's full length); the figure is the storage actually allocated.
    let layout = Layout::sp(1, 2, Placement::UlyssesInner);
    let layer_elems: i64 = Decoder::param_shapes(&ModelConfig::tiny())
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers."))
        .map(|(_, s)| s.iter().product::<i64>())
        .sum();
    for (zero, rec) in [(3, false), (3, true), (2, false), (2, true)] {
        let cfg = cpu_config(1e-3, zero, rec);
        let held = on_each_rank(
            ModelConfig::tiny(),
            (Kind::Float, Kind::Float),
            layout,
            cfg,
            |_, t| {
                let st = one_step(t);
                assert!(st.loss.is_finite());
                st.held_weight_bytes
            },
        );
        for h in held {
            match (zero, rec) {
                (2, false) => assert!(
                    h >= (layer_elems * 4) as f64,
                    "ZeRO-2 holds its resident weights: {h} < {}",
                    layer_elems * 4
                ),
                _ => assert_eq!(h, 0.0, "ZeRO-{zero} recompute {rec} held {h} bytes"),
            }
        }
    }
}

#[test]
fn zero3_shards_what_it_says() {
    // Each of 4 ranks keeps 1/4 of every unit (parameters, gradients, moments); the model's
    // own parameter tensors are empty. ZeRO-1 keeps no gradient shard apart: its slices are
    // views of the whole gradient vectors (the distributed optimizer's 6 + 12/N).
    for zero in [1u32, 2, 3] {
        let layout = Layout::sp(2, 2, Placement::UlyssesInner);
        let total: i64 = Decoder::param_shapes(&ModelConfig::tiny())
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum();
        let cfg = cpu_config(1e-3, zero, false);
        on_each_rank(
            ModelConfig::tiny(),
            (Kind::Float, Kind::Float),
            layout,
            cfg,
            |_, t| {
                one_step(t);
                let o = t.optimizer();
                let units = o.units().unwrap();
                assert_eq!(units.len(), 2 + 2, "embedding, 2 layers, final norm + head");
                let local: i64 = units.iter().map(|x| x.padded() / 4).sum();
                assert_eq!(o.params_flat().size(), [local]);
                let shard = if zero == 1 { 0 } else { local };
                assert_eq!(o.grads_flat().size(), [shard], "ZeRO-{zero}");
                let (m, v, _) = o.moments();
                assert_eq!((m.size(), v.size()), (vec![local], vec![local]));
                assert!(local * 4 < total + 4 * units.len() as i64);
                assert!(t
                    .model
                    .named_parameters()
                    .iter()
                    .all(|(_, p)| p.numel() == 0));
                let full = t.full_parameters().unwrap();
                assert_eq!(
                    full.iter().map(|(_, p)| p.numel() as i64).sum::<i64>(),
                    total
                );
            },
        );
    }
}

#[test]
fn zero3_bf16_compute_follows_zero0() {
    // fp32 master, bf16 compute (the GPU configuration, on the CPU): ZeRO-3 casts each
    // rank's slice to bf16 before the gather and reduces the bf16 weight gradients in fp32,
    // as ZeRO-0's casts do; the runs agree within bf16 rounding.
    let run = |zero: u32| {
        let layout = Layout::sp(1, 2, Placement::UlyssesInner);
        let cfg = cpu_config(4e-3, zero, false);
        let kinds = (Kind::Float, Kind::BFloat16);
        let mut out = on_each_rank(ModelConfig::tiny(), kinds, layout, cfg, |_, t| {
            let (ids, labels) = data(0, 0, 128);
            let rg = t.local_ranges();
            let losses = (0..4)
                .map(|_| {
                    t.step(&shard(&ids, &rg), &shard(&labels, &rg))
                        .unwrap()
                        .loss
                })
                .collect();
            Run {
                losses,
                params: t.full_parameters().unwrap(),
            }
        });
        out.swap_remove(0)
    };
    let (r0, r3) = (run(0), run(3));
    let (l0, p0, l3, p3) = (&r0.losses, &r0.params, &r3.losses, &r3.params);
    for (a, b) in l0.iter().zip(l3) {
        assert!((a - b).abs() < 1e-3 * a.abs(), "{l0:?} vs {l3:?}");
    }
    assert!(l3[3] < l3[0], "{l3:?}");
    for ((n, a), (_, b)) in p0.iter().zip(p3) {
        assert_eq!(a.kind(), Kind::Float);
        let e = (a - b).norm().double_value(&[]) / a.norm().double_value(&[]);
        assert!(e < 1e-3, "{n}: {e:e}");
    }
}

#[test]
fn swiglu_node_matches_autograd_f64() {
    // The one-node SwiGLU (gate and up kept, silu recomputed in backward) against autograd's
    // silu and product: output and both input gradients.
    let opts = (Kind::Double, Device::Cpu);
    let (gate, up, dy) = mmsp_runtime::rng::seeded(11, || {
        (
            Tensor::randn([3, 5, 17], opts).set_requires_grad(true),
            Tensor::randn([3, 5, 17], opts).set_requires_grad(true),
            Tensor::randn([3, 5, 17], opts),
        )
    });
    let ours = mmsp_runtime::ffi::swiglu(&gate, &up).unwrap();
    (&ours * &dy).sum(Kind::Double).backward();
    let (g1, u1) = (gate.grad().copy(), up.grad().copy());
    let _ = gate.grad().zero_();
    let _ = up.grad().zero_();
    let theirs = gate.silu() * &up;
    (&theirs * &dy).sum(Kind::Double).backward();
    let rel =
        |a: &Tensor, b: &Tensor| (a - b).norm().double_value(&[]) / b.norm().double_value(&[]);
    assert!(rel(&ours, &theirs) < 1e-14);
    assert!(rel(&g1, &gate.grad()) < 1e-13, "{}", rel(&g1, &gate.grad()));
    assert!(rel(&u1, &up.grad()) < 1e-13);
    // Without grad mode it is the plain product.
    let plain = tch::no_grad(|| mmsp_runtime::ffi::swiglu(&gate, &up).unwrap());
    assert!(!plain.requires_grad());
}
