//! One rank's training loop: the trainer built from the run's inputs, each step's data
//! (the dataset's sample or synthetic ids), learning rate, checkpoints, `--save-hf`, metrics
//! and progress, kernel traces.
use super::*;
use crate::train::data::pack_documents;

pub(super) fn synthetic(step: usize, seq: usize, vocab: usize, dev: Device) -> (Tensor, Tensor) {
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

pub(super) fn shard(t: &Tensor, ranges: &[(usize, usize)]) -> Tensor {
    let parts: Vec<Tensor> = ranges
        .iter()
        .map(|&(a, b)| t.narrow(1, a as i64, (b - a) as i64))
        .collect();
    Tensor::cat(&parts, 1)
}

/// The attention kernel of a run: the one asked for, else FlashAttention-2 in a deterministic
/// run on CUDA (its backward is bitwise reproducible under ATen's deterministic mode; cuDNN's
/// is not, measured: `runtime/bench/results/h100-sxm/raw/h100_runE_memory_determinism.jsonl`),
/// else the device's default.
pub(super) fn attention_backend(extras: &RunExtras, dev: Device) -> Backend {
    match (extras.attn_backend, extras.deterministic, dev) {
        (Some(b), _, _) => b,
        (None, true, Device::Cuda(_)) => Backend::Flash,
        (None, _, _) => Backend::default_for(dev),
    }
}

/// Turns on bitwise-reproducible execution for this process: ATen's deterministic
/// algorithms and cuDNN's deterministic mode. On CUDA cuBLAS also needs its fixed workspace,
/// `CUBLAS_WORKSPACE_CONFIG=:4096:8` in the environment before cuBLAS starts: the binary
/// sets it for `--deterministic`; without it ATen refuses cuBLAS calls in deterministic mode.
pub(super) fn deterministic_mode() -> Result<()> {
    crate::ffi::set_deterministic(true)
}

/// This process's kernel-trace file: `path` itself, or `path.rankN` when a run of several
/// processes writes one each.
pub(super) fn kernel_trace_path(path: &Path, rank: usize, cx: &LoopCtx<'_>) -> PathBuf {
    if cx.in_process || cx.layout.world_size() <= 1 {
        path.to_path_buf()
    } else {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".rank{rank}"));
        PathBuf::from(s)
    }
}

pub(super) fn finite_or_null(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Model FLOPs utilisation of one step (as the report counts it: 3 x the forward with causal
/// attention, over the devices the run uses).
pub(super) fn step_mfu(cx: &LoopCtx<'_>, step_s: f64) -> f64 {
    let (cfg, tp) = (cx.cfg, cx.tp);
    let whole = [tp.context_tokens];
    let samples: &[usize] = cx.vision.map_or(&whole[..], |v| &v.sample_lens);
    let attn: f64 = samples.iter().map(|&l| cfg.attention_flops(l)).sum();
    let flops =
        cx.layout.dp as f64 * 3.0 * (cfg.dense_flops_per_token() * tp.context_tokens as f64 + attn);
    let devices = if cx.in_process {
        1
    } else {
        cx.layout.world_size()
    };
    flops / step_s / (devices as f64 * cx.opts.peak_flops)
}

pub(super) fn now_unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One rank's loop: returns its per-step records; rank 0 prints progress.
pub(super) fn rank_loop(
    rank: usize,
    groups: Groups<'_>,
    cx: &LoopCtx<'_>,
) -> Result<Vec<StepRecord>> {
    let (dev, opts) = (cx.dev, cx.opts);
    let comms = [groups.ulysses, groups.ring, groups.grad];
    let comm_now = || comms.iter().map(|c| c.comm_time_s()).sum::<f64>();
    let grad = groups.grad;
    let schedule = cx.extras.schedule.unwrap_or(LrSchedule::constant(opts.lr));
    let (mut t, mut vis) = build_trainer(rank, groups, cx, &schedule)?;
    let first = match cx.resume {
        Some(m) => {
            checkpoint::load(&mut t, m)?;
            m.step
        }
        None => 0,
    };
    let mut losses: Vec<f64> = cx.resume.map(|m| m.losses.clone()).unwrap_or_default();
    let mut metrics = match (&cx.extras.metrics, rank) {
        (Some(p), 0) => Some(Metrics::open(p)?),
        _ => None,
    };
    let started = Instant::now();
    let bar = progress_bar(cx, rank);
    let mut out = vec![];
    let mut step_began = Instant::now();
    for i in 0..opts.steps {
        let step = first + i;
        if let Some(f) = cx.inject {
            if f.rank == rank && f.step == step {
                inject(rank, step, f.mode, cx, grad)?;
            }
        }
        t.optimizer_mut().set_lr(schedule.at(step));
        if let Device::Cuda(d) = dev {
            crate::ffi::alloc_reset_peak(d)?;
        }
        let profiled = begin_kernel_trace(cx, rank, i + 1 == opts.steps)?;
        // A profiled step runs slower and writes its trace files: not a steady step.
        let _relaxed = profiled.as_ref().map(|_| cx.timeout.relax());
        let c0 = comm_now();
        let start_unix_s = now_unix_s();
        let (st, vision) = match (&mut vis, cx.vision) {
            (Some(v), Some(vr)) => v.step(step, vr, &mut t, grad, cx)?,
            _ => {
                let (ids, labels) = text_batch(cx, &mut t, rank, step)?;
                let rg = t.local_ranges();
                (t.step(&shard(&ids, &rg), &shard(&labels, &rg))?, [0.0; 5])
            }
        };
        if let Some(e) = grad.peer_failure() {
            return Err(e);
        }
        if let Some(path) = &profiled {
            crate::train::kernel_profile::finish(path, 25)?;
        }
        let alloc = match dev {
            Device::Cuda(d) => Some(crate::ffi::alloc_stats(d)?),
            _ => None,
        };
        let rec = StepRecord {
            start_unix_s,
            stats: st,
            comm_s: comm_now() - c0,
            mem_used: device_memory(dev).map_or(f64::NAN, |m| m.1),
            alloc_peak: alloc.map_or(f64::NAN, |a| a.allocated_peak as f64),
            reserved_peak: alloc.map_or(f64::NAN, |a| a.reserved_peak as f64),
            vision,
        };
        losses.push(st.loss);
        let eta = (opts.steps - i - 1) as f64 * (started.elapsed().as_secs_f64() / (i + 1) as f64);
        match &bar {
            Some(b) => {
                let tps = tokens_per_s(cx, rec.stats.step_s);
                b.set_message(format!("loss {:.4}  {tps:.0} tokens/s", rec.stats.loss));
                b.inc(1);
            }
            None if rank == 0 && cx.extras.progress => {
                eprintln!("{}", progress_line(cx, i, step, &rec, eta));
            }
            None => {}
        }
        if let Some(m) = &mut metrics {
            let lr = schedule.at(step);
            m.write(&metrics_line(
                cx,
                step,
                &rec,
                lr,
                t.optimizer().last_grad_norm(),
            ))?;
        }
        out.push(rec);
        // The step as the collective timeout sees it: from the last one's end (its save
        // aside) to this one's, data and metrics included.
        let step_wall_s = step_began.elapsed().as_secs_f64();
        {
            // A save's waits (file writes, gathers to rank 0) are not bounded by a step.
            let _relaxed = cx.timeout.relax();
            save_after(cx, rank, i, step, &t, &losses)?;
        }
        cx.timeout.observe_step(step_wall_s);
        step_began = Instant::now();
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(out)
}

/// Rank 0's progress bar (steps, loss, tokens/s, ETA) when stderr is a terminal; elsewhere
/// (logs, CI) one line per step instead.
fn progress_bar(cx: &LoopCtx<'_>, rank: usize) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if rank != 0 || !cx.extras.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(cx.opts.steps as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {msg}  elapsed {elapsed}  ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    b.set_style(style);
    Some(b)
}

/// The rank's trainer (from the run's weights, or seeded random ones) and its vision stage.
fn build_trainer<'a>(
    rank: usize,
    groups: Groups<'a>,
    cx: &LoopCtx<'_>,
    schedule: &LrSchedule,
) -> Result<(Trainer<'a>, Option<VisionRank>)> {
    let (tp, dev) = (cx.tp, cx.dev);
    let (master, compute) = if cx.opts.cpu {
        (Kind::Float, Kind::Float)
    } else {
        (Kind::Float, Kind::BFloat16)
    };
    let grad = groups.grad;
    let mut model = cx.inputs.decoder(cx.cfg, dev, master, compute)?;
    model.set_fused_norm(cx.extras.knobs.fused_norm);
    let tc = TrainConfig {
        optimizer: AdamWConfig {
            lr: schedule.at(0),
            max_grad_norm: cx.extras.max_grad_norm,
            kernel: cx.extras.knobs.adamw,
            ..AdamWConfig::default()
        },
        zero_stage: tp.zero_stage,
        recompute: tp.recomputes(),
        backend: attention_backend(cx.extras, dev),
        // Phase times need a device synchronisation around each phase; without profiling
        // (MMSP_PROFILE=0) the step runs without them (no phase breakdown, no sync bubbles).
        profile: cx.extras.knobs.profile,
        mem_trace: cx.extras.knobs.mem_trace,
    };
    let mut t = match cx.vision {
        Some(vr) => Trainer::new_packed(model, groups, &vr.sample_lens, tc)?,
        None => Trainer::new(model, groups, tp.context_tokens, tc)?,
    };
    t.optimizer_mut()
        .set_measure_norm(cx.extras.metrics.is_some());
    let vis = match cx.vision {
        Some(vr) => Some(VisionRank::new(vr, rank, cx, &t, grad, master, compute)?),
        None => None,
    };
    Ok((t, vis))
}

/// Ids and labels (1, S) of a text step: the dataset's sample for this rank's DP index (its
/// documents as samples of their own unless `cross_document_attention`: the trainer is
/// re-packed for them), or the synthetic sequence.
fn text_batch(
    cx: &LoopCtx<'_>,
    t: &mut Trainer<'_>,
    rank: usize,
    step: usize,
) -> Result<(Tensor, Tensor)> {
    let dev = cx.dev;
    let Some(d) = &cx.inputs.data else {
        return Ok(synthetic(
            step,
            cx.tp.context_tokens,
            cx.cfg.vocab_size,
            dev,
        ));
    };
    let smp = d.sample(step, cx.layout.coords(rank).dp, cx.layout.dp)?;
    let multiple = 2 * cx.layout.ulysses * cx.layout.ring;
    let (ids, labels) = match pack_documents(&smp, multiple, 0) {
        Some(p) if !cx.extras.cross_document_attention => {
            t.repack(&p.sample_lens)?;
            (p.ids, p.labels)
        }
        _ => (smp.ids, smp.labels),
    };
    let s = ids.len() as i64;
    Ok((
        Tensor::from_slice(&ids).view([1, s]).to(dev),
        Tensor::from_slice(&labels).view([1, s]).to(dev),
    ))
}

/// Starts the kernel profiler before the last step when `--kernel-trace` asks (CUDA; rank 0
/// of in-process ranks, every NCCL process): the trace file it will write.
fn begin_kernel_trace(cx: &LoopCtx<'_>, rank: usize, last: bool) -> Result<Option<PathBuf>> {
    let (Some(p), Device::Cuda(d)) = (&cx.extras.kernel_trace, cx.dev) else {
        return Ok(None);
    };
    if !last || (rank != 0 && cx.in_process) {
        return Ok(None);
    }
    tch::Cuda::synchronize(d as i64);
    crate::ffi::kernel_profile_start()?;
    Ok(Some(kernel_trace_path(p, rank, cx)))
}

/// Tokens per second of a step (every DP replica's tokens).
fn tokens_per_s(cx: &LoopCtx<'_>, step_s: f64) -> f64 {
    (cx.layout.dp * cx.tp.context_tokens) as f64 / step_s
}

/// Rank 0's progress line of step `i` of the run (global index `step`).
fn progress_line(cx: &LoopCtx<'_>, i: usize, step: usize, rec: &StepRecord, eta_s: f64) -> String {
    let st = &rec.stats;
    format!(
        "step {}/{} (index {step}): loss {:.6}  step {:.3} s  {:.0} tokens/s  attention {:.3} s  \
         grad sync + optimizer {:.3} s  communication {:.3} s  ETA {eta_s:.0} s",
        i + 1,
        cx.opts.steps,
        st.loss,
        st.step_s,
        tokens_per_s(cx, st.step_s),
        st.attention_s,
        st.grad_sync_s,
        rec.comm_s,
    )
}

/// The `--metrics` line of a step.
fn metrics_line(cx: &LoopCtx<'_>, step: usize, rec: &StepRecord, lr: f64, grad_norm: f64) -> Value {
    let st = &rec.stats;
    json!({
        "step": step + 1, "loss": st.loss, "lr": lr, "grad_norm": finite_or_null(grad_norm),
        "step_s": st.step_s, "tokens_per_s": tokens_per_s(cx, st.step_s),
        "mfu": step_mfu(cx, st.step_s), "peak_allocated_bytes": finite_or_null(rec.alloc_peak),
        "unix_s": rec.start_unix_s,
    })
}

/// The checkpoints due after step `i` (global index `step`): `--save-hf` and `--save`, at
/// the end and every `--save-every` steps. Every rank takes part.
fn save_after(
    cx: &LoopCtx<'_>,
    rank: usize,
    i: usize,
    step: usize,
    t: &Trainer<'_>,
    losses: &[f64],
) -> Result<()> {
    let every = cx.extras.save_every;
    if !(i + 1 == cx.opts.steps || (every > 0 && (step + 1).is_multiple_of(every))) {
        return Ok(());
    }
    let say = |what: String| {
        if rank == 0 && cx.extras.progress {
            eprintln!("{what}");
        }
    };
    if let Some(sh) = &cx.extras.save_hf {
        let files = save_hf(t, cx.inputs, sh, cx.opts.cpu, rank == 0)?;
        say(format!(
            "Hugging Face checkpoint after step index {step}: {} files in {}",
            files.len(),
            sh.dir.display()
        ));
    }
    if let Some(dir) = &cx.extras.save {
        checkpoint::save_shard(t, dir, step + 1)?;
        t.grad_group().barrier()?;
        if rank == 0 {
            let data = match (&cx.inputs.data, &cx.extras.data) {
                (Some(d), _) => json!({"path": d.path, "seed": cx.extras.data_seed}),
                (None, Some(p)) => json!({"path": p}),
                (None, None) => json!("synthetic"),
            };
            checkpoint::write_manifest(t, dir, cx.identity, step + 1, losses, &data)?;
        }
        say(format!(
            "checkpoint after step index {step} written to {}",
            dir.display()
        ));
    }
    Ok(())
}
