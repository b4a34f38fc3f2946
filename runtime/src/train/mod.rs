//! One training step of the decoder over a sequence-parallel group: every SP rank holds its
//! zigzag token ranges, of one sequence or, for a packed sequence of several samples
//! ([`Trainer::new_packed`]), of each sample on its own ([`crate::packed::Packing`]: the
//! plan's per-sample ranges, RoPE positions restarting at 0 in each sample); attention runs
//! per sample (document mask) through [`crate::attn2d::Attention2d`] ([`PackedAttention`])
//! with its hand-written backward, everything else through libtorch autograd, one layer
//! segment at a time (each layer's input and attention output are autograd leaves, and the
//! segment's output gradients are fed back by a seeded backward, `ffi::backward_seeded`).
//! The loss is normalised over the active tokens of the whole SP group (in a packed sequence
//! the last token of each sample has no label, whatever the caller passed, so no loss
//! crosses samples); gradients of the (replicated) parameters are summed
//! over the grad group (SP x DP) and averaged over DP; AdamW in the master dtype, its state
//! either replicated (ZeRO-0: gradients all-reduced after the backward) or sharded over the
//! grad group in units ([`shards`]: ZeRO-1/2 keep the compute-dtype weights resident and
//! reduce-scatter each unit's gradient as soon as its backward is done, overlapped with the
//! next layer's; ZeRO-3 gathers each layer's weights before its forward and again before its
//! backward, prefetched one layer ahead, and frees them in between). Recompute (of each layer
//! outside attention) is a choice under every stage.
//!
//! With [`TrainConfig::profile`] the device is synchronised between phases and
//! [`StepStats::phases`] holds their times ([`Phases`]).
//!
//! Cost of one step, 2-layer llama3-8b shape (h 4096, 32 heads of 128, 8 kv heads, ffn 14336,
//! vocab V 128256; 1.49e9 parameters, 0.44e9 of them in the layers), S = 32768 tokens, one
//! H100 (bf16 GEMM 797 TFLOP/s, cuDNN attention 520 TFLOP/s fwd+bwd, HBM 3.0 TB/s, the
//! planner's calibration):
//! - GEMMs: 6 x S x (0.44e9 + 0.525e9 head) = 1.90e14 FLOP = 238 ms (forward 1/3 of it).
//! - attention: 3.5 x 2 x S^2 x 4096 x 2 layers = 6.2e13 FLOP = 118 ms (124 ms measured).
//! - weight cast, fp32 -> bf16 once per step: 6 B x 0.96e9 (layers + head) = 5.8 GB = 2 ms;
//!   its backward (bf16 grad -> fp32, accumulated) 14 B x 0.44e9 = 6 GB = 2 ms. A bf16 copy
//!   kept by the optimizer would save ~4 B x 0.96e9 = 1.3 ms, so weights are cast once per
//!   step instead (the casts are what linear's backward keeps anyway without recompute).
//! - loss (chunked cross-entropy over S x V = 4.2e9 logits): before, bf16 logits -> fp32
//!   copy, logsumexp, sub, exp, scatter, mul, -> bf16 moved ~42 B per logit = 176 GB = 59 ms;
//!   now `_log_softmax` with fp32 output read from the bf16 logits (6 B), `exp` written
//!   straight to bf16 (6 B) plus the GEMM's bf16 write (2 B): 14 B = 59 GB = 20 ms. The
//!   per-row 1/total and label mask are applied to the (S, h) operands of the two gradient
//!   GEMMs instead of to the (S, V) matrix.
//! - head weight gradient: before, each 4096-row chunk's (V, h) product was written in bf16
//!   and added to the fp32 gradient (2 + 10 B x 0.525e9 x 8 chunks = 50 GB = 17 ms, and a
//!   bf16 rounding per chunk); now `addmm` with fp32 output accumulates into the fp32
//!   gradient in the GEMM epilogue (8 B x 0.525e9 x 8 = 34 GB = 11 ms, fp32 sums).
//! - seeded backward instead of `(t * g).sum().backward()`: saves the product, its sum and
//!   the product's backward, ~3 x 2 B per element of y (S x h) and q, k, v, ~2 GB a step.
//! - embedding backward: `index_put_` with accumulation of the (S, h) gradient into the fp32
//!   table's gradient instead of a dense (V, h) fp32 temporary added to it: saves 16 B x
//!   0.525e9 = 8.4 GB = 2.8 ms.
//! - optimizer: fused AdamW 28 B per parameter, 14 ms (plain: ~40 ms measured), plus 4 B of
//!   gradient zeroing (2 ms).
//! - RMSNorm: ATen's fused kernel on CUDA (see `model::decoder`), ~4 ms saved per norm.
pub mod adamw;
pub mod checkpoint;
pub mod data;
pub mod kernel_profile;
pub mod report;
pub mod run;
pub mod session;
pub mod shards;
pub mod video;

use crate::attn2d::AttnShape;
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::ffi::{backward_seeded, storage_nbytes, storage_resize};
use crate::kernel::Backend;
use crate::model::decoder::{PostWeights, PreWeights};
use crate::model::{Decoder, Input, Rope};
use crate::packed::{PackedAttention, PackedCtx};
use adamw::{AdamW, AdamWConfig, PendingGather, PendingReduce, ShardInit};
use serde_json::{json, Value};
use shards::{Fetch, Gathered, Resident};
use std::cell::Cell;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The communicators one rank trains with.
pub struct Groups<'a> {
    pub ulysses: &'a dyn Communicator,
    pub ring: &'a dyn Communicator,
    /// Every rank holding a replica of the parameters: SP x DP (the whole world when tp = 1).
    pub grad: &'a dyn Communicator,
    /// Data-parallel degree (the gradient sum over `grad` is divided by it).
    pub dp: usize,
}

/// Training options.
#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    pub optimizer: AdamWConfig,
    /// 0, 1, 2 or 3 (module [`shards`] for what each keeps).
    pub zero_stage: u32,
    /// Keep only each layer's input and attention output; recompute the rest in backward.
    pub recompute: bool,
    pub backend: Backend,
    /// Synchronise the device around phases to time them (costs a little overlap).
    pub profile: bool,
    /// Print the caching allocator's bytes at every phase boundary (CUDA): the step's memory
    /// timeline.
    pub mem_trace: bool,
}

/// What one step measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Mean loss over the active tokens of the SP group.
    pub loss: f64,
    /// Active (labelled) tokens of the SP group.
    pub tokens: f64,
    pub step_s: f64,
    /// 2D attention forward + backward (kernels and their all-to-all / ring traffic).
    pub attention_s: f64,
    /// Token-count and gradient collectives plus the optimizer update.
    pub grad_sync_s: f64,
    /// Bytes of sharded layer weights the saved graph still held when the forward ended
    /// (storage of the gathered units): 0 under ZeRO-3 without recompute, whose layers free
    /// their gathered weights after their forward; the resident bf16 weights under ZeRO-1/2
    /// without recompute; 0 under ZeRO-0 (its per-layer casts are autograd's, not counted).
    pub held_weight_bytes: f64,
    /// Per-phase times (device times with [`TrainConfig::profile`]; host-side enqueue times
    /// without it).
    pub phases: Phases,
}

/// Where one step's time goes. The phases partition the step: their sum is `step_s` up to
/// the host work between them. The report's `phases_rank0` is this, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Phases {
    /// Master -> compute dtype weight casts (every layer weight once per step without
    /// recompute; with recompute the layers' casts fall in `fwd_s` / `bwd_s`; always the
    /// head weight). Sharded: waiting for the units' gathers (ZeRO-3; prefetched, so only what
    /// compute did not hide) and building their leaves.
    pub cast_s: f64,
    /// Embedding gather, and its backward (accumulation into the table's gradient).
    pub embed_s: f64,
    /// Layer forward outside attention (norms, projections, RoPE, MLP, residuals).
    pub fwd_s: f64,
    /// 2D attention forward (including q/k/v contiguous copies and its communication).
    pub attn_fwd_s: f64,
    /// Final norm, logits and cross-entropy with its gradient (chunked), token-count and
    /// loss all-reduces.
    pub loss_s: f64,
    /// Layer backward outside attention (including the final norm's and the casts').
    pub bwd_s: f64,
    /// 2D attention backward.
    pub attn_bwd_s: f64,
    /// Gradient reduction over the grad group (all-reduce or reduce-scatter) and, with
    /// ZeRO-1/2, the resident weights' all-gather after the update. Sharded: the per-unit reduce-scatters (with the
    /// copies of the unit's gradients into one master-dtype vector).
    pub grad_reduce_s: f64,
    /// AdamW update of this rank's parameters and the gradient zeroing.
    pub optimizer_s: f64,
}

impl Phases {
    /// The phases as a JSON object (seconds).
    pub fn to_json(&self) -> Value {
        // Nine f64 fields: serialization cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Their sum.
    pub fn total_s(&self) -> f64 {
        self.cast_s
            + self.embed_s
            + self.fwd_s
            + self.attn_fwd_s
            + self.loss_s
            + self.bwd_s
            + self.attn_bwd_s
            + self.grad_reduce_s
            + self.optimizer_s
    }

    /// Element-wise mean of several steps' phases.
    pub fn mean(all: &[Phases]) -> Phases {
        let n = all.len().max(1) as f64;
        let f = |g: &dyn Fn(&Phases) -> f64| all.iter().map(g).sum::<f64>() / n;
        Phases {
            cast_s: f(&|p| p.cast_s),
            embed_s: f(&|p| p.embed_s),
            fwd_s: f(&|p| p.fwd_s),
            attn_fwd_s: f(&|p| p.attn_fwd_s),
            loss_s: f(&|p| p.loss_s),
            bwd_s: f(&|p| p.bwd_s),
            attn_bwd_s: f(&|p| p.attn_bwd_s),
            grad_reduce_s: f(&|p| p.grad_reduce_s),
            optimizer_s: f(&|p| p.optimizer_s),
        }
    }
}

struct LayerState {
    x_in: Tensor,
    /// Non-detached q, k, v (autograd graph to x_in); None when recomputing.
    qkv: Option<(Tensor, Tensor, Tensor)>,
    ctx: PackedCtx,
    /// Attention output (detached) as a leaf.
    a: Tensor,
    /// Layer output (autograd graph to x_in and a); None when recomputing.
    y: Option<Tensor>,
    /// Sharded without recompute: the unit's leaves the graph uses (ZeRO-3: their storage
    /// released until the backward refills it).
    unit: Option<Gathered>,
}

/// Without recompute the layer keeps q, k, v (after RoPE, in the sequence layout) as the roots
/// its backward is seeded from, while the attention works on dense copies of them. Nothing in
/// the graph saves those roots (RoPE's sum and the projections' views are outputs no backward
/// reads), so where the attention took a copy their storage is released: the backward needs
/// only their autograd nodes and shapes. A root the attention uses as it is (already dense)
/// keeps its storage.
fn release_copied_roots(roots: [&Tensor; 3], dense: &[Tensor; 3]) -> Result<()> {
    for (r, d) in roots.into_iter().zip(dense) {
        if r.data_ptr() != d.data_ptr() {
            storage_resize(r, 0)?;
        }
    }
    Ok(())
}

/// One rank's trainer.
pub struct Trainer<'a> {
    pub model: Decoder,
    attn: PackedAttention<'a>,
    groups: Groups<'a>,
    cfg: TrainConfig,
    opt: AdamW,
    /// ZeRO-1/2: the resident compute-dtype weights of every unit.
    resident: Option<Resident>,
    rope: Rope,
    ids_len: usize,
    /// Packed sequences: the local rows holding a sample's last token (their labels are
    /// masked); None for one sample.
    last_rows: Option<Tensor>,
    /// `_log_softmax(bf16, half_to_float)` works here and agrees with the fp32 path.
    fast_log_softmax: Cell<bool>,
    /// `addmm` with fp32 output from bf16 operands works here and agrees with mm + add.
    fp32_out_gemm: Cell<bool>,
}

fn sync(dev: Device, on: bool) {
    if let (true, Device::Cuda(i)) = (on, dev) {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Lap timer over the phases of a step; synchronises the device first when profiling.
/// With [`TrainConfig::mem_trace`] on CUDA it also prints, at every lap, the caching allocator's
/// bytes in tensors now and at their peak so far (a memory timeline of the step, for
/// comparing with the planner's activation model; the call site is the lap's source line).
struct Clock {
    dev: Device,
    on: bool,
    last: Instant,
    mem_trace: bool,
}

impl Clock {
    fn new(dev: Device, on: bool, mem_trace: bool) -> Clock {
        sync(dev, on);
        Clock {
            dev,
            on,
            last: Instant::now(),
            mem_trace: dev.is_cuda() && mem_trace,
        }
    }

    /// Seconds since the previous lap.
    #[track_caller]
    fn lap(&mut self) -> f64 {
        sync(self.dev, self.on);
        let now = Instant::now();
        let d = (now - self.last).as_secs_f64();
        self.last = now;
        if let (true, Device::Cuda(i)) = (self.mem_trace, self.dev) {
            if let Ok(a) = crate::ffi::alloc_stats(i) {
                eprintln!(
                    "mem_trace line {}: allocated {} peak {}",
                    std::panic::Location::caller().line(),
                    a.allocated,
                    a.allocated_peak
                );
            }
        }
        d
    }
}

/// Storage bytes of the gathered units the layers' saved graphs hold.
fn held_bytes(layers: &[LayerState]) -> Result<f64> {
    let mut n = 0i64;
    for g in layers.iter().filter_map(|l| l.unit.as_ref()) {
        n += storage_nbytes(g.flat())?;
    }
    Ok(n as f64)
}

/// Backward from `t` seeded with `g` for every pair whose `g` is defined and whose `t`
/// requires grad (`g` cast to `t`'s dtype), in one traversal.
fn seed(pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
    let owned: Vec<(&Tensor, Tensor)> = pairs
        .iter()
        .filter(|(t, g)| g.defined() && t.requires_grad())
        .map(|(t, g)| {
            let g = g.detach();
            let g = if g.kind() == t.kind() {
                g
            } else {
                g.to_kind(t.kind())
            };
            (*t, g)
        })
        .collect();
    let refs: Vec<(&Tensor, &Tensor)> = owned.iter().map(|(t, g)| (*t, g)).collect();
    backward_seeded(&refs)
}

/// What a packing of the trainer's sequence fixes on this rank: the per-sample attention, the
/// rank's RoPE tables and row count, and the rows whose labels are masked (each sample's
/// last, when there are several).
struct Packed<'a> {
    attn: PackedAttention<'a>,
    rope: Rope,
    ids_len: usize,
    last_rows: Option<Tensor>,
}

impl<'a> Packed<'a> {
    fn new(
        m: &crate::model::ModelConfig,
        compute: Kind,
        device: Device,
        groups: &Groups<'a>,
        backend: Backend,
        sample_lens: &[usize],
    ) -> Result<Packed<'a>> {
        let shape = AttnShape {
            batch: 1,
            seq_len: sample_lens.iter().fold(0usize, |a, &l| a.saturating_add(l)),
            q_heads: m.num_heads,
            kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
        };
        let attn = PackedAttention::new(groups.ulysses, groups.ring, backend, shape, sample_lens)?;
        let (r, u) = (groups.ring.rank(), groups.ulysses.rank());
        let packing = attn.packing();
        let positions = Tensor::from_slice(&packing.positions(r, u)).to(device);
        let ids_len = positions.size()[0] as usize;
        let rope = Rope::new(m, &positions, compute);
        let last_rows = (packing.num_samples() > 1).then(|| {
            let rows: Vec<i64> = packing.last_rows(r, u).iter().map(|&x| x as i64).collect();
            Tensor::from_slice(&rows).to(device)
        });
        Ok(Packed {
            attn,
            rope,
            ids_len,
            last_rows,
        })
    }
}

impl<'a> Trainer<'a> {
    /// Builds the trainer for a sequence of `seq_len` tokens (batch 1 per rank group).
    pub fn new(
        model: Decoder,
        groups: Groups<'a>,
        seq_len: usize,
        cfg: TrainConfig,
    ) -> Result<Trainer<'a>> {
        Self::new_packed(model, groups, &[seq_len], cfg)
    }

    /// Builds the trainer for a packed sequence of samples of `sample_lens` tokens (in
    /// order): each sample zigzag-sharded on its own, attention within samples only, RoPE
    /// positions restarting in each sample (module [`crate::packed`]). With two or more
    /// samples every length must be a multiple of 2 x ring x ulysses (else
    /// [`RuntimeError::Shape`]); one sample is [`Trainer::new`].
    pub fn new_packed(
        mut model: Decoder,
        groups: Groups<'a>,
        sample_lens: &[usize],
        cfg: TrainConfig,
    ) -> Result<Trainer<'a>> {
        if cfg.zero_stage > 3 {
            return Err(RuntimeError::Plan(format!(
                "ZeRO stage {} is not implemented by the runtime (0, 1, 2 and 3 are)",
                cfg.zero_stage
            )));
        }
        if groups.dp == 0 || !groups.grad.size().is_multiple_of(groups.dp) {
            return Err(RuntimeError::Layout(format!(
                "dp {} does not divide the grad group of {}",
                groups.dp,
                groups.grad.size()
            )));
        }
        let device = model.named_parameters()[0].1.device();
        let p = Packed::new(
            &model.cfg,
            model.compute,
            device,
            &groups,
            cfg.backend,
            sample_lens,
        )?;
        let opt = Self::optimizer_for(&mut model, &cfg, groups.grad)?;
        let resident = matches!(cfg.zero_stage, 1 | 2).then(|| Resident(Vec::new()));
        let master = model.head_weight().kind();
        let (fast_lsm, fp32_gemm) = probe_loss_kernels(device, model.compute, master);
        let mut t = Trainer {
            model,
            attn: p.attn,
            groups,
            cfg,
            opt,
            resident,
            rope: p.rope,
            ids_len: p.ids_len,
            last_rows: p.last_rows,
            fast_log_softmax: Cell::new(fast_lsm),
            fp32_out_gemm: Cell::new(fp32_gemm),
        };
        t.refresh_resident()?;
        if device.is_cuda() && t.groups.grad.rank() == 0 {
            eprintln!("{}", json!({ "train_kernels": t.kernels() }));
        }
        Ok(t)
    }

    /// The optimizer over `model`'s parameters: whole (ZeRO-0; a deferred checkpoint is read
    /// whole first) or sharded over `grad` (each rank reads only its slices, from the
    /// deferred checkpoint when there is one).
    fn optimizer_for(
        model: &mut Decoder,
        cfg: &TrainConfig,
        grad: &dyn Communicator,
    ) -> Result<AdamW> {
        if cfg.zero_stage == 0 {
            model.materialise()?;
            return AdamW::new(&model.parameters(), cfg.optimizer);
        }
        let units = shards::units(model)?;
        let params = model.parameters();
        let keep_full = cfg.zero_stage == 1;
        let Some(ck) = model.take_deferred() else {
            return AdamW::new_sharded(&params, &units, cfg.optimizer, grad, keep_full);
        };
        let named = model.named_parameters();
        let shapes: Vec<Vec<i64>> = Decoder::param_shapes(&model.cfg)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        let read = |i: usize, lo: i64, len: i64| ck.read_range(&named[i].0, lo, len);
        let init = ShardInit {
            shapes: &shapes,
            read: &read,
        };
        AdamW::new_sharded_from(&params, &init, &units, cfg.optimizer, grad, keep_full)
    }

    /// Re-packs the trainer's sequence as `sample_lens` (same total; every length a multiple
    /// of 2 x SP when there are several): the per-sample sharding, attention, RoPE positions
    /// and masked last rows of [`Trainer::new_packed`], for data whose document boundaries
    /// change from step to step. Every rank of the SP group must repack alike before a step.
    pub fn repack(&mut self, sample_lens: &[usize]) -> Result<()> {
        let total = sample_lens.iter().fold(0usize, |a, &l| a.saturating_add(l));
        if total != self.attn.packing().seq_len() {
            return Err(RuntimeError::Shape(format!(
                "repack to {total} tokens, the trainer holds {}",
                self.attn.packing().seq_len()
            )));
        }
        let m = &self.model;
        let p = Packed::new(
            &m.cfg,
            m.compute,
            m.device(),
            &self.groups,
            self.cfg.backend,
            sample_lens,
        )?;
        (self.attn, self.rope, self.ids_len, self.last_rows) =
            (p.attn, p.rope, p.ids_len, p.last_rows);
        Ok(())
    }

    /// Which kernels this trainer uses (for logs and A/B runs).
    pub fn kernels(&self) -> Value {
        json!({
            "adamw": format!("{:?}", self.opt.kernel()).to_lowercase(),
            "loss_log_softmax_half_to_float": self.fast_log_softmax.get(),
            "head_grad_fp32_out_gemm": self.fp32_out_gemm.get(),
            "fused_rms_norm": self.model.fused_norm(),
        })
    }

    /// The optimizer (its flat buffers and moments, for checkpoints). Sharded, the model's
    /// parameter tensors are empty: [`Trainer::full_parameters`] gathers them.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The communicator gradients are reduced over (SP x DP).
    pub fn grad_group(&self) -> &'a dyn Communicator {
        self.groups.grad
    }

    /// The optimizer, to set its learning rate or norm measurement between steps.
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// This rank's token ranges [start, end) in the (packed) sequence, in local order: two
    /// per sample.
    pub fn local_ranges(&self) -> Vec<(usize, usize)> {
        self.attn
            .packing()
            .local_ranges(self.groups.ring.rank(), self.groups.ulysses.rank())
    }

    /// The samples' lengths (one entry for an unpacked sequence).
    pub fn sample_lens(&self) -> Vec<usize> {
        self.attn.packing().sample_lens()
    }

    /// The decoder's embeddings of token `ids` (B, S) int64, in the compute dtype, without
    /// graph: from the model's table, or when sharded from the table's unit (ZeRO-3: gathered
    /// for the lookup, a collective over the grad group: every rank calls it). For the text rows of a VLM
    /// step ([`Trainer::step_embeddings_text`] sends their gradient back to the table).
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        if self.opt.units().is_none() {
            return tch::no_grad(|| self.model.embed(Input::Ids(ids)));
        }
        Ok(self.embed_gathered(&ids.to_device(self.device()))?.0)
    }

    /// Sharded: the embedding table's unit and the lookup of `ids` (B, S) int64 in it, without
    /// graph; the gathered table is returned for a tied head.
    fn embed_gathered(&self, ids: &Tensor) -> Result<(Tensor, shards::Gathered)> {
        if ids.dim() != 2 || ids.kind() != Kind::Int64 {
            return Err(RuntimeError::Shape(format!(
                "token ids must be (B, S) int64, got {:?} {:?}",
                ids.size(),
                ids.kind()
            )));
        }
        let g = self.gather(shards::EMBED_UNIT, false)?;
        let x0 = tch::no_grad(|| {
            g.get("embed_tokens.weight")
                .map(|w| Tensor::embedding(w, ids, -1, false, false))
        })?;
        Ok((x0, g))
    }

    /// One step on this rank's shard: `ids` (1, s_local) int64 and `labels` (1, s_local)
    /// int64 (the next token of each position of the full sequence; -100 = no loss), rows in
    /// [`Trainer::local_ranges`] order.
    pub fn step(&mut self, ids: &Tensor, labels: &Tensor) -> Result<StepStats> {
        let want = [1, self.ids_len as i64];
        if ids.size() != want {
            return Err(RuntimeError::Shape(format!(
                "ids {:?} must be {want:?} on this rank",
                ids.size()
            )));
        }
        let dev = self.device();
        let ids = ids.to_device(dev);
        Ok(self.step_input(Input::Ids(&ids), labels, None)?.0)
    }

    fn device(&self) -> Device {
        self.model.named_parameters()[0].1.device()
    }

    /// One step from `input` (token ids, or embeddings (1, s_local, hidden) such as vision
    /// tokens merged with text) and `labels` (1, s_local). Returns the step's stats and, for
    /// embeddings, their gradient (1, s_local, hidden) in the compute dtype, undefined-free.
    /// `text` = (local rows, token ids) of embedding rows taken from the decoder's table:
    /// their gradient is added to the table's before the optimizer runs.
    /// With sharded states every rank of the grad group must pass the same kind of input
    /// (ids, embeddings with `text`, embeddings without): it decides whether the embedding
    /// table's gradient is reduce-scattered.
    fn step_input(
        &mut self,
        input: Input<'_>,
        labels: &Tensor,
        text: Option<(&Tensor, &Tensor)>,
    ) -> Result<(StepStats, Option<Tensor>)> {
        let want = [1, self.ids_len as i64];
        if labels.size() != want {
            return Err(RuntimeError::Shape(format!(
                "labels {:?} must be {want:?} on this rank",
                labels.size()
            )));
        }
        let dev = self.device();
        let mut ph = Phases::default();
        let mut clk = Clock::new(dev, self.cfg.profile, self.cfg.mem_trace);
        let t0 = Instant::now();
        let mut comm_s = 0.0;
        let emb_ids = match input {
            Input::Ids(ids) => Some(ids.view([-1])),
            Input::Embeddings(_) => None,
        };
        let (x0, table) = self.embed_forward(input, &mut ph, &mut clk)?;
        let mut x = x0.detach().set_requires_grad(true);
        let x_first = x.shallow_clone();
        ph.embed_s = clk.lap();
        let layers = self.forward_layers(&mut x, &mut ph, &mut clk)?;
        let held_weight_bytes = held_bytes(&layers)?;
        let mut lw = self.loss_weights(table, &mut ph, &mut clk)?;
        let (loss_mean, total) = self.loss_backward(&x, labels, &mut lw, &mut comm_s, &mut clk)?;
        ph.loss_s = clk.lap();
        let LossWeights { fin, emb_grad, .. } = lw;
        let mut emb_grad = emb_grad;
        if let Some((g, flat)) = fin {
            ph.bwd_s += clk.lap();
            self.collect_grads(&g, &flat)?;
            drop(g);
            self.reduce(shards::final_unit(self.model.cfg.num_layers), flat)?;
            let d = clk.lap();
            ph.grad_reduce_s += d;
            comm_s += d;
        }
        let g = self.backward_layers(layers, x.grad(), &mut ph, &mut clk, &mut comm_s)?;
        if self.sharded() && (emb_ids.is_some() || text.is_some()) && emb_grad.is_none() {
            emb_grad = Some(self.opt.new_unit_grad(shards::EMBED_UNIT)?);
        }
        let input_grad = self.embed_backward(g, emb_ids, text, &emb_grad, &x_first)?;
        ph.embed_s += clk.lap();
        if let Some(flat) = emb_grad {
            // The embedding's gradient (token rows, and the head's when tied).
            self.reduce(shards::EMBED_UNIT, flat)?;
            let d = clk.lap();
            ph.grad_reduce_s += d;
            comm_s += d;
        }
        self.optimizer_step(&mut ph, &mut comm_s)?;
        let _ = clk.lap();
        // The step's time is the device's: wait for its queued work even without profiling
        // (one synchronisation per step; without it step_s would be the host's enqueue time).
        sync(dev, true);
        Ok((
            StepStats {
                loss: loss_mean,
                tokens: total,
                step_s: t0.elapsed().as_secs_f64(),
                attention_s: ph.attn_fwd_s + ph.attn_bwd_s,
                grad_sync_s: comm_s,
                held_weight_bytes,
                phases: ph,
            },
            input_grad,
        ))
    }

    /// The embedding forward without autograd (its backward is one `index_put_`): from the
    /// model's table, or the sharded unit's (gathered, or resident). Returns the embeddings
    /// and, when the head is tied, the table's unit kept for the loss.
    fn embed_forward(
        &self,
        input: Input<'_>,
        ph: &mut Phases,
        clk: &mut Clock,
    ) -> Result<(Tensor, Option<Gathered>)> {
        let tied = self.model.cfg.tie_word_embeddings;
        let mut table = None;
        let x0 = match input {
            Input::Ids(ids) if self.sharded() => {
                let (x0, g) = self.embed_gathered(ids)?;
                ph.cast_s += clk.lap();
                table = Some(g);
                x0
            }
            _ => tch::no_grad(|| self.model.embed(input))?,
        };
        if self.sharded() && tied && table.is_none() {
            table = Some(self.gather(shards::EMBED_UNIT, false)?);
        }
        Ok((x0, if tied { table } else { None }))
    }

    /// Layer `l`'s weights for its forward: cast from the master (ZeRO-0; in the graph
    /// unless recomputing) or the unit's (fetched by `fetch`; leaves with grad unless
    /// recomputing).
    fn forward_weights(
        &self,
        l: usize,
        fetch: Option<Fetch>,
    ) -> Result<(PreWeights, PostWeights, Option<Gathered>)> {
        let rec = self.cfg.recompute;
        match fetch {
            Some(f) => {
                let g = self.fetch_finish(f, !rec)?;
                let (pre, post) = g.layer_weights()?;
                Ok((pre, post, Some(g)))
            }
            None if rec => Ok(tch::no_grad(|| {
                (self.model.pre_weights(l), self.model.post_weights(l), None)
            })),
            None => Ok((self.model.pre_weights(l), self.model.post_weights(l), None)),
        }
    }

    /// The layers' forward. Without recompute each layer keeps its graph (and, sharded, its
    /// unit's leaves; ZeRO-3 releases their storage right after the layer); with recompute
    /// only its input and attention output.
    fn forward_layers(
        &self,
        x: &mut Tensor,
        ph: &mut Phases,
        clk: &mut Clock,
    ) -> Result<Vec<LayerState>> {
        let nl = self.model.cfg.num_layers;
        let rec = self.cfg.recompute;
        let mut layers: Vec<LayerState> = Vec::with_capacity(nl);
        // ZeRO-3: layer l + 1's gather is in flight while layer l computes.
        let mut next = match self.sharded() && nl > 0 {
            true => Some(self.fetch_start(shards::layer_unit(0))?),
            false => None,
        };
        for l in 0..nl {
            let (pre, post, unit) = self.forward_weights(l, next.take())?;
            if self.sharded() && l + 1 < nl {
                next = Some(self.fetch_start(shards::layer_unit(l + 1))?);
            }
            ph.cast_s += clk.lap();
            let graph = |f: &dyn Fn() -> Result<Tensor>| if rec { tch::no_grad(f) } else { f() };
            let (q, k, v) = if rec {
                tch::no_grad(|| self.model.pre_attention_with(&pre, x, &self.rope))
            } else {
                self.model.pre_attention_with(&pre, x, &self.rope)
            };
            ph.fwd_s += clk.lap();
            let dense = [&q, &k, &v].map(|t| t.detach().contiguous());
            let (o, ctx) = self.attn.forward(&dense[0], &dense[1], &dense[2])?;
            if !rec {
                release_copied_roots([&q, &k, &v], &dense)?;
            }
            drop(dense);
            ph.attn_fwd_s += clk.lap();
            let a = o.detach().set_requires_grad(true);
            let y = graph(&|| self.model.post_attention_with(&post, x, &a))?;
            drop((pre, post));
            let unit = match unit {
                Some(g) if !rec => {
                    if self.per_use() {
                        g.release()?;
                    }
                    Some(g)
                }
                _ => None,
            };
            let next_x = y.detach().set_requires_grad(true);
            layers.push(LayerState {
                x_in: std::mem::replace(x, next_x),
                qkv: (!rec).then_some((q, k, v)),
                ctx,
                a,
                y: (!rec).then_some(y),
                unit,
            });
            ph.fwd_s += clk.lap();
        }
        Ok(layers)
    }

    /// The final norm and head weights for the loss, and the buffers their gradients go to.
    fn loss_weights(
        &self,
        table: Option<Gathered>,
        ph: &mut Phases,
        clk: &mut Clock,
    ) -> Result<LossWeights> {
        if !self.sharded() {
            let head_w = tch::no_grad(|| {
                self.model
                    .head_weight()
                    .detach()
                    .to_kind(self.model.compute)
            });
            ph.cast_s += clk.lap();
            return Ok(LossWeights {
                norm_w: self.model.final_norm_weight(),
                head_w,
                head_gw: self.model.head_weight().grad(),
                fin: None,
                emb_grad: None,
                _table: table,
            });
        }
        let nl = self.model.cfg.num_layers;
        let g = self.gather(shards::final_unit(nl), true)?;
        let flat = self.opt.new_unit_grad(g.unit)?;
        let norm_w = g.get("model.norm.weight")?.shallow_clone();
        let mut emb_grad = None;
        let (head_w, head_gw) = if self.model.cfg.tie_word_embeddings {
            let t = table.as_ref().ok_or_else(|| {
                RuntimeError::Config("sharded states: the tied head has no table".into())
            })?;
            let eg = self.opt.new_unit_grad(shards::EMBED_UNIT)?;
            let hg = self.opt.unit_views(shards::EMBED_UNIT, &eg)?.remove(0);
            emb_grad = Some(eg);
            (t.get("embed_tokens.weight")?.detach(), hg)
        } else {
            let i = g
                .leaves
                .iter()
                .position(|(n, _)| n == "lm_head.weight")
                .ok_or_else(|| RuntimeError::Config("sharded states: no lm_head.weight".into()))?;
            let hg = self.opt.unit_views(g.unit, &flat)?.remove(i);
            (g.get("lm_head.weight")?.detach(), hg)
        };
        ph.cast_s += clk.lap();
        Ok(LossWeights {
            norm_w,
            head_w,
            head_gw,
            fin: Some((g, flat)),
            emb_grad,
            _table: table,
        })
    }

    /// Loss over the SP group's active tokens and its backward into the final norm and the
    /// last layer's output `x`: returns (mean loss, active tokens). The tokens are counted
    /// first, so that the loss gradient is formed chunk by chunk and the logits of the whole
    /// shard are never held (compute-dtype GEMM, softmax in fp32 or wider, LOSS_CHUNK rows at
    /// a time).
    fn loss_backward(
        &self,
        x: &Tensor,
        labels: &Tensor,
        lw: &mut LossWeights,
        comm_s: &mut f64,
        clk: &mut Clock,
    ) -> Result<(f64, f64)> {
        let (dev, prof) = (self.device(), self.cfg.profile);
        let labels = labels.to_device(dev).view([-1]);
        // Packed: no label on a sample's last token (it would be the next sample's first).
        let labels = match &self.last_rows {
            Some(rows) => labels.f_index_fill(0, rows, -100i64)?,
            None => labels,
        };
        let acc = if self.model.compute == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let red = Kind::Float.max_precision(acc);
        let sp_sum = |t: &Tensor, comm_s: &mut f64| -> Result<()> {
            sync(dev, prof);
            let tc = Instant::now();
            self.groups.ulysses.all_reduce(t)?;
            self.groups.ring.all_reduce(t)?;
            sync(dev, prof);
            *comm_s += tc.elapsed().as_secs_f64();
            Ok(())
        };
        let count = labels.ne(-100).sum(Kind::Double).to_kind(red).view([1]);
        sp_sum(&count, comm_s)?;
        let total = count.double_value(&[0]);
        let hn = self.model.final_norm_with(&lw.norm_w, x);
        let (loss_sum, dhn) = self.chunked_loss(
            &hn,
            &lw.head_w,
            &mut lw.head_gw,
            &labels,
            acc,
            1.0 / total.max(1.0),
        )?;
        let stats = loss_sum.to_kind(red).view([1]);
        sp_sum(&stats, comm_s)?;
        let loss_mean = stats.double_value(&[0]) / total.max(1.0);
        let _ = clk;
        seed(&[(&hn, &dhn)])?;
        Ok((loss_mean, total))
    }

    /// Starts fetching layer `st`'s weights for its backward: ZeRO-3 without recompute
    /// refills the released storage; with recompute the unit is fetched afresh; resident
    /// weights are ready. None for ZeRO-0.
    fn backward_fetch_start(&self, l: usize, st: &LayerState) -> Result<Option<BwdFetch>> {
        if !self.sharded() {
            return Ok(None);
        }
        Ok(Some(match &st.unit {
            Some(g) if self.per_use() => BwdFetch::Refill(self.refill_start(g)?),
            Some(_) => BwdFetch::Kept,
            None => BwdFetch::Fresh(self.fetch_start(shards::layer_unit(l))?),
        }))
    }

    /// The layers' backward, last to first, from the gradient `g` of the last layer's output;
    /// returns the gradient of the first layer's input. Sharded: layer l - 1's weights are
    /// fetched while layer l's backward runs, and layer l's gradient reduce-scatter is
    /// finished after layer l - 1's backward.
    fn backward_layers(
        &self,
        mut layers: Vec<LayerState>,
        mut g: Tensor,
        ph: &mut Phases,
        clk: &mut Clock,
        comm_s: &mut f64,
    ) -> Result<Tensor> {
        let mut next = match layers.last() {
            Some(st) => self.backward_fetch_start(layers.len() - 1, st)?,
            None => None,
        };
        let mut in_flight: Option<PendingReduce> = None;
        while let Some(st) = layers.pop() {
            let l = layers.len();
            ph.bwd_s += clk.lap();
            let unit = match (next.take(), st.unit) {
                (Some(BwdFetch::Refill(p)), Some(u)) => {
                    drop(p.wait()?);
                    Some(u)
                }
                (Some(BwdFetch::Kept), Some(u)) => Some(u),
                (Some(BwdFetch::Fresh(f)), _) => Some(self.fetch_finish(f, true)?),
                _ => None,
            };
            if let Some(prev) = layers.last() {
                next = self.backward_fetch_start(l - 1, prev)?;
            }
            ph.cast_s += clk.lap();
            let (qkv, y) = match (st.qkv, st.y) {
                (Some(qkv), Some(y)) => (qkv, y),
                _ => {
                    let (pre, post) = match &unit {
                        Some(u) => u.layer_weights()?,
                        None => (self.model.pre_weights(l), self.model.post_weights(l)),
                    };
                    let qkv = self.model.pre_attention_with(&pre, &st.x_in, &self.rope);
                    let y = self.model.post_attention_with(&post, &st.x_in, &st.a)?;
                    (qkv, y)
                }
            };
            seed(&[(&y, &g)])?;
            drop(y);
            let ga = st.a.grad();
            ph.bwd_s += clk.lap();
            let (dq, dk, dv) = self.attn.backward(&st.ctx, &ga.contiguous())?;
            ph.attn_bwd_s += clk.lap();
            let (q, k, v) = qkv;
            seed(&[(&q, &dq), (&k, &dk), (&v, &dv)])?;
            drop((q, k, v));
            g = st.x_in.grad();
            ph.bwd_s += clk.lap();
            if let Some(u) = unit {
                // The layer's gradient: issued now, finished after the next layer's backward.
                let flat = self.opt.new_unit_grad(u.unit)?;
                self.collect_grads(&u, &flat)?;
                drop(u);
                if let Some(p) = in_flight.take() {
                    p.finish()?;
                }
                let unit = shards::layer_unit(l);
                in_flight = Some(
                    self.opt
                        .reduce_unit_grad_start(unit, flat, self.groups.grad)?,
                );
                let d = clk.lap();
                ph.grad_reduce_s += d;
                *comm_s += d;
            }
        }
        if let Some(p) = in_flight.take() {
            p.finish()?;
            let d = clk.lap();
            ph.grad_reduce_s += d;
            *comm_s += d;
        }
        Ok(g)
    }

    /// The embedding's backward: the gradient `g` of the first layer's input goes into the
    /// table's gradient (token ids: every row; embeddings: the `text` rows), or is returned
    /// (embeddings input).
    fn embed_backward(
        &self,
        g: Tensor,
        emb_ids: Option<Tensor>,
        text: Option<(&Tensor, &Tensor)>,
        emb_grad: &Option<Tensor>,
        x_first: &Tensor,
    ) -> Result<Option<Tensor>> {
        let dev = self.device();
        let h = self.model.cfg.hidden_size as i64;
        let table_grad = || -> Result<Tensor> {
            Ok(match emb_grad {
                Some(flat) => self.opt.unit_views(shards::EMBED_UNIT, flat)?.remove(0),
                None => self.model.embed_weight().grad(),
            })
        };
        match emb_ids {
            Some(ids) => {
                if g.defined() {
                    // d table[ids[i]] += d x0[i]: one accumulating scatter of (S, h) rows
                    // (sorted, hence deterministic, on CUDA).
                    let mut gw = table_grad()?;
                    let rows = g.view([-1, h]).to_kind(gw.kind());
                    let _ = tch::no_grad(|| gw.f_index_put_(&[Some(&ids)], &rows, true))?;
                }
                Ok(None)
            }
            None => {
                let g = if g.defined() { g } else { x_first.zeros_like() };
                if let Some((rows, ids)) = text {
                    // The text rows came from the table: d table[ids[j]] += d x0[rows[j]].
                    let mut gw = table_grad()?;
                    let r = g.view([-1, h]).index_select(0, &rows.to_device(dev));
                    let r = r.to_kind(gw.kind());
                    let ids = ids.to_device(dev).view([-1]);
                    let _ = tch::no_grad(|| gw.f_index_put_(&[Some(&ids)], &r, true))?;
                }
                Ok(Some(g))
            }
        }
    }

    /// The AdamW update (ZeRO-0: after the gradients' all-reduce) and, ZeRO-1/2, the
    /// all-gather of the updated weights into the resident ones.
    fn optimizer_step(&mut self, ph: &mut Phases, comm_s: &mut f64) -> Result<()> {
        let (dev, prof) = (self.device(), self.cfg.profile);
        let scale = 1.0 / self.groups.dp as f64;
        let sync_fn = || sync(dev, prof);
        let (reduce_s, update_s) = self.opt.step_timed(self.groups.grad, scale, &sync_fn)?;
        ph.grad_reduce_s += reduce_s;
        ph.optimizer_s = update_s;
        *comm_s += reduce_s + update_s;
        if self.resident.is_some() {
            let t = Instant::now();
            self.refresh_resident()?;
            sync(dev, prof);
            let d = t.elapsed().as_secs_f64();
            ph.grad_reduce_s += d;
            *comm_s += d;
        }
        Ok(())
    }
}

/// The loss's weights and where their gradients go.
struct LossWeights {
    norm_w: Tensor,
    head_w: Tensor,
    /// The head weight's gradient (master dtype): its `.grad()`, or a view of a unit's
    /// gradient vector.
    head_gw: Tensor,
    /// Sharded: the final unit's leaves and its gradient vector.
    fin: Option<(Gathered, Tensor)>,
    /// Sharded and tied: the embedding unit's gradient vector (the head's gradient is in it).
    emb_grad: Option<Tensor>,
    /// Sharded and tied: the table's unit, held until the loss is done.
    _table: Option<Gathered>,
}

/// A layer's weights for its backward, on their way.
enum BwdFetch {
    /// ZeRO-3 without recompute: the released storage being gathered into again.
    Refill(PendingGather),
    /// Resident leaves kept from the forward (ZeRO-1/2 without recompute).
    Kept,
    /// Recompute: the unit fetched afresh.
    Fresh(Fetch),
}

/// Rows of the loss computed at a time.
const LOSS_CHUNK: i64 = 4096;

/// Checks, on a small problem, the two fast loss kernels against their plain forms; returns
/// (fast log-softmax usable, fp32-output GEMM usable). Only tried on CUDA with a reduced
/// compute dtype and fp32 master; a kernel that errors or disagrees is not used.
fn probe_loss_kernels(dev: Device, compute: Kind, master: Kind) -> (bool, bool) {
    if !dev.is_cuda() || !matches!(compute, Kind::BFloat16 | Kind::Half) {
        return (false, false);
    }
    let _ng = tch::no_grad_guard();
    let rel = |a: &Tensor, b: &Tensor| {
        (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(f64::MIN_POSITIVE)
    };
    let x = (crate::rng::unseeded(|| Tensor::randn([64, 1000], (Kind::Float, dev))) * 4.0)
        .to_kind(compute);
    let lsm = match x.f_internal_log_softmax(1, true) {
        Ok(fast) => {
            let slow = x.to_kind(Kind::Float).log_softmax(1, Kind::Float);
            fast.kind() == Kind::Float && rel(&fast, &slow) < 1e-5
        }
        Err(_) => false,
    };
    let gemm = master == Kind::Float && {
        let (a, b, c0) = crate::rng::unseeded(|| {
            (
                Tensor::randn([96, 64], (Kind::Float, dev)).to_kind(compute),
                Tensor::randn([64, 80], (Kind::Float, dev)).to_kind(compute),
                Tensor::randn([96, 80], (Kind::Float, dev)),
            )
        });
        let c = c0.copy();
        match c.f_addmm_dtype_out(&c, &a, &b, Kind::Float) {
            Ok(_) => {
                let want = &c0 + a.to_kind(Kind::Float).mm(&b.to_kind(Kind::Float));
                rel(&c, &want) < 1e-5
            }
            Err(_) => false,
        }
    };
    (lsm, gemm)
}

impl Trainer<'_> {
    /// Cross-entropy of the head (compute-dtype weight `w`, detached) over the normed hidden
    /// states `hn` (B, S, hidden): returns the loss summed over the labelled tokens and its
    /// gradient with respect to `hn` scaled by `inv_total`; the head weight's gradient is
    /// added to `gw` (master dtype: its `.grad()`, or when sharded a view of the unit's
    /// gradient vector) directly.
    ///
    /// Per chunk of k rows: logits z = hc W^T (k, V) in the compute dtype; l = log_softmax(z)
    /// in `acc`; loss = -sum_i valid_i l[i, y_i]; d loss / d z = softmax(z) - onehot(y),
    /// formed as exp(l) written in the compute dtype with the label entries set to
    /// expm1(l[i, y_i]) (= p - 1 without cancellation). The row factor r_i = valid_i /
    /// total is applied to the small operands: d hn = r (dz W), d W += dz^T (r hc).
    #[allow(clippy::too_many_arguments)]
    fn chunked_loss(
        &self,
        hn: &Tensor,
        w: &Tensor,
        gw: &mut Tensor,
        labels: &Tensor,
        acc: Kind,
        inv_total: f64,
    ) -> Result<(Tensor, Tensor)> {
        let _ng = tch::no_grad_guard();
        let compute = self.model.compute;
        if !gw.defined() {
            return Err(RuntimeError::Config(
                "the head weight has no gradient buffer".into(),
            ));
        }
        let hsz = hn.size();
        let h2 = hn.detach().reshape([-1, hsz[hsz.len() - 1]]);
        let s = h2.size()[0];
        let dev = h2.device();
        let mut loss = Tensor::zeros([], (acc, dev));
        let dhn = h2.empty_like();
        let wt = w.tr();
        let mut a = 0;
        while a < s {
            let k = LOSS_CHUNK.min(s - a);
            let hc = h2.narrow(0, a, k);
            let y = labels.narrow(0, a, k);
            let r = (y.ne(-100).to_kind(acc) * inv_total).unsqueeze(1);
            let yc = y.clamp_min(0).unsqueeze(1);
            let z = hc.mm(&wt);
            let l = self.log_softmax(&z, acc)?;
            drop(z);
            let picked = l.gather(1, &yc, false);
            loss -= (&picked * y.ne(-100).to_kind(acc).unsqueeze(1)).sum(acc);
            let mut dz = Tensor::empty([k, l.size()[1]], (compute, dev));
            let _ = l.f_exp_out(&dz)?;
            drop(l);
            let _ = dz.f_scatter_(1, &yc, &picked.expm1().to_kind(compute))?;
            // d hn rows: r * (dz W), scaled in `acc` before rounding to the compute dtype.
            dhn.narrow(0, a, k).f_copy_(&(dz.mm(w).to_kind(acc) * &r))?;
            let hs = (hc.to_kind(acc) * &r).to_kind(compute);
            self.add_head_grad(gw, &dz, &hs)?;
            a += k;
        }
        Ok((loss, dhn.view(hsz.as_slice())))
    }

    /// log_softmax of the compute-dtype logits `z` over dim 1, in `acc`.
    fn log_softmax(&self, z: &Tensor, acc: Kind) -> Result<Tensor> {
        if z.kind() != acc && self.fast_log_softmax.get() {
            // One kernel reading the bf16 logits and writing fp32 (6 B per logit).
            match z.f_internal_log_softmax(1, true) {
                Ok(l) => return Ok(l),
                Err(_) => self.fast_log_softmax.set(false),
            }
        }
        Ok(z.f_log_softmax(1, acc)?)
    }

    /// gw (master dtype) += dz^T hs.
    fn add_head_grad(&self, gw: &mut Tensor, dz: &Tensor, hs: &Tensor) -> Result<()> {
        if gw.kind() == dz.kind() {
            let _ = gw.f_addmm_(&dz.tr(), hs)?;
            return Ok(());
        }
        if self.fp32_out_gemm.get() {
            // fp32 accumulation in the GEMM epilogue: no bf16 (V, h) temporary.
            match gw.f_addmm_dtype_out(gw, &dz.tr(), hs, gw.kind()) {
                Ok(_) => return Ok(()),
                Err(_) => self.fp32_out_gemm.set(false),
            }
        }
        let _ = gw.f_add_(&dz.tr().mm(hs))?;
        Ok(())
    }
}

trait MaxPrecision {
    fn max_precision(self, other: Kind) -> Kind;
}

impl MaxPrecision for Kind {
    fn max_precision(self, other: Kind) -> Kind {
        if self == Kind::Double || other == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        }
    }
}

// ------------------------------------------------------------------------------------------
// Multi-modal input (MM-SP stage 1, `crate::vision`): one step from embeddings.
impl Trainer<'_> {
    /// One step from this rank's input embeddings `emb_local` (1, s_local, hidden), e.g. the
    /// vision rows delivered by the re-shard merged with text embeddings
    /// ([`crate::vision::VisionStage`]), and `labels` (1, s_local). Returns the stats and the
    /// gradient of the loss with respect to `emb_local` (same shape, compute dtype), to be
    /// sent back through the re-shard (`VisionStage::backward_local`). The decoder's
    /// embedding table gets no gradient from `emb_local` (the decoder's optimizer has run
    /// when this returns): see [`Trainer::step_embeddings_text`].
    pub fn step_embeddings(
        &mut self,
        emb_local: &Tensor,
        labels: &Tensor,
    ) -> Result<(StepStats, Tensor)> {
        self.step_embeddings_text(emb_local, labels, None)
    }

    /// As [`Trainer::step_embeddings`]; `text` = (local rows (n,), token ids (n,)) of the
    /// rows of `emb_local` that are the decoder's own token embeddings (e.g. `Reshard`'s
    /// `text_rows()`): their gradient reaches the embedding table's gradient before the
    /// decoder's optimizer step, as in a text-only step.
    pub fn step_embeddings_text(
        &mut self,
        emb_local: &Tensor,
        labels: &Tensor,
        text: Option<(&Tensor, &Tensor)>,
    ) -> Result<(StepStats, Tensor)> {
        let want = [1, self.ids_len as i64, self.model.cfg.hidden_size as i64];
        if emb_local.size() != want {
            return Err(RuntimeError::Shape(format!(
                "embeddings {:?} must be {want:?} on this rank",
                emb_local.size()
            )));
        }
        let emb = emb_local.detach().to_device(self.device());
        let (stats, grad) = self.step_input(Input::Embeddings(&emb), labels, text)?;
        let grad = grad.ok_or_else(|| {
            RuntimeError::Shape("the step returned no gradient for its embeddings".into())
        })?;
        Ok((stats, grad))
    }
}
