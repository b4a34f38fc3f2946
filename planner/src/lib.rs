//! mmsp planner: models a GPU cluster and the cost of multi-modal sequence parallelism
//! (Ulysses x zigzag ring "2D attention"), searches parallel layouts for a model and context
//! length, and emits a versioned plan that the runtime executes. Pure Rust: no GPU crates.

pub mod balance;
pub mod calibration;
pub mod campaign;
pub mod compare;
pub mod cost;
pub mod engines;
pub mod error;
pub mod export;
pub mod inference;
pub mod multimodal;
pub mod pipeline;
pub mod plan;
pub mod render;
pub mod report;
pub mod search;
pub mod sim;
pub mod spec;
pub mod topology;
pub mod units;
pub mod validate;

pub use error::{Error, Result};
