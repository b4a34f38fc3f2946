//! Inference subcommands: `infer` (sequence-parallel prefill and sharded-KV greedy decoding)
//! and `needle` (needle in a haystack against a chunked single-device reference).
use crate::usage;
use anyhow::{Context, Result};
use clap::Subcommand;
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::plan::{Layout, Placement};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Inference subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Inference from a plan made by `mmsp plan --mode inference`: sequence-parallel
    /// prefill and sharded-KV greedy decoding, one thread per rank of the plan in this
    /// process (a random model of the plan's shape, or --tiny). Token ids only.
    Infer(InferArgs),
    /// Needle in a haystack: sharded prefill and decode (in-process ranks) against a chunked
    /// single-device reference at the needle's positions, with the plan's predictions.
    Needle(NeedleArgs),
}

/// Runs one inference subcommand.
pub fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Infer(a) => infer(a),
        Cmd::Needle(a) => needle(a),
    }
}

#[derive(clap::Args)]
pub struct InferArgs {
    /// Plan JSON with "mode": "inference".
    plan: std::path::PathBuf,
    /// Prompt token ids, comma-separated.
    #[arg(long, default_value = "", conflicts_with = "haystack")]
    prompt: String,
    /// Instead of --prompt: this many seeded random token ids (long-context runs).
    #[arg(long)]
    haystack: Option<usize>,
    #[arg(long, default_value_t = 16)]
    max_new: usize,
    /// End-of-sequence token id.
    #[arg(long)]
    eos: Option<i64>,
    /// The CI model (2 layers, hidden 64, 4 heads, 2 kv heads, vocab 128) instead of the
    /// plan's model shape.
    #[arg(long)]
    tiny: bool,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f64, f32 or bf16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long)]
    dtype: Option<String>,
}

fn infer(a: InferArgs) -> Result<()> {
    use mmsp_runtime::infer::{run_local, InferPlan};
    use mmsp_runtime::model::{Decoder, ModelConfig};
    let plan = InferPlan::from_file(&a.plan)?;
    let prompt: Vec<i64> = match a.haystack {
        Some(n) => {
            tch::manual_seed(a.seed);
            let cfg_vocab = if a.tiny { 128 } else { 32000 };
            Vec::<i64>::try_from(Tensor::randint(
                cfg_vocab,
                [n as i64],
                (Kind::Int64, Device::Cpu),
            ))?
        }
        None => a
            .prompt
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<i64>()
                    .with_context(|| format!("bad token id {t:?} in --prompt"))
            })
            .collect::<Result<_>>()?,
    };
    plan.check_prompt(prompt.len())?;
    let cfg = if a.tiny {
        ModelConfig::tiny()
    } else {
        let m = plan
            .model
            .as_ref()
            .ok_or_else(|| crate::util::usage("the plan has no model; use --tiny"))?;
        ModelConfig::from_plan_value(m)?
    };
    if let Some(&t) = prompt
        .iter()
        .find(|&&t| t < 0 || t >= cfg.vocab_size as i64)
    {
        usage!(
            "token id {t} is outside the vocabulary of {}",
            cfg.vocab_size
        );
    }
    let dev = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => usage!("CUDA is not available to libtorch"),
        d => usage!("--device must be cpu or cuda, not {d:?}"),
    };
    let kind = match (a.dtype.as_deref(), dev) {
        (Some("f64"), _) => Kind::Double,
        (Some("f32"), _) | (None, Device::Cpu) => Kind::Float,
        (Some("bf16"), _) | (None, _) => Kind::BFloat16,
        (Some(d), _) => usage!("--dtype must be f64, f32 or bf16, not {d:?}"),
    };
    let l = plan.plan.layout;
    let t0 = Instant::now();
    let gens = run_local(
        l,
        plan.context_tokens,
        &|| Decoder::random(cfg.clone(), dev, kind, kind, a.seed),
        Backend::default_for(dev),
        &prompt,
        a.max_new,
        a.eos,
    )?;
    let g = &gens[0];
    let mut d = g.decode_s.clone();
    d.sort_by(|x, y| x.total_cmp(y));
    let med = d.get(d.len() / 2).copied();
    println!(
        "{}",
        json!({"bench": "infer", "world": l.world_size(), "ulysses": l.ulysses, "ring": l.ring,
            "device": format!("{dev:?}"), "dtype": format!("{kind:?}"),
            "prompt_tokens": prompt.len(), "tokens": g.tokens, "stopped_on_eos": g.stopped_on_eos,
            "prefill_s": g.prefill_s, "prefill_tokens_per_s": prompt.len() as f64 / g.prefill_s,
            "decode_ms_per_token_median": med.map(|x| x * 1e3),
            "kv_bytes_per_rank": gens.iter().map(|g| g.kv_bytes).collect::<Vec<_>>(),
            "kv_tokens_per_rank": gens.iter().map(|g| g.kv_tokens).collect::<Vec<_>>(),
            "wall_s": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct NeedleArgs {
    /// Plan JSON with "mode": "inference" (its model shape is used).
    plan: std::path::PathBuf,
    /// Prompt tokens [default: the plan's context minus --decode].
    #[arg(long)]
    tokens: Option<usize>,
    /// Run this layout ULYSSESxRING (in-process ranks on the same device) instead of the plan's.
    #[arg(long)]
    layout: Option<String>,
    #[arg(long, default_value_t = 16)]
    needle: usize,
    #[arg(long, default_value_t = 8)]
    decode: usize,
    /// Query chunk of the single-device reference.
    #[arg(long, default_value_t = 65536)]
    chunk: usize,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// cpu or cuda.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// f64, f32 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

fn needle(a: NeedleArgs) -> Result<()> {
    use mmsp_runtime::infer::needle::{run_needle, NeedleOpts};
    use mmsp_runtime::infer::InferPlan;
    use mmsp_runtime::model::{Decoder, ModelConfig};
    let text = std::fs::read_to_string(&a.plan)?;
    let plan = InferPlan::from_json(&text)?;
    let plan_json: serde_json::Value = serde_json::from_str(&text)?;
    let cfg = ModelConfig::from_plan_value(
        plan.model
            .as_ref()
            .ok_or_else(|| crate::util::usage("the plan has no model"))?,
    )?;
    let layout = match a.layout.as_deref() {
        None => plan.plan.layout,
        Some(s) => {
            let (u, r) = s
                .split_once('x')
                .ok_or_else(|| crate::util::usage("--layout is ULYSSESxRING"))?;
            Layout::sp(u.parse()?, r.parse()?, Placement::UlyssesInner)
        }
    };
    let dev = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => usage!("CUDA is not available to libtorch"),
        d => usage!("--device must be cpu or cuda, not {d:?}"),
    };
    let kind = match a.dtype.as_str() {
        "f64" => Kind::Double,
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        d => usage!("--dtype must be f64, f32 or bf16, not {d:?}"),
    };
    let out = run_needle(&NeedleOpts {
        plan: &plan,
        plan_json: &plan_json,
        layout,
        make_model: &|| Decoder::random(cfg.clone(), dev, kind, kind, a.seed),
        backend: Backend::default_for(dev),
        prompt_len: a
            .tokens
            .unwrap_or(plan.context_tokens.saturating_sub(a.decode)),
        pattern: a.needle,
        places: &[0.05, 0.3, 0.61, 0.9],
        decode: a.decode,
        chunk: a.chunk,
        seed: a.seed as u64,
    })?;
    let mut out = out;
    out["model"] = json!({"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size,
        "vocab": cfg.vocab_size});
    out["device"] = json!(format!("{dev:?}"));
    out["dtype"] = json!(format!("{kind:?}"));
    println!("{out}");
    Ok(())
}
