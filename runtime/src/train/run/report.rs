//! What a run measured, gathered from every rank ([`StepRecord`]), against what the plan
//! predicted: the report JSON, its vision section and the Chrome trace of the steps.
use super::*;

/// What one rank measured in one step.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct StepRecord {
    /// Wall-clock start, seconds since the Unix epoch.
    pub(super) start_unix_s: f64,
    pub(super) stats: StepStats,
    /// Time in this rank's collectives during the step (see `Communicator::comm_time_s`).
    pub(super) comm_s: f64,
    /// Device memory in use after the step (device-wide), if known.
    pub(super) mem_used: f64,
    /// The caching allocator's peak allocated (tensors) and reserved bytes during the step
    /// (CUDA; NaN elsewhere).
    pub(super) alloc_peak: f64,
    pub(super) reserved_peak: f64,
    /// Vision stage (0 without one): encoder forward, re-shard, reverse exchange, encoder
    /// backward, encoder optimizer (seconds, device-synchronised on CUDA).
    pub(super) vision: [f64; 5],
}

/// Fields of a [`StepRecord`] as gathered between processes.
pub(super) const REC_LEN: usize = 24;

impl StepRecord {
    /// Every field, in the one order in which records travel between processes.
    fn fields_mut(&mut self) -> [&mut f64; REC_LEN] {
        let s = &mut self.stats;
        let p = &mut s.phases;
        let [v0, v1, v2, v3, v4] = &mut self.vision;
        [
            &mut self.start_unix_s,
            &mut s.loss,
            &mut s.step_s,
            &mut s.attention_s,
            &mut s.grad_sync_s,
            &mut self.comm_s,
            &mut self.mem_used,
            &mut p.cast_s,
            &mut p.embed_s,
            &mut p.fwd_s,
            &mut p.attn_fwd_s,
            &mut p.loss_s,
            &mut p.bwd_s,
            &mut p.attn_bwd_s,
            &mut p.grad_reduce_s,
            &mut p.optimizer_s,
            v0,
            v1,
            v2,
            v3,
            v4,
            &mut self.alloc_peak,
            &mut self.reserved_peak,
            &mut s.held_weight_bytes,
        ]
    }

    fn to_vec(mut self) -> [f64; REC_LEN] {
        self.fields_mut().map(|f| *f)
    }

    fn from_slice(v: &[f64]) -> StepRecord {
        let mut r = StepRecord::default();
        for (f, x) in r.fields_mut().into_iter().zip(v) {
            *f = *x;
        }
        r
    }
}

/// FLOPs one DP replica's step executes, for HFU, counted as the planner counts them: GEMMs
/// at 3x forward plus one more forward of the layers under recompute, attention at
/// FlashAttention-2's 3.5x forward (its backward recomputes the scores; Dao 2023, Sec. 4.1).
/// MFU's model FLOPs count attention at 3x (PaLM, Chowdhery et al. 2022, Appendix B).
pub(super) fn hardware_flops(cfg: &ModelConfig, tp: &TrainPlan, attn_flops: f64) -> f64 {
    let again = if tp.recomputes() { 1.0 } else { 0.0 };
    let tokens = tp.context_tokens as f64;
    (3.0 + again) * cfg.layer_flops_per_token() * tokens
        + 3.0 * cfg.head_flops_per_token() * tokens
        + 3.5 * attn_flops
}

/// Every rank's records, in rank order, through an all-gather over the world.
pub(super) fn gather_records(
    world: &dyn Communicator,
    mine: &[StepRecord],
    dev: Device,
) -> Result<Vec<Vec<StepRecord>>> {
    let n = world.size();
    let flat: Vec<f64> = mine.iter().flat_map(|r| r.to_vec()).collect();
    let k = flat.len() as i64;
    let send = Tensor::from_slice(&flat).to_device(dev).view([1, k]);
    let recv = Tensor::zeros([n as i64, k], (Kind::Double, dev));
    world.all_gather(&send, &recv)?;
    let all = Vec::<f64>::try_from(recv.to_device(Device::Cpu).view([-1]))?;
    Ok(all
        .chunks(flat.len().max(1))
        .map(|rank| rank.chunks(REC_LEN).map(StepRecord::from_slice).collect())
        .collect())
}

/// The phases of a step in the order they run, with the simulator's stream (thread id) each
/// is drawn on. Each is summed over the layers, so the trace shows them as consecutive
/// blocks of the measured length, not interleaved layer by layer.
pub(super) fn phase_list(p: &Phases) -> [(&'static str, f64, u32); 9] {
    // Thread ids as in the planner's `sim::engine::Stream` (0 compute, 4 grad sync).
    [
        ("weight casts", p.cast_s, 0),
        ("embedding", p.embed_s, 0),
        ("forward, all layers (without attention)", p.fwd_s, 0),
        (
            "attention forward, all layers (2D, with its communication)",
            p.attn_fwd_s,
            0,
        ),
        ("loss (head, cross-entropy, all-reduces)", p.loss_s, 0),
        ("backward, all layers (without attention)", p.bwd_s, 0),
        (
            "attention backward, all layers (2D, with its communication)",
            p.attn_bwd_s,
            0,
        ),
        (
            "gradient reduction (and ZeRO all-gather)",
            p.grad_reduce_s,
            4,
        ),
        ("optimizer", p.optimizer_s, 0),
    ]
}

/// Chrome trace-event JSON of every rank's steps, in the simulator's format (one process
/// per rank, one thread per stream, complete events in microseconds from the first step's
/// start).
pub(super) fn chrome_trace(records: &[Vec<StepRecord>], first_index: usize, label: &str) -> Value {
    let t0 = records
        .iter()
        .flatten()
        .map(|r| r.start_unix_s)
        .fold(f64::INFINITY, f64::min);
    let mut ev = Vec::new();
    for (rank, recs) in records.iter().enumerate() {
        ev.push(
            json!({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": format!("rank {rank} {label}")}}),
        );
        for (tid, name) in [(0, "compute"), (4, "grad sync")] {
            ev.push(
                json!({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"name": name}}),
            );
        }
        for (i, r) in recs.iter().enumerate() {
            let start = (r.start_unix_s - t0) * 1e6;
            let end = start + r.stats.step_s * 1e6;
            ev.push(
                json!({"name": format!("step {}", first_index + i), "cat": "step", "ph": "X",
                           "ts": start, "dur": r.stats.step_s * 1e6, "pid": rank, "tid": 0,
                           "args": {"loss": r.stats.loss, "communication_s": r.comm_s}}),
            );
            let mut at = start;
            for (name, dur_s, tid) in phase_list(&r.stats.phases) {
                let dur = (dur_s * 1e6).min(end - at).max(0.0);
                if dur > 0.0 {
                    let cat = if tid == 0 { "compute" } else { "grad sync" };
                    ev.push(
                        json!({"name": name, "cat": cat, "ph": "X", "ts": at, "dur": dur,
                                   "pid": rank, "tid": tid}),
                    );
                }
                at += dur;
            }
        }
    }
    json!({"traceEvents": ev, "displayTimeUnit": "ms"})
}

/// The largest finite value, if any.
pub(super) fn finite_max(v: impl Iterator<Item = f64>) -> Option<f64> {
    let m = v.filter(|x| x.is_finite()).fold(f64::NAN, f64::max);
    m.is_finite().then_some(m)
}

/// The steps a run's figures summarise: all but the first, which includes warm-up (cuDNN
/// graph builds, allocator growth), unless there is only one.
fn tail(recs: &[StepRecord]) -> &[StepRecord] {
    if recs.len() > 1 {
        &recs[1..]
    } else {
        recs
    }
}

fn mean(recs: &[StepRecord], f: &dyn Fn(&StepRecord) -> f64) -> f64 {
    recs.iter().map(f).sum::<f64>() / recs.len().max(1) as f64
}

/// One rank's line of the report's `per_rank`.
fn rank_summary(rank: usize, recs: &[StepRecord]) -> RankSummary {
    let t = tail(recs);
    RankSummary {
        rank,
        step_s: mean(t, &|r| r.stats.step_s),
        communication_s: mean(t, &|r| r.comm_s),
        attention_s: mean(t, &|r| r.stats.attention_s),
        grad_sync_and_optimizer_s: mean(t, &|r| r.stats.grad_sync_s),
        peak_device_memory_used_bytes: finite_max(recs.iter().map(|r| r.mem_used)),
        peak_allocated_bytes: finite_max(recs.iter().map(|r| r.alloc_peak)),
        peak_reserved_bytes: finite_max(recs.iter().map(|r| r.reserved_peak)),
        held_weight_bytes_after_forward: finite_max(recs.iter().map(|r| r.stats.held_weight_bytes)),
    }
}

fn model_summary(cfg: &ModelConfig) -> ModelSummary {
    ModelSummary {
        hidden: cfg.hidden_size,
        layers: cfg.num_layers,
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        ffn: cfg.intermediate_size,
        vocab: cfg.vocab_size,
        params: cfg.num_params(),
    }
}

/// What a run is, as the report states it (rank 0's view; `records` are every rank's).
pub(super) struct RunFacts<'a> {
    pub(super) plan: &'a Plan,
    pub(super) tp: &'a TrainPlan,
    pub(super) cfg: &'a ModelConfig,
    pub(super) launched: &'static str,
    pub(super) records: &'a [Vec<StepRecord>],
    pub(super) first_index: usize,
    pub(super) resume: Option<&'a Manifest>,
    /// The lengths of the trainer's samples (attention FLOPs are counted within each).
    pub(super) samples: &'a [usize],
}

/// Throughput and utilisation of rank 0's steps after the first.
struct Rates {
    step_s: f64,
    devices: f64,
    tokens_per_s: f64,
    mfu: f64,
    hfu: f64,
}

fn rates(f: &RunFacts<'_>, opts: &RunOptions) -> Rates {
    let (tp, cfg) = (f.tp, f.cfg);
    let step_s = mean(tail(&f.records[0]), &|r| r.stats.step_s);
    let devices = if f.launched == "inprocess" {
        1.0
    } else {
        f.plan.world_size as f64
    };
    let dp = f.plan.layout.dp as f64;
    // Attention within each sample (document mask) for packed samples.
    let attn_flops: f64 = f.samples.iter().map(|&l| cfg.attention_flops(l)).sum();
    let flops_per_step =
        dp * 3.0 * (cfg.dense_flops_per_token() * tp.context_tokens as f64 + attn_flops);
    let peak = devices * opts.peak_flops;
    Rates {
        step_s,
        devices,
        tokens_per_s: dp * tp.context_tokens as f64 / step_s,
        mfu: flops_per_step / step_s / peak,
        hfu: hardware_flops(cfg, tp, attn_flops) * dp / step_s / peak,
    }
}

/// The report of a run (rank 0), printed and written as JSON; measured against predicted
/// also goes to stderr.
pub(super) fn report(opts: &RunOptions, extras: &RunExtras, f: &RunFacts<'_>) -> Result<RunReport> {
    let (plan, tp, records) = (f.plan, f.tp, f.records);
    let w = plan.world_size;
    let inprocess = f.launched == "inprocess";
    let dev_for_total = if opts.cpu {
        Device::Cpu
    } else {
        Device::Cuda(0)
    };
    let s0 = &records[0];
    let t0 = tail(s0);
    let r = rates(f, opts);
    let per_gpu_tps = r.tokens_per_s / r.devices;
    let phases = Phases::mean(&t0.iter().map(|r| r.stats.phases).collect::<Vec<_>>());
    let peak = finite_max(records.iter().flatten().map(|r| r.mem_used));
    let last_step = f.first_index + opts.steps;
    let predicted = tp.predicted.as_ref().map(|p| {
        let m = Measured {
            step_s: r.step_s * r.devices / w as f64,
            tokens_per_s_per_gpu: per_gpu_tps,
            mfu: r.mfu,
            hfu: r.hfu,
            memory: peak.map(|p| if inprocess { p / w as f64 } else { p }),
        };
        against_predicted(&m, p, tp, w, extras.progress)
    });
    let trace = match &extras.trace {
        Some(path) => {
            let trace = chrome_trace(records, f.first_index, "(measured)");
            std::fs::write(path, serde_json::to_string(&trace)?)?;
            Some(path.clone())
        }
        None => None,
    };
    Ok(RunReport {
        launch: f.launched.to_string(),
        ranks: w,
        devices: r.devices,
        layout: LayoutSummary {
            ulysses: plan.layout.ulysses,
            ring: plan.layout.ring,
            dp: plan.layout.dp,
        },
        zero_stage: tp.zero_stage,
        recompute: tp.recompute.as_str().into(),
        model: model_summary(f.cfg),
        context_tokens: tp.context_tokens,
        steps: opts.steps,
        first_step_index: f.first_index,
        losses: s0.iter().map(|r| r.stats.loss).collect(),
        first_step_s: s0[0].stats.step_s,
        micro_step_s: r.step_s,
        tokens_per_s: r.tokens_per_s,
        tokens_per_s_per_gpu: per_gpu_tps,
        mfu: r.mfu,
        hfu: r.hfu,
        peak_flops_per_device: opts.peak_flops,
        attention_s_rank0: mean(t0, &|r| r.stats.attention_s),
        grad_sync_and_optimizer_s_rank0: mean(t0, &|r| r.stats.grad_sync_s),
        communication_s_rank0: mean(t0, &|r| r.comm_s),
        communication_note: if inprocess {
            "host time inside collectives, waiting for peers included"
        } else {
            "device time of NCCL groups on the communication streams (events), summed over the rank's communicators"
        }
        .into(),
        phases_rank0: phases,
        per_rank: records
            .iter()
            .enumerate()
            .map(|(r, recs)| rank_summary(r, recs))
            .collect(),
        peak_device_memory_used_bytes: peak,
        memory_note: "device-wide memory in use (total - free) after each step, so it includes the caching allocator's reserve; in-process ranks share one device".into(),
        device_memory_total_bytes: device_memory(dev_for_total).map(|m| m.0),
        peak_allocated_bytes_rank0: finite_max(s0.iter().map(|r| r.alloc_peak)),
        peak_reserved_bytes_rank0: finite_max(s0.iter().map(|r| r.reserved_peak)),
        allocator_note: "the CUDA caching allocator's peaks during a step: allocated = bytes in tensors, reserved = what the allocator holds from the device (allocated + its cache and fragments); in-process ranks share one allocator".into(),
        deterministic: extras.deterministic,
        allocator_conf: extras.knobs.alloc_conf.clone(),
        kernel_profile: kernel_profile(extras, inprocess || w <= 1, last_step - 1)?,
        resumed_from: f.resume.map(|m| CheckpointRef {
            dir: m.dir.clone(),
            step: m.step,
        }),
        checkpoint: extras.save.as_ref().map(|d| CheckpointRef {
            dir: d.clone(),
            step: last_step,
        }),
        predicted,
        trace,
        vision: None,
        weights: None,
        data: None,
        warnings: vec![],
    })
}

/// The kernel profile's summary of the last step (`--kernel-trace`), when it was written:
/// this process's trace (`.rank0` added when several processes wrote one each).
fn kernel_profile(extras: &RunExtras, one_file: bool, step: usize) -> Result<Option<Value>> {
    let Some(p) = &extras.kernel_trace else {
        return Ok(None);
    };
    let path = if one_file {
        p.clone()
    } else {
        let mut s = p.as_os_str().to_owned();
        s.push(".rank0");
        PathBuf::from(s)
    };
    let Ok(text) =
        std::fs::read_to_string(crate::train::kernel_profile::beside(&path, ".summary.json"))
    else {
        return Ok(None);
    };
    let mut v: Value = serde_json::from_str(&text)?;
    v["trace"] = json!(path);
    v["step"] = json!(step);
    Ok(Some(v))
}

/// What a run measured, per rank, in the plan's terms.
struct Measured {
    step_s: f64,
    tokens_per_s_per_gpu: f64,
    mfu: f64,
    hfu: f64,
    /// Peak device memory per rank (None off CUDA).
    memory: Option<f64>,
}

/// The report's `predicted` object (the plan's figures and the measured error against each
/// in percent), printed as a table on stderr with `progress`.
fn against_predicted(
    m: &Measured,
    p: &Predicted,
    tp: &TrainPlan,
    w: usize,
    progress: bool,
) -> AgainstPredicted {
    let pred_micro = p.step_time_s / tp.grad_accum_steps.max(1) as f64;
    let pred_tps_gpu = p.tokens_per_s / w as f64;
    let err = |m: f64, p: f64| 100.0 * (m - p) / p;
    if progress {
        print_against_predicted(m, p, tp, w, pred_micro, pred_tps_gpu);
    }
    AgainstPredicted {
        micro_step_s: pred_micro,
        tokens_per_s_per_gpu: pred_tps_gpu,
        mfu: p.mfu,
        hfu: planned_hfu(p),
        memory_per_gpu_bytes: p.memory_per_gpu_bytes,
        error_pct: ErrorPct {
            micro_step_s: err(m.step_s, pred_micro),
            tokens_per_s_per_gpu: err(m.tokens_per_s_per_gpu, pred_tps_gpu),
            mfu: err(m.mfu, p.mfu),
            hfu: planned_hfu(p).map(|h| err(m.hfu, h)),
            memory: m.memory.map(|x| err(x, p.memory_per_gpu_bytes)),
        },
    }
}

/// The plan's HFU (0 in plans of planners that did not report it: none).
fn planned_hfu(p: &Predicted) -> Option<f64> {
    (p.hfu > 0.0).then_some(p.hfu)
}

/// The measured-against-predicted table on stderr.
fn print_against_predicted(
    m: &Measured,
    p: &Predicted,
    tp: &TrainPlan,
    w: usize,
    pred_micro: f64,
    pred_tps_gpu: f64,
) {
    let err = |m: f64, p: f64| 100.0 * (m - p) / p;
    let gib = |b: f64| b / 1073741824.0;
    eprintln!(
        "measured vs predicted ({w} ranks, {} tokens):",
        tp.context_tokens
    );
    eprintln!(
        "  step per rank   {:>10.4} s   {:>10.4} s   {:+.1}%",
        m.step_s,
        pred_micro,
        err(m.step_s, pred_micro)
    );
    eprintln!(
        "  tokens/s/GPU    {:>10.0}     {:>10.0}     {:+.1}%",
        m.tokens_per_s_per_gpu,
        pred_tps_gpu,
        err(m.tokens_per_s_per_gpu, pred_tps_gpu)
    );
    let pct = |name: &str, a: f64, b: f64| {
        eprintln!(
            "  {name:<15} {:>10.1}%    {:>10.1}%    {:+.1}%",
            100.0 * a,
            100.0 * b,
            err(a, b)
        );
    };
    pct("MFU", m.mfu, p.mfu);
    if let Some(h) = planned_hfu(p) {
        pct("HFU", m.hfu, h);
    }
    if let Some(mem) = m.memory {
        eprintln!(
            "  memory per GPU  {:>10.1} GiB {:>10.1} GiB {:+.1}%",
            gib(mem),
            gib(p.memory_per_gpu_bytes),
            err(mem, p.memory_per_gpu_bytes)
        );
    }
}

/// Mean of one vision phase (index into `StepRecord::vision`) over the steps after the first.
fn vision_times(recs: &[StepRecord]) -> VisionTimes {
    let t = tail(recs);
    let m = |k: usize| t.iter().map(|r| r.vision[k]).sum::<f64>() / t.len().max(1) as f64;
    VisionTimes {
        encode_s: m(0),
        reshard_s: m(1),
        reshard_backward_s: m(2),
        encoder_backward_s: m(3),
        encoder_optimizer_s: m(4),
    }
}

/// The slowest rank's time of each vision phase.
fn slowest(records: &[Vec<StepRecord>]) -> VisionTimes {
    records
        .iter()
        .map(|r| vision_times(r))
        .fold(VisionTimes::default(), |a, b| VisionTimes {
            encode_s: a.encode_s.max(b.encode_s),
            reshard_s: a.reshard_s.max(b.reshard_s),
            reshard_backward_s: a.reshard_backward_s.max(b.reshard_backward_s),
            encoder_backward_s: a.encoder_backward_s.max(b.encoder_backward_s),
            encoder_optimizer_s: a.encoder_optimizer_s.max(b.encoder_optimizer_s),
        })
}

/// Whether the runtime's stage-2 shards are the plan's: the plan's ranges cover its samples;
/// the runtime's add the padding's (after them).
fn plan_ranges_match(vr: &VisionRun, tp: &TrainPlan) -> Option<bool> {
    let packed: usize = vr.section.sample_lens.iter().sum();
    let planned = &tp.ranges_per_rank;
    Some(
        planned.len() >= vr.ranges.len()
            && vr.ranges.iter().zip(planned).all(|(a, b)| {
                let ours: Vec<(usize, usize)> =
                    a.iter().copied().filter(|r| r.0 < packed).collect();
                ours == *b
            }),
    )
}

/// The report's `vision` object: the stage's measured times (mean over the steps after the
/// first; rank 0 and the slowest rank) next to the plan's predicted ones, the layout run,
/// and the MFU counting the encoder's FLOPs too.
pub(super) fn vision_report(
    report: &RunReport,
    vr: &VisionRun,
    f: &RunFacts<'_>,
    opts: &RunOptions,
) -> VisionReport {
    let (tp, cfg) = (f.tp, f.cfg);
    let v = &vr.section;
    let slow = slowest(f.records);
    let train = v.train_vision;
    let frames_flops = v.frames as f64 * vr.cfg.flops_per_frame() * if train { 3.0 } else { 1.0 };
    let dp = f.plan.layout.dp as f64;
    let attn_flops: f64 = vr.sample_lens.iter().map(|&l| cfg.attention_flops(l)).sum();
    let dec_flops = 3.0 * (cfg.dense_flops_per_token() * tp.context_tokens as f64 + attn_flops);
    let mfu_all =
        dp * (dec_flops + frames_flops) / report.micro_step_s / (report.devices * opts.peak_flops);
    let err = |m: f64, p: f64| (p > 0.0).then(|| 100.0 * (m - p) / p);
    let predicted = v.stage.as_ref().map(|p| VisionPredicted {
        encoder_s: p.encoder_s,
        reshard_s: p.reshard_s,
        gather_s: p.gather_s,
        error_pct: VisionErrorPct {
            encoder_s: err(slow.encode_s + slow.encoder_backward_s, p.encoder_s),
            reshard_s: err(slow.reshard_s, p.reshard_s),
            gather_s: err(slow.reshard_backward_s, p.gather_s),
        },
    });
    VisionReport {
        encoder: v.encoder.clone(),
        encoder_config: EncoderSummary {
            hidden: vr.cfg.hidden_size,
            layers: vr.cfg.num_layers,
            heads: vr.cfg.num_heads,
            image_size: vr.cfg.image_size,
            patch_size: vr.cfg.patch_size,
            pooling: format!("{:?}", vr.cfg.pooling).to_lowercase(),
            params: vr.cfg.num_params(),
        },
        tokens_per_frame: v.tokens_per_frame,
        frames: v.frames,
        samples: v.samples,
        padding_tokens: vr.padding,
        train_vision: train,
        frames_per_rank: v.frames_per_rank.iter().map(Vec::len).collect(),
        loss: "next-token cross-entropy where the target is a text token of the same sample; \
               -100 where it is a vision token, across samples and on the padding"
            .into(),
        stage2: Stage2Summary {
            ranges: "per-sample zigzag (each sample, and the padding, sharded on its own; \
                     attention within samples only, RoPE positions restarting per sample)"
                .into(),
            sample_lens: vr.sample_lens.clone(),
            plan_ranges_match: plan_ranges_match(vr, tp),
        },
        measured_rank0: vision_times(&f.records[0]),
        measured_slowest_rank: slow,
        mfu_with_encoder: mfu_all,
        note: "seconds, mean over the steps after the first, device-synchronised around each \
               phase; encode_s = encoder + projector forward, reshard_s = the stage-1 -> \
               stage-2 all-to-all, reshard_backward_s = its reverse (gradients), \
               encoder_backward_s = encoder + projector backward"
            .into(),
        predicted,
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn a_record_travels_as_its_fields_and_comes_back_whole() {
        let mut r = StepRecord::default();
        for (i, f) in r.fields_mut().into_iter().enumerate() {
            *f = 1.5 + i as f64;
        }
        let v = r.to_vec();
        assert_eq!(StepRecord::from_slice(&v).to_vec(), v);
        assert_eq!(r.stats.held_weight_bytes, 1.5 + (REC_LEN - 1) as f64);
        assert_eq!(r.vision[4], 1.5 + 20.0);
        // Every field is distinct: no two positions alias one field.
        let mut seen: Vec<f64> = v.to_vec();
        seen.dedup();
        assert_eq!(seen.len(), REC_LEN);
    }
}
