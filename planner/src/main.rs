//! `mmsp`: the command-line front end of the planner. Thin glue: parse flags, call the
//! library, print tables or JSON. Every error is one line on stderr and exit code 2.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use mmsp_planner::cost::Recompute;
use mmsp_planner::engines::Engine;
use mmsp_planner::multimodal::MultiModal;
use mmsp_planner::render;
use mmsp_planner::search::{self, LayoutPin, Request, Strategy};
use mmsp_planner::spec::samples::{load_manifest, Sample};
use mmsp_planner::spec::vision::VisionSpec;
use mmsp_planner::spec::{cluster::ClusterSpec, model::ModelSpec};
use mmsp_planner::topology::Topology;

mod cli;

use cli::tokens_arg;

#[derive(Parser, Debug)]
#[command(
    name = "mmsp",
    version,
    about = "Plan multi-modal sequence parallelism (Ulysses x zigzag ring attention) for long-context training",
    after_help = "Token counts accept 131072, 128K, 2M or 1.5M, where K = 1024 and M = 1024 x 1024 (1M = 1048576 tokens)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Search layouts for a model, context length and cluster, and print the best plan.
    Plan(PlanArgs),
    /// List the shipped model presets and topologies.
    List,
    /// Replay one training step of a saved plan in the discrete-event simulator.
    Simulate(SimulateArgs),
    /// Compare strategies of each engine (mmsp-runtime, megatron-core, ring-flash-attn,
    /// yunchang, deepspeed-ulysses, vila-mmsp) on one request, each costed by its engine's profile.
    ///
    /// 2d, ring and ulysses are costed as mmsp-runtime runs them, every ZeRO stage (0-3) and
    /// recompute (none, full) searched. megatron-cp-tp and te-a2a-p2p as Megatron-Core with
    /// Transformer Engine: distributed optimizer (6 + 12/d bytes per parameter over DP x CP),
    /// Korthikanti activations, whole-layer recompute, cuDNN attention. ring-flash-attn, usp,
    /// ds-ulysses and vila-mmsp on DeepSpeed ZeRO with FlashAttention-2 (0.574 x cuDNN,
    /// measured). "vs 2d" is the step time against 2d's (+ slower). MFU counts 6 x params x
    /// tokens and causal attention at 3x its forward (PaLM, Appendix B); HFU counts what the
    /// kernels run (attention 3.5x, the recompute's forward).
    Compare(CompareArgs),
    /// Run published training throughputs (validation/published.toml) through the planner
    /// with each one's engine profile at its pinned layout: predicted, published, error per
    /// row, mean and worst absolute error.
    Validate(ValidateArgs),
    /// Sweep GPUs x context x model x topology and write an HTML/Markdown/CSV/JSON report.
    Report(cli::report::ReportArgs),
    /// Export a plan as Megatron, DeepSpeed or VILA settings, or a torchrun/SLURM launch script.
    Export(cli::export::ExportArgs),
    /// Plan a training campaign of stages from a TOML recipe: plans, wall-clock, GPU-hours.
    Campaign(cli::campaign::CampaignArgs),
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    /// A plan written by `mmsp plan --format json`.
    plan: String,
    /// Write a Chrome trace-event JSON of the step (opens in Perfetto) to this file.
    #[arg(long)]
    trace: Option<String>,
    /// Simulate every rank with one op per group instead of one representative rank (slow
    /// for large worlds; gives the same step time, see `mmsp_planner::sim`).
    #[arg(long)]
    no_collapse: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// What to plan for: the GPUs, model, cluster and batch (shared by plan and compare).
#[derive(clap::Args, Debug)]
struct Target {
    /// Number of GPUs (whole nodes of the topology).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    gpus: u32,
    /// Model preset (llama3-8b, llama2-7b, qwen2-7b, llama3-70b) or a Hugging Face config.json.
    #[arg(long, default_value = "llama3-8b")]
    model: String,
    /// Topology preset (dgx-h100, dgx-a100, hgx-h200, gb200-nvl72, pcie-l40s) or a TOML file.
    #[arg(long, default_value = "dgx-h100")]
    topology: String,
    /// Kernel calibration (shipped name such as h100-sxm, or a JSON file from
    /// `mmsp-runtime calibrate` or tools/calibrate_kernels.py) replacing the topology's
    /// throughput figures, and with collectives from `mmsp-runtime calibrate-comm` its fabric
    /// efficiency.
    #[arg(long)]
    calibration: Option<String>,
    /// Global batch in sequences [default: 4M tokens' worth, at least 1, a power of two].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    global_batch: Option<u64>,
}

impl Target {
    /// The model, the cluster (with the calibration applied) and its graph for --gpus.
    fn load(&self) -> Result<(ModelSpec, ClusterSpec, Topology)> {
        let model = mmsp_planner::spec::model::load(&self.model)?;
        let mut cluster = ClusterSpec::load(&self.topology)?;
        if let Some(c) = &self.calibration {
            let cal = mmsp_planner::calibration::Calibration::load(c)?;
            cluster.apply_calibration(cal)?;
        }
        cluster.check_gpus(u64::from(self.gpus))?;
        let topo = Topology::build(&cluster, self.gpus);
        Ok((model, cluster, topo))
    }
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    video: VideoArgs,
    /// Sequence length in tokens: 131072, 128K, 2M or 1.5M (K = 1024, M = 1048576)
    /// [default: 512K; with --frames or --samples, the packed video + text tokens].
    #[arg(long, value_parser = tokens_arg)]
    context: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Write the Chrome trace of each strategy's best configuration into this folder.
    #[arg(long)]
    trace_dir: Option<String>,
    /// Engines whose rows to show, comma-separated (mmsp-runtime, megatron-core,
    /// ring-flash-attn, yunchang, deepspeed-ulysses, vila-mmsp) [default: all].
    #[arg(long)]
    engine: Option<String>,
}

#[derive(clap::Args, Debug)]
struct ValidateArgs {
    /// A validation table (TOML, as validation/published.toml) instead of the shipped one.
    #[arg(long)]
    table: Option<String>,
    /// Engines whose rows to run, comma-separated [default: all].
    #[arg(long)]
    engine: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Format {
    Table,
    Json,
}

/// `--recompute`: what mmsp-runtime runs. `selective` parses (it is a value the runtime's plans
/// accept) so that it is refused with the reason, not as an unknown value.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum RecomputeArg {
    None,
    /// mmsp-runtime's recompute: each layer's forward outside attention again in backward.
    Full,
    #[value(hide = true)]
    Selective,
}

impl RecomputeArg {
    fn policy(self) -> Result<Recompute> {
        Recompute::parse_requested(match self {
            RecomputeArg::None => "none",
            RecomputeArg::Full => "full",
            RecomputeArg::Selective => "selective",
        })
        .map_err(|m| mmsp_planner::Error::invalid("--recompute", m).into())
    }
}

/// Multi-modal input (shared by plan and compare): frames of one sample, or a manifest.
#[derive(clap::Args, Debug)]
struct VideoArgs {
    /// Video frames of one sample (multi-modal planning: stage 1 balances them over the SP
    /// group for the vision encoder, stage 2 re-shards their tokens for the LLM).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    frames: Option<u64>,
    /// Text tokens of the sample given by --frames.
    #[arg(long, default_value_t = 0)]
    text_tokens: u64,
    /// A JSON-lines manifest of the samples packed into one sequence, one per line:
    /// {"frames": 64, "text_tokens": 512, "resolution": [384, 384]} (resolution optional).
    #[arg(long, conflicts_with = "frames")]
    samples: Option<String>,
    /// Vision encoder preset (siglip-so400m, siglip-so400m-nopool, clip-vit-l-336) or a
    /// Hugging Face config.json.
    #[arg(long, default_value = "siglip-so400m")]
    vision: String,
    /// Keep the vision encoder frozen (forward only) instead of training it.
    #[arg(long)]
    freeze_vision: bool,
}

impl VideoArgs {
    /// The multi-modal input, if --frames or --samples was given.
    fn load(&self) -> Result<Option<MultiModal>> {
        let samples = match (&self.samples, self.frames) {
            (Some(path), _) => load_manifest(path)?,
            (None, Some(frames)) => vec![Sample::uniform(frames, self.text_tokens)],
            (None, None) => return Ok(None),
        };
        let vision = VisionSpec::load(&self.vision)?;
        Ok(Some(MultiModal::new(vision, samples, !self.freeze_vision)?))
    }
}

#[derive(clap::Args, Debug)]
struct PlanArgs {
    #[command(flatten)]
    target: Target,
    /// Sequence length in tokens: 131072, 128K, 2M or 1.5M (K = 1024, M = 1048576)
    /// [default: 2M; with --frames or --samples, the packed video + text tokens].
    #[arg(long, value_parser = tokens_arg)]
    context: Option<u64>,
    #[command(flatten)]
    video: VideoArgs,
    /// Force a recompute policy instead of searching both: none, or full (mmsp-runtime's
    /// recompute of each layer's forward outside attention in backward). Either runs under
    /// every ZeRO stage.
    #[arg(long, value_enum)]
    recompute: Option<RecomputeArg>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Find the largest context that fits instead of planning --context.
    #[arg(long)]
    max_context: bool,
    /// Strategy to plan with: 2d, ring, ulysses, megatron-cp-tp, te-a2a-p2p.
    #[arg(long, default_value = "2d")]
    strategy: String,
    /// Runners-up to show in the table.
    #[arg(long, default_value_t = 4)]
    top: usize,
    /// Plan only this Ulysses x ring layout, e.g. 2x4 (dp = GPUs / (U x R)); ZeRO, recompute
    /// and micro-batch are still searched.
    #[arg(long, value_parser = layout_arg)]
    layout: Option<LayoutPin>,
    /// Plan only this ZeRO stage (0-3) instead of searching all four: 0 keeps 18 B per
    /// parameter, 1 bf16 parameters and fp32 gradients whole with masters and moments sharded
    /// (6 + 12/N), 2 the gradients sharded too (2 + 16/N), 3 everything sharded (16/N) with
    /// two layers gathered at a time (N: SP x DP ranks). megatron-cp-tp and te-a2a-p2p run
    /// stage 1 only (Megatron-Core's distributed optimizer).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=3))]
    zero: Option<u8>,
    /// Plan training steps or inference (sequence-parallel prefill, sharded-KV decoding).
    #[arg(long, value_enum, default_value_t = Mode::Training)]
    mode: Mode,
    /// Inference: tokens decoded per request (weights decode against prefill in the ranking).
    #[arg(long, default_value_t = 1024)]
    decode_tokens: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Mode {
    Training,
    Inference,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // clap's message over several lines, folded into one: the error, possible values
            // and tips, without the usage block.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("Usage:")
                        && !l.starts_with("For more information")
                })
                .collect();
            eprintln!("{} (see 'mmsp --help')", parts.join(" "));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            ExitCode::from(2)
        }
    }
}

/// A reader that closed the pipe (`mmsp plan | head`) is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().map(|io| io.kind())
            == Some(std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind())
                == Some(std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Plan(a) => plan(a),
        Command::Simulate(a) => simulate(a),
        Command::Compare(a) => compare(a),
        Command::Validate(a) => validate(a),
        Command::Report(a) => {
            let html = mmsp_planner::report::run(&a.request())?;
            println!("wrote {}", html.display());
            Ok(())
        }
        Command::Export(a) => Ok(mmsp_planner::export::run(&a.request())?),
        Command::Campaign(a) => {
            print!("{}", mmsp_planner::campaign::run(&a.request())?);
            Ok(())
        }
        Command::List => {
            println!(
                "models: {}",
                mmsp_planner::spec::model::preset_names().join(", ")
            );
            println!(
                "topologies: {}",
                mmsp_planner::spec::cluster::preset_names().join(", ")
            );
            println!(
                "vision encoders: {}",
                mmsp_planner::spec::vision::preset_names().join(", ")
            );
            println!("strategies: {}", Strategy::ALL.map(|s| s.name()).join(", "));
            Ok(())
        }
    }
}

/// `--layout UxR`: Ulysses degree x ring degree, both at least 1.
fn layout_arg(s: &str) -> std::result::Result<LayoutPin, String> {
    let bad = || format!("expected ULYSSESxRING such as 2x4, got {s:?}");
    let (u, r) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (ulysses, ring): (u32, u32) = (
        u.trim().parse().map_err(|_| bad())?,
        r.trim().parse().map_err(|_| bad())?,
    );
    if ulysses == 0 || ring == 0 {
        return Err(bad());
    }
    Ok(LayoutPin { ulysses, ring })
}

/// Refuses what the training search cannot take: --context or --max-context with video
/// input (`video`), a --layout that does not divide --gpus, a ZeRO stage other than 1 for the
/// Megatron-Core strategies.
fn check_training_flags(a: &PlanArgs, strategy: Strategy, video: bool) -> Result<()> {
    if video && (a.context.is_some() || a.max_context) {
        return Err(mmsp_planner::Error::invalid(
            "flags",
            "--context and --max-context do not go with --frames/--samples (the context is the packed video + text tokens)",
        )
        .into());
    }
    let gpus = a.target.gpus;
    if let Some(p) = a.layout {
        if !gpus.is_multiple_of(p.ulysses * p.ring) {
            return Err(mmsp_planner::Error::invalid(
                "--layout",
                format!(
                    "{}x{} = {} GPUs does not divide --gpus {gpus}",
                    p.ulysses,
                    p.ring,
                    p.ulysses * p.ring
                ),
            )
            .into());
        }
    }
    if let (Some(z), Strategy::MegatronCpTp | Strategy::TeA2aP2p) = (a.zero, strategy) {
        if z != 1 {
            return Err(mmsp_planner::Error::invalid(
                "--zero",
                format!(
                    "{} plans ZeRO 1 (Megatron-Core's distributed optimizer), not {z}",
                    a.strategy
                ),
            )
            .into());
        }
    }
    Ok(())
}

fn plan(a: PlanArgs) -> Result<()> {
    if a.mode == Mode::Inference {
        return plan_inference(a);
    }
    let (model, cluster, topo) = a.target.load()?;
    let strategy = Strategy::parse(&a.strategy)?;
    let recompute = a.recompute.map(RecomputeArg::policy).transpose()?;
    let mm = a.video.load()?;
    check_training_flags(&a, strategy, mm.is_some())?;
    let gpus = a.target.gpus;
    let context = match &mm {
        Some(mm) => mm.padded_context(gpus),
        None => a.context.unwrap_or(2 * 1024 * 1024),
    };
    let mut req = Request {
        gpus,
        context,
        global_batch: a.target.global_batch,
        recompute,
        strategy,
        pin: a.layout,
        zero: a.zero,
    };
    let mut max_ctx = None;
    if a.max_context {
        let (ctx, _) = search::max_context(&topo, &model, &req).ok_or_else(|| {
            mmsp_planner::Error::NoFeasiblePlan(format!(
                "{} does not fit on {} {} GPUs at any context",
                model.name, gpus, cluster.name
            ))
        })?;
        req.context = ctx;
        req.global_batch = Some(a.target.global_batch.unwrap_or(1));
        max_ctx = Some(ctx);
    }
    let planned = mmsp_planner::pipeline::plan_training(
        &topo,
        &a.target.topology,
        &model,
        &req,
        mm.as_ref(),
    )?;
    let (mut plan, result, best) = (planned.plan, planned.result, planned.best);
    plan.max_context_tokens = max_ctx;
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &plan).context("writing the plan")?;
            writeln!(out)?;
        }
        Format::Table => write!(
            out,
            "{}",
            render::plan_table(&topo, &plan, &result, &best, a.top)
        )?,
    }
    Ok(())
}

/// `mmsp plan --mode inference`: see `mmsp_planner::inference`.
fn plan_inference(a: PlanArgs) -> Result<()> {
    use mmsp_planner::inference::{self, InferenceRequest};
    if a.video.frames.is_some()
        || a.video.samples.is_some()
        || a.max_context
        || a.recompute.is_some()
    {
        return Err(mmsp_planner::Error::invalid(
            "flags",
            "--mode inference plans token ids at --context; --frames, --samples, --max-context and --recompute are for training",
        )
        .into());
    }
    let (model, _, topo) = a.target.load()?;
    let req = InferenceRequest {
        gpus: a.target.gpus,
        context: a.context.unwrap_or(2 * 1024 * 1024),
        decode_tokens: a.decode_tokens,
    };
    let result = inference::search(&topo, &model, &req);
    let Some((c, e)) = result.ranked.first() else {
        return Err(inference::no_plan_error(&model, &req, &result).into());
    };
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            let plan = inference::build_plan(&topo, &a.target.topology, &model, req.context, c, e)?;
            serde_json::to_writer_pretty(&mut out, &plan).context("writing the plan")?;
            writeln!(out)?;
        }
        Format::Table => write!(
            out,
            "{}",
            inference::table(&topo, &model, &req, &result, a.top)
        )?,
    }
    Ok(())
}

fn simulate(a: SimulateArgs) -> Result<()> {
    let plan = mmsp_planner::plan::load_training(&a.plan)?;
    let (_, analytic, sim) = mmsp_planner::sim::replay_plan(&plan, &a.plan, !a.no_collapse)?;
    if let Some(path) = &a.trace {
        let tr = mmsp_planner::sim::trace::chrome_trace(&sim, &plan.model.name);
        std::fs::write(path, serde_json::to_vec(&tr)?)
            .with_context(|| format!("writing {path}"))?;
    }
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            let v = serde_json::json!({
                "plan": a.plan,
                "analytic_step_time_s": analytic.step_time_s,
                "simulated": sim,
            });
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        }
        Format::Table => write!(out, "{}", render::sim_table(&plan, &analytic, &sim))?,
    }
    Ok(())
}

fn compare(a: CompareArgs) -> Result<()> {
    let (model, _, topo) = a.target.load()?;
    let mm = a.video.load()?;
    let context = match (&mm, a.context) {
        (Some(_), Some(_)) => {
            return Err(mmsp_planner::Error::invalid(
                "flags",
                "--context does not go with --frames/--samples (the context is the packed video + text tokens)",
            )
            .into())
        }
        (Some(mm), None) => mm.padded_context(a.target.gpus),
        (None, c) => c.unwrap_or(512 * 1024),
    };
    let req = Request {
        gpus: a.target.gpus,
        context,
        global_batch: a.target.global_batch,
        recompute: None,
        strategy: Strategy::TwoD,
        pin: None,
        zero: None,
    };
    search::check_batch(&req)?;
    let selected = match &a.engine {
        Some(e) => Engine::parse_list(e)?,
        None => Engine::ALL.to_vec(),
    };
    let cmp = mmsp_planner::compare::compare(&topo, &model, &req, mm.as_ref(), &selected);
    if let Some(dir) = &a.trace_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        for (name, trace) in mmsp_planner::compare::traces(&topo, &model, &cmp, mm.as_ref()) {
            let path = format!("{dir}/{name}.json");
            std::fs::write(&path, serde_json::to_vec(&trace)?)
                .with_context(|| format!("writing {path}"))?;
        }
    }
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &cmp)?;
            writeln!(out)?;
        }
        Format::Table => write!(out, "{}", mmsp_planner::compare::table(&cmp))?,
    }
    Ok(())
}

fn validate(a: ValidateArgs) -> Result<()> {
    let selected = match &a.engine {
        Some(e) => Engine::parse_list(e)?,
        None => Vec::new(),
    };
    let (text, name) = match &a.table {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|e| mmsp_planner::Error::Io {
                path: path.clone(),
                msg: e.to_string(),
            })?,
            path.clone(),
        ),
        None => (
            mmsp_planner::validate::PUBLISHED.to_string(),
            "validation/published.toml".to_string(),
        ),
    };
    let v = mmsp_planner::validate::validate(&text, &name, &selected)?;
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        }
        Format::Table => write!(out, "{}", mmsp_planner::validate::table(&v))?,
    }
    Ok(())
}
