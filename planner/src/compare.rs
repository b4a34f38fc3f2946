//! Strategy comparison and simulator refinement: the best configuration of each strategy
//! of each engine on the same topology, its simulated step time, memory, max context, and the
//! main reason it loses to `2d`. Each row is costed by its engine's profile
//! ([`crate::engines`]): 2d, ring and ulysses as mmsp-runtime runs them (the default profile,
//! the cost model unchanged: every ZeRO stage, none or the runtime's recompute outside
//! attention); megatron-cp-tp and te-a2a-p2p as Megatron-Core with Transformer Engine
//! (distributed optimizer, Korthikanti activations, whole-layer recompute, cuDNN attention,
//! TE's p2p or hierarchical a2a+p2p context parallelism); ring-flash-attn, usp (yunchang),
//! ds-ulysses and vila-mmsp as those libraries run on DeepSpeed ZeRO with FlashAttention-2.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cost::compute::ATTN_TRAIN_FACTOR;
use crate::cost::{terms, Candidate, Infeasible, Layout, Placement, Recompute, Workload};
use crate::engines::{self, Engine, Profile};
use crate::multimodal::MultiModal;
use crate::search::{self, why_slower_by, Request, Scored, SearchResult, Strategy};
use crate::sim::simulate;
use crate::spec::model::ModelSpec;
use crate::topology::Topology;
use crate::units::{fmt_gib, fmt_secs, fmt_tokens};

use crate::sim::first_of_each_layout;

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
    let firsts = first_of_each_layout(result.ranked.iter(), |s| s.candidate.layout);
    let mut out: Vec<(Scored, f64)> = firsts
        .into_iter()
        .filter_map(|s| {
            let c = &s.candidate;
            let w = workload_of(topo, model, context, result.global_batch, mm, &c.layout)?;
            let t = terms(topo, &w, c).ok()?;
            // A step the simulator cannot complete is not a candidate.
            Some((s.clone(), simulate(topo, &t, true).ok()?.step_time_s))
        })
        .collect();
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// A candidate's workload: the request's context as its layout runs it (padded; with samples,
/// theirs) with its vision stage, `None` where the stage cannot run.
fn workload_of<'m>(
    topo: &Topology,
    model: &'m ModelSpec,
    context: u64,
    global_batch: u64,
    mm: Option<&MultiModal>,
    layout: &Layout,
) -> Option<Workload<'m>> {
    let context = search::candidate_context(context, mm, layout);
    let vision = match mm {
        Some(mm) => Some(mm.stage(topo, model, layout, context).ok()?),
        None => None,
    };
    Some(Workload {
        model,
        context,
        global_batch,
        vision,
    })
}

/// One strategy's row in a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyRow {
    pub name: String,
    /// The engine whose profile costs it (`crate::engines`).
    pub engine: String,
    pub feasible: bool,
    /// Simulated step time of its best configuration (seconds); absent when infeasible.
    pub step_time_s: Option<f64>,
    pub analytic_step_time_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    pub hfu: Option<f64>,
    /// This strategy's step time over 2d's (above 1: slower than 2d).
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

/// A row's best (simulated) configuration or why it has none, and its max context.
struct Outcome {
    profile: Profile,
    best: Result<(Scored, f64), String>,
    max_context: Option<u64>,
}

/// The mmsp-runtime rows, as before the engine profiles: the search and its refinement.
fn runtime_outcome(
    topo: &Topology,
    model: &ModelSpec,
    req: &Request,
    mm: Option<&MultiModal>,
) -> (Result<(Scored, f64), String>, Option<u64>) {
    let res = search::search(topo, model, req, mm);
    let one = Request {
        global_batch: Some(1),
        ..req.clone()
    };
    // A plain-text maximum is not comparable with packed multi-modal samples.
    let max_ctx = match mm {
        Some(_) => None,
        None => search::max_context_tokens(topo, model, &one),
    };
    let best = refine(topo, model, &res, req.context, mm)
        .into_iter()
        .next()
        .ok_or_else(|| {
            let e = search::no_plan_error_for(topo, model, req, &res, mm).to_string();
            e.split_once(": ").map_or(e.clone(), |x| x.1.to_string())
        });
    (best, max_ctx)
}

/// Another engine's row: its profile's search, the simulator's refinement, its max context.
fn engine_outcome(
    p: &Profile,
    topo: &Topology,
    model: &ModelSpec,
    req: &Request,
    mm: Option<&MultiModal>,
) -> (Result<(Scored, f64), String>, Option<u64>) {
    let res = engines::search(p, topo, model, req, mm, 1.0);
    let max_ctx = match mm {
        Some(_) => None,
        None => engines::max_context(p, topo, model, req),
    };
    let best = engines::refine(topo, &res)
        .into_iter()
        .next()
        .map(|(s, sim)| {
            let scored = Scored {
                candidate: s.candidate,
                estimate: s.estimate,
            };
            (scored, sim)
        })
        .ok_or_else(|| engine_no_plan(&res));
    (best, max_ctx)
}

/// Why an engine has no plan, in one phrase.
fn engine_no_plan(res: &engines::EngineSearch) -> String {
    let closest = Infeasible::closest_memory_miss(res.infeasible.iter().map(|(_, e)| e));
    match closest {
        Some((n, a)) => format!(
            "the closest needs {} per GPU ({} available)",
            fmt_gib(n),
            fmt_gib(a)
        ),
        None if res.infeasible.is_empty() => "no layout of this engine for these GPUs".into(),
        None => {
            // Each kind of reason once, with its example of the fewest DP ranks (the closest
            // to running a batch that does not divide).
            let mut all: Vec<&(crate::cost::Candidate, Infeasible)> =
                res.infeasible.iter().collect();
            all.sort_by_key(|(c, _)| c.layout.dp);
            let mut seen: Vec<(std::mem::Discriminant<Infeasible>, String)> = Vec::new();
            for (_, e) in all {
                let kind = std::mem::discriminant(e);
                if !seen.iter().any(|x| x.0 == kind) {
                    seen.push((kind, e.to_string()));
                }
            }
            let reasons: Vec<&str> = seen.iter().map(|x| x.1.as_str()).collect();
            format!(
                "every layout of this engine is infeasible: {}",
                reasons.join("; ")
            )
        }
    }
}

/// `f` of every item, in order, on as many threads as the machine runs at once (at most one
/// per item), each taking the next item left: the rows of a comparison are independent, and
/// their shared caches (the topology's collective costs, the vision stages) hold pure values,
/// so the answer is the same on any number of threads.
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    done.sort_by_key(|x| x.0);
    done.into_iter().map(|x| x.1).collect()
}

/// Runs every strategy of the selected engines on the same model, topology and request.
/// With `mm`, every strategy plans the same multi-modal samples (both MM-SP stages costed).
pub fn compare(
    topo: &Topology,
    model: &ModelSpec,
    base: &Request,
    mm: Option<&MultiModal>,
    selected: &[Engine],
) -> Comparison {
    let global_batch = base
        .global_batch
        .unwrap_or_else(|| search::default_global_batch(base.context));
    let profiles: Vec<Profile> = engines::profiles()
        .into_iter()
        .filter(|p| selected.contains(&p.engine))
        .collect();
    let outcome = |profile: &Profile| {
        let req = Request {
            strategy: profile.strategy,
            ..base.clone()
        };
        let (best, max_context) = if profile.engine == Engine::MmspRuntime {
            runtime_outcome(topo, model, &req, mm)
        } else {
            engine_outcome(profile, topo, model, &req, mm)
        };
        Outcome {
            profile: profile.clone(),
            best,
            max_context,
        }
    };
    // The first row (2d: every Ulysses x ring split) alone, then the others on the threads:
    // its search prices most of the group families the others look up, which threads starting
    // together would each price again.
    let mut outcomes: Vec<Outcome> = profiles.first().map(outcome).into_iter().collect();
    outcomes.extend(in_parallel(profiles.get(1..).unwrap_or_default(), outcome));
    let reference = outcomes
        .iter()
        .find(|o| o.profile.engine == Engine::MmspRuntime && o.profile.strategy == Strategy::TwoD)
        .and_then(|o| o.best.as_ref().ok())
        .cloned();
    let strategies = outcomes
        .into_iter()
        .map(|o| row(topo, o, reference.as_ref()))
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

/// One row of the comparison against 2d's best (`reference`).
fn row(topo: &Topology, o: Outcome, reference: Option<&(Scored, f64)>) -> StrategyRow {
    let is_2d = o.profile.engine == Engine::MmspRuntime && o.profile.strategy == Strategy::TwoD;
    let empty = StrategyRow {
        name: o.profile.row.into(),
        engine: o.profile.engine.name().into(),
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
        max_context_tokens: o.max_context,
        why: String::new(),
    };
    let (best, sim) = match o.best {
        Err(why) => return StrategyRow { why, ..empty },
        Ok(x) => x,
    };
    let e = &best.estimate;
    let (speedup_of_2d, why) = match reference {
        None => (None, "2d has no feasible plan".to_string()),
        Some(_) if is_2d => (Some(1.0), "reference".to_string()),
        Some((b2d, sim2d)) => {
            let why = if sim > sim2d * 1.005 {
                let generic = why_slower_by(topo, b2d, &best, Some(sim / sim2d - 1.0));
                engine_why(&o.profile, &best, sim - sim2d, sim / sim2d - 1.0, generic)
            } else if sim < sim2d * 0.995 {
                "faster than 2d here".to_string()
            } else {
                "ties with 2d (within 0.5%)".to_string()
            };
            (Some(sim / sim2d), why)
        }
    };
    // Another engine's recompute is whole-layer (Korthikanti et al. 2022).
    let recompute = match (o.profile.engine, best.candidate.recompute) {
        (Engine::MmspRuntime, r) | (_, r @ Recompute::None) => r,
        _ => Recompute::Full,
    };
    StrategyRow {
        feasible: true,
        step_time_s: Some(sim),
        analytic_step_time_s: Some(e.step_time_s),
        tokens_per_s: Some(e.tokens_per_s * e.step_time_s / sim),
        mfu: Some(e.mfu * e.step_time_s / sim),
        hfu: Some(e.hfu * e.step_time_s / sim),
        speedup_of_2d,
        layout: Some(best.candidate.layout),
        zero_stage: Some(best.candidate.zero_stage),
        recompute: Some(recompute),
        micro_batch: Some(best.candidate.micro_batch),
        memory_per_gpu_bytes: Some(e.memory_per_gpu_bytes),
        why,
        ..empty
    }
}

/// Why another engine's row is slower than 2d: what its profile changes (its attention kernels,
/// its whole-layer recompute), each with the time it adds, and the cost model's own reason
/// (`generic`, from [`why_slower_by`]) when those explain less than half of the gap.
fn engine_why(p: &Profile, best: &Scored, gap_s: f64, slower: f64, generic: String) -> String {
    if p.engine == Engine::MmspRuntime {
        return generic;
    }
    let t = &best.estimate.time;
    let full = best.candidate.recompute != Recompute::None;
    // Whole-layer recompute runs attention forward once more: 1 of its 4.5 forwards.
    let attn_again = if full {
        t.attention_s / (ATTN_TRAIN_FACTOR + 1.0)
    } else {
        0.0
    };
    let mut causes: Vec<(f64, String)> = Vec::new();
    if p.attention_efficiency < 1.0 {
        let merge = if p.python_merge && best.candidate.layout.ring > 1 {
            " and the ring merge in PyTorch"
        } else {
            ""
        };
        causes.push((
            (t.attention_s - attn_again) * (1.0 - p.attention_efficiency),
            format!(
                "FlashAttention-2 kernels at {} x cuDNN{merge}",
                p.attention_efficiency
            ),
        ));
    }
    if full {
        causes.push((
            attn_again + t.recompute_s,
            "whole-layer recompute re-runs attention and the GEMMs".into(),
        ));
    }
    let explained: f64 = causes.iter().map(|c| c.0).sum();
    if causes.is_empty() {
        return generic;
    }
    let mut parts: Vec<String> = causes
        .iter()
        .map(|(s, l)| format!("{l} (+{})", fmt_secs(*s)))
        .collect();
    if explained < 0.5 * gap_s {
        parts.push(
            generic
                .split_once(": ")
                .map_or(generic.clone(), |x| x.1.to_string()),
        );
    }
    format!("{:.0}% slower: {}", slower * 100.0, parts.join("; "))
}

/// What `mmsp compare`'s table counts, printed under it.
pub const LEGEND: &str = "  vs 2d: step time against 2d's (+ slower, - faster). Engines (crate::engines): mmsp-runtime (ZeRO 0-3 searched, recompute outside attention); megatron-core (distributed optimizer 6 + 12/d B per parameter over DP x CP, cuDNN attention, whole-layer recompute, Megatron logits 6 B);\n  ring-flash-attn, yunchang (usp), deepspeed-ulysses, vila-mmsp (DeepSpeed ZeRO 4 + 12/N, 2 + 14/N, 16/N; FlashAttention-2 at 0.574 x cuDNN, measured; Hugging Face logits 10 B; ring merge in PyTorch).\n  MFU counts 6 x params x tokens and causal attention at 3x its forward (PaLM, App. B); HFU what the kernels run (attention 3.5x, recompute).";

/// The table `mmsp compare` prints.
pub fn table(c: &Comparison) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "mmsp compare: {} at {} tokens on {} x {}, global batch {} (simulated step times; max ctx: one sequence, any recompute)",
        c.model,
        fmt_tokens(c.context_tokens),
        c.gpus,
        c.topology,
        c.global_batch
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "  {:<15} {:<17} {:<24} {:>10} {:>7} {:>6} {:>6} {:>10} {:>9}  why it loses",
        "strategy",
        "engine",
        "best configuration",
        "step time",
        "vs 2d",
        "MFU",
        "HFU",
        "memory",
        "max ctx"
    );
    for r in &c.strategies {
        let cfg = match (r.layout, r.zero_stage, r.recompute) {
            (Some(l), Some(z), Some(rc)) => {
                let tp = if l.tp > 1 {
                    format!("t{} ", l.tp)
                } else {
                    String::new()
                };
                let p = if l.placement == Placement::UlyssesInner {
                    "u-in"
                } else {
                    "r-in"
                };
                format!(
                    "{tp}u{} r{} dp{} {p} z{z} {}",
                    l.ulysses,
                    l.ring,
                    l.dp,
                    &rc.as_str()[..3]
                )
            }
            _ => "infeasible".into(),
        };
        let _ = writeln!(
            o,
            "  {:<15} {:<17} {:<24} {:>10} {:>7} {:>6} {:>6} {:>10} {:>9}  {}",
            r.name,
            r.engine,
            cfg,
            r.step_time_s.map_or("-".into(), fmt_secs),
            r.speedup_of_2d.map_or("-".into(), vs_2d),
            r.mfu.map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
            r.hfu.map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
            r.memory_per_gpu_bytes.map_or("-".into(), fmt_gib),
            r.max_context_tokens.map_or("-".into(), fmt_tokens),
            r.why
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "{LEGEND}");
    o
}

/// A step-time ratio against 2d as a signed change: "+3.1%" slower, "-2.0%" faster, "=" for 2d.
pub fn vs_2d(ratio: f64) -> String {
    if ratio == 1.0 {
        "=".into()
    } else {
        format!("{:+.1}%", (ratio - 1.0) * 100.0)
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
            let w = workload_of(
                topo,
                model,
                cmp.context_tokens,
                cmp.global_batch,
                mm,
                &c.layout,
            )?;
            // Another engine's row is replayed with its profile's terms.
            let profile = engines::profiles()
                .into_iter()
                .find(|p| p.row == row.name && p.engine.name() == row.engine)?;
            let t = if profile.engine == Engine::MmspRuntime {
                terms(topo, &w, &c).ok()?
            } else {
                let c = Candidate {
                    recompute: crate::cost::runtime_recompute(c.recompute),
                    ..c
                };
                engines::evaluate(&profile, topo, &w, &c, 1.0).ok()?.terms
            };
            let sim = simulate(topo, &t, true).ok()?;
            Some((
                row.name.clone(),
                crate::sim::trace::chrome_trace(&sim, &row.name),
            ))
        })
        .collect()
}
