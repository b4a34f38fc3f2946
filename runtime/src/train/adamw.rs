//! AdamW over one flat buffer holding every parameter (and one holding their gradients), in
//! the parameters' (master) dtype. With a shard group (ZeRO-1/2) each rank keeps the moments
//! of its 1/N slice only: gradients are reduce-scattered, the slice updated, and the
//! parameters all-gathered.
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
    numel: i64,
    /// Padded length (a multiple of the shard count).
    padded: i64,
    shards: usize,
    shard_rank: usize,
    /// Every parameter, in order, as one padded buffer: the parameters are views of it.
    pflat: Tensor,
    /// Their gradients likewise (autograd accumulates into the views in place).
    gflat: Tensor,
    /// Moments of the slice this rank updates (the whole vector without sharding).
    m: Tensor,
    v: Tensor,
    t: i32,
}

/// Elements updated per group of kernels (bounds the temporaries).
const CHUNK: i64 = 1 << 24;

impl AdamW {
    /// State for `params`; `shard` = the group the state is sharded over (None: ZeRO-0).
    /// The parameters' storage (and their gradients') moves into two flat buffers, so that
    /// the update is a handful of large in-place kernels and gradients need no gathering.
    pub fn new(
        params: &[Tensor],
        cfg: AdamWConfig,
        shard: Option<&dyn Communicator>,
    ) -> Result<AdamW> {
        let first = params
            .first()
            .ok_or_else(|| RuntimeError::Config("no parameters".into()))?;
        let (kind, dev) = (first.kind(), first.device());
        if params.iter().any(|p| p.kind() != kind || p.device() != dev) {
            return Err(RuntimeError::Config(
                "parameters of mixed dtype or device".into(),
            ));
        }
        let numel: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let (shards, shard_rank) = shard.map_or((1, 0), |c| (c.size(), c.rank()));
        let n = shards as i64;
        let padded = (numel + n - 1) / n * n;
        let len = padded / n;
        // Gradients must exist to be re-seated: a zero backward defines the missing ones.
        let missing: Vec<&Tensor> = params.iter().filter(|p| !p.grad().defined()).collect();
        if !missing.is_empty() {
            tch::with_grad(|| {
                missing
                    .iter()
                    .map(|p| p.sum(kind) * 0.0)
                    .reduce(|a, b| a + b)
                    .map(|s| s.backward())
            });
        }
        let _ng = tch::no_grad_guard();
        let pflat = Tensor::zeros([padded], (kind, dev));
        let gflat = Tensor::zeros([padded], (kind, dev));
        let mut o = 0;
        for p in params {
            let k = p.numel() as i64;
            let shape = p.size();
            let mut pv = pflat.narrow(0, o, k).view(shape.as_slice());
            let mut gv = gflat.narrow(0, o, k).view(shape.as_slice());
            pv.f_copy_(&p.detach())?;
            let mut g = p.grad();
            gv.f_copy_(&g)?;
            let mut ph = p.shallow_clone();
            ph.f_set_data(&pv)?;
            g.f_set_data(&gv)?;
            if p.data_ptr() != pv.data_ptr() || p.grad().data_ptr() != gv.data_ptr() {
                return Err(RuntimeError::Config(
                    "could not re-seat a parameter in the flat buffer".into(),
                ));
            }
            o += k;
        }
        Ok(AdamW {
            cfg,
            numel,
            padded,
            shards,
            shard_rank,
            pflat,
            gflat,
            m: Tensor::zeros([len], (kind, dev)),
            v: Tensor::zeros([len], (kind, dev)),
            t: 0,
        })
    }

    /// Number of parameters (without padding).
    pub fn numel(&self) -> i64 {
        self.numel
    }

    /// Sums the gradients over `grad_group`, multiplies them by `scale`, updates the
    /// parameters and clears their gradients.
    pub fn step(&mut self, grad_group: &dyn Communicator, scale: f64) -> Result<()> {
        let _ng = tch::no_grad_guard();
        self.t += 1;
        let c = self.cfg;
        let len = self.padded / self.shards as i64;
        let off = len * self.shard_rank as i64;
        let mut g = if self.shards > 1 {
            let recv = self
                .gflat
                .new_zeros([len], (self.gflat.kind(), self.gflat.device()));
            grad_group.reduce_scatter(&self.gflat, &recv)?;
            recv
        } else {
            if grad_group.size() > 1 {
                grad_group.all_reduce(&self.gflat)?;
            }
            self.gflat.shallow_clone()
        };
        if scale != 1.0 {
            let _ = g.f_mul_scalar_(scale)?;
        }
        let bc1 = 1.0 - c.beta1.powi(self.t);
        let bc2 = 1.0 - c.beta2.powi(self.t);
        // p -= lr * (m / bc1) / (sqrt(v / bc2) + eps) + lr * wd * p, rewritten as
        // p -= (lr * sqrt(bc2) / bc1) * m / (sqrt(v) + eps * sqrt(bc2)).
        let step = c.lr * bc2.sqrt() / bc1;
        let eps = c.eps * bc2.sqrt();
        let p = self.pflat.narrow(0, off, len);
        let mut a = 0;
        while a < len {
            let k = CHUNK.min(len - a);
            let mut pc = p.narrow(0, a, k);
            let gc = g.narrow(0, a, k);
            let mut mc = self.m.narrow(0, a, k);
            let mut vc = self.v.narrow(0, a, k);
            if c.weight_decay != 0.0 {
                let _ = pc.f_mul_scalar_(1.0 - c.lr * c.weight_decay)?;
            }
            let _ = mc.f_lerp_(&gc, 1.0 - c.beta1)?;
            let _ = vc.f_lerp_(&gc.square(), 1.0 - c.beta2)?;
            let mut d = vc.sqrt();
            let _ = d.f_add_scalar_(eps)?;
            let _ = d.f_mul_scalar_(-1.0 / step)?;
            let _ = pc.f_addcdiv_(&mc, &d)?;
            a += k;
        }
        if self.shards > 1 {
            grad_group.all_gather(&p.copy(), &self.pflat)?;
        }
        let _ = self.gflat.f_zero_()?;
        Ok(())
    }
}
