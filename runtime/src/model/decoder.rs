//! Decoder parameters (Hugging Face names, master precision) and the per-layer pieces of the
//! forward: embedding, the part of a layer before attention (norm, q/k/v projections, RoPE),
//! the part after it (o_proj, residual, norm, SwiGLU MLP, residual) and the head. Parameters
//! are kept in the master dtype (fp32, or f64 for tests) and cast to the compute dtype inside
//! the forward, so autograd gradients land in the master dtype.
use super::config::ModelConfig;
use crate::error::{Result, RuntimeError};
use crate::kernel::{attention_fwd, Backend};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// What enters the decoder: token ids (B, S) or embeddings (B, S, hidden) (e.g. vision tokens
/// merged with text).
pub enum Input<'a> {
    Ids(&'a Tensor),
    Embeddings(&'a Tensor),
}

/// RoPE tables for one shard's positions (which need not be contiguous: zigzag shards).
pub struct Rope {
    /// (S, head_dim) in the compute dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for the given absolute positions (a 1-D int64 tensor).
    pub fn new(cfg: &ModelConfig, positions: &Tensor, kind: Kind) -> Rope {
        let d = cfg.head_dim as i64;
        let dev = positions.device();
        let inv = Tensor::arange_start_step(0, d, 2, (Kind::Double, dev))
            .divide_scalar(d as f64)
            .neg()
            .multiply_scalar(cfg.rope_theta.ln())
            .exp();
        let freqs = positions
            .to_kind(Kind::Double)
            .unsqueeze(1)
            .matmul(&inv.unsqueeze(0));
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        Rope {
            cos: emb.cos().to_kind(kind),
            sin: emb.sin().to_kind(kind),
        }
    }

    /// Positions of zigzag ranges, in local order.
    pub fn positions(ranges: &[(usize, usize)], device: Device) -> Tensor {
        let v: Vec<i64> = ranges
            .iter()
            .flat_map(|&(s, e)| (s as i64)..(e as i64))
            .collect();
        Tensor::from_slice(&v).to(device)
    }

    /// Applies the rotation to (B, H, S, D).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let x1 = x.narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let rot = Tensor::cat(&[&x2.neg(), &x1], 3);
        x * &self.cos + rot * &self.sin
    }
}

/// A decoder whose parameters are named as in Hugging Face checkpoints
/// (`model.layers.0.self_attn.q_proj.weight`, ...).
pub struct Decoder {
    pub cfg: ModelConfig,
    /// Dtype of the matmuls and activations (bf16 on GPU, f32/f64 on CPU).
    pub compute: Kind,
    params: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

/// Serialises seeded initialisation: libtorch's generator is global, and ranks may be
/// threads.
static INIT_LOCK: Mutex<()> = Mutex::new(());

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
        let index = params
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Decoder {
            cfg,
            compute,
            params,
            index,
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
        let _g = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let params = Self::param_shapes(&cfg)
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let t = tch::no_grad(|| {
                    if name.ends_with("norm.weight") {
                        Tensor::ones(shape.as_slice(), (master, device))
                    } else if name.ends_with(".bias") {
                        // Small non-zero biases so that tests see their gradients.
                        tch::manual_seed(seed.wrapping_mul(1_000_003).wrapping_add(i as i64));
                        Tensor::randn(shape.as_slice(), (master, device)).multiply_scalar(0.02)
                    } else {
                        tch::manual_seed(seed.wrapping_mul(1_000_003).wrapping_add(i as i64));
                        Tensor::randn(shape.as_slice(), (master, device)).multiply_scalar(0.02)
                    }
                });
                (name, t.set_requires_grad(true))
            })
            .collect();
        Ok(Self::from_params(cfg, compute, params))
    }

    /// Loads Hugging Face safetensors files (all shards of a checkpoint). Every expected
    /// tensor must be present with its shape; unknown tensors are ignored.
    pub fn load_safetensors(
        cfg: ModelConfig,
        files: &[&Path],
        device: Device,
        master: Kind,
        compute: Kind,
    ) -> Result<Decoder> {
        cfg.validate()?;
        let mut found: HashMap<String, Tensor> = HashMap::new();
        for f in files {
            for (n, t) in Tensor::read_safetensors(f)? {
                found.insert(n, t);
            }
        }
        let mut params = Vec::new();
        for (name, shape) in Self::param_shapes(&cfg) {
            let t = found
                .remove(&name)
                .ok_or_else(|| RuntimeError::Config(format!("checkpoint has no tensor {name}")))?;
            if t.size() != shape {
                return Err(RuntimeError::Config(format!(
                    "{name} is {:?} in the checkpoint, the config says {shape:?}",
                    t.size()
                )));
            }
            let t = tch::no_grad(|| t.to_device(device).to_kind(master));
            params.push((name, t.set_requires_grad(true)));
        }
        Ok(Self::from_params(cfg, compute, params))
    }

    /// Every parameter with its Hugging Face name, in [`Decoder::param_shapes`] order.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The parameter with this Hugging Face name.
    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.params[i].1)
    }

    fn p(&self, name: &str) -> Tensor {
        // Names come from param_shapes, so they exist.
        self.params[self.index[name]].1.to_kind(self.compute)
    }

    fn lp(&self, l: usize, s: &str) -> Tensor {
        self.p(&layer_name(l, s))
    }

    fn opt_lp(&self, l: usize, s: &str) -> Option<Tensor> {
        let n = layer_name(l, s);
        self.index.get(&n).map(|_| self.p(&n))
    }

    fn norm(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let h = self.cfg.hidden_size as i64;
        // In float32 at least, as Hugging Face does.
        let k = if self.compute == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let xf = x.to_kind(k);
        let var = xf.square().mean_dim([-1i64].as_slice(), true, k);
        let y = xf * (var + self.cfg.rms_norm_eps).rsqrt();
        debug_assert_eq!(x.size()[2], h);
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
                let w = &self.params[self.index["model.embed_tokens.weight"]].1;
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

    /// Layer `l` before attention: q (B, Hq, S, D), k and v (B, Hkv, S, D), RoPE applied.
    pub fn pre_attention(&self, l: usize, x: &Tensor, rope: &Rope) -> (Tensor, Tensor, Tensor) {
        let c = &self.cfg;
        let (b, s) = (x.size()[0], x.size()[1]);
        let hn = self.norm(x, &self.lp(l, "input_layernorm.weight"));
        let proj = |name: &str, heads: usize| {
            let w = self.lp(l, &format!("self_attn.{name}.weight"));
            let bias = self.opt_lp(l, &format!("self_attn.{name}.bias"));
            hn.linear(&w, bias.as_ref())
                .view([b, s, heads as i64, c.head_dim as i64])
                .transpose(1, 2)
        };
        let q = rope.apply(&proj("q_proj", c.num_heads));
        let k = rope.apply(&proj("k_proj", c.num_kv_heads));
        let v = proj("v_proj", c.num_kv_heads);
        (q, k, v)
    }

    /// Layer `l` after attention: `attn` (B, Hq, S, D) -> the next residual stream.
    pub fn post_attention(&self, l: usize, x: &Tensor, attn: &Tensor) -> Tensor {
        let (b, s) = (x.size()[0], x.size()[1]);
        let a = attn.transpose(1, 2).contiguous().view([
            b,
            s,
            (self.cfg.num_heads * self.cfg.head_dim) as i64,
        ]);
        let h = x + a.linear::<Tensor>(&self.lp(l, "self_attn.o_proj.weight"), None);
        let hn = self.norm(&h, &self.lp(l, "post_attention_layernorm.weight"));
        let gate = hn.linear::<Tensor>(&self.lp(l, "mlp.gate_proj.weight"), None);
        let up = hn.linear::<Tensor>(&self.lp(l, "mlp.up_proj.weight"), None);
        let m = (gate.silu() * up).linear::<Tensor>(&self.lp(l, "mlp.down_proj.weight"), None);
        h + m
    }

    /// Final norm and LM head: logits (B, S, vocab) in the compute dtype.
    pub fn head(&self, x: &Tensor) -> Tensor {
        let hn = self.final_norm(x);
        hn.linear::<Tensor>(&self.head_weight().to_kind(self.compute), None)
    }

    /// The final norm alone: (B, S, hidden) in the compute dtype.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm(x, &self.p("model.norm.weight"))
    }

    /// The LM head's weight (vocab, hidden) in the master dtype (the embedding when tied).
    pub fn head_weight(&self) -> &Tensor {
        let n = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        &self.params[self.index[n]].1
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
            x = self.post_attention(l, &x, &a);
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
