//! Export a plan to the engine a team already runs: Megatron-LM / TransformerEngine arguments,
//! DeepSpeed-Ulysses / yunchang settings with a ZeRO config, LongVILA (VILA) training flags, and
//! torchrun or SLURM launch scripts for mmsp's own runtime (`mmsp-runtime run plan.json`).
//!
//! Every exporter first checks that its engine can run the plan's layout (degrees, rank
//! placement, head splits); where it cannot, it re-plans within the engine's constraints
//! ([`fit::replan`]) and says so in the output with both step times. Where the engine's
//! recompute differs from the plan's, the output names the engine's and its re-costed step time
//! next to the plan's ([`fit::engine_recompute_step`]). A request no layout of the engine fits
//! is [`Error::Unsupported`] naming the constraint. The flag names and constraints come from
//! the engines' own sources, cited where used (`flags/*.txt` lists each flag's file and line).

mod deepspeed;
pub mod fit;
mod megatron;
mod vila;

use std::fmt::Write;

use crate::cost::Placement;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::units::fmt_tokens;

/// Engines a plan can be exported to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Megatron,
    Deepspeed,
    Vila,
    Torchrun,
    Slurm,
}

impl Engine {
    pub const ALL: [Engine; 5] = [
        Engine::Megatron,
        Engine::Deepspeed,
        Engine::Vila,
        Engine::Torchrun,
        Engine::Slurm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Megatron => "megatron",
            Engine::Deepspeed => "deepspeed",
            Engine::Vila => "vila",
            Engine::Torchrun => "torchrun",
            Engine::Slurm => "slurm",
        }
    }

    /// What the export to this engine is (one line, for help text).
    pub fn about(self) -> &'static str {
        match self {
            Engine::Megatron => {
                "Megatron-LM pretrain_gpt.py arguments and environment (a bash file to source)"
            }
            Engine::Deepspeed => {
                "A DeepSpeed config (JSON) with the yunchang (USP) set-up lines in its `mmsp` section"
            }
            Engine::Vila => "LongVILA (NVlabs/VILA) llava/train/train_hybrid.py flags (a bash array)",
            Engine::Torchrun => "A torchrun launch script for mmsp-runtime (run once per node)",
            Engine::Slurm => "A SLURM batch script for mmsp-runtime (one task per GPU)",
        }
    }
}

/// `mmsp export`: what to export, to which engine, and where.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// Target engine.
    pub engine: Engine,
    /// The plan file written by `mmsp plan --format json`.
    pub plan: String,
    /// Write to this file instead of standard output.
    pub out: Option<String>,
    /// Rendezvous port for torchrun / SLURM scripts.
    pub port: u16,
    /// The runtime binary that the torchrun / SLURM scripts start.
    pub runtime: String,
}

/// Options of an export besides the plan and the engine.
#[derive(Debug, Clone)]
pub struct Options {
    /// Path of the plan as the launch scripts should name it.
    pub plan_path: String,
    pub port: u16,
    pub runtime: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            plan_path: "plan.json".into(),
            port: 29500,
            runtime: "mmsp-runtime".into(),
        }
    }
}

/// Runs `mmsp export`: reads and checks the plan, renders it for the engine, and writes it to
/// `req.out` or standard output.
pub fn run(a: &ExportRequest) -> Result<()> {
    let plan = crate::plan::load_training(&a.plan)?;
    let opts = Options {
        plan_path: a.plan.clone(),
        port: a.port,
        runtime: a.runtime.clone(),
    };
    let text = export(&plan, a.engine, &opts)?;
    match &a.out {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| Error::Io {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            if matches!(a.engine, Engine::Torchrun | Engine::Slurm) {
                make_executable(path);
            }
        }
        None => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            // A closed pipe (`mmsp export ... | head`) is not worth an error.
            let _ = out.write_all(text.as_bytes());
        }
    }
    Ok(())
}

#[cfg(unix)]
fn make_executable(path: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mut p = m.permissions();
        p.set_mode(p.mode() | 0o111);
        let _ = std::fs::set_permissions(path, p);
    }
}

#[cfg(not(unix))]
fn make_executable(_path: &str) {}

/// Renders `plan` for `engine`, or says why the engine cannot express it.
pub fn export(plan: &Plan, engine: Engine, opts: &Options) -> Result<String> {
    if let Some(what) = unmapped_feature(&plan.model) {
        return Err(unsupported(
            engine,
            format!(
                "the plan's model has {what}, which this export does not map (it would start a \
                 dense model with full attention); export a dense, full-attention model"
            ),
        ));
    }
    match engine {
        Engine::Megatron => megatron::megatron(plan, opts),
        Engine::Deepspeed => deepspeed::deepspeed(plan, opts),
        Engine::Vila => vila::vila(plan, opts),
        Engine::Torchrun => torchrun(plan, opts),
        Engine::Slurm => slurm(plan, opts),
    }
}

/// The first feature of the model that no export maps yet (nor mmsp-runtime trains).
fn unmapped_feature(m: &crate::spec::model::ModelSpec) -> Option<&'static str> {
    if m.moe.is_some() {
        Some("mixture-of-experts layers")
    } else if m.sliding_window.is_some() {
        Some("sliding-window attention")
    } else if m.extra_norms_per_layer > 0
        || m.attn_logit_softcapping.is_some()
        || m.final_logit_softcapping.is_some()
    {
        Some("Gemma-2's extra norms and logit soft-capping")
    } else {
        None
    }
}

pub(crate) fn unsupported(engine: Engine, msg: impl Into<String>) -> Error {
    Error::Unsupported {
        engine: engine.name(),
        msg: msg.into(),
    }
}

/// The comment lines an export starts with: what it is and which plan file it came from, the
/// plan in one line, and `notes` (re-plans, re-costs, what to add), one comment line each.
pub(crate) fn header(title: &str, plan: &Plan, opts: &Options, notes: &[String]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "# {title} from {}", one_line(&opts.plan_path));
    let _ = writeln!(out, "# plan: {}", describe(plan));
    for n in notes {
        let _ = writeln!(out, "# {n}");
    }
    out
}

/// One line describing the plan, for the header comment of every export.
pub(crate) fn describe(plan: &Plan) -> String {
    let l = &plan.layout;
    format!(
        "{} at {} tokens on {} GPUs ({}): tp {} x ulysses {} x ring {} x dp {} ({}), ZeRO-{}, {} recompute, micro-batch {}, global batch {}",
        one_line(&plan.model.name),
        fmt_tokens(plan.context_tokens),
        plan.world_size,
        one_line(&plan.topology),
        l.tp,
        l.ulysses,
        l.ring,
        l.dp,
        l.placement.as_str(),
        plan.zero_stage,
        plan.recompute_policy().as_str(),
        plan.micro_batch,
        plan.global_batch
    )
}

/// Both Ulysses and ring are > 1 and the ring is the inner (consecutive-rank) dimension.
pub(crate) fn ring_inner_2d(plan: &Plan) -> bool {
    let l = &plan.layout;
    l.ulysses > 1 && l.ring > 1 && l.placement == Placement::RingInner
}

/// A string from a plan or the command line made safe for a comment line of a generated
/// script: control characters (a newline would end the comment and start a command) are
/// written as their escapes (`\n`, `\u{1b}`).
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let e: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            e
        })
        .collect()
}

/// Quotes a string for the generated (bash) scripts when it holds anything but safe
/// characters: single quotes, or bash's `$'...'` with escapes when it holds control
/// characters, so that a quoted word never spans lines.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else if s.chars().any(char::is_control) {
        let body: String = s
            .chars()
            .map(|c| match c {
                '\\' => "\\\\".to_string(),
                '\'' => "\\'".to_string(),
                c if c.is_control() && (c as u32) < 0x80 => format!("\\x{:02x}", c as u32),
                c if c.is_control() => format!("\\u{:04x}", c as u32),
                c => c.to_string(),
            })
            .collect();
        format!("$'{body}'")
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub(crate) fn push_flags(out: &mut String, name: &str, flags: &[Vec<String>]) {
    let _ = writeln!(out, "{name}=(");
    for f in flags {
        let _ = writeln!(out, "  {}", f.join(" "));
    }
    let _ = writeln!(out, ")");
}

pub(crate) fn flag(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The plan, or the fastest re-plan over `strategies` whose layout `misfit` accepts, with the
/// comment lines that say why and what each costs.
pub(crate) fn fit_layout(
    plan: &Plan,
    engine: Engine,
    strategies: &[crate::search::Strategy],
    misfit: fn(&crate::spec::model::ModelSpec, &crate::cost::Candidate) -> Option<String>,
) -> Result<(Plan, Vec<String>)> {
    let own = crate::cost::Candidate {
        layout: plan.layout,
        zero_stage: plan.zero_stage,
        recompute: plan.recompute_policy(),
        micro_batch: plan.micro_batch,
    };
    let Some(why) = misfit(&plan.model, &own) else {
        return Ok((plan.clone(), vec![]));
    };
    let m = plan.model.clone();
    let accept = move |c: &crate::cost::Candidate| misfit(&m, c).is_none();
    let Some(r) = fit::replan(plan, strategies, &accept)? else {
        return Err(unsupported(
            engine,
            format!("{why}, and no layout it can run fits this request"),
        ));
    };
    let notes = vec![
        format!("re-planned for {}: {why}.", engine.name()),
        format!("the original plan: {}", describe(plan)),
        format!(
            "step time (mmsp cost model, analytic): the original plan {:.3} s, this re-plan {:.3} s.",
            r.before_s, r.after_s
        ),
    ];
    Ok((r.plan, notes))
}

/// A note for engines that train the language model alone: a video plan's vision stage (the
/// encoder over the frames, stage 1 of MM-SP) is not part of what they run.
pub(crate) fn text_only_note(plan: &Plan, engine: Engine) -> Option<String> {
    plan.vision.as_ref().map(|v| {
        format!(
            "{} trains the language model on the packed sequence of {} tokens; the plan's vision stage ({}, {} frames, {} tokens each) runs outside it (export to vila or torchrun for both).",
            engine.name(),
            plan.context_tokens,
            one_line(&v.encoder),
            v.frames,
            v.tokens_per_frame
        )
    })
}

/// (nodes, processes per node) of a plan: whole nodes, or one partial node for small worlds.
pub(crate) fn nodes(plan: &Plan) -> (u32, u32) {
    let gpn = plan.gpus_per_node.max(1);
    if plan.world_size <= gpn {
        (1, plan.world_size)
    } else {
        (plan.world_size.div_ceil(gpn), gpn)
    }
}

fn check_whole_nodes(plan: &Plan, e: Engine) -> Result<(u32, u32)> {
    let gpn = plan.gpus_per_node.max(1);
    if plan.world_size > gpn && !plan.world_size.is_multiple_of(gpn) {
        return Err(unsupported(
            e,
            format!(
                "world size {} is not a whole number of {}-GPU nodes",
                plan.world_size, gpn
            ),
        ));
    }
    Ok(nodes(plan))
}

/// torchrun launch script for mmsp-runtime. torchrun (`torch.distributed.run`) sets RANK,
/// LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process it starts;
/// `--no-python` runs the given program directly instead of `python <script>`. Ranks are
/// node-major (node_rank x nproc_per_node + local_rank), the plan's rank order.
fn torchrun(plan: &Plan, opts: &Options) -> Result<String> {
    let (n, per) = check_whole_nodes(plan, Engine::Torchrun)?;
    let mut o = String::new();
    let _ = writeln!(o, "#!/usr/bin/env bash");
    let _ = writeln!(
        o,
        "# mmsp-runtime under torchrun for {}",
        one_line(&opts.plan_path)
    );
    let _ = writeln!(o, "# plan: {}", describe(plan));
    if n > 1 {
        let _ = writeln!(
            o,
            "# Run once on every node with NODE_RANK=0..{} and MASTER_ADDR = node 0's address.",
            n - 1
        );
    }
    let _ = writeln!(o, "set -euo pipefail");
    if n > 1 {
        let _ = writeln!(
            o,
            ": \"${{MASTER_ADDR:?set MASTER_ADDR to the address of node 0}}\""
        );
        let _ = writeln!(
            o,
            ": \"${{NODE_RANK:?set NODE_RANK to the index of this node, 0..{}}}\"",
            n - 1
        );
    } else {
        let _ = writeln!(o, "MASTER_ADDR=\"${{MASTER_ADDR:-127.0.0.1}}\"");
        let _ = writeln!(o, "NODE_RANK=0");
    }
    let _ = writeln!(o, "MASTER_PORT=\"${{MASTER_PORT:-{}}}\"", opts.port);
    let _ = writeln!(
        o,
        "exec torchrun --nnodes {n} --nproc-per-node {per} --node-rank \"$NODE_RANK\" \\"
    );
    let _ = writeln!(
        o,
        "  --master-addr \"$MASTER_ADDR\" --master-port \"$MASTER_PORT\" \\"
    );
    let _ = writeln!(
        o,
        "  --no-python {} run {}",
        sh_quote(&opts.runtime),
        sh_quote(&opts.plan_path)
    );
    Ok(o)
}

/// SLURM batch script for mmsp-runtime: one task per GPU, block distribution so that ranks are
/// node-major like the plan's; RANK, LOCAL_RANK and WORLD_SIZE come from SLURM_PROCID,
/// SLURM_LOCALID and SLURM_NTASKS, MASTER_ADDR from the first host of the allocation.
fn slurm(plan: &Plan, opts: &Options) -> Result<String> {
    let (n, per) = check_whole_nodes(plan, Engine::Slurm)?;
    let mut o = String::new();
    let _ = writeln!(o, "#!/usr/bin/env bash");
    let _ = writeln!(
        o,
        "#SBATCH --job-name=mmsp-{}-{}",
        plan.model
            .name
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
        fmt_tokens(plan.context_tokens)
    );
    let _ = writeln!(o, "#SBATCH --nodes={n}");
    let _ = writeln!(o, "#SBATCH --ntasks-per-node={per}");
    let _ = writeln!(o, "#SBATCH --gpus-per-node={per}");
    let _ = writeln!(o, "#SBATCH --exclusive");
    let _ = writeln!(
        o,
        "# mmsp-runtime under SLURM for {}",
        one_line(&opts.plan_path)
    );
    let _ = writeln!(o, "# plan: {}", describe(plan));
    let _ = writeln!(o, "set -euo pipefail");
    let _ = writeln!(
        o,
        "if [ \"${{SLURM_NTASKS:-0}}\" -ne {} ]; then echo \"this plan needs {} tasks, the allocation has ${{SLURM_NTASKS:-0}}\" >&2; exit 2; fi",
        plan.world_size, plan.world_size
    );
    let _ = writeln!(
        o,
        "export MASTER_ADDR=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\""
    );
    let _ = writeln!(o, "export MASTER_PORT=\"${{MASTER_PORT:-{}}}\"", opts.port);
    let _ = writeln!(o, "export WORLD_SIZE=\"$SLURM_NTASKS\"");
    let _ = writeln!(
        o,
        "srun --kill-on-bad-exit=1 --distribution=block:block bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec \"$0\" run \"$1\"' {} {}",
        sh_quote(&opts.runtime),
        sh_quote(&opts.plan_path)
    );
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_text_keeps_to_one_line() {
        assert_eq!(one_line("a\nb\r\u{1b}c"), "a\\nb\\r\\u{1b}c");
        assert_eq!(one_line("plain name-1"), "plain name-1");
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(sh_quote("plan.json"), "plan.json");
        assert_eq!(sh_quote("my plan.json"), "'my plan.json'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("a\nb'c\\"), r"$'a\x0ab\'c\\'");
    }
}
