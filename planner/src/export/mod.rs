//! Export a plan to the engine a team already runs: Megatron-LM / TransformerEngine arguments,
//! DeepSpeed-Ulysses / yunchang settings with a ZeRO config, LongVILA (VILA) training flags, and
//! torchrun or SLURM launch scripts for mmsp's own runtime (`mmsp-runtime run plan.json`).
//!
//! Every exporter first checks that its engine can express the plan (degrees, rank placement,
//! head splits, ZeRO stage, recompute policy) and returns [`Error::Unsupported`] naming the
//! constraint otherwise: a config that silently differs from the plan is worse than none.
//! The flag names and constraints come from the engines' own sources, cited where used.

use std::fmt::Write;

use clap::ValueEnum;

use crate::cost::{Placement, Recompute};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::units::fmt_tokens;

/// Engines a plan can be exported to.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Megatron-LM / TransformerEngine command-line arguments (a bash array).
    Megatron,
    /// DeepSpeed-Ulysses / yunchang (USP) degrees and a DeepSpeed config (JSON).
    Deepspeed,
    /// LongVILA (NVlabs/VILA) training flags (a bash array).
    Vila,
    /// A torchrun launch script for mmsp-runtime (run once per node).
    Torchrun,
    /// A SLURM batch script for mmsp-runtime (one task per GPU).
    Slurm,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Megatron => "megatron",
            Engine::Deepspeed => "deepspeed",
            Engine::Vila => "vila",
            Engine::Torchrun => "torchrun",
            Engine::Slurm => "slurm",
        }
    }
}

/// `mmsp export`: flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Target engine.
    #[arg(long = "to", value_enum)]
    pub to: Engine,
    /// The plan file written by `mmsp plan --format json`.
    pub plan: String,
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub out: Option<String>,
    /// Accept the engine's coarser recompute (more recompute, less memory, slower than planned)
    /// where it cannot express the plan's exactly: mmsp's recompute of each layer outside
    /// attention becomes whole-layer recompute (the selective recompute of older plans, the
    /// engine's nearest).
    #[arg(long)]
    pub allow_coarser_recompute: bool,
    /// Rendezvous port for torchrun / SLURM scripts.
    #[arg(long, default_value_t = 29500)]
    pub port: u16,
    /// The runtime binary that the torchrun / SLURM scripts start.
    #[arg(long, default_value = "mmsp-runtime")]
    pub runtime: String,
}

/// Options of an export besides the plan and the engine.
#[derive(Debug, Clone)]
pub struct Options {
    /// Path of the plan as the launch scripts should name it.
    pub plan_path: String,
    pub allow_coarser_recompute: bool,
    pub port: u16,
    pub runtime: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            plan_path: "plan.json".into(),
            allow_coarser_recompute: false,
            port: 29500,
            runtime: "mmsp-runtime".into(),
        }
    }
}

/// Runs `mmsp export`: reads and checks the plan, renders it for the engine, and writes it to
/// `--out` or standard output.
pub fn run(a: &ExportArgs) -> Result<()> {
    let plan = Plan::load(&a.plan)?;
    let opts = Options {
        plan_path: a.plan.clone(),
        allow_coarser_recompute: a.allow_coarser_recompute,
        port: a.port,
        runtime: a.runtime.clone(),
    };
    let text = export(&plan, a.to, &opts)?;
    match &a.out {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| Error::Io {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            if matches!(a.to, Engine::Torchrun | Engine::Slurm) {
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
    match engine {
        Engine::Megatron => megatron(plan, opts),
        Engine::Deepspeed => deepspeed(plan, opts),
        Engine::Vila => vila(plan, opts),
        Engine::Torchrun => torchrun(plan, opts),
        Engine::Slurm => slurm(plan, opts),
    }
}

/// Why an engine's whole-layer recompute needs consent for a plan costed with mmsp-runtime's
/// recompute outside attention: every plan that recomputes (the planner searches no other
/// recompute, [`Recompute::SEARCHED`]), at any ZeRO stage. A plan of an older planner that
/// says `full` without `recompute_scope` was costed as whole-layer recompute and exports as that
/// without consent; one that says `selective` needs consent for the engine's nearest.
const OUTSIDE_ATTENTION_COARSER: &str = "the plan recomputes each layer outside attention in backward (mmsp-runtime's recompute), which this engine cannot express; pass --allow-coarser-recompute to recompute whole layers, attention included (less memory, slower), or re-plan with --recompute none";

fn unsupported(engine: Engine, msg: impl Into<String>) -> Error {
    Error::Unsupported {
        engine: engine.name(),
        msg: msg.into(),
    }
}

/// One line describing the plan, for the header comment of every export.
fn describe(plan: &Plan) -> String {
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
fn ring_inner_2d(plan: &Plan) -> bool {
    let l = &plan.layout;
    l.ulysses > 1 && l.ring > 1 && l.placement == Placement::RingInner
}

/// A string from a plan or the command line made safe for a comment line of a generated
/// script: control characters (a newline would end the comment and start a command) are
/// written as their escapes (`\n`, `\u{1b}`).
fn one_line(s: &str) -> String {
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

fn push_flags(out: &mut String, name: &str, flags: &[Vec<String>]) {
    let _ = writeln!(out, "{name}=(");
    for f in flags {
        let _ = writeln!(out, "  {}", f.join(" "));
    }
    let _ = writeln!(out, ")");
}

fn flag(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// Megatron-LM with TransformerEngine context parallelism.
///
/// Relied on (Megatron-LM `megatron/training/arguments.py`, `_add_distributed_args` and
/// `_add_training_args`): `--context-parallel-size`; `--cp-comm-type` one of p2p, a2a,
/// allgather, a2a+p2p; `--hierarchical-context-parallel-sizes`, whose help says that with
/// "2 4" "every two adjacent gpus forms the first level of cp groups", the first level being
/// the a2a one of a2a+p2p, and whose product must equal the CP size; rank order
/// tp-cp-ep-dp-pp (`initialize_model_parallel(order=...)` in `megatron/core/parallel_state.py`),
/// so tensor parallel is innermost, then CP, then DP, as in an mmsp plan;
/// `--recompute-granularity {full,selective}`, `--recompute-method {uniform,block}`,
/// `--recompute-num-layers`, `--recompute-modules` (layernorm, mlp, core_attn, ...);
/// `--use-distributed-optimizer` (ZeRO-1 style sharding of optimizer states);
/// `--micro-batch-size`, `--global-batch-size` (a multiple of micro-batch x data-parallel size).
/// TransformerEngine's a2a context parallel (`AttnFuncWithCPAndQKVOA2A` in
/// `transformer_engine/pytorch/attention.py`) asserts that the query *and* key head counts per
/// rank are divisible by the a2a size: it does not replicate kv heads. Load balancing splits the
/// sequence into 2 x CP chunks, so the sequence length must be a multiple of 2 x CP.
fn megatron(plan: &Plan, opts: &Options) -> Result<String> {
    let e = Engine::Megatron;
    let l = &plan.layout;
    let m = &plan.model;
    let cp = l.ulysses * l.ring;
    if ring_inner_2d(plan) {
        return Err(unsupported(
            e,
            format!(
                "placement ring_inner puts ring neighbours on adjacent ranks, but Megatron's --hierarchical-context-parallel-sizes always makes adjacent ranks the a2a level (export to deepspeed, whose yunchang supports ring-inner, or use a ulysses_inner plan of ulysses {} x ring {})",
                l.ulysses, l.ring
            ),
        ));
    }
    if plan.zero_stage > 1 {
        return Err(unsupported(
            e,
            format!(
                "ZeRO-{} is not available; Megatron's distributed optimizer is ZeRO-1 (re-plan with --strategy megatron-cp-tp or te-a2a-p2p)",
                plan.zero_stage
            ),
        ));
    }
    if !m.num_heads.is_multiple_of(u64::from(l.tp))
        || !m.num_kv_heads.is_multiple_of(u64::from(l.tp))
    {
        return Err(unsupported(
            e,
            format!(
                "{} query / {} kv heads are not divisible by tensor-parallel size {}",
                m.num_heads, m.num_kv_heads, l.tp
            ),
        ));
    }
    if l.ulysses > 1 {
        let (q, kv) = (
            m.num_heads / u64::from(l.tp),
            m.num_kv_heads / u64::from(l.tp),
        );
        if !q.is_multiple_of(u64::from(l.ulysses)) || !kv.is_multiple_of(u64::from(l.ulysses)) {
            return Err(unsupported(
                e,
                format!(
                    "TransformerEngine's a2a context parallel needs query and kv heads per TP rank ({q} and {kv}) divisible by the a2a size {} and does not replicate kv heads (a Ulysses degree of at most {kv} that divides {q} would fit)",
                    l.ulysses
                ),
            ));
        }
    }
    if !plan.context_tokens.is_multiple_of(2 * u64::from(cp)) {
        return Err(unsupported(
            e,
            format!(
                "sequence length {} is not a multiple of 2 x context-parallel size {}",
                plan.context_tokens, cp
            ),
        ));
    }
    let recompute: Vec<Vec<String>> = match plan.recompute_policy() {
        Recompute::None => vec![],
        Recompute::OutsideAttention if !opts.allow_coarser_recompute => {
            return Err(unsupported(e, OUTSIDE_ATTENTION_COARSER));
        }
        Recompute::Full | Recompute::OutsideAttention => vec![
            flag(&["--recompute-granularity", "full"]),
            flag(&["--recompute-method", "uniform"]),
            flag(&["--recompute-num-layers", "1"]),
        ],
        Recompute::Selective => {
            if !opts.allow_coarser_recompute {
                return Err(unsupported(
                    e,
                    "the plan's selective recompute (norm outputs and the SwiGLU product) has no exact Megatron module; pass --allow-coarser-recompute to recompute layernorm and mlp instead (less memory, slower), or re-plan (this planner plans none or mmsp-runtime's recompute outside attention)",
                ));
            }
            vec![
                flag(&["--recompute-granularity", "selective"]),
                flag(&["--recompute-modules", "layernorm", "mlp"]),
            ]
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Megatron-LM / TransformerEngine arguments from {}",
        one_line(&opts.plan_path)
    );
    let _ = writeln!(out, "# plan: {}", describe(plan));
    let _ = writeln!(
        out,
        "# Use: torchrun ... pretrain_gpt.py \"${{MMSP_MEGATRON_ARGS[@]}}\" <data, tokenizer, optimizer flags>"
    );
    let _ = writeln!(
        out,
        "# Megatron shards the sequence into 2 x CP zigzag chunks itself; the plan's per-rank token ranges are mmsp-runtime's."
    );
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
        vec!["--max-position-embeddings".into(), s(plan.context_tokens)],
        vec!["--micro-batch-size".into(), s(u64::from(plan.micro_batch))],
        vec!["--global-batch-size".into(), s(plan.global_batch)],
        vec!["--num-layers".into(), s(m.num_layers)],
        vec!["--hidden-size".into(), s(m.hidden_size)],
        vec!["--ffn-hidden-size".into(), s(m.intermediate_size)],
        vec!["--num-attention-heads".into(), s(m.num_heads)],
        vec!["--kv-channels".into(), s(m.head_dim)],
    ]);
    if m.num_kv_heads != m.num_heads {
        flags.push(flag(&["--group-query-attention"]));
        flags.push(vec!["--num-query-groups".into(), s(m.num_kv_heads)]);
    }
    if m.qkv_bias {
        flags.push(flag(&["--add-qkv-bias"]));
    }
    if !m.tie_word_embeddings {
        flags.push(flag(&["--untie-embeddings-and-output-weights"]));
    }
    flags.extend(recompute);
    if plan.zero_stage == 1 {
        flags.push(flag(&["--use-distributed-optimizer"]));
    }
    flags.push(flag(&["--bf16"]));
    push_flags(&mut out, "MMSP_MEGATRON_ARGS", &flags);
    Ok(out)
}

/// DeepSpeed-Ulysses / yunchang (USP) and a DeepSpeed config.
///
/// Relied on: yunchang `yunchang/globals.py` `set_seq_parallel_pg(sp_ulysses_degree,
/// sp_ring_degree, rank, world_size, use_ulysses_low=True)`: world size must be a multiple of
/// ulysses x ring; `use_ulysses_low=True` makes Ulysses groups consecutive ranks (mmsp
/// `ulysses_inner`), `False` makes ring groups consecutive (`ring_inner`); the zigzag ring is
/// `ring_impl_type="zigzag"` of `LongContextAttention`. yunchang has no tensor parallelism. The
/// DeepSpeed config keys are `train_batch_size`, `train_micro_batch_size_per_gpu`,
/// `gradient_accumulation_steps` (train_batch_size = micro x accumulation x data-parallel size,
/// where the sequence-parallel ranks of one sample count once) and `zero_optimization.stage`.
fn deepspeed(plan: &Plan, opts: &Options) -> Result<String> {
    let e = Engine::Deepspeed;
    let l = &plan.layout;
    if l.tp > 1 {
        return Err(unsupported(
            e,
            format!(
                "tensor parallel size {} is not available in yunchang / DeepSpeed-Ulysses (re-plan with --strategy 2d, ring or ulysses, or export to megatron)",
                l.tp
            ),
        ));
    }
    if u64::from(plan.micro_batch) * plan.grad_accum_steps * u64::from(l.dp) != plan.global_batch {
        return Err(unsupported(
            e,
            format!(
                "global batch {} is not micro-batch {} x accumulation {} x dp {}",
                plan.global_batch, plan.micro_batch, plan.grad_accum_steps, l.dp
            ),
        ));
    }
    let checkpointing = match plan.recompute_policy() {
        Recompute::None => false,
        Recompute::Full => true,
        Recompute::OutsideAttention => {
            if !opts.allow_coarser_recompute {
                return Err(unsupported(e, OUTSIDE_ATTENTION_COARSER));
            }
            true
        }
        Recompute::Selective => {
            if !opts.allow_coarser_recompute {
                return Err(unsupported(
                    e,
                    "the plan's selective recompute has no DeepSpeed / Hugging Face equivalent (gradient checkpointing recomputes whole layers); pass --allow-coarser-recompute to use full-layer checkpointing, or re-plan with --recompute none",
                ));
            }
            true
        }
    };
    let mut zero = serde_json::json!({ "stage": plan.zero_stage });
    if plan.zero_stage >= 2 {
        zero["overlap_comm"] = true.into();
        zero["contiguous_gradients"] = true.into();
    }
    let v = serde_json::json!({
        "_comment": format!("mmsp export --to deepspeed {}: {}", opts.plan_path, describe(plan)),
        "sequence_parallel": {
            "library": "yunchang",
            "ulysses_degree": l.ulysses,
            "ring_degree": l.ring,
            "use_ulysses_low": l.placement == Placement::UlyssesInner || l.ulysses == 1 || l.ring == 1,
            "ring_impl_type": "zigzag",
            "data_parallel_degree": l.dp,
            "gradient_checkpointing": checkpointing,
            "setup": format!(
                "set_seq_parallel_pg({}, {}, rank, {}, use_ulysses_low={}); LongContextAttention(ring_impl_type=\"zigzag\")",
                l.ulysses,
                l.ring,
                plan.world_size,
                if l.placement == Placement::RingInner && l.ulysses > 1 && l.ring > 1 { "False" } else { "True" }
            ),
        },
        "deepspeed_config": {
            "train_batch_size": plan.global_batch,
            "train_micro_batch_size_per_gpu": plan.micro_batch,
            "gradient_accumulation_steps": plan.grad_accum_steps,
            "bf16": { "enabled": true },
            "zero_optimization": zero,
            "gradient_clipping": 1.0,
        },
    });
    let mut s =
        serde_json::to_string_pretty(&v).map_err(|e| Error::invalid("plan", e.to_string()))?;
    s.push('\n');
    Ok(s)
}

/// LongVILA (NVlabs/VILA) training flags.
///
/// Relied on (VILA `llava/train/args.py` TrainingArguments and `llava/train/train.py`):
/// `--seq_parallel_size` (the SP degree; -1 disables), `--seq_parallel_ring_size` (ring degree;
/// `seq_parallel_size` = ring x ulysses), `--seq_parallel_ring_type` one of `ring_varlen`,
/// `zigzag_ring_varlen` (only used when the ring size is > 1). The trainer calls
/// `set_pg_manager(sp_degree, ring_degree, ring_type=...)` without `use_ulysses_low`, whose
/// default `True` makes Ulysses groups consecutive ranks. The README: with SP, each group of
/// `seq_parallel_size` GPUs counts as one device, so global batch = per-device batch x
/// accumulation x data-parallel size. DeepSpeed ZeRO comes from `--deepspeed <config.json>`;
/// VILA has no tensor parallelism.
fn vila(plan: &Plan, opts: &Options) -> Result<String> {
    let e = Engine::Vila;
    let l = &plan.layout;
    if l.tp > 1 {
        return Err(unsupported(
            e,
            format!(
                "tensor parallel size {} is not available in VILA (re-plan with --strategy 2d, ring or ulysses)",
                l.tp
            ),
        ));
    }
    if ring_inner_2d(plan) {
        return Err(unsupported(
            e,
            "placement ring_inner is not reachable: VILA's set_pg_manager is called with the default use_ulysses_low=True, which puts Ulysses groups on adjacent ranks (re-plan, or export to deepspeed, where yunchang takes use_ulysses_low=False)",
        ));
    }
    let gc = match plan.recompute_policy() {
        Recompute::None => "False",
        Recompute::Full => "True",
        Recompute::OutsideAttention => {
            if !opts.allow_coarser_recompute {
                return Err(unsupported(e, OUTSIDE_ATTENTION_COARSER));
            }
            "True"
        }
        Recompute::Selective => {
            if !opts.allow_coarser_recompute {
                return Err(unsupported(
                    e,
                    "the plan's selective recompute has no VILA flag (--gradient_checkpointing recomputes whole layers); pass --allow-coarser-recompute to use it, or re-plan with --recompute none",
                ));
            }
            "True"
        }
    };
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
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# LongVILA (VILA) training flags from {}",
        one_line(&opts.plan_path)
    );
    let _ = writeln!(out, "# plan: {}", describe(plan));
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
    let _ = writeln!(
        out,
        "# Use: torchrun --nnodes {} --nproc_per_node {} llava/train/train_mem.py \"${{MMSP_VILA_ARGS[@]}}\" <model, data flags>",
        nodes(plan).0,
        nodes(plan).1
    );
    push_flags(&mut out, "MMSP_VILA_ARGS", &flags);
    Ok(out)
}

/// (nodes, processes per node) of a plan: whole nodes, or one partial node for small worlds.
fn nodes(plan: &Plan) -> (u32, u32) {
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
