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
        if vc.contains_key("depth") && vc.contains_key("embed_dim") {
            return Err(perr(format!(
                "{where_} is a Qwen2-VL vision tower (depth, embed_dim: 3D patches, 2D RoPE, a 2x2 \
                 patch merger), not a ViT shape the planner models; expected a SigLIP/CLIP \
                 vision_config or a preset ({})",
                PRESETS.join(", ")
            )));
        }
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

    /// Attention head dimension (hidden / heads; 72 for SigLIP so400m).
    pub fn head_dim(&self) -> u64 {
        self.hidden_size / u64::from(self.num_heads)
    }

    /// Weights of one layer's GEMMs: Q, K, V and the output projection (4h^2) and the MLP's two
    /// matrices (2hi); biases are added in the GEMMs' epilogues.
    pub fn layer_matmul_params(&self) -> u64 {
        let h = self.hidden_size;
        4 * h * h + 2 * h * self.intermediate_size
    }

    /// Width of the projector's input features, as mmsp-runtime builds its projector
    /// (`runtime/src/vision/config.rs`, `projector_in`; the pooling is the one whose token count
    /// is the plan's, `runtime/src/vision/plan.rs`): 4 x hidden when the frame's tokens are its
    /// 2x2-concatenated patches (VILA's `mlp_downsample`, ceil(grid/2)^2 tokens), else hidden.
    pub fn projector_in(&self) -> u64 {
        let g = u64::from(self.image_size / self.patch_size.max(1));
        let pooled = g.div_ceil(2);
        if self.tokens_per_frame == pooled * pooled && self.tokens_per_frame < g * g {
            4 * self.hidden_size
        } else {
            self.hidden_size
        }
    }

    /// Weights of mmsp-runtime's projector into an LLM of hidden size `llm` (LLaVA's two-layer
    /// MLP with a GELU, its middle width `llm`; a LayerNorm over the concatenated features
    /// first when pooling concatenates): `runtime/src/vision/config.rs`, `num_params`.
    pub fn projector_params(&self, llm: u64) -> u64 {
        let pin = self.projector_in();
        let ln = if pin > self.hidden_size { 2 * pin } else { 0 };
        ln + pin * llm + llm + llm * llm + llm
    }

    /// Forward GEMM FLOPs of one frame at `resolution` through the encoder and the projector
    /// into an LLM of hidden size `llm`, 2 per multiply-add (Kaplan et al. 2020, Sec. 2.1):
    /// the layers' projections and MLP (2 x [`VisionSpec::layer_matmul_params`] per patch), the
    /// patch embedding (a strided convolution, 2 x 3p^2 x h per patch) and the projector's two
    /// matrices per LLM token. Attention is [`VisionSpec::attention_flops_fwd`].
    pub fn gemm_flops_fwd(&self, resolution: Option<(u32, u32)>, llm: u64) -> (f64, f64, f64) {
        let n = self.patches(resolution) as f64;
        let h = self.hidden_size as f64;
        let p = f64::from(self.patch_size);
        let layers = f64::from(self.num_layers) * 2.0 * self.layer_matmul_params() as f64 * n;
        let patch = 2.0 * 3.0 * p * p * h * n;
        let t = self.tokens_for(resolution) as f64;
        let l = llm as f64;
        let projector = 2.0 * t * (self.projector_in() as f64 * l + l * l);
        (layers, patch, projector)
    }

    /// Forward FLOPs of one frame's attention, all layers: QK^T and the weighted sum of V over
    /// n patches, 2 x 2 x n^2 x h per layer, none masked (bidirectional attention; Narayanan et
    /// al. 2021, Sec. 5.1 / App. counting).
    pub fn attention_flops_fwd(&self, resolution: Option<(u32, u32)>) -> f64 {
        let n = self.patches(resolution) as f64;
        f64::from(self.num_layers) * 4.0 * n * n * self.hidden_size as f64
    }

    /// Bytes moved by the memory-bound kernels of one layer, per patch, forward and backward
    /// (read plus write, 16-bit activations), as mmsp-runtime's encoder runs them
    /// (`runtime/src/vision/encoder.rs`, `encode`, under libtorch autograd):
    ///
    /// Forward: the two LayerNorms (Ba et al. 2016; read x, write the normalised x: 2 x 2h);
    /// before each of them a copy that makes x contiguous (2 x 2h: the residual stream stays in
    /// the transposed layout that `flatten(2, 3).transpose(1, 2)` of the patch embedding leaves,
    /// and each residual add keeps it); the attention output turned back from heads to tokens
    /// (`transpose(1, 2).reshape`, a copy: 2h); the two residual adds (read two, write one:
    /// 2 x 3h); the tanh GELU of the MLP (read and write i: 2i). The projections' biases are
    /// added in the GEMM epilogues (no pass of their own).
    ///
    /// Backward: the two LayerNorms (read x and dy, write dx: 3h; their weight and bias
    /// gradients read x and dy again: 2h; 2 x 5h); the GELU (read dy and x, write dx: 3i); the
    /// six bias gradients, each a sum over the tokens of its output gradient (q, k, v, out: 4h;
    /// fc1: i; fc2: h); the gradient sums autograd forms where a tensor feeds several ops (the
    /// first LayerNorm's output feeds q, k and v: 2 x 3h; the residual stream at its two joins:
    /// 2 x 3h); and the attention output's gradient copied into the heads layout (2h).
    ///
    /// So 16h + 2i elements forward and 29h + 4i backward, 2 bytes each.
    pub fn layer_memory_bytes_per_patch(&self) -> (f64, f64) {
        let h = self.hidden_size as f64;
        let i = self.intermediate_size as f64;
        let fwd = 4.0 * h + 4.0 * h + 2.0 * h + 6.0 * h + 2.0 * i;
        let bwd = 10.0 * h + 3.0 * i + (5.0 * h + i) + 12.0 * h + 2.0 * h;
        (2.0 * fwd, 2.0 * bwd)
    }

    /// Bytes of the memory-bound kernels outside the layers, per patch: the position-embedding
    /// add (3h), and the final LayerNorm with the copy that makes its input contiguous (2h + 2h
    /// forward; 5h backward, as in a layer).
    pub fn embed_memory_bytes_per_patch(&self) -> (f64, f64) {
        let h = self.hidden_size as f64;
        (2.0 * (3.0 * h + 4.0 * h), 2.0 * 5.0 * h)
    }

    /// Bytes of the projector's memory-bound kernels per LLM token, into an LLM of hidden size
    /// `llm` (`runtime/src/vision/encoder.rs`, `pool` and `project`): forward the pooling's copy
    /// (2 pin), the LayerNorm over the concatenated features when there is one (2 pin) and the
    /// GELU (2 llm); backward the copy back (2 pin), that LayerNorm (5 pin), the GELU (3 llm)
    /// and the two bias gradients (2 llm).
    pub fn projector_memory_bytes_per_token(&self, llm: u64) -> (f64, f64) {
        let pin = self.projector_in() as f64;
        let l = llm as f64;
        let concat = if self.projector_in() > self.hidden_size {
            1.0
        } else {
            0.0
        };
        let fwd = concat * (2.0 * pin + 2.0 * pin) + 2.0 * l;
        let bwd = concat * (2.0 * pin + 5.0 * pin) + 3.0 * l + 2.0 * l;
        (2.0 * fwd, 2.0 * bwd)
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

    /// The runtime reported its SigLIP so400m encoder with the 2x2-concatenating projector into
    /// a 4096-wide LLM as 448,656,240 parameters (runtime/bench/results/h100-sxm-x4/raw/
    /// h100x4_run3_zero3_vlm_faults.log, `encoder_config.params`).
    #[test]
    fn encoder_and_projector_params_match_the_runtime() {
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        assert_eq!(v.projector_in(), 4 * 1152);
        assert_eq!(v.params() + v.projector_params(4096), 448_656_240);
        let nopool = VisionSpec::preset("siglip-so400m-nopool").unwrap();
        assert_eq!(nopool.projector_in(), 1152);
        assert_eq!(v.head_dim(), 72);
    }

    #[test]
    fn encoder_work_is_counted_by_hand() {
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        let (h, i, n) = (1152.0, 4304.0, 729.0);
        let (layers, patch, proj) = v.gemm_flops_fwd(None, 4096);
        assert_eq!(layers, 27.0 * 2.0 * (4.0 * h * h + 2.0 * h * i) * n);
        assert_eq!(patch, 2.0 * 3.0 * 14.0 * 14.0 * h * n);
        assert_eq!(proj, 2.0 * 196.0 * (4608.0 * 4096.0 + 4096.0 * 4096.0));
        assert_eq!(v.attention_flops_fwd(None), 27.0 * 4.0 * n * n * h);
        // Forward: LayerNorms 4h, their input copies 4h, attention output copy 2h, residual
        // adds 6h, GELU 2i; backward: LayerNorms 10h, GELU 3i, bias gradients 5h + i,
        // gradient sums 12h, attention output gradient copy 2h; 2 bytes each.
        let (fwd, bwd) = v.layer_memory_bytes_per_patch();
        assert_eq!(fwd, 2.0 * (16.0 * h + 2.0 * i));
        assert_eq!(bwd, 2.0 * (29.0 * h + 4.0 * i));
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
        let qwen = r#"{"vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16}}"#;
        let e = VisionSpec::from_hf_json(qwen, "c.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Qwen2-VL") && e.contains("siglip-so400m"), "{e}");
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
