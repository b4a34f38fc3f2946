//! The language model of the runtime: a Llama/Qwen2-style decoder (RMSNorm, RoPE on each
//! shard's own token positions, GQA, SwiGLU, optional q/k/v bias, tied or untied
//! embeddings) whose parameters carry their Hugging Face names. Attention is a callback, so
//! the same layers run with single-device attention (inference, references) or with 2D
//! sequence-parallel attention (training, [`crate::train`]).
pub mod config;
pub mod decoder;
pub mod hf;
pub mod params;
pub mod rope;

pub use config::ModelConfig;
pub use decoder::{Decoder, Input};
pub use params::NamedParams;
pub use rope::{Rope, RopeScaling};
