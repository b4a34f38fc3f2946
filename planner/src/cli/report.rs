//! `mmsp report` flags, turned into a [`ReportRequest`] for `mmsp_planner::report::run`.

use std::path::PathBuf;

use mmsp_planner::cost::Recompute;
use mmsp_planner::report::ReportRequest;
use mmsp_planner::search::Strategy;

use super::tokens_arg;

fn strategy_arg(s: &str) -> std::result::Result<Strategy, String> {
    Strategy::parse(s).map_err(|e| e.to_string())
}

fn recompute_arg(s: &str) -> std::result::Result<Recompute, String> {
    Recompute::parse_requested(s)
}

/// `mmsp report`: flags. Every list is comma-separated.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// Folder to write report.html, report.md, max_context.csv, points.csv and report.json to.
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
    /// GPU counts to sweep.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64,128,256,512,1024",
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub gpus: Vec<u32>,
    /// Context lengths to sweep (K = 1024, M = 1048576).
    #[arg(long, value_delimiter = ',', default_value = "32K,64K,128K,256K,512K,1M,2M,4M",
          value_parser = tokens_arg)]
    pub contexts: Vec<u64>,
    /// Model presets or Hugging Face config.json files.
    #[arg(long, value_delimiter = ',', default_value = "llama3-8b")]
    pub models: Vec<String>,
    /// Topology presets or TOML files.
    #[arg(long, value_delimiter = ',', default_value = "dgx-h100")]
    pub topologies: Vec<String>,
    /// Strategies to compare.
    #[arg(long, value_delimiter = ',', default_value = "2d,ring,ulysses,megatron-cp-tp,te-a2a-p2p",
          value_parser = strategy_arg)]
    pub strategies: Vec<Strategy>,
    /// Recompute policies for the largest-context sweep (the performance sweep searches both):
    /// none, or full (mmsp-runtime's recompute of each layer outside attention).
    #[arg(long, value_delimiter = ',', default_value = "none,full", value_parser = recompute_arg)]
    pub recompute: Vec<Recompute>,
    /// GPU count for the per-context charts [default: 256 if swept, else the largest swept].
    #[arg(long)]
    pub focus_gpus: Option<u32>,
    /// Global batch in sequences for the performance sweep [default: 4M tokens' worth].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub global_batch: Option<u64>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl ReportArgs {
    /// The library's request for these flags.
    pub fn request(self) -> ReportRequest {
        ReportRequest {
            out: self.out,
            gpus: self.gpus,
            contexts: self.contexts,
            models: self.models,
            topologies: self.topologies,
            strategies: self.strategies,
            recompute: self.recompute,
            focus_gpus: self.focus_gpus,
            global_batch: self.global_batch,
            quiet: self.quiet,
        }
    }
}
