//! mmsp-runtime: the distributed attention runtime of mmsp. Communicators (NCCL across
//! GPUs, threads in one process), Ulysses and zigzag ring attention and their 2D
//! combination, on libtorch through tch plus a small C++ shim for the ATen kernels that
//! return the log-sum-exp.
pub mod attn2d;
pub mod comm;
pub mod durable;
pub mod error;
pub mod ffi;
pub mod infer;
pub mod kernel;
pub mod knobs;
pub mod model;
pub mod packed;
pub mod plan;
pub mod ring;
pub mod rng;
pub mod shard;
pub mod testing;
pub mod train;
pub mod ulysses;
pub mod vision;

pub use error::{Result, RuntimeError};
