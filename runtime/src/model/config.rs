//! Decoder configuration: read from a Hugging Face `config.json` (Llama / Qwen2 / Mistral
//! style), from the `model` object of a plan, or the tiny CI model.
use super::rope::RopeScaling;
use crate::error::{Result, RuntimeError};
use mmsp_plan::ModelSpec;
use serde::Deserialize;
use serde_json::Value;
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
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    /// The context the checkpoint was trained for (`max_position_embeddings`; None when the
    /// model does not come from a config.json): the original length of a rope scaling that
    /// does not name one, and what a run past it is warned about.
    pub max_position_embeddings: Option<usize>,
}

/// The fields of a Hugging Face `config.json` that the decoder's math depends on; the
/// others (token ids, dtype, versions) are kept verbatim by `--save-hf`, not read here.
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
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    /// Transformers 4.x: `{"rope_type" | "type": ..., "factor": ...}`.
    rope_scaling: Option<Value>,
    /// Transformers 5.x: `{"rope_type": ..., "rope_theta": ..., ...}`.
    rope_parameters: Option<Value>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    partial_rotary_factor: Option<f64>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<Value>,
    attention_dropout: Option<f64>,
    /// Transformers 5: per-layer attention kinds ("full_attention" or "sliding_attention").
    layer_types: Option<Vec<String>>,
}

fn refuse(field: &str, value: impl std::fmt::Display, expected: &str) -> RuntimeError {
    RuntimeError::Config(format!(
        "config.json: {field} = {value} is not supported (expected {expected})"
    ))
}

/// Reads `rope_scaling` / `rope_parameters` (their rope type, factor and the type's own
/// fields), as Transformers' `ROPE_INIT_FUNCTIONS` name them.
fn rope_scaling(v: &Value, max_pos: Option<usize>) -> Result<RopeScaling> {
    let field = |k: &str| v.get(k).and_then(Value::as_f64);
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |k: &str| {
        field(k).ok_or_else(|| {
            RuntimeError::Config(format!(
                "config.json: rope_scaling of type {kind} has no {k}"
            ))
        })
    };
    let original = |from_cfg: Option<usize>| -> Result<f64> {
        field("original_max_position_embeddings")
            .or(from_cfg.map(|m| m as f64))
            .ok_or_else(|| {
                RuntimeError::Config(format!(
                    "config.json: rope_scaling of type {kind} needs original_max_position_embeddings \
                     or max_position_embeddings"
                ))
            })
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: original(max_pos)?,
        },
        "yarn" => {
            let old = original(max_pos)?;
            // Transformers 5: without a factor, the ratio of the two lengths.
            let factor = match (field("factor"), max_pos) {
                (Some(f), _) => f,
                (None, Some(m)) => m as f64 / old,
                (None, None) => need("factor")?,
            };
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (
                field("attention_factor"),
                field("mscale"),
                field("mscale_all_dim"),
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: old,
                beta_fast: field("beta_fast").unwrap_or(32.0),
                beta_slow: field("beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: v.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            }
        }
        other => {
            return Err(refuse(
                "rope_scaling type",
                other,
                "default, linear, llama3 or yarn (dynamic NTK changes the frequencies with the \
                 sequence length; longrope needs per-dimension factors)",
            ))
        }
    })
}

impl HfConfig {
    /// Refuses, by name, every field whose value would change the math the decoder does.
    fn check_supported(&self) -> Result<()> {
        let arch = self.model_type.as_deref().unwrap_or("llama");
        if !["llama", "qwen2", "mistral"].contains(&arch) {
            return Err(refuse("model_type", arch, "llama, qwen2 or mistral"));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(refuse("hidden_act", act, "silu (SwiGLU)"));
        }
        if self.mlp_bias == Some(true) {
            return Err(refuse("mlp_bias", true, "false"));
        }
        if arch != "qwen2" && self.attention_bias == Some(true) {
            // Transformers' Llama puts that bias on o_proj too.
            return Err(refuse(
                "attention_bias",
                true,
                "false for llama/mistral (o_proj bias)",
            ));
        }
        if let Some(f) = self.partial_rotary_factor.filter(|f| *f != 1.0) {
            return Err(refuse("partial_rotary_factor", f, "1.0"));
        }
        let window = self.sliding_window.as_ref().filter(|w| !w.is_null());
        let windowed = match arch {
            "qwen2" => self.use_sliding_window == Some(true),
            _ => window.is_some(),
        };
        if windowed {
            return Err(refuse(
                "sliding_window",
                window.map_or("on".to_string(), |w| w.to_string()),
                "null / use_sliding_window false (full causal attention)",
            ));
        }
        if let Some(t) = self
            .layer_types
            .iter()
            .flatten()
            .find(|t| *t != "full_attention")
        {
            return Err(refuse("layer_types", t, "full_attention in every layer"));
        }
        if let Some(p) = self.attention_dropout.filter(|p| *p != 0.0) {
            return Err(refuse("attention_dropout", p, "0.0"));
        }
        Ok(())
    }
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
            rope_scaling: RopeScaling::None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: None,
        }
    }

    /// Parses a Hugging Face `config.json` text (Transformers 4.x or 5.x layout). Defaults
    /// are Transformers' own for the model type (rope_theta 10000, rms_norm_eps 1e-6).
    pub fn from_hf_json(text: &str) -> Result<ModelConfig> {
        let h: HfConfig = serde_json::from_str(text)
            .map_err(|e| RuntimeError::Config(format!("model config.json: {e}")))?;
        h.check_supported()?;
        let heads = h.num_attention_heads;
        if heads == 0 {
            return Err(RuntimeError::Config("num_attention_heads is 0".into()));
        }
        let qwen = h.model_type.as_deref() == Some("qwen2");
        let params = h.rope_parameters.as_ref();
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(h.rope_theta)
            .unwrap_or(10000.0);
        let scaling = match params.or(h.rope_scaling.as_ref()) {
            Some(v) if !v.is_null() => rope_scaling(v, h.max_position_embeddings)?,
            _ => RopeScaling::None,
        };
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
            rope_theta: theta,
            rope_scaling: scaling,
            rms_norm_eps: h.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: h.max_position_embeddings,
        };
        c.validate()?;
        Ok(c)
    }

    /// Reads a Hugging Face `config.json` file.
    pub fn from_hf_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RuntimeError::Config(format!("{}: {e}", path.display())))?;
        Self::from_hf_json(&text)
            .map_err(|e| RuntimeError::Config(format!("{}: {e}", path.display())))
    }
}

/// The first feature of a planned model that the runtime's decoder does not have.
fn unsupported(m: &ModelSpec) -> Option<&'static str> {
    if m.moe.is_some() {
        Some("mixture-of-experts layers (moe)")
    } else if m.sliding_window.is_some() || m.sliding_window_layers > 0 {
        Some("sliding-window attention (sliding_window)")
    } else if m.extra_norms_per_layer > 0 {
        Some("extra norms per layer (extra_norms_per_layer, Gemma-2)")
    } else if m.attn_logit_softcapping.is_some() || m.final_logit_softcapping.is_some() {
        Some("logit soft-capping (Gemma-2)")
    } else {
        None
    }
}

impl ModelConfig {
    /// The model described by a plan's `model` (eps 1e-5, as Llama 3; the RoPE base is the
    /// plan's, else Llama 3's 500000). What the planner's HF families add and the decoder does
    /// not have is refused rather than run as another model.
    pub fn from_plan_model(m: &ModelSpec) -> Result<ModelConfig> {
        if let Some(what) = unsupported(m) {
            let family = m.family.as_deref().unwrap_or("this");
            return Err(RuntimeError::Plan(format!(
                "the plan's {family} model has {what}, which mmsp-runtime does not train (it \
                 runs dense Llama/Qwen2-style decoders with full causal attention)"
            )));
        }
        let dim = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let c = ModelConfig {
            hidden_size: dim(m.hidden_size),
            num_heads: dim(m.num_heads),
            num_kv_heads: dim(m.num_kv_heads),
            head_dim: dim(m.head_dim),
            intermediate_size: dim(m.intermediate_size),
            num_layers: dim(m.num_layers),
            vocab_size: dim(m.vocab_size),
            tie_word_embeddings: m.tie_word_embeddings,
            qkv_bias: m.qkv_bias,
            rope_theta: m.rope_theta.unwrap_or(500000.0),
            rope_scaling: RopeScaling::None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: None,
        };
        c.validate()?;
        Ok(c)
    }

    /// The plan's model of this decoder (named `name`), for plans made without the planner
    /// (tests, tools): what [`ModelConfig::from_plan_model`] reads back.
    pub fn to_plan_model(&self, name: &str) -> ModelSpec {
        let n = |x: usize| x as u64;
        ModelSpec {
            hidden_size: n(self.hidden_size),
            num_heads: n(self.num_heads),
            num_kv_heads: n(self.num_kv_heads),
            head_dim: n(self.head_dim),
            intermediate_size: n(self.intermediate_size),
            num_layers: n(self.num_layers),
            vocab_size: n(self.vocab_size),
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.qkv_bias,
            rope_theta: Some(self.rope_theta),
            ..ModelSpec::dense(name)
        }
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

#[cfg(test)]
mod plan_model_tests {
    use super::*;

    /// A plan's model: the contract's type, read from JSON as a plan holds it.
    fn model(extra: serde_json::Value) -> ModelSpec {
        let mut m = serde_json::json!({
            "name": "m", "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "num_layers": 2, "vocab_size": 100,
            "tie_word_embeddings": false, "qkv_bias": false
        });
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        serde_json::from_value(m).unwrap()
    }

    #[test]
    fn planned_features_the_decoder_lacks_are_refused_by_name() {
        let plain = ModelConfig::from_plan_model(&model(serde_json::json!({"family": "llama"})));
        assert_eq!(plain.unwrap().rope_theta, 500000.0);
        let qwen = ModelConfig::from_plan_model(&model(serde_json::json!({"rope_theta": 1e6})));
        assert_eq!(qwen.unwrap().rope_theta, 1e6);
        let cases = [
            (
                serde_json::json!({"family": "mixtral", "moe": {"num_experts": 8,
                    "experts_per_token": 2, "expert_intermediate_size": 64}}),
                "mixture-of-experts",
            ),
            (
                serde_json::json!({"family": "mistral", "sliding_window": 4096}),
                "sliding-window",
            ),
            (
                serde_json::json!({"family": "gemma2", "extra_norms_per_layer": 2}),
                "extra norms",
            ),
            (
                serde_json::json!({"final_logit_softcapping": 30.0}),
                "soft-capping",
            ),
        ];
        for (extra, want) in cases {
            let e = ModelConfig::from_plan_model(&model(extra))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        }
    }
}
