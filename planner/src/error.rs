//! The planner's one error type. Every variant renders as a single line that names what is
//! wrong and what is expected; the CLI prints it and exits with code 2.

use thiserror::Error;

/// Errors of the planner library: bad inputs (specs, flags, files, plans) and solver failures.
/// Infeasible *candidates* are not errors: see [`crate::search::Infeasible`].
#[derive(Debug, Error)]
pub enum Error {
    /// A value given by the user is malformed or out of range.
    #[error("invalid {what}: {msg}")]
    Invalid { what: String, msg: String },
    /// A named preset does not exist.
    #[error("unknown {kind} '{name}' (expected one of: {expected}, or a path to a file)")]
    UnknownPreset {
        kind: &'static str,
        name: String,
        expected: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {msg}")]
    Io { path: String, msg: String },
    /// A file could be read but not parsed as what it should be.
    #[error("{path}: {msg}")]
    Parse { path: String, msg: String },
    /// A line of a JSON-lines file (such as a sample manifest) is wrong.
    #[error("{path}:{line}: field '{field}': {msg}")]
    Line {
        path: String,
        line: usize,
        field: String,
        msg: String,
    },
    /// The request cannot be served by any candidate plan.
    #[error("{0}")]
    NoFeasiblePlan(String),
    /// An optimisation solver failed (the caller may fall back to a heuristic).
    #[error("solver failed: {0}")]
    Solver(String),
    /// A target engine cannot express a plan (export), so no config is written.
    #[error("{engine} cannot express this plan: {msg}")]
    Unsupported { engine: &'static str, msg: String },
}

impl Error {
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The plan contract's errors, as the planner words them.
impl From<mmsp_plan::PlanError> for Error {
    fn from(e: mmsp_plan::PlanError) -> Self {
        match e {
            mmsp_plan::PlanError::Io { path, msg } => Error::Io { path, msg },
            mmsp_plan::PlanError::Invalid { path, msg } => Error::Parse { path, msg },
            mmsp_plan::PlanError::Shape { what, msg } => Error::Invalid {
                what: what.into(),
                msg,
            },
        }
    }
}
