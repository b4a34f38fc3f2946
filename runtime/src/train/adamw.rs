//! AdamW over flat buffers in the parameters' (master) dtype, in two layouts:
//!
//! - **Replicated** ([`AdamW::new`], ZeRO-0): one flat buffer holds every parameter (the
//!   model's parameters are views of it) and one their gradients; every rank keeps the whole
//!   state (16 B per fp32 parameter) and the gradients are all-reduced before the update.
//! - **Sharded units** ([`AdamW::new_sharded`], ZeRO-1/2/3): the parameters are cut into units
//!   (consecutive parameters: the embedding, each layer, the final norm with the head), each
//!   unit's flat vector padded to a multiple of N, and rank r keeps slice r of every unit:
//!   fp32 master parameters, gradient slice and both moments are 1/N (16/N B per parameter).
//!   The model's own parameter tensors are released (left empty). A unit's weights in the
//!   compute dtype come from [`AdamW::gather_unit_start`] (an all-gather of the cast slices);
//!   its gradient, a full master-dtype vector, goes to [`AdamW::reduce_unit_grad_start`] (a
//!   reduce-scatter into this rank's slice), both issued without waiting so that the trainer
//!   overlaps them with compute. The update touches the local slices only, with no collective.
//!   With ZeRO-1 the full gradient vectors persist (4 B per parameter) and are reduce-scattered
//!   in place: this rank's slice of each unit's vector receives the sum and is the gradient
//!   its update reads, with no shard buffer besides, as Megatron-Core's distributed optimizer
//!   keeps its fp32 gradient buffer (6 + 12/N B per parameter with the trainer's resident
//!   bf16 weights); with ZeRO-2 and 3 they exist only while a unit's reduce-scatter is in
//!   flight, and the sum goes to the shard buffer (16/N B with masters and moments). Which
//!   stage keeps which weights is the trainer's business (`train::shards`).
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
use crate::comm::{Communicator, Work};
use crate::error::{Result, RuntimeError};
use crate::ffi::{fused_adamw, set_tensor_version, FusedAdamWArgs};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// Which update kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdamWKernel {
    /// Fused on CUDA, plain on the CPU.
    #[default]
    Auto,
    Plain,
    Fused,
}

impl AdamWKernel {
    /// The kernel used for parameters on `dev`.
    pub fn resolve(self, dev: Device) -> Result<AdamWKernel> {
        let k = match self {
            AdamWKernel::Auto if dev.is_cuda() => AdamWKernel::Fused,
            AdamWKernel::Auto => AdamWKernel::Plain,
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
    /// Clip the gradient to this global L2 norm (over every shard of the grad group, after
    /// the reduction and `scale`), as `torch.nn.utils.clip_grad_norm_`; 0: no clipping.
    pub max_grad_norm: f64,
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
            max_grad_norm: 0.0,
        }
    }
}

/// A ZeRO-3 unit: consecutive parameters gathered and reduced together.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Indices of its parameters (in the order given to [`AdamW::new_sharded`]).
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

/// Where a sharded optimizer's initial values come from: every parameter's shape, and
/// `read(parameter index, first element, count)` returning those elements of the flattened
/// parameter (any dtype and device; copied into the shard).
pub struct ShardInit<'s> {
    pub shapes: &'s [Vec<i64>],
    #[allow(clippy::type_complexity)]
    pub read: &'s dyn Fn(usize, i64, i64) -> Result<Tensor>,
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
    /// Sharded: this rank's slices of every unit, concatenated (no parameter is a view).
    pflat: Tensor,
    /// Their gradients likewise (autograd accumulates into the views in place). Sharded:
    /// this rank's slices, filled by [`AdamW::reduce_unit_grad_start`]; empty under ZeRO-1,
    /// whose slices live in `full_grads`.
    gflat: Tensor,
    /// The sharded units (None for ZeRO-0).
    units: Option<Vec<Unit>>,
    /// ZeRO-1: every unit's full gradient vector (padded, master dtype), kept between steps;
    /// this rank's slice of each holds the reduced gradient after the backward.
    full_grads: Option<Vec<Tensor>>,
    /// Moments of the slice this rank updates (the whole vector without sharding).
    m: Tensor,
    v: Tensor,
    t: i32,
    /// The kernel in use (never `Auto`).
    kernel: AdamWKernel,
    /// The step number as a one-element float32 tensor on the device (read by the fused
    /// kernel; refreshed from `t` before every update, so `t` alone is the state).
    step_t: Tensor,
    /// Whether [`AdamW::step`] measures the global gradient norm without clipping.
    measure_norm: bool,
    /// The global gradient norm of the last step (NaN when not measured).
    last_grad_norm: f64,
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
    /// Replicated (ZeRO-0) state for `params`. The parameters' storage (and their
    /// gradients') moves into two flat buffers, so that the update is a handful of large
    /// in-place kernels and gradients need no gathering.
    pub fn new(params: &[Tensor], cfg: AdamWConfig) -> Result<AdamW> {
        let (kind, dev) = common_kind_device(params)?;
        let kernel = checked_kernel(&cfg, dev, kind)?;
        let numel: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let (shards, shard_rank) = (1, 0);
        let padded = numel;
        let len = padded;
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
            full_grads: None,
            m: Tensor::zeros([len], (kind, dev)),
            v: Tensor::zeros([len], (kind, dev)),
            t: 0,
            kernel,
            step_t: Tensor::zeros([1], (Kind::Float, dev)),
            measure_norm: false,
            last_grad_norm: f64::NAN,
        })
    }

    /// Sharded state for `params` cut into `units` (consecutive index ranges covering every
    /// parameter in order), sharded over `group`: this rank copies its slice of each unit,
    /// then every parameter's storage (and gradient's, if any) is released, leaving empty
    /// tensors of the same dtype and device in the model. `keep_full_grads`: ZeRO-1's
    /// persistent full gradient vectors.
    pub fn new_sharded(
        params: &[Tensor],
        units: &[Range<usize>],
        cfg: AdamWConfig,
        group: &dyn Communicator,
        keep_full_grads: bool,
    ) -> Result<AdamW> {
        let shapes: Vec<Vec<i64>> = params.iter().map(|p| p.size()).collect();
        let read = |i: usize, lo: i64, len: i64| -> Result<Tensor> {
            Ok(params[i].detach().reshape([-1]).narrow(0, lo, len))
        };
        let init = ShardInit {
            shapes: &shapes,
            read: &read,
        };
        Self::new_sharded_from(params, &init, units, cfg, group, keep_full_grads)
    }

    /// [`AdamW::new_sharded`] with the parameters' values coming from `init` (their shapes,
    /// and a reader of element ranges), so that a rank reads nothing but its own slices
    /// (e.g. from a checkpoint); `params` are only their handles (dtype, device, storage to
    /// release) and may be empty already.
    pub fn new_sharded_from(
        params: &[Tensor],
        init: &ShardInit<'_>,
        units: &[Range<usize>],
        cfg: AdamWConfig,
        group: &dyn Communicator,
        keep_full_grads: bool,
    ) -> Result<AdamW> {
        let (kind, dev) = common_kind_device(params)?;
        if init.shapes.len() != params.len() {
            return Err(RuntimeError::Config(format!(
                "{} shapes for {} parameters",
                init.shapes.len(),
                params.len()
            )));
        }
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
            let shapes: Vec<Vec<i64>> = init.shapes[u.clone()].to_vec();
            let mut offsets = Vec::with_capacity(shapes.len());
            let mut numel = 0;
            for s in &shapes {
                offsets.push(numel);
                numel += s.iter().product::<i64>();
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
            for (i, s) in u.shapes.iter().enumerate() {
                let (o, k) = (u.offsets[i], s.iter().product::<i64>());
                let (lo, hi) = (o.max(a), (o + k).min(a + len));
                if lo < hi {
                    let src = (init.read)(u.params.start + i, lo - o, hi - lo)?;
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
        let full_grads = keep_full_grads.then(|| {
            layout
                .iter()
                .map(|u| Tensor::zeros([u.padded], (kind, dev)))
                .collect()
        });
        Ok(AdamW {
            cfg,
            full_grads,
            numel: layout.iter().map(|u| u.numel).sum(),
            padded: local * n,
            shards,
            shard_rank,
            gflat: match keep_full_grads {
                true => pflat.new_zeros([0], (kind, dev)),
                false => pflat.zeros_like(),
            },
            m: pflat.zeros_like(),
            v: pflat.zeros_like(),
            pflat,
            units: Some(layout),
            t: 0,
            kernel,
            step_t: Tensor::zeros([1], (Kind::Float, dev)),
            measure_norm: false,
            last_grad_norm: f64::NAN,
        })
    }

    /// (parameters, gradient, m, v) that the update runs over: the flat buffers, or under
    /// ZeRO-1 each unit's slices, its gradient a view of the unit's full vector.
    fn update_slices(&self) -> Vec<(Tensor, Tensor, Tensor, Tensor)> {
        let (Some(full), Some(units)) = (&self.full_grads, &self.units) else {
            return vec![(
                self.pflat.shallow_clone(),
                self.gflat.shallow_clone(),
                self.m.shallow_clone(),
                self.v.shallow_clone(),
            )];
        };
        units
            .iter()
            .zip(full)
            .map(|(unit, f)| {
                let len = unit.padded / self.shards as i64;
                let at = |t: &Tensor| t.narrow(0, unit.local_off, len);
                let g = f.narrow(0, self.shard_rank as i64 * len, len);
                (at(&self.pflat), g, at(&self.m), at(&self.v))
            })
            .collect()
    }

    /// The global L2 norm of the reduced gradient: this rank's slices (the whole gradient
    /// under ZeRO-0, where every rank holds all of it) summed over the grad group.
    fn grad_norm(
        &self,
        slices: &[(Tensor, Tensor, Tensor, Tensor)],
        group: &dyn Communicator,
    ) -> Result<f64> {
        let dev = self.pflat.device();
        let mut sq = Tensor::zeros([1], (Kind::Double, dev));
        for (_, g, _, _) in slices {
            sq += g.to_kind(Kind::Double).square().sum(Kind::Double);
        }
        if self.units.is_some() && group.size() > 1 {
            let k = self.pflat.kind();
            let t = sq.to_kind(k);
            group.all_reduce(&t)?;
            sq = t.to_kind(Kind::Double);
        }
        Ok(sq.double_value(&[0]).sqrt())
    }

    /// Sets the learning rate of the next steps (a schedule's value).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Measures the global gradient norm at every step even without clipping.
    pub fn set_measure_norm(&mut self, on: bool) {
        self.measure_norm = on;
    }

    /// The global gradient norm of the last step, before clipping (NaN if not measured).
    pub fn last_grad_norm(&self) -> f64 {
        self.last_grad_norm
    }

    /// The sharded units (None for ZeRO-0).
    pub fn units(&self) -> Option<&[Unit]> {
        self.units.as_deref()
    }

    fn unit(&self, u: usize) -> Result<&Unit> {
        self.units
            .as_ref()
            .and_then(|us| us.get(u))
            .ok_or_else(|| RuntimeError::Config(format!("no sharded unit {u}")))
    }

    /// Unit `u`'s full (padded) flat parameter vector in `kind`, all-gathered over `group`
    /// (every rank of it must call) and waited for.
    pub fn gather_unit(&self, u: usize, kind: Kind, group: &dyn Communicator) -> Result<Tensor> {
        self.gather_unit_start(u, kind, group, None)?.wait()
    }

    /// Issues the all-gather of unit `u`'s parameters in `kind` into `into` (a tensor of the
    /// unit's padded length whose storage is allocated, e.g. re-allocated by
    /// `ffi::storage_resize`) or into a new tensor. The local slice is cast first, so the
    /// gather moves `kind`'s bytes (2 per parameter for bf16).
    pub fn gather_unit_start(
        &self,
        u: usize,
        kind: Kind,
        group: &dyn Communicator,
        into: Option<Tensor>,
    ) -> Result<PendingGather> {
        let unit = self.unit(u)?;
        let _ng = tch::no_grad_guard();
        let len = unit.padded / self.shards as i64;
        let mine = self.pflat.narrow(0, unit.local_off, len);
        let send = if kind == mine.kind() {
            mine.copy()
        } else {
            mine.to_kind(kind)
        };
        let (recv, version): (Tensor, Option<i64>) = match into {
            Some(t) if t.size() == [unit.padded] && t.kind() == kind => (t, None),
            Some(t) => {
                return Err(RuntimeError::Shape(format!(
                    "unit {u} gathers into {:?} {:?}, want [{}] {kind:?}",
                    t.size(),
                    t.kind(),
                    unit.padded
                )))
            }
            None if self.shards == 1 => {
                return Ok(PendingGather {
                    flat: send,
                    work: Work::done(),
                    _send: None,
                    version: None,
                })
            }
            None => (
                Tensor::empty([unit.padded], (kind, self.pflat.device())),
                None,
            ),
        };
        if self.shards == 1 {
            recv.shallow_clone().f_copy_(&send)?;
            return Ok(PendingGather {
                flat: recv,
                work: Work::done(),
                _send: None,
                version,
            });
        }
        let work = group.all_gather_async(&send, &recv)?;
        Ok(PendingGather {
            flat: recv,
            work,
            _send: Some(send),
            version,
        })
    }

    /// The parameters of unit `u` as views (their shapes) of its gathered `flat`.
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

    /// Unit `u`'s full gradient vector (padded, master dtype) to fill (e.g. through
    /// [`AdamW::unit_views`]) and pass to [`AdamW::reduce_unit_grad_start`]: ZeRO-1's
    /// persistent one (zeroed after each update), else a new zero vector.
    pub fn new_unit_grad(&self, u: usize) -> Result<Tensor> {
        let unit = self.unit(u)?;
        if let Some(full) = &self.full_grads {
            return Ok(full[u].shallow_clone());
        }
        Ok(self
            .pflat
            .new_zeros([unit.padded], (self.pflat.kind(), self.pflat.device())))
    }

    /// Issues the sum of this rank's full gradient of unit `u` (`grad`, padded, master dtype)
    /// over `group` (a reduce-scatter); [`PendingReduce::finish`] adds this rank's slice of
    /// the sum to its gradient buffer.
    pub fn reduce_unit_grad_start(
        &self,
        u: usize,
        grad: Tensor,
        group: &dyn Communicator,
    ) -> Result<PendingReduce> {
        let unit = self.unit(u)?;
        let _ng = tch::no_grad_guard();
        let len = unit.padded / self.shards as i64;
        if grad.size() != [unit.padded] || grad.kind() != self.pflat.kind() {
            return Err(RuntimeError::Shape(format!(
                "unit {u} gradient is {:?} {:?}, want [{}] {:?}",
                grad.size(),
                grad.kind(),
                unit.padded,
                self.pflat.kind()
            )));
        }
        let (dst, in_place) = match &self.full_grads {
            Some(full) if grad.data_ptr() != full[u].data_ptr() => {
                return Err(RuntimeError::Shape(format!(
                    "unit {u}: ZeRO-1 reduces the unit's own gradient buffer (new_unit_grad)"
                )))
            }
            Some(full) => (full[u].narrow(0, self.shard_rank as i64 * len, len), true),
            None => (self.gflat.narrow(0, unit.local_off, len), false),
        };
        let (recv, work) = match (self.shards == 1, in_place) {
            // In place (NCCL's in-place reduce-scatter: the output is the rank's slice of
            // the input); one rank's sum is its own gradient.
            (true, true) => (None, Work::done()),
            (false, true) => (None, group.reduce_scatter_async(&grad, &dst)?),
            (true, false) => (Some(grad.shallow_clone()), Work::done()),
            (false, false) => {
                let recv = dst.empty_like();
                let work = group.reduce_scatter_async(&grad, &recv)?;
                (Some(recv), work)
            }
        };
        Ok(PendingReduce {
            dst,
            recv,
            work,
            _send: grad,
        })
    }

    /// [`AdamW::reduce_unit_grad_start`] and its finish.
    pub fn reduce_unit_grad(&self, u: usize, grad: Tensor, group: &dyn Communicator) -> Result<()> {
        self.reduce_unit_grad_start(u, grad, group)?.finish()
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
    /// parameters and clears their gradients. Sharded: the gradients were already summed
    /// unit by unit ([`AdamW::reduce_unit_grad_start`]), so no collective runs here.
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
        sync();
        let t0 = std::time::Instant::now();
        if self.units.is_none() && grad_group.size() > 1 {
            grad_group.all_reduce(&self.gflat)?;
        }
        sync();
        let reduce_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let slices = self.update_slices();
        let mut scale = scale;
        if c.max_grad_norm > 0.0 || self.measure_norm {
            let norm = self.grad_norm(&slices, grad_group)? * scale.abs();
            self.last_grad_norm = norm;
            if c.max_grad_norm > 0.0 && norm > c.max_grad_norm {
                // torch.nn.utils.clip_grad_norm_'s coefficient.
                scale *= c.max_grad_norm / (norm + 1e-6);
            }
        }
        for (p, g, m, v) in slices {
            if scale != 1.0 {
                let _ = g.shallow_clone().f_mul_scalar_(scale)?;
            }
            match self.kernel {
                AdamWKernel::Fused => update_fused(&c, self.t, &self.step_t, &p, &g, &m, &v)?,
                _ => update_plain(&c, self.t, &p, &g, &m, &v)?,
            }
        }
        // Zeroing the gradients (4 B written per parameter) is counted with the update.
        let _ = self.gflat.f_zero_()?;
        for f in self.full_grads.iter().flatten() {
            let _ = f.shallow_clone().f_zero_()?;
        }
        sync();
        Ok((reduce_s, t1.elapsed().as_secs_f64()))
    }
}

/// An all-gather of a unit's parameters in flight ([`AdamW::gather_unit_start`]); the
/// buffers live until [`PendingGather::wait`].
#[must_use = "wait() before reading the gathered weights"]
pub struct PendingGather {
    flat: Tensor,
    work: Work,
    _send: Option<Tensor>,
    /// A refill's version counter before the gather wrote it: restored by `wait`.
    version: Option<i64>,
}

impl PendingGather {
    /// Makes `wait` set the flat vector's autograd version counter back to `v`: for a refill
    /// of released weights with the values they had when the forward read them.
    pub fn restoring_version(mut self, v: i64) -> Self {
        self.version = Some(v);
        self
    }

    /// Orders the compute stream after the gather; returns the unit's flat vector. A refill
    /// gets its autograd version counter back: it holds the values the forward read.
    pub fn wait(self) -> Result<Tensor> {
        self.work.wait()?;
        if let Some(v) = self.version {
            set_tensor_version(&self.flat, v)?;
        }
        Ok(self.flat)
    }
}

/// A reduce-scatter of a unit's gradient in flight ([`AdamW::reduce_unit_grad_start`]).
#[must_use = "finish() adds the reduced slice to the gradient buffer"]
pub struct PendingReduce {
    dst: Tensor,
    /// The reduced slice to add to `dst`; None when the reduce-scatter wrote `dst` in place.
    recv: Option<Tensor>,
    work: Work,
    /// The full vector, alive until the collective is done.
    _send: Tensor,
}

impl PendingReduce {
    /// Waits (device-side) and adds this rank's slice of the sum to its gradient buffer
    /// (ZeRO-1: the collective wrote it in place).
    pub fn finish(self) -> Result<()> {
        let _ng = tch::no_grad_guard();
        self.work.wait()?;
        if let Some(recv) = &self.recv {
            let _ = self.dst.shallow_clone().f_add_(recv)?;
        }
        Ok(())
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
    let p0 = crate::rng::unseeded(|| Tensor::randn([n], (kind, dev)));
    let (p1, p2) = (p0.copy(), p0.copy());
    let (m1, v1) = (
        Tensor::zeros([n], (kind, dev)),
        Tensor::zeros([n], (kind, dev)),
    );
    let (m2, v2) = (m1.copy(), v1.copy());
    let step_t = Tensor::zeros([1], (Kind::Float, dev));
    for t in 1..=steps {
        let g = crate::rng::unseeded(|| Tensor::randn([n], (kind, dev))) * (0.1 * t as f64);
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
    /// The state a checkpoint holds: every parameter as one flat buffer (sharded: this
    /// rank's slices only), this rank's moments and the step count.
    pub(crate) fn checkpoint_state(&self) -> (&Tensor, &Tensor, &Tensor, i32) {
        (&self.pflat, &self.m, &self.v, self.t)
    }

    /// (shard count, this rank's shard, parameters without padding, padded length).
    pub(crate) fn checkpoint_layout(&self) -> (usize, usize, i64, i64) {
        (self.shards, self.shard_rank, self.numel, self.padded)
    }

    /// Whether the parameter buffer holds this rank's slices only (ZeRO-1/2/3).
    pub(crate) fn params_sharded(&self) -> bool {
        self.units.is_some()
    }

    /// Sets the step count after the buffers of [`AdamW::checkpoint_state`] were filled in
    /// place from a checkpoint.
    pub(crate) fn set_checkpoint_step(&mut self, t: i32) {
        self.t = t;
    }
}
