//! `mmsp report`: sweeps a grid (GPUs x context x model x topology x strategy, and recompute
//! policies for the largest context) with the planner's search, and writes what a cluster can
//! do as a self-contained HTML page with SVG charts, Markdown, CSV and JSON of the same data.
//!
//! Charts: the largest context vs GPUs per recompute policy (and per strategy without
//! recompute); step time and tokens/s vs context per strategy; memory per GPU as stacked bars;
//! the exposed share of communication. A short written summary with the headline numbers leads
//! the page. A progress bar appears on a terminal when the sweep takes more than a second.

pub mod charts;
pub mod page;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cost::{MemoryBreakdown, Recompute};
use crate::error::{Error, Result};
use crate::search::{self, Request, Scored, Strategy};
use crate::spec::{cluster::ClusterSpec, model::ModelSpec};
use crate::topology::Topology;
use crate::units::{fmt_tokens, GIB};
use charts::{LineChart, Scale, Series, StackedBars};
use page::{Page, Section, Table};

pub const SCHEMA_NAME: &str = "mmsp-report";
pub const SCHEMA_VERSION: u32 = 1;

/// `mmsp report`: what to sweep and where to write it. Every list is as given, before
/// [`Grid::from_request`] sorts and checks it.
#[derive(Debug, Clone)]
pub struct ReportRequest {
    /// Folder to write report.html, report.md, max_context.csv, points.csv and report.json to.
    pub out: PathBuf,
    /// GPU counts to sweep.
    pub gpus: Vec<u32>,
    /// Context lengths to sweep.
    pub contexts: Vec<u64>,
    /// Model presets or Hugging Face config.json files.
    pub models: Vec<String>,
    /// Topology presets or TOML files.
    pub topologies: Vec<String>,
    /// Strategies to compare.
    pub strategies: Vec<Strategy>,
    /// Recompute policies for the largest-context sweep (the performance sweep searches both).
    pub recompute: Vec<Recompute>,
    /// GPU count for the per-context charts [default: 256 if swept, else the largest swept].
    pub focus_gpus: Option<u32>,
    /// Global batch in sequences for the performance sweep [default: 4M tokens' worth].
    pub global_batch: Option<u64>,
    /// No progress bar.
    pub quiet: bool,
}

/// The grid a report sweeps, validated.
#[derive(Debug, Clone, Serialize)]
pub struct Grid {
    pub gpus: Vec<u32>,
    pub contexts: Vec<u64>,
    pub models: Vec<String>,
    pub topologies: Vec<String>,
    pub strategies: Vec<Strategy>,
    pub recompute: Vec<Recompute>,
    pub focus_gpus: u32,
    pub global_batch: Option<u64>,
}

impl Grid {
    /// Checks the lists and picks the focus GPU count.
    pub fn from_request(a: &ReportRequest) -> Result<Grid> {
        let mut gpus = a.gpus.clone();
        gpus.sort_unstable();
        gpus.dedup();
        let mut contexts = a.contexts.clone();
        contexts.sort_unstable();
        contexts.dedup();
        let mut strategies = a.strategies.clone();
        strategies.dedup();
        let mut recompute = a.recompute.clone();
        recompute.dedup();
        for (what, empty) in [
            ("--gpus", gpus.is_empty()),
            ("--contexts", contexts.is_empty()),
            ("--models", a.models.is_empty()),
            ("--topologies", a.topologies.is_empty()),
            ("--strategies", strategies.is_empty()),
            ("--recompute", recompute.is_empty()),
        ] {
            if empty {
                return Err(Error::invalid(what, "needs at least one value"));
            }
        }
        let focus = match a.focus_gpus {
            Some(g) if gpus.contains(&g) => g,
            Some(g) => {
                return Err(Error::invalid(
                    "--focus-gpus",
                    format!("{g} is not one of the swept --gpus ({gpus:?})"),
                ))
            }
            None if gpus.contains(&256) => 256,
            None => *gpus.last().expect("non-empty"),
        };
        Ok(Grid {
            gpus,
            contexts,
            models: a.models.clone(),
            topologies: a.topologies.clone(),
            strategies,
            recompute,
            focus_gpus: focus,
            global_batch: a.global_batch,
        })
    }
}

/// A recompute policy by its plan name (`none`, `outside_attention`).
fn recompute_name<S: serde::Serializer>(
    r: &Recompute,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

fn recompute_name_opt<S: serde::Serializer>(
    r: &Option<Recompute>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_str(r.as_str()),
        None => s.serialize_none(),
    }
}

/// The largest context of one (model, topology, GPUs, strategy, recompute) cell, global batch 1.
#[derive(Debug, Clone, Serialize)]
pub struct MaxContextRow {
    pub model: String,
    pub topology: String,
    pub gpus: u32,
    pub strategy: Strategy,
    #[serde(serialize_with = "recompute_name")]
    pub recompute: Recompute,
    /// `None`: the model does not fit at any context (or the GPU count is not valid).
    pub max_context_tokens: Option<u64>,
    pub layout: Option<String>,
    pub memory_per_gpu_bytes: Option<f64>,
}

/// One planned point of the performance sweep (best plan of a strategy, recompute searched).
#[derive(Debug, Clone, Serialize)]
pub struct PointRow {
    pub model: String,
    pub topology: String,
    pub gpus: u32,
    pub context_tokens: u64,
    pub strategy: Strategy,
    pub feasible: bool,
    /// Why nothing fits, when not feasible.
    pub reason: Option<String>,
    pub global_batch: u64,
    pub layout: Option<String>,
    pub zero_stage: Option<u8>,
    #[serde(serialize_with = "recompute_name_opt")]
    pub recompute: Option<Recompute>,
    pub micro_batch: Option<u32>,
    pub step_time_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    pub memory_per_gpu_bytes: Option<f64>,
    pub memory: Option<MemoryBreakdown>,
    pub comm_exposed_s: Option<f64>,
    pub comm_overlapped_s: Option<f64>,
    /// comm_exposed_s / step_time_s.
    pub exposed_comm_share: Option<f64>,
}

/// Everything a report holds; `report.json` is this.
#[derive(Debug, Clone, Serialize)]
pub struct ReportData {
    pub schema: String,
    pub schema_version: u32,
    pub generator: String,
    pub grid: Grid,
    /// HBM per GPU of each topology, for the memory charts.
    pub hbm_bytes: Vec<(String, f64)>,
    pub max_context: Vec<MaxContextRow>,
    pub points: Vec<PointRow>,
    pub summary: Vec<String>,
    pub elapsed_s: f64,
}

/// Compact layout words for tables: "u8 r32 dp1 u-in", with "t2 " in front for tensor parallel.
pub fn short_layout(s: &Scored) -> String {
    let l = &s.candidate.layout;
    let tp = if l.tp > 1 {
        format!("t{} ", l.tp)
    } else {
        String::new()
    };
    let p = match l.placement {
        crate::cost::Placement::UlyssesInner => "u-in",
        crate::cost::Placement::RingInner => "r-in",
    };
    format!("{tp}u{} r{} dp{} {p}", l.ulysses, l.ring, l.dp)
}

/// Progress that stays hidden unless the work passes one second and stderr is a terminal.
struct Progress {
    bar: ProgressBar,
    start: Instant,
    shown: bool,
    allowed: bool,
}

impl Progress {
    fn new(len: u64, quiet: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({elapsed}, ETA {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress {
            bar,
            start: Instant::now(),
            shown: false,
            allowed: !quiet && std::io::stderr().is_terminal(),
        }
    }

    fn tick(&mut self, msg: &'static str) {
        self.bar.inc(1);
        if self.allowed && !self.shown && self.start.elapsed() > Duration::from_secs(1) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        if self.shown {
            self.bar.set_message(msg);
        }
    }

    fn finish(&self) {
        if self.shown {
            self.bar.finish_and_clear();
        }
    }
}

struct Setup {
    model: ModelSpec,
    cluster: ClusterSpec,
}

/// Runs the sweep of a grid.
pub fn sweep(grid: &Grid, quiet: bool) -> Result<ReportData> {
    let start = Instant::now();
    let mut setups = Vec::new();
    for m in &grid.models {
        for t in &grid.topologies {
            let cluster = ClusterSpec::load(t)?;
            for &g in &grid.gpus {
                cluster
                    .check_gpus(u64::from(g))
                    .map_err(|e| Error::invalid("--gpus", format!("{g} on {t}: {e}")))?;
            }
            setups.push(Setup {
                model: crate::spec::model::load(m)?,
                cluster,
            });
        }
    }
    let per_setup =
        grid.gpus.len() * grid.strategies.len() * (grid.recompute.len() + grid.contexts.len());
    let mut progress = Progress::new((per_setup * setups.len()) as u64, quiet);
    let mut max_context = Vec::new();
    let mut points = Vec::new();
    for s in &setups {
        for &gpus in &grid.gpus {
            let valid = s.cluster.check_gpus(u64::from(gpus));
            let topo = Topology::build(&s.cluster, gpus);
            for &strategy in &grid.strategies {
                for &recompute in &grid.recompute {
                    let req = Request {
                        gpus,
                        context: 0,
                        global_batch: Some(1),
                        recompute: Some(recompute),
                        strategy,
                        pin: None,
                        zero: None,
                    };
                    let found = if valid.is_ok() {
                        search::max_context(&topo, &s.model, &req)
                    } else {
                        None
                    };
                    max_context.push(MaxContextRow {
                        model: s.model.name.clone(),
                        topology: s.cluster.name.clone(),
                        gpus,
                        strategy,
                        recompute,
                        max_context_tokens: found.as_ref().map(|f| f.0),
                        layout: found.as_ref().map(|f| short_layout(&f.1)),
                        memory_per_gpu_bytes: found
                            .as_ref()
                            .map(|f| f.1.estimate.memory_per_gpu_bytes),
                    });
                    progress.tick("max context");
                }
                for &context in &grid.contexts {
                    points.push(point(
                        s,
                        &topo,
                        valid.as_ref().err(),
                        gpus,
                        context,
                        strategy,
                        grid,
                    ));
                    progress.tick("plans");
                }
            }
        }
    }
    progress.finish();
    let hbm_bytes = setups
        .iter()
        .map(|s| (s.cluster.name.clone(), s.cluster.hbm_bytes))
        .collect::<Vec<_>>();
    let mut data = ReportData {
        schema: SCHEMA_NAME.into(),
        schema_version: SCHEMA_VERSION,
        generator: format!("mmsp {}", env!("CARGO_PKG_VERSION")),
        grid: grid.clone(),
        hbm_bytes,
        max_context,
        points,
        summary: Vec::new(),
        elapsed_s: 0.0,
    };
    data.summary = summary(&data);
    data.elapsed_s = start.elapsed().as_secs_f64();
    Ok(data)
}

fn point(
    s: &Setup,
    topo: &Topology,
    invalid: Option<&Error>,
    gpus: u32,
    context: u64,
    strategy: Strategy,
    grid: &Grid,
) -> PointRow {
    let req = Request {
        gpus,
        context,
        global_batch: grid.global_batch,
        recompute: None,
        strategy,
        pin: None,
        zero: None,
    };
    let gb = grid
        .global_batch
        .unwrap_or_else(|| search::default_global_batch(context));
    let mut row = PointRow {
        model: s.model.name.clone(),
        topology: s.cluster.name.clone(),
        gpus,
        context_tokens: context,
        strategy,
        feasible: false,
        reason: None,
        global_batch: gb,
        layout: None,
        zero_stage: None,
        recompute: None,
        micro_batch: None,
        step_time_s: None,
        tokens_per_s: None,
        mfu: None,
        memory_per_gpu_bytes: None,
        memory: None,
        comm_exposed_s: None,
        comm_overlapped_s: None,
        exposed_comm_share: None,
    };
    if let Some(e) = invalid {
        row.reason = Some(e.to_string());
        return row;
    }
    let result = search::search(topo, &s.model, &req, None);
    match result.best() {
        Some(b) => {
            let e = &b.estimate;
            row.feasible = true;
            row.layout = Some(short_layout(b));
            row.zero_stage = Some(b.candidate.zero_stage);
            row.recompute = Some(b.candidate.recompute);
            row.micro_batch = Some(b.candidate.micro_batch);
            row.step_time_s = Some(e.step_time_s);
            row.tokens_per_s = Some(e.tokens_per_s);
            row.mfu = Some(e.mfu);
            row.memory_per_gpu_bytes = Some(e.memory_per_gpu_bytes);
            row.memory = Some(e.memory.clone());
            row.comm_exposed_s = Some(e.comm_exposed_s);
            row.comm_overlapped_s = Some(e.comm_overlapped_s);
            row.exposed_comm_share = Some(e.comm_exposed_s / e.step_time_s.max(1e-12));
        }
        None => {
            let parts: Vec<String> = result
                .infeasible_summary()
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            row.reason = Some(if parts.is_empty() {
                "no candidates".into()
            } else {
                parts.join(", ")
            });
        }
    }
    row
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_pct(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

/// The written summary: computed from the data, one sentence per finding.
pub fn summary(d: &ReportData) -> Vec<String> {
    let mut out = Vec::new();
    let focus = d.grid.focus_gpus;
    for (model, topo) in combos(d) {
        max_context_sentences(d, &model, &topo, &mut out);
        // Performance at the focus GPU count: the largest context where two strategies fit.
        let at = |ctx: u64| feasible_at(d, &model, &topo, ctx);
        let ctx = d
            .grid
            .contexts
            .iter()
            .rev()
            .copied()
            .find(|&c| at(c).len() >= 2)
            .or_else(|| {
                d.grid
                    .contexts
                    .iter()
                    .rev()
                    .copied()
                    .find(|&c| !at(c).is_empty())
            });
        if let Some(ctx) = ctx {
            out.push(fastest_sentence(&at(ctx), ctx, focus));
        }
        if let Some(s) = fastest_per_context(d, &model, &topo) {
            out.push(s);
        }
        out.push(feasible_share(d, &model, &topo));
    }
    out
}

/// The summary's largest-context findings for one model and topology: the first strategy
/// without recompute at the smallest and largest GPU counts, with the last recompute policy
/// at the largest, and every strategy without recompute at the largest.
fn max_context_sentences(d: &ReportData, model: &str, topo: &str, out: &mut Vec<String>) {
    let mc = |strategy: Strategy, r: Recompute, g: u32| {
        d.max_context
            .iter()
            .find(|x| {
                x.model == model
                    && x.topology == topo
                    && x.strategy == strategy
                    && x.recompute == r
                    && x.gpus == g
            })
            .and_then(|x| x.max_context_tokens)
    };
    let first = d.grid.strategies[0];
    let (g0, g1) = (d.grid.gpus[0], *d.grid.gpus.last().expect("non-empty"));
    let fmt = |v: Option<u64>| {
        v.map(|t| format!("{} tokens", fmt_tokens(t)))
            .unwrap_or_else(|| "no sequence".into())
    };
    if d.grid.recompute.contains(&Recompute::None) {
        let (a, b) = (
            mc(first, Recompute::None, g0),
            mc(first, Recompute::None, g1),
        );
        out.push(format!(
            "{model} on {topo} ({}), global batch 1, no activation recompute: the longest sequence that fits is {} on {g0} GPUs and {} on {g1} GPUs.{}",
            first.name(),
            fmt(a),
            fmt(b),
            if b.is_none() {
                " (Without recompute every layer's activations stay on the GPU; ZeRO-3 leaves 16/N B per parameter and two gathered layers, so the activations decide.)"
            } else {
                ""
            }
        ));
    }
    if let Some(&r) = d
        .grid
        .recompute
        .iter()
        .rev()
        .find(|r| **r != Recompute::None)
    {
        out.push(format!(
            "With {} recompute, {g1} GPUs fit {}.",
            r.as_str(),
            fmt(mc(first, r, g1))
        ));
    }
    // Strategies' reach without recompute at the largest GPU count.
    if d.grid.strategies.len() > 1 && d.grid.recompute.contains(&Recompute::None) {
        let parts: Vec<String> = d
            .grid
            .strategies
            .iter()
            .map(|s| format!("{} {}", s.name(), fmt(mc(*s, Recompute::None, g1))))
            .collect();
        out.push(format!(
            "Largest context on {g1} GPUs without recompute, by strategy: {}.",
            parts.join(", ")
        ));
    }
}

/// The feasible points of one context at the focus GPU count, fastest first.
fn feasible_at<'a>(d: &'a ReportData, model: &str, topo: &str, ctx: u64) -> Vec<&'a PointRow> {
    let mut v: Vec<&PointRow> = feasible_at_focus(d, model, topo)
        .filter(|p| p.context_tokens == ctx)
        .collect();
    v.sort_by(|a, b| {
        b.tokens_per_s
            .unwrap_or(0.0)
            .total_cmp(&a.tokens_per_s.unwrap_or(0.0))
    });
    v
}

/// The winner of every context row of the "Best plan per context and strategy" table, as one
/// sentence; none where no context has a feasible plan.
fn fastest_per_context(d: &ReportData, model: &str, topo: &str) -> Option<String> {
    let focus = d.grid.focus_gpus;
    let at = |ctx: u64| feasible_at(d, model, topo, ctx);
    let rows: Vec<String> = d
        .grid
        .contexts
        .iter()
        .filter_map(|&c| {
            let v = at(c);
            let (best, ties) = winners(&v)?;
            let mut w = format!(
                "{} {} ({} tokens/s",
                fmt_tokens(c),
                best.strategy.name(),
                fmt_rate(best.tokens_per_s.unwrap_or(0.0))
            );
            if !ties.is_empty() {
                let names: Vec<&str> = ties.iter().map(|t| t.strategy.name()).collect();
                let _ = write!(w, "; within 1%: {}", names.join(", "));
            }
            w.push(')');
            Some(w)
        })
        .collect();
    if rows.is_empty() {
        return None;
    }
    Some(format!(
        "Fastest strategy at each context on {focus} GPUs (the table of best plans per context and strategy): {}.",
        rows.join("; ")
    ))
}

/// How many of the (GPUs, context, strategy) points of one model and topology have a plan.
fn feasible_share(d: &ReportData, model: &str, topo: &str) -> String {
    let total = d
        .points
        .iter()
        .filter(|p| p.model == model && p.topology == topo)
        .count();
    let fit = d
        .points
        .iter()
        .filter(|p| p.model == model && p.topology == topo && p.feasible)
        .count();
    format!(
        "{fit} of {total} (GPUs, context, strategy) points have a feasible plan at the default global batch (4M tokens per step, at least one sequence)."
    )
}

/// Of one context's feasible rows sorted fastest first: the fastest and the others within 1%
/// of its throughput (a tie at the model's precision).
fn winners<'a>(v: &[&'a PointRow]) -> Option<(&'a PointRow, Vec<&'a PointRow>)> {
    let best = *v.first()?;
    let rate = |p: &PointRow| p.tokens_per_s.unwrap_or(0.0);
    let ties = v[1..]
        .iter()
        .copied()
        .filter(|p| rate(p) >= rate(best) / 1.01)
        .collect();
    Some((best, ties))
}

/// The headline at one context: the fastest strategy's figures, and every strategy within 1%
/// of it, else how far ahead it is of the next.
fn fastest_sentence(v: &[&PointRow], ctx: u64, focus: u32) -> String {
    let Some((best, ties)) = winners(v) else {
        return String::new();
    };
    let mut s = format!(
        "At {} tokens on {focus} GPUs the fastest strategy is {} ({}, {} recompute): {} tokens/s, MFU {}, step {:.2} s, {} of it exposed communication",
        fmt_tokens(ctx),
        best.strategy.name(),
        best.layout.clone().unwrap_or_default(),
        best.recompute.map(|r| r.as_str()).unwrap_or("?"),
        fmt_rate(best.tokens_per_s.unwrap_or(0.0)),
        fmt_pct(best.mfu.unwrap_or(0.0)),
        best.step_time_s.unwrap_or(0.0),
        fmt_pct(best.exposed_comm_share.unwrap_or(0.0)),
    );
    if !ties.is_empty() {
        let names: Vec<&str> = ties.iter().map(|t| t.strategy.name()).collect();
        let verb = if ties.len() == 1 { "ties" } else { "tie" };
        s += &format!("; {} {verb} with it (within 1%).", names.join(", "));
    } else if let Some(second) = v.get(1) {
        s += &format!(
            "; {:.2}x the next, {} ({} exposed).",
            best.tokens_per_s.unwrap_or(0.0) / second.tokens_per_s.unwrap_or(1.0).max(1e-9),
            second.strategy.name(),
            fmt_pct(second.exposed_comm_share.unwrap_or(0.0))
        );
    } else {
        s += "; no other strategy fits there.";
    }
    s
}

fn combos(d: &ReportData) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    for p in &d.max_context {
        let k = (p.model.clone(), p.topology.clone());
        if !v.contains(&k) {
            v.push(k);
        }
    }
    v
}

fn gpus_fmt(v: f64) -> String {
    format!("{}", v.round() as u64)
}

fn tokens_fmt(v: f64) -> String {
    fmt_tokens(v.round().max(0.0) as u64)
}

/// Builds the page (charts and tables) from the data.
pub fn build_page(d: &ReportData) -> Result<Page> {
    let mut page = Page {
        title: "mmsp report: how far the cluster goes".into(),
        subtitle: format!(
            "{} on {}; GPUs {}; contexts {}; strategies {}. Predicted by the mmsp cost model ({}), swept in {:.1} s.",
            d.grid.models.join(", "),
            d.grid.topologies.join(", "),
            d.grid.gpus.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(", "),
            d.grid.contexts.iter().map(|c| fmt_tokens(*c)).collect::<Vec<_>>().join(", "),
            d.grid.strategies.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
            d.generator,
            d.elapsed_s
        ),
        summary: d.summary.clone(),
        sections: Vec::new(),
        files: vec![
            "report.md".into(),
            "max_context.csv".into(),
            "points.csv".into(),
            "report.json".into(),
        ],
    };
    for (model, topo) in combos(d) {
        page.sections.push(max_context_section(d, &model, &topo)?);
        page.sections.push(performance_section(d, &model, &topo)?);
        page.sections.push(memory_comm_section(d, &model, &topo)?);
    }
    Ok(page)
}

/// The largest-context section of one model and topology: per recompute policy, per strategy
/// without recompute, and the table of both.
fn max_context_section(d: &ReportData, model: &str, topo: &str) -> Result<Section> {
    let mut sec = Section {
        title: format!("Largest context: {model} on {topo}"),
        text: vec![format!(
            "The longest sequence (tokens, global batch 1) whose best plan fits in GPU memory, found by doubling then bisection over multiples of 2 x GPUs. Strategy {} per recompute policy, then every strategy without recompute. A missing point means nothing fits.",
            d.grid.strategies[0].name()
        )],
        ..Section::default()
    };
    let mc_series = |pred: &dyn Fn(&MaxContextRow) -> bool| -> Vec<(f64, f64)> {
        d.max_context
            .iter()
            .filter(|x| x.model == model && x.topology == topo && pred(x))
            .filter_map(|x| x.max_context_tokens.map(|c| (f64::from(x.gpus), c as f64)))
            .collect()
    };
    let first = d.grid.strategies[0];
    let series: Vec<Series> = d
        .grid
        .recompute
        .iter()
        .map(|r| Series {
            name: format!("{} recompute", r.as_str()),
            points: mc_series(&|x| x.strategy == first && x.recompute == *r),
        })
        .collect();
    sec.charts.push(max_context_chart(
        format!(
            "Max context vs GPUs ({}, per recompute policy)",
            first.name()
        ),
        series,
    )?);
    if d.grid.strategies.len() > 1 {
        let r0 = d.grid.recompute[0];
        let series: Vec<Series> = d
            .grid
            .strategies
            .iter()
            .map(|s| Series {
                name: s.name().into(),
                points: mc_series(&|x| x.strategy == *s && x.recompute == r0),
            })
            .collect();
        sec.charts.push(max_context_chart(
            format!(
                "Max context vs GPUs per strategy ({} recompute)",
                r0.as_str()
            ),
            series,
        )?);
    }
    sec.tables.push(max_context_table(d, model, topo));
    Ok(sec)
}

/// A chart of the largest context against GPUs, both on log scales.
fn max_context_chart(title: String, series: Vec<Series>) -> Result<String> {
    charts::line_chart(&LineChart {
        title,
        x_desc: "GPUs (log scale)".into(),
        y_desc: "max context (tokens, log scale)".into(),
        x_scale: Scale::Log2,
        y_scale: Scale::Log2,
        x_fmt: &gpus_fmt,
        y_fmt: &tokens_fmt,
        series,
        y_from_zero: false,
    })
}

/// The largest context per GPU count (rows) and strategy / recompute (columns): the first
/// strategy under each recompute policy, then the others under the first policy.
fn max_context_table(d: &ReportData, model: &str, topo: &str) -> Table {
    let first = d.grid.strategies[0];
    let mut header = vec!["GPUs".to_string()];
    let mut cols: Vec<(Strategy, Recompute)> = Vec::new();
    for &r in &d.grid.recompute {
        cols.push((first, r));
    }
    for &s in d.grid.strategies.iter().skip(1) {
        cols.push((s, d.grid.recompute[0]));
    }
    for (s, r) in &cols {
        header.push(format!("{} / {}", s.name(), r.as_str()));
    }
    let rows = d
        .grid
        .gpus
        .iter()
        .map(|&g| {
            let mut row = vec![g.to_string()];
            for (s, r) in &cols {
                let v = d.max_context.iter().find(|x| {
                    x.model == model
                        && x.topology == topo
                        && x.gpus == g
                        && x.strategy == *s
                        && x.recompute == *r
                });
                row.push(
                    v.and_then(|x| x.max_context_tokens)
                        .map(fmt_tokens)
                        .unwrap_or_else(|| "-".into()),
                );
            }
            row
        })
        .collect();
    Table {
        caption: "Max context (tokens; strategy / recompute)".into(),
        header,
        rows,
    }
}

/// The feasible points of one strategy at the focus GPU count, in sweep order.
fn focus_points<'a>(d: &'a ReportData, model: &str, topo: &str, s: Strategy) -> Vec<&'a PointRow> {
    feasible_at_focus(d, model, topo)
        .filter(|p| p.strategy == s)
        .collect()
}

/// The feasible points of one model and topology at the focus GPU count, in sweep order.
fn feasible_at_focus<'a, 'b>(
    d: &'a ReportData,
    model: &'b str,
    topo: &'b str,
) -> impl Iterator<Item = &'a PointRow> + 'b
where
    'a: 'b,
{
    let focus = d.grid.focus_gpus;
    d.points
        .iter()
        .filter(move |p| p.model == model && p.topology == topo && p.gpus == focus && p.feasible)
}

/// One series per strategy of `f` against the context at the focus GPU count.
fn context_series(
    d: &ReportData,
    model: &str,
    topo: &str,
    f: &dyn Fn(&PointRow) -> f64,
) -> Vec<Series> {
    d.grid
        .strategies
        .iter()
        .map(|&s| Series {
            name: s.name().into(),
            points: focus_points(d, model, topo, s)
                .into_iter()
                .map(|p| (p.context_tokens as f64, f(p)))
                .collect(),
        })
        .collect()
}

/// A chart of one figure against the context (log scale), its y axis linear from zero.
fn context_chart(
    title: String,
    y_desc: &str,
    y_fmt: &dyn Fn(f64) -> String,
    series: Vec<Series>,
) -> Result<String> {
    charts::line_chart(&LineChart {
        title,
        x_desc: "context (tokens, log scale)".into(),
        y_desc: y_desc.into(),
        x_scale: Scale::Log2,
        y_scale: Scale::Linear,
        x_fmt: &tokens_fmt,
        y_fmt,
        series,
        y_from_zero: true,
    })
}

/// The step time and throughput section of one model and topology at the focus GPU count.
fn performance_section(d: &ReportData, model: &str, topo: &str) -> Result<Section> {
    let focus = d.grid.focus_gpus;
    let y_secs = |v: f64| format!("{v:.2}");
    let y_rate = |v: f64| fmt_rate(v);
    let mut sec = Section {
        title: format!("Step time and throughput: {model} on {focus} {topo} GPUs"),
        text: vec![format!(
            "Best plan of each strategy (layout, ZeRO stage, recompute and micro-batch searched) at the default global batch: 4M tokens per step as whole sequences, at least one. Step time is one optimizer step; tokens/s is global batch x context / step time."
        )],
        ..Section::default()
    };
    sec.charts.push(context_chart(
        format!("Step time vs context ({focus} GPUs)"),
        "step time (s)",
        &y_secs,
        context_series(d, model, topo, &|p| p.step_time_s.unwrap_or(0.0)),
    )?);
    sec.charts.push(context_chart(
        format!("Throughput vs context ({focus} GPUs)"),
        "throughput (tokens/s)",
        &y_rate,
        context_series(d, model, topo, &|p| p.tokens_per_s.unwrap_or(0.0)),
    )?);
    Ok(sec)
}

/// The memory and communication section of one model and topology at the focus GPU count:
/// the first strategy's memory by component, the exposed communication, the best plans.
fn memory_comm_section(d: &ReportData, model: &str, topo: &str) -> Result<Section> {
    let focus = d.grid.focus_gpus;
    let first = d.grid.strategies[0];
    let y_pct = |v: f64| format!("{:.0}%", v * 100.0);
    let mut sec = Section {
        title: format!("Memory and communication: {model} on {focus} {topo} GPUs"),
        text: vec![format!(
            "Memory per GPU of the best {} plan at each context, by component (GiB = 2^30 bytes), against the GPU's memory; and the share of the step spent in communication that is not hidden behind compute.",
            first.name()
        )],
        ..Section::default()
    };
    let mem_pts = focus_points(d, model, topo, first);
    if !mem_pts.is_empty() {
        sec.charts.push(memory_chart(d, topo, first, &mem_pts)?);
    }
    sec.charts.push(context_chart(
        format!("Exposed communication share ({focus} GPUs)"),
        "exposed communication (% of step)",
        &y_pct,
        context_series(d, model, topo, &|p| p.exposed_comm_share.unwrap_or(0.0)),
    )?);
    sec.tables.push(best_plans_table(d, model, topo));
    Ok(sec)
}

/// Memory per GPU by component as stacked bars per context, under the GPU's memory.
fn memory_chart(
    d: &ReportData,
    topo: &str,
    first: Strategy,
    mem_pts: &[&PointRow],
) -> Result<String> {
    let focus = d.grid.focus_gpus;
    let y_gib = |v: f64| format!("{v:.0}");
    let comps: [(&str, MemField); 8] = [
        ("weights", |m| m.weights_bytes),
        ("gradients", |m| m.gradients_bytes),
        ("optimizer", |m| m.optimizer_bytes),
        ("activations", |m| m.activations_bytes),
        ("logits", |m| m.logits_bytes),
        ("comm buffers", |m| m.comm_buffers_bytes),
        ("reserved", |m| m.reserved_bytes),
        ("fragmentation", |m| m.fragmentation_bytes),
    ];
    let layers = comps
        .iter()
        .map(|(name, f)| {
            (
                name.to_string(),
                mem_pts
                    .iter()
                    .map(|p| p.memory.as_ref().map(f).unwrap_or(0.0) / GIB)
                    .collect(),
            )
        })
        .collect();
    let hbm = d
        .hbm_bytes
        .iter()
        .find(|(t, _)| *t == topo)
        .map(|(_, b)| *b / GIB);
    charts::stacked_bars(&StackedBars {
        title: format!("Memory per GPU ({}, {focus} GPUs)", first.name()),
        x_desc: "context (tokens)".into(),
        y_desc: "memory per GPU (GiB)".into(),
        categories: mem_pts
            .iter()
            .map(|p| fmt_tokens(p.context_tokens))
            .collect(),
        layers,
        limit: hbm.map(|h| (format!("GPU memory {h:.0} GiB"), h)),
        y_fmt: &y_gib,
    })
}

/// Every (context, strategy) point at the focus GPU count: its best plan, or why none fits.
fn best_plans_table(d: &ReportData, model: &str, topo: &str) -> Table {
    let focus = d.grid.focus_gpus;
    let rows: Vec<Vec<String>> = d
        .points
        .iter()
        .filter(|p| p.model == model && p.topology == topo && p.gpus == focus)
        .map(|p| {
            let o = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            vec![
                fmt_tokens(p.context_tokens),
                p.strategy.name().into(),
                if p.feasible {
                    o(p.layout.clone())
                } else {
                    format!("does not fit: {}", o(p.reason.clone()))
                },
                o(p.recompute.map(|r| r.as_str().to_string())),
                o(p.zero_stage.map(|z| z.to_string())),
                o(p.step_time_s.map(|v| format!("{v:.2}"))),
                o(p.tokens_per_s.map(fmt_rate)),
                o(p.mfu.map(fmt_pct)),
                o(p.memory_per_gpu_bytes.map(|v| format!("{:.1}", v / GIB))),
                o(p.exposed_comm_share.map(fmt_pct)),
            ]
        })
        .collect();
    Table {
        caption: format!("Best plan per context and strategy ({focus} GPUs)"),
        header: [
            "context",
            "strategy",
            "layout",
            "recompute",
            "ZeRO",
            "step (s)",
            "tokens/s",
            "MFU",
            "memory (GiB)",
            "exposed comm",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    }
}

/// Reads one component of a memory breakdown.
type MemField = fn(&MemoryBreakdown) -> f64;

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

/// CSV of the largest-context sweep.
pub fn max_context_csv(d: &ReportData) -> String {
    let rows: Vec<Vec<String>> = d
        .max_context
        .iter()
        .map(|r| {
            vec![
                r.model.clone(),
                r.topology.clone(),
                r.gpus.to_string(),
                r.strategy.name().into(),
                r.recompute.as_str().into(),
                opt(r.max_context_tokens),
                opt(r.layout.clone()),
                opt(r.memory_per_gpu_bytes.map(|v| format!("{v:.0}"))),
            ]
        })
        .collect();
    page::csv(
        &[
            "model",
            "topology",
            "gpus",
            "strategy",
            "recompute",
            "max_context_tokens",
            "layout",
            "memory_per_gpu_bytes",
        ],
        &rows,
    )
}

/// CSV of the performance sweep.
pub fn points_csv(d: &ReportData) -> String {
    let rows: Vec<Vec<String>> = d
        .points
        .iter()
        .map(|p| {
            let m = p.memory.as_ref();
            let b = |f: fn(&MemoryBreakdown) -> f64| opt(m.map(|m| format!("{:.0}", f(m))));
            vec![
                p.model.clone(),
                p.topology.clone(),
                p.gpus.to_string(),
                p.context_tokens.to_string(),
                p.strategy.name().into(),
                p.feasible.to_string(),
                opt(p.reason.clone()),
                p.global_batch.to_string(),
                opt(p.layout.clone()),
                opt(p.zero_stage),
                opt(p.recompute.map(|r| r.as_str())),
                opt(p.micro_batch),
                opt(p.step_time_s.map(|v| format!("{v:.6}"))),
                opt(p.tokens_per_s.map(|v| format!("{v:.1}"))),
                opt(p.mfu.map(|v| format!("{v:.4}"))),
                opt(p.memory_per_gpu_bytes.map(|v| format!("{v:.0}"))),
                b(|m| m.weights_bytes),
                b(|m| m.gradients_bytes),
                b(|m| m.optimizer_bytes),
                b(|m| m.activations_bytes),
                b(|m| m.logits_bytes),
                b(|m| m.comm_buffers_bytes),
                b(|m| m.reserved_bytes),
                b(|m| m.fragmentation_bytes),
                opt(p.comm_exposed_s.map(|v| format!("{v:.6}"))),
                opt(p.comm_overlapped_s.map(|v| format!("{v:.6}"))),
                opt(p.exposed_comm_share.map(|v| format!("{v:.4}"))),
            ]
        })
        .collect();
    page::csv(
        &[
            "model",
            "topology",
            "gpus",
            "context_tokens",
            "strategy",
            "feasible",
            "reason",
            "global_batch",
            "layout",
            "zero_stage",
            "recompute",
            "micro_batch",
            "step_time_s",
            "tokens_per_s",
            "mfu",
            "memory_per_gpu_bytes",
            "weights_bytes",
            "gradients_bytes",
            "optimizer_bytes",
            "activations_bytes",
            "logits_bytes",
            "comm_buffers_bytes",
            "reserved_bytes",
            "fragmentation_bytes",
            "comm_exposed_s",
            "comm_overlapped_s",
            "exposed_comm_share",
        ],
        &rows,
    )
}

/// Writes a file, naming it in the error.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::Io {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

/// Creates the output folder.
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        msg: format!("cannot create the output folder: {e}"),
    })
}

/// Runs `mmsp report`: sweep, render, write the files; returns the HTML path.
pub fn run(a: &ReportRequest) -> Result<PathBuf> {
    let grid = Grid::from_request(a)?;
    let data = sweep(&grid, a.quiet)?;
    create_dir(&a.out)?;
    let page = build_page(&data)?;
    let html_path = a.out.join("report.html");
    write_file(&html_path, &page::html(&page))?;
    write_file(&a.out.join("report.md"), &page::markdown(&page))?;
    write_file(&a.out.join("max_context.csv"), &max_context_csv(&data))?;
    write_file(&a.out.join("points.csv"), &points_csv(&data))?;
    let json = serde_json::to_string_pretty(&data)
        .map_err(|e| Error::invalid("report data", e.to_string()))?;
    write_file(&a.out.join("report.json"), &(json + "\n"))?;
    Ok(html_path)
}
