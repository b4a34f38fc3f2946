//! Sharded model states of the trainer (ZeRO-1, 2 and 3): the parameters are cut into units
//! (the embedding table; each decoder layer; the final norm with the untied head) and each
//! rank of the grad group (SP x DP, N ranks) keeps 1/N of every unit's fp32 master, gradient
//! and AdamW moments ([`super::adamw::AdamW::new_sharded`]). What differs by stage is where a
//! unit's compute-dtype (bf16) weights and its full gradient live:
//!
//! | stage | bf16 weights | full fp32 gradient | B per parameter kept (fp32 master) |
//! |---|---|---|---|
//! | 1 | resident, whole ([`Resident`]), all-gathered after each update | whole, persistent | 2 + 4 + 12/N (Megatron-Core's distributed optimizer: 6 + 12/d) |
//! | 2 | resident, whole | per unit, only while its reduce-scatter is in flight | 2 + 16/N |
//! | 3 | gathered per use (FSDP), freed after it | as stage 2 | 16/N |
//!
//! ZeRO-3 without recompute (Zhao et al. 2023, PyTorch FSDP, Sec. 3.2-3.3): layer l's weights
//! are all-gathered before its forward, which keeps its autograd graph; right after the
//! forward the storage behind the gathered flat vector is released (`ffi::storage_resize` to
//! 0), so the graph's saved references to the weights hold no memory; before the layer's
//! backward the same storage is re-allocated and all-gathered into again, and the backward
//! reads the re-gathered weights through the saved references. With recompute (outside
//! attention) the forward runs without graph and the backward gathers afresh.
//!
//! Prefetch window: the gather of the next layer (l + 1 in forward, l - 1 in backward) is
//! issued on the grad group's communication stream as soon as layer l's weights are ready,
//! so it runs while layer l computes; at most **two layers' gathered weights** are alive at
//! once. Each layer's gradient reduce-scatter is issued right after its backward and
//! finished after the next layer's backward, so at most two units' fp32 gradient vectors are
//! in flight. The embedding table is gathered for the lookup only (until the loss when tied
//! to the head); the final norm and head for the loss.
//!
//! Units follow the parameter order of [`Decoder::param_shapes`], so a rank's shard is its
//! slice of each unit (padded to a multiple of N), concatenated in that order.
use super::adamw::PendingGather;
use super::Trainer;
use crate::error::{Result, RuntimeError};
use crate::ffi::{storage_resize, tensor_version};
use crate::model::decoder::{PostWeights, PreWeights};
use crate::model::Decoder;
use std::ops::Range;
use tch::Tensor;

/// Index of the embedding unit.
pub(crate) const EMBED_UNIT: usize = 0;

/// Index of layer `l`'s unit.
pub(crate) fn layer_unit(l: usize) -> usize {
    l + 1
}

/// Index of the final unit (final norm, and the head when untied).
pub(crate) fn final_unit(num_layers: usize) -> usize {
    num_layers + 1
}

/// The unit ranges over `model`'s parameters: [embedding], [layer 0], ..., [final norm,
/// head]. Errors if the parameters are not in that order.
pub(crate) fn units(model: &Decoder) -> Result<Vec<Range<usize>>> {
    let names: Vec<&str> = model
        .named_parameters()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    let nl = model.cfg.num_layers;
    let key = |n: &str| -> usize {
        if n == "model.embed_tokens.weight" {
            EMBED_UNIT
        } else if let Some(rest) = n.strip_prefix("model.layers.") {
            rest.split('.')
                .next()
                .and_then(|l| l.parse::<usize>().ok())
                .map_or(usize::MAX, layer_unit)
        } else {
            final_unit(nl)
        }
    };
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let k = key(n);
        if k == out.len() {
            out.push(i..i + 1);
        } else if k + 1 == out.len() {
            out[k].end = i + 1;
        } else {
            return Err(RuntimeError::Config(format!(
                "sharded states: parameter {n} is out of the embedding / layers / head order"
            )));
        }
    }
    if out.len() != nl + 2 {
        return Err(RuntimeError::Config(format!(
            "sharded states: {} parameter units for {nl} layers",
            out.len()
        )));
    }
    Ok(out)
}

/// ZeRO-1/2: every unit's bf16 (compute-dtype) weights, whole, refreshed from the updated
/// master slices by one all-gather per unit after each optimizer step.
pub(crate) struct Resident(pub Vec<Tensor>);

/// A unit's compute-dtype weights as autograd leaves (views of one flat vector), by name.
pub(crate) struct Gathered {
    pub unit: usize,
    /// The flat vector the leaves view (its storage is what [`Gathered::release`] frees).
    flat: Tensor,
    pub leaves: Vec<(String, Tensor)>,
}

impl Gathered {
    pub fn get(&self, suffix: &str) -> Result<&Tensor> {
        self.leaves
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .map(|(_, t)| t)
            .ok_or_else(|| RuntimeError::Config(format!("sharded unit has no {suffix}")))
    }

    /// Frees the memory of the gathered weights; the leaves (and the autograd graph's
    /// references to them) stay, without storage, until [`Trainer::refill_start`].
    pub fn release(&self) -> Result<()> {
        storage_resize(&self.flat, 0)
    }

    /// The flat vector (for tests: its storage size tells whether the weights are held).
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// Layer weights (pre- and post-attention) from a layer unit's leaves.
    pub fn layer_weights(&self) -> Result<(PreWeights, PostWeights)> {
        let t = |s: &str| self.get(s).map(Tensor::shallow_clone);
        let bias = match self.get("self_attn.q_proj.bias") {
            Ok(_) => Some((
                t("self_attn.q_proj.bias")?,
                t("self_attn.k_proj.bias")?,
                t("self_attn.v_proj.bias")?,
            )),
            Err(_) => None,
        };
        let pre = PreWeights {
            norm: t("input_layernorm.weight")?,
            q: t("self_attn.q_proj.weight")?,
            k: t("self_attn.k_proj.weight")?,
            v: t("self_attn.v_proj.weight")?,
            bias,
        };
        let post = PostWeights {
            o: t("self_attn.o_proj.weight")?,
            norm: t("post_attention_layernorm.weight")?,
            gate: t("mlp.gate_proj.weight")?,
            up: t("mlp.up_proj.weight")?,
            down: t("mlp.down_proj.weight")?,
        };
        Ok((pre, post))
    }
}

/// A unit's weights on their way: resident (ZeRO-1/2) or an all-gather in flight (ZeRO-3).
pub(crate) enum Fetch {
    Ready(usize, Tensor),
    Pending(usize, PendingGather),
}

impl Trainer<'_> {
    /// Whether the model states are sharded in units (ZeRO-1/2/3).
    pub(crate) fn sharded(&self) -> bool {
        self.opt.units().is_some()
    }

    /// Whether units are gathered per use (ZeRO-3) rather than resident (ZeRO-1/2).
    pub(crate) fn per_use(&self) -> bool {
        self.sharded() && self.resident.is_none()
    }

    /// Starts fetching unit `u`'s compute-dtype weights (a collective over the grad group for
    /// ZeRO-3: every rank calls it in the same order).
    pub(crate) fn fetch_start(&self, u: usize) -> Result<Fetch> {
        if let Some(r) = &self.resident {
            let flat = r
                .0
                .get(u)
                .ok_or_else(|| RuntimeError::Config(format!("no resident weights of unit {u}")))?;
            return Ok(Fetch::Ready(u, flat.shallow_clone()));
        }
        let p = self
            .opt
            .gather_unit_start(u, self.model.compute, self.groups.grad, None)?;
        Ok(Fetch::Pending(u, p))
    }

    /// Waits for a fetch; the leaves require grad when `grad`.
    pub(crate) fn fetch_finish(&self, f: Fetch, grad: bool) -> Result<Gathered> {
        let (u, flat) = match f {
            Fetch::Ready(u, flat) => (u, flat),
            Fetch::Pending(u, p) => (u, p.wait()?),
        };
        let views = self.opt.unit_views(u, &flat)?;
        let range = self
            .opt
            .units()
            .and_then(|us| us.get(u))
            .map(|x| x.params.clone())
            .ok_or_else(|| RuntimeError::Config(format!("no sharded unit {u}")))?;
        let names = &self.model.named_parameters()[range];
        let leaves = names
            .iter()
            .zip(views)
            .map(|((n, _), v)| (n.clone(), v.detach().set_requires_grad(grad)))
            .collect();
        Ok(Gathered {
            unit: u,
            flat,
            leaves,
        })
    }

    /// Unit `u`'s weights, fetched and waited for.
    pub(crate) fn gather(&self, u: usize, grad: bool) -> Result<Gathered> {
        let f = self.fetch_start(u)?;
        self.fetch_finish(f, grad)
    }

    /// ZeRO-3: re-allocates the storage of `g` (released after its forward) and issues the
    /// all-gather into it; wait for the result before the backward reads the leaves.
    pub(crate) fn refill_start(&self, g: &Gathered) -> Result<PendingGather> {
        let bytes = g.flat.numel() as i64 * g.flat.kind().elt_size_in_bytes() as i64;
        storage_resize(&g.flat, bytes)?;
        let version = tensor_version(&g.flat)?;
        let p = self.opt.gather_unit_start(
            g.unit,
            self.model.compute,
            self.groups.grad,
            Some(g.flat.shallow_clone()),
        )?;
        Ok(p.restoring_version(version))
    }

    /// ZeRO-1/2: the resident weights of every unit, gathered from the master slices (after
    /// construction, each optimizer step and a checkpoint load). A collective over the grad
    /// group.
    pub(crate) fn refresh_resident(&mut self) -> Result<()> {
        if self.resident.is_none() {
            return Ok(());
        }
        let n = self.opt.units().map_or(0, <[_]>::len);
        let mut all = Vec::with_capacity(n);
        for u in 0..n {
            let into = self
                .resident
                .as_ref()
                .and_then(|r| r.0.get(u))
                .map(Tensor::shallow_clone);
            let p = self
                .opt
                .gather_unit_start(u, self.model.compute, self.groups.grad, into)?;
            all.push(p);
        }
        let flats = all
            .into_iter()
            .map(PendingGather::wait)
            .collect::<Result<Vec<_>>>()?;
        self.resident = Some(Resident(flats));
        Ok(())
    }

    /// Copies the gradients of `g`'s leaves (where defined) into `flat` (the unit's
    /// master-dtype gradient, [`super::adamw::AdamW::new_unit_grad`]).
    pub(crate) fn collect_grads(&self, g: &Gathered, flat: &Tensor) -> Result<()> {
        let _ng = tch::no_grad_guard();
        let views = self.opt.unit_views(g.unit, flat)?;
        for ((_, leaf), mut dst) in g.leaves.iter().zip(views) {
            let gr = leaf.grad();
            if gr.defined() {
                let _ = dst.f_add_(&gr.to_kind(dst.kind()))?;
            }
        }
        Ok(())
    }

    /// Reduce-scatters `flat`, unit `u`'s gradient, into this rank's slice (waited for).
    pub(crate) fn reduce(&self, u: usize, flat: Tensor) -> Result<()> {
        self.opt.reduce_unit_grad(u, flat, self.groups.grad)
    }

    /// Every parameter, full, in the master dtype, by name (copies). Sharded: each unit is
    /// all-gathered over the grad group, so every rank of it must call this.
    pub fn full_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.model.named_parameters().len());
        self.visit_full_parameters(&mut |n, t| {
            out.push((n.to_string(), t.copy()));
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with every parameter, full, in the master dtype, in order: sharded, one unit
    /// is gathered at a time (at most one unit whole on the device), so every rank of the
    /// grad group must call this. The tensors are views valid during the call.
    pub fn visit_full_parameters(
        &self,
        f: &mut dyn FnMut(&str, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let _g = tch::no_grad_guard();
        let Some(units) = self.opt.units() else {
            for (n, p) in self.model.named_parameters() {
                f(n, &p.detach())?;
            }
            return Ok(());
        };
        let master = self.opt.params_flat().kind();
        for (u, unit) in units.iter().enumerate() {
            let flat = self.opt.gather_unit(u, master, self.groups.grad)?;
            let views = self.opt.unit_views(u, &flat)?;
            for ((n, _), v) in self.model.named_parameters()[unit.params.clone()]
                .iter()
                .zip(views)
            {
                f(n, &v)?;
            }
        }
        Ok(())
    }
}
