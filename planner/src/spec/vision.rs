//! Vision encoder specs: the ViT that turns video frames into tokens in stage 1 of MM-SP.
//!
//! A [`VisionSpec`] comes from a built-in preset ([`VisionSpec::preset`]) or from a Hugging Face
//! `config.json` ([`VisionSpec::load`]); the balancer uses [`VisionSpec::flops_per_frame`] as the
//! per-frame cost and [`VisionSpec::tokens_per_frame`] to lay the frames' tokens out in the LLM
//! sequence.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// A ViT-style vision encoder (pre-LN transformer over image patches) plus the number of LLM
/// tokens each frame becomes after the projector / pooling.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisionSpec {
    pub name: String,
    /// Square input side in pixels that the encoder is configured for (frames without an explicit
    /// resolution are resized to this).
    pub image_size: u32,
    pub patch_size: u32,
    pub hidden_size: u64,
    pub num_layers: u32,
    pub num_heads: u32,
    pub intermediate_size: u64,
    /// LLM tokens per frame after the projector (e.g. 2x2 pooling), at `image_size`.
    pub tokens_per_frame: u64,
}

/// Names accepted by [`VisionSpec::preset`].
const PRESETS: &[&str] = &["siglip-so400m", "siglip-so400m-nopool", "clip-vit-l-336"];

/// Names of the built-in vision encoder presets.
pub fn preset_names() -> &'static [&'static str] {
    PRESETS
}

impl VisionSpec {
    /// A built-in vision encoder.
    ///
    /// * `siglip-so400m`: SigLIP so400m-patch14-384 (Zhai et al. 2023; Hugging Face
    ///   `google/siglip-so400m-patch14-384` config: 27 layers, hidden 1152, 16 heads, MLP 4304,
    ///   384 px, patch 14 -> 27x27 = 729 patches) as used by VILA/LongVILA, whose `mlp_downsample`
    ///   projector merges 2x2 neighbouring patches (27x27 padded to 28x28 -> 14x14) into
    ///   **196 tokens per frame**. Cross-check: LongVILA (Chen et al. 2024, arXiv:2408.10188)
    ///   reports 1400 frames = 274k context, i.e. ~196 tokens per frame.
    /// * `siglip-so400m-nopool`: the same encoder with a plain MLP projector (729 tokens/frame).
    /// * `clip-vit-l-336`: CLIP ViT-L/14-336 (Radford et al. 2021; `openai/clip-vit-large-patch14-336`:
    ///   24 layers, hidden 1024, 16 heads, MLP 4096, 336 px -> 576 patches), LLaVA-1.5 style
    ///   projector without pooling (576 tokens/frame).
    pub fn preset(name: &str) -> Result<Self> {
        let spec = match name {
            "siglip-so400m" | "siglip-so400m-nopool" => VisionSpec {
                name: name.to_string(),
                image_size: 384,
                patch_size: 14,
                hidden_size: 1152,
                num_layers: 27,
                num_heads: 16,
                intermediate_size: 4304,
                tokens_per_frame: if name == "siglip-so400m" { 196 } else { 729 },
            },
            "clip-vit-l-336" => VisionSpec {
                name: name.to_string(),
                image_size: 336,
                patch_size: 14,
                hidden_size: 1024,
                num_layers: 24,
                num_heads: 16,
                intermediate_size: 4096,
                tokens_per_frame: 576,
            },
            _ => {
                return Err(Error::UnknownPreset {
                    kind: "vision encoder",
                    name: name.to_string(),
                    expected: PRESETS.join(", "),
                })
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    /// A preset name, or a path to a Hugging Face `config.json` whose vision fields are either
    /// nested under `vision_config` (SigLIP / CLIP / LLaVA-style) or at the top level (a bare
    /// vision model config). Unknown fields are ignored. `tokens_per_frame` is not an HF field:
    /// it is read if present (in `vision_config` or at the top level), else it defaults to the
    /// patch count (no pooling).
    pub fn load(arg: &str) -> Result<Self> {
        if PRESETS.contains(&arg) {
            return Self::preset(arg);
        }
        let path = Path::new(arg);
        if !path.exists() {
            // Not a preset and not a file: report as an unknown preset (the message mentions paths).
            return Self::preset(arg);
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: arg.to_string(),
            msg: e.to_string(),
        })?;
        Self::from_hf_json(&text, arg)
    }

    /// Parse a Hugging Face config (see [`VisionSpec::load`]); `path` names the source in errors.
    pub fn from_hf_json(text: &str, path: &str) -> Result<Self> {
        let perr = |msg: String| Error::Parse {
            path: path.to_string(),
            msg,
        };
        let root: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| perr(format!("not valid JSON: {e}").replace('\n', " ")))?;
        let top = root
            .as_object()
            .ok_or_else(|| perr("expected a JSON object".into()))?;
        let (vc, where_) = match top.get("vision_config") {
            Some(serde_json::Value::Object(v)) => (v, "vision_config"),
            Some(_) => return Err(perr("'vision_config' is not an object".into())),
            None => (top, "the top level"),
        };
        let field = |key: &str| -> Result<u64> {
            match vc.get(key) {
                None => Err(perr(format!("missing field '{key}' in {where_}"))),
                Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    perr(format!(
                        "field '{key}' in {where_} must be a positive integer, got {v}"
                    ))
                }),
            }
        };
        let to_u32 = |key: &str, v: u64| -> Result<u32> {
            u32::try_from(v).map_err(|_| perr(format!("field '{key}' is too large: {v}")))
        };
        let image_size = to_u32("image_size", field("image_size")?)?;
        let patch_size = to_u32("patch_size", field("patch_size")?)?;
        let hidden_size = field("hidden_size")?;
        let num_layers = to_u32("num_hidden_layers", field("num_hidden_layers")?)?;
        let num_heads = to_u32("num_attention_heads", field("num_attention_heads")?)?;
        let intermediate_size = field("intermediate_size")?;
        let tokens_per_frame = match vc.get("tokens_per_frame").or(top.get("tokens_per_frame")) {
            Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                perr(format!(
                    "field 'tokens_per_frame' must be a positive integer, got {v}"
                ))
            })?,
            None => {
                let side = u64::from(image_size / patch_size.max(1));
                side * side
            }
        };
        let name = top
            .get("_name_or_path")
            .or(top.get("model_type"))
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(path)
            .to_string();
        let spec = VisionSpec {
            name,
            image_size,
            patch_size,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size,
            tokens_per_frame,
        };
        spec.validate().map_err(|e| perr(e.to_string()))?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("vision encoder", msg));
        if self.image_size == 0
            || self.patch_size == 0
            || self.hidden_size == 0
            || self.num_layers == 0
            || self.num_heads == 0
            || self.intermediate_size == 0
            || self.tokens_per_frame == 0
        {
            return bad(format!("{}: all sizes must be positive", self.name));
        }
        if self.patch_size > self.image_size {
            return bad(format!(
                "{}: patch_size {} exceeds image_size {}",
                self.name, self.patch_size, self.image_size
            ));
        }
        if !self.hidden_size.is_multiple_of(u64::from(self.num_heads)) {
            return bad(format!(
                "{}: hidden_size {} is not divisible by num_heads {}",
                self.name, self.hidden_size, self.num_heads
            ));
        }
        Ok(())
    }

    /// Patches of a frame at `resolution` = (height, width) in pixels (default: the encoder's
    /// square `image_size`): `floor(h/p) * floor(w/p)`, as a strided patch-embedding conv gives.
    pub fn patches(&self, resolution: Option<(u32, u32)>) -> u64 {
        let (h, w) = resolution.unwrap_or((self.image_size, self.image_size));
        let p = self.patch_size.max(1);
        u64::from(h / p) * u64::from(w / p)
    }

    /// Weights of one transformer layer: attention Q,K,V,O (4h^2 + 4h with biases), MLP
    /// (2*h*i + i + h) and two LayerNorms (4h). Standard pre-LN ViT block (Dosovitskiy et al.
    /// 2021; SigLIP/CLIP vision towers in Hugging Face transformers have exactly these tensors).
    pub fn params_per_layer(&self) -> u64 {
        let h = self.hidden_size;
        let i = self.intermediate_size;
        (4 * h * h + 4 * h) + (2 * h * i + i + h) + 4 * h
    }

    /// Total weights: layers, patch embedding (3*p^2*h + h), learned position embedding
    /// (patches*h) and the final LayerNorm (2h). SigLIP so400m gives ~0.41e9, matching "400M".
    /// (The multi-head attention-pooling head, unused by VLMs, is not counted.)
    pub fn params(&self) -> u64 {
        let h = self.hidden_size;
        let p = u64::from(self.patch_size);
        u64::from(self.num_layers) * self.params_per_layer()
            + (3 * p * p * h + h)
            + self.patches(None) * h
            + 2 * h
    }

    /// Training FLOPs (forward + backward) to encode one frame at `resolution` (height, width;
    /// `None` = `image_size`).
    ///
    /// Forward per layer with n patches: `2 * params_per_layer * n` for the matmuls with weights
    /// (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1: C_forward ~ 2N per
    /// token) plus `4 * n^2 * h` for attention scores QK^T and the weighted sum AV (Narayanan et
    /// al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
    /// Megatron-LM", Sec. 5.1 / App.: 2 * 2*s^2*h per layer), plus the patch-embedding matmul
    /// `2 * 3p^2 * h * n`. Training = 3 x forward (the backward pass costs twice the forward;
    /// Kaplan et al. 2020 Sec. 2.1, Narayanan et al. 2021 Sec. 5.1). The projector and
    /// activation recomputation are not counted.
    pub fn flops_per_frame(&self, resolution: Option<(u32, u32)>) -> f64 {
        let n = self.patches(resolution) as f64;
        let h = self.hidden_size as f64;
        let p = f64::from(self.patch_size);
        let per_layer = 2.0 * self.params_per_layer() as f64 * n + 4.0 * n * n * h;
        let forward = f64::from(self.num_layers) * per_layer + 2.0 * 3.0 * p * p * h * n;
        3.0 * forward
    }

    /// LLM tokens of a frame at `resolution`: `tokens_per_frame` scaled by the patch count
    /// relative to the native resolution (a pooling projector keeps its ratio), at least 1.
    pub fn tokens_for(&self, resolution: Option<(u32, u32)>) -> u64 {
        let native = self.patches(None);
        let here = self.patches(resolution);
        if resolution.is_none() || here == native || native == 0 {
            return self.tokens_per_frame;
        }
        ((self.tokens_per_frame as u128 * here as u128).div_ceil(native as u128) as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siglip_preset_shapes_and_params() {
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        assert_eq!(v.patches(None), 729);
        assert_eq!(v.tokens_per_frame, 196);
        let p = v.params() as f64;
        // "so400m": the vision tower has ~400M weights.
        assert!((3.9e8..4.4e8).contains(&p), "params {p}");
    }

    #[test]
    fn flops_grow_with_resolution_and_match_formula() {
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        let f384 = v.flops_per_frame(None);
        let f224 = v.flops_per_frame(Some((224, 224)));
        let f448 = v.flops_per_frame(Some((448, 448)));
        assert!(f224 < f384 && f384 < f448);
        // Rough check against 3 * 2 * N * patches (attention adds a few percent at 729 patches).
        let approx = 6.0 * v.params() as f64 * 729.0;
        assert!(
            f384 > approx * 0.95 && f384 < approx * 1.2,
            "{f384} vs {approx}"
        );
        assert_eq!(v.flops_per_frame(Some((384, 384))), f384);
    }

    #[test]
    fn load_hf_nested_and_top_level() {
        let nested = r#"{"model_type":"siglip","vision_config":{"hidden_size":1152,
            "image_size":384,"intermediate_size":4304,"num_attention_heads":16,
            "num_hidden_layers":27,"patch_size":14,"extra":"ignored"},"text_config":{}}"#;
        let v = VisionSpec::from_hf_json(nested, "c.json").unwrap();
        assert_eq!(v.num_layers, 27);
        assert_eq!(v.tokens_per_frame, 729);
        assert_eq!(v.name, "siglip");
        let top = r#"{"hidden_size":1024,"image_size":336,"intermediate_size":4096,
            "num_attention_heads":16,"num_hidden_layers":24,"patch_size":14,"tokens_per_frame":144}"#;
        let v = VisionSpec::from_hf_json(top, "c.json").unwrap();
        assert_eq!(v.tokens_per_frame, 144);
        assert_eq!(v.hidden_size, 1024);
    }

    #[test]
    fn load_reports_missing_field_by_name() {
        let missing = r#"{"vision_config":{"hidden_size":1152,"image_size":384,
            "intermediate_size":4304,"num_attention_heads":16,"num_hidden_layers":27}}"#;
        let e = VisionSpec::from_hf_json(missing, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'patch_size'") && e.contains("c.json"), "{e}");
        assert!(!e.contains('\n'));
        let e = VisionSpec::from_hf_json("{", "c.json")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n') && e.contains("c.json"), "{e}");
    }

    #[test]
    fn load_unknown_name_lists_presets() {
        let e = VisionSpec::load("no-such-encoder").unwrap_err().to_string();
        for p in preset_names() {
            assert!(e.contains(p), "{e}");
        }
        for p in preset_names() {
            assert_eq!(VisionSpec::load(p).unwrap().name, *p);
        }
    }

    #[test]
    fn tokens_scale_with_resolution() {
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        assert_eq!(v.tokens_for(None), 196);
        assert!(v.tokens_for(Some((224, 224))) < 196);
        assert!(v.tokens_for(Some((448, 448))) > 196);
        assert!(v.tokens_for(Some((1, 1))) >= 1);
    }
}
