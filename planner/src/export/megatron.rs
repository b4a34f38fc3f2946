//! `mmsp export --to megatron`: the environment and `pretrain_gpt.py` arguments that build and
//! train the planned model on Megatron-LM with TransformerEngine context parallelism.
//!
//! Every flag is checked against Megatron-LM core_v0.16.1 (`flags/megatron.txt` names the file
//! and line of each; `tests/export.rs` checks every emitted flag is listed). Relied on, at that
//! commit:
//! - `megatron/training/arguments.py` `validate_args`: with tensor or context parallelism and
//!   no FSDP, `CUDA_DEVICE_MAX_CONNECTIONS` must be `1` (line 951, which asserts it); Megatron-FSDP asserts it is
//!   *not* 1 (line 687) and needs `--ckpt-format fsdp_dtensor` (line 690); the sequence length
//!   must be a multiple of 2 x CP (line 819).
//! - `--hierarchical-context-parallel-sizes` (`model_parallel_config.py` line 48): with "2 4"
//!   adjacent ranks form the first level, the a2a one of `--cp-comm-type a2a+p2p`; their
//!   product must equal the CP size (arguments.py line 405). Rank order tp-cp-ep-dp-pp
//!   (`megatron/core/parallel_state.py`): TP innermost, then CP, then DP, as in an mmsp plan.
//! - `--data-parallel-sharding-strategy` of `--use-megatron-fsdp` (arguments.py line 2307):
//!   `optim` (ZeRO-1), `optim_grads` (ZeRO-2), `optim_grads_params` (ZeRO-3); ZeRO-1 is
//!   exported as the distributed optimizer (`--use-distributed-optimizer`, line 2283).
//! - `--recompute-modules` (`transformer_config.py` line 411): `layernorm` recomputes the input
//!   and pre-MLP layernorms, `mlp` the dense MLP, `core_attn` the attention core.
//! - TransformerEngine's a2a context parallel (`AttnFuncWithCPAndQKVOA2A`,
//!   `transformer_engine/pytorch/attention.py`) needs the query *and* kv heads per TP rank
//!   divisible by the a2a size: it does not replicate kv heads, as mmsp-runtime does.

use std::fmt::Write;

use super::fit::{self, EngineRecompute};
use super::{fit_layout, flag, one_line, push_flags, ring_inner_2d, Engine, Options};
use crate::cost::{Candidate, Placement, Recompute};
use crate::error::Result;
use crate::plan::Plan;
use crate::search::Strategy;
use crate::spec::model::ModelSpec;

/// Why Megatron-LM with TransformerEngine cannot run a candidate's layout, if it cannot.
fn layout_misfit(m: &ModelSpec, c: &Candidate) -> Option<String> {
    let l = &c.layout;
    if l.ulysses > 1 && l.ring > 1 && l.placement == Placement::RingInner {
        return Some("placement ring_inner puts ring neighbours on adjacent ranks, but Megatron's --hierarchical-context-parallel-sizes makes adjacent ranks the a2a level".into());
    }
    let tp = u64::from(l.tp);
    if !m.num_heads.is_multiple_of(tp) || !m.num_kv_heads.is_multiple_of(tp) {
        return Some(format!(
            "{} query / {} kv heads are not divisible by tensor-parallel size {tp}",
            m.num_heads, m.num_kv_heads
        ));
    }
    let (q, kv) = (m.num_heads / tp, m.num_kv_heads / tp);
    let u = u64::from(l.ulysses);
    if u > 1 && (!q.is_multiple_of(u) || !kv.is_multiple_of(u)) {
        return Some(format!(
            "TransformerEngine's a2a context parallel needs the query and kv heads per TP rank ({q} and {kv}) divisible by the a2a size {u}; it does not replicate kv heads"
        ));
    }
    None
}

/// RoPE base: the plan's model's `rope_theta` (read from its config.json) when it is a whole
/// number (Megatron's `--rotary-base` takes an int), else the preset's. None of the presets has
/// `rope_scaling` (Llama 3, not 3.1), so `--use-rope-scaling` is not emitted.
fn rope_theta(m: &crate::spec::model::ModelSpec) -> Option<u64> {
    if let Some(t) = m.rope_theta {
        return (t.fract() == 0.0 && (1.0..1e15).contains(&t)).then_some(t as u64);
    }
    match m.name.as_str() {
        // meta-llama/Meta-Llama-3-8B and -70B config.json: "rope_theta": 500000.0.
        "llama3-8b" | "llama3-70b" => Some(500_000),
        // meta-llama/Llama-2-7b-hf config.json: "rope_theta": 10000.0.
        "llama2-7b" => Some(10_000),
        // Qwen/Qwen2-7B config.json: "rope_theta": 1000000.0.
        "qwen2-7b" => Some(1_000_000),
        _ => None,
    }
}

/// The recompute flags for the plan, and comment lines when they differ from the plan's.
fn recompute_flags(plan: &Plan) -> Result<(Vec<Vec<String>>, Vec<String>)> {
    let full = || {
        vec![
            flag(&["--recompute-granularity", "full"]),
            flag(&["--recompute-method", "uniform"]),
            flag(&["--recompute-num-layers", "1"]),
        ]
    };
    let selective = || {
        vec![
            flag(&["--recompute-granularity", "selective"]),
            flag(&["--recompute-modules", "layernorm", "mlp"]),
        ]
    };
    match plan.recompute_policy() {
        Recompute::None => Ok((vec![], vec![])),
        // A plan of an older planner costed as whole-layer recompute: Megatron's own.
        Recompute::Full => Ok((full(), vec![])),
        Recompute::OutsideAttention | Recompute::Selective => {
            let c = fit::cost_plan(plan)?;
            let planned = c.estimate.step_time_s;
            let (flags, name, s) =
                match fit::engine_recompute_step(&c, EngineRecompute::NormsAndMlp) {
                    Some(s) => (selective(), "selective (layernorm, mlp)", s),
                    None => {
                        let s = fit::engine_recompute_step(&c, EngineRecompute::WholeLayer)
                            .expect("whole-layer recompute keeps less than the plan");
                        (
                            full(),
                            "full (whole layers; layernorm + mlp do not fit memory)",
                            s,
                        )
                    }
                };
            let notes = vec![
                "recompute: the plan recomputes each layer outside attention (mmsp-runtime's), which Megatron has no module set for;".into(),
                format!(
                    "  exported as Megatron's {name}: {s:.3} s/step against the plan's {planned:.3} s/step (mmsp cost model)."
                ),
            ];
            Ok((flags, notes))
        }
    }
}

/// ZeRO stage as Megatron's distributed optimizer or Megatron-FSDP.
fn zero_flags(zero: u8) -> Vec<Vec<String>> {
    let fsdp = |s: &str| {
        vec![
            flag(&["--use-megatron-fsdp"]),
            flag(&["--data-parallel-sharding-strategy", s]),
            flag(&["--ckpt-format", "fsdp_dtensor"]),
        ]
    };
    match zero {
        0 => vec![],
        1 => vec![flag(&["--use-distributed-optimizer"])],
        2 => fsdp("optim_grads"),
        _ => fsdp("optim_grads_params"),
    }
}

fn architecture_flags(m: &ModelSpec, context: u64) -> (Vec<Vec<String>>, Vec<String>) {
    let s = |v: u64| v.to_string();
    let mut notes = vec![];
    let mut flags = vec![
        vec!["--num-layers".into(), s(m.num_layers)],
        vec!["--hidden-size".into(), s(m.hidden_size)],
        vec!["--ffn-hidden-size".into(), s(m.intermediate_size)],
        vec!["--num-attention-heads".into(), s(m.num_heads)],
    ];
    if m.head_dim * m.num_heads != m.hidden_size {
        flags.push(vec!["--kv-channels".into(), s(m.head_dim)]);
    }
    if m.num_kv_heads != m.num_heads {
        flags.push(flag(&["--group-query-attention"]));
        flags.push(vec!["--num-query-groups".into(), s(m.num_kv_heads)]);
    }
    flags.push(vec!["--max-position-embeddings".into(), s(context)]);
    flags.push(flag(&["--position-embedding-type", "rope"]));
    match rope_theta(m) {
        Some(b) => flags.push(vec!["--rotary-base".into(), s(b)]),
        None => notes.push(format!(
            "add --rotary-base <rope_theta of {}'s config.json>: the plan does not record a whole-number one (Megatron's default is 10000).",
            one_line(&m.name)
        )),
    }
    flags.extend([
        flag(&["--swiglu"]),
        flag(&["--normalization", "RMSNorm"]),
        flag(&["--disable-bias-linear"]),
    ]);
    if m.qkv_bias {
        flags.push(flag(&["--add-qkv-bias"]));
    }
    if !m.tie_word_embeddings {
        flags.push(flag(&["--untie-embeddings-and-output-weights"]));
    }
    (flags, notes)
}

/// Renders the plan (or its re-plan within Megatron's constraints) for Megatron-LM.
pub(super) fn megatron(plan: &Plan, opts: &Options) -> Result<String> {
    let strategies = [Strategy::TwoD, Strategy::TeA2aP2p, Strategy::MegatronCpTp];
    let (plan, mut notes) = fit_layout(plan, Engine::Megatron, &strategies, layout_misfit)?;
    let plan = &plan;
    notes.extend(super::text_only_note(plan, Engine::Megatron));
    let l = &plan.layout;
    let cp = l.ulysses * l.ring;
    debug_assert!(!ring_inner_2d(plan));
    let (recompute, rc_notes) = recompute_flags(plan)?;
    notes.extend(rc_notes);
    let s = |v: u64| v.to_string();
    let mut flags: Vec<Vec<String>> = vec![
        vec!["--tensor-model-parallel-size".into(), s(u64::from(l.tp))],
        flag(&["--pipeline-model-parallel-size", "1"]),
        vec!["--context-parallel-size".into(), s(u64::from(cp))],
    ];
    if cp > 1 {
        let kind = match (l.ulysses > 1, l.ring > 1) {
            (true, true) => "a2a+p2p",
            (true, false) => "a2a",
            _ => "p2p",
        };
        flags.push(vec!["--cp-comm-type".into(), kind.into()]);
        if kind == "a2a+p2p" {
            flags.push(vec![
                "--hierarchical-context-parallel-sizes".into(),
                s(u64::from(l.ulysses)),
                s(u64::from(l.ring)),
            ]);
        }
    }
    if l.tp > 1 {
        flags.push(flag(&["--sequence-parallel"]));
    }
    flags.extend([
        vec!["--seq-length".into(), s(plan.context_tokens)],
        vec!["--micro-batch-size".into(), s(u64::from(plan.micro_batch))],
        vec!["--global-batch-size".into(), s(plan.global_batch)],
    ]);
    let (arch, arch_notes) = architecture_flags(&plan.model, plan.context_tokens);
    flags.extend(arch);
    notes.extend(arch_notes);
    flags.extend(recompute);
    flags.extend(zero_flags(plan.zero_stage));
    flags.push(flag(&["--attention-backend", "flash"]));
    flags.push(flag(&["--bf16"]));

    let mut out = super::header(
        "Megatron-LM (core_v0.16.1) / TransformerEngine arguments",
        plan,
        opts,
        &notes,
    );
    let _ = writeln!(
        out,
        "# Use: source this file, then torchrun ... pretrain_gpt.py \"${{MMSP_MEGATRON_ARGS[@]}}\" <data, tokenizer, optimizer flags>"
    );
    let _ = writeln!(
        out,
        "# Megatron shards each sequence into 2 x CP zigzag chunks itself; the plan's per-rank token ranges are mmsp-runtime's."
    );
    if plan.zero_stage >= 2 {
        let _ = writeln!(
            out,
            "# Megatron-FSDP asserts CUDA_DEVICE_MAX_CONNECTIONS is not 1 (arguments.py line 687)."
        );
        let _ = writeln!(out, "unset CUDA_DEVICE_MAX_CONNECTIONS");
    } else if l.tp > 1 || cp > 1 {
        let _ = writeln!(
            out,
            "# Tensor or context parallelism asserts CUDA_DEVICE_MAX_CONNECTIONS=1 (arguments.py line 951)."
        );
        let _ = writeln!(out, "export CUDA_DEVICE_MAX_CONNECTIONS=1");
    }
    push_flags(&mut out, "MMSP_MEGATRON_ARGS", &flags);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Layout;

    fn cand(u: u32, r: u32, tp: u32, placement: Placement) -> Candidate {
        Candidate {
            layout: Layout {
                ulysses: u,
                ring: r,
                dp: 1,
                tp,
                placement,
            },
            zero_stage: 1,
            recompute: Recompute::None,
            micro_batch: 1,
        }
    }

    #[test]
    fn layouts_megatron_cannot_run_are_named() {
        let m = crate::spec::model::load("llama3-8b").unwrap();
        assert!(layout_misfit(&m, &cand(4, 8, 1, Placement::UlyssesInner)).is_none());
        assert!(layout_misfit(&m, &cand(8, 8, 1, Placement::UlyssesInner)).is_none());
        // 8 kv heads: TE's a2a cannot split them 16 ways (mmsp-runtime replicates them).
        let heads = layout_misfit(&m, &cand(16, 4, 1, Placement::UlyssesInner)).unwrap();
        assert!(heads.contains("kv heads"), "{heads}");
        // With TP 2, 4 kv heads per rank: a2a 8 is too many.
        assert!(layout_misfit(&m, &cand(8, 2, 2, Placement::UlyssesInner)).is_some());
        let order = layout_misfit(&m, &cand(4, 8, 1, Placement::RingInner)).unwrap();
        assert!(order.contains("ring_inner"), "{order}");
    }

    #[test]
    fn zero_stages_map_to_megatron_features() {
        let joined = |z| {
            zero_flags(z)
                .iter()
                .map(|f| f.join(" "))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(joined(0), "");
        assert_eq!(joined(1), "--use-distributed-optimizer");
        assert!(joined(2).contains("--data-parallel-sharding-strategy optim_grads --"));
        assert!(joined(3).contains("--data-parallel-sharding-strategy optim_grads_params"));
        assert!(joined(3).contains("--ckpt-format fsdp_dtensor"));
    }
}
