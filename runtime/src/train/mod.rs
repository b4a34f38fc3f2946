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
//! either replicated (ZeRO-0) or sharded over the grad group (ZeRO-1/2: gradients
//! reduce-scattered, updated parameters all-gathered; ZeRO-3: parameters, gradients and
//! moments all sharded, each layer's weights all-gathered around its forward and its
//! backward and its gradients reduce-scattered right after its backward, see [`zero3`]).
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
pub mod kernel_profile;
pub mod run;
pub mod zero3;

use crate::attn2d::AttnShape;
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::ffi::backward_seeded;
use crate::kernel::Backend;
use crate::model::decoder::{PostWeights, PreWeights};
use crate::model::{Decoder, Input, Rope};
use crate::packed::{PackedAttention, PackedCtx};
use adamw::{AdamW, AdamWConfig};
use serde_json::{json, Value};
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
    /// 0, 1, 2 or 3 (2 behaves as 1: gradients are reduce-scattered in both; 3 also shards
    /// the parameters and gradients, see [`zero3`]).
    pub zero_stage: u32,
    /// Keep only each layer's input and attention output; recompute the rest in backward.
    /// Always done with ZeRO-3 (its layers' full weights exist only around their use).
    pub recompute: bool,
    pub backend: Backend,
    /// Synchronise the device around phases to time them (costs a little overlap).
    pub profile: bool,
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
    /// Per-phase times (device times with [`TrainConfig::profile`]; host-side enqueue times
    /// without it).
    pub phases: Phases,
}

/// Where one step's time goes. The phases partition the step: their sum is `step_s` up to
/// the host work between them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    /// Master -> compute dtype weight casts (every layer weight once per step without
    /// recompute; with recompute the layers' casts fall in `fwd_s` / `bwd_s`; always the
    /// head weight). ZeRO-3: every unit's cast and all-gather.
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
    /// ZeRO-1/2, the parameter all-gather. ZeRO-3: the per-unit reduce-scatters (with the
    /// copies of the unit's gradients into one master-dtype vector).
    pub grad_reduce_s: f64,
    /// AdamW update of this rank's parameters and the gradient zeroing.
    pub optimizer_s: f64,
}

impl Phases {
    /// The phases as a JSON object (seconds).
    pub fn to_json(&self) -> Value {
        json!({
            "cast_s": self.cast_s, "embed_s": self.embed_s, "fwd_s": self.fwd_s,
            "attn_fwd_s": self.attn_fwd_s, "loss_s": self.loss_s, "bwd_s": self.bwd_s,
            "attn_bwd_s": self.attn_bwd_s, "grad_reduce_s": self.grad_reduce_s,
            "optimizer_s": self.optimizer_s,
        })
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
}

/// One rank's trainer.
pub struct Trainer<'a> {
    pub model: Decoder,
    attn: PackedAttention<'a>,
    groups: Groups<'a>,
    cfg: TrainConfig,
    opt: AdamW,
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
/// With `MMSP_MEM_TRACE=1` on CUDA it also prints, at every lap, the caching allocator's
/// bytes in tensors now and at their peak so far (a memory timeline of the step, for
/// comparing with the planner's activation model; the call site is the lap's source line).
struct Clock {
    dev: Device,
    on: bool,
    last: Instant,
    mem_trace: bool,
}

impl Clock {
    fn new(dev: Device, on: bool) -> Clock {
        sync(dev, on);
        Clock {
            dev,
            on,
            last: Instant::now(),
            mem_trace: dev.is_cuda() && std::env::var("MMSP_MEM_TRACE").as_deref() == Ok("1"),
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
        model: Decoder,
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
        let m = &model.cfg;
        let shape = AttnShape {
            batch: 1,
            seq_len: sample_lens.iter().fold(0usize, |a, &l| a.saturating_add(l)),
            q_heads: m.num_heads,
            kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
        };
        let attn =
            PackedAttention::new(groups.ulysses, groups.ring, cfg.backend, shape, sample_lens)?;
        let (r, u) = (groups.ring.rank(), groups.ulysses.rank());
        let packing = attn.packing();
        let device = model.named_parameters()[0].1.device();
        let positions = Tensor::from_slice(&packing.positions(r, u)).to(device);
        let ids_len = positions.size()[0] as usize;
        let rope = Rope::new(m, &positions, model.compute);
        let last_rows = (packing.num_samples() > 1).then(|| {
            let rows: Vec<i64> = packing.last_rows(r, u).iter().map(|&x| x as i64).collect();
            Tensor::from_slice(&rows).to(device)
        });
        let params: Vec<Tensor> = model.parameters();
        let opt = match cfg.zero_stage {
            0 => AdamW::new(&params, cfg.optimizer, None)?,
            1 | 2 => AdamW::new(&params, cfg.optimizer, Some(groups.grad))?,
            _ => AdamW::new_zero3(&params, &zero3::units(&model)?, cfg.optimizer, groups.grad)?,
        };
        drop(params);
        let master = model.head_weight().kind();
        let (fast_lsm, fp32_gemm) = probe_loss_kernels(device, model.compute, master);
        let t = Trainer {
            model,
            attn,
            groups,
            cfg,
            opt,
            rope,
            ids_len,
            last_rows,
            fast_log_softmax: Cell::new(fast_lsm),
            fp32_out_gemm: Cell::new(fp32_gemm),
        };
        if device.is_cuda() && t.groups.grad.rank() == 0 {
            eprintln!("{}", json!({ "train_kernels": t.kernels() }));
        }
        Ok(t)
    }

    /// Which kernels this trainer uses (for logs and A/B runs).
    pub fn kernels(&self) -> Value {
        json!({
            "adamw": format!("{:?}", self.opt.kernel()).to_lowercase(),
            "loss_log_softmax_half_to_float": self.fast_log_softmax.get(),
            "head_grad_fp32_out_gemm": self.fp32_out_gemm.get(),
            "fused_rms_norm": std::env::var("MMSP_FUSED_NORM").as_deref() != Ok("0"),
        })
    }

    /// The optimizer (its flat buffers and moments, for checkpoints). With ZeRO-3 the model's
    /// parameter tensors are empty: [`Trainer::full_parameters`] gathers them.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
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
    /// graph: from the model's table, or under ZeRO-3 from the table gathered for the lookup
    /// (a collective over the grad group: every rank calls it). For the text rows of a VLM
    /// step ([`Trainer::step_embeddings_text`] sends their gradient back to the table).
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        if self.opt.units().is_none() {
            return tch::no_grad(|| self.model.embed(Input::Ids(ids)));
        }
        Ok(self.embed_gathered(&ids.to_device(self.device()))?.0)
    }

    /// ZeRO-3: the embedding table gathered and the lookup of `ids` (B, S) int64 in it, without
    /// graph; the gathered table is returned for a tied head.
    fn embed_gathered(&self, ids: &Tensor) -> Result<(Tensor, zero3::Gathered)> {
        if ids.dim() != 2 || ids.kind() != Kind::Int64 {
            return Err(RuntimeError::Shape(format!(
                "token ids must be (B, S) int64, got {:?} {:?}",
                ids.size(),
                ids.kind()
            )));
        }
        let g = self.gather(zero3::EMBED_UNIT, false)?;
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
    /// With ZeRO-3 every rank of the grad group must pass the same kind of input (ids,
    /// embeddings with `text`, embeddings without): it decides whether the embedding
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
        let prof = self.cfg.profile;
        let mut ph = Phases::default();
        let mut clk = Clock::new(dev, prof);
        let t0 = Instant::now();
        let nl = self.model.cfg.num_layers;
        // ZeRO-3: weights are gathered unit by unit (module `zero3`), layers recomputed.
        let z3 = self.opt.units().is_some();
        let tied = self.model.cfg.tie_word_embeddings;
        let rec = self.cfg.recompute || z3;
        let compute = self.model.compute;
        // Master -> compute casts, once per step (kept in the graph: their backward
        // accumulates into the fp32 gradient buffer).
        let weights: Vec<(PreWeights, PostWeights)> = if rec {
            Vec::new()
        } else {
            (0..nl)
                .map(|l| (self.model.pre_weights(l), self.model.post_weights(l)))
                .collect()
        };
        let head_w = if z3 {
            None
        } else {
            Some(tch::no_grad(|| {
                self.model.head_weight().detach().to_kind(compute)
            }))
        };
        let norm_w = (!z3).then(|| self.model.final_norm_weight());
        ph.cast_s = clk.lap();
        // Embedding: no autograd (its backward is one index_put_ below).
        let emb_ids = match input {
            Input::Ids(ids) => Some(ids.view([-1])),
            Input::Embeddings(_) => None,
        };
        // ZeRO-3: the gathered embedding table, while needed (the lookup; the head if tied).
        let mut table: Option<zero3::Gathered> = None;
        let x0 = match input {
            Input::Ids(ids) if z3 => {
                let (x0, g) = self.embed_gathered(ids)?;
                ph.cast_s += clk.lap();
                table = Some(g);
                x0
            }
            _ => tch::no_grad(|| self.model.embed(input))?,
        };
        if z3 && tied && table.is_none() {
            table = Some(self.gather(zero3::EMBED_UNIT, false)?);
        }
        if !tied {
            table = None;
        }
        let mut x = x0.detach().set_requires_grad(true);
        let x_first = x.shallow_clone();
        ph.embed_s = clk.lap();
        let mut layers: Vec<LayerState> = Vec::with_capacity(nl);
        for l in 0..nl {
            // Weights cast at the start of the step, or (recompute) cast here without graph,
            // or (ZeRO-3) gathered here and freed after the layer.
            let cast = weights.get(l);
            let lw = match (cast, z3) {
                (Some(_), _) => None,
                (None, true) => {
                    let (pre, post, _) = self.gathered_layer(l, false)?;
                    ph.cast_s += clk.lap();
                    Some((pre, post))
                }
                (None, false) => Some(tch::no_grad(|| {
                    (self.model.pre_weights(l), self.model.post_weights(l))
                })),
            };
            let (q, k, v) = match (cast, &lw) {
                (Some((pre, _)), _) => self.model.pre_attention_with(pre, &x, &self.rope),
                (None, Some((pre, _))) => {
                    tch::no_grad(|| self.model.pre_attention_with(pre, &x, &self.rope))
                }
                (None, None) => unreachable!("layer weights are cast or gathered"),
            };
            ph.fwd_s += clk.lap();
            let (o, ctx) = self.attn.forward(
                &q.detach().contiguous(),
                &k.detach().contiguous(),
                &v.detach().contiguous(),
            )?;
            ph.attn_fwd_s += clk.lap();
            let a = o.detach().set_requires_grad(true);
            let y = match (cast, &lw) {
                (Some((_, post)), _) => self.model.post_attention_with(post, &x, &a),
                (None, Some((_, post))) => {
                    tch::no_grad(|| self.model.post_attention_with(post, &x, &a))
                }
                (None, None) => unreachable!("layer weights are cast or gathered"),
            };
            drop(lw);
            let next = y.detach().set_requires_grad(true);
            layers.push(LayerState {
                x_in: x,
                qkv: (!rec).then_some((q, k, v)),
                ctx,
                a,
                y: (!rec).then_some(y),
            });
            x = next;
            ph.fwd_s += clk.lap();
        }
        // ZeRO-3: the final norm (a leaf with grad) and the untied head, gathered for the
        // loss; the head's gradient goes straight into the unit's gradient vector (or the
        // embedding's when tied).
        let mut fin: Option<(zero3::Gathered, Tensor)> = None;
        let mut emb_grad: Option<Tensor> = None;
        let (norm_w, head_w, mut head_gw) = match (norm_w, head_w) {
            (Some(n), Some(h)) => (n, h, self.model.head_weight().grad()),
            _ => {
                let g = self.gather(zero3::final_unit(nl), true)?;
                let flat = self.opt.new_unit_grad(g.unit)?;
                let nw = g.get("model.norm.weight")?.shallow_clone();
                let (hw, hg) = if tied {
                    let t = table.as_ref().ok_or_else(|| {
                        RuntimeError::Config("ZeRO-3: the tied head has no table".into())
                    })?;
                    let eg = self.opt.new_unit_grad(zero3::EMBED_UNIT)?;
                    let hg = self.opt.unit_views(zero3::EMBED_UNIT, &eg)?.remove(0);
                    emb_grad = Some(eg);
                    (t.get("embed_tokens.weight")?.detach(), hg)
                } else {
                    let i = self.model.named_parameters()
                        [self.opt.units().map_or(0..0, |u| u[g.unit].params.clone())]
                    .iter()
                    .position(|(n, _)| n == "lm_head.weight")
                    .ok_or_else(|| RuntimeError::Config("ZeRO-3: no lm_head.weight".into()))?;
                    let hg = self.opt.unit_views(g.unit, &flat)?.remove(i);
                    (g.get("lm_head.weight")?.detach(), hg)
                };
                fin = Some((g, flat));
                ph.cast_s += clk.lap();
                (nw, hw, hg)
            }
        };
        // Loss over the SP group's active tokens. The tokens are counted first, so that the
        // loss gradient is formed chunk by chunk and the logits of the whole shard are never
        // held (compute-dtype GEMM, softmax in fp32 or wider, LOSS_CHUNK rows at a time).
        let labels = labels.to_device(dev).view([-1]);
        // Packed: no label on a sample's last token (it would be the next sample's first).
        let labels = match &self.last_rows {
            Some(rows) => labels.f_index_fill(0, rows, -100i64)?,
            None => labels,
        };
        let acc = if compute == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let red = Kind::Float.max_precision(acc);
        let count = labels.ne(-100).sum(Kind::Double).to_kind(red).view([1]);
        sync(dev, prof);
        let tc = Instant::now();
        self.groups.ulysses.all_reduce(&count)?;
        self.groups.ring.all_reduce(&count)?;
        sync(dev, prof);
        let mut comm_s = tc.elapsed().as_secs_f64();
        let total = count.double_value(&[0]);
        let hn = self.model.final_norm_with(&norm_w, &x);
        let (loss_sum, dhn) = self.chunked_loss(
            &hn,
            &head_w,
            &mut head_gw,
            &labels,
            acc,
            1.0 / total.max(1.0),
        )?;
        let stats = loss_sum.to_kind(red).view([1]);
        sync(dev, prof);
        let tc = Instant::now();
        self.groups.ulysses.all_reduce(&stats)?;
        self.groups.ring.all_reduce(&stats)?;
        sync(dev, prof);
        comm_s += tc.elapsed().as_secs_f64();
        let loss_mean = stats.double_value(&[0]) / total.max(1.0);
        ph.loss_s = clk.lap();
        seed(&[(&hn, &dhn)])?;
        drop((hn, dhn, head_w, head_gw, norm_w, table));
        if let Some((g, flat)) = fin.take() {
            ph.bwd_s += clk.lap();
            self.collect_grads(&g, &flat)?;
            drop(g);
            self.reduce(zero3::final_unit(nl), &flat)?;
            let d = clk.lap();
            ph.grad_reduce_s += d;
            comm_s += d;
        }
        // Backward, layer by layer.
        let mut g = x.grad();
        for (l, st) in layers.into_iter().enumerate().rev() {
            let mut gathered = None;
            let (qkv, y) = match (st.qkv, st.y) {
                (Some(qkv), Some(y)) => (qkv, y),
                _ => {
                    let (pre, post) = if z3 {
                        ph.bwd_s += clk.lap();
                        let (pre, post, gw) = self.gathered_layer(l, true)?;
                        gathered = Some(gw);
                        ph.cast_s += clk.lap();
                        (pre, post)
                    } else {
                        (self.model.pre_weights(l), self.model.post_weights(l))
                    };
                    let qkv = self.model.pre_attention_with(&pre, &st.x_in, &self.rope);
                    let y = self.model.post_attention_with(&post, &st.x_in, &st.a);
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
            if let Some(gw) = gathered {
                // The layer's gradients, reduce-scattered now; its weights are freed.
                let flat = self.opt.new_unit_grad(gw.unit)?;
                self.collect_grads(&gw, &flat)?;
                drop(gw);
                self.reduce(zero3::layer_unit(l), &flat)?;
                let d = clk.lap();
                ph.grad_reduce_s += d;
                comm_s += d;
            }
        }
        drop(weights);
        if z3 && (emb_ids.is_some() || text.is_some()) && emb_grad.is_none() {
            emb_grad = Some(self.opt.new_unit_grad(zero3::EMBED_UNIT)?);
        }
        let input_grad = match emb_ids {
            Some(ids) => {
                if g.defined() {
                    // d table[ids[i]] += d x0[i]: one accumulating scatter of (S, h) rows
                    // (sorted, hence deterministic, on CUDA).
                    let mut gw = match &emb_grad {
                        Some(flat) => self.opt.unit_views(zero3::EMBED_UNIT, flat)?.remove(0),
                        None => self.model.embed_weight().grad(),
                    };
                    let h = self.model.cfg.hidden_size as i64;
                    let rows = g.view([-1, h]).to_kind(gw.kind());
                    let _ = tch::no_grad(|| gw.f_index_put_(&[Some(&ids)], &rows, true))?;
                }
                None
            }
            None => {
                let g = if g.defined() { g } else { x_first.zeros_like() };
                if let Some((rows, ids)) = text {
                    // The text rows came from the table: d table[ids[j]] += d x0[rows[j]].
                    let mut gw = match &emb_grad {
                        Some(flat) => self.opt.unit_views(zero3::EMBED_UNIT, flat)?.remove(0),
                        None => self.model.embed_weight().grad(),
                    };
                    let h = self.model.cfg.hidden_size as i64;
                    let r = g.view([-1, h]).index_select(0, &rows.to_device(dev));
                    let r = r.to_kind(gw.kind());
                    let ids = ids.to_device(dev).view([-1]);
                    let _ = tch::no_grad(|| gw.f_index_put_(&[Some(&ids)], &r, true))?;
                }
                Some(g)
            }
        };
        ph.embed_s += clk.lap();
        if let Some(flat) = emb_grad {
            // ZeRO-3: the embedding's gradient (token rows, and the head's when tied).
            self.reduce(zero3::EMBED_UNIT, &flat)?;
            drop(flat);
            let d = clk.lap();
            ph.grad_reduce_s += d;
            comm_s += d;
        }
        let scale = 1.0 / self.groups.dp as f64;
        let sync_fn = || sync(dev, prof);
        let (reduce_s, update_s) = self.opt.step_timed(self.groups.grad, scale, &sync_fn)?;
        let _ = clk.lap();
        ph.grad_reduce_s += reduce_s;
        ph.optimizer_s = update_s;
        comm_s += reduce_s + update_s;
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
                phases: ph,
            },
            input_grad,
        ))
    }
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
    let x = (Tensor::randn([64, 1000], (Kind::Float, dev)) * 4.0).to_kind(compute);
    let lsm = match x.f_internal_log_softmax(1, true) {
        Ok(fast) => {
            let slow = x.to_kind(Kind::Float).log_softmax(1, Kind::Float);
            fast.kind() == Kind::Float && rel(&fast, &slow) < 1e-5
        }
        Err(_) => false,
    };
    let gemm = master == Kind::Float && {
        let a = Tensor::randn([96, 64], (Kind::Float, dev)).to_kind(compute);
        let b = Tensor::randn([64, 80], (Kind::Float, dev)).to_kind(compute);
        let c0 = Tensor::randn([96, 80], (Kind::Float, dev));
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
    /// added to `gw` (master dtype: its `.grad()`, or with ZeRO-3 a view of the unit's
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
