//! Fitting a plan to an engine: re-costing the recompute an engine offers in place of the
//! plan's, and re-planning within an engine's layout constraints, so that an export runs what
//! the engine can run and says what it costs instead of refusing.
//!
//! Both use the planner's own cost model ([`crate::cost::terms`], [`crate::cost::compose`]) on
//! the plan's workload: its model, topology, context, global batch and, for video plans, the
//! vision stage the plan holds (re-planning rebuilds the multi-modal input from the plan's
//! samples and searches again).

use crate::cost::memory::FRAGMENTATION;
use crate::cost::{compose, terms, Candidate, Estimate, Recompute, Terms, Workload};
use crate::error::{Error, Result};
use crate::multimodal::MultiModal;
use crate::plan::Plan;
use crate::search::{self, Request, Scored, Strategy};
use crate::spec::cluster::ClusterSpec;
use crate::spec::samples::Sample;
use crate::spec::vision::VisionSpec;
use crate::topology::Topology;

/// The recompute an engine runs in place of the plan's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineRecompute {
    /// Whole-layer recompute: each layer's input kept, the layer (attention included) run again
    /// in backward (Megatron `--recompute-granularity full`, DeepSpeed / Hugging Face gradient
    /// checkpointing).
    WholeLayer,
    /// Megatron-LM's selective recompute of the norms and the MLP
    /// (`--recompute-modules layernorm mlp`): attention and the QKV and output projections are
    /// not run again; the residual stream between attention and the MLP is kept.
    NormsAndMlp,
}

/// A plan and its analytic estimate on its own topology.
pub struct Costed {
    pub topo: Topology,
    pub terms: Terms,
    pub estimate: Estimate,
}

/// The topology of a plan (its cluster at its world size).
pub fn topology(plan: &Plan) -> Result<Topology> {
    let cluster = ClusterSpec::load(&plan.topology)?;
    Ok(Topology::build(&cluster, plan.world_size))
}

/// Re-costs the plan's own candidate with the planner's cost model.
pub fn cost_plan(plan: &Plan) -> Result<Costed> {
    let topo = topology(plan)?;
    let w = Workload {
        model: &plan.model,
        context: plan.context_tokens,
        global_batch: plan.global_batch,
        vision: plan.vision.as_ref().map(|v| v.stage),
    };
    let c = Candidate {
        layout: plan.layout,
        zero_stage: plan.zero_stage,
        recompute: plan.recompute_policy(),
        micro_batch: plan.micro_batch,
    };
    let t = terms(&topo, &w, &c).map_err(|e| {
        Error::invalid(
            "plan",
            format!("its own candidate does not cost on {}: {e}", plan.topology),
        )
    })?;
    let estimate = compose(&topo, &t);
    Ok(Costed {
        topo,
        terms: t,
        estimate,
    })
}

/// Step time (s) of the plan run with the engine's `rc` instead of mmsp-runtime's recompute
/// outside attention (which the plan is costed with), or `None` when it does not fit memory.
///
/// Whole-layer recompute adds, per layer and micro-batch, the attention forward with its
/// Ulysses all-to-alls and the exposed part of its ring transfers (Korthikanti et al. 2022,
/// Sec. 4.1: full recompute is one more forward pass); it keeps less than the plan, so it fits
/// where the plan fits. Megatron's norms-and-MLP recompute does not re-run the QKV and output
/// projections, which the runtime's does (their share of the layer's forward GEMMs is saved),
/// and keeps the 16-bit residual between attention and the MLP (2 x h bytes per token and
/// layer, sharded by TP) that the runtime recomputes (Megatron-LM
/// `megatron/core/transformer/transformer_layer.py`: the layernorms are checkpointed without
/// their output, the MLP is checkpointed from its input).
pub fn engine_recompute_step(c: &Costed, rc: EngineRecompute) -> Option<f64> {
    let t = &c.terms;
    let l = &t.layout;
    let per_micro = t.layers as f64 * t.accum as f64;
    match rc {
        EngineRecompute::WholeLayer => {
            let uly = l.ulysses_family();
            let a2a =
                c.topo.all_to_all(uly, t.a2a_qkv_bytes) + c.topo.all_to_all(uly, t.a2a_o_bytes);
            let ring = if l.ring > 1 {
                let r = f64::from(l.ring);
                let c_fwd = c.topo.ring_p2p(l.ring_family(), t.ring_kv_bytes);
                (r - 1.0) * (c_fwd - t.attn_fwd_s / r).max(0.0)
            } else {
                0.0
            };
            // The plan is costed with the runtime's recompute (GEMMs and memory-bound work run
            // again) or none (then they run again here as well).
            let outside = if t.recompute == Recompute::None {
                t.gemm_fwd_s + t.elem_fwd_s
            } else {
                0.0
            };
            Some(c.estimate.step_time_s + per_micro * (outside + t.attn_fwd_s + a2a + ring))
        }
        EngineRecompute::NormsAndMlp => {
            // `tp_bytes` is one rank's tokens x h x 2 bytes: the 16-bit residual of one layer,
            // which tensor + sequence parallelism shards `tp` ways.
            let extra = t.layers as f64 * t.tp_bytes / f64::from(l.tp) * (1.0 + FRAGMENTATION);
            if t.memory.total_bytes + extra > c.topo.spec.hbm_bytes {
                return None;
            }
            let saved = per_micro * (t.qkv_share + t.o_share) * t.gemm_fwd_s;
            Some(c.estimate.step_time_s - saved)
        }
    }
}

/// A plan re-planned within an engine's constraints.
pub struct Replanned {
    pub plan: Plan,
    /// Analytic step times (s) of the original plan and of the re-planned one.
    pub before_s: f64,
    pub after_s: f64,
}

/// The multi-modal input of a video plan, rebuilt from its samples (native resolution, the
/// encoder by its preset name), or `None` for a text plan.
fn multimodal(plan: &Plan) -> Result<Option<MultiModal>> {
    let Some(v) = &plan.vision else {
        return Ok(None);
    };
    let (Some(frames), Some(text)) = (&v.frames_per_sample, &v.text_tokens_per_sample) else {
        return Err(Error::invalid(
            "plan",
            "its vision section has no frames_per_sample / text_tokens_per_sample (a plan of an older planner): re-plan it with this mmsp to export it",
        ));
    };
    let samples = frames
        .iter()
        .zip(text)
        .map(|(&f, &t)| Sample::uniform(f, t))
        .collect();
    let spec = VisionSpec::load(&v.encoder)?;
    Ok(Some(MultiModal::new(spec, samples, v.train_vision)?))
}

/// Searches the plan's request again (same model, GPUs, context or samples, global batch)
/// over `strategies`, keeps the candidates `accept` takes, and builds the fastest as a plan;
/// `None` when no candidate is accepted. Candidates are ranked analytically (the simulator's
/// re-ranking of `mmsp plan` is not run here).
pub fn replan(
    plan: &Plan,
    strategies: &[Strategy],
    accept: &dyn Fn(&Candidate) -> bool,
) -> Result<Option<Replanned>> {
    let before_s = cost_plan(plan)?.estimate.step_time_s;
    let topo = topology(plan)?;
    let mm = multimodal(plan)?;
    let context = match &mm {
        Some(m) => m.padded_context(plan.world_size),
        None => plan.context_tokens - plan.padding_tokens,
    };
    let mut best: Option<Scored> = None;
    for &strategy in strategies {
        let req = Request {
            gpus: plan.world_size,
            context,
            global_batch: Some(plan.global_batch),
            recompute: None,
            strategy,
            pin: None,
            zero: None,
        };
        let found = search::search(&topo, &plan.model, &req, mm.as_ref())
            .ranked
            .into_iter()
            .find(|s| accept(&s.candidate));
        if let Some(s) = found {
            if best
                .as_ref()
                .is_none_or(|b| s.estimate.step_time_s < b.estimate.step_time_s)
            {
                best = Some(s);
            }
        }
    }
    let Some(best) = best else {
        return Ok(None);
    };
    let ctx = search::candidate_context(context, mm.as_ref(), &best.candidate.layout);
    let mut p = crate::plan::build(
        &topo,
        &plan.topology,
        &plan.model,
        ctx,
        plan.global_batch,
        &best,
    )?;
    match &mm {
        Some(m) => m.attach(&mut p, &topo, &plan.model, &best.candidate)?,
        None => p.padding_tokens = ctx - context,
    }
    Ok(Some(Replanned {
        plan: p,
        before_s,
        after_s: best.estimate.step_time_s,
    }))
}
