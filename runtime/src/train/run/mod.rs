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
//! bounded time (see `comm`); [`Knobs::fault`] (`MMSP_FAULT_INJECT=rank:step[:mode]` in the
//! binary) makes one rank fail before the given step, for tests. Checkpoints: see [`super::checkpoint`].
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
use super::report::{
    AgainstPredicted, CheckpointRef, EncoderSummary, ErrorPct, LayoutSummary, ModelSummary,
    RankSummary, RunReport, Stage2Summary, VisionErrorPct, VisionPredicted, VisionReport,
    VisionTimes,
};
use super::session::{save_hf, Inputs, LrSchedule, Metrics, SaveHf};
use super::{Groups, Phases, StepStats, TrainConfig, Trainer};
use crate::comm::local::{local_groups_shared, LocalComm};
use crate::comm::nccl::{LaunchEnv, NcclWorld};
use crate::comm::CommTimeout;
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::knobs::{Fault, FaultMode, Knobs};
use crate::model::hf::HfCheckpoint;
use crate::model::ModelConfig;
use crate::plan::{GroupKind, Layout, Mode, Plan, Recompute};
use crate::vision::{EncoderSource, VisionEncoder, VisionRun, VisionSection, VisionStage};
use mmsp_plan::{ModelSpec, Predicted};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tch::{Device, Kind, Tensor};

mod faults;
mod launch;
mod rank;
mod report;
mod vision_rank;

use faults::*;
use launch::*;
pub use launch::{local_gpus, should_spawn, spawn_local};
use rank::*;
use report::*;
use vision_rank::*;

/// What training reads of the plan beyond its mesh, from the contract's checked plan in the
/// runtime's types.
#[derive(Debug, Clone)]
pub struct TrainPlan {
    pub zero_stage: u32,
    pub recompute: Recompute,
    pub micro_batch: usize,
    pub grad_accum_steps: usize,
    pub context_tokens: usize,
    pub model: ModelSpec,
    pub predicted: Option<Predicted>,
    /// The plan's stage-2 token ranges of each SP rank (`tokens.ranges_per_rank`).
    pub ranges_per_rank: Vec<Vec<(usize, usize)>>,
    /// MM-SP stages (plans made with `--frames` or `--samples`).
    pub vision: Option<VisionSection>,
}

impl TrainPlan {
    /// The training view of a plan; an inference plan, or one the runtime does not train
    /// (several sequences per micro-batch, a context past the address space), is refused here.
    pub fn of(plan: &Plan) -> Result<TrainPlan> {
        let c = &plan.contract;
        c.expect_mode(Mode::Training, "plan")?;
        if c.micro_batch != 1 {
            return Err(RuntimeError::Plan(format!(
                "micro_batch {} (the runtime trains one sequence per micro-step)",
                c.micro_batch
            )));
        }
        let size = |what: &str, n: u64| {
            usize::try_from(n).map_err(|_| {
                RuntimeError::Plan(format!("{what} {n} is more than this machine addresses"))
            })
        };
        Ok(TrainPlan {
            zero_stage: u32::from(c.zero_stage),
            recompute: c.recompute,
            micro_batch: 1,
            grad_accum_steps: size("grad_accum_steps", c.grad_accum_steps)?,
            context_tokens: size("context_tokens", c.context_tokens)?,
            model: c.model.clone(),
            predicted: c.predicted.clone(),
            ranges_per_rank: c
                .tokens
                .ranges_per_rank
                .iter()
                .map(|rs| rs.iter().map(|&[a, b]| (a as usize, b as usize)).collect())
                .collect(),
            vision: c
                .vision
                .as_ref()
                .map(VisionSection::from_plan)
                .transpose()?,
        })
    }

    /// Whether the plan recomputes each layer's forward outside attention in its backward
    /// (`recompute` other than none).
    pub fn recomputes(&self) -> bool {
        self.recompute != Recompute::None
    }
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
    /// Attention across the documents a sequence of `data` packs (off: each document is a
    /// sample of its own, padded to a multiple of 2 x SP, as [`super::data::pack_documents`]).
    pub cross_document_attention: bool,
    /// Learning rate by step (None: `RunOptions::lr`, constant).
    pub schedule: Option<LrSchedule>,
    /// Clip gradients to this global norm (0: off).
    pub max_grad_norm: f64,
    /// Append one JSON line of metrics per step here.
    pub metrics: Option<PathBuf>,
    /// Write Hugging Face checkpoints (at the end, and every `save_every` steps when set).
    pub save_hf: Option<SaveHf>,
    /// Kernel choices, profiling, fault injection and timeouts ([`Knobs`]).
    pub knobs: Knobs,
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
            cross_document_attention: false,
            schedule: None,
            max_grad_norm: 0.0,
            metrics: None,
            save_hf: None,
            knobs: Knobs::default(),
        }
    }
}

/// What [`load`] read: the plan, its training fields, the model's configuration and, for a
/// Hugging Face model directory, the opened checkpoint (headers parsed and checked).
pub struct Loaded {
    pub plan: Plan,
    pub tp: TrainPlan,
    pub cfg: ModelConfig,
    pub weights: Option<std::sync::Arc<HfCheckpoint>>,
}

/// Reads and checks everything that can be checked without a device or peers.
pub fn load(opts: &RunOptions) -> Result<Loaded> {
    let plan = Plan::from_file(&opts.plan)?;
    let tp = TrainPlan::of(&plan)?;
    let (cfg, weights) = match &opts.model {
        ModelSource::HfDir(d) => {
            let w = std::sync::Arc::new(HfCheckpoint::open(d)?);
            (w.cfg.clone(), Some(w))
        }
        ModelSource::Tiny => (ModelConfig::tiny(), None),
        ModelSource::HfConfig(p) => (ModelConfig::from_hf_file(p)?, None),
        ModelSource::Plan => (ModelConfig::from_plan_model(&tp.model)?, None),
    };
    // The plan's token ranges are the contract's zigzag shards (its reader checked them),
    // which the runtime cuts by; a sequence too short for every rank to hold a token is refused.
    crate::shard::Zigzag::new(tp.context_tokens, plan.layout.ulysses, plan.layout.ring)?;
    if let Some(n) = opts.inprocess {
        plan.check_launch(n)?;
    }
    if opts.steps == 0 {
        return Err(RuntimeError::Plan("--steps must be >= 1".into()));
    }
    Ok(Loaded {
        plan,
        tp,
        cfg,
        weights,
    })
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

/// Everything a rank's loop needs besides its communicators.
struct LoopCtx<'a> {
    tp: &'a TrainPlan,
    cfg: &'a ModelConfig,
    dev: Device,
    opts: &'a RunOptions,
    extras: &'a RunExtras,
    resume: Option<&'a Manifest>,
    identity: &'a Value,
    inject: Option<Fault>,
    in_process: bool,
    layout: Layout,
    vision: Option<&'a VisionRun>,
    inputs: &'a Inputs,
    /// The collective timeout of this process's communicators (told of each step).
    timeout: &'a CommTimeout,
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

/// Runs the plan and returns the report (also written to `opts.out`).
pub fn run(opts: &RunOptions) -> Result<Option<RunReport>> {
    run_with(opts, &RunExtras::default())
}

/// As [`run`], with checkpointing, tracing and progress options. Returns the report on the
/// rank that gathers it (every in-process run; rank 0 of an NCCL run), None on the others.
pub fn run_with(opts: &RunOptions, extras: &RunExtras) -> Result<Option<RunReport>> {
    run_vlm(opts, extras, &VisionOptions::default())
}

/// As [`run_with`], with the vision encoder's options (used when the plan has a vision
/// section).
pub fn run_vlm(
    opts: &RunOptions,
    extras: &RunExtras,
    vopts: &VisionOptions,
) -> Result<Option<RunReport>> {
    let p = prepare(opts, extras, vopts)?;
    let (records, launched) = if opts.inprocess.is_some() {
        (launch_inprocess(&p, opts, extras)?, "inprocess")
    } else {
        match launch_nccl(&p, opts, extras)? {
            Some(r) => (r, "nccl"),
            None => return Ok(None),
        }
    };
    let tp = &p.tp;
    let whole = [tp.context_tokens];
    let facts = RunFacts {
        plan: &p.plan,
        tp,
        cfg: &p.cfg,
        launched,
        records: &records,
        first_index: p.resume.as_ref().map_or(0, |m| m.step),
        resume: p.resume.as_ref(),
        samples: p.vision.as_ref().map_or(&whole[..], |v| &v.sample_lens),
    };
    let mut report = report(opts, extras, &facts)?;
    if let Some(vr) = &p.vision {
        report.vision = Some(vision_report(&report, vr, &facts, opts));
    }
    p.inputs.describe(&mut report);
    report
        .warnings
        .extend(context_warning(&p.cfg, tp.context_tokens));
    if let Some(o) = &opts.out {
        std::fs::write(o, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(Some(report))
}

/// Everything a run reads and checks before any rank starts.
struct Prepared {
    plan: Plan,
    tp: TrainPlan,
    cfg: ModelConfig,
    vision: Option<VisionRun>,
    inputs: Inputs,
    /// What a checkpoint of this run must match.
    identity: Value,
    resume: Option<Manifest>,
    inject: Option<Fault>,
}

/// Reads the plan, model, vision section, weights and data, the checkpoint to resume, and
/// checks the options against each other.
fn prepare(opts: &RunOptions, extras: &RunExtras, vopts: &VisionOptions) -> Result<Prepared> {
    let Loaded {
        plan,
        tp,
        cfg,
        weights,
    } = load(opts)?;
    let vision = load_vision(opts, vopts, &plan, &tp, &cfg)?;
    if let (Some(w), true) = (context_warning(&cfg, tp.context_tokens), extras.progress) {
        eprintln!("warning: {w}");
    }
    let vision_dir = vopts.config.as_deref().filter(|p| p.is_dir());
    let inputs = Inputs::load(
        weights,
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
    let identity = checkpoint::identity(&plan, tp.zero_stage, tp.context_tokens, &cfg, Kind::Float);
    let resume = match &extras.resume {
        Some(d) => Some(checkpoint::check(d, &identity)?),
        None => None,
    };
    let inject = extras.knobs.fault;
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
    Ok(Prepared {
        plan,
        tp,
        cfg,
        vision,
        inputs,
        identity,
        resume,
        inject,
    })
}

impl Prepared {
    /// The context of this process's rank loops.
    fn ctx<'a>(
        &'a self,
        opts: &'a RunOptions,
        extras: &'a RunExtras,
        dev: Device,
        in_process: bool,
        timeout: &'a CommTimeout,
    ) -> LoopCtx<'a> {
        LoopCtx {
            tp: &self.tp,
            cfg: &self.cfg,
            dev,
            opts,
            extras,
            resume: self.resume.as_ref(),
            identity: &self.identity,
            inject: self.inject,
            in_process,
            layout: self.plan.layout,
            vision: self.vision.as_ref(),
            inputs: &self.inputs,
            timeout,
        }
    }
}

/// Whether a path is a checkpoint directory (has a manifest).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(checkpoint::MANIFEST).is_file()
}
