//! `mmsp-runtime run`: train a plan for N steps, either one process per GPU (torchrun / SLURM
//! environment, NCCL) or with in-process ranks (threads) on one device, and report measured
//! step time, tokens/s, MFU, memory and communication time next to the plan's prediction.
use super::adamw::AdamWConfig;
use super::{Groups, StepStats, TrainConfig, Trainer};
use crate::comm::local::{local_groups, LocalComm};
use crate::comm::nccl::{LaunchEnv, NcclWorld};
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::model::{Decoder, ModelConfig};
use crate::plan::{GroupKind, Plan};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// The plan fields training reads beyond [`Plan`]'s.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainPlan {
    #[serde(default)]
    pub zero_stage: u32,
    #[serde(default = "none")]
    pub recompute: String,
    #[serde(default = "one")]
    pub micro_batch: usize,
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    pub context_tokens: usize,
    pub model: Option<Value>,
    pub tokens: Option<Tokens>,
    pub predicted: Option<Predicted>,
}

/// `tokens` of a plan.
#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    pub ranges_per_rank: Vec<Vec<(usize, usize)>>,
}

/// `predicted` of a plan.
#[derive(Debug, Clone, Deserialize)]
pub struct Predicted {
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    pub memory_per_gpu_bytes: f64,
}

fn none() -> String {
    "none".into()
}
fn one() -> usize {
    1
}

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// The plan's `model` object.
    Plan,
    Tiny,
    HfConfig(PathBuf),
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub plan: PathBuf,
    pub steps: usize,
    pub model: ModelSource,
    /// Ranks as threads on one device instead of one process per GPU.
    pub inprocess: Option<usize>,
    /// Use the CPU (f32) instead of the GPU (bf16).
    pub cpu: bool,
    pub lr: f64,
    /// Peak dense bf16 FLOP/s of one device, for MFU.
    pub peak_flops: f64,
    pub out: Option<PathBuf>,
}

/// Reads and checks everything that can be checked without a device or peers.
pub fn load(opts: &RunOptions) -> Result<(Plan, TrainPlan, ModelConfig)> {
    let text = std::fs::read_to_string(&opts.plan)
        .map_err(|e| RuntimeError::Plan(format!("{}: {e}", opts.plan.display())))?;
    let plan = Plan::from_json(&text)?;
    let tp: TrainPlan = serde_json::from_str(&text)?;
    if !["none", "selective", "full"].contains(&tp.recompute.as_str()) {
        return Err(RuntimeError::Plan(format!(
            "unknown recompute {:?}",
            tp.recompute
        )));
    }
    if tp.micro_batch != 1 {
        return Err(RuntimeError::Plan(format!(
            "micro_batch {} (the runtime trains one sequence per micro-step)",
            tp.micro_batch
        )));
    }
    if tp.zero_stage > 2 {
        return Err(RuntimeError::Plan(format!(
            "ZeRO stage {} is not implemented",
            tp.zero_stage
        )));
    }
    let cfg = match &opts.model {
        ModelSource::Tiny => ModelConfig::tiny(),
        ModelSource::HfConfig(p) => ModelConfig::from_hf_file(p)?,
        ModelSource::Plan => ModelConfig::from_plan_value(tp.model.as_ref().ok_or_else(|| {
            RuntimeError::Plan("no model in the plan (use --model or --tiny)".into())
        })?)?,
    };
    let l = plan.layout;
    let zz = crate::shard::Zigzag::new(tp.context_tokens, l.ulysses, l.ring)?;
    if let Some(t) = &tp.tokens {
        for (i, rr) in t.ranges_per_rank.iter().enumerate() {
            let (r, u) = (i / l.ulysses, i % l.ulysses);
            if r >= l.ring || rr.as_slice() != zz.local_ranges(r, u).as_slice() {
                return Err(RuntimeError::Plan(format!(
                    "tokens.ranges_per_rank[{i}] = {rr:?} is not the runtime's zigzag shard {:?}",
                    zz.local_ranges(r.min(l.ring - 1), u)
                )));
            }
        }
    }
    if let Some(n) = opts.inprocess {
        plan.check_launch(n)?;
    }
    if opts.steps == 0 {
        return Err(RuntimeError::Plan("--steps must be >= 1".into()));
    }
    Ok((plan, tp, cfg))
}

/// Device memory (total, used) in bytes, device-wide.
fn device_memory(dev: Device) -> Option<(f64, f64)> {
    let Device::Cuda(i) = dev else { return None };
    crate::ffi::cuda::bind_primary_context(i).ok()?;
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some((total as f64, (total - free) as f64))
}

fn synthetic(step: usize, seq: usize, vocab: usize, dev: Device) -> (Tensor, Tensor) {
    let ids: Vec<i64> = (0..seq as i64)
        .map(|i| (i * 7 + (step as i64) * 13 + (i * i) % 5) % vocab as i64)
        .collect();
    let mut labels = ids[1..].to_vec();
    labels.push(-100);
    let s = seq as i64;
    (
        Tensor::from_slice(&ids).view([1, s]).to(dev),
        Tensor::from_slice(&labels).view([1, s]).to(dev),
    )
}

fn shard(t: &Tensor, ranges: [(usize, usize); 2]) -> Tensor {
    let parts: Vec<Tensor> = ranges
        .iter()
        .map(|&(a, b)| t.narrow(1, a as i64, (b - a) as i64))
        .collect();
    Tensor::cat(&parts, 1)
}

/// One rank's loop: returns its per-step stats; rank 0 prints progress.
fn rank_loop(
    rank: usize,
    groups: Groups<'_>,
    tp: &TrainPlan,
    cfg: &ModelConfig,
    dev: Device,
    opts: &RunOptions,
) -> Result<Vec<StepStats>> {
    let (master, compute) = if opts.cpu {
        (Kind::Float, Kind::Float)
    } else {
        (Kind::Float, Kind::BFloat16)
    };
    let model = Decoder::random(cfg.clone(), dev, master, compute, 1)?;
    let tc = TrainConfig {
        optimizer: AdamWConfig {
            lr: opts.lr,
            ..AdamWConfig::default()
        },
        zero_stage: tp.zero_stage,
        recompute: tp.recompute != "none",
        backend: Backend::default_for(dev),
        profile: true,
    };
    let mut t = Trainer::new(model, groups, tp.context_tokens, tc)?;
    let mut out = vec![];
    for step in 0..opts.steps {
        let (ids, labels) = synthetic(step, tp.context_tokens, cfg.vocab_size, dev);
        let rg = t.local_ranges();
        let st = t.step(&shard(&ids, rg), &shard(&labels, rg))?;
        if rank == 0 {
            eprintln!(
                "{}",
                json!({"step": step, "loss": st.loss, "step_s": st.step_s,
                       "attention_s": st.attention_s, "grad_sync_s": st.grad_sync_s})
            );
        }
        out.push(st);
    }
    Ok(out)
}

/// Runs the plan and returns the report (also written to `opts.out`).
pub fn run(opts: &RunOptions) -> Result<Value> {
    let (plan, tp, cfg) = load(opts)?;
    let w = plan.world_size;
    let (dev, rank0, launched) = match opts.inprocess {
        Some(_) => {
            let dev = if opts.cpu {
                Device::Cpu
            } else {
                Device::Cuda(0)
            };
            (dev, 0, "inprocess")
        }
        None => (Device::Cpu, 0, "nccl"),
    };
    if !opts.cpu && !tch::Cuda::is_available() {
        return Err(RuntimeError::Launch(
            "CUDA is not available (use --cpu)".into(),
        ));
    }
    let stats: Vec<Vec<StepStats>>;
    let mut device_for_mem = dev;
    if opts.inprocess.is_some() {
        if let (Some((total, _)), Some(p)) = (device_memory(dev), &tp.predicted) {
            if p.memory_per_gpu_bytes * w as f64 > total {
                return Err(RuntimeError::Launch(format!(
                    "the plan predicts {:.1} GiB per rank x {w} in-process ranks, the GPU has {:.1} GiB",
                    p.memory_per_gpu_bytes / 1073741824.0,
                    total / 1073741824.0
                )));
            }
        }
        let l = plan.layout;
        let uly = local_groups(&l, GroupKind::Ulysses);
        let ring = local_groups(&l, GroupKind::Ring);
        let world = LocalComm::group_with_timeout(w, Duration::from_secs(1800));
        let res: Vec<Result<Vec<StepStats>>> = std::thread::scope(|s| {
            let hs: Vec<_> = uly
                .into_iter()
                .zip(ring)
                .zip(world)
                .enumerate()
                .map(|(rank, ((u, r), g))| {
                    let (tp, cfg) = (&tp, &cfg);
                    s.spawn(move || {
                        let groups = Groups {
                            ulysses: &u as &dyn Communicator,
                            ring: &r,
                            grad: &g,
                            dp: l.dp,
                        };
                        rank_loop(rank, groups, tp, cfg, dev, opts)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(RuntimeError::Comm("rank thread panicked".into())))
                })
                .collect()
        });
        stats = res.into_iter().collect::<Result<_>>()?;
    } else {
        let env = LaunchEnv::from_env()?;
        plan.check_launch(env.world_size)?;
        let d = Device::Cuda(env.local_rank);
        device_memory(d);
        if let (Some((total, _)), Some(p)) = (device_memory(d), &tp.predicted) {
            if p.memory_per_gpu_bytes > total {
                return Err(RuntimeError::Launch(format!(
                    "the plan predicts {:.1} GiB per GPU, the GPU has {:.1} GiB",
                    p.memory_per_gpu_bytes / 1073741824.0,
                    total / 1073741824.0
                )));
            }
        }
        device_for_mem = d;
        let rank = env.rank;
        let nw = NcclWorld::init(&plan, env, Duration::from_secs(600))?;
        let groups = Groups {
            ulysses: &nw.ulysses,
            ring: &nw.ring,
            grad: &nw.world,
            dp: plan.layout.dp,
        };
        stats = vec![rank_loop(rank, groups, &tp, &cfg, d, opts)?];
        if rank != rank0 {
            return Ok(Value::Null);
        }
    }
    let mem = device_memory(device_for_mem);
    // Step 0 includes warm-up (cuDNN graph builds, allocator growth): summarise the rest.
    let s0 = &stats[0];
    let tail: Vec<&StepStats> = if s0.len() > 1 {
        s0[1..].iter().collect()
    } else {
        s0.iter().collect()
    };
    let n = tail.len() as f64;
    let mean = |f: &dyn Fn(&StepStats) -> f64| tail.iter().map(|s| f(s)).sum::<f64>() / n;
    let step_s = mean(&|s| s.step_s);
    let devices = if opts.inprocess.is_some() {
        1.0
    } else {
        w as f64
    };
    let dp = plan.layout.dp as f64;
    let tokens_per_step = dp * tp.context_tokens as f64;
    let tokens_per_s = tokens_per_step / step_s;
    let flops_per_step = dp
        * 3.0
        * (cfg.dense_flops_per_token() * tp.context_tokens as f64
            + cfg.attention_flops(tp.context_tokens));
    let mfu = flops_per_step / step_s / (devices * opts.peak_flops);
    let per_gpu_tps = tokens_per_s / devices;
    let mut report = json!({
        "launch": launched, "ranks": w, "devices": devices,
        "layout": {"ulysses": plan.layout.ulysses, "ring": plan.layout.ring, "dp": plan.layout.dp},
        "zero_stage": tp.zero_stage, "recompute": tp.recompute,
        "model": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
                  "kv_heads": cfg.num_kv_heads, "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size,
                  "params": cfg.num_params()},
        "context_tokens": tp.context_tokens, "steps": opts.steps,
        "losses": s0.iter().map(|s| s.loss).collect::<Vec<_>>(),
        "first_step_s": s0[0].step_s,
        "micro_step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": per_gpu_tps,
        "mfu": mfu, "peak_flops_per_device": opts.peak_flops,
        "attention_s_rank0": mean(&|s| s.attention_s),
        "grad_sync_and_optimizer_s_rank0": mean(&|s| s.grad_sync_s),
        "device_memory_used_bytes": mem.map(|m| m.1),
        "device_memory_total_bytes": mem.map(|m| m.0),
    });
    if let Some(p) = &tp.predicted {
        let pred_micro = p.step_time_s / tp.grad_accum_steps.max(1) as f64;
        let pred_tps_gpu = p.tokens_per_s / w as f64;
        let err = |m: f64, p: f64| 100.0 * (m - p) / p;
        report["predicted"] = json!({
            "micro_step_s": pred_micro, "tokens_per_s_per_gpu": pred_tps_gpu, "mfu": p.mfu,
            "memory_per_gpu_bytes": p.memory_per_gpu_bytes,
            "error_pct": {
                "micro_step_s": err(step_s * devices / w as f64, pred_micro),
                "tokens_per_s_per_gpu": err(per_gpu_tps, pred_tps_gpu),
                "mfu": err(mfu, p.mfu),
                "memory": mem.map(|m| err(m.1 / (w as f64 / devices), p.memory_per_gpu_bytes)),
            }
        });
    }
    if let Some(o) = &opts.out {
        std::fs::write(o, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}
