//! Rotary position embedding: the inverse frequencies of a Hugging Face config (plain, or
//! scaled as `rope_scaling` says: `linear`, `llama3`, `yarn`) and the cos/sin tables for a
//! shard's own positions (which need not be contiguous: zigzag shards).
//!
//! Sources: RoFormer (Su et al. 2021) for the rotation; position interpolation (Chen et al.
//! 2023) for `linear`; the Llama 3 paper's long-context recipe, as Meta's reference code and
//! Transformers' `_compute_llama3_parameters` apply it, for `llama3`; YaRN (Peng et al. 2023,
//! Eqs. 17-20 and the attention temperature `0.1 ln s + 1`) for `yarn`, the scaling Qwen2.5
//! ships for contexts past 32K. Frequencies are computed in float64; the tables are cast to
//! the compute dtype.
use super::config::ModelConfig;
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// How the rotary frequencies are scaled (`rope_scaling` / `rope_parameters` of a config).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (position interpolation).
    Linear {
        factor: f64,
    },
    /// Llama 3.1+: long wavelengths divided by `factor`, short ones kept, a smooth ramp
    /// between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN: NTK-by-parts interpolation between `beta_slow` and `beta_fast` rotations, and
    /// cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
}

/// The inverse frequencies (head_dim / 2) and the factor cos and sin are scaled by.
pub fn inv_freq(cfg: &ModelConfig) -> (Vec<f64>, f64) {
    let d = cfg.head_dim;
    let base = cfg.rope_theta;
    let plain: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => (plain, 1.0),
        RopeScaling::Linear { factor } => (plain.iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: lo,
            high_freq_factor: hi,
            original_max_position_embeddings: old,
        } => {
            let (low_wl, high_wl) = (old / lo, old / hi);
            let out = plain
                .iter()
                .map(|&f| {
                    let wl = 2.0 * PI / f;
                    if wl < high_wl {
                        f
                    } else if wl > low_wl {
                        f / factor
                    } else {
                        let s = (old / wl - lo) / (hi - lo);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect();
            (out, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: old,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        } => {
            // Dimension whose wavelength makes `rot` turns over the original context.
            let dim_of = |rot: f64| (d as f64 * (old / (rot * 2.0 * PI)).ln()) / (2.0 * base.ln());
            let (mut low, mut high) = (dim_of(beta_fast), dim_of(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(d as f64 - 1.0));
            if low == high {
                high += 0.001;
            }
            let out = plain
                .iter()
                .enumerate()
                .map(|(i, &f)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolate = 1.0 - ramp;
                    (f / factor) * (1.0 - extrapolate) + f * extrapolate
                })
                .collect();
            (out, attention_factor)
        }
    }
}

/// RoPE tables for one shard's positions.
pub struct Rope {
    /// (S, head_dim) in the compute dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for the given absolute positions (a 1-D int64 tensor).
    pub fn new(cfg: &ModelConfig, positions: &Tensor, kind: Kind) -> Rope {
        let dev = positions.device();
        let (inv, scale) = inv_freq(cfg);
        let inv = Tensor::from_slice(&inv).to(dev);
        let freqs = positions
            .to_kind(Kind::Double)
            .unsqueeze(1)
            .matmul(&inv.unsqueeze(0));
        let emb = Tensor::cat(&[&freqs, &freqs], 1);
        Rope {
            cos: (emb.cos() * scale).to_kind(kind),
            sin: (emb.sin() * scale).to_kind(kind),
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
