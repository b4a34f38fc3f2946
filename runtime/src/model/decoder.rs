//! Decoder parameters (Hugging Face names, master precision) and the per-layer pieces of the
//! forward: embedding, the part of a layer before attention (norm, q/k/v projections, RoPE),
//! the part after it (o_proj, residual, norm, SwiGLU MLP, residual) and the head. Parameters
//! are kept in the master dtype (fp32, or f64 for tests) and cast to the compute dtype inside
//! the forward, so autograd gradients land in the master dtype. A layer's compute-dtype
//! weights can be cast once ([`Decoder::pre_weights`], [`Decoder::post_weights`]) and reused
//! (the trainer casts every weight once per step; [`Decoder::pre_attention`] and
//! [`Decoder::post_attention`] cast on each call).
//!
//! RMSNorm: on CUDA, ATen's fused `rms_norm` (one kernel forward, one backward; input in the
//! compute dtype, statistics in fp32); elsewhere, or with [`Decoder::set_fused_norm`] off, the Hugging
//! Face formulation (upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, times the weight).
//! Per norm of S tokens x hidden h in bf16, the unfused forward moves about 36 B per element
//! (to fp32, square, mean, multiply, cast, weight) and its backward about 60; the fused pair
//! about 10: at S = 32K, h = 4096 that is ~12 GB (4 ms at 3 TB/s) saved per norm, 5 norms
//! per step for 2 layers.
use super::config::ModelConfig;
use super::hf::HfCheckpoint;
pub use super::rope::Rope;
use crate::error::{Result, RuntimeError};
use crate::kernel::{attention_fwd, Backend};
use tch::{Device, Kind, Tensor};

/// What enters the decoder: token ids (B, S) or embeddings (B, S, hidden) (e.g. vision tokens
/// merged with text).
pub enum Input<'a> {
    Ids(&'a Tensor),
    Embeddings(&'a Tensor),
}

/// A decoder whose parameters are named as in Hugging Face checkpoints
/// (`model.layers.0.self_attn.q_proj.weight`, ...).
pub struct Decoder {
    pub cfg: ModelConfig,
    /// Dtype of the matmuls and activations (bf16 on GPU, f32/f64 on CPU).
    pub compute: Kind,
    params: super::NamedParams,
    /// ATen's fused RMSNorm on CUDA (on unless [`Decoder::set_fused_norm`] turns it off).
    fused_norm: bool,
    /// The checkpoint the parameters are still to be read from ([`Decoder::deferred_hf`]).
    deferred: Option<std::sync::Arc<HfCheckpoint>>,
}

/// The compute-dtype weights of a layer's part before attention (casts of the master
/// parameters that keep their autograd graph, unless made under no_grad).
pub struct PreWeights {
    pub norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub bias: Option<(Tensor, Tensor, Tensor)>,
}

/// The compute-dtype weights of a layer's part after attention.
pub struct PostWeights {
    pub o: Tensor,
    pub norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

fn layer_name(l: usize, s: &str) -> String {
    format!("model.layers.{l}.{s}")
}

impl Decoder {
    /// Names and shapes of every parameter, in a fixed order.
    pub fn param_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<i64>)> {
        let h = cfg.hidden_size as i64;
        let q = (cfg.num_heads * cfg.head_dim) as i64;
        let kv = (cfg.num_kv_heads * cfg.head_dim) as i64;
        let f = cfg.intermediate_size as i64;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size as i64, h],
        )];
        for l in 0..cfg.num_layers {
            let mut add = |s: &str, shape: Vec<i64>| out.push((layer_name(l, s), shape));
            add("input_layernorm.weight", vec![h]);
            add("self_attn.q_proj.weight", vec![q, h]);
            add("self_attn.k_proj.weight", vec![kv, h]);
            add("self_attn.v_proj.weight", vec![kv, h]);
            if cfg.qkv_bias {
                add("self_attn.q_proj.bias", vec![q]);
                add("self_attn.k_proj.bias", vec![kv]);
                add("self_attn.v_proj.bias", vec![kv]);
            }
            add("self_attn.o_proj.weight", vec![h, q]);
            add("post_attention_layernorm.weight", vec![h]);
            add("mlp.gate_proj.weight", vec![f, h]);
            add("mlp.up_proj.weight", vec![f, h]);
            add("mlp.down_proj.weight", vec![h, f]);
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size as i64, h]));
        }
        out
    }

    fn from_params(cfg: ModelConfig, compute: Kind, params: Vec<(String, Tensor)>) -> Decoder {
        let params = super::NamedParams::new(params);
        Decoder {
            cfg,
            compute,
            params,
            fused_norm: true,
            deferred: None,
        }
    }

    /// Random initialisation (normal(0, 0.02) matrices, unit norms, zero biases), identical
    /// for every caller with the same seed, device and master dtype.
    pub fn random(
        cfg: ModelConfig,
        device: Device,
        master: Kind,
        compute: Kind,
        seed: i64,
    ) -> Result<Decoder> {
        cfg.validate()?;
        let params = Self::param_shapes(&cfg)
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let t = tch::no_grad(|| {
                    if name.ends_with("norm.weight") {
                        Tensor::ones(shape.as_slice(), (master, device))
                    } else {
                        // Biases too are small and non-zero, so that tests see their gradients.
                        let s = seed.wrapping_mul(1_000_003).wrapping_add(i as i64);
                        crate::rng::seeded(s, || {
                            Tensor::randn(shape.as_slice(), (master, device)).multiply_scalar(0.02)
                        })
                    }
                });
                (name, t.set_requires_grad(true))
            })
            .collect();
        Ok(Self::from_params(cfg, compute, params))
    }

    /// The whole model from a Hugging Face checkpoint (every parameter read, cast to
    /// `master` on `device`).
    pub fn from_hf(
        ck: &HfCheckpoint,
        device: Device,
        master: Kind,
        compute: Kind,
    ) -> Result<Decoder> {
        let cfg = ck.cfg.clone();
        let mut params = Vec::new();
        for (name, _) in Self::param_shapes(&cfg) {
            let t = tch::no_grad(|| -> Result<Tensor> {
                Ok(ck.read(&name)?.to_device(device).to_kind(master))
            })?;
            params.push((name, t.set_requires_grad(true)));
        }
        Ok(Self::from_params(cfg, compute, params))
    }

    /// A decoder whose parameters are not read yet: empty `master` tensors on `device`, to be
    /// filled from `ck` by whoever shards them (the trainer's ZeRO-1/2/3 optimizer reads each
    /// rank's slices alone; [`Decoder::materialise`] reads the whole model). Nothing runs on
    /// it before then.
    pub fn deferred_hf(
        ck: std::sync::Arc<HfCheckpoint>,
        device: Device,
        master: Kind,
        compute: Kind,
    ) -> Decoder {
        let cfg = ck.cfg.clone();
        let params = Self::param_shapes(&cfg)
            .into_iter()
            .map(|(n, _)| {
                (
                    n,
                    Tensor::empty([0], (master, device)).set_requires_grad(true),
                )
            })
            .collect();
        let mut d = Self::from_params(cfg, compute, params);
        d.deferred = Some(ck);
        d
    }

    /// Where the parameters are still to be read from (see [`Decoder::deferred_hf`]); taking
    /// it leaves the decoder as the caller fills it.
    pub fn take_deferred(&mut self) -> Option<std::sync::Arc<HfCheckpoint>> {
        self.deferred.take()
    }

    /// Reads every deferred parameter whole (a no-op for a decoder that has its weights).
    pub fn materialise(&mut self) -> Result<()> {
        let Some(ck) = self.deferred.take() else {
            return Ok(());
        };
        let _g = tch::no_grad_guard();
        for (name, p) in self.params.named() {
            let t = ck.read(name)?.to_device(p.device()).to_kind(p.kind());
            p.shallow_clone().f_set_data(&t)?;
        }
        Ok(())
    }

    /// Whether RMSNorm runs ATen's fused kernel on CUDA (else the Hugging Face formulation).
    pub fn set_fused_norm(&mut self, on: bool) {
        self.fused_norm = on;
    }

    pub fn fused_norm(&self) -> bool {
        self.fused_norm
    }

    /// Every parameter with its Hugging Face name, in [`Decoder::param_shapes`] order.
    /// The device the parameters live on (the CPU for a model without parameters).
    pub fn device(&self) -> Device {
        self.params.device()
    }

    /// Handles to every parameter (sharing storage), in `named_parameters` order: what an
    /// optimizer is built over.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params.handles()
    }

    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        self.params.named()
    }

    /// The parameter with this Hugging Face name.
    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.get(name)
    }

    fn p(&self, name: &str) -> Tensor {
        self.params.cast(name, self.compute)
    }

    fn lp(&self, l: usize, s: &str) -> Tensor {
        self.p(&layer_name(l, s))
    }

    fn opt_lp(&self, l: usize, s: &str) -> Option<Tensor> {
        let n = layer_name(l, s);
        self.params.get(&n).map(|_| self.p(&n))
    }

    fn norm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let h = self.cfg.hidden_size as i64;
        debug_assert_eq!(x.size()[2], h);
        if self.fused_norm && x.device().is_cuda() {
            return x.rms_norm([h].as_slice(), Some(w), self.cfg.rms_norm_eps);
        }
        // In float32 at least, as Hugging Face does.
        let k = if self.compute == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let xf = x.to_kind(k);
        let var = xf.square().mean_dim([-1i64].as_slice(), true, k);
        let y = xf * (var + self.cfg.rms_norm_eps).rsqrt();
        y.to_kind(self.compute) * w
    }

    /// Embeds the input: (B, S, hidden) in the compute dtype.
    pub fn embed(&self, input: Input<'_>) -> Result<Tensor> {
        match input {
            Input::Ids(ids) => {
                if ids.dim() != 2 || ids.kind() != Kind::Int64 {
                    return Err(RuntimeError::Shape(format!(
                        "token ids must be (B, S) int64, got {:?} {:?}",
                        ids.size(),
                        ids.kind()
                    )));
                }
                // Gather the rows in the master dtype, then cast: casting the whole table
                // first would read and write all of it every step.
                let w = &self.params.must("model.embed_tokens.weight");
                Ok(Tensor::embedding(w, ids, -1, false, false).to_kind(self.compute))
            }
            Input::Embeddings(e) => {
                if e.dim() != 3 || e.size()[2] != self.cfg.hidden_size as i64 {
                    return Err(RuntimeError::Shape(format!(
                        "embeddings must be (B, S, {}), got {:?}",
                        self.cfg.hidden_size,
                        e.size()
                    )));
                }
                Ok(e.to_kind(self.compute))
            }
        }
    }

    /// Layer `l`'s weights before attention, cast to the compute dtype.
    pub fn pre_weights(&self, l: usize) -> PreWeights {
        let bias = self.opt_lp(l, "self_attn.q_proj.bias").map(|qb| {
            (
                qb,
                self.lp(l, "self_attn.k_proj.bias"),
                self.lp(l, "self_attn.v_proj.bias"),
            )
        });
        PreWeights {
            norm: self.lp(l, "input_layernorm.weight"),
            q: self.lp(l, "self_attn.q_proj.weight"),
            k: self.lp(l, "self_attn.k_proj.weight"),
            v: self.lp(l, "self_attn.v_proj.weight"),
            bias,
        }
    }

    /// Layer `l`'s weights after attention, cast to the compute dtype.
    pub fn post_weights(&self, l: usize) -> PostWeights {
        PostWeights {
            o: self.lp(l, "self_attn.o_proj.weight"),
            norm: self.lp(l, "post_attention_layernorm.weight"),
            gate: self.lp(l, "mlp.gate_proj.weight"),
            up: self.lp(l, "mlp.up_proj.weight"),
            down: self.lp(l, "mlp.down_proj.weight"),
        }
    }

    /// Layer `l` before attention: q (B, Hq, S, D), k and v (B, Hkv, S, D), RoPE applied.
    pub fn pre_attention(&self, l: usize, x: &Tensor, rope: &Rope) -> (Tensor, Tensor, Tensor) {
        self.pre_attention_with(&self.pre_weights(l), x, rope)
    }

    /// [`Decoder::pre_attention`] with weights already cast.
    pub fn pre_attention_with(
        &self,
        w: &PreWeights,
        x: &Tensor,
        rope: &Rope,
    ) -> (Tensor, Tensor, Tensor) {
        let c = &self.cfg;
        let (b, s) = (x.size()[0], x.size()[1]);
        let hn = self.norm(x, &w.norm);
        let proj = |wt: &Tensor, bias: Option<&Tensor>, heads: usize| {
            hn.linear(wt, bias)
                .view([b, s, heads as i64, c.head_dim as i64])
                .transpose(1, 2)
        };
        let (qb, kb, vb) = match &w.bias {
            Some((q, k, v)) => (Some(q), Some(k), Some(v)),
            None => (None, None, None),
        };
        let q = rope.apply(&proj(&w.q, qb, c.num_heads));
        let k = rope.apply(&proj(&w.k, kb, c.num_kv_heads));
        let v = proj(&w.v, vb, c.num_kv_heads);
        (q, k, v)
    }

    /// Layer `l` after attention: `attn` (B, Hq, S, D) -> the next residual stream.
    pub fn post_attention(&self, l: usize, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        self.post_attention_with(&self.post_weights(l), x, attn)
    }

    /// [`Decoder::post_attention`] with weights already cast. SwiGLU is one autograd node
    /// ([`crate::ffi::swiglu`]) that keeps gate and up, not silu(gate) besides.
    pub fn post_attention_with(
        &self,
        w: &PostWeights,
        x: &Tensor,
        attn: &Tensor,
    ) -> Result<Tensor> {
        let (b, s) = (x.size()[0], x.size()[1]);
        let a = attn.transpose(1, 2).contiguous().view([
            b,
            s,
            (self.cfg.num_heads * self.cfg.head_dim) as i64,
        ]);
        let h = x + a.linear::<Tensor>(&w.o, None);
        let hn = self.norm(&h, &w.norm);
        let gate = hn.linear::<Tensor>(&w.gate, None);
        let up = hn.linear::<Tensor>(&w.up, None);
        let m = crate::ffi::swiglu(&gate, &up)?.linear::<Tensor>(&w.down, None);
        Ok(h + m)
    }

    /// Final norm and LM head: logits (B, S, vocab) in the compute dtype.
    pub fn head(&self, x: &Tensor) -> Tensor {
        let hn = self.final_norm(x);
        hn.linear::<Tensor>(&self.head_weight().to_kind(self.compute), None)
    }

    /// The final norm alone: (B, S, hidden) in the compute dtype.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.final_norm_with(&self.final_norm_weight(), x)
    }

    /// The final norm's weight cast to the compute dtype.
    pub fn final_norm_weight(&self) -> Tensor {
        self.p("model.norm.weight")
    }

    /// [`Decoder::final_norm`] with its weight already cast.
    pub fn final_norm_with(&self, w: &Tensor, x: &Tensor) -> Tensor {
        self.norm(x, w)
    }

    /// The embedding table (vocab, hidden) in the master dtype.
    pub fn embed_weight(&self) -> &Tensor {
        self.params.must("model.embed_tokens.weight")
    }

    /// The LM head's weight (vocab, hidden) in the master dtype (the embedding when tied).
    pub fn head_weight(&self) -> &Tensor {
        let n = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.params.must(n)
    }

    /// Whole forward on one shard: `positions` (1-D int64, the shard's absolute positions),
    /// `attn(layer, q, k, v)` returns the attention output (B, Hq, S, D) for the shard.
    pub fn forward(
        &self,
        input: Input<'_>,
        positions: &Tensor,
        attn: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut x = self.embed(input)?;
        if positions.dim() != 1 || positions.size()[0] != x.size()[1] {
            return Err(RuntimeError::Shape(format!(
                "{:?} positions for {} tokens",
                positions.size(),
                x.size()[1]
            )));
        }
        let rope = Rope::new(&self.cfg, positions, self.compute);
        for l in 0..self.cfg.num_layers {
            let (q, k, v) = self.pre_attention(l, &x, &rope);
            let a = attn(l, &q, &k, &v)?;
            x = self.post_attention(l, &x, &a)?;
        }
        Ok(self.head(&x))
    }
}

/// Causal attention on one device over the whole (unsharded) sequence, through the runtime's
/// kernels (no autograd): for inference and single-device checks.
pub fn local_causal(
    backend: Backend,
) -> impl FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<Tensor> {
    move |_l, q, k, v| {
        let scale = 1.0 / (q.size()[3] as f64).sqrt();
        Ok(attention_fwd(backend, q, k, v, true, scale)?.0)
    }
}

/// Causal attention by matmul and softmax with autograd (any dtype): the reference that the
/// hand-written sequence-parallel backward is checked against.
pub fn autograd_causal(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (hq, hkv) = (q.size()[1], k.size()[1]);
    let g = hq / hkv;
    let k = k.repeat_interleave_self_int(g, 1, None);
    let v = v.repeat_interleave_self_int(g, 1, None);
    let s = q.size()[2];
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let scores = q.matmul(&k.transpose(2, 3)) * scale;
    let mask = Tensor::ones([s, s], (Kind::Bool, q.device())).triu(1);
    let scores = scores.masked_fill(&mask, f64::NEG_INFINITY);
    scores.softmax(-1, q.kind()).matmul(&v)
}
