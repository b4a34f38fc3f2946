//! `mmsp export` flags, turned into an [`ExportRequest`] for `mmsp_planner::export::run`.

use clap::builder::PossibleValue;
use clap::ValueEnum;

use mmsp_planner::export::{Engine, ExportRequest};

/// `--to`: an export engine, with the library's names and descriptions as clap's values.
#[derive(Clone, Copy, Debug)]
pub struct EngineArg(pub Engine);

impl ValueEnum for EngineArg {
    fn value_variants<'a>() -> &'a [Self] {
        const ALL: [EngineArg; 5] = {
            let e = Engine::ALL;
            [
                EngineArg(e[0]),
                EngineArg(e[1]),
                EngineArg(e[2]),
                EngineArg(e[3]),
                EngineArg(e[4]),
            ]
        };
        &ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.0.name()).help(self.0.about()))
    }
}

/// `mmsp export`: flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Target engine.
    #[arg(long = "to", value_enum)]
    pub to: EngineArg,
    /// The plan file written by `mmsp plan --format json`.
    pub plan: String,
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub out: Option<String>,
    /// Rendezvous port for torchrun / SLURM scripts.
    #[arg(long, default_value_t = 29500)]
    pub port: u16,
    /// The runtime binary that the torchrun / SLURM scripts start.
    #[arg(long, default_value = "mmsp-runtime")]
    pub runtime: String,
}

impl ExportArgs {
    /// The library's request for these flags.
    pub fn request(self) -> ExportRequest {
        ExportRequest {
            engine: self.to.0,
            plan: self.plan,
            out: self.out,
            port: self.port,
            runtime: self.runtime,
        }
    }
}
