//! Vision encoder configuration: the SigLIP / ViT fields of a Hugging Face vision
//! `config.json` (either a `SiglipVisionConfig` or a VLM config holding one under
//! `vision_config`), the token pooling and the projector into the language model's hidden
//! size, or the tiny CI preset.
use crate::error::{Result, RuntimeError};
use serde::Deserialize;
use std::path::Path;

/// How the encoder's patch tokens are reduced before the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Every patch becomes an LLM token.
    None,
    /// 2x2 neighbouring patches are averaged (the grid padded to even, padding not counted).
    Avg2x2,
    /// 2x2 neighbouring patches are concatenated into one 4 x hidden feature, as VILA's
    /// downsampling projector does (the grid zero-padded to even); the projector then starts
    /// with a LayerNorm over the 4 x hidden features.
    Concat2x2,
}

impl Pooling {
    /// Parses `none`, `avg2x2` or `concat2x2`.
    pub fn parse(s: &str) -> Result<Pooling> {
        match s {
            "none" => Ok(Pooling::None),
            "avg2x2" => Ok(Pooling::Avg2x2),
            "concat2x2" => Ok(Pooling::Concat2x2),
            _ => Err(RuntimeError::Config(format!(
                "unknown pooling {s:?} (none, avg2x2, concat2x2)"
            ))),
        }
    }
}

/// Shape and numerics of a ViT/SigLIP-style encoder plus its projector.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Frames are `image_size` x `image_size` pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    /// The encoder MLP's GELU uses the tanh approximation (SigLIP's `gelu_pytorch_tanh`).
    pub gelu_tanh: bool,
    pub pooling: Pooling,
    /// Hidden size of the projector's middle layer.
    pub projector_hidden: usize,
    /// Hidden size of the language model (the projector's output).
    pub llm_hidden_size: usize,
}

#[derive(Deserialize)]
struct HfVision {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    num_channels: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
}

impl VisionConfig {
    /// The CI encoder: 2 layers, hidden 32, 4 heads, 16 x 16 frames of 4 x 4 patches (16
    /// patches), 2x2 concatenating pooling (4 tokens per frame), projecting to `llm_hidden`.
    pub fn tiny(llm_hidden: usize) -> VisionConfig {
        VisionConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_heads: 4,
            image_size: 16,
            patch_size: 4,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            gelu_tanh: true,
            pooling: Pooling::Concat2x2,
            projector_hidden: llm_hidden,
            llm_hidden_size: llm_hidden,
        }
    }

    /// SigLIP-so400m-patch14-384 (27 x 27 patches), as the planner's `siglip-so400m` preset
    /// (2x2 pooling: 196 tokens per frame).
    pub fn siglip_so400m(llm_hidden: usize) -> VisionConfig {
        VisionConfig {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_layers: 27,
            num_heads: 16,
            image_size: 384,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            gelu_tanh: true,
            pooling: Pooling::Concat2x2,
            projector_hidden: llm_hidden,
            llm_hidden_size: llm_hidden,
        }
    }

    /// Parses a Hugging Face vision config (`SiglipVisionConfig`, or a VLM config with a
    /// `vision_config` object); `pooling` and `llm_hidden` are not HF vision fields.
    pub fn from_hf_json(text: &str, pooling: Pooling, llm_hidden: usize) -> Result<VisionConfig> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| RuntimeError::Config(format!("vision config.json: {e}")))?;
        let inner = v.get("vision_config").cloned().unwrap_or(v);
        let h: HfVision = serde_json::from_value(inner)
            .map_err(|e| RuntimeError::Config(format!("vision config.json: {e}")))?;
        let gelu_tanh = match h.hidden_act.as_deref() {
            None | Some("gelu_pytorch_tanh") | Some("gelu_new") | Some("gelu_fast") => true,
            Some("gelu") | Some("quick_gelu") => false,
            Some(a) => {
                return Err(RuntimeError::Config(format!(
                    "vision hidden_act {a:?} is not supported (gelu, gelu_pytorch_tanh)"
                )))
            }
        };
        let c = VisionConfig {
            hidden_size: h.hidden_size,
            intermediate_size: h.intermediate_size,
            num_layers: h.num_hidden_layers,
            num_heads: h.num_attention_heads,
            image_size: h.image_size,
            patch_size: h.patch_size,
            num_channels: h.num_channels.unwrap_or(3),
            layer_norm_eps: h.layer_norm_eps.unwrap_or(1e-6),
            gelu_tanh,
            pooling,
            projector_hidden: llm_hidden,
            llm_hidden_size: llm_hidden,
        };
        c.validate()?;
        Ok(c)
    }

    /// Reads a Hugging Face vision `config.json` file.
    pub fn from_hf_file(path: &Path, pooling: Pooling, llm_hidden: usize) -> Result<VisionConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RuntimeError::Config(format!("{}: {e}", path.display())))?;
        Self::from_hf_json(&text, pooling, llm_hidden)
    }

    /// Checks the dimensions are usable.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.image_size,
            self.patch_size,
            self.num_channels,
            self.projector_hidden,
            self.llm_hidden_size,
        ];
        if dims.contains(&0) {
            return Err(RuntimeError::Config(format!(
                "zero dimension in the vision config {self:?}"
            )));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(RuntimeError::Config(format!(
                "vision hidden_size {} is not a multiple of {} heads",
                self.hidden_size, self.num_heads
            )));
        }
        // As the strided patch convolution, pixels beyond the last whole patch are dropped
        // (SigLIP-so400m: 384 / 14 -> 27 patches a side).
        if self.patch_size > self.image_size {
            return Err(RuntimeError::Config(format!(
                "patch_size {} is larger than image_size {}",
                self.patch_size, self.image_size
            )));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(RuntimeError::Config(
                "vision layer_norm_eps must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Patches per side of a frame (whole patches only).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches (encoder tokens) per frame.
    pub fn patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Grid side after pooling.
    pub fn pooled_grid(&self) -> usize {
        match self.pooling {
            Pooling::None => self.grid(),
            Pooling::Avg2x2 | Pooling::Concat2x2 => self.grid().div_ceil(2),
        }
    }

    /// LLM tokens per frame (after pooling).
    pub fn tokens_per_frame(&self) -> usize {
        self.pooled_grid() * self.pooled_grid()
    }

    /// Width of the projector's input features.
    pub fn projector_in(&self) -> usize {
        match self.pooling {
            Pooling::Concat2x2 => 4 * self.hidden_size,
            Pooling::None | Pooling::Avg2x2 => self.hidden_size,
        }
    }

    /// Parameters of the encoder and the projector.
    pub fn num_params(&self) -> usize {
        let (h, f, p) = (self.hidden_size, self.intermediate_size, self.patch_size);
        let embed = h * self.num_channels * p * p + h + self.patches() * h;
        let layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h;
        let pin = self.projector_in();
        let ln = if self.pooling == Pooling::Concat2x2 {
            2 * pin
        } else {
            0
        };
        let proj = ln
            + pin * self.projector_hidden
            + self.projector_hidden
            + self.projector_hidden * self.llm_hidden_size
            + self.llm_hidden_size;
        embed + self.num_layers * layer + 2 * h + proj
    }

    /// Forward FLOPs of one frame through the encoder and the projector (2 per multiply-add;
    /// attention scores and values included).
    pub fn flops_per_frame(&self) -> f64 {
        let (h, f) = (self.hidden_size as f64, self.intermediate_size as f64);
        let n = self.patches() as f64;
        let pp = (self.patch_size * self.patch_size * self.num_channels) as f64;
        let layer = 2.0 * n * (4.0 * h * h + 2.0 * h * f) + 4.0 * n * n * h;
        let t = self.tokens_per_frame() as f64;
        let proj = 2.0
            * t
            * (self.projector_in() as f64 * self.projector_hidden as f64
                + self.projector_hidden as f64 * self.llm_hidden_size as f64);
        2.0 * n * pp * h + self.num_layers as f64 * layer + proj
    }
}
