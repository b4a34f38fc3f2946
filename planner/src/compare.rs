//! Strategy comparison and simulator refinement: the best configuration of each strategy
//! (ring, ulysses, 2d, megatron-cp-tp, te-a2a-p2p) on the same cost model and topology, its
//! simulated step time, memory, max context, and the main reason it loses to `2d`. Every
//! strategy is costed as mmsp-runtime would run its layout, recompute included: none or the
//! runtime's recompute of each layer outside attention (`crate::search::enumerate`), not the
//! selective or whole-layer recompute that Megatron-LM or DeepSpeed offer. 2d, ring and
//! ulysses search every ZeRO stage of mmsp-runtime; megatron-cp-tp and te-a2a-p2p run with
//! Megatron-Core's distributed optimizer, the runtime's ZeRO-1 rule (6 + 12/d bytes per
//! parameter over their DP x CP ranks, `crate::cost::memory::runtime_model_states`).

use serde::Serialize;

use crate::cost::{terms, Candidate, Layout, Recompute, Workload};
use crate::multimodal::MultiModal;
use crate::search::{self, why_slower_by, Request, Scored, SearchResult, Strategy};
use crate::sim::simulate;
use crate::spec::model::ModelSpec;
use crate::topology::Topology;

/// How many layouts (the analytically best candidate of each) the simulator re-ranks.
pub const REFINE_TOP: usize = 5;

/// Simulates the best few distinct candidates and returns them ordered by simulated step
/// time, each with its simulated time.
pub fn refine(
    topo: &Topology,
    model: &ModelSpec,
    result: &SearchResult,
    context: u64,
    mm: Option<&MultiModal>,
) -> Vec<(Scored, f64)> {
    // With samples, each candidate at its layout's padded context.
    // The analytically best candidate of each of the first few distinct layouts: near-ties
    // of one layout (ZeRO stage, micro-batch) would otherwise crowd out the alternatives.
    let mut layouts = Vec::new();
    let firsts: Vec<&Scored> = result
        .ranked
        .iter()
        .filter(|s| {
            let new = !layouts.contains(&s.candidate.layout);
            if new {
                layouts.push(s.candidate.layout);
            }
            new
        })
        .take(REFINE_TOP)
        .collect();
    let mut out: Vec<(Scored, f64)> = firsts
        .into_iter()
        .filter_map(|s| {
            let c = &s.candidate;
            let context = search::candidate_context(context, mm, &c.layout);
            let vision = match mm {
                Some(mm) => Some(mm.stage(topo, model, &c.layout, context).ok()?),
                None => None,
            };
            let w = Workload {
                model,
                context,
                global_batch: result.global_batch,
                vision,
            };
            let t = terms(topo, &w, c).ok()?;
            // A step the simulator cannot complete is not a candidate.
            Some((s.clone(), simulate(topo, &t, true).ok()?.step_time_s))
        })
        .collect();
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// One strategy's row in a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyRow {
    pub name: String,
    pub feasible: bool,
    /// Simulated step time of its best configuration (seconds); absent when infeasible.
    pub step_time_s: Option<f64>,
    pub analytic_step_time_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    pub hfu: Option<f64>,
    /// This strategy's step time over 2d's: how many times faster 2d is.
    pub speedup_of_2d: Option<f64>,
    pub layout: Option<Layout>,
    pub zero_stage: Option<u8>,
    pub recompute: Option<Recompute>,
    pub micro_batch: Option<u32>,
    pub memory_per_gpu_bytes: Option<f64>,
    pub max_context_tokens: Option<u64>,
    /// Why it loses to 2d (or why it is infeasible).
    pub why: String,
}

/// The comparison of all strategies for one request.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub model: String,
    pub topology: String,
    pub gpus: u32,
    pub context_tokens: u64,
    pub global_batch: u64,
    pub strategies: Vec<StrategyRow>,
}

/// A strategy's best (simulated) configuration or why it has none, and its max context.
type Outcome = (Strategy, Result<(Scored, f64), String>, Option<u64>);

/// Runs every strategy on the same model, topology and request.
/// With `mm`, every strategy plans the same multi-modal samples (both MM-SP stages costed).
pub fn compare(
    topo: &Topology,
    model: &ModelSpec,
    base: &Request,
    mm: Option<&MultiModal>,
) -> Comparison {
    // First the best (simulated) configuration of each strategy, then the rows against 2d.
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut global_batch = 0;
    for strategy in Strategy::ALL {
        let req = Request {
            strategy,
            ..base.clone()
        };
        let res = search::search(topo, model, &req, mm);
        global_batch = res.global_batch;
        let one = Request {
            global_batch: Some(1),
            ..req.clone()
        };
        // A plain-text maximum is not comparable with packed multi-modal samples.
        let max_ctx = match mm {
            Some(_) => None,
            None => search::max_context(topo, model, &one).map(|x| x.0),
        };
        let best = refine(topo, model, &res, req.context, mm)
            .into_iter()
            .next()
            .ok_or_else(|| {
                let e = search::no_plan_error_for(topo, model, &req, &res, mm).to_string();
                e.split_once(": ").map_or(e.clone(), |x| x.1.to_string())
            });
        outcomes.push((strategy, best, max_ctx));
    }
    let reference = outcomes
        .iter()
        .find(|o| o.0 == Strategy::TwoD)
        .and_then(|o| o.1.as_ref().ok())
        .cloned();
    let strategies = outcomes
        .into_iter()
        .map(|(strategy, best, max_context_tokens)| match best {
            Err(why) => StrategyRow {
                name: strategy.name().into(),
                feasible: false,
                step_time_s: None,
                analytic_step_time_s: None,
                tokens_per_s: None,
                mfu: None,
                hfu: None,
                speedup_of_2d: None,
                layout: None,
                zero_stage: None,
                recompute: None,
                micro_batch: None,
                memory_per_gpu_bytes: None,
                max_context_tokens,
                why,
            },
            Ok((best, sim)) => {
                let e = &best.estimate;
                let (speedup_of_2d, why) = match &reference {
                    None => (None, "2d has no feasible plan".to_string()),
                    Some(_) if strategy == Strategy::TwoD => (Some(1.0), "reference".to_string()),
                    Some((b2d, sim2d)) => {
                        let why = if sim > sim2d * 1.005 {
                            why_slower_by(topo, b2d, &best, Some(sim / sim2d - 1.0))
                        } else if sim < sim2d * 0.995 {
                            "faster than 2d here".to_string()
                        } else {
                            "ties with 2d (within 0.5%)".to_string()
                        };
                        (Some(sim / sim2d), why)
                    }
                };
                StrategyRow {
                    name: strategy.name().into(),
                    feasible: true,
                    step_time_s: Some(sim),
                    analytic_step_time_s: Some(e.step_time_s),
                    tokens_per_s: Some(e.tokens_per_s * e.step_time_s / sim),
                    mfu: Some(e.mfu * e.step_time_s / sim),
                    hfu: Some(e.hfu * e.step_time_s / sim),
                    speedup_of_2d,
                    layout: Some(best.candidate.layout),
                    zero_stage: Some(best.candidate.zero_stage),
                    recompute: Some(best.candidate.recompute),
                    micro_batch: Some(best.candidate.micro_batch),
                    memory_per_gpu_bytes: Some(e.memory_per_gpu_bytes),
                    max_context_tokens,
                    why,
                }
            }
        })
        .collect();
    Comparison {
        model: model.name.clone(),
        topology: topo.spec.name.clone(),
        gpus: base.gpus,
        context_tokens: base.context,
        global_batch,
        strategies,
    }
}

/// The Chrome trace of each feasible strategy's best configuration, by strategy name.
pub fn traces(
    topo: &Topology,
    model: &ModelSpec,
    cmp: &Comparison,
    mm: Option<&MultiModal>,
) -> Vec<(String, serde_json::Value)> {
    cmp.strategies
        .iter()
        .filter_map(|row| {
            let c = Candidate {
                layout: row.layout?,
                zero_stage: row.zero_stage?,
                recompute: row.recompute?,
                micro_batch: row.micro_batch?,
            };
            let context = search::candidate_context(cmp.context_tokens, mm, &c.layout);
            let vision = match mm {
                Some(mm) => Some(mm.stage(topo, model, &c.layout, context).ok()?),
                None => None,
            };
            let w = Workload {
                model,
                context,
                global_batch: cmp.global_batch,
                vision,
            };
            let t = terms(topo, &w, &c).ok()?;
            let sim = simulate(topo, &t, true).ok()?;
            Some((
                row.name.clone(),
                crate::sim::trace::chrome_trace(&sim, &row.name),
            ))
        })
        .collect()
}

/// A plan candidate's inputs rebuilt from a plan (for `mmsp simulate`).
pub fn candidate_of(plan: &crate::plan::Plan) -> Candidate {
    Candidate {
        layout: plan.layout,
        zero_stage: plan.zero_stage,
        recompute: plan.recompute_policy(),
        micro_batch: plan.micro_batch,
    }
}
