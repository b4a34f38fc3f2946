//! AdamW over a flat view of every parameter, in the parameters' (master) dtype. With a
//! shard group (ZeRO-1/2) each rank keeps the moments of its 1/N slice only: gradients are
//! reduce-scattered, the slice updated, and the parameters all-gathered.
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use tch::Tensor;

/// Hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Tensor>,
    numel: i64,
    /// Padded length (a multiple of the shard count).
    padded: i64,
    shards: usize,
    shard_rank: usize,
    /// Moments of the slice this rank updates (the whole vector without sharding).
    m: Tensor,
    v: Tensor,
    t: i32,
}

impl AdamW {
    /// State for `params`; `shard` = the group the state is sharded over (None: ZeRO-0).
    pub fn new(
        params: &[Tensor],
        cfg: AdamWConfig,
        shard: Option<&dyn Communicator>,
    ) -> Result<AdamW> {
        let first = params
            .first()
            .ok_or_else(|| RuntimeError::Config("no parameters".into()))?;
        let (kind, dev) = (first.kind(), first.device());
        let numel: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let (shards, shard_rank) = shard.map_or((1, 0), |c| (c.size(), c.rank()));
        let n = shards as i64;
        let padded = (numel + n - 1) / n * n;
        let len = padded / n;
        Ok(AdamW {
            cfg,
            params: params.iter().map(|p| p.shallow_clone()).collect(),
            numel,
            padded,
            shards,
            shard_rank,
            m: Tensor::zeros([len], (kind, dev)),
            v: Tensor::zeros([len], (kind, dev)),
            t: 0,
        })
    }

    fn flat(&self, grads: bool) -> Tensor {
        let parts: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| {
                if grads {
                    let g = p.grad();
                    if g.defined() {
                        g.reshape([-1])
                    } else {
                        p.zeros_like().reshape([-1])
                    }
                } else {
                    p.detach().reshape([-1])
                }
            })
            .collect();
        let f = Tensor::cat(&parts, 0);
        if self.padded > self.numel {
            Tensor::cat(
                &[
                    f.shallow_clone(),
                    f.new_zeros([self.padded - self.numel], (f.kind(), f.device())),
                ],
                0,
            )
        } else {
            f
        }
    }

    /// Sums the gradients over `grad_group`, multiplies them by `scale`, updates the
    /// parameters and clears their gradients.
    pub fn step(&mut self, grad_group: &dyn Communicator, scale: f64) -> Result<()> {
        let _ng = tch::no_grad_guard();
        self.t += 1;
        let c = self.cfg;
        let g_full = self.flat(true);
        let len = self.padded / self.shards as i64;
        let off = len * self.shard_rank as i64;
        let g = if self.shards > 1 {
            let recv = g_full.new_zeros([len], (g_full.kind(), g_full.device()));
            grad_group.reduce_scatter(&g_full, &recv)?;
            recv
        } else {
            if grad_group.size() > 1 {
                grad_group.all_reduce(&g_full)?;
            }
            g_full
        } * scale;
        let p_full = self.flat(false);
        let p = p_full.narrow(0, off, len);
        self.m = &self.m * c.beta1 + &g * (1.0 - c.beta1);
        self.v = &self.v * c.beta2 + g.square() * (1.0 - c.beta2);
        let bc1 = 1.0 - c.beta1.powi(self.t);
        let bc2 = 1.0 - c.beta2.powi(self.t);
        let upd = (&self.m / bc1) / ((&self.v / bc2).sqrt() + c.eps) + &p * c.weight_decay;
        let new_p = &p - upd * c.lr;
        let new_full = if self.shards > 1 {
            let out = p_full.zeros_like();
            grad_group.all_gather(&new_p, &out)?;
            out
        } else {
            new_p
        };
        let mut o = 0;
        for p in &mut self.params {
            let n = p.numel() as i64;
            let src = new_full.narrow(0, o, n).view(p.size().as_slice());
            p.f_copy_(&src)?;
            p.zero_grad();
            o += n;
        }
        Ok(())
    }
}
