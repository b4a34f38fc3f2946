//! `mmsp-runtime`: executes mmsp plans on GPUs and benchmarks the runtime, printing one JSON
//! object per line. Subcommands: `run` (train a plan), `infer` and `needle` (inference),
//! `bench`, `check`, `bf16-error`, `nccl-check`, `nccl-bench` (attention), `calibrate`
//! (kernel curves for the planner). Bad input (flags,
//! plans, launches that do not match the plan) ends with one line and exit code 2; a failure
//! of the run itself with exit code 1.
mod attn;
mod calibrate;
mod infer;
mod train;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mmsp-runtime",
    about = "mmsp runtime: run plans, benchmarks and checks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Train(train::Cmd),
    #[command(flatten)]
    Infer(infer::Cmd),
    #[command(flatten)]
    Attn(attn::Cmd),
    #[command(flatten)]
    Calibrate(calibrate::Cmd),
}

/// The caching allocator's configuration when the user sets none: expandable segments, which
/// grow one mapping instead of caching fixed blocks, so long-context steps fragment less
/// (measured on an H100 at 112K tokens: 74.2 against 76.3 GiB reserved for the same 71.9 GiB
/// of tensors, and 128K tokens fit only with it; `runtime/bench/results/h100-sxm/raw/
/// h100_runE_memory_determinism.jsonl`). libtorch reads it when CUDA first allocates, which is
/// after this.
const DEFAULT_ALLOC_CONF: &str = "expandable_segments:True";

fn main() {
    if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none() {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", DEFAULT_ALLOC_CONF);
    }
    // One line per panic instead of the default report: libtorch's out-of-memory arrives as a
    // panic of tch's infallible calls and is reported again as the run's error (named rank,
    // exit 1), so it is not repeated here.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        if !msg.contains("out of memory") {
            let at = info.location().map(|l| l.to_string()).unwrap_or_default();
            let first = msg.lines().next().unwrap_or_default();
            eprintln!("panic at {at}: {first}");
        }
    }));
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Train(c) => train::dispatch(c),
        Cmd::Infer(c) => infer::dispatch(c),
        Cmd::Attn(c) => attn::dispatch(c),
        Cmd::Calibrate(c) => calibrate::dispatch(c),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(if util::is_bad_input(&e) { 2 } else { 1 });
    }
}
