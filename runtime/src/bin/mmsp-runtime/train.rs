//! `run`: train a plan for N steps and report measured against predicted. Without
//! `--inprocess` and without a launcher's environment (torchrun's RANK, SLURM's
//! SLURM_PROCID) it starts one process per local GPU itself.
use anyhow::Result;
use clap::Subcommand;

/// Training subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Train a plan (JSON from `mmsp plan --format json`) for N steps and report measured vs
    /// predicted; one process per GPU (started here, or by torchrun/SLURM) or `--inprocess N`
    /// thread ranks on one device.
    Run {
        plan: std::path::PathBuf,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// A Hugging Face config.json (default: the plan's model).
        #[arg(long, conflicts_with = "tiny")]
        model: Option<std::path::PathBuf>,
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
        /// Also checkpoint after every K steps (counted from the first step of training).
        #[arg(long, default_value_t = 0, requires = "save")]
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
    },
}

/// Runs one training subcommand.
pub fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run {
            plan,
            steps,
            model,
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
        } => {
            use mmsp_runtime::train::run::{
                run_vlm, should_spawn, spawn_local, ModelSource, RunExtras, RunOptions,
                VisionOptions,
            };
            let model = match (tiny, model) {
                (true, _) => ModelSource::Tiny,
                (false, Some(p)) => ModelSource::HfConfig(p),
                (false, None) => ModelSource::Plan,
            };
            let opts = RunOptions {
                plan,
                steps,
                model,
                inprocess,
                cpu,
                lr,
                peak_flops: peak_tflops * 1e12,
                out,
            };
            if should_spawn(&opts) {
                let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                spawn_local(&opts, &args, std::time::Duration::from_secs(30))?;
                return Ok(());
            }
            let extras = RunExtras {
                save,
                save_every,
                resume,
                trace,
                progress: !quiet,
                kernel_trace,
                deterministic,
                attn_backend,
            };
            let vopts = VisionOptions {
                config: vision_config,
            };
            let v = run_vlm(&opts, &extras, &vopts)?;
            if !v.is_null() {
                println!("{v}");
            }
            Ok(())
        }
    }
}

fn parse_backend(s: &str) -> Result<mmsp_runtime::kernel::Backend, String> {
    mmsp_runtime::kernel::Backend::parse(s)
        .map_err(|_| format!("unknown attention backend {s:?} (expected cudnn, flash or cpu)"))
}
