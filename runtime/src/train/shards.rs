//! ZeRO-3 weight handling of the trainer: the parameters are cut into units (the embedding
//! table; each decoder layer; the final norm with the untied head), and each rank keeps
//! 1/N of every unit ([`super::adamw::AdamW::new_zero3`]). A unit's full compute-dtype weights exist only
//! while it is used:
//! - layer l: all-gathered (compute dtype) before its forward, which runs without autograd
//!   graph, and freed after it; all-gathered again before its backward, where the layer
//!   outside attention is recomputed with graph (the graph of a kept forward would hold the
//!   gathered weights until the backward: all layers' weights at once), then its
//!   gradients are reduce-scattered (master dtype) and freed. So one layer's full weights
//!   are live at a time: ZeRO-3 always runs the layers as with [`super::TrainConfig::recompute`]
//!   (the extra cost is the layers' forward outside attention, ~1/3 of their GEMM FLOPs).
//! - the embedding table: gathered once per step for the token lookup and freed right after
//!   (kept until the loss when it is tied to the head); its gradient (the index_put_ of the
//!   token rows, plus the head's when tied) is reduce-scattered at the end of the backward.
//! - the final norm and head: gathered once per step before the loss, freed after it; their
//!   gradient is reduce-scattered right after the loss.
//!
//! Bytes per parameter kept by each rank of a grad group of N (fp32 master, bf16 compute):
//! persistent 16 / N (master 4, gradient 4, AdamW moments 4 + 4, all sharded). Transient,
//! per unit while it is in use: its gathered bf16 weights (2 B per parameter of the unit),
//! the bf16 weight gradients of its backward (2 B) and the fp32 unit gradient handed to the
//! reduce-scatter (4 B): 8 B per parameter of one layer at a time; for the embedding
//! (vocab x hidden) 2 B during the lookup and 4 B for its gradient at the end of the
//! backward; for the head 2 + 4 B during the loss. Compare ZeRO-0: 16 B (+ 2 B of casts
//! per step) and this runtime's ZeRO-1/2: 8 + 8 / N B (full fp32 parameters and gradients).
//!
//! Units follow the parameter order of [`Decoder::param_shapes`], so a rank's shard is its
//! slice of each unit (padded to a multiple of N), concatenated in that order.
use super::Trainer;
use crate::error::{Result, RuntimeError};
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
                "ZeRO-3: parameter {n} is out of the embedding / layers / head order"
            )));
        }
    }
    if out.len() != nl + 2 {
        return Err(RuntimeError::Config(format!(
            "ZeRO-3: {} parameter units for {nl} layers",
            out.len()
        )));
    }
    Ok(out)
}

/// A unit's gathered compute-dtype weights: autograd leaves (views of one flat buffer)
/// by parameter name.
pub(crate) struct Gathered {
    pub unit: usize,
    pub leaves: Vec<(String, Tensor)>,
}

impl Gathered {
    pub fn get(&self, suffix: &str) -> Result<&Tensor> {
        self.leaves
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .map(|(_, t)| t)
            .ok_or_else(|| RuntimeError::Config(format!("ZeRO-3 unit has no {suffix}")))
    }

    /// Offset of the named leaf in the unit's flat vector.
    fn position(&self, suffix: &str) -> Option<usize> {
        self.leaves.iter().position(|(n, _)| n.ends_with(suffix))
    }
}

impl Trainer<'_> {
    /// ZeRO-3: gathers unit `u` in the compute dtype; its leaves require grad when `grad`.
    pub(crate) fn gather(&self, u: usize, grad: bool) -> Result<Gathered> {
        let flat = self
            .opt
            .gather_unit(u, self.model.compute, self.groups.grad)?;
        let views = self.opt.unit_views(u, &flat)?;
        let range = self
            .opt
            .units()
            .and_then(|us| us.get(u))
            .map(|x| x.params.clone())
            .ok_or_else(|| RuntimeError::Config(format!("no ZeRO-3 unit {u}")))?;
        let names = &self.model.named_parameters()[range];
        let leaves = names
            .iter()
            .zip(views)
            .map(|((n, _), v)| (n.clone(), v.detach().set_requires_grad(grad)))
            .collect();
        Ok(Gathered { unit: u, leaves })
    }

    /// ZeRO-3: layer `l`'s weights (gathered, leaves requiring grad when `grad`).
    pub(crate) fn gathered_layer(
        &self,
        l: usize,
        grad: bool,
    ) -> Result<(PreWeights, PostWeights, Gathered)> {
        let g = self.gather(layer_unit(l), grad)?;
        let t = |s: &str| g.get(s).map(Tensor::shallow_clone);
        let bias = match g.position("self_attn.q_proj.bias") {
            Some(_) => Some((
                t("self_attn.q_proj.bias")?,
                t("self_attn.k_proj.bias")?,
                t("self_attn.v_proj.bias")?,
            )),
            None => None,
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
        Ok((pre, post, g))
    }

    /// ZeRO-3: copies the gradients of `g`'s leaves (where defined) into `flat` (the unit's
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

    /// ZeRO-3: reduce-scatters `flat`, unit `u`'s gradient, into this rank's slice.
    pub(crate) fn reduce(&self, u: usize, flat: &Tensor) -> Result<()> {
        self.opt.reduce_unit_grad(u, flat, self.groups.grad)
    }

    /// Every parameter, full, in the master dtype, by name (copies). With ZeRO-3 each unit
    /// is all-gathered over the grad group: every rank of it must call this.
    pub fn full_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let Some(units) = self.opt.units() else {
            return Ok(self
                .model
                .named_parameters()
                .iter()
                .map(|(n, p)| (n.clone(), p.detach().copy()))
                .collect());
        };
        let master = self.opt.params_flat().kind();
        let mut out = Vec::with_capacity(self.model.named_parameters().len());
        for (u, unit) in units.iter().enumerate() {
            let flat = self.opt.gather_unit(u, master, self.groups.grad)?;
            let views = self.opt.unit_views(u, &flat)?;
            for ((n, _), v) in self.model.named_parameters()[unit.params.clone()]
                .iter()
                .zip(views)
            {
                out.push((n.clone(), v.copy()));
            }
        }
        Ok(out)
    }
}
