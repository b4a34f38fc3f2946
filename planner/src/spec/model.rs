//! Language-model specs: built-in presets and Hugging Face `config.json` files, validated into
//! [`ModelSpec`], with the parameter counts the memory and compute models need.

use serde::Deserialize;

use crate::error::{Error, Result};

/// A Llama/Qwen2-style decoder (RMSNorm, RoPE, SwiGLU MLP, grouped-query attention).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub hidden_size: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
    pub num_layers: u64,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v projections (Qwen2 has them, Llama does not).
    pub qkv_bias: bool,
}

/// The fields of a Hugging Face `config.json` the planner reads; others are ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    hidden_size: Option<u64>,
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    intermediate_size: Option<u64>,
    num_hidden_layers: Option<u64>,
    vocab_size: Option<u64>,
    head_dim: Option<u64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    model_type: Option<String>,
}

#[cfg_attr(not(test), allow(dead_code))]
struct Preset {
    name: &'static str,
    /// Published parameter count, for the tests (source in `source`).
    published_params: u64,
    source: &'static str,
    spec: fn() -> ModelSpec,
}

#[allow(clippy::too_many_arguments)]
fn llama(
    name: &str,
    h: u64,
    heads: u64,
    kv: u64,
    ffn: u64,
    layers: u64,
    vocab: u64,
    bias: bool,
) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        hidden_size: h,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: h / heads,
        intermediate_size: ffn,
        num_layers: layers,
        vocab_size: vocab,
        tie_word_embeddings: false,
        qkv_bias: bias,
    }
}

const PRESETS: &[Preset] = &[
    Preset {
        name: "llama3-8b",
        published_params: 8_030_261_248,
        source: "meta-llama/Meta-Llama-3-8B config.json; 8.03B in the model card",
        spec: || llama("llama3-8b", 4096, 32, 8, 14336, 32, 128256, false),
    },
    Preset {
        name: "llama2-7b",
        published_params: 6_738_415_616,
        source: "meta-llama/Llama-2-7b-hf config.json; 6.74B (Touvron et al. 2023, Table 1 '7B')",
        spec: || llama("llama2-7b", 4096, 32, 32, 11008, 32, 32000, false),
    },
    Preset {
        name: "qwen2-7b",
        published_params: 7_615_616_512,
        source: "Qwen/Qwen2-7B config.json; 7.62B in the model card",
        spec: || llama("qwen2-7b", 3584, 28, 4, 18944, 28, 152064, true),
    },
    Preset {
        name: "llama3-70b",
        published_params: 70_553_706_496,
        source: "meta-llama/Meta-Llama-3-70B config.json; 70.6B in the model card",
        spec: || llama("llama3-70b", 8192, 64, 8, 28672, 80, 128256, false),
    },
];

/// Names of the built-in model presets.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

impl ModelSpec {
    /// A preset by name, or a Hugging Face `config.json` by path.
    pub fn load(arg: &str) -> Result<Self> {
        if let Some(p) = PRESETS.iter().find(|p| p.name == arg) {
            return Ok((p.spec)());
        }
        let path = std::path::Path::new(arg);
        if arg.ends_with(".json") || path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
                path: arg.into(),
                msg: e.to_string(),
            })?;
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
            return Self::from_hf_json(&text, arg, stem);
        }
        Err(Error::UnknownPreset {
            kind: "model",
            name: arg.into(),
            expected: preset_names().join(", "),
        })
    }

    /// Parses a Hugging Face `config.json` text; `path` is used in messages.
    pub fn from_hf_json(text: &str, path: &str, name: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| Error::Parse {
            path: path.into(),
            msg: format!("not a Hugging Face config.json: {e}"),
        })?;
        let need = |v: Option<u64>, field: &str| {
            v.filter(|&x| x > 0).ok_or_else(|| Error::Parse {
                path: path.into(),
                msg: format!("missing or zero required field '{field}' (a positive integer)"),
            })
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_heads);
        let spec = ModelSpec {
            name: name.into(),
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            num_layers,
            vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: raw
                .attention_bias
                .unwrap_or(raw.model_type.as_deref() == Some("qwen2")),
        };
        spec.validate().map_err(|msg| Error::Parse {
            path: path.into(),
            msg,
        })?;
        Ok(spec)
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 {
            return Err("head_dim must be positive".into());
        }
        Ok(())
    }

    /// Width of the K (or V) projection output: kv heads x head dim.
    pub fn kv_dim(&self) -> u64 {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the Q projection output: heads x head dim (equals hidden size in most models).
    pub fn q_dim(&self) -> u64 {
        self.num_heads * self.head_dim
    }

    /// Weights of the GEMMs of one decoder layer (q, k, v, o projections and the three SwiGLU
    /// matrices): the `P_layer` of the 2*P FLOPs-per-token rule (Kaplan et al. 2020, Sec. 2.1).
    pub fn layer_matmul_params(&self) -> u64 {
        let h = self.hidden_size;
        let attn = h * self.q_dim() + 2 * h * self.kv_dim() + self.q_dim() * h;
        let mlp = 3 * h * self.intermediate_size;
        attn + mlp
    }

    /// All parameters of one decoder layer: GEMM weights, q/k/v biases, two RMSNorm weights.
    pub fn layer_params(&self) -> u64 {
        let bias = if self.qkv_bias {
            self.q_dim() + 2 * self.kv_dim()
        } else {
            0
        };
        self.layer_matmul_params() + bias + 2 * self.hidden_size
    }

    /// Input embedding plus output head (once if tied).
    pub fn embedding_params(&self) -> u64 {
        let e = self.vocab_size * self.hidden_size;
        if self.tie_word_embeddings {
            e
        } else {
            2 * e
        }
    }

    /// Total parameters: layers, embeddings, final norm.
    pub fn params(&self) -> u64 {
        self.num_layers * self.layer_params() + self.embedding_params() + self.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_params_match_published_sizes() {
        for p in PRESETS {
            let spec = (p.spec)();
            assert_eq!(
                spec.params(),
                p.published_params,
                "{} ({})",
                p.name,
                p.source
            );
        }
    }

    #[test]
    fn hf_config_reads_and_ignores_unknown_fields() {
        let text = r#"{"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 128256,
            "rope_theta": 500000.0, "architectures": ["LlamaForCausalLM"]}"#;
        let m = ModelSpec::from_hf_json(text, "c.json", "x").unwrap();
        assert_eq!(m.params(), 8_030_261_248);
    }

    #[test]
    fn hf_config_missing_field_is_named() {
        let text = r#"{"hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 1,
            "num_hidden_layers": 2}"#;
        let err = ModelSpec::from_hf_json(text, "c.json", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("intermediate_size"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn unknown_preset_lists_presets() {
        let err = ModelSpec::load("gpt5").unwrap_err().to_string();
        assert!(err.contains("llama3-8b") && err.contains("gpt5"), "{err}");
    }
}
