//! `mmsp export --to deepspeed`: a DeepSpeed config (the JSON given to `deepspeed.initialize`)
//! with the yunchang (USP) set-up that runs the plan's Ulysses x zigzag-ring attention.
//!
//! DeepSpeed 0.19.8 (`deepspeed/runtime/config.py`): without an mpu, a top-level
//! `sequence_parallel_size` makes the batch world size `world / sequence_parallel_size`
//! (lines 468-469; only when the config is given as a dict: the test is `in config`, which for
//! a path is a substring test), so that `train_batch_size = train_micro_batch_size_per_gpu x
//! gradient_accumulation_steps x (world / SP)` passes `_batch_assertion` (line 602); keys
//! DeepSpeed does not know (the `mmsp` section) are ignored. `activation_checkpointing` is read
//! by `deepspeed.checkpointing.configure` for layers the model wraps in
//! `deepspeed.checkpointing.checkpoint` (whole layers).
//!
//! yunchang 0.6.4 (feifeibear/long-context-attention at 56118e0): `set_seq_parallel_pg(
//! sp_ulysses_degree, sp_ring_degree, rank, world_size, use_ulysses_low=True)`
//! (`yunchang/globals.py` line 22; `use_ulysses_low=True` puts Ulysses groups on consecutive
//! ranks, mmsp's `ulysses_inner`, `False` the ring groups, `ring_inner`);
//! `LongContextAttention(ring_impl_type="zigzag")` (`yunchang/hybrid/attn_layer.py` line 29);
//! its all-to-all splits the heads `hc // seq_world_size` (`yunchang/comm/all_to_all.py`
//! line 41), so the Ulysses degree must divide the kv heads (mmsp-runtime replicates them
//! instead); the zigzag ring needs each rank's tokens in zigzag order,
//! `zigzag_extract_local(value, rank, world_size, rd, ud)` (`yunchang/comm/extract_local.py`
//! line 29: chunks r and 2 x rd - 1 - r of 2 x rd, then the Ulysses rank's part). yunchang has
//! no tensor parallelism.

use super::fit::{self, EngineRecompute};
use super::{describe, fit_layout, one_line, Engine, Options};
use crate::cost::{Candidate, Placement, Recompute};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::search::Strategy;
use crate::spec::model::ModelSpec;

/// Why yunchang cannot run a candidate's layout, if it cannot.
pub(super) fn layout_misfit(m: &ModelSpec, c: &Candidate) -> Option<String> {
    let l = &c.layout;
    if l.tp > 1 {
        return Some(format!(
            "tensor parallel size {} is not available in yunchang / DeepSpeed",
            l.tp
        ));
    }
    let u = u64::from(l.ulysses);
    if !m.num_kv_heads.is_multiple_of(u) || !m.num_heads.is_multiple_of(u) {
        return Some(format!(
            "yunchang's all-to-all splits heads {u} ways without replicating kv heads, so the Ulysses degree {u} must divide the {} kv heads",
            m.num_kv_heads
        ));
    }
    None
}

/// Whether the engine recomputes whole layers for the plan, with comment lines when that
/// differs from the plan's recompute (both step times, mmsp's cost model).
pub(super) fn whole_layer_recompute(plan: &Plan, what: &str) -> Result<(bool, Vec<String>)> {
    match plan.recompute_policy() {
        Recompute::None => Ok((false, vec![])),
        Recompute::Full => Ok((true, vec![])),
        Recompute::OutsideAttention | Recompute::Selective => {
            let c = fit::cost_plan(plan)?;
            let s = fit::engine_recompute_step(&c, EngineRecompute::WholeLayer)
                .expect("whole-layer recompute keeps less than the plan");
            Ok((
                true,
                vec![format!(
                    "recompute: the plan recomputes each layer outside attention (mmsp-runtime's); {what} recomputes whole layers: {s:.3} s/step against the plan's {:.3} s/step (mmsp cost model).",
                    c.estimate.step_time_s
                )],
            ))
        }
    }
}

/// The yunchang set-up of the plan, as Python lines.
fn yunchang_setup(plan: &Plan) -> Vec<String> {
    let l = &plan.layout;
    let low = !(l.placement == Placement::RingInner && l.ulysses > 1 && l.ring > 1);
    let py = |b: bool| if b { "True" } else { "False" };
    let sp = l.ulysses * l.ring;
    vec![
        "# deepspeed.initialize(..., config=json.load(open(<this file>))): as a dict, since DeepSpeed 0.19.8 reads sequence_parallel_size only from a dict (runtime/config.py line 468)".into(),
        "from yunchang import LongContextAttention, set_seq_parallel_pg".into(),
        "from yunchang.comm.extract_local import zigzag_extract_local".into(),
        format!(
            "set_seq_parallel_pg({}, {}, rank, {}, use_ulysses_low={})",
            l.ulysses,
            l.ring,
            plan.world_size,
            py(low)
        ),
        "attn = LongContextAttention(ring_impl_type=\"zigzag\")  # in place of each layer's attention core".into(),
        format!(
            "# zigzag token order, required by the zigzag ring: each rank keeps chunks r and {} - r of the sequence's {} chunks (r = its ring rank), then its Ulysses rank's 1/{} of them; cut input_ids, labels and position_ids alike (RoPE needs the global positions):",
            2 * l.ring - 1,
            2 * l.ring,
            l.ulysses
        ),
        format!(
            "local = zigzag_extract_local(t, sp_rank, {sp}, {}, {}, dim=1)  # sp_rank = rank % {sp}",
            l.ring, l.ulysses
        ),
    ]
}

/// Renders the plan (or its re-plan within yunchang's constraints) as a DeepSpeed config.
pub(super) fn deepspeed(plan: &Plan, opts: &Options) -> Result<String> {
    let (plan, mut notes) = fit_layout(plan, Engine::Deepspeed, &[Strategy::TwoD], layout_misfit)?;
    let plan = &plan;
    notes.extend(super::text_only_note(plan, Engine::Deepspeed));
    let l = &plan.layout;
    let sp = l.ulysses * l.ring;
    let dp_world = plan.world_size / sp;
    debug_assert_eq!(dp_world, l.dp * l.tp);
    if u64::from(plan.micro_batch) * plan.grad_accum_steps * u64::from(dp_world)
        != plan.global_batch
    {
        return Err(super::unsupported(
            Engine::Deepspeed,
            format!(
                "global batch {} is not micro-batch {} x accumulation {} x data-parallel {}",
                plan.global_batch, plan.micro_batch, plan.grad_accum_steps, dp_world
            ),
        ));
    }
    let (checkpointing, rc_notes) =
        whole_layer_recompute(plan, "deepspeed.checkpointing.checkpoint")?;
    notes.extend(rc_notes);
    let mut zero = serde_json::json!({ "stage": plan.zero_stage });
    if plan.zero_stage >= 2 {
        zero["overlap_comm"] = true.into();
        zero["contiguous_gradients"] = true.into();
    }
    let mut v = serde_json::json!({
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "sequence_parallel_size": sp,
        "bf16": { "enabled": true },
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
    });
    if checkpointing {
        v["activation_checkpointing"] = serde_json::json!({
            "partition_activations": false,
            "contiguous_memory_optimization": false,
            "cpu_checkpointing": false,
        });
    }
    v["mmsp"] = serde_json::json!({
        "plan": format!("mmsp export --to deepspeed {}: {}", one_line(&opts.plan_path), describe(plan)),
        "notes": notes,
        "yunchang": {
            "version": "0.6.4",
            "ulysses_degree": l.ulysses,
            "ring_degree": l.ring,
            "ring_impl_type": "zigzag",
            "setup": yunchang_setup(plan),
        },
        "gradient_checkpointing": checkpointing,
    });
    let mut s =
        serde_json::to_string_pretty(&v).map_err(|e| Error::invalid("plan", e.to_string()))?;
    s.push('\n');
    Ok(s)
}
