//! `calibrate`: measures the kernels the planner's cost model uses and writes a calibration
//! file for `mmsp plan --calibration FILE`.
use anyhow::Result;
use clap::Subcommand;

/// Calibration subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Measure GEMM, attention and memory-bound throughput on this GPU and write a
    /// calibration file (not implemented yet).
    Calibrate {
        /// Output calibration JSON.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// Runs one calibration subcommand.
pub fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Calibrate { out } => Err(crate::util::usage(format!(
            "calibrate is not implemented yet (would write {})",
            out.display()
        ))),
    }
}
