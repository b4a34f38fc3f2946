//! Hugging Face `config.json` files read into a [`ModelSpec`].
//!
//! `model_type` (else `architectures[0]`) decides the family; a config with neither is read as
//! a Llama-style decoder. The families modelled, with the transformers classes whose defaults
//! and tensors they follow (`src/transformers/models/<family>/configuration_<family>.py` and
//! `modeling_<family>.py`):
//!
//! | family | attention | MLP | tied by default |
//! |---|---|---|---|
//! | llama | causal, GQA, `attention_bias` | SwiGLU | no |
//! | mistral | `sliding_window` on every layer (null: none) | SwiGLU | no |
//! | qwen2 (also the LLM of qwen2_vl / qwen2_5_vl) | q/k/v biases; `use_sliding_window` on layers >= `max_window_layers` | SwiGLU | no |
//! | gemma | `head_dim` | GeGLU (same weights as SwiGLU) | yes |
//! | gemma2 | `sliding_window` on even layers (or `layer_types`), logit soft-capping, 4 norms a layer | GeGLU | yes |
//! | phi3 | fused `qkv_proj` (same weights), `sliding_window` | fused `gate_up_proj` | no |
//! | mixtral | as mistral | `num_local_experts`, `num_experts_per_tok` | no |
//! | qwen2_moe | as qwen2 | `num_experts`, `moe_intermediate_size`, shared expert + gate | no |
//!
//! Vision-language wrappers are read as their language model: LLaVA-style `text_config`, VILA's
//! `llm_cfg`, Qwen2-VL's top-level decoder (its `vision_config` is the encoder, M-RoPE rotates
//! the same head dimensions as RoPE: no cost change). The encoder of a LLaVA-style config is read
//! by `--vision` from the same file ([`super::vision::VisionSpec::load`]).
//!
//! Families and fields that change the cost in ways the planner does not model (DeepSeek's MLA
//! and DeepSeekMoE, multi-token prediction, MLP biases, partly dense MoE stacks, ...) are
//! refused by name, in one line.

use serde_json::{Map, Value};

use super::model::{ModelSpec, MoeSpec};
use crate::error::{Error, Result};

type Obj = Map<String, Value>;

/// A modelled decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// No `model_type` nor `architectures`: a Llama-style decoder, every size field required.
    Plain,
    Llama,
    Mistral,
    Qwen2,
    Gemma,
    Gemma2,
    Phi3,
    Mixtral,
    Qwen2Moe,
}

const SUPPORTED: &str =
    "llama, mistral, qwen2, gemma, gemma2, phi3, mixtral, qwen2_moe, and LLaVA/VILA/Qwen2-VL around them";

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Plain => "llama-style",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Phi3 => "phi3",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
        }
    }

    /// The family of a `model_type`, or why it is refused.
    fn of_model_type(t: &str) -> std::result::Result<Family, String> {
        Ok(match t {
            // The original LLaVA and VILA checkpoints write the Llama decoder's fields flat
            // under these (haotian-liu/LLaVA `LlavaConfig(LlamaConfig)`, NVlabs/VILA).
            "llama" | "llava" | "llava_llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" | "qwen2_vl" | "qwen2_vl_text" | "qwen2_5_vl" | "qwen2_5_vl_text" => {
                Family::Qwen2
            }
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "phi3" => Family::Phi3,
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "deepseek_v2" | "deepseek_v3" => {
                return Err(format!(
                    "model_type '{t}' is not modelled: its multi-head latent attention \
                     (kv_lora_rank) and DeepSeekMoE layers (n_routed_experts, \
                     first_k_dense_replace) cost differently from the decoders the planner \
                     models ({SUPPORTED})"
                ))
            }
            _ => {
                return Err(format!(
                    "model_type '{t}' is not a family the planner models (expected {SUPPORTED})"
                ))
            }
        })
    }

    /// The family of an `architectures` entry (`<Family>ForCausalLM`).
    fn of_architecture(a: &str) -> std::result::Result<Family, String> {
        let t = match a {
            "LlamaForCausalLM" | "LlavaLlamaForCausalLM" | "LlavaLlamaModel" => "llama",
            "MistralForCausalLM" => "mistral",
            "Qwen2ForCausalLM" => "qwen2",
            "Qwen2VLForConditionalGeneration" => "qwen2_vl",
            "GemmaForCausalLM" => "gemma",
            "Gemma2ForCausalLM" => "gemma2",
            "Phi3ForCausalLM" => "phi3",
            "MixtralForCausalLM" => "mixtral",
            "Qwen2MoeForCausalLM" => "qwen2_moe",
            "DeepseekV2ForCausalLM" => "deepseek_v2",
            "DeepseekV3ForCausalLM" => "deepseek_v3",
            _ => {
                return Err(format!(
                    "architecture '{a}' is not a family the planner models (expected {SUPPORTED})"
                ))
            }
        };
        Family::of_model_type(t)
    }

    /// transformers' default for a size field absent from the config, where the planner knows
    /// it: `LlamaConfig`, `MistralConfig` and `Qwen2Config` `__init__` defaults (LLaVA-1.5's
    /// `text_config` names only what differs from them).
    fn default_u64(self, key: &str) -> Option<u64> {
        let (vocab, hidden, ffn, layers, heads, kv) = match self {
            Family::Llama => (32000, 4096, 11008, 32, 32, 32),
            Family::Mistral => (32000, 4096, 14336, 32, 32, 8),
            Family::Qwen2 => (151936, 4096, 22016, 32, 32, 32),
            _ => return None,
        };
        Some(match key {
            "vocab_size" => vocab,
            "hidden_size" => hidden,
            "intermediate_size" => ffn,
            "num_hidden_layers" => layers,
            "num_attention_heads" => heads,
            "num_key_value_heads" => kv,
            _ => return None,
        })
    }
}

/// One config object being read, with where it sits in the file for messages.
struct Reader<'a> {
    cfg: &'a Obj,
    at: &'static str,
    path: &'a str,
    family: Family,
}

impl Reader<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Parse {
            path: self.path.into(),
            msg,
        }
    }

    /// A field that is present and not null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.cfg.get(key).filter(|v| !v.is_null())
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().filter(|&n| n > 0).map(Some).ok_or_else(|| {
                self.err(format!(
                    "field '{}{key}' must be a positive integer, got {v}",
                    self.at
                ))
            }),
        }
    }

    /// A size field: the config's value, else the family's transformers default.
    fn need(&self, key: &str) -> Result<u64> {
        match self.opt_u64(key)? {
            Some(v) => Ok(v),
            None => self.family.default_u64(key).ok_or_else(|| {
                self.err(format!(
                    "missing or zero required field '{}{key}' (a positive integer)",
                    self.at
                ))
            }),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.err(format!(
                    "field '{}{key}' must be true or false, got {v}",
                    self.at
                ))
            }),
        }
    }

    fn opt_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }
}

/// Parses `text` (a Hugging Face `config.json`) into a spec named `name`; `path` is used in
/// messages. The result is validated by the caller.
pub(crate) fn parse(text: &str, path: &str, name: &str) -> Result<ModelSpec> {
    let perr = |msg: String| Error::Parse {
        path: path.into(),
        msg,
    };
    let root: Value = serde_json::from_str(text)
        .map_err(|e| perr(format!("not a Hugging Face config.json: {e}").replace('\n', " ")))?;
    let top = root
        .as_object()
        .ok_or_else(|| perr("not a Hugging Face config.json: expected a JSON object".into()))?;
    let (cfg, at) = language_model(top).map_err(perr)?;
    let family = family_of(top, cfg).map_err(perr)?;
    let r = Reader {
        cfg,
        at,
        path,
        family,
    };
    refuse_unmodelled(&r)?;
    read(&r, name)
}

/// The object holding the language model's fields: `text_config` (LLaVA, transformers-5
/// Qwen2-VL), `llm_cfg` (VILA), else the top level.
fn language_model(top: &Obj) -> std::result::Result<(&Obj, &'static str), String> {
    for key in ["text_config", "llm_cfg"] {
        match top.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => {
                return Ok((
                    o,
                    if key == "text_config" {
                        "text_config."
                    } else {
                        "llm_cfg."
                    },
                ))
            }
            Some(Value::String(s)) => {
                return Err(format!(
                    "'{key}' points to '{s}': pass that language model's config.json as --model"
                ))
            }
            Some(v) => return Err(format!("'{key}' must be an object, got {v}")),
        }
    }
    Ok((top, ""))
}

/// `model_type` of the language model's object, else of the top level when it names a
/// language-model family, else `architectures[0]`; neither: [`Family::Plain`].
fn family_of(top: &Obj, cfg: &Obj) -> std::result::Result<Family, String> {
    let model_type = |o: &Obj| {
        o.get("model_type")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let arch = |o: &Obj| {
        o.get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if let Some(t) = model_type(cfg) {
        return Family::of_model_type(&t);
    }
    if let Some(a) = arch(cfg) {
        return Family::of_architecture(&a);
    }
    if !std::ptr::eq(top, cfg) {
        // A wrapper whose language model names no family: LLaVA's default text model is Llama.
        return Ok(Family::Llama);
    }
    Ok(Family::Plain)
}

/// Fields that change the cost in ways the planner does not model: present and not null,
/// false, zero or empty, each is refused by name.
const UNMODELLED: &[(&str, &str)] = &[
    ("kv_lora_rank", "multi-head latent attention"),
    ("q_lora_rank", "multi-head latent attention"),
    ("n_routed_experts", "DeepSeekMoE routed experts"),
    ("n_shared_experts", "DeepSeekMoE shared experts"),
    (
        "first_k_dense_replace",
        "dense layers before the MoE layers",
    ),
    ("moe_layer_freq", "MoE on some layers only"),
    ("num_nextn_predict_layers", "multi-token prediction layers"),
    ("mlp_bias", "biases in the MLP"),
    ("cross_attention_layers", "cross-attention layers"),
    ("mlp_only_layers", "dense layers among the MoE layers"),
];

fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    }
}

fn refuse_unmodelled(r: &Reader) -> Result<()> {
    for (key, what) in UNMODELLED {
        if let Some(v) = r.cfg.get(*key).filter(|v| is_set(v)) {
            return Err(r.err(format!(
                "field '{}{key}' = {v} ({what}) is not modelled by the planner's cost model",
                r.at
            )));
        }
    }
    let experts = ["num_local_experts", "num_experts", "moe_intermediate_size"];
    if !matches!(r.family, Family::Mixtral | Family::Qwen2Moe) {
        if let Some(k) = experts.iter().find(|k| r.get(k).is_some_and(is_set)) {
            return Err(r.err(format!(
                "field '{}{k}' (experts) in a {} config: only mixtral and qwen2_moe experts are \
                 modelled; refusing to plan it as a dense model",
                r.at,
                r.family.name()
            )));
        }
    }
    if r.family == Family::Qwen2Moe {
        let step = r.opt_u64("decoder_sparse_step")?.unwrap_or(1);
        if step != 1 {
            return Err(r.err(format!(
                "field '{}decoder_sparse_step' = {step} (MoE on every {step}th layer only) is \
                 not modelled; expected 1 (every layer sparse)",
                r.at
            )));
        }
    }
    Ok(())
}

/// The spec of a config whose family is known and whose unmodelled fields were refused.
fn read(r: &Reader, name: &str) -> Result<ModelSpec> {
    let f = r.family;
    let hidden_size = r.need("hidden_size")?;
    let num_heads = r.need("num_attention_heads")?;
    let num_layers = r.need("num_hidden_layers")?;
    let vocab_size = r.need("vocab_size")?;
    let num_kv_heads = match r.opt_u64("num_key_value_heads")? {
        Some(kv) => kv,
        None => f.default_u64("num_key_value_heads").unwrap_or(num_heads),
    };
    let head_dim = r.opt_u64("head_dim")?.unwrap_or(hidden_size / num_heads);
    let moe = experts(r)?;
    let intermediate_size = match &moe {
        Some(e) => {
            e.experts_per_token * e.expert_intermediate_size + e.shared_expert_intermediate_size
        }
        None => r.need("intermediate_size")?,
    };
    let tied_default = matches!(f, Family::Gemma | Family::Gemma2);
    let qwen = matches!(f, Family::Qwen2 | Family::Qwen2Moe);
    // Qwen2's q, k, v projections always have biases (`Qwen2Attention`: bias=True).
    let qkv_bias = qwen || r.opt_bool("attention_bias")?.unwrap_or(false);
    let (sliding_window, sliding_window_layers) = sliding(r, num_layers)?;
    let gemma2 = f == Family::Gemma2;
    let softcap = |key: &str, default: f64| {
        if gemma2 {
            Some(r.opt_f64(key).unwrap_or(default))
        } else {
            None
        }
    };
    Ok(ModelSpec {
        name: name.into(),
        hidden_size,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size,
        num_layers,
        vocab_size,
        tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(tied_default),
        qkv_bias,
        family: (f != Family::Plain).then(|| f.name().to_owned()),
        sliding_window,
        sliding_window_layers,
        moe,
        // Gemma2DecoderLayer: post_attention_layernorm and post_feedforward_layernorm besides
        // input_layernorm and pre_feedforward_layernorm.
        extra_norms_per_layer: if gemma2 { 2 } else { 0 },
        // Gemma2Config defaults: attn_logit_softcapping 50.0, final_logit_softcapping 30.0.
        attn_logit_softcapping: softcap("attn_logit_softcapping", 50.0),
        final_logit_softcapping: softcap("final_logit_softcapping", 30.0),
        rope_theta: r.opt_f64("rope_theta").filter(|t| *t > 0.0).or_else(|| {
            r.get("rope_parameters")?
                .get("rope_theta")?
                .as_f64()
                .filter(|t| t.is_finite() && *t > 0.0)
        }),
    })
}

/// The experts of a Mixtral or Qwen2-MoE config (`MixtralConfig` defaults 8 experts, 2 per
/// token; `Qwen2MoeConfig` 60 and 4), None for dense families.
fn experts(r: &Reader) -> Result<Option<MoeSpec>> {
    let need_or = |key: &str, d: u64| -> Result<u64> { Ok(r.opt_u64(key)?.unwrap_or(d)) };
    Ok(match r.family {
        Family::Mixtral => Some(MoeSpec {
            num_experts: need_or("num_local_experts", 8)?,
            experts_per_token: need_or("num_experts_per_tok", 2)?,
            expert_intermediate_size: r.need("intermediate_size")?,
            shared_expert_intermediate_size: 0,
        }),
        Family::Qwen2Moe => Some(MoeSpec {
            num_experts: need_or("num_experts", 60)?,
            experts_per_token: need_or("num_experts_per_tok", 4)?,
            expert_intermediate_size: r.need("moe_intermediate_size")?,
            shared_expert_intermediate_size: r
                .opt_u64("shared_expert_intermediate_size")?
                .unwrap_or(0),
        }),
        _ => None,
    })
}

/// (window, layers with it). `layer_types` when given (transformers >= 4.53 writes it);
/// else per family: mistral, mixtral and phi3 window every layer when `sliding_window` is set
/// (`MistralConfig` defaults it to 4096); qwen2 / qwen2_moe only with `use_sliding_window`,
/// on the layers from `max_window_layers` on (`Qwen2Config.layer_types`); gemma2 on the even
/// layers (`Gemma2DecoderLayer.is_sliding = not bool(layer_idx % 2)`), default window 4096.
fn sliding(r: &Reader, layers: u64) -> Result<(Option<u64>, u64)> {
    let f = r.family;
    let default = match f {
        Family::Mistral | Family::Gemma2 if !r.cfg.contains_key("sliding_window") => Some(4096),
        _ => None,
    };
    let Some(window) = r.opt_u64("sliding_window")?.or(default) else {
        return Ok((None, 0));
    };
    // Qwen2Config drops the window unless use_sliding_window, whatever layer_types says.
    let qwen = matches!(f, Family::Qwen2 | Family::Qwen2Moe);
    if qwen && !r.opt_bool("use_sliding_window")?.unwrap_or(false) {
        return Ok((None, 0));
    }
    if let Some(types) = r.get("layer_types").and_then(Value::as_array) {
        let n = types
            .iter()
            .filter(|t| t.as_str() == Some("sliding_attention"))
            .count() as u64;
        return Ok(((n > 0).then_some(window), n));
    }
    let n = match f {
        Family::Mistral | Family::Mixtral | Family::Phi3 => layers,
        Family::Qwen2 | Family::Qwen2Moe => {
            let full = r.opt_u64("max_window_layers")?.unwrap_or(28).min(layers);
            layers - full
        }
        Family::Gemma2 => layers.div_ceil(2),
        Family::Plain | Family::Llama | Family::Gemma => {
            return Err(r.err(format!(
                "field '{}sliding_window' = {window} in a {} config: sliding-window attention is \
                 modelled for mistral, mixtral, phi3, qwen2 and gemma2 (set model_type)",
                r.at,
                f.name()
            )))
        }
    };
    Ok(((n > 0).then_some(window), n))
}

#[cfg(test)]
mod tests {
    use super::super::vision::VisionSpec;
    use super::*;

    fn fixture(dir: &str) -> (String, String) {
        let path = format!(
            "{}/../tests/data/hf/{dir}/config.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap();
        (path, text)
    }

    fn spec(dir: &str) -> ModelSpec {
        let (path, text) = fixture(dir);
        crate::spec::model::from_hf_json(&text, &path, dir).unwrap()
    }

    /// Published total (and, for experts, active) parameter counts; sources in
    /// tests/data/hf/README.md. LLaVA counts its CLIP encoder and projector too.
    const PUBLISHED: &[(&str, f64, Option<f64>)] = &[
        ("llama-3-8b", 8.03e9, None),
        ("llama-3-70b", 70.6e9, None),
        ("mistral-7b-v0.1", 7.24e9, None),
        ("mixtral-8x7b-v0.1", 46.7e9, Some(12.9e9)),
        ("qwen2-7b", 7.62e9, None),
        ("qwen2.5-72b", 72.7e9, None),
        ("gemma-2-9b", 9_241_705_984.0, None),
        ("phi-3-mini-4k", 3.82e9, None),
        ("qwen1.5-moe-a2.7b", 14.3e9, Some(2.7e9)),
        ("llava-1.5-7b", 7.06e9, None),
    ];

    fn counted(dir: &str) -> (f64, f64) {
        let m = spec(dir);
        let mut total = m.params() as f64;
        let mut active = m.active_params() as f64;
        if dir.starts_with("llava") {
            let (path, _) = fixture(dir);
            let v = VisionSpec::load(&path).unwrap();
            let enc = (v.params() + v.projector_params(m.hidden_size)) as f64;
            total += enc;
            active += enc;
        }
        (total, active)
    }

    #[test]
    fn ten_real_configs_match_their_published_parameter_counts() {
        for &(dir, published, active_published) in PUBLISHED {
            let (total, active) = counted(dir);
            let err = (total - published).abs() / published;
            // The table of the fixtures' README (`-- --nocapture` shows it).
            println!(
                "| {dir} | {published:.4e} | {total:.0} | {:+.3}% | {} |",
                (total - published) / published * 100.0,
                active_published.map_or("-".into(), |a| format!(
                    "{active:.0} vs {a:.3e} ({:+.2}%)",
                    (active - a) / a * 100.0
                ))
            );
            assert!(err < 0.005, "{dir}: {total} vs published {published}");
            if let Some(a) = active_published {
                let err = (active - a).abs() / a;
                assert!(err < 0.005, "{dir}: active {active} vs published {a}");
                assert!(active < 0.3 * total, "{dir}: active {active} of {total}");
            } else {
                assert_eq!(active, total, "{dir}");
            }
        }
    }

    #[test]
    fn families_read_their_attention() {
        let mistral = spec("mistral-7b-v0.1");
        assert_eq!(mistral.family.as_deref(), Some("mistral"));
        assert_eq!(
            (mistral.sliding_window, mistral.sliding_window_layers),
            (Some(4096), 32)
        );
        let gemma = spec("gemma-2-9b");
        assert_eq!(
            (gemma.sliding_window, gemma.sliding_window_layers),
            (Some(4096), 21)
        );
        assert!(gemma.tie_word_embeddings);
        assert_eq!((gemma.head_dim, gemma.q_dim()), (256, 4096));
        assert_eq!(gemma.extra_norms_per_layer, 2);
        assert_eq!(gemma.attn_logit_softcapping, Some(50.0));
        assert_eq!(gemma.final_logit_softcapping, Some(30.0));
        // Gemma 2 report (arXiv:2408.00118) Table 2: 8,324,201,984 non-embedding parameters.
        assert_eq!(gemma.params() - gemma.embedding_params(), 8_324_201_984);
        let phi = spec("phi-3-mini-4k");
        assert_eq!(
            (phi.sliding_window, phi.sliding_window_layers),
            (Some(2047), 32)
        );
        // Qwen2 carries a sliding_window but use_sliding_window is false: full attention.
        let qwen = spec("qwen2-7b");
        assert_eq!((qwen.sliding_window, qwen.qkv_bias), (None, true));
        assert_eq!(
            qwen.params(),
            crate::spec::model::load("qwen2-7b").unwrap().params()
        );
        let mixtral = spec("mixtral-8x7b-v0.1");
        assert_eq!(mixtral.sliding_window, None);
        assert_eq!(mixtral.intermediate_size, 2 * 14336);
        let llama = spec("llama-3-8b");
        assert_eq!(
            llama,
            ModelSpec {
                name: "llama-3-8b".into(),
                family: Some("llama".into()),
                rope_theta: Some(500_000.0),
                ..crate::spec::model::load("llama3-8b").unwrap()
            }
        );
    }

    #[test]
    fn vision_language_configs_read_their_language_model() {
        // LLaVA-1.5's text_config names only what differs from LlamaConfig's defaults.
        let llava = spec("llava-1.5-7b");
        assert_eq!(
            (llava.hidden_size, llava.num_layers, llava.vocab_size),
            (4096, 32, 32064)
        );
        assert_eq!(llava.intermediate_size, 11008);
        // Qwen2-VL-7B's decoder is Qwen2-7B's; mrope and vision_config do not change it.
        let vl = spec("qwen2-vl-7b");
        assert_eq!(vl.params(), 7_615_616_512);
        assert_eq!(vl.family.as_deref(), Some("qwen2"));
    }

    #[test]
    fn rope_theta_is_read_in_both_transformers_layouts() {
        assert_eq!(spec("llama-3-8b").rope_theta, Some(500_000.0));
        let v5 = r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}"#;
        assert_eq!(parse(v5, "v5.json", "v5").unwrap().rope_theta, Some(1e6));
        let none = v5.replace("\"rope_theta\": 1000000.0", "\"factor\": 1.0");
        assert_eq!(parse(&none, "none.json", "none").unwrap().rope_theta, None);
    }

    #[test]
    fn vila_and_flat_llava_configs_read_the_llama_decoder() {
        let llama = crate::spec::model::load("llama3-8b").unwrap();
        let dims = r#""hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256"#;
        let vila = format!(
            r#"{{"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
            "llm_cfg": {{"architectures": ["LlamaForCausalLM"], "model_type": "llama", {dims}}},
            "vision_tower_cfg": {{"model_type": "siglip_vision_model"}}}}"#
        );
        let flat = format!(r#"{{"architectures": ["LlavaLlamaForCausalLM"], {dims}}}"#);
        for text in [vila, flat] {
            let m = crate::spec::model::from_hf_json(&text, "c.json", "x").unwrap();
            assert_eq!(m.params(), llama.params(), "{text}");
            assert_eq!(m.family.as_deref(), Some("llama"));
        }
    }

    #[test]
    fn qwen2_windows_only_the_layers_from_max_window_layers_when_asked() {
        let (path, text) = fixture("qwen2-7b");
        let on = text.replace(
            "\"use_sliding_window\": false",
            "\"use_sliding_window\": true",
        );
        let on = on.replace("\"max_window_layers\": 28", "\"max_window_layers\": 20");
        let m = crate::spec::model::from_hf_json(&on, &path, "q").unwrap();
        assert_eq!(
            (m.sliding_window, m.sliding_window_layers),
            (Some(131072), 8)
        );
        // transformers >= 4.53 lists the layers instead; that list wins, but only with
        // use_sliding_window (Qwen2Config sets the window to None without it).
        let types =
            "\"use_cache\": true, \"layer_types\": [\"sliding_attention\", \"full_attention\"],";
        let typed = on.replace("\"use_cache\": true,", types);
        let m = crate::spec::model::from_hf_json(&typed, &path, "q").unwrap();
        assert_eq!(
            (m.sliding_window, m.sliding_window_layers),
            (Some(131072), 1)
        );
        let off = text.replace("\"use_cache\": true,", types);
        let m = crate::spec::model::from_hf_json(&off, &path, "q").unwrap();
        assert_eq!((m.sliding_window, m.sliding_window_layers), (None, 0));
    }

    #[test]
    fn sliding_window_costs_the_band() {
        let m = spec("mistral-7b-v0.1");
        // At or under the window: the whole causal square.
        assert_eq!(m.attention_work_fraction(4096.0), 1.0);
        // 512K tokens, window 4K on every layer: (2SW - W^2) / S^2.
        let s = 524_288.0;
        let w = 4096.0;
        let f = m.attention_work_fraction(s);
        assert!((f - (2.0 * s * w - w * w) / (s * s)).abs() < 1e-12, "{f}");
        assert!(f < 0.016);
        // Gemma-2: half the layers local, so about half the work at long context.
        let g = spec("gemma-2-9b");
        let fg = g.attention_work_fraction(s);
        assert!((0.5..0.51).contains(&fg), "{fg}");
        // Exactly the counted band on a small case: S = 8, W = 3 gives 3*8 - 4.5 = 19.5 pairs
        // (the discrete count 1+2+3*6 = 21 up to the diagonal's half-pairs, as the causal S^2/2).
        let mut t = m.clone();
        t.sliding_window = Some(3);
        assert!((t.attention_work_fraction(8.0) - 19.5 / 32.0).abs() < 1e-12);
    }

    fn refusal(text: &str) -> String {
        crate::spec::model::from_hf_json(text, "c.json", "x")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unmodelled_configs_are_refused_by_name() {
        let (_, ds) = fixture("deepseek-v3-excerpt");
        let e = refusal(&ds);
        assert!(
            e.contains("deepseek_v3") && e.contains("kv_lora_rank"),
            "{e}"
        );
        let e = refusal(r#"{"model_type": "gemma3", "hidden_size": 8}"#);
        assert!(e.contains("'gemma3'") && e.contains("mixtral"), "{e}");
        let e = refusal(
            r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 10,
            "num_local_experts": 8}"#,
        );
        assert!(
            e.contains("num_local_experts") && e.contains("dense"),
            "{e}"
        );
        let e = refusal(r#"{"model_type": "llama", "mlp_bias": true}"#);
        assert!(e.contains("'mlp_bias'"), "{e}");
        let e = refusal(r#"{"model_type": "qwen2_moe", "decoder_sparse_step": 2}"#);
        assert!(e.contains("decoder_sparse_step"), "{e}");
        let e = refusal(r#"{"model_type": "llava", "text_config": "./llm"}"#);
        assert!(e.contains("text_config") && e.contains("./llm"), "{e}");
        for e in [refusal(&ds), refusal("{}"), refusal("[1]")] {
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
