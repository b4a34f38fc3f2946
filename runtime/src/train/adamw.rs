//! AdamW over one flat buffer holding every parameter (and one holding their gradients), in
//! the parameters' (master) dtype. With a shard group (ZeRO-1/2) each rank keeps the moments
//! of its 1/N slice only: gradients are reduce-scattered, the slice updated, and the
//! parameters all-gathered.
//!
//! ZeRO-3 ([`AdamW::new_zero3`]): the parameters are cut into units (consecutive parameters:
//! the embedding, each layer, the final norm with the head), each unit's flat vector padded
//! to a multiple of N, and rank r keeps slice r of every unit only: master parameters,
//! gradients and both moments are all 1/N. The model's own parameter tensors are released
//! (left empty); the trainer materialises a unit's full weights with
//! [`AdamW::gather_unit`] when it needs them and hands the unit's full gradient to
//! [`AdamW::reduce_unit_grad`] (a reduce-scatter into this rank's gradient slice); the
//! update then touches the local slices only, with no collective. Persistent state per rank
//! for an fp32 master: (4 + 4 + 4 + 4) / N = 16 / N bytes per parameter.
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
use std::ops::Range;
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

/// A ZeRO-3 unit: consecutive parameters gathered and reduced together.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Indices of its parameters (in the order given to [`AdamW::new_zero3`]).
    pub params: Range<usize>,
    /// Each parameter's shape and offset in the unit's flat vector.
    shapes: Vec<Vec<i64>>,
    offsets: Vec<i64>,
    /// Elements without padding, and padded to a multiple of the shard count.
    numel: i64,
    padded: i64,
    /// Where this rank's slice (padded / N elements) starts in the local flat buffers.
    local_off: i64,
}

impl Unit {
    /// Elements without padding.
    pub fn numel(&self) -> i64 {
        self.numel
    }

    /// Length of the gathered (padded) flat vector.
    pub fn padded(&self) -> i64 {
        self.padded
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
    /// ZeRO-3: this rank's slices of every unit, concatenated (no parameter is a view).
    pflat: Tensor,
    /// Their gradients likewise (autograd accumulates into the views in place). ZeRO-3:
    /// this rank's slices, filled by [`AdamW::reduce_unit_grad`].
    gflat: Tensor,
    /// ZeRO-3 units (None for stages 0-2).
    units: Option<Vec<Unit>>,
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

/// The one dtype and device of all `params` (an error when empty or mixed).
fn common_kind_device(params: &[Tensor]) -> Result<(Kind, Device)> {
    let first = params
        .first()
        .ok_or_else(|| RuntimeError::Config("no parameters".into()))?;
    let (kind, dev) = (first.kind(), first.device());
    if params.iter().any(|p| p.kind() != kind || p.device() != dev) {
        return Err(RuntimeError::Config(
            "parameters of mixed dtype or device".into(),
        ));
    }
    Ok((kind, dev))
}

impl AdamW {
    /// State for `params`; `shard` = the group the state is sharded over (None: ZeRO-0).
    /// The parameters' storage (and their gradients') moves into two flat buffers, so that
    /// the update is a handful of large in-place kernels and gradients need no gathering.
    pub fn new(
        params: &[Tensor],
        cfg: AdamWConfig,
        shard: Option<&dyn Communicator>,
    ) -> Result<AdamW> {
        let (kind, dev) = common_kind_device(params)?;
        let kernel = checked_kernel(&cfg, dev, kind)?;
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
            units: None,
            m: Tensor::zeros([len], (kind, dev)),
            v: Tensor::zeros([len], (kind, dev)),
            t: 0,
            kernel,
            step_t: Tensor::zeros([1], (Kind::Float, dev)),
        })
    }

    /// ZeRO-3 state for `params` cut into `units` (consecutive index ranges covering every
    /// parameter in order), sharded over `group`: this rank copies its slice of each unit,
    /// then every parameter's storage (and gradient's, if any) is released, leaving empty
    /// tensors of the same dtype and device in the model.
    pub fn new_zero3(
        params: &[Tensor],
        units: &[Range<usize>],
        cfg: AdamWConfig,
        group: &dyn Communicator,
    ) -> Result<AdamW> {
        let (kind, dev) = common_kind_device(params)?;
        let mut next = 0;
        for u in units {
            if u.start != next || u.end <= u.start {
                return Err(RuntimeError::Config(format!(
                    "ZeRO-3 units must be consecutive non-empty ranges (got {u:?} after {next})"
                )));
            }
            next = u.end;
        }
        if next != params.len() {
            return Err(RuntimeError::Config(format!(
                "ZeRO-3 units cover {next} of {} parameters",
                params.len()
            )));
        }
        let kernel = checked_kernel(&cfg, dev, kind)?;
        let (shards, shard_rank) = (group.size(), group.rank());
        let n = shards as i64;
        let mut layout = Vec::with_capacity(units.len());
        let mut local = 0;
        for u in units {
            let shapes: Vec<Vec<i64>> = params[u.clone()].iter().map(|p| p.size()).collect();
            let mut offsets = Vec::with_capacity(shapes.len());
            let mut numel = 0;
            for p in &params[u.clone()] {
                offsets.push(numel);
                numel += p.numel() as i64;
            }
            let padded = (numel + n - 1) / n * n;
            layout.push(Unit {
                params: u.clone(),
                shapes,
                offsets,
                numel,
                padded,
                local_off: local,
            });
            local += padded / n;
        }
        let _ng = tch::no_grad_guard();
        let pflat = Tensor::zeros([local], (kind, dev));
        for u in &layout {
            // This rank's slice [a, a + len) of the unit's flat vector.
            let len = u.padded / n;
            let a = len * shard_rank as i64;
            for (i, p) in params[u.params.clone()].iter().enumerate() {
                let (o, k) = (u.offsets[i], p.numel() as i64);
                let (lo, hi) = (o.max(a), (o + k).min(a + len));
                if lo < hi {
                    let src = p.detach().reshape([-1]).narrow(0, lo - o, hi - lo);
                    pflat
                        .narrow(0, u.local_off + lo - a, hi - lo)
                        .f_copy_(&src)?;
                }
            }
        }
        let empty = Tensor::empty([0], (kind, dev));
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                g.f_set_data(&empty)?;
            }
            p.shallow_clone().f_set_data(&empty)?;
        }
        Ok(AdamW {
            cfg,
            numel: layout.iter().map(|u| u.numel).sum(),
            padded: local * n,
            shards,
            shard_rank,
            gflat: pflat.zeros_like(),
            m: pflat.zeros_like(),
            v: pflat.zeros_like(),
            pflat,
            units: Some(layout),
            t: 0,
            kernel,
            step_t: Tensor::zeros([1], (Kind::Float, dev)),
        })
    }

    /// The ZeRO-3 units (None for stages 0-2).
    pub fn units(&self) -> Option<&[Unit]> {
        self.units.as_deref()
    }

    fn unit(&self, u: usize) -> Result<&Unit> {
        self.units
            .as_ref()
            .and_then(|us| us.get(u))
            .ok_or_else(|| RuntimeError::Config(format!("no ZeRO-3 unit {u}")))
    }

    /// ZeRO-3: unit `u`'s full (padded) flat parameter vector in `kind`, all-gathered over
    /// `group` (every rank of it must call). The local slice is cast first, so the gather
    /// moves `kind`'s bytes (2 per parameter for bf16).
    pub fn gather_unit(&self, u: usize, kind: Kind, group: &dyn Communicator) -> Result<Tensor> {
        let unit = self.unit(u)?;
        let _ng = tch::no_grad_guard();
        let len = unit.padded / self.shards as i64;
        let mine = self.pflat.narrow(0, unit.local_off, len);
        let send = if kind == mine.kind() {
            mine.copy()
        } else {
            mine.to_kind(kind)
        };
        if self.shards == 1 {
            return Ok(send);
        }
        let recv = Tensor::empty([unit.padded], (kind, self.pflat.device()));
        group.all_gather(&send, &recv)?;
        Ok(recv)
    }

    /// ZeRO-3: the parameters of unit `u` as views (their shapes) of its gathered `flat`.
    pub fn unit_views(&self, u: usize, flat: &Tensor) -> Result<Vec<Tensor>> {
        let unit = self.unit(u)?;
        Ok(unit
            .shapes
            .iter()
            .zip(&unit.offsets)
            .map(|(s, &o)| {
                let k: i64 = s.iter().product();
                flat.narrow(0, o, k).view(s.as_slice())
            })
            .collect())
    }

    /// ZeRO-3: a zero gradient vector for unit `u` (padded, master dtype); fill it (e.g.
    /// through [`AdamW::unit_views`]) and pass it to [`AdamW::reduce_unit_grad`].
    pub fn new_unit_grad(&self, u: usize) -> Result<Tensor> {
        let unit = self.unit(u)?;
        Ok(self
            .gflat
            .new_zeros([unit.padded], (self.gflat.kind(), self.gflat.device())))
    }

    /// ZeRO-3: sums this rank's full gradient of unit `u` (`grad`, padded, master dtype) over
    /// `group` and adds this rank's slice of the sum to its gradient buffer.
    pub fn reduce_unit_grad(
        &self,
        u: usize,
        grad: &Tensor,
        group: &dyn Communicator,
    ) -> Result<()> {
        let unit = self.unit(u)?;
        let _ng = tch::no_grad_guard();
        let len = unit.padded / self.shards as i64;
        let mut dst = self.gflat.narrow(0, unit.local_off, len);
        if grad.size() != [unit.padded] || grad.kind() != dst.kind() {
            return Err(RuntimeError::Shape(format!(
                "unit {u} gradient is {:?} {:?}, want [{}] {:?}",
                grad.size(),
                grad.kind(),
                unit.padded,
                dst.kind()
            )));
        }
        if self.shards == 1 {
            let _ = dst.f_add_(grad)?;
            return Ok(());
        }
        let recv = dst.empty_like();
        group.reduce_scatter(grad, &recv)?;
        let _ = dst.f_add_(&recv)?;
        Ok(())
    }

    /// The update kernel in use (`Plain` or `Fused`).
    pub fn kernel(&self) -> AdamWKernel {
        self.kernel
    }

    /// Every parameter as one padded flat buffer (the model's parameters are views of it);
    /// ZeRO-3: this rank's slices of the units.
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
    /// parameters and clears their gradients. ZeRO-3: the gradients were already summed
    /// unit by unit ([`AdamW::reduce_unit_grad`]), so no collective runs here.
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
        let zero3 = self.units.is_some();
        let len = if zero3 { self.pflat.size()[0] } else { len };
        let off = if zero3 { 0 } else { off };
        let mut g = if zero3 {
            self.gflat.shallow_clone()
        } else if self.shards > 1 {
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
        if self.shards > 1 && !zero3 {
            let t2 = std::time::Instant::now();
            grad_group.all_gather(&p.copy(), &self.pflat)?;
            sync();
            reduce_s += t2.elapsed().as_secs_f64();
        }
        Ok((reduce_s, update_s))
    }
}

/// The kernel `cfg` asks for on `dev`; a fused kernel on CUDA is first checked against the
/// plain update.
fn checked_kernel(cfg: &AdamWConfig, dev: Device, kind: Kind) -> Result<AdamWKernel> {
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
    Ok(kernel)
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
    /// The state a checkpoint holds: every parameter as one padded flat buffer (ZeRO-3:
    /// this rank's slices only), this rank's moments and the step count.
    pub(crate) fn checkpoint_state(&self) -> (&Tensor, &Tensor, &Tensor, i32) {
        (&self.pflat, &self.m, &self.v, self.t)
    }

    /// (shard count, this rank's shard, parameters without padding, padded length).
    pub(crate) fn checkpoint_layout(&self) -> (usize, usize, i64, i64) {
        (self.shards, self.shard_rank, self.numel, self.padded)
    }

    /// Whether the parameter buffer holds this rank's slices only (ZeRO-3).
    pub(crate) fn params_sharded(&self) -> bool {
        self.units.is_some()
    }

    /// Sets the step count after the buffers of [`AdamW::checkpoint_state`] were filled in
    /// place from a checkpoint.
    pub(crate) fn set_checkpoint_step(&mut self, t: i32) {
        self.t = t;
    }
}
