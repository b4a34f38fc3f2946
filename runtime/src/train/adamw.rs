//! AdamW over one flat buffer holding every parameter (and one holding their gradients), in
//! the parameters' (master) dtype. With a shard group (ZeRO-1/2) each rank keeps the moments
//! of its 1/N slice only: gradients are reduce-scattered, the slice updated, and the
//! parameters all-gathered.
//!
//! Two update kernels compute the same thing (torch.optim.AdamW, Loshchilov & Hutter 2019,
//! Algorithm 2 with decoupled weight decay):
//! - `fused`: ATen's `_fused_adamw_` through the shim (`ffi::fused_adamw`), one multi-tensor
//!   kernel that reads p, g, m, v and writes p, m, v once: 16 B read + 12 B written per fp32
//!   parameter, 28 B x 1.49e9 = 41.6 GB = 13.9 ms at 3.0 TB/s for the 2-layer llama3-8b shape.
//! - `plain`: tch ops in place over 16M-element chunks (mul_, lerp_, square, lerp_, sqrt,
//!   add_, mul_, addcdiv_: about 18 passes of 4 B, 72 B per parameter, ~36 ms for the same
//!   shape; 40 ms measured on the H100).
//!
//! `fused` is the default on CUDA and `plain` on the CPU (CI); the environment variable
//! `MMSP_ADAMW=plain|fused` overrides the default (for A/B runs), and
//! [`AdamWConfig::kernel`] overrides both.
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::ffi::{fused_adamw, FusedAdamWArgs};
use tch::{Device, Kind, Tensor};

/// Which update kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdamWKernel {
    /// `MMSP_ADAMW` if set, else fused on CUDA and plain on the CPU.
    #[default]
    Auto,
    Plain,
    Fused,
}

impl AdamWKernel {
    /// The kernel used for parameters on `dev`.
    pub fn resolve(self, dev: Device) -> Result<AdamWKernel> {
        let k = match self {
            AdamWKernel::Auto => match std::env::var("MMSP_ADAMW").ok().as_deref() {
                Some("plain") => AdamWKernel::Plain,
                Some("fused") => AdamWKernel::Fused,
                Some(other) => {
                    return Err(RuntimeError::Config(format!(
                        "MMSP_ADAMW={other:?} (plain or fused)"
                    )))
                }
                None if dev.is_cuda() => AdamWKernel::Fused,
                None => AdamWKernel::Plain,
            },
            k => k,
        };
        Ok(k)
    }
}

/// Hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub kernel: AdamWKernel,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            kernel: AdamWKernel::Auto,
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
    /// The kernel in use (never `Auto`).
    kernel: AdamWKernel,
    /// The step number as a one-element float32 tensor on the device (read by the fused
    /// kernel; refreshed from `t` before every update, so `t` alone is the state).
    step_t: Tensor,
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
        let kernel = cfg.kernel.resolve(dev)?;
        if kernel == AdamWKernel::Fused && dev.is_cuda() {
            // Self-check on the device before trusting the fused kernel with the model.
            let err = self_check(dev, kind, 1 << 16, 3)?;
            let tol = if kind == Kind::Double { 1e-9 } else { 1e-3 };
            if err.is_nan() || err > tol {
                return Err(RuntimeError::Config(format!(
                    "fused AdamW differs from the plain update by {err:e} (> {tol:e}) on {dev:?}; \
                     MMSP_ADAMW=plain selects the plain update"
                )));
            }
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
            kernel,
            step_t: Tensor::zeros([1], (Kind::Float, dev)),
        })
    }

    /// The update kernel in use (`Plain` or `Fused`).
    pub fn kernel(&self) -> AdamWKernel {
        self.kernel
    }

    /// Every parameter as one padded flat buffer (the model's parameters are views of it).
    pub fn params_flat(&self) -> &Tensor {
        &self.pflat
    }

    /// Their gradients, likewise.
    pub fn grads_flat(&self) -> &Tensor {
        &self.gflat
    }

    /// First and second moments of this rank's slice, and the number of steps taken.
    pub fn moments(&self) -> (&Tensor, &Tensor, i32) {
        (&self.m, &self.v, self.t)
    }

    /// Number of parameters (without padding).
    pub fn numel(&self) -> i64 {
        self.numel
    }

    /// Sums the gradients over `grad_group`, multiplies them by `scale`, updates the
    /// parameters and clears their gradients.
    pub fn step(&mut self, grad_group: &dyn Communicator, scale: f64) -> Result<()> {
        self.step_timed(grad_group, scale, &|| {}).map(|_| ())
    }

    /// [`AdamW::step`], calling `sync` before and after each of its phases and timing them:
    /// returns (gradient reduction + parameter all-gather s, update s).
    pub fn step_timed(
        &mut self,
        grad_group: &dyn Communicator,
        scale: f64,
        sync: &dyn Fn(),
    ) -> Result<(f64, f64)> {
        let _ng = tch::no_grad_guard();
        self.t += 1;
        let c = self.cfg;
        let len = self.padded / self.shards as i64;
        let off = len * self.shard_rank as i64;
        sync();
        let t0 = std::time::Instant::now();
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
        sync();
        let mut reduce_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        if scale != 1.0 {
            let _ = g.f_mul_scalar_(scale)?;
        }
        let p = self.pflat.narrow(0, off, len);
        match self.kernel {
            AdamWKernel::Fused => update_fused(&c, self.t, &self.step_t, &p, &g, &self.m, &self.v)?,
            _ => update_plain(&c, self.t, &p, &g, &self.m, &self.v)?,
        }
        // Zeroing the flat gradient (4 B written per parameter) is counted with the update.
        drop(g);
        let _ = self.gflat.f_zero_()?;
        sync();
        let update_s = t1.elapsed().as_secs_f64();
        if self.shards > 1 {
            let t2 = std::time::Instant::now();
            grad_group.all_gather(&p.copy(), &self.pflat)?;
            sync();
            reduce_s += t2.elapsed().as_secs_f64();
        }
        Ok((reduce_s, update_s))
    }
}

/// One fused update of `p` (1-D) with gradient `g` and moments `m`, `v`, at step `t`
/// (`step_t`: a one-element float32 tensor on the device, overwritten with `t`).
fn update_fused(
    c: &AdamWConfig,
    t: i32,
    step_t: &Tensor,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<()> {
    let _ = step_t.shallow_clone().f_fill_(t as f64)?;
    let args = FusedAdamWArgs {
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        weight_decay: c.weight_decay,
        eps: c.eps,
    };
    fused_adamw(p, g, m, v, step_t, args, CHUNK)
}

/// The tch-op update of `p` (1-D) with gradient `g` and moments `m`, `v`, at step `t`,
/// chunk by chunk.
fn update_plain(
    c: &AdamWConfig,
    t: i32,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<()> {
    let len = p.size()[0];
    let bc1 = 1.0 - c.beta1.powi(t);
    let bc2 = 1.0 - c.beta2.powi(t);
    // p -= lr * (m / bc1) / (sqrt(v / bc2) + eps) + lr * wd * p, rewritten as
    // p -= (lr * sqrt(bc2) / bc1) * m / (sqrt(v) + eps * sqrt(bc2)).
    let step = c.lr * bc2.sqrt() / bc1;
    let eps = c.eps * bc2.sqrt();
    let mut a = 0;
    while a < len {
        let k = CHUNK.min(len - a);
        let mut pc = p.narrow(0, a, k);
        let gc = g.narrow(0, a, k);
        let mut mc = m.narrow(0, a, k);
        let mut vc = v.narrow(0, a, k);
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
    Ok(())
}

/// Runs `steps` updates of both kernels from the same random parameters and gradients
/// (`n` elements of `kind` on `dev`, weight decay on) and returns the largest relative L2
/// difference of the parameters, first and second moments after the last step. The fused
/// kernel evaluates the same formula in another order (bias corrections applied to m and
/// sqrt(v) rather than folded into the step), so the two agree to a few ulps of `kind`.
pub fn self_check(dev: Device, kind: Kind, n: i64, steps: i32) -> Result<f64> {
    let _ng = tch::no_grad_guard();
    let c = AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let p0 = Tensor::randn([n], (kind, dev));
    let (p1, p2) = (p0.copy(), p0.copy());
    let (m1, v1) = (
        Tensor::zeros([n], (kind, dev)),
        Tensor::zeros([n], (kind, dev)),
    );
    let (m2, v2) = (m1.copy(), v1.copy());
    let step_t = Tensor::zeros([1], (Kind::Float, dev));
    for t in 1..=steps {
        let g = Tensor::randn([n], (kind, dev)) * (0.1 * t as f64);
        update_plain(&c, t, &p1, &g, &m1, &v1)?;
        update_fused(&c, t, &step_t, &p2, &g, &m2, &v2)?;
    }
    let rel = |a: &Tensor, b: &Tensor| {
        let d = (a - b).norm().double_value(&[]);
        d / b.norm().double_value(&[]).max(f64::MIN_POSITIVE)
    };
    // The parameters moved by ~lr per step: compare their change, not their value.
    let (d1, d2) = (&p1 - &p0, &p2 - &p0);
    Ok(rel(&d2, &d1).max(rel(&m2, &m1)).max(rel(&v2, &v1)))
}

// ---- Checkpoint access (used by train/checkpoint.rs; kept apart from the update code) ----
impl AdamW {
    /// The state a checkpoint holds: every parameter as one padded flat buffer, this rank's
    /// moments and the step count.
    pub(crate) fn checkpoint_state(&self) -> (&Tensor, &Tensor, &Tensor, i32) {
        (&self.pflat, &self.m, &self.v, self.t)
    }

    /// (shard count, this rank's shard, parameters without padding, padded length).
    pub(crate) fn checkpoint_layout(&self) -> (usize, usize, i64, i64) {
        (self.shards, self.shard_rank, self.numel, self.padded)
    }

    /// Sets the step count after the buffers of [`AdamW::checkpoint_state`] were filled in
    /// place from a checkpoint.
    pub(crate) fn set_checkpoint_step(&mut self, t: i32) {
        self.t = t;
    }
}
