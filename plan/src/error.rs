//! The contract's one error type: a plan (or a part of one) that cannot be read or is not a
//! plan this build executes. Each message is one line naming the field and what is expected.

/// Why a plan cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("cannot read {path}: {msg}")]
    Io { path: String, msg: String },
    /// The text is not a plan of this schema and version, or a field is wrong.
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    /// Degrees, lengths or ranks that the arithmetic cannot use.
    #[error("invalid {what}: {msg}")]
    Shape { what: &'static str, msg: String },
}

pub type Result<T> = std::result::Result<T, PlanError>;

impl PlanError {
    pub(crate) fn shape(what: &'static str, msg: impl Into<String>) -> Self {
        PlanError::Shape {
            what,
            msg: msg.into(),
        }
    }
}
