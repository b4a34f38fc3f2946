//! `mmsp-runtime run`: train a plan for N steps and report measured step time, tokens/s, MFU,
//! peak memory per rank and time in communication next to the plan's prediction (JSON, a
//! per-step progress line on stderr, and optionally a Chrome trace of every rank's step
//! phases in the simulator's format).
//!
//! Launch: with `--inprocess N` the ranks are threads on one device. Otherwise each process
//! is one rank over NCCL, as torchrun or SLURM start them (RANK/WORLD_SIZE/LOCAL_RANK or
//! SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and MASTER_ADDR/MASTER_PORT); and when none of
//! these is set, [`spawn_local`] starts one such process per local GPU itself (the same code
//! path), forwards their output and fails if any of them fails.
//!
//! Faults: a rank that fails makes every other rank end with an error naming it, within a
//! bounded time (see `comm`); `MMSP_FAULT_INJECT=rank:step[:exit|panic|error|hang]` makes
//! one rank fail before the given step, for tests. Checkpoints: see [`super::checkpoint`].
//!
//! Vision (MM-SP stage 1, issue 7): a plan with a `vision` section trains a VLM step per
//! step (see [`crate::vision::plan`] for the layout). Each rank encodes its frames of the
//! plan's `vision.frames_per_rank` (synthetic pixels, a fixed function of (step, frame)),
//! re-shards the embeddings into the trainer's shards over the world communicator (SP ranks
//! mapped to world ranks, so DP replicas exchange in the same all-to-all), merges
//! them with the text rows' embeddings from the decoder's table, runs
//! [`Trainer::step_embeddings_text`] (the text rows' gradient reaches the table before the
//! decoder's optimizer), sends the vision rows' gradient back and updates the encoder with
//! its own AdamW (replicated state, gradients summed over the world and divided by dp) unless
//! the plan freezes it. Stage 2 is the plan's per-sample layout: the trainer is built with
//! the plan's `vision.sample_lens` (and the padding up to `context_tokens` as one more
//! sample), each sample zigzag-sharded on its own as in `tokens.ranges_per_rank`, attention
//! within each sample only and RoPE positions restarting in each ([`crate::packed`]). Loss:
//! only where the next token is a text token of the same sample (labels -100 where the
//! target is a vision token, across samples, and on the padding).
use super::adamw::{AdamW, AdamWConfig};
use super::checkpoint::{self, Manifest};
use super::session::{save_hf, Inputs, LrSchedule, Metrics, SaveHf};
use super::{Groups, Phases, StepStats, TrainConfig, Trainer};
use crate::comm::local::{local_groups, LocalComm};
use crate::comm::nccl::{LaunchEnv, NcclWorld};
use crate::comm::{comm_timeout, Communicator};
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::model::hf::HfCheckpoint;
use crate::model::ModelConfig;
use crate::plan::{GroupKind, Layout, Plan};
use crate::vision::{EncoderSource, VisionEncoder, VisionRun, VisionSection, VisionStage};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
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
    /// MM-SP stages (plans made with `--frames` or `--samples`).
    pub vision: Option<VisionSection>,
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
    /// Absent from plans written before HFU was reported.
    #[serde(default)]
    pub hfu: Option<f64>,
    pub memory_per_gpu_bytes: f64,
}

impl TrainPlan {
    /// Whether the plan recomputes each layer's forward outside attention in its backward
    /// (`recompute` other than "none"; checked to be a known value by [`load`]).
    pub fn recomputes(&self) -> bool {
        self.recompute != "none"
    }
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
    /// A Hugging Face config.json alone: its shapes and numerics, random weights.
    HfConfig(PathBuf),
    /// A Hugging Face model directory: config.json and its safetensors weights.
    HfDir(PathBuf),
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

/// Checkpointing, tracing and progress options of a run (apart from [`RunOptions`], whose
/// callers build it field by field).
#[derive(Debug, Clone)]
pub struct RunExtras {
    /// Write a checkpoint into this directory at the end (and every `save_every` steps).
    pub save: Option<PathBuf>,
    /// 0: only at the end.
    pub save_every: usize,
    /// Resume from this checkpoint directory (its step count is the first step's index).
    pub resume: Option<PathBuf>,
    /// Write a Chrome trace-event JSON of every rank's steps here.
    pub trace: Option<PathBuf>,
    /// A progress line per step on stderr (rank 0).
    pub progress: bool,
    /// Profile the last step's device activities with libtorch's Kineto profiler: the Chrome
    /// trace goes here (one file per process, `.rankN` added when several), its activity
    /// list beside it (`.kernels.tsv`) and a summary into the report (`kernel_profile`).
    pub kernel_trace: Option<PathBuf>,
    /// Bitwise-reproducible run: ATen's deterministic algorithms and cuDNN's deterministic
    /// mode on (an op without a deterministic implementation is then an error), and the
    /// FlashAttention-2 kernel on CUDA (cuDNN's attention is refused).
    pub deterministic: bool,
    /// Attention kernel (default: cuDNN on CUDA, flash when deterministic, the ATen CPU
    /// kernel on the CPU).
    pub attn_backend: Option<Backend>,
    /// Training data (module [`super::data`]); None: synthetic token ids.
    pub data: Option<PathBuf>,
    /// Seed of the data order (0: file order).
    pub data_seed: u64,
    /// Learning rate by step (None: `RunOptions::lr`, constant).
    pub schedule: Option<LrSchedule>,
    /// Clip gradients to this global norm (0: off).
    pub max_grad_norm: f64,
    /// Append one JSON line of metrics per step here.
    pub metrics: Option<PathBuf>,
    /// Write Hugging Face checkpoints (at the end, and every `save_every` steps when set).
    pub save_hf: Option<SaveHf>,
}

impl Default for RunExtras {
    fn default() -> Self {
        RunExtras {
            save: None,
            save_every: 0,
            resume: None,
            trace: None,
            progress: true,
            kernel_trace: None,
            deterministic: false,
            attn_backend: None,
            data: None,
            data_seed: 0,
            schedule: None,
            max_grad_norm: 0.0,
            metrics: None,
            save_hf: None,
        }
    }
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
    if tp.zero_stage > 3 {
        return Err(RuntimeError::Plan(format!(
            "ZeRO stage {} is not implemented",
            tp.zero_stage
        )));
    }
    let cfg = match &opts.model {
        ModelSource::Tiny => ModelConfig::tiny(),
        ModelSource::HfConfig(p) => ModelConfig::from_hf_file(p)?,
        ModelSource::HfDir(d) => HfCheckpoint::open(d)?.cfg,
        ModelSource::Plan => ModelConfig::from_plan_value(tp.model.as_ref().ok_or_else(|| {
            RuntimeError::Plan("no model in the plan (use --model or --tiny)".into())
        })?)?,
    };
    let l = plan.layout;
    let zz = crate::shard::Zigzag::new(tp.context_tokens, l.ulysses, l.ring)?;
    // A vision plan's ranges are the planner's per-sample zigzag, which `run` executes
    // (`VisionSection::resolve` checks the samples; the report's `vision.stage2` says whether
    // the plan's ranges are the ones run).
    if let (Some(t), None) = (&tp.tokens, &tp.vision) {
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

/// Vision options of a run (apart from [`RunOptions`], whose callers build it field by
/// field).
#[derive(Debug, Clone, Default)]
pub struct VisionOptions {
    /// A Hugging Face vision config.json for the encoder (default: the plan's preset, or the
    /// tiny encoder with `--tiny`).
    pub config: Option<PathBuf>,
}

/// The plan's vision section, resolved and checked (None without one).
pub fn load_vision(
    opts: &RunOptions,
    vopts: &VisionOptions,
    plan: &Plan,
    tp: &TrainPlan,
    cfg: &ModelConfig,
) -> Result<Option<VisionRun>> {
    let Some(v) = &tp.vision else {
        if vopts.config.is_some() {
            return Err(RuntimeError::Plan(
                "--vision-config given but the plan has no vision section".into(),
            ));
        }
        return Ok(None);
    };
    let source = match (&vopts.config, &opts.model) {
        // A vision model directory: its config.json (its weights are loaded by the ranks).
        (Some(p), _) if p.is_dir() => EncoderSource::HfConfig(p.join("config.json")),
        (Some(p), _) => EncoderSource::HfConfig(p.clone()),
        (None, ModelSource::Tiny) => EncoderSource::Tiny,
        (None, _) => EncoderSource::Preset,
    };
    let l = plan.layout;
    v.resolve(
        &source,
        cfg.hidden_size,
        tp.context_tokens,
        l.ulysses,
        l.ring,
    )
    .map(Some)
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

/// Token ids as [`synthetic`], labels only where [`VisionRun::text_target`] says.
fn synthetic_vlm(step: usize, vr: &VisionRun, vocab: usize, dev: Device) -> (Tensor, Tensor) {
    let seq = vr.text_target.len();
    let ids: Vec<i64> = (0..seq as i64)
        .map(|i| (i * 7 + (step as i64) * 13 + (i * i) % 5) % vocab as i64)
        .collect();
    let labels: Vec<i64> = (0..seq)
        .map(|p| if vr.text_target[p] { ids[p + 1] } else { -100 })
        .collect();
    let s = seq as i64;
    (
        Tensor::from_slice(&ids).view([1, s]).to(dev),
        Tensor::from_slice(&labels).view([1, s]).to(dev),
    )
}

/// Pixels of the global `frames` at `step`: (F, C, H, W) float32, each a fixed function of
/// (step, frame), so every layout encodes the same frames.
fn synthetic_frames(
    step: usize,
    frames: &[usize],
    v: &crate::vision::VisionConfig,
    dev: Device,
) -> Tensor {
    let (c, s) = (v.num_channels as i64, v.image_size as i64);
    if frames.is_empty() {
        return Tensor::zeros([0, c, s, s], (Kind::Float, dev));
    }
    let base = (Tensor::arange(c * s * s, (Kind::Float, dev)) * 0.7311).view([1, -1]);
    let off: Vec<f32> = frames
        .iter()
        .map(|&f| (f as f64 * 1.37 + step as f64 * 0.113) as f32)
        .collect();
    let off = Tensor::from_slice(&off).to(dev).view([-1, 1]);
    ((base + off).sin() * 0.8).view([-1, c, s, s])
}

fn shard(t: &Tensor, ranges: &[(usize, usize)]) -> Tensor {
    let parts: Vec<Tensor> = ranges
        .iter()
        .map(|&(a, b)| t.narrow(1, a as i64, (b - a) as i64))
        .collect();
    Tensor::cat(&parts, 1)
}

/// The error for a rank whose thread panicked: libtorch's out-of-memory (raised as a panic
/// by tch's infallible calls) becomes [`RuntimeError::OutOfMemory`] with its first line; any
/// other panic is reported with its message.
fn panic_to_error(rank: usize, payload: &(dyn std::any::Any + Send)) -> RuntimeError {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    let first = msg.lines().next().unwrap_or_default();
    if msg.contains("out of memory") {
        let detail = first
            .find("CUDA out of memory")
            .map_or(first, |i| &first[i..]);
        RuntimeError::OutOfMemory(format!("rank {rank}: {detail}"))
    } else {
        RuntimeError::Comm(format!("rank {rank} panicked: {first}"))
    }
}

/// `MMSP_SKIP_MEMORY_CHECK=1` runs a plan whose predicted memory exceeds the GPU's (to
/// measure where it really runs out, against the planner's prediction).
fn memory_check_skipped() -> bool {
    std::env::var("MMSP_SKIP_MEMORY_CHECK").is_ok_and(|v| v == "1")
}

/// A fault to inject (`MMSP_FAULT_INJECT=rank:step[:mode]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// The process exits at once with code 3 (NCCL ranks); an error for in-process ranks.
    Exit,
    Panic,
    Error,
    /// The rank stops calling collectives: it sleeps until the fault reaches it (NCCL) or
    /// for the collective timeout plus 2 s (in-process), then fails.
    Hang,
}

/// Reads `MMSP_FAULT_INJECT`: (rank, step, mode).
pub fn fault_injection() -> Result<Option<(usize, usize, FaultMode)>> {
    let Ok(v) = std::env::var("MMSP_FAULT_INJECT") else {
        return Ok(None);
    };
    let bad = || {
        RuntimeError::Launch(format!(
            "MMSP_FAULT_INJECT={v:?}: want rank:step[:exit|panic|error|hang]"
        ))
    };
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err(bad());
    }
    let rank = parts[0].parse().map_err(|_| bad())?;
    let step = parts[1].parse().map_err(|_| bad())?;
    let mode = match parts.get(2).copied().unwrap_or("exit") {
        "exit" => FaultMode::Exit,
        "panic" => FaultMode::Panic,
        "error" => FaultMode::Error,
        "hang" => FaultMode::Hang,
        _ => return Err(bad()),
    };
    Ok(Some((rank, step, mode)))
}

/// What one rank measured in one step.
#[derive(Debug, Clone, Copy, Default)]
struct StepRecord {
    /// Wall-clock start, seconds since the Unix epoch.
    start_unix_s: f64,
    stats: StepStats,
    /// Time in this rank's collectives during the step (see `Communicator::comm_time_s`).
    comm_s: f64,
    /// Device memory in use after the step (device-wide), if known.
    mem_used: f64,
    /// The caching allocator's peak allocated (tensors) and reserved bytes during the step
    /// (CUDA; NaN elsewhere).
    alloc_peak: f64,
    reserved_peak: f64,
    /// Vision stage (0 without one): encoder forward, re-shard, reverse exchange, encoder
    /// backward, encoder optimizer (seconds, device-synchronised on CUDA).
    vision: [f64; 5],
}

/// Fields of a [`StepRecord`] as gathered between processes.
const REC_LEN: usize = 24;

impl StepRecord {
    fn to_vec(self) -> [f64; REC_LEN] {
        let (s, p) = (self.stats, self.stats.phases);
        [
            self.start_unix_s,
            s.loss,
            s.step_s,
            s.attention_s,
            s.grad_sync_s,
            self.comm_s,
            self.mem_used,
            p.cast_s,
            p.embed_s,
            p.fwd_s,
            p.attn_fwd_s,
            p.loss_s,
            p.bwd_s,
            p.attn_bwd_s,
            p.grad_reduce_s,
            p.optimizer_s,
            self.vision[0],
            self.vision[1],
            self.vision[2],
            self.vision[3],
            self.vision[4],
            self.alloc_peak,
            self.reserved_peak,
            s.held_weight_bytes,
        ]
    }
}

/// Everything a rank's loop needs besides its communicators.
struct LoopCtx<'a> {
    tp: &'a TrainPlan,
    cfg: &'a ModelConfig,
    dev: Device,
    opts: &'a RunOptions,
    extras: &'a RunExtras,
    resume: Option<&'a Manifest>,
    identity: &'a Value,
    inject: Option<(usize, usize, FaultMode)>,
    in_process: bool,
    layout: Layout,
    vision: Option<&'a VisionRun>,
    inputs: &'a Inputs,
}

/// The attention kernel of a run: the one asked for, else FlashAttention-2 in a deterministic
/// run on CUDA (its backward is bitwise reproducible under ATen's deterministic mode; cuDNN's
/// is not, measured: `runtime/bench/runE.sh`), else the device's default.
fn attention_backend(extras: &RunExtras, dev: Device) -> Backend {
    match (extras.attn_backend, extras.deterministic, dev) {
        (Some(b), _, _) => b,
        (None, true, Device::Cuda(_)) => Backend::Flash,
        (None, _, _) => Backend::default_for(dev),
    }
}

/// Turns on bitwise-reproducible execution for this process: cuBLAS's fixed workspace
/// (`CUBLAS_WORKSPACE_CONFIG=:4096:8` unless set, read when cuBLAS first starts, which is
/// later than this), ATen's deterministic algorithms and cuDNN's deterministic mode.
fn deterministic_mode() -> Result<()> {
    if std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
        std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
    }
    crate::ffi::set_deterministic(true)
}

/// This process's kernel-trace file: `path` itself, or `path.rankN` when a run of several
/// processes writes one each.
fn kernel_trace_path(path: &Path, rank: usize, cx: &LoopCtx<'_>) -> PathBuf {
    if cx.in_process || cx.layout.world_size() <= 1 {
        path.to_path_buf()
    } else {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".rank{rank}"));
        PathBuf::from(s)
    }
}

/// The activity list and summary written beside a kernel trace.
fn kernel_trace_side(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

/// Stops the profiler of a profiled step: trace, activity list and summary files.
fn finish_kernel_trace(path: &Path) -> Result<()> {
    let tsv = kernel_trace_side(path, ".kernels.tsv");
    crate::ffi::kernel_profile_stop(Some(path), &tsv)?;
    let summary = crate::train::kernel_profile::summarize_file(&tsv, 25)?;
    std::fs::write(
        kernel_trace_side(path, ".summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(())
}

/// A context past the checkpoint's `max_position_embeddings` (with its rope scaling, the
/// context it was made for): trained as asked (context extension), said once.
fn context_warning(cfg: &ModelConfig, context: usize) -> Option<String> {
    let m = cfg.max_position_embeddings?;
    (context > m).then(|| {
        format!(
            "the plan's context of {context} tokens is past the model's max_position_embeddings \
             {m}: positions past {m} are new to it (raise rope_theta or add a rope_scaling to \
             extend it)"
        )
    })
}

fn finite_or_null(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Model FLOPs utilisation of one step (as the report counts it: 3 x the forward with causal
/// attention, over the devices the run uses).
fn step_mfu(cx: &LoopCtx<'_>, step_s: f64) -> f64 {
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

fn now_unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One rank's loop: returns its per-step records; rank 0 prints progress.
fn rank_loop(rank: usize, groups: Groups<'_>, cx: &LoopCtx<'_>) -> Result<Vec<StepRecord>> {
    let (tp, cfg, dev, opts) = (cx.tp, cx.cfg, cx.dev, cx.opts);
    let (master, compute) = if opts.cpu {
        (Kind::Float, Kind::Float)
    } else {
        (Kind::Float, Kind::BFloat16)
    };
    let comms = [groups.ulysses, groups.ring, groups.grad];
    let comm_now = || comms.iter().map(|c| c.comm_time_s()).sum::<f64>();
    let grad = groups.grad;
    let model = cx.inputs.decoder(cfg, dev, master, compute)?;
    let schedule = cx.extras.schedule.unwrap_or(LrSchedule::constant(opts.lr));
    let tc = TrainConfig {
        optimizer: AdamWConfig {
            lr: schedule.at(0),
            max_grad_norm: cx.extras.max_grad_norm,
            ..AdamWConfig::default()
        },
        zero_stage: tp.zero_stage,
        recompute: tp.recomputes(),
        backend: attention_backend(cx.extras, dev),
        // Phase times need a device synchronisation around each phase; MMSP_PROFILE=0 runs
        // the step without them (no phase breakdown, no sync bubbles).
        profile: std::env::var("MMSP_PROFILE").map_or(true, |v| v != "0"),
    };
    let mut t = match cx.vision {
        Some(vr) => Trainer::new_packed(model, groups, &vr.sample_lens, tc)?,
        None => Trainer::new(model, groups, tp.context_tokens, tc)?,
    };
    let mut vis = match cx.vision {
        Some(vr) => Some(VisionRank::new(vr, rank, cx, &t, grad, master, compute)?),
        None => None,
    };
    let first = match cx.resume {
        Some(m) => {
            checkpoint::load(&mut t, m)?;
            m.step
        }
        None => 0,
    };
    let mut losses: Vec<f64> = cx.resume.map(|m| m.losses.clone()).unwrap_or_default();
    t.optimizer_mut()
        .set_measure_norm(cx.extras.metrics.is_some());
    let mut metrics = match (&cx.extras.metrics, rank) {
        (Some(p), 0) => Some(Metrics::open(p)?),
        _ => None,
    };
    let started = Instant::now();
    let mut out = vec![];
    for i in 0..opts.steps {
        let step = first + i;
        if let Some((r, s, mode)) = cx.inject {
            if r == rank && s == step {
                inject(rank, step, mode, cx, grad)?;
            }
        }
        let rg = t.local_ranges();
        t.optimizer_mut().set_lr(schedule.at(step));
        if let Device::Cuda(d) = dev {
            crate::ffi::alloc_reset_peak(d)?;
        }
        let profiled = match &cx.extras.kernel_trace {
            Some(p) if dev.is_cuda() && i + 1 == opts.steps && (rank == 0 || !cx.in_process) => {
                if let Device::Cuda(d) = dev {
                    tch::Cuda::synchronize(d as i64);
                }
                crate::ffi::kernel_profile_start()?;
                Some(kernel_trace_path(p, rank, cx))
            }
            _ => None,
        };
        let c0 = comm_now();
        let start_unix_s = now_unix_s();
        let (st, vision) = match (&mut vis, cx.vision) {
            (Some(v), Some(vr)) => v.step(step, vr, &mut t, grad, cx)?,
            _ => {
                let (ids, labels) = match &cx.inputs.data {
                    Some(d) => {
                        let dp_rank = cx.layout.coords(rank).dp;
                        let smp = d.sample(step, dp_rank, cx.layout.dp)?;
                        let s = smp.ids.len() as i64;
                        (
                            Tensor::from_slice(&smp.ids).view([1, s]).to(dev),
                            Tensor::from_slice(&smp.labels).view([1, s]).to(dev),
                        )
                    }
                    None => synthetic(step, tp.context_tokens, cfg.vocab_size, dev),
                };
                (t.step(&shard(&ids, &rg), &shard(&labels, &rg))?, [0.0; 5])
            }
        };
        if let Some(e) = grad.peer_failure() {
            return Err(e);
        }
        if let Some(path) = &profiled {
            finish_kernel_trace(path)?;
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
        let tokens_per_s = (cx.layout.dp * tp.context_tokens) as f64 / st.step_s;
        if rank == 0 && cx.extras.progress {
            let eta =
                (opts.steps - i - 1) as f64 * (started.elapsed().as_secs_f64() / (i + 1) as f64);
            eprintln!(
                "step {}/{} (index {step}): loss {:.6}  step {:.3} s  {:.0} tokens/s  attention {:.3} s  \
                 grad sync + optimizer {:.3} s  communication {:.3} s  ETA {:.0} s",
                i + 1,
                opts.steps,
                st.loss,
                st.step_s,
                tokens_per_s,
                st.attention_s,
                st.grad_sync_s,
                rec.comm_s,
                eta
            );
        }
        if let Some(m) = &mut metrics {
            m.write(&json!({
                "step": step + 1, "loss": st.loss, "lr": schedule.at(step),
                "grad_norm": finite_or_null(t.optimizer().last_grad_norm()),
                "step_s": st.step_s, "tokens_per_s": tokens_per_s,
                "mfu": step_mfu(cx, st.step_s), "peak_allocated_bytes": finite_or_null(rec.alloc_peak),
                "unix_s": start_unix_s,
            }))?;
        }
        out.push(rec);
        if let Some(sh) = &cx.extras.save_hf {
            let every = cx.extras.save_every;
            if i + 1 == opts.steps || (every > 0 && (step + 1) % every == 0) {
                let files = save_hf(&t, cx.inputs, sh, opts.cpu, rank == 0)?;
                if rank == 0 && cx.extras.progress {
                    eprintln!(
                        "Hugging Face checkpoint after step index {step}: {} files in {}",
                        files.len(),
                        sh.dir.display()
                    );
                }
            }
        }
        if let Some(dir) = &cx.extras.save {
            let every = cx.extras.save_every;
            if i + 1 == opts.steps || (every > 0 && (step + 1) % every == 0) {
                checkpoint::save_shard(&t, dir)?;
                grad.barrier()?;
                if rank == 0 {
                    checkpoint::write_manifest(&t, dir, cx.identity, step + 1, &losses)?;
                    if cx.extras.progress {
                        eprintln!(
                            "checkpoint after step index {step} written to {}",
                            dir.display()
                        );
                    }
                }
            }
        }
    }
    Ok(out)
}

/// One rank's vision stage in a run: the encoder with its re-shard, its optimizer, and the
/// index tensors of this rank's text rows.
struct VisionRank {
    stage: VisionStage,
    opt: Option<AdamW>,
    /// Local rows of the text tokens (n,) int64.
    text_rows: Tensor,
    /// This rank's DP index (which data samples it takes).
    dp_rank: usize,
}

impl VisionRank {
    fn new(
        vr: &VisionRun,
        rank: usize,
        cx: &LoopCtx<'_>,
        t: &Trainer<'_>,
        world: &dyn Communicator,
        master: Kind,
        compute: Kind,
    ) -> Result<VisionRank> {
        let l = cx.layout;
        let sp = l.sp_rank(rank);
        let rg = t.local_ranges();
        if rg != vr.ranges[sp] {
            return Err(RuntimeError::Layout(format!(
                "the trainer's shard {rg:?} is not SP rank {sp}'s per-sample zigzag ranges {:?}",
                vr.ranges[sp]
            )));
        }
        let enc = match cx.inputs.vision_weights.as_slice() {
            [] => VisionEncoder::random(vr.cfg.clone(), cx.dev, master, compute, 23)?,
            files => {
                let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
                let (cfg, dev) = (vr.cfg.clone(), cx.dev);
                VisionEncoder::load_safetensors(cfg, &files, dev, master, compute, 23)?.0
            }
        };
        let comm_ranks = crate::vision::world_ranks_of_sp(&l, l.coords(rank).dp);
        let train = vr.section.train_vision;
        let stage = VisionStage::new(
            enc,
            &vr.layout,
            Some(&vr.section.frames_per_rank),
            &vr.ranges,
            sp,
            &comm_ranks,
            world.size(),
            train,
        )?;
        let opt = if train {
            let ps: Vec<Tensor> = stage.encoder.parameters();
            let cfg = AdamWConfig {
                lr: cx.opts.lr,
                ..AdamWConfig::default()
            };
            Some(AdamW::new(&ps, cfg)?)
        } else {
            None
        };
        let rows: Vec<i64> = stage
            .reshard
            .text_rows()
            .iter()
            .map(|&r| r as i64)
            .collect();
        Ok(VisionRank {
            stage,
            opt,
            text_rows: Tensor::from_slice(&rows).to(cx.dev),
            dp_rank: l.coords(rank).dp,
        })
    }

    /// One VLM step: the decoder's stats (step_s = the whole step) and the vision times.
    fn step(
        &mut self,
        step: usize,
        vr: &VisionRun,
        t: &mut Trainer<'_>,
        world: &dyn Communicator,
        cx: &LoopCtx<'_>,
    ) -> Result<(StepStats, [f64; 5])> {
        let dev = cx.dev;
        let syncf = || {
            if let Device::Cuda(i) = dev {
                tch::Cuda::synchronize(i as i64);
            }
        };
        let h = t.model.cfg.hidden_size as i64;
        let dp = cx.layout.dp;
        let (ids, labels, frames) = match &cx.inputs.video {
            Some(v) => {
                let (ids, labels) = v.text(step, self.dp_rank, dp, &vr.text_target, dev);
                let px = v.frames(step, self.dp_rank, dp, &self.stage.frames, dev)?;
                (ids, labels, px)
            }
            None => {
                let (ids, labels) = synthetic_vlm(step, vr, t.model.cfg.vocab_size, dev);
                (
                    ids,
                    labels,
                    synthetic_frames(step, &self.stage.frames, &vr.cfg, dev),
                )
            }
        };
        let rg = t.local_ranges();
        let (ids, labels) = (shard(&ids, &rg), shard(&labels, &rg));
        syncf();
        let t0 = Instant::now();
        let (ctx, encode_s, reshard_s) = self.stage.forward_timed(world, &frames, &syncf)?;
        let text_ids = ids.view([-1]).index_select(0, &self.text_rows);
        let text = t.embed_ids(&text_ids.view([1, -1]))?;
        let emb = self.stage.merge(&ctx, &text.view([-1, h]))?.unsqueeze(0);
        let (mut st, g) =
            t.step_embeddings_text(&emb, &labels, Some((&self.text_rows, &text_ids)))?;
        let (_, back_s, enc_bwd_s) = self.stage.backward_local_timed(world, ctx, &g, &syncf)?;
        let t1 = Instant::now();
        if let Some(opt) = &mut self.opt {
            opt.step(world, 1.0 / cx.layout.dp as f64)?;
        }
        syncf();
        let opt_s = t1.elapsed().as_secs_f64();
        st.step_s = t0.elapsed().as_secs_f64();
        Ok((st, [encode_s, reshard_s, back_s, enc_bwd_s, opt_s]))
    }
}

/// Carries out an injected fault on this rank.
fn inject(
    rank: usize,
    step: usize,
    mode: FaultMode,
    cx: &LoopCtx<'_>,
    world: &dyn Communicator,
) -> Result<()> {
    let what = format!("injected fault (MMSP_FAULT_INJECT): rank {rank} at step {step}");
    match mode {
        FaultMode::Exit if !cx.in_process => {
            eprintln!("{what}: exiting with code 3");
            std::process::exit(3);
        }
        FaultMode::Exit | FaultMode::Error => Err(RuntimeError::Comm(what)),
        FaultMode::Panic => panic!("{what}"),
        FaultMode::Hang => {
            eprintln!("{what}: no longer calling collectives");
            let t0 = Instant::now();
            let limit = comm_timeout() + Duration::from_secs(2);
            loop {
                std::thread::sleep(Duration::from_millis(200));
                if let Some(e) = world.peer_failure() {
                    return Err(e);
                }
                if cx.in_process && t0.elapsed() > limit {
                    return Err(RuntimeError::Comm(format!("{what}: hung for {limit:?}")));
                }
            }
        }
    }
}

/// The error to report when several ranks failed: a rank's own failure rather than the
/// peers' reports of it.
fn root_cause(errs: Vec<RuntimeError>) -> RuntimeError {
    let rank = |e: &RuntimeError| match e {
        RuntimeError::PeerGone(_) => 2,
        RuntimeError::Timeout(..) => 1,
        _ => 0,
    };
    let mut errs = errs;
    errs.sort_by_key(rank);
    errs.into_iter()
        .next()
        .unwrap_or_else(|| RuntimeError::Comm("no rank reported".into()))
}

/// Number of CUDA devices libtorch sees (0 without CUDA).
pub fn local_gpus() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// Whether `run` must start its own ranks: neither `--inprocess` nor a launcher's
/// environment (torchrun's RANK, SLURM's SLURM_PROCID).
pub fn should_spawn(opts: &RunOptions) -> bool {
    opts.inprocess.is_none() && !LaunchEnv::present()
}

/// Starts one process per local GPU, each this binary with `args` and RANK, WORLD_SIZE,
/// LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT set; their output goes to this
/// process's stdout/stderr. Refuses (exit 2) a plan whose world size is not the number of
/// GPUs found, before starting anything. When a child fails, the others are given
/// `grace` to end on their own (they see the failure through the rendezvous) and are then
/// killed; the error names the first rank that failed.
pub fn spawn_local(opts: &RunOptions, args: &[std::ffi::OsString], grace: Duration) -> Result<()> {
    let (plan, _, _) = load(opts)?;
    let gpus = local_gpus();
    let w = plan.world_size;
    if gpus != w {
        return Err(RuntimeError::Launch(format!(
            "the plan is for {w} ranks (one process per GPU) but {gpus} GPUs were found here; \
             use --inprocess {w} for thread ranks on one device, or torchrun/SLURM across hosts"
        )));
    }
    let exe = std::env::current_exe()?;
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port();
    let mut children = Vec::with_capacity(w);
    for r in 0..w {
        let child = std::process::Command::new(&exe)
            .args(args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", w.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", w.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(RuntimeError::Launch(format!("cannot start rank {r}: {e}")));
            }
        }
    }
    let mut first_failure: Option<(usize, std::process::ExitStatus, Instant)> = None;
    loop {
        let mut running = 0;
        for (r, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            let pid = c.id();
            match c.try_wait() {
                Ok(Some(st)) => {
                    *slot = None;
                    if !st.success() && first_failure.is_none() {
                        eprintln!(
                            "mmsp-runtime: rank {r} (pid {pid}) failed ({st}); the other ranks \
                             have {} s to end",
                            grace.as_secs()
                        );
                        first_failure = Some((r, st, Instant::now()));
                    }
                }
                Ok(None) => running += 1,
                Err(_) => *slot = None,
            }
        }
        if running == 0 {
            break;
        }
        if let Some((_, _, t0)) = first_failure {
            if t0.elapsed() > grace {
                for (r, c) in children.iter_mut().enumerate() {
                    if let Some(c) = c {
                        eprintln!("mmsp-runtime: killing rank {r} (pid {})", c.id());
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None => Ok(()),
        Some((r, st, _)) if st.code() == Some(2) => Err(RuntimeError::Launch(format!(
            "rank {r} refused its input (exit code 2)"
        ))),
        Some((r, st, _)) => Err(RuntimeError::PeerGone(format!("rank {r} failed ({st})"))),
    }
}

/// Runs the plan and returns the report (also written to `opts.out`).
pub fn run(opts: &RunOptions) -> Result<Value> {
    run_with(opts, &RunExtras::default())
}

/// As [`run`], with checkpointing, tracing and progress options. Returns `Value::Null` on
/// NCCL ranks other than 0.
pub fn run_with(opts: &RunOptions, extras: &RunExtras) -> Result<Value> {
    run_vlm(opts, extras, &VisionOptions::default())
}

/// As [`run_with`], with the vision encoder's options (used when the plan has a vision
/// section).
pub fn run_vlm(opts: &RunOptions, extras: &RunExtras, vopts: &VisionOptions) -> Result<Value> {
    let (plan, tp, cfg) = load(opts)?;
    let vision = load_vision(opts, vopts, &plan, &tp, &cfg)?;
    let model_dir = match &opts.model {
        ModelSource::HfDir(d) => Some(d.as_path()),
        _ => None,
    };
    if let (Some(w), true) = (context_warning(&cfg, tp.context_tokens), extras.progress) {
        eprintln!("warning: {w}");
    }
    let vision_dir = vopts.config.as_deref().filter(|p| p.is_dir());
    let inputs = Inputs::load(
        model_dir,
        &cfg,
        extras.data.as_deref(),
        extras.data_seed,
        tp.context_tokens,
        vision.as_ref().map(|v| (v, vision_dir)),
    )?;
    if vision.is_some() && (extras.save.is_some() || extras.resume.is_some()) {
        return Err(RuntimeError::Plan(
            "--save/--resume of a plan with a vision section are not implemented (the \
             encoder's state is not checkpointed)"
                .into(),
        ));
    }
    let w = plan.world_size;
    let master = Kind::Float;
    let identity = checkpoint::identity(&plan, tp.zero_stage, tp.context_tokens, &cfg, master);
    let resume = match &extras.resume {
        Some(d) => Some(checkpoint::check(d, &identity)?),
        None => None,
    };
    let inject = fault_injection()?;
    if extras.deterministic {
        if extras.attn_backend == Some(Backend::Cudnn) {
            return Err(RuntimeError::Plan(
                "--deterministic with --attn-backend cudnn: cuDNN's attention backward is not \
                 bitwise reproducible; use --attn-backend flash (the default when deterministic)"
                    .into(),
            ));
        }
        deterministic_mode()?;
    }
    if !opts.cpu && !tch::Cuda::is_available() {
        return Err(RuntimeError::Launch(
            "CUDA is not available (use --cpu)".into(),
        ));
    }
    let records: Vec<Vec<StepRecord>>;
    let launched;
    if opts.inprocess.is_some() {
        launched = "inprocess";
        let dev = if opts.cpu {
            Device::Cpu
        } else {
            Device::Cuda(0)
        };
        if let (Some((total, _)), Some(p)) = (device_memory(dev), &tp.predicted) {
            if p.memory_per_gpu_bytes * w as f64 > total && !memory_check_skipped() {
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
        let world = LocalComm::group_named(&(0..w).collect::<Vec<_>>(), comm_timeout());
        let cx = LoopCtx {
            tp: &tp,
            cfg: &cfg,
            dev,
            opts,
            extras,
            resume: resume.as_ref(),
            identity: &identity,
            inject,
            in_process: true,
            layout: plan.layout,
            vision: vision.as_ref(),
            inputs: &inputs,
        };
        let res: Vec<Result<Vec<StepRecord>>> = std::thread::scope(|s| {
            let hs: Vec<_> = uly
                .into_iter()
                .zip(ring)
                .zip(world)
                .enumerate()
                .map(|(rank, ((u, r), g))| {
                    let cx = &cx;
                    s.spawn(move || {
                        let groups = Groups {
                            ulysses: &u as &dyn Communicator,
                            ring: &r,
                            grad: &g,
                            dp: l.dp,
                        };
                        let out = rank_loop(rank, groups, cx);
                        if let Err(e) = &out {
                            // The peers' collectives fail naming this rank and why.
                            let why = e.to_string();
                            for c in [&u, &r, &g] {
                                c.fail(&why);
                            }
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join()
                        .unwrap_or_else(|p| Err(panic_to_error(rank, p.as_ref())))
                })
                .collect()
        });
        let mut good = Vec::new();
        let mut errs = Vec::new();
        for r in res {
            match r {
                Ok(v) => good.push(v),
                Err(e) => errs.push(e),
            }
        }
        if !errs.is_empty() {
            return Err(root_cause(errs));
        }
        records = good;
    } else {
        launched = "nccl";
        let env = LaunchEnv::from_env()?;
        plan.check_launch(env.world_size)?;
        let d = Device::Cuda(env.local_rank);
        if let (Some((total, _)), Some(p)) = (device_memory(d), &tp.predicted) {
            if p.memory_per_gpu_bytes > total && !memory_check_skipped() {
                return Err(RuntimeError::Launch(format!(
                    "the plan predicts {:.1} GiB per GPU, the GPU has {:.1} GiB",
                    p.memory_per_gpu_bytes / 1073741824.0,
                    total / 1073741824.0
                )));
            }
        }
        let rank = env.rank;
        let nw = NcclWorld::init(&plan, env, comm_timeout())?;
        let cx = LoopCtx {
            tp: &tp,
            cfg: &cfg,
            dev: d,
            opts,
            extras,
            resume: resume.as_ref(),
            identity: &identity,
            inject,
            in_process: false,
            layout: plan.layout,
            vision: vision.as_ref(),
            inputs: &inputs,
        };
        let groups = Groups {
            ulysses: &nw.ulysses,
            ring: &nw.ring,
            grad: &nw.world,
            dp: plan.layout.dp,
        };
        // tch's infallible calls panic on libtorch errors (a CUDA out-of-memory among them):
        // caught here so that this rank ends with an error naming it, as in-process ranks do.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rank_loop(rank, groups, &cx)
        }))
        .unwrap_or_else(|p| Err(panic_to_error(rank, p.as_ref())))?;
        records = gather_records(&nw.world, &mine, d)?;
        nw.finish()?;
        if rank != 0 {
            return Ok(Value::Null);
        }
    }
    let first_index = resume.as_ref().map_or(0, |m| m.step);
    let mut report = report(
        opts,
        extras,
        &plan,
        &tp,
        &cfg,
        launched,
        &records,
        first_index,
        resume.as_ref(),
        vision
            .as_ref()
            .map_or(&[tp.context_tokens][..], |v| &v.sample_lens),
    )?;
    if let Some(vr) = &vision {
        vision_report(&mut report, vr, &plan, &tp, &cfg, &records, opts)?;
    }
    inputs.describe(&mut report);
    if let Some(w) = context_warning(&cfg, tp.context_tokens) {
        report["warnings"] = json!([w]);
    }
    if let Some(o) = &opts.out {
        std::fs::write(o, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// FLOPs one DP replica's step executes, for HFU, counted as the planner counts them: GEMMs
/// at 3x forward plus one more forward of the layers under recompute, attention at
/// FlashAttention-2's 3.5x forward (its backward recomputes the scores; Dao 2023, Sec. 4.1).
/// MFU's model FLOPs count attention at 3x (PaLM, Chowdhery et al. 2022, Appendix B).
fn hardware_flops(cfg: &ModelConfig, tp: &TrainPlan, attn_flops: f64) -> f64 {
    let again = if tp.recomputes() { 1.0 } else { 0.0 };
    let tokens = tp.context_tokens as f64;
    (3.0 + again) * cfg.layer_flops_per_token() * tokens
        + 3.0 * cfg.head_flops_per_token() * tokens
        + 3.5 * attn_flops
}

/// Every rank's records, in rank order, through an all-gather over the world.
fn gather_records(
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
        .map(|rank| {
            rank.chunks(REC_LEN)
                .map(|v| StepRecord {
                    start_unix_s: v[0],
                    stats: StepStats {
                        loss: v[1],
                        step_s: v[2],
                        attention_s: v[3],
                        grad_sync_s: v[4],
                        phases: Phases {
                            cast_s: v[7],
                            embed_s: v[8],
                            fwd_s: v[9],
                            attn_fwd_s: v[10],
                            loss_s: v[11],
                            bwd_s: v[12],
                            attn_bwd_s: v[13],
                            grad_reduce_s: v[14],
                            optimizer_s: v[15],
                        },
                        held_weight_bytes: v[23],
                        ..StepStats::default()
                    },
                    comm_s: v[5],
                    mem_used: v[6],
                    alloc_peak: v[21],
                    reserved_peak: v[22],
                    vision: [v[16], v[17], v[18], v[19], v[20]],
                })
                .collect()
        })
        .collect())
}

/// The phases of a step in the order they run, with the simulator's stream (thread id) each
/// is drawn on. Each is summed over the layers, so the trace shows them as consecutive
/// blocks of the measured length, not interleaved layer by layer.
fn phase_list(p: &Phases) -> [(&'static str, f64, u32); 9] {
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
fn chrome_trace(records: &[Vec<StepRecord>], first_index: usize, label: &str) -> Value {
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

fn max_or_null(v: impl Iterator<Item = f64>) -> Value {
    let m = v.filter(|x| x.is_finite()).fold(f64::NAN, f64::max);
    if m.is_finite() {
        json!(m)
    } else {
        Value::Null
    }
}

/// The report of a run (rank 0), printed and written as JSON; measured against predicted
/// also goes to stderr. `samples`: the lengths of the trainer's samples (attention FLOPs are
/// counted within each).
#[allow(clippy::too_many_arguments)]
fn report(
    opts: &RunOptions,
    extras: &RunExtras,
    plan: &Plan,
    tp: &TrainPlan,
    cfg: &ModelConfig,
    launched: &str,
    records: &[Vec<StepRecord>],
    first_index: usize,
    resume: Option<&Manifest>,
    samples: &[usize],
) -> Result<Value> {
    let w = plan.world_size;
    let inprocess = launched == "inprocess";
    let dev_for_total = if opts.cpu {
        Device::Cpu
    } else {
        Device::Cuda(0)
    };
    let total_mem = device_memory(dev_for_total).map(|m| m.0);
    // Step 0 of a run includes warm-up (cuDNN graph builds, allocator growth): summarise the
    // rest.
    let tail = |recs: &[StepRecord]| -> Vec<StepRecord> {
        if recs.len() > 1 {
            recs[1..].to_vec()
        } else {
            recs.to_vec()
        }
    };
    let mean = |recs: &[StepRecord], f: &dyn Fn(&StepRecord) -> f64| {
        recs.iter().map(f).sum::<f64>() / recs.len().max(1) as f64
    };
    let s0 = &records[0];
    let t0 = tail(s0);
    let step_s = mean(&t0, &|r| r.stats.step_s);
    let devices = if inprocess { 1.0 } else { w as f64 };
    let dp = plan.layout.dp as f64;
    let tokens_per_step = dp * tp.context_tokens as f64;
    let tokens_per_s = tokens_per_step / step_s;
    // Attention within each sample (document mask) for packed samples.
    let attn_flops: f64 = samples.iter().map(|&l| cfg.attention_flops(l)).sum();
    let flops_per_step =
        dp * 3.0 * (cfg.dense_flops_per_token() * tp.context_tokens as f64 + attn_flops);
    let mfu = flops_per_step / step_s / (devices * opts.peak_flops);
    let hfu = hardware_flops(cfg, tp, attn_flops) * dp / step_s / (devices * opts.peak_flops);
    let per_gpu_tps = tokens_per_s / devices;
    let per_rank: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(rank, recs)| {
            let t = tail(recs);
            json!({"rank": rank, "step_s": mean(&t, &|r| r.stats.step_s),
                   "communication_s": mean(&t, &|r| r.comm_s),
                   "attention_s": mean(&t, &|r| r.stats.attention_s),
                   "grad_sync_and_optimizer_s": mean(&t, &|r| r.stats.grad_sync_s),
                   "peak_device_memory_used_bytes": max_or_null(recs.iter().map(|r| r.mem_used)),
                   "peak_allocated_bytes": max_or_null(recs.iter().map(|r| r.alloc_peak)),
                   "peak_reserved_bytes": max_or_null(recs.iter().map(|r| r.reserved_peak)),
                   "held_weight_bytes_after_forward":
                       max_or_null(recs.iter().map(|r| r.stats.held_weight_bytes))})
        })
        .collect();
    let phases = Phases::mean(&t0.iter().map(|r| r.stats.phases).collect::<Vec<_>>());
    let comm_s = mean(&t0, &|r| r.comm_s);
    let peak = max_or_null(records.iter().flatten().map(|r| r.mem_used));
    let mut report = json!({
        "launch": launched, "ranks": w, "devices": devices,
        "layout": {"ulysses": plan.layout.ulysses, "ring": plan.layout.ring, "dp": plan.layout.dp},
        "zero_stage": tp.zero_stage, "recompute": tp.recompute,
        "model": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
                  "kv_heads": cfg.num_kv_heads, "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size,
                  "params": cfg.num_params()},
        "context_tokens": tp.context_tokens, "steps": opts.steps,
        "first_step_index": first_index,
        "losses": s0.iter().map(|r| r.stats.loss).collect::<Vec<_>>(),
        "first_step_s": s0[0].stats.step_s,
        "micro_step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": per_gpu_tps,
        "mfu": mfu, "hfu": hfu, "peak_flops_per_device": opts.peak_flops,
        "attention_s_rank0": mean(&t0, &|r| r.stats.attention_s),
        "grad_sync_and_optimizer_s_rank0": mean(&t0, &|r| r.stats.grad_sync_s),
        "communication_s_rank0": comm_s,
        "communication_note": if inprocess {
            "host time inside collectives, waiting for peers included"
        } else {
            "device time of NCCL groups on the communication streams (events), summed over the rank's communicators"
        },
        "phases_rank0": phases.to_json(),
        "per_rank": per_rank,
        "peak_device_memory_used_bytes": peak,
        "memory_note": "device-wide memory in use (total - free) after each step, so it includes the caching allocator's reserve; in-process ranks share one device",
        "device_memory_total_bytes": total_mem,
        "peak_allocated_bytes_rank0": max_or_null(s0.iter().map(|r| r.alloc_peak)),
        "peak_reserved_bytes_rank0": max_or_null(s0.iter().map(|r| r.reserved_peak)),
        "allocator_note": "the CUDA caching allocator's peaks during a step: allocated = bytes in tensors, reserved = what the allocator holds from the device (allocated + its cache and fragments); in-process ranks share one allocator",
        "deterministic": extras.deterministic,
        "allocator_conf": std::env::var("PYTORCH_CUDA_ALLOC_CONF").ok(),
    });
    if let Some(p) = &extras.kernel_trace {
        let path = if inprocess || w <= 1 {
            p.clone()
        } else {
            let mut s = p.as_os_str().to_owned();
            s.push(".rank0");
            PathBuf::from(s)
        };
        let sum = kernel_trace_side(&path, ".summary.json");
        if let Ok(text) = std::fs::read_to_string(&sum) {
            let mut v: Value = serde_json::from_str(&text)?;
            v["trace"] = json!(path);
            v["step"] = json!(first_index + opts.steps - 1);
            report["kernel_profile"] = v;
        }
    }
    if let Some(m) = resume {
        report["resumed_from"] = json!({"dir": m.dir, "step": m.step});
    }
    if let Some(d) = &extras.save {
        report["checkpoint"] = json!({"dir": d, "step": first_index + opts.steps});
    }
    let peak_per_rank = peak
        .as_f64()
        .map(|p| if inprocess { p / w as f64 } else { p });
    if let Some(p) = &tp.predicted {
        let pred_micro = p.step_time_s / tp.grad_accum_steps.max(1) as f64;
        let pred_tps_gpu = p.tokens_per_s / w as f64;
        let err = |m: f64, p: f64| 100.0 * (m - p) / p;
        let m_step = step_s * devices / w as f64;
        report["predicted"] = json!({
            "micro_step_s": pred_micro, "tokens_per_s_per_gpu": pred_tps_gpu, "mfu": p.mfu,
            "hfu": p.hfu,
            "memory_per_gpu_bytes": p.memory_per_gpu_bytes,
            "error_pct": {
                "micro_step_s": err(m_step, pred_micro),
                "tokens_per_s_per_gpu": err(per_gpu_tps, pred_tps_gpu),
                "mfu": err(mfu, p.mfu),
                "hfu": p.hfu.map(|h| err(hfu, h)),
                "memory": peak_per_rank.map(|m| err(m, p.memory_per_gpu_bytes)),
            }
        });
        if extras.progress {
            let gib = |b: f64| b / 1073741824.0;
            eprintln!(
                "measured vs predicted ({w} ranks, {} tokens):",
                tp.context_tokens
            );
            eprintln!(
                "  step per rank   {:>10.4} s   {:>10.4} s   {:+.1}%",
                m_step,
                pred_micro,
                err(m_step, pred_micro)
            );
            eprintln!(
                "  tokens/s/GPU    {:>10.0}     {:>10.0}     {:+.1}%",
                per_gpu_tps,
                pred_tps_gpu,
                err(per_gpu_tps, pred_tps_gpu)
            );
            eprintln!(
                "  MFU             {:>10.1}%    {:>10.1}%    {:+.1}%",
                100.0 * mfu,
                100.0 * p.mfu,
                err(mfu, p.mfu)
            );
            if let Some(h) = p.hfu {
                eprintln!(
                    "  HFU             {:>10.1}%    {:>10.1}%    {:+.1}%",
                    100.0 * hfu,
                    100.0 * h,
                    err(hfu, h)
                );
            }
            if let Some(m) = peak_per_rank {
                eprintln!(
                    "  memory per GPU  {:>10.1} GiB {:>10.1} GiB {:+.1}%",
                    gib(m),
                    gib(p.memory_per_gpu_bytes),
                    err(m, p.memory_per_gpu_bytes)
                );
            }
        }
    }
    if let Some(path) = &extras.trace {
        let trace = chrome_trace(records, first_index, "(measured)");
        std::fs::write(path, serde_json::to_string(&trace)?)?;
        report["trace"] = json!(path);
    }
    Ok(report)
}

/// The report's `vision` object: the stage's measured times (mean over the steps after the
/// first; rank 0 and the slowest rank) next to the plan's predicted ones, the layout run,
/// and the MFU counting the encoder's FLOPs too.
fn vision_report(
    report: &mut Value,
    vr: &VisionRun,
    plan: &Plan,
    tp: &TrainPlan,
    cfg: &ModelConfig,
    records: &[Vec<StepRecord>],
    opts: &RunOptions,
) -> Result<()> {
    let names = [
        "encode_s",
        "reshard_s",
        "reshard_backward_s",
        "encoder_backward_s",
        "encoder_optimizer_s",
    ];
    let mean_of = |recs: &[StepRecord], k: usize| {
        let t = if recs.len() > 1 { &recs[1..] } else { recs };
        t.iter().map(|r| r.vision[k]).sum::<f64>() / t.len().max(1) as f64
    };
    let mut rank0 = serde_json::Map::new();
    let mut slowest = serde_json::Map::new();
    for (k, n) in names.iter().enumerate() {
        rank0.insert(n.to_string(), json!(mean_of(&records[0], k)));
        let m = records.iter().map(|r| mean_of(r, k)).fold(0.0f64, f64::max);
        slowest.insert(n.to_string(), json!(m));
    }
    let slow = |k: usize| slowest[names[k]].as_f64().unwrap_or(0.0);
    let v = &vr.section;
    let l = plan.layout;
    // The plan's ranges cover its samples; the runtime's add the padding's (after them).
    let packed: usize = v.sample_lens.iter().sum();
    let plan_ranges_match = tp.tokens.as_ref().map(|t| {
        t.ranges_per_rank.len() >= vr.ranges.len()
            && vr.ranges.iter().zip(&t.ranges_per_rank).all(|(a, b)| {
                let ours: Vec<(usize, usize)> =
                    a.iter().copied().filter(|r| r.0 < packed).collect();
                ours == *b
            })
    });
    let train = v.train_vision;
    let frames_flops = v.frames as f64 * vr.cfg.flops_per_frame() * if train { 3.0 } else { 1.0 };
    let dp = l.dp as f64;
    let attn_flops: f64 = vr.sample_lens.iter().map(|&l| cfg.attention_flops(l)).sum();
    let dec_flops = 3.0 * (cfg.dense_flops_per_token() * tp.context_tokens as f64 + attn_flops);
    let step_s = report["micro_step_s"].as_f64().unwrap_or(f64::NAN);
    let devices = report["devices"].as_f64().unwrap_or(1.0);
    let mfu_all = dp * (dec_flops + frames_flops) / step_s / (devices * opts.peak_flops);
    let mut out = json!({
        "encoder": v.encoder,
        "encoder_config": {"hidden": vr.cfg.hidden_size, "layers": vr.cfg.num_layers,
            "heads": vr.cfg.num_heads, "image_size": vr.cfg.image_size,
            "patch_size": vr.cfg.patch_size, "pooling": format!("{:?}", vr.cfg.pooling).to_lowercase(),
            "params": vr.cfg.num_params()},
        "tokens_per_frame": v.tokens_per_frame,
        "frames": v.frames,
        "samples": v.samples,
        "padding_tokens": vr.padding,
        "train_vision": train,
        "frames_per_rank": v.frames_per_rank.iter().map(Vec::len).collect::<Vec<_>>(),
        "loss": "next-token cross-entropy where the target is a text token of the same sample; \
                 -100 where it is a vision token, across samples and on the padding",
        "stage2": {
            "ranges": "per-sample zigzag (each sample, and the padding, sharded on its own; \
                       attention within samples only, RoPE positions restarting per sample)",
            "sample_lens": vr.sample_lens,
            "plan_ranges_match": plan_ranges_match,
        },
        "measured_rank0": Value::Object(rank0),
        "measured_slowest_rank": Value::Object(slowest.clone()),
        "mfu_with_encoder": mfu_all,
        "note": "seconds, mean over the steps after the first, device-synchronised around each \
                 phase; encode_s = encoder + projector forward, reshard_s = the stage-1 -> \
                 stage-2 all-to-all, reshard_backward_s = its reverse (gradients), \
                 encoder_backward_s = encoder + projector backward",
    });
    if let Some(p) = &v.stage {
        let err = |m: f64, p: f64| {
            if p > 0.0 {
                json!(100.0 * (m - p) / p)
            } else {
                Value::Null
            }
        };
        let enc = slow(0) + slow(3);
        out["predicted"] = json!({
            "encoder_s": p.encoder_s, "reshard_s": p.reshard_s, "gather_s": p.gather_s,
            "error_pct": {
                "encoder_s (encode_s + encoder_backward_s, slowest rank)": err(enc, p.encoder_s),
                "reshard_s": err(slow(1), p.reshard_s),
                "gather_s (reshard_backward_s)": err(slow(2), p.gather_s),
            }
        });
    }
    report["vision"] = out;
    Ok(())
}

/// Whether a path is a checkpoint directory (has a manifest).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(checkpoint::MANIFEST).is_file()
}

#[cfg(test)]
mod panic_tests {
    use super::*;

    #[test]
    fn out_of_memory_panics_become_typed_errors_naming_the_rank() {
        let oom: Box<dyn std::any::Any + Send> = Box::new(String::from(
            "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to \
             allocate 1.14 GiB.\nmore\")",
        ));
        match panic_to_error(3, oom.as_ref()) {
            RuntimeError::OutOfMemory(m) => {
                assert!(m.starts_with("rank 3: CUDA out of memory. Tried"), "{m}");
                assert!(!m.contains('\n'), "{m}");
            }
            e => panic!("{e:?}"),
        }
        let other: Box<dyn std::any::Any + Send> = Box::new("index out of bounds");
        match panic_to_error(1, other.as_ref()) {
            RuntimeError::Comm(m) => assert_eq!(m, "rank 1 panicked: index out of bounds"),
            e => panic!("{e:?}"),
        }
    }
}
