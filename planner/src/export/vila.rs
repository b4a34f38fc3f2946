//! `mmsp export --to vila`: LongVILA (NVlabs/VILA) training flags for
//! `llava/train/train_hybrid.py`, the entry point that patches in VILA's sequence-parallel
//! attention (`llava.train.sequence_parallel.monkey_patch`); `train_mem.py` keeps attention
//! local, so a sharded sequence would attend only to its own shard.
//!
//! Flags checked against VILA at b760c34 (`flags/vila.txt`: file and line of each; the
//! `transformers.TrainingArguments` ones are parsed by the installed transformers in
//! `tests/engines/check_exports.py`). Relied on (`llava/train/args.py`): `--seq_parallel_size`
//! (line 265; -1 disables), `--seq_parallel_ring_size` (line 269; `seq_parallel_size` = ring x
//! Ulysses), `--seq_parallel_ring_type` `ring_varlen` or `zigzag_ring_varlen` (line 275);
//! `--num_video_frames` (line 39), `--vision_tower` (line 51), `--mm_projector` (line 52;
//! `mlp_downsample` merges 2 x 2 patches, the 196 tokens per SigLIP frame the plan costs,
//! `llava/model/multimodal_projector/base_projector.py` line 145), `--tune_vision_tower`,
//! `--tune_language_model`, `--tune_mm_projector` (lines 226-228), `--longvila_sampler`
//! (line 255). The trainer calls `set_pg_manager(sp_degree, ring_degree, ring_type=...)`
//! without `use_ulysses_low`, whose default puts Ulysses groups on adjacent ranks. Its Ulysses
//! all-to-all splits heads `hc // seq_world_size` (`llava/train/sequence_parallel/all_to_all.py`
//! line 61), so the Ulysses degree must divide the kv heads. With SP each group of
//! `seq_parallel_size` GPUs counts as one device: global batch = per-device batch x
//! accumulation x data-parallel size. ZeRO comes from `--deepspeed <config.json>`; VILA has
//! no tensor parallelism.

use std::fmt::Write;

use super::deepspeed::whole_layer_recompute;
use super::{fit_layout, flag, nodes, one_line, push_flags, Engine, Options};
use crate::cost::{Candidate, Placement};
use crate::error::Result;
use crate::plan::Plan;
use crate::search::Strategy;
use crate::spec::model::ModelSpec;

/// Why VILA cannot run a candidate's layout, if it cannot.
fn layout_misfit(m: &ModelSpec, c: &Candidate) -> Option<String> {
    let l = &c.layout;
    if l.ulysses > 1 && l.ring > 1 && l.placement == Placement::RingInner {
        return Some("placement ring_inner is not reachable: VILA's set_pg_manager puts Ulysses groups on adjacent ranks".into());
    }
    super::deepspeed::layout_misfit(m, c).map(|w| w.replace("yunchang / DeepSpeed", "VILA"))
}

/// The VILA vision tower and projector of an mmsp encoder preset.
fn vision_flags(encoder: &str) -> Option<(&'static str, &'static str)> {
    match encoder {
        "siglip-so400m" => Some(("google/siglip-so400m-patch14-384", "mlp_downsample")),
        "siglip-so400m-nopool" => Some(("google/siglip-so400m-patch14-384", "mlp2x_gelu")),
        "clip-vit-l-336" => Some(("openai/clip-vit-large-patch14-336", "mlp2x_gelu")),
        _ => None,
    }
}

fn video_flags(plan: &Plan, notes: &mut Vec<String>) -> Vec<Vec<String>> {
    let Some(v) = &plan.vision else {
        return vec![];
    };
    let mut flags = vec![];
    let frames = v
        .frames_per_sample
        .as_ref()
        .and_then(|f| f.iter().max().copied())
        .unwrap_or(v.frames / v.samples.max(1));
    flags.push(vec!["--num_video_frames".into(), frames.to_string()]);
    match vision_flags(&v.encoder) {
        Some((tower, projector)) => {
            flags.push(vec!["--vision_tower".into(), tower.into()]);
            flags.push(vec!["--mm_projector".into(), projector.into()]);
        }
        None => notes.push(format!(
            "add --vision_tower and --mm_projector for encoder {} ({} tokens per frame): it is not one of mmsp's presets.",
            one_line(&v.encoder),
            v.tokens_per_frame
        )),
    }
    let tv = if v.train_vision { "True" } else { "False" };
    flags.push(flag(&["--tune_vision_tower", tv]));
    flags.push(flag(&["--tune_mm_projector", "True"]));
    flags.push(flag(&["--tune_language_model", "True"]));
    flags.push(flag(&["--longvila_sampler", "True"]));
    flags
}

/// Renders the plan (or its re-plan within VILA's constraints) as LongVILA training flags.
pub(super) fn vila(plan: &Plan, opts: &Options) -> Result<String> {
    let (plan, mut notes) = fit_layout(plan, Engine::Vila, &[Strategy::TwoD], layout_misfit)?;
    let plan = &plan;
    let l = &plan.layout;
    let (checkpointing, rc_notes) = whole_layer_recompute(plan, "--gradient_checkpointing")?;
    notes.extend(rc_notes);
    let gc = if checkpointing { "True" } else { "False" };
    let sp = l.ulysses * l.ring;
    let s = |v: u64| v.to_string();
    let mut flags: Vec<Vec<String>> = vec![];
    if sp > 1 {
        flags.push(vec!["--seq_parallel_size".into(), s(u64::from(sp))]);
        if l.ring > 1 {
            flags.push(vec![
                "--seq_parallel_ring_size".into(),
                s(u64::from(l.ring)),
            ]);
            flags.push(flag(&["--seq_parallel_ring_type", "zigzag_ring_varlen"]));
        }
    }
    flags.extend(video_flags(plan, &mut notes));
    flags.extend([
        vec!["--model_max_length".into(), s(plan.context_tokens)],
        vec![
            "--per_device_train_batch_size".into(),
            s(u64::from(plan.micro_batch)),
        ],
        vec![
            "--gradient_accumulation_steps".into(),
            s(plan.grad_accum_steps),
        ],
        vec!["--gradient_checkpointing".into(), gc.into()],
        vec![
            "--deepspeed".into(),
            format!("./scripts/zero{}.json", plan.zero_stage),
        ],
        flag(&["--bf16", "True"]),
    ]);
    let mut out = super::header("LongVILA (VILA b760c34) training flags", plan, opts, &notes);
    let _ = writeln!(
        out,
        "# global batch {} = per-device {} x accumulation {} x data-parallel {} (each SP group of {} GPUs counts as one device)",
        plan.global_batch, plan.micro_batch, plan.grad_accum_steps, l.dp, sp
    );
    let _ = writeln!(
        out,
        "# --deepspeed names a ZeRO-{} config: VILA ships scripts/zero2.json and scripts/zero3.json; write zero{}.json if yours lacks it",
        plan.zero_stage, plan.zero_stage
    );
    let (n, per) = nodes(plan);
    let _ = writeln!(
        out,
        "# Use: torchrun --nnodes {n} --nproc_per_node {per} llava/train/train_hybrid.py \"${{MMSP_VILA_ARGS[@]}}\" <model, data flags>"
    );
    let _ = writeln!(
        out,
        "# train_hybrid.py patches in VILA's sequence-parallel attention; train_mem.py would keep attention local to each shard."
    );
    push_flags(&mut out, "MMSP_VILA_ARGS", &flags);
    Ok(out)
}
