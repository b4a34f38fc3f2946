//! Language-model specs: built-in presets and Hugging Face `config.json` files, validated into
//! [`ModelSpec`], with the parameter counts the memory and compute models need.

use crate::error::{Error, Result};

pub use mmsp_plan::{ModelSpec, MoeSpec};

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
        hidden_size: h,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: h / heads,
        intermediate_size: ffn,
        num_layers: layers,
        vocab_size: vocab,
        qkv_bias: bias,
        ..ModelSpec::dense(name)
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

/// A preset by name, or a Hugging Face `config.json` by path.
pub fn load(arg: &str) -> Result<ModelSpec> {
    if let Some(p) = PRESETS.iter().find(|p| p.name == arg) {
        return Ok((p.spec)());
    }
    let path = std::path::Path::new(arg);
    if arg.ends_with(".json") || path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: arg.into(),
            msg: e.to_string(),
        })?;
        // A model directory's `config.json` is named after its directory.
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
        let dir = path
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|s| s.to_str());
        let stem = match dir {
            Some(d) if stem == "config" => d,
            _ => stem,
        };
        return from_hf_json(&text, arg, stem);
    }
    Err(Error::UnknownPreset {
        kind: "model",
        name: arg.into(),
        expected: preset_names().join(", "),
    })
}

/// Parses a Hugging Face `config.json` text; `path` is used in messages. The family comes
/// from `model_type` / `architectures` (see [`super::hf`]); a field that would change the
/// cost and that the planner does not model is refused by name.
pub fn from_hf_json(text: &str, path: &str, name: &str) -> Result<ModelSpec> {
    let spec = super::hf::parse(text, path, name)?;
    spec.validate().map_err(|msg| Error::Parse {
        path: path.into(),
        msg,
    })?;
    Ok(spec)
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
        let m = crate::spec::model::from_hf_json(text, "c.json", "x").unwrap();
        assert_eq!(m.params(), 8_030_261_248);
    }

    #[test]
    fn hf_config_missing_field_is_named() {
        let text = r#"{"hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 1,
            "num_hidden_layers": 2}"#;
        let err = crate::spec::model::from_hf_json(text, "c.json", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("intermediate_size"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn unknown_preset_lists_presets() {
        let err = crate::spec::model::load("gpt5").unwrap_err().to_string();
        assert!(err.contains("llama3-8b") && err.contains("gpt5"), "{err}");
    }
}
