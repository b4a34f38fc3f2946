//! `mmsp validate`: the planner against figures it did not produce. A table shipped in the
//! repository (`validation/published.toml`) lists published training throughputs with their
//! setups (model, GPUs, TP / CP / Ulysses / DP, sequence length, batch, precision, GPU type)
//! and sources; each row is run through the planner with its engine's profile
//! ([`crate::engines`]) at the pinned layout (micro-batch and recompute searched among the
//! engine's options where the source does not state them), simulated, and converted to the
//! source's own metric and FLOP counting, so that predicted and published compare like with
//! like. The residual per row, the mean and worst absolute error overall and per engine are
//! printed as they come: no constant is fitted to them (Calculon validates its model the same
//! way against Megatron's published step times, `shared/reference/README.md`).

use serde::{Deserialize, Serialize};

use crate::engines::{self, Engine, Profile, FP8_GEMM_SPEEDUP};
use crate::error::{Error, Result};
use crate::search::{LayoutPin, Request};
use crate::spec::cluster::ClusterSpec;
use crate::spec::model::ModelSpec;
use crate::topology::Topology;
use crate::units::parse_tokens;

/// The table shipped with the tool.
pub const PUBLISHED: &str = include_str!("../../validation/published.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    source: Vec<Source>,
    row: Vec<RawRow>,
}

/// Where published figures come from and how they count.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub id: String,
    pub title: String,
    /// The table or figure the rows come from.
    pub table: String,
    pub url: String,
    /// The engine that produced the figures (`mmsp compare`'s engine names).
    pub engine: String,
    /// The profile's row in `mmsp compare` (megatron-cp-tp, te-a2a-p2p, ring-flash-attn, ...).
    pub profile: String,
    pub model: String,
    pub topology: String,
    /// "bf16" or "fp8" (GEMMs in FP8, attention in bf16).
    pub precision: String,
    /// "tflops_per_gpu", "tokens_per_s_per_gpu" or "step_time_s".
    pub metric: String,
    /// How the source counts FLOPs: "nemo-llama" (NeMo's Llama formula, attention counted
    /// non-causal), "palm" (the planner's MFU counting) or "none" (a metric without FLOPs).
    pub counting: String,
    /// The counting in words, with its source.
    pub counting_note: String,
    /// Recompute as the source states it, or "not stated" (then searched).
    pub recompute: String,
    pub software: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    source: String,
    context: String,
    gpus: u32,
    global_batch: u64,
    tp: u32,
    cp: u32,
    #[serde(default = "one")]
    ulysses: u32,
    dp: u32,
    #[serde(default = "one")]
    pp: u32,
    micro_batch: Option<u32>,
    published: f64,
}

fn one() -> u32 {
    1
}

/// One published figure against the planner's.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationRow {
    pub source: String,
    pub engine: String,
    pub profile: String,
    pub model: String,
    pub gpus: u32,
    pub context_tokens: u64,
    pub global_batch: u64,
    pub tp: u32,
    pub cp: u32,
    pub ulysses: u32,
    pub dp: u32,
    pub precision: String,
    pub metric: String,
    pub published: f64,
    /// Absent when the planner finds the setup infeasible (then `why` says why).
    pub predicted: Option<f64>,
    /// (predicted - published) / published.
    pub error: Option<f64>,
    pub step_time_s: Option<f64>,
    pub micro_batch: Option<u32>,
    pub recompute: Option<String>,
    pub memory_per_gpu_bytes: Option<f64>,
    pub why: String,
}

/// Mean and worst absolute relative error of a group of rows.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorSummary {
    pub group: String,
    pub rows: usize,
    pub predicted_rows: usize,
    pub mean_abs_error: Option<f64>,
    pub worst_abs_error: Option<f64>,
}

/// The whole validation.
#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    pub sources: Vec<Source>,
    pub rows: Vec<ValidationRow>,
    /// Overall first, then per engine.
    pub summary: Vec<ErrorSummary>,
}

/// Parses a validation table (TOML), `name` for messages.
fn parse(text: &str, name: &str) -> Result<(Vec<Source>, Vec<RawRow>)> {
    let t: RawTable = toml::from_str(text).map_err(|e| Error::Parse {
        path: name.into(),
        msg: e.to_string().replace('\n', " "),
    })?;
    for r in &t.row {
        let bad = |msg: String| Error::Parse {
            path: name.into(),
            msg,
        };
        let src = t
            .source
            .iter()
            .find(|s| s.id == r.source)
            .ok_or_else(|| bad(format!("row source '{}' is not a [[source]] id", r.source)))?;
        if r.pp != 1 {
            return Err(bad(format!(
                "row of '{}' at {}: pipeline parallelism (pp = {}) is not modelled; expected pp = 1",
                r.source, r.context, r.pp
            )));
        }
        if r.tp * r.cp * r.ulysses * r.dp != r.gpus {
            return Err(bad(format!(
                "row of '{}' at {}: tp x cp x ulysses x dp = {} is not its {} GPUs",
                r.source,
                r.context,
                r.tp * r.cp * r.ulysses * r.dp,
                r.gpus
            )));
        }
        profile_of(src).map_err(|e| bad(e.to_string()))?;
        let flops = src.metric == "tflops_per_gpu";
        if !["tflops_per_gpu", "tokens_per_s_per_gpu", "step_time_s"].contains(&src.metric.as_str())
            || flops != ["nemo-llama", "palm"].contains(&src.counting.as_str())
            || (!flops && src.counting != "none")
            || !["bf16", "fp8"].contains(&src.precision.as_str())
        {
            return Err(bad(format!(
                "source '{}': expected metric tflops_per_gpu (counting nemo-llama or palm), tokens_per_s_per_gpu or step_time_s (counting none), precision bf16 or fp8",
                src.id
            )));
        }
    }
    Ok((t.source, t.row))
}

/// The profile a source's rows are costed with.
fn profile_of(src: &Source) -> Result<Profile> {
    let engine = Engine::parse(&src.engine)?;
    engines::profiles()
        .into_iter()
        .find(|p| p.engine == engine && p.row == src.profile)
        .ok_or_else(|| {
            Error::invalid(
                "profile",
                format!(
                    "'{}' is not a profile of engine {}",
                    src.profile, src.engine
                ),
            )
        })
}

/// Model FLOPs of one step as NeMo counts them for Llama models (NeMo's `flops_formulas.py`,
/// `llama2` / `llama3`): gbs x s x layers x h^2 x (12 + 12 kv/heads + 18 ffn/h + 12 s/h +
/// 6 vocab/(layers x h)); the 12 s/h term is attention's QK^T and AV, forward and backward,
/// over the whole s x s score matrix (not halved for the causal mask).
pub fn nemo_llama_flops(m: &ModelSpec, global_batch: u64, s: f64) -> f64 {
    let (h, l) = (m.hidden_size as f64, m.num_layers as f64);
    global_batch as f64
        * s
        * l
        * h
        * h
        * (12.0
            + 12.0 * m.num_kv_heads as f64 / m.num_heads as f64
            + 18.0 * m.intermediate_size as f64 / h
            + 12.0 * s / h
            + 6.0 * m.vocab_size as f64 / (l * h))
}

/// Runs one row through the planner.
fn run_row(src: &Source, r: &RawRow) -> Result<ValidationRow> {
    let profile = profile_of(src)?;
    let model = crate::spec::model::load(&src.model)?;
    let cluster = ClusterSpec::load(&src.topology)?;
    cluster.check_gpus(u64::from(r.gpus))?;
    let topo = Topology::build(&cluster, r.gpus);
    let context = parse_tokens(&r.context)?;
    let req = Request {
        gpus: r.gpus,
        context,
        global_batch: Some(r.global_batch),
        recompute: None,
        strategy: profile.strategy,
        pin: Some(LayoutPin {
            ulysses: r.ulysses,
            ring: r.cp,
        }),
        zero: None,
    };
    let speedup = if src.precision == "fp8" {
        FP8_GEMM_SPEEDUP
    } else {
        1.0
    };
    let mut res = engines::search(&profile, &topo, &model, &req, None, speedup);
    res.ranked.retain(|s| {
        s.candidate.layout.tp == r.tp
            && s.candidate.layout.dp == r.dp
            && r.micro_batch.is_none_or(|m| m == s.candidate.micro_batch)
    });
    let mut out = ValidationRow {
        source: src.id.clone(),
        engine: src.engine.clone(),
        profile: src.profile.clone(),
        model: model.name.clone(),
        gpus: r.gpus,
        context_tokens: context,
        global_batch: r.global_batch,
        tp: r.tp,
        cp: r.cp,
        ulysses: r.ulysses,
        dp: r.dp,
        precision: src.precision.clone(),
        metric: src.metric.clone(),
        published: r.published,
        predicted: None,
        error: None,
        step_time_s: None,
        micro_batch: None,
        recompute: None,
        memory_per_gpu_bytes: None,
        why: String::new(),
    };
    let Some((best, step)) = engines::refine(&topo, &res).into_iter().next() else {
        let closest = res
            .infeasible
            .iter()
            .filter(|(c, _)| c.layout.tp == r.tp && c.layout.dp == r.dp)
            .map(|(_, e)| e.to_string())
            .min();
        out.why = format!(
            "infeasible under the profile: {}",
            closest.unwrap_or_else(|| "no candidate at this layout".into())
        );
        return Ok(out);
    };
    let predicted = match (src.metric.as_str(), src.counting.as_str()) {
        ("step_time_s", _) => step,
        ("tokens_per_s_per_gpu", _) => {
            (r.global_batch * context) as f64 / (step * f64::from(r.gpus))
        }
        (_, "nemo-llama") => {
            nemo_llama_flops(&model, r.global_batch, context as f64)
                / (step * f64::from(r.gpus))
                / 1e12
        }
        _ => best.estimate.model_flops / (step * f64::from(r.gpus)) / 1e12,
    };
    out.predicted = Some(predicted);
    out.error = Some((predicted - r.published) / r.published);
    out.step_time_s = Some(step);
    out.micro_batch = Some(best.candidate.micro_batch);
    out.recompute = Some(
        if best.candidate.recompute == crate::cost::Recompute::None {
            "none"
        } else {
            "full"
        }
        .into(),
    );
    out.memory_per_gpu_bytes = Some(best.estimate.memory_per_gpu_bytes);
    out.why = "pinned layout; micro-batch and recompute searched".into();
    Ok(out)
}

fn summarize(group: &str, rows: &[&ValidationRow]) -> ErrorSummary {
    let errs: Vec<f64> = rows.iter().filter_map(|r| r.error.map(f64::abs)).collect();
    ErrorSummary {
        group: group.into(),
        rows: rows.len(),
        predicted_rows: errs.len(),
        mean_abs_error: (!errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64),
        worst_abs_error: errs.iter().copied().reduce(f64::max),
    }
}

/// Validates the planner against a table (`text`, named `name` in messages), keeping the rows
/// of the `engines` given (all when empty).
pub fn validate(text: &str, name: &str, engines: &[Engine]) -> Result<Validation> {
    let (sources, raw) = parse(text, name)?;
    let mut rows = Vec::new();
    for r in &raw {
        let src = sources
            .iter()
            .find(|s| s.id == r.source)
            .expect("parse checked every row's source");
        if !engines.is_empty() && !engines.contains(&Engine::parse(&src.engine)?) {
            continue;
        }
        rows.push(run_row(src, r)?);
    }
    let all: Vec<&ValidationRow> = rows.iter().collect();
    let mut summary = vec![summarize("all", &all)];
    for e in Engine::ALL {
        let of: Vec<&ValidationRow> = rows.iter().filter(|r| r.engine == e.name()).collect();
        if !of.is_empty() {
            summary.push(summarize(e.name(), &of));
        }
    }
    Ok(Validation {
        sources,
        rows,
        summary,
    })
}

/// The table `mmsp validate` prints.
pub fn table(v: &Validation) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "mmsp validate: {} published rows, each at its pinned layout with its engine's profile (simulated step time, the source's metric and counting)",
        v.rows.len()
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "  {:<26} {:<10} {:>5} {:>7} {:>5} {:<16} {:<5} {:<20} {:>10} {:>10} {:>8}  planner chose",
        "source",
        "model",
        "gpus",
        "context",
        "batch",
        "layout",
        "prec",
        "metric",
        "predicted",
        "published",
        "error",
    );
    for r in &v.rows {
        let layout = format!("t{} cp{} u{} dp{}", r.tp, r.cp, r.ulysses, r.dp);
        let chose = match (r.micro_batch, &r.recompute, r.memory_per_gpu_bytes) {
            (Some(mb), Some(rc), Some(m)) => {
                format!("mb{mb} recompute {rc}, {}", crate::units::fmt_gib(m))
            }
            _ => r.why.clone(),
        };
        let _ = writeln!(
            o,
            "  {:<26} {:<10} {:>5} {:>7} {:>5} {:<16} {:<5} {:<20} {:>10} {:>10} {:>8}  {}",
            r.source,
            r.model,
            r.gpus,
            crate::units::fmt_tokens(r.context_tokens),
            r.global_batch,
            layout,
            r.precision,
            r.metric,
            r.predicted.map_or("-".into(), |x| format!("{x:.1}")),
            format!("{:.1}", r.published),
            r.error
                .map_or("-".into(), |e| format!("{:+.1}%", e * 100.0)),
            chose
        );
    }
    let _ = writeln!(o);
    for s in &v.summary {
        let pct = |x: Option<f64>| x.map_or("-".into(), |e| format!("{:.1}%", e * 100.0));
        let _ = writeln!(
            o,
            "  {:<18} rows {:>3} (predicted {:>3})  mean |error| {:>6}  worst {:>6}",
            s.group,
            s.rows,
            s.predicted_rows,
            pct(s.mean_abs_error),
            pct(s.worst_abs_error)
        );
    }
    let _ = writeln!(o);
    for s in &v.sources {
        let _ = writeln!(o, "  [{}] {}, {} ({})", s.id, s.title, s.table, s.url);
        let _ = writeln!(
            o,
            "      {} {} on {}, {}; recompute {}; counting: {}",
            s.engine, s.software, s.topology, s.precision, s.recompute, s.counting_note
        );
    }
    o
}
