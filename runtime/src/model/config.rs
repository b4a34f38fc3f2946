//! Decoder configuration: read from a Hugging Face `config.json` (Llama / Qwen2 / Mistral
//! style), from the `model` object of a plan, or the tiny CI model.
use crate::error::{Result, RuntimeError};
use serde::Deserialize;
use std::path::Path;

/// Shape and numerics of a Llama/Qwen2-style decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    num_hidden_layers: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
}

/// The `model` object of a plan JSON.
#[derive(Deserialize)]
struct PlanModel {
    hidden_size: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    intermediate_size: usize,
    num_layers: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    qkv_bias: bool,
}

impl ModelConfig {
    /// The CI model: 2 layers, hidden 64, 4 heads, 2 kv heads, vocab 128.
    pub fn tiny() -> ModelConfig {
        ModelConfig {
            hidden_size: 64,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            intermediate_size: 128,
            num_layers: 2,
            vocab_size: 128,
            tie_word_embeddings: false,
            qkv_bias: false,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
        }
    }

    /// Parses a Hugging Face `config.json` text.
    pub fn from_hf_json(text: &str) -> Result<ModelConfig> {
        let h: HfConfig = serde_json::from_str(text)
            .map_err(|e| RuntimeError::Config(format!("model config.json: {e}")))?;
        let heads = h.num_attention_heads;
        if heads == 0 {
            return Err(RuntimeError::Config("num_attention_heads is 0".into()));
        }
        let qwen = h.model_type.as_deref() == Some("qwen2");
        let c = ModelConfig {
            hidden_size: h.hidden_size,
            num_heads: heads,
            num_kv_heads: h.num_key_value_heads.unwrap_or(heads),
            head_dim: h.head_dim.unwrap_or(h.hidden_size / heads),
            intermediate_size: h.intermediate_size,
            num_layers: h.num_hidden_layers,
            vocab_size: h.vocab_size,
            tie_word_embeddings: h.tie_word_embeddings,
            qkv_bias: h.attention_bias.unwrap_or(qwen),
            rope_theta: h.rope_theta.unwrap_or(10000.0),
            rms_norm_eps: h.rms_norm_eps.unwrap_or(1e-6),
        };
        c.validate()?;
        Ok(c)
    }

    /// Reads a Hugging Face `config.json` file.
    pub fn from_hf_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RuntimeError::Config(format!("{}: {e}", path.display())))?;
        Self::from_hf_json(&text)
    }

    /// The model described by a plan's `model` object (rope_theta 500000 and eps 1e-5, as
    /// Llama 3; the plan does not carry them).
    pub fn from_plan_value(v: &serde_json::Value) -> Result<ModelConfig> {
        let m: PlanModel = serde_json::from_value(v.clone())
            .map_err(|e| RuntimeError::Plan(format!("model: {e}")))?;
        let c = ModelConfig {
            hidden_size: m.hidden_size,
            num_heads: m.num_heads,
            num_kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            intermediate_size: m.intermediate_size,
            num_layers: m.num_layers,
            vocab_size: m.vocab_size,
            tie_word_embeddings: m.tie_word_embeddings,
            qkv_bias: m.qkv_bias,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the dimensions are usable.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.num_layers,
            self.vocab_size,
        ];
        if dims.contains(&0) {
            return Err(RuntimeError::Config(format!("zero dimension in {self:?}")));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(RuntimeError::Config(format!(
                "{} heads are not a multiple of {} kv heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(RuntimeError::Config(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim
            )));
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps > 0.0) {
            return Err(RuntimeError::Config(
                "rope_theta and rms_norm_eps must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Parameters of the whole model.
    pub fn num_params(&self) -> usize {
        let (h, d) = (self.hidden_size, self.head_dim);
        let q = self.num_heads * d;
        let kv = self.num_kv_heads * d;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * self.intermediate_size + 2 * h;
        let emb = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        self.num_layers * layer + emb + head + h
    }

    /// Matmul FLOPs of one token's forward, excluding attention scores (2 per multiply-add).
    pub fn dense_flops_per_token(&self) -> f64 {
        self.layer_flops_per_token() + self.head_flops_per_token()
    }

    /// The decoder layers' share of [`Self::dense_flops_per_token`] (what recompute repeats).
    pub fn layer_flops_per_token(&self) -> f64 {
        let (h, d) = (self.hidden_size as f64, self.head_dim as f64);
        let q = self.num_heads as f64 * d;
        let kv = self.num_kv_heads as f64 * d;
        let layer = 2.0 * (h * q + 2.0 * h * kv + q * h + 3.0 * h * self.intermediate_size as f64);
        self.num_layers as f64 * layer
    }

    /// The LM head's share of [`Self::dense_flops_per_token`].
    pub fn head_flops_per_token(&self) -> f64 {
        2.0 * self.hidden_size as f64 * self.vocab_size as f64
    }

    /// Causal attention FLOPs (QK^T and PV) of the forward over one sequence of `s` tokens.
    pub fn attention_flops(&self, s: usize) -> f64 {
        let s = s as f64;
        // 2 matmuls x 2 flops x s^2/2 (causal) x heads x head_dim, per layer.
        2.0 * s * s * (self.num_heads * self.head_dim) as f64 * self.num_layers as f64
    }
}
