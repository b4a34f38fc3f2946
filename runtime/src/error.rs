//! The crate's one error type.
use thiserror::Error;

/// Everything that can go wrong in the runtime. Validation errors are raised before any
/// collective starts, so that a bad shape or plan is a message and never a hang.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("invalid shape: {0}")]
    Shape(String),
    #[error("invalid layout: {0}")]
    Layout(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("invalid training data: {0}")]
    Data(String),
    #[error("invalid plan: {0}")]
    Plan(String),
    #[error("launch does not match the plan: {0}")]
    Launch(String),
    #[error("libtorch error: {0}")]
    Torch(String),
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("communication error: {0}")]
    Comm(String),
    #[error("a peer rank left or failed during a collective: {0}")]
    PeerGone(String),
    #[error("collective timed out after {0} s: {1}")]
    Timeout(u64, String),
    #[error("NCCL error: {0}")]
    Nccl(String),
    #[error("CUDA error: {0}")]
    Cuda(String),
    #[error("rendezvous error: {0}")]
    Rendezvous(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<tch::TchError> for RuntimeError {
    fn from(e: tch::TchError) -> Self {
        RuntimeError::Torch(e.to_string())
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, RuntimeError>;

impl RuntimeError {
    /// Whether this is the user's input (a plan, config, shape, layout or launch that does
    /// not fit), reported with exit code 2, rather than a failure of the run.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            RuntimeError::Plan(_)
                | RuntimeError::Config(_)
                | RuntimeError::Data(_)
                | RuntimeError::Launch(_)
                | RuntimeError::Shape(_)
                | RuntimeError::Layout(_)
                | RuntimeError::Json(_)
        )
    }
}

/// The plan contract's errors: a plan that cannot be read or used is a plan error (the message
/// names the file and the field), lengths the shard arithmetic cannot cut are shape errors.
impl From<mmsp_plan::PlanError> for RuntimeError {
    fn from(e: mmsp_plan::PlanError) -> Self {
        match e {
            mmsp_plan::PlanError::Shape { what, msg } => {
                RuntimeError::Shape(format!("{what}: {msg}"))
            }
            other => RuntimeError::Plan(other.to_string()),
        }
    }
}
