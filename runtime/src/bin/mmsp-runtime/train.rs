//! `run`: train a plan for N steps and report measured against predicted.
use anyhow::Result;
use clap::Subcommand;

/// Training subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Train a plan (JSON from `mmsp plan --format json`) for N steps and report measured vs
    /// predicted; one process per GPU (RANK/WORLD_SIZE/...) or `--inprocess N` ranks.
    Run {
        plan: std::path::PathBuf,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// A Hugging Face config.json (default: the plan's model).
        #[arg(long, conflicts_with = "tiny")]
        model: Option<std::path::PathBuf>,
        /// The tiny CI model.
        #[arg(long)]
        tiny: bool,
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
            inprocess,
            cpu,
            lr,
            peak_tflops,
            out,
        } => {
            use mmsp_runtime::train::run::{run, ModelSource, RunOptions};
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
            let v = run(&opts)?;
            if !v.is_null() {
                println!("{v}");
            }
            Ok(())
        }
    }
}
