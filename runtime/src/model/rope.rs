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
        let (inv, scale) = inv_freq(cfg);
        let inv = Tensor::from_slice(&inv).to(positions.device());
        Rope::from_inv(positions, &inv, scale, kind)
    }

    /// [`Rope::new`] with the inverse frequencies already a float64 tensor on the positions'
    /// device (`inv_freq`, and its attention scale): kernels only, no host transfer, so it
    /// may be captured in a CUDA graph.
    pub fn from_inv(positions: &Tensor, inv: &Tensor, scale: f64, kind: Kind) -> Rope {
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

    /// Tables for the one position `pos` (decoding), computed on the host in float64 as
    /// [`Rope::new`] computes them and copied to `device` in one transfer: no kernel launches
    /// for the table (`Rope::new` launches a dozen small ones for a single row).
    pub fn at_position(cfg: &ModelConfig, pos: usize, kind: Kind, device: Device) -> Rope {
        let (inv, scale) = inv_freq(cfg);
        let p = pos as f64;
        let half: Vec<f64> = inv.iter().map(|f| p * f).collect();
        let row = |g: fn(f64) -> f64| half.iter().chain(&half).map(move |&x| g(x) * scale);
        let both: Vec<f64> = row(f64::cos).chain(row(f64::sin)).collect();
        let d = 2 * half.len() as i64;
        let t = Tensor::from_slice(&both)
            .view([2, 1, d])
            .to_kind(kind)
            .to(device);
        Rope {
            cos: t.get(0),
            sin: t.get(1),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The host-made table of one position equals the general one (to the last float64 ulp,
    /// so equal once cast to bf16) for plain and scaled frequencies.
    #[test]
    fn table_of_one_position_equals_the_general_one() {
        let mut cfgs = vec![ModelConfig::tiny()];
        let mut yarn = ModelConfig::tiny();
        yarn.rope_scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32768.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.1386,
            truncate: true,
        };
        cfgs.push(yarn);
        for cfg in &cfgs {
            for kind in [Kind::Double, Kind::BFloat16] {
                for pos in [0usize, 1, 4097, 1_048_575] {
                    let general = Rope::new(cfg, &Tensor::from_slice(&[pos as i64]), kind);
                    let one = Rope::at_position(cfg, pos, kind, Device::Cpu);
                    assert_eq!(one.cos.size(), general.cos.size());
                    // float64: the host's cos/sin and ATen's may differ in the last ulp.
                    let close = |a: &Tensor, b: &Tensor| {
                        (a - b).abs().max().double_value(&[]) <= 4e-16 * 2.0
                    };
                    assert!(close(&one.cos, &general.cos), "cos at {pos} ({kind:?})");
                    assert!(close(&one.sin, &general.sin), "sin at {pos} ({kind:?})");
                }
            }
        }
    }
}
