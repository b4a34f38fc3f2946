//! The ViT/SigLIP-style vision encoder and its projector, with parameters named as in
//! Hugging Face checkpoints (`vision_model.encoder.layers.0.self_attn.q_proj.weight`, ...;
//! the projector as LLaVA's `multi_modal_projector.linear_{1,2}`). Patch embedding by a
//! strided convolution, learned position embeddings, pre-LN blocks with full bidirectional
//! attention inside each frame and a GELU MLP, a final LayerNorm, optional 2x2 pooling, and a
//! 2-layer GELU MLP into the language model's hidden size. Parameters live in the master
//! dtype and are cast to the compute dtype inside the forward (as the decoder does), so
//! autograd gradients land in the master dtype.
use super::config::{Pooling, VisionConfig};
use crate::error::{Result, RuntimeError};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Encoder + projector parameters and the forward.
pub struct VisionEncoder {
    pub cfg: VisionConfig,
    /// Dtype of the matmuls and activations.
    pub compute: Kind,
    params: crate::model::NamedParams,
}

const PROJ: &str = "multi_modal_projector";

fn layer_name(l: usize, s: &str) -> String {
    format!("vision_model.encoder.layers.{l}.{s}")
}

/// Deterministic standard normal samples from (seed, stream), independent of libtorch's
/// global generator (ranks may be threads initialising concurrently): splitmix64 and
/// Box-Muller.
fn normal_samples(n: usize, seed: u64, stream: u64) -> Vec<f64> {
    let mut state = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Uniform in (0, 1] and [0, 1).
        let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}

impl VisionEncoder {
    /// Names and shapes of every parameter, in a fixed order.
    pub fn param_shapes(cfg: &VisionConfig) -> Vec<(String, Vec<i64>)> {
        let h = cfg.hidden_size as i64;
        let f = cfg.intermediate_size as i64;
        let p = cfg.patch_size as i64;
        let mut out = vec![
            (
                "vision_model.embeddings.patch_embedding.weight".to_string(),
                vec![h, cfg.num_channels as i64, p, p],
            ),
            (
                "vision_model.embeddings.patch_embedding.bias".to_string(),
                vec![h],
            ),
            (
                "vision_model.embeddings.position_embedding.weight".to_string(),
                vec![cfg.patches() as i64, h],
            ),
        ];
        for l in 0..cfg.num_layers {
            let mut add = |s: &str, shape: Vec<i64>| out.push((layer_name(l, s), shape));
            add("layer_norm1.weight", vec![h]);
            add("layer_norm1.bias", vec![h]);
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                add(&format!("self_attn.{proj}.weight"), vec![h, h]);
                add(&format!("self_attn.{proj}.bias"), vec![h]);
            }
            add("layer_norm2.weight", vec![h]);
            add("layer_norm2.bias", vec![h]);
            add("mlp.fc1.weight", vec![f, h]);
            add("mlp.fc1.bias", vec![f]);
            add("mlp.fc2.weight", vec![h, f]);
            add("mlp.fc2.bias", vec![h]);
        }
        out.push(("vision_model.post_layernorm.weight".into(), vec![h]));
        out.push(("vision_model.post_layernorm.bias".into(), vec![h]));
        let pin = cfg.projector_in() as i64;
        let ph = cfg.projector_hidden as i64;
        let lh = cfg.llm_hidden_size as i64;
        if cfg.pooling == Pooling::Concat2x2 {
            out.push((format!("{PROJ}.layer_norm.weight"), vec![pin]));
            out.push((format!("{PROJ}.layer_norm.bias"), vec![pin]));
        }
        out.push((format!("{PROJ}.linear_1.weight"), vec![ph, pin]));
        out.push((format!("{PROJ}.linear_1.bias"), vec![ph]));
        out.push((format!("{PROJ}.linear_2.weight"), vec![lh, ph]));
        out.push((format!("{PROJ}.linear_2.bias"), vec![lh]));
        out
    }

    fn init_one(
        i: usize,
        name: &str,
        shape: &[i64],
        device: Device,
        master: Kind,
        seed: i64,
    ) -> Tensor {
        let is_norm = name.contains("layer_norm") || name.contains("post_layernorm");
        if is_norm && name.ends_with(".weight") {
            return Tensor::ones(shape, (master, device));
        }
        if is_norm {
            return Tensor::zeros(shape, (master, device));
        }
        let n: i64 = shape.iter().product();
        let v = normal_samples(n as usize, seed as u64, i as u64);
        // normal(0, 0.02) weights; small non-zero biases so that tests see their gradients.
        Tensor::from_slice(&v)
            .multiply_scalar(0.02)
            .view(shape)
            .to_kind(master)
            .to_device(device)
    }

    fn from_params(cfg: VisionConfig, compute: Kind, params: Vec<(String, Tensor)>) -> Self {
        VisionEncoder {
            cfg,
            compute,
            params: crate::model::NamedParams::new(params),
        }
    }

    /// Random initialisation, identical for every caller with the same seed, device and
    /// master dtype (independent of libtorch's global generator).
    pub fn random(
        cfg: VisionConfig,
        device: Device,
        master: Kind,
        compute: Kind,
        seed: i64,
    ) -> Result<VisionEncoder> {
        cfg.validate()?;
        let params = tch::no_grad(|| {
            Self::param_shapes(&cfg)
                .into_iter()
                .enumerate()
                .map(|(i, (name, shape))| {
                    let t = Self::init_one(i, &name, &shape, device, master, seed);
                    (name, t.set_requires_grad(true))
                })
                .collect()
        });
        Ok(Self::from_params(cfg, compute, params))
    }

    /// Loads Hugging Face safetensors files. Each tensor is looked up under its name, under
    /// `vision_tower.` + its name (LLaVA-style checkpoints) and without `vision_model.` (a
    /// SiglipVisionModel saved by Transformers 5). Every encoder tensor must
    /// be present with its shape; projector tensors missing from the files (a plain SigLIP
    /// checkpoint has none) are initialised as [`VisionEncoder::random`] with `seed` would,
    /// and their names are returned.
    pub fn load_safetensors(
        cfg: VisionConfig,
        files: &[&Path],
        device: Device,
        master: Kind,
        compute: Kind,
        seed: i64,
    ) -> Result<(VisionEncoder, Vec<String>)> {
        cfg.validate()?;
        let mut found: HashMap<String, Tensor> = HashMap::new();
        for f in files {
            for (n, t) in Tensor::read_safetensors(f)? {
                found.insert(n, t);
            }
        }
        let mut params = Vec::new();
        let mut initialised = Vec::new();
        for (i, (name, shape)) in Self::param_shapes(&cfg).into_iter().enumerate() {
            let t = found
                .remove(&name)
                .or_else(|| found.remove(&format!("vision_tower.{name}")))
                .or_else(|| {
                    // Transformers 5 saves a SiglipVisionModel without its `vision_model.`.
                    let bare = name.strip_prefix("vision_model.")?;
                    found.remove(bare)
                });
            let t = match t {
                Some(t) => {
                    if t.size() != shape {
                        return Err(RuntimeError::Config(format!(
                            "{name} is {:?} in the checkpoint, the vision config says {shape:?}",
                            t.size()
                        )));
                    }
                    tch::no_grad(|| t.to_device(device).to_kind(master))
                }
                None if name.starts_with(PROJ) => {
                    initialised.push(name.clone());
                    tch::no_grad(|| Self::init_one(i, &name, &shape, device, master, seed))
                }
                None => {
                    return Err(RuntimeError::Config(format!(
                        "vision checkpoint has no tensor {name}"
                    )))
                }
            };
            params.push((name, t.set_requires_grad(true)));
        }
        Ok((Self::from_params(cfg, compute, params), initialised))
    }

    /// Handles to every parameter (sharing storage), in `named_parameters` order: what an
    /// optimizer is built over.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params.handles()
    }

    /// Every parameter with its Hugging Face name, in [`VisionEncoder::param_shapes`] order.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        self.params.named()
    }

    /// The parameter with this name.
    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.get(name)
    }

    /// Device of the parameters.
    pub fn device(&self) -> Device {
        self.params.device()
    }

    fn p(&self, name: &str) -> Tensor {
        self.params.cast(name, self.compute)
    }

    fn lp(&self, l: usize, s: &str) -> Tensor {
        self.p(&layer_name(l, s))
    }

    fn ln(&self, x: &Tensor, w: Tensor, b: Tensor) -> Tensor {
        let d = x.size()[x.dim() - 1];
        x.layer_norm([d], Some(&w), Some(&b), self.cfg.layer_norm_eps, true)
    }

    fn linear(x: &Tensor, w: Tensor, b: Tensor) -> Tensor {
        x.linear(&w, Some(&b))
    }

    /// Checks `frames` is (F, channels, image_size, image_size).
    pub fn check_frames(&self, frames: &Tensor) -> Result<()> {
        let c = &self.cfg;
        let s = frames.size();
        let want = [
            c.num_channels as i64,
            c.image_size as i64,
            c.image_size as i64,
        ];
        if s.len() != 4 || s[1..] != want {
            return Err(RuntimeError::Shape(format!(
                "frames must be (F, {}, {}, {}), got {s:?}",
                want[0], want[1], want[2]
            )));
        }
        Ok(())
    }

    /// The encoder alone: frames (F, C, H, W) -> patch features (F, patches, hidden) after
    /// the final LayerNorm, in the compute dtype.
    pub fn encode(&self, frames: &Tensor) -> Result<Tensor> {
        self.check_frames(frames)?;
        let c = &self.cfg;
        let f = frames.size()[0];
        let (h, heads) = (c.hidden_size as i64, c.num_heads as i64);
        let d = h / heads;
        let n = c.patches() as i64;
        let p = c.patch_size as i64;
        let x = frames.to_kind(self.compute).conv2d(
            &self.p("vision_model.embeddings.patch_embedding.weight"),
            Some(&self.p("vision_model.embeddings.patch_embedding.bias")),
            [p, p],
            [0, 0],
            [1, 1],
            1,
        );
        // Made contiguous once here: otherwise the residual stream keeps the transposed strides
        // of the patch grid through every add and norm of the encoder, and their kernels run
        // strided (the H100 replica of this encoder: 110 ms -> 94 ms forward + backward for 16
        // so400m frames).
        let mut x = x.flatten(2, 3).transpose(1, 2).contiguous()
            + self.p("vision_model.embeddings.position_embedding.weight");
        let act = if c.gelu_tanh { "tanh" } else { "none" };
        for l in 0..c.num_layers {
            let hn = self.ln(
                &x,
                self.lp(l, "layer_norm1.weight"),
                self.lp(l, "layer_norm1.bias"),
            );
            let heads_of = |name: &str| {
                Self::linear(
                    &hn,
                    self.lp(l, &format!("self_attn.{name}.weight")),
                    self.lp(l, &format!("self_attn.{name}.bias")),
                )
                .view([f, n, heads, d])
                .transpose(1, 2)
            };
            let (q, k, v) = (heads_of("q_proj"), heads_of("k_proj"), heads_of("v_proj"));
            let a = Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, false, None, false,
            )
            .transpose(1, 2)
            .reshape([f, n, h]);
            // Out of place: `+=` would overwrite a tensor autograd saved.
            x = &x
                + Self::linear(
                    &a,
                    self.lp(l, "self_attn.out_proj.weight"),
                    self.lp(l, "self_attn.out_proj.bias"),
                );
            let hn = self.ln(
                &x,
                self.lp(l, "layer_norm2.weight"),
                self.lp(l, "layer_norm2.bias"),
            );
            let m = Self::linear(
                &hn,
                self.lp(l, "mlp.fc1.weight"),
                self.lp(l, "mlp.fc1.bias"),
            )
            .gelu(act);
            x = &x + Self::linear(&m, self.lp(l, "mlp.fc2.weight"), self.lp(l, "mlp.fc2.bias"));
        }
        Ok(self.ln(
            &x,
            self.p("vision_model.post_layernorm.weight"),
            self.p("vision_model.post_layernorm.bias"),
        ))
    }

    /// Pooling of patch features (F, patches, hidden) -> (F, tokens_per_frame, projector_in).
    pub fn pool(&self, x: &Tensor) -> Tensor {
        let c = &self.cfg;
        let f = x.size()[0];
        let (g, g2) = (c.grid() as i64, c.pooled_grid() as i64);
        let h = c.hidden_size as i64;
        match c.pooling {
            Pooling::None => x.shallow_clone(),
            Pooling::Avg2x2 => x
                .view([f, g, g, h])
                .permute([0, 3, 1, 2])
                .avg_pool2d([2, 2], [2, 2], [0, 0], true, false, None)
                .flatten(2, 3)
                .transpose(1, 2),
            Pooling::Concat2x2 => {
                let pad = 2 * g2 - g;
                x.view([f, g, g, h])
                    .constant_pad_nd([0, 0, 0, pad, 0, pad])
                    .view([f, g2, 2, g2, 2, h])
                    .permute([0, 1, 3, 2, 4, 5])
                    .reshape([f, g2 * g2, 4 * h])
            }
        }
    }

    /// The projector: (F, T, projector_in) -> (F, T, llm_hidden).
    pub fn project(&self, x: &Tensor) -> Tensor {
        let x = if self.cfg.pooling == Pooling::Concat2x2 {
            self.ln(
                x,
                self.p(&format!("{PROJ}.layer_norm.weight")),
                self.p(&format!("{PROJ}.layer_norm.bias")),
            )
        } else {
            x.shallow_clone()
        };
        let m = Self::linear(
            &x,
            self.p(&format!("{PROJ}.linear_1.weight")),
            self.p(&format!("{PROJ}.linear_1.bias")),
        )
        .gelu("none");
        Self::linear(
            &m,
            self.p(&format!("{PROJ}.linear_2.weight")),
            self.p(&format!("{PROJ}.linear_2.bias")),
        )
    }

    /// Frames (F, C, H, W) -> LLM embeddings (F, tokens_per_frame, llm_hidden) in the compute
    /// dtype, with the autograd graph to the parameters. F = 0 gives an empty tensor.
    pub fn forward(&self, frames: &Tensor) -> Result<Tensor> {
        self.check_frames(frames)?;
        let c = &self.cfg;
        let f = frames.size()[0];
        if f == 0 {
            return Ok(Tensor::zeros(
                [0, c.tokens_per_frame() as i64, c.llm_hidden_size as i64],
                (self.compute, self.device()),
            ));
        }
        let x = self.encode(frames)?;
        Ok(self.project(&self.pool(&x)))
    }
}
