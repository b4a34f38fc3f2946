//! One training step of the decoder over a sequence-parallel group: every SP rank holds its
//! zigzag token ranges; attention runs through [`Attention2d`] with its hand-written
//! backward, everything else through libtorch autograd, one layer segment at a time (each
//! layer's input and attention output are autograd leaves, and the attention-input gradients
//! are fed back as a vector-Jacobian product). The loss is normalised over the active tokens
//! of the whole SP group; gradients of the (replicated) parameters are summed over the grad
//! group (SP x DP) and averaged over DP; AdamW in the master dtype, its state either
//! replicated (ZeRO-0) or sharded over the grad group (ZeRO-1/2: gradients reduce-scattered,
//! updated parameters all-gathered).
pub mod adamw;
pub mod run;

use crate::attn2d::{Attention2d, Attn2dCtx, AttnShape};
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::model::{Decoder, Input, Rope};
use adamw::{AdamW, AdamWConfig};
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
    /// 0, 1 or 2 (2 behaves as 1: gradients are reduce-scattered in both).
    pub zero_stage: u32,
    /// Keep only each layer's input and attention output; recompute the rest in backward.
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
}

struct LayerState {
    x_in: Tensor,
    /// Non-detached q, k, v (autograd graph to x_in); None when recomputing.
    qkv: Option<(Tensor, Tensor, Tensor)>,
    ctx: Attn2dCtx,
    /// Attention output (detached) as a leaf.
    a: Tensor,
    /// Layer output (autograd graph to x_in and a); None when recomputing.
    y: Option<Tensor>,
}

/// One rank's trainer.
pub struct Trainer<'a> {
    pub model: Decoder,
    attn: Attention2d<'a>,
    groups: Groups<'a>,
    cfg: TrainConfig,
    opt: AdamW,
    rope: Rope,
    ids_len: usize,
}

fn sync(dev: Device, on: bool) {
    if let (true, Device::Cuda(i)) = (on, dev) {
        tch::Cuda::synchronize(i as i64);
    }
}

/// `(t * g).sum()`: backward of it feeds `g` into `t`'s graph.
fn vjp_sum(pairs: &[(&Tensor, &Tensor)]) -> Option<Tensor> {
    pairs
        .iter()
        .filter(|(_, g)| g.defined())
        .map(|(t, g)| (*t * g.detach().to_kind(t.kind())).sum(Kind::Double))
        .reduce(|a, b| a + b)
}

impl<'a> Trainer<'a> {
    /// Builds the trainer for a sequence of `seq_len` tokens (batch 1 per rank group).
    pub fn new(
        model: Decoder,
        groups: Groups<'a>,
        seq_len: usize,
        cfg: TrainConfig,
    ) -> Result<Trainer<'a>> {
        if cfg.zero_stage > 2 {
            return Err(RuntimeError::Plan(format!(
                "ZeRO stage {} is not implemented by the runtime (0, 1 and 2 are)",
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
            seq_len,
            q_heads: m.num_heads,
            kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
        };
        let attn = Attention2d::new(groups.ulysses, groups.ring, cfg.backend, shape)?;
        let ranges = attn
            .sharding()
            .local_ranges(groups.ring.rank(), groups.ulysses.rank());
        let device = model.named_parameters()[0].1.device();
        let positions = Rope::positions(&ranges, device);
        let ids_len = positions.size()[0] as usize;
        let rope = Rope::new(m, &positions, model.compute);
        let params: Vec<Tensor> = model
            .named_parameters()
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let shard = if cfg.zero_stage == 0 {
            None
        } else {
            Some(groups.grad)
        };
        let opt = AdamW::new(&params, cfg.optimizer, shard)?;
        Ok(Trainer {
            model,
            attn,
            groups,
            cfg,
            opt,
            rope,
            ids_len,
        })
    }

    /// This rank's token ranges [start, end) in the sequence, in local order.
    pub fn local_ranges(&self) -> [(usize, usize); 2] {
        self.attn
            .sharding()
            .local_ranges(self.groups.ring.rank(), self.groups.ulysses.rank())
    }

    /// One step on this rank's shard: `ids` (1, s_local) int64 and `labels` (1, s_local)
    /// int64 (the next token of each position of the full sequence; -100 = no loss).
    pub fn step(&mut self, ids: &Tensor, labels: &Tensor) -> Result<StepStats> {
        let want = [1, self.ids_len as i64];
        if ids.size() != want || labels.size() != want {
            return Err(RuntimeError::Shape(format!(
                "ids {:?} and labels {:?} must be {want:?} on this rank",
                ids.size(),
                labels.size()
            )));
        }
        let dev = self.model.named_parameters()[0].1.device();
        let prof = self.cfg.profile;
        sync(dev, prof);
        let t0 = Instant::now();
        let mut attn_s = 0.0;
        let nl = self.model.cfg.num_layers;
        let x0 = self.model.embed(Input::Ids(&ids.to_device(dev)))?;
        let mut x = x0.detach().set_requires_grad(true);
        let mut layers: Vec<LayerState> = Vec::with_capacity(nl);
        for l in 0..nl {
            let rec = self.cfg.recompute;
            let (q, k, v) = if rec {
                tch::no_grad(|| self.model.pre_attention(l, &x, &self.rope))
            } else {
                self.model.pre_attention(l, &x, &self.rope)
            };
            sync(dev, prof);
            let ta = Instant::now();
            let (o, ctx) = self.attn.forward(
                &q.detach().contiguous(),
                &k.detach().contiguous(),
                &v.detach().contiguous(),
            )?;
            sync(dev, prof);
            attn_s += ta.elapsed().as_secs_f64();
            let a = o.detach().set_requires_grad(true);
            let y = if rec {
                tch::no_grad(|| self.model.post_attention(l, &x, &a))
            } else {
                self.model.post_attention(l, &x, &a)
            };
            let next = y.detach().set_requires_grad(true);
            layers.push(LayerState {
                x_in: x,
                qkv: (!rec).then_some((q, k, v)),
                ctx,
                a,
                y: (!rec).then_some(y),
            });
            x = next;
        }
        // Loss over the SP group's active tokens. The tokens are counted first, so that the
        // loss gradient is formed chunk by chunk and the logits of the whole shard are never
        // held (compute-dtype GEMM, softmax in fp32 or wider, LOSS_CHUNK rows at a time).
        let labels = labels.to_device(dev).view([-1]);
        let acc = if self.model.compute == Kind::Double {
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
        let hn = self.model.final_norm(&x);
        let (loss_sum, dhn) = self.chunked_loss(&hn, &labels, acc, 1.0 / total.max(1.0))?;
        let stats = loss_sum.to_kind(red).view([1]);
        sync(dev, prof);
        let tc = Instant::now();
        self.groups.ulysses.all_reduce(&stats)?;
        self.groups.ring.all_reduce(&stats)?;
        sync(dev, prof);
        comm_s += tc.elapsed().as_secs_f64();
        let loss_mean = stats.double_value(&[0]) / total.max(1.0);
        if let Some(s) = vjp_sum(&[(&hn, &dhn)]) {
            s.backward();
        }
        drop(hn);
        // Backward, layer by layer.
        let mut g = x.grad();
        for (l, st) in layers.into_iter().enumerate().rev() {
            let (qkv, y) = match (st.qkv, st.y) {
                (Some(qkv), Some(y)) => (qkv, y),
                _ => {
                    let qkv = self.model.pre_attention(l, &st.x_in, &self.rope);
                    let y = self.model.post_attention(l, &st.x_in, &st.a);
                    (qkv, y)
                }
            };
            if let Some(s) = vjp_sum(&[(&y, &g)]) {
                s.backward();
            }
            drop(y);
            let ga = st.a.grad();
            sync(dev, prof);
            let ta = Instant::now();
            let (dq, dk, dv) = self.attn.backward(&st.ctx, &ga.contiguous())?;
            sync(dev, prof);
            attn_s += ta.elapsed().as_secs_f64();
            let (q, k, v) = qkv;
            if let Some(s) = vjp_sum(&[(&q, &dq), (&k, &dk), (&v, &dv)]) {
                s.backward();
            }
            g = st.x_in.grad();
        }
        if let Some(s) = vjp_sum(&[(&x0, &g)]) {
            s.backward();
        }
        sync(dev, prof);
        let tg = Instant::now();
        let scale = 1.0 / self.groups.dp as f64;
        self.opt.step(self.groups.grad, scale)?;
        sync(dev, prof);
        comm_s += tg.elapsed().as_secs_f64();
        Ok(StepStats {
            loss: loss_mean,
            tokens: total,
            step_s: t0.elapsed().as_secs_f64(),
            attention_s: attn_s,
            grad_sync_s: comm_s,
        })
    }
}

/// Rows of the loss computed at a time.
const LOSS_CHUNK: i64 = 4096;

impl Trainer<'_> {
    /// Cross-entropy of the head over the normed hidden states `hn` (B, S, hidden): returns
    /// the loss summed over the labelled tokens and its gradient with respect to `hn`
    /// scaled by `inv_total`; the head weight's gradient is added to its `.grad()` directly.
    fn chunked_loss(
        &self,
        hn: &Tensor,
        labels: &Tensor,
        acc: Kind,
        inv_total: f64,
    ) -> Result<(Tensor, Tensor)> {
        let _ng = tch::no_grad_guard();
        let compute = self.model.compute;
        let master = self.model.head_weight();
        let w = master.detach().to_kind(compute);
        let mut gw = master.grad();
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
        let mut parts = Vec::new();
        let mut a = 0;
        while a < s {
            let k = LOSS_CHUNK.min(s - a);
            let hc = h2.narrow(0, a, k);
            let y = labels.narrow(0, a, k);
            let valid = y.ne(-100).to_kind(acc).unsqueeze(1);
            let yc = y.clamp_min(0).unsqueeze(1);
            let mut lf = hc.linear::<Tensor>(&w, None).to_kind(acc);
            let lse = lf.logsumexp([1i64].as_slice(), true);
            let picked = lf.gather(1, &yc, false);
            loss += ((&lse - picked) * &valid).sum(acc);
            // d(loss / total) / d logits = (softmax - onehot) * valid / total.
            let _ = lf.f_sub_(&lse)?;
            let _ = lf.f_exp_()?;
            let _ = lf.f_scatter_add_(1, &yc, &Tensor::full([k, 1], -1.0, (acc, dev)))?;
            let _ = lf.f_mul_(&(valid * inv_total))?;
            let dl = lf.to_kind(compute);
            drop(lf);
            parts.push(dl.mm(&w));
            let _ = gw.f_add_(&dl.tr().mm(&hc))?;
            a += k;
        }
        let dhn = Tensor::cat(&parts, 0).view(hsz.as_slice());
        Ok((loss, dhn))
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
