//! Helpers shared by the tests, the bench and the bf16 error study: run 2D attention with
//! in-process ranks (threads) on full tensors and compare with single-device attention.
use crate::attn2d::{Attention2d, AttnShape};
use crate::comm::local::local_groups;
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::plan::{GroupKind, Layout};
use crate::shard::Zigzag;
use tch::{Device, Kind, Tensor};

/// Full-sequence tensors (B, H, S, D) of one problem.
pub struct Problem {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub dout: Tensor,
}

impl Problem {
    /// Random normal inputs, drawn in float64 from `seed` and cast to `kind` on `device`.
    pub fn random(shape: AttnShape, kind: Kind, device: Device, seed: i64) -> Problem {
        crate::rng::seeded(seed, || Self::draw(shape, kind, device))
    }

    fn draw(shape: AttnShape, kind: Kind, device: Device) -> Problem {
        let (b, s, d) = (
            shape.batch as i64,
            shape.seq_len as i64,
            shape.head_dim as i64,
        );
        // On the CPU draw in float64 (so every dtype sees the same numbers); on a GPU draw
        // there directly (long sequences would take a minute on the host).
        let mk = |h: usize| match device {
            Device::Cpu => {
                Tensor::randn([b, h as i64, s, d], (Kind::Double, Device::Cpu)).to_kind(kind)
            }
            _ => Tensor::randn([b, h as i64, s, d], (kind, device)),
        };
        Problem {
            q: mk(shape.q_heads),
            k: mk(shape.kv_heads),
            v: mk(shape.kv_heads),
            dout: mk(shape.q_heads),
        }
    }
}

/// Output and gradients, full-sequence.
pub struct Grads {
    pub out: Tensor,
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Runs 2D attention forward and backward with one thread per rank of `layout` (dp = 1) and
/// reassembles the full-sequence results.
pub fn run_2d_local(
    layout: Layout,
    shape: AttnShape,
    backend: Backend,
    p: &Problem,
) -> Result<Grads> {
    layout.validate()?;
    if layout.dp != 1 {
        return Err(RuntimeError::Layout(
            "run_2d_local runs one SP group (dp = 1)".into(),
        ));
    }
    let zz = Zigzag::new(shape.seq_len, layout.ulysses, layout.ring)?;
    let w = layout.world_size();
    let uly = local_groups(&layout, GroupKind::Ulysses);
    let ring = local_groups(&layout, GroupKind::Ring);
    let mut inputs = Vec::with_capacity(w);
    for rank in 0..w {
        let c = layout.coords(rank);
        let sh = |t: &Tensor| crate::shard::shard(&zz, t, 2, c.ring, c.ulysses);
        inputs.push((sh(&p.q)?, sh(&p.k)?, sh(&p.v)?, sh(&p.dout)?));
    }
    let results: Vec<Result<[Tensor; 4]>> = std::thread::scope(|s| {
        let handles: Vec<_> = uly
            .into_iter()
            .zip(ring)
            .zip(inputs)
            .map(|((uc, rc), (q, k, v, dout))| {
                s.spawn(move || -> Result<[Tensor; 4]> {
                    let attn = Attention2d::new(
                        &uc as &dyn Communicator,
                        &rc as &dyn Communicator,
                        backend,
                        shape,
                    )?;
                    let (out, ctx) = attn.forward(&q, &k, &v)?;
                    let (dq, dk, dv) = attn.backward(&ctx, &dout)?;
                    Ok([out, dq, dk, dv])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(RuntimeError::Comm("rank thread panicked".into())))
            })
            .collect()
    });
    let mut grid: Vec<Vec<Option<[Tensor; 4]>>> = (0..layout.ring)
        .map(|_| (0..layout.ulysses).map(|_| None).collect())
        .collect();
    for (rank, r) in results.into_iter().enumerate() {
        let c = layout.coords(rank);
        grid[c.ring][c.ulysses] = Some(r?);
    }
    let pick = |i: usize| -> Result<Tensor> {
        let shards: Vec<Vec<Tensor>> = grid
            .iter()
            .map(|row| {
                row.iter()
                    .map(|x| {
                        x.as_ref()
                            .map(|a| a[i].shallow_clone())
                            .unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, Device::Cpu)))
                    })
                    .collect()
            })
            .collect();
        crate::shard::unshard(&zz, &shards, 2)
    };
    Ok(Grads {
        out: pick(0)?,
        dq: pick(1)?,
        dk: pick(2)?,
        dv: pick(3)?,
    })
}

/// Single-device float64 reference on the CPU.
pub fn reference(p: &Problem) -> Result<Grads> {
    let f = |t: &Tensor| t.to_kind(Kind::Double).to(Device::Cpu);
    let d = p.q.size()[3];
    let (out, dq, dk, dv) = crate::kernel::reference_attention(
        &f(&p.q),
        &f(&p.k),
        &f(&p.v),
        &f(&p.dout),
        true,
        1.0 / (d as f64).sqrt(),
    )?;
    Ok(Grads { out, dq, dk, dv })
}

/// ||x - ref|| / ||ref|| in float64.
pub fn rel_err(x: &Tensor, reference: &Tensor) -> f64 {
    let x = x.to_kind(Kind::Double).to(Device::Cpu);
    let r = reference.to_kind(Kind::Double).to(Device::Cpu);
    let num = (&x - &r).norm().double_value(&[]);
    let den = r.norm().double_value(&[]);
    if x.isnan().any().int64_value(&[]) != 0 {
        return f64::NAN;
    }
    num / den.max(f64::MIN_POSITIVE)
}

/// Relative errors of (out, dq, dk, dv) against a reference.
pub fn errors(g: &Grads, r: &Grads) -> [f64; 4] {
    [
        rel_err(&g.out, &r.out),
        rel_err(&g.dq, &r.dq),
        rel_err(&g.dk, &r.dk),
        rel_err(&g.dv, &r.dv),
    ]
}

/// A training plan of the contract without a prediction ([`mmsp_plan::Plan::skeleton`]) for
/// SP `ulysses` x `ring` x DP `dp` with ZeRO stage `zero` over sequences of `context` tokens
/// and the tiny model: what tests run.
pub fn plan(ulysses: usize, ring: usize, dp: usize, zero: u32, context: usize) -> mmsp_plan::Plan {
    let layout = crate::plan::Layout {
        ulysses,
        ring,
        dp,
        tp: 1,
        placement: crate::plan::Placement::UlyssesInner,
    };
    let model = crate::model::ModelConfig::tiny().to_plan_model("tiny");
    let mut p = mmsp_plan::Plan::skeleton(model, layout.contract(), 8, context as u64, dp as u64)
        .expect("a test's layout and context make a plan");
    p.zero_stage = zero as u8;
    p
}

/// An inference plan of the tiny model on one `ulysses` x `ring` group holding `context`
/// tokens, with a prediction of no run (zeros; the runtime reports it beside its measures).
pub fn inference_plan(ulysses: usize, ring: usize, context: usize) -> mmsp_plan::Plan {
    let mut p = plan(ulysses, ring, 1, 0, context);
    p.mode = mmsp_plan::Mode::Inference;
    p.inference = Some(mmsp_plan::InferenceEstimate {
        weights: mmsp_plan::WeightSharding::Replicated,
        kv_heads_held: 0,
        kv_tokens_per_rank: 0,
        kv_append_rule: "test".into(),
        prefill_s: 0.0,
        prefill_tokens_per_s: 0.0,
        decode_s_per_token: 0.0,
        decode_tokens: 0,
        request_s: 0.0,
        memory: Default::default(),
        prefill: Default::default(),
        decode_kernels_s: 0.0,
        decode_kernels_per_token: 0,
        decode_kernel_floor_s: 0.0,
        decode_cuda_graph: false,
        decode_bytes_per_token: 0.0,
        decode_hbm_s: 0.0,
        decode_floor_s: 0.0,
        decode_comm_s: 0.0,
        decode_weight_gather_s: 0.0,
        prefill_flops: 0.0,
    });
    p
}

/// [`plan`] as JSON text.
pub fn plan_json(ulysses: usize, ring: usize, dp: usize, zero: u32, context: usize) -> String {
    serde_json::to_string(&plan(ulysses, ring, dp, zero, context)).expect("a plan serialises")
}

/// The planner's `tokens.ranges_per_rank` of packed `samples` (frames, text tokens) with
/// `tpf` tokens per frame, for SP ranks `ring_idx * ulysses + ulysses_idx` (the contract's
/// zigzag shards of each sample).
pub fn vision_plan_ranges(
    samples: &[(usize, usize)],
    tpf: usize,
    ulysses: usize,
    ring: usize,
) -> Vec<Vec<(usize, usize)>> {
    let lens: Vec<u64> = samples.iter().map(|&(f, t)| (tpf * f + t) as u64).collect();
    mmsp_plan::zigzag::ranges_per_rank(&lens, ulysses, ring)
        .expect("a test's samples shard")
        .into_iter()
        .map(|rs| {
            rs.into_iter()
                .map(|(a, b)| (a as usize, b as usize))
                .collect()
        })
        .collect()
}

/// A prediction for test plans (figures of no run: 1 s per step, 48 tokens/s, MFU 0.5, 1 GB).
fn test_prediction() -> mmsp_plan::Predicted {
    mmsp_plan::Predicted {
        step_time_s: 1.0,
        tokens_per_s: 48.0,
        mfu: 0.5,
        hfu: 0.0,
        memory_per_gpu_bytes: 1e9,
        memory: Default::default(),
        time: Default::default(),
        comm_exposed_s: 0.0,
        comm_overlapped_s: 0.0,
        simulated_step_time_s: None,
        params: 0,
        active_params: None,
        tokens_per_s_per_gpu: 0.0,
        model_tflops_per_gpu: 0.0,
        memory_headroom: 0.0,
        warnings: Vec::new(),
    }
}

/// A training plan with a vision section for packed `samples` (frames, text tokens), `tpf`
/// tokens per frame, over `(ulysses, ring, dp)`; stage 1's `frames_per_rank` as given, else
/// a scattered assignment (not the contiguous split, as a MILP may return).
pub fn vision_plan(
    samples: &[(usize, usize)],
    tpf: usize,
    context: usize,
    (ulysses, ring, dp): (usize, usize, usize),
    frames_per_rank: Option<Vec<Vec<usize>>>,
) -> serde_json::Value {
    let sp = ulysses * ring;
    let frames: usize = samples.iter().map(|s| s.0).sum();
    let lens: Vec<u64> = samples.iter().map(|s| (s.0 * tpf + s.1) as u64).collect();
    let fpr = frames_per_rank.unwrap_or_else(|| {
        let mut v = vec![Vec::new(); sp];
        for f in (0..frames).rev() {
            v[(3 * f + 1) % sp].push(f);
        }
        v
    });
    let mut p = plan(ulysses, ring, dp, 0, context);
    p.tokens.ranges_per_rank = vision_plan_ranges(samples, tpf, ulysses, ring)
        .into_iter()
        .map(|rs| rs.into_iter().map(|(a, b)| [a as u64, b as u64]).collect())
        .collect();
    p.predicted = Some(test_prediction());
    p.vision = Some(mmsp_plan::VisionPlan {
        encoder: "siglip-so400m".into(),
        tokens_per_frame: tpf as u64,
        frames: frames as u64,
        samples: samples.len() as u64,
        sample_lens: lens,
        pad_tokens_per_sample: None,
        frames_per_sample: Some(samples.iter().map(|s| s.0 as u64).collect()),
        text_tokens_per_sample: Some(samples.iter().map(|s| s.1 as u64).collect()),
        train_vision: true,
        frames_per_rank: fpr,
        encoder_imbalance_before: 1.0,
        encoder_imbalance_after: 1.0,
        balance_method: "test".into(),
        solver: "none".into(),
        solve_time_s: 0.0,
        attention_imbalance: 1.0,
        reshard_bytes: 0,
        stage: mmsp_plan::VisionStage {
            encoder_s: 0.01,
            gather_s: 0.001,
            reshard_s: 0.001,
            memory_bytes: 1.0,
            states_bytes: 1.0,
            attention_scale: 1.0,
            ..Default::default()
        },
    });
    serde_json::to_value(&p).expect("a plan serialises")
}

/// Run options for tests: no progress lines, everything else at its default.
pub fn quiet_run() -> crate::train::run::RunExtras {
    crate::train::run::RunExtras {
        progress: false,
        ..crate::train::run::RunExtras::default()
    }
}

/// A run's report as JSON, for tests that read it by key (panics, failing the test, on an
/// error or on a rank that has no report).
pub fn report_json(r: crate::Result<Option<crate::train::report::RunReport>>) -> serde_json::Value {
    r.expect("the run succeeds")
        .expect("this rank has the report")
        .to_json()
}

/// The `losses` of a run's report (panics, failing the test, when the report has none).
pub fn report_losses(v: &serde_json::Value) -> Vec<f64> {
    v["losses"]
        .as_array()
        .expect("the report has losses")
        .iter()
        .map(|x| x.as_f64().expect("losses are numbers"))
        .collect()
}
