//! The planning pipeline that `mmsp plan` and `mmsp campaign` share, so that both choose the
//! same plan for the same request: the search, the simulator's re-ranking of the analytically
//! best few layouts ([`crate::compare::refine`]), the plan built for the chosen candidate (at
//! its layout's padded context when samples are packed), its simulated step time, and the
//! MM-SP sections attached.
use crate::error::Result;
use crate::multimodal::MultiModal;
use crate::plan::Plan;
use crate::search::{self, Request, Scored, SearchResult};
use crate::spec::model::ModelSpec;
use crate::topology::Topology;

/// A planned request: the plan, the search it came from and the candidate chosen.
pub struct Planned {
    pub plan: Plan,
    pub result: SearchResult,
    pub best: Scored,
}

/// Plans a training request on `topo` (named `topology` in the plan). A batch of more
/// sequences than the search plans is refused ([`search::check_batch`]); no feasible candidate
/// is [`crate::Error::NoFeasiblePlan`] naming why and the nearest alternative.
pub fn plan_training(
    topo: &Topology,
    topology: &str,
    model: &ModelSpec,
    req: &Request,
    mm: Option<&MultiModal>,
) -> Result<Planned> {
    search::check_batch(req)?;
    let result = search::search(topo, model, req, mm);
    let Some(analytic_best) = result.best() else {
        return Err(search::no_plan_error_for(topo, model, req, &result, mm));
    };
    // The simulator re-ranks the analytically best few candidates.
    let refined = crate::compare::refine(topo, model, &result, req.context, mm);
    let (best, simulated) = match refined.into_iter().next() {
        Some((s, t)) => (s, Some(t)),
        None => (analytic_best.clone(), None),
    };
    let context = search::candidate_context(req.context, mm, &best.candidate.layout);
    let mut plan = crate::plan::build(topo, topology, model, context, result.global_batch, &best)?;
    if let Some(p) = plan.predicted.as_mut() {
        p.simulated_step_time_s = simulated;
    }
    if mm.is_none() {
        plan.padding_tokens = context - req.context;
    }
    if let Some(mm) = mm {
        mm.attach(&mut plan, topo, model, &best.candidate)?;
    }
    Ok(Planned { plan, result, best })
}
