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
        tch::manual_seed(seed);
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
        let sh = |t: &Tensor| zz.shard(t, 2, c.ring, c.ulysses);
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
        zz.unshard(&shards, 2)
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

/// A minimal training plan (the planner's schema) for SP `ulysses` x `ring` x DP `dp` with
/// ZeRO stage `zero` over sequences of `context` tokens: what tests run.
pub fn plan_json(ulysses: usize, ring: usize, dp: usize, zero: u32, context: usize) -> String {
    format!(
        r#"{{"schema": "{}", "schema_version": {}, "world_size": {}, "layout": {{"ulysses": {ulysses}, "ring": {ring}, "dp": {dp}, "tp": 1,
        "placement": "ulysses_inner"}}, "zero_stage": {zero}, "recompute": "none", "micro_batch": 1,
        "grad_accum_steps": 1, "context_tokens": {context}}}"#,
        crate::plan::SCHEMA_NAME,
        crate::plan::SCHEMA_VERSION,
        ulysses * ring * dp
    )
}

/// The planner's `tokens.ranges_per_rank` of packed `samples` (frames, text tokens) with
/// `tpf` tokens per frame, for SP ranks `ring_idx * ulysses + ulysses_idx` (as
/// `planner/src/balance/zigzag.rs` writes them for lengths that divide: per sample, chunks r
/// and 2R-1-r of 2R, sub-chunk u of each).
pub fn vision_plan_ranges(
    samples: &[(usize, usize)],
    tpf: usize,
    ulysses: usize,
    ring: usize,
) -> Vec<Vec<(usize, usize)>> {
    let mut out = vec![Vec::new(); ulysses * ring];
    let mut start = 0;
    for &(f, t) in samples {
        let len = tpf * f + t;
        let (c, s) = (len / (2 * ring), len / (2 * ring * ulysses));
        for r in 0..ring {
            for u in 0..ulysses {
                for chunk in [r, 2 * ring - 1 - r] {
                    let a = start + chunk * c + u * s;
                    out[r * ulysses + u].push((a, a + s));
                }
            }
        }
        start += len;
    }
    out
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
    let lens: Vec<usize> = samples.iter().map(|s| s.0 * tpf + s.1).collect();
    let fpr = frames_per_rank.unwrap_or_else(|| {
        let mut v = vec![Vec::new(); sp];
        for f in (0..frames).rev() {
            v[(3 * f + 1) % sp].push(f);
        }
        v
    });
    serde_json::json!({
        "schema": crate::plan::SCHEMA_NAME, "schema_version": crate::plan::SCHEMA_VERSION,
        "world_size": sp * dp,
        "layout": {"ulysses": ulysses, "ring": ring, "dp": dp, "tp": 1,
                   "placement": "ulysses_inner"},
        "zero_stage": 0, "recompute": "none", "micro_batch": 1, "grad_accum_steps": 1,
        "context_tokens": context,
        "tokens": {"ranges_per_rank": vision_plan_ranges(samples, tpf, ulysses, ring)},
        "predicted": {"step_time_s": 1.0, "tokens_per_s": 48.0, "mfu": 0.5,
                      "memory_per_gpu_bytes": 1e9},
        "vision": {
            "encoder": "siglip-so400m", "tokens_per_frame": tpf, "frames": frames,
            "samples": samples.len(), "sample_lens": lens,
            "frames_per_sample": samples.iter().map(|s| s.0).collect::<Vec<_>>(),
            "text_tokens_per_sample": samples.iter().map(|s| s.1).collect::<Vec<_>>(),
            "train_vision": true, "frames_per_rank": fpr,
            "encoder_imbalance_before": 1.0, "encoder_imbalance_after": 1.0,
            "stage": {"encoder_s": 0.01, "gather_s": 0.001, "reshard_s": 0.001,
                      "memory_bytes": 1.0, "states_bytes": 1.0, "attention_scale": 1.0}
        }
    })
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
