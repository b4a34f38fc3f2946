//! `run`: train a plan for N steps and report measured against predicted. Without
//! `--inprocess` and without a launcher's environment (torchrun's RANK, SLURM's
//! SLURM_PROCID) it starts one process per local GPU itself.
use anyhow::Result;
use clap::{Args, Subcommand};

/// Training subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Train a plan (JSON from `mmsp plan --format json`) for N steps and report measured vs
    /// predicted; one process per GPU (started here, or by torchrun/SLURM) or `--inprocess N`
    /// thread ranks on one device.
    Run(Box<RunArgs>),
}

/// The arguments of `run`.
#[derive(Args)]
pub struct RunArgs {
    plan: std::path::PathBuf,
    #[arg(long, default_value_t = 3, conflicts_with = "tokens")]
    steps: usize,
    /// Train for this many tokens instead of --steps (rounded up to whole steps of the
    /// plan's context x DP).
    #[arg(long)]
    tokens: Option<u64>,
    /// A Hugging Face model directory (config.json with model.safetensors or its
    /// sharded index: the pretrained weights are trained), or a config.json alone
    /// (random weights of that shape) [default: the plan's model, random weights].
    #[arg(long, conflicts_with = "tiny")]
    model: Option<std::path::PathBuf>,
    /// Training data: a .jsonl of {"text": ...} (tokenized with the model directory's
    /// tokenizer.json) or {"prompt": ..., "completion": ...} (loss on the completion
    /// only), or of token-id lists; a .npy of token ids; a Megatron-LM indexed dataset
    /// (PREFIX.bin beside PREFIX.idx) [default: synthetic ids].
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Seed of the order in which the data's sequences are taken, one shuffle per epoch
    /// (0: file order).
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    /// Let tokens attend across the documents a sequence packs (Megatron's default); without
    /// it each document is a sample of its own (document-masked attention, positions
    /// restarting), padded to a multiple of 2 x SP.
    #[arg(long)]
    cross_document_attention: bool,
    /// Learning-rate warmup steps (linear from 0 to --lr).
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Cosine decay after warmup, reaching --min-lr-ratio x --lr at this step (0:
    /// constant after warmup).
    #[arg(long, default_value_t = 0)]
    decay_steps: usize,
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Clip gradients to this global L2 norm (over all shards; 0: off).
    #[arg(long, default_value_t = 0.0)]
    clip_grad: f64,
    /// Append one JSON line per step (loss, grad norm, lr, tokens/s, MFU, memory).
    #[arg(long)]
    metrics: Option<std::path::PathBuf>,
    /// Write a Hugging Face model directory (config.json, safetensors, tokenizer files)
    /// at the end, and every --save-every steps when set.
    #[arg(long)]
    save_hf: Option<std::path::PathBuf>,
    /// dtype of --save-hf's tensors: bf16, f16 or f32 [default: the input checkpoint's,
    /// else bf16 on the GPU, f32 with --cpu].
    #[arg(long, value_parser = parse_dtype, requires = "save_hf")]
    save_hf_dtype: Option<tch::Kind>,
    /// Largest safetensors file of --save-hf, in MiB, before the next shard starts.
    #[arg(long, default_value_t = 5120, requires = "save_hf")]
    save_hf_shard_mib: u64,
    /// The tiny CI model (and, for a plan with a vision section, a tiny encoder making the
    /// plan's tokens per frame).
    #[arg(long)]
    tiny: bool,
    /// A Hugging Face vision config.json for a plan with a vision section (default: the
    /// plan's encoder preset, or the tiny encoder with --tiny).
    #[arg(long)]
    vision_config: Option<std::path::PathBuf>,
    /// Run the plan's ranks as threads on one device.
    #[arg(long)]
    inprocess: Option<usize>,
    /// Run on the CPU in float32.
    #[arg(long)]
    cpu: bool,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Peak dense bf16 TFLOP/s of one GPU, for MFU (H100 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    peak_tflops: f64,
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Write a checkpoint (model, optimizer, step) into this directory at the end.
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// Also checkpoint (--save and --save-hf) after every K steps (counted from the first
    /// step of training).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Resume from a checkpoint directory written by --save (same plan and model).
    #[arg(long)]
    resume: Option<std::path::PathBuf>,
    /// Write a Chrome trace-event JSON (Perfetto) of every rank's step phases.
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
    /// Profile the last step's device kernels (libtorch's Kineto/CUPTI profiler): a
    /// Chrome trace here (`.rankN` added per process when several), the kernel list
    /// beside it (`.kernels.tsv`) and a summary in the report (`kernel_profile`).
    #[arg(long)]
    kernel_trace: Option<std::path::PathBuf>,
    /// Bitwise-reproducible run: deterministic ATen algorithms and cuDNN, fixed cuBLAS
    /// workspace, FlashAttention-2 on CUDA (an op without a deterministic implementation
    /// is an error; measured on H100: two runs and a resumed run equal bit for bit, ~14%
    /// slower at 8K tokens).
    #[arg(long)]
    deterministic: bool,
    /// Attention kernel: cudnn or flash on CUDA, cpu on the CPU [default: cudnn on CUDA,
    /// flash with --deterministic].
    #[arg(long, value_parser = parse_backend)]
    attn_backend: Option<mmsp_runtime::kernel::Backend>,
    /// No per-step progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

/// Runs one training subcommand.
pub fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run(args) => {
            let RunArgs {
                plan,
                steps,
                tokens,
                model,
                data,
                data_seed,
                cross_document_attention,
                warmup_steps,
                decay_steps,
                min_lr_ratio,
                clip_grad,
                metrics,
                save_hf,
                save_hf_dtype,
                save_hf_shard_mib,
                tiny,
                vision_config,
                inprocess,
                cpu,
                lr,
                peak_tflops,
                out,
                save,
                save_every,
                resume,
                trace,
                kernel_trace,
                deterministic,
                attn_backend,
                quiet,
            } = *args;
            use mmsp_runtime::train::run::{
                load, run_vlm, should_spawn, spawn_local, ModelSource, RunExtras, RunOptions,
                VisionOptions,
            };
            use mmsp_runtime::train::session::{LrSchedule, SaveHf};
            let model = match (tiny, model) {
                (true, _) => ModelSource::Tiny,
                (false, Some(p)) if p.is_dir() => ModelSource::HfDir(p),
                (false, Some(p)) => ModelSource::HfConfig(p),
                (false, None) => ModelSource::Plan,
            };
            check_schedule(min_lr_ratio, clip_grad, warmup_steps, decay_steps)?;
            let mut opts = RunOptions {
                plan,
                steps,
                model,
                inprocess,
                cpu,
                lr,
                peak_flops: peak_tflops * 1e12,
                out,
            };
            if let Some(n) = tokens {
                // Whole steps of the plan's context x DP.
                opts.steps = 1;
                let l = load(&opts)?;
                let per_step = (l.tp.context_tokens * l.plan.layout.dp) as u64;
                opts.steps = n.div_ceil(per_step).max(1) as usize;
            }
            if should_spawn(&opts) {
                let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                spawn_local(&opts, &args, std::time::Duration::from_secs(30))?;
                return Ok(());
            }
            if deterministic && std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
                // cuBLAS's fixed workspace, read when cuBLAS starts (later than this): the
                // binary sets it, the library does not touch the environment.
                std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
            }
            let extras = RunExtras {
                knobs: mmsp_runtime::knobs::Knobs::from_env()?,
                save,
                save_every,
                resume,
                trace,
                progress: !quiet,
                kernel_trace,
                deterministic,
                attn_backend,
                data,
                data_seed,
                cross_document_attention,
                schedule: Some(LrSchedule {
                    peak: lr,
                    warmup_steps,
                    decay_steps,
                    min_ratio: min_lr_ratio,
                }),
                max_grad_norm: clip_grad,
                metrics,
                save_hf: save_hf.map(|dir| SaveHf {
                    dir,
                    dtype: save_hf_dtype,
                    max_shard_bytes: save_hf_shard_mib << 20,
                }),
            };
            let vopts = VisionOptions {
                config: vision_config,
            };
            if let Some(report) = run_vlm(&opts, &extras, &vopts)? {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(())
        }
    }
}

/// The learning-rate schedule's and clipping's flags, checked against each other.
fn check_schedule(
    min_lr_ratio: f64,
    clip_grad: f64,
    warmup_steps: usize,
    decay_steps: usize,
) -> Result<()> {
    if !(0.0..=1.0).contains(&min_lr_ratio) || clip_grad < 0.0 {
        return Err(mmsp_runtime::RuntimeError::Config(format!(
            "--min-lr-ratio {min_lr_ratio} must be in [0, 1] and --clip-grad {clip_grad} >= 0"
        ))
        .into());
    }
    if decay_steps > 0 && decay_steps <= warmup_steps {
        return Err(mmsp_runtime::RuntimeError::Config(format!(
            "--decay-steps {decay_steps} must be past --warmup-steps {warmup_steps}"
        ))
        .into());
    }
    Ok(())
}

fn parse_backend(s: &str) -> Result<mmsp_runtime::kernel::Backend, String> {
    mmsp_runtime::kernel::Backend::parse(s)
        .map_err(|_| format!("unknown attention backend {s:?} (expected cudnn, flash or cpu)"))
}

fn parse_dtype(s: &str) -> Result<tch::Kind, String> {
    match s {
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        "f16" | "float16" => Ok(tch::Kind::Half),
        "f32" | "float32" => Ok(tch::Kind::Float),
        _ => Err(format!("unknown dtype {s:?} (expected bf16, f16 or f32)")),
    }
}
