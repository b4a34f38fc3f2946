//! The planner's side of the plan contract ([`mmsp_plan`], the crate both halves share): it
//! turns a scored candidate into a [`Plan`] ([`build`]) and reads the plans its commands take
//! ([`load_training`]). The plan's fields, their checks and the mesh and token arithmetic live
//! in the contract crate; a plan that recomputes writes `"recompute": "full"` with
//! `"recompute_scope": "outside_attention"` (see [`mmsp_plan::plan`]).

pub use mmsp_plan::plan::{
    Groups, Mode, Plan, RankInfo, RecomputeScope, TokenPlan, SCHEMA_NAME, SCHEMA_VERSION,
};
pub use mmsp_plan::predicted::{headroom_warning, Predicted, HEADROOM_WARNING};

use crate::cost::{runtime_recompute, Recompute, Scored};
use crate::error::Result;
use crate::spec::model::ModelSpec;
use crate::topology::Topology;

/// The plan of a scored candidate: the contract's skeleton of its layout, with what the search
/// chose and the estimate's prediction.
pub fn build(
    topo: &Topology,
    topology_arg: &str,
    model: &ModelSpec,
    context: u64,
    global_batch: u64,
    scored: &Scored,
) -> Result<Plan> {
    let c = &scored.candidate;
    let e = &scored.estimate;
    let mut plan = Plan::skeleton(
        model.clone(),
        c.layout,
        topo.spec.gpus_per_node,
        context,
        global_batch,
    )?;
    let world = c.layout.world();
    plan.generator = format!("mmsp {}", env!("CARGO_PKG_VERSION"));
    plan.topology = topology_arg.into();
    plan.micro_batch = c.micro_batch;
    plan.grad_accum_steps = e.grad_accum_steps;
    plan.zero_stage = c.zero_stage;
    // What the runtime runs, as the estimate costed it (`crate::cost::terms`).
    (plan.recompute, plan.recompute_scope) = match runtime_recompute(c.recompute) {
        Recompute::OutsideAttention => (Recompute::Full, Some(RecomputeScope::OutsideAttention)),
        other => (other, None),
    };
    plan.predicted = Some(Predicted {
        step_time_s: e.step_time_s,
        tokens_per_s: e.tokens_per_s,
        mfu: e.mfu,
        hfu: e.hfu,
        memory_per_gpu_bytes: e.memory_per_gpu_bytes,
        memory: e.memory.clone(),
        time: e.time.clone(),
        comm_exposed_s: e.comm_exposed_s,
        comm_overlapped_s: e.comm_overlapped_s,
        simulated_step_time_s: None,
        params: model.params(),
        active_params: model.moe.as_ref().map(|_| model.active_params()),
        tokens_per_s_per_gpu: e.tokens_per_s / f64::from(world),
        model_tflops_per_gpu: e.model_flops / e.step_time_s / f64::from(world) / 1e12,
        memory_headroom: 1.0 - e.memory_per_gpu_bytes / topo.spec.hbm_bytes,
        warnings: headroom_warning(e.memory_per_gpu_bytes, topo.spec.hbm_bytes)
            .into_iter()
            .collect(),
    });
    Ok(plan)
}

/// Reads and checks a training plan file (the contract's [`Plan::load`]; an inference plan is
/// refused by name).
pub fn load_training(path: &str) -> Result<Plan> {
    let plan = Plan::load(path)?;
    plan.expect_mode(Mode::Training, path)?;
    Ok(plan)
}

/// [`load_training`] of a text; `path` names it in messages.
pub fn training_from_json(text: &str, path: &str) -> Result<Plan> {
    let plan = Plan::from_json(text, path)?;
    plan.expect_mode(Mode::Training, path)?;
    Ok(plan)
}

/// The plan's prediction, which every plan the planner wrote has; a plan made without one is
/// refused by name where a command needs it.
pub fn predicted<'a>(plan: &'a Plan, path: &str) -> Result<&'a Predicted> {
    plan.predicted.as_ref().ok_or_else(|| crate::Error::Parse {
        path: path.into(),
        msg: "the plan has no \"predicted\" section (make it with `mmsp plan`)".into(),
    })
}

/// A plan candidate's inputs rebuilt from a plan (for `mmsp simulate`).
pub fn candidate_of(plan: &Plan) -> crate::cost::Candidate {
    crate::cost::Candidate {
        layout: plan.layout,
        zero_stage: plan.zero_stage,
        recompute: plan.recompute_policy(),
        micro_batch: plan.micro_batch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{evaluate, Candidate, Layout, Placement, Workload};
    use crate::spec::cluster::ClusterSpec;
    use crate::units::GIB;

    #[test]
    fn headroom_warning_under_three_percent() {
        let gib = GIB;
        assert!(headroom_warning(77.0 * gib, 80.0 * gib).is_none());
        let w = headroom_warning(78.0 * gib, 80.0 * gib).unwrap();
        assert!(w.contains("2.5%") && w.contains("78.0 of 80.0 GiB"), "{w}");
        assert!(!w.contains('\n'));
    }

    fn plan_for(zero: u8, recompute: Recompute) -> Plan {
        plan_at(zero, recompute, 1 << 16)
    }

    /// A plan of the 2-layer llama3-8b shape the runtime is measured with (small enough that
    /// every ZeRO stage fits 16 H100s).
    fn plan_at(zero: u8, recompute: Recompute, context: u64) -> Plan {
        let model = crate::spec::model::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../runtime/tests/data/llama3-8b-2layer.json"
        ))
        .unwrap();
        let cluster = ClusterSpec::load("dgx-h100").unwrap();
        let topo = Topology::build(&cluster, 16);
        let candidate = Candidate {
            layout: Layout {
                ulysses: 2,
                ring: 4,
                dp: 2,
                tp: 1,
                placement: Placement::UlyssesInner,
            },
            zero_stage: zero,
            recompute,
            micro_batch: 1,
        };
        let w = Workload {
            model: &model,
            context,
            global_batch: 2,
            vision: None,
        };
        let estimate = evaluate(&topo, &w, &candidate).unwrap();
        let scored = Scored {
            candidate,
            estimate,
        };
        build(&topo, "dgx-h100", &model, context, 2, &scored).unwrap()
    }

    /// A plan that recomputes says so in a value the runtime reads (`runtime/src/train/run/mod.rs`
    /// accepts none, selective and full), and the planner reads it back as costed. Recompute is
    /// a choice at every ZeRO stage, ZeRO-3 included.
    #[test]
    fn plans_write_the_runtimes_recompute_at_every_stage() {
        let plan = plan_for(3, Recompute::OutsideAttention);
        assert_eq!(plan.recompute, Recompute::Full);
        assert_eq!(plan.recompute_scope, Some(RecomputeScope::OutsideAttention));
        assert_eq!(plan.recompute_policy(), Recompute::OutsideAttention);
        assert!(plan.predicted.as_ref().unwrap().time.recompute_s > 0.0);
        let v = serde_json::to_value(&plan).unwrap();
        assert_eq!(v["recompute"], "full");
        assert_eq!(v["recompute_scope"], "outside_attention");
        let text = serde_json::to_string(&plan).unwrap();
        let back = training_from_json(&text, "p.json").unwrap();
        assert_eq!(back, plan);
        assert_eq!(candidate_of(&back).recompute, Recompute::OutsideAttention);
        // The runtime cannot read the planner's own name for it.
        let bad = text.replace(
            "\"recompute\":\"full\"",
            "\"recompute\":\"outside_attention\"",
        );
        assert!(training_from_json(&bad, "p.json").is_err());
        // At every stage any recompute asked for is the runtime's, written the same way.
        for zero in 0..=3u8 {
            for rc in [
                Recompute::Selective,
                Recompute::Full,
                Recompute::OutsideAttention,
            ] {
                let p = plan_for(zero, rc);
                assert_eq!(p.recompute, Recompute::Full, "ZeRO-{zero} {rc:?}");
                assert_eq!(p.recompute_policy(), Recompute::OutsideAttention);
                assert_eq!(p.predicted, plan_for(zero, Recompute::Full).predicted);
            }
        }
        // No recompute, ZeRO-3 included: none, no scope, no recompute time.
        for zero in [2u8, 3] {
            let p = plan_at(zero, Recompute::None, 1 << 14);
            assert_eq!(p.recompute, Recompute::None, "ZeRO-{zero}");
            assert_eq!(p.predicted.as_ref().unwrap().time.recompute_s, 0.0);
            let v = serde_json::to_value(&p).unwrap();
            assert!(v.get("recompute_scope").is_none());
            // MFU and HFU both in the JSON; HFU counts attention at 3.5x, so it is higher.
            let (mfu, hfu) = (
                v["predicted"]["mfu"].as_f64(),
                v["predicted"]["hfu"].as_f64(),
            );
            assert!(hfu.unwrap() > mfu.unwrap() && mfu.unwrap() > 0.0);
        }
    }

    /// Plans of older planners that say `selective`, or `full` without a scope, still load and
    /// read back as the policy they were costed with (for `mmsp export`); `mmsp simulate`
    /// re-costs them as the runtime runs them.
    #[test]
    fn older_plans_with_textbook_recompute_still_load() {
        let plan = plan_for(2, Recompute::Full);
        let mut v = serde_json::to_value(&plan).unwrap();
        v.as_object_mut().unwrap().remove("recompute_scope");
        for (value, policy) in [
            ("selective", Recompute::Selective),
            ("full", Recompute::Full),
        ] {
            v["recompute"] = value.into();
            let old = training_from_json(&v.to_string(), "old.json").unwrap();
            assert_eq!(old.recompute_policy(), policy);
            let topo = Topology::build(&ClusterSpec::load("dgx-h100").unwrap(), 16);
            let w = Workload {
                model: &old.model,
                context: old.context_tokens,
                global_batch: old.global_batch,
                vision: None,
            };
            let t = crate::cost::terms(&topo, &w, &candidate_of(&old)).unwrap();
            assert_eq!(t.recompute, Recompute::OutsideAttention, "{value}");
        }
    }
}
