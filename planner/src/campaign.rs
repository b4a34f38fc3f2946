//! `mmsp campaign`: a planned training run of several stages (for example a context-extension
//! stage then long-video fine-tuning), read from a TOML recipe. Each stage is planned with the
//! search; its step count follows from its samples or tokens, which gives wall-clock time and
//! GPU-hours. The result is a table on standard output and, in the output folder, one plan
//! file per stage (ready for `mmsp export`), an HTML page with a timeline chart, Markdown, CSV
//! and JSON.
//!
//! Recipe fields (top level: defaults for every stage; `[[stage]]`: one stage each):
//! `name`, `model`, `topology`, `vision` (encoder preset for frames), `strategy`, and per stage
//! `gpus`, `context` (tokens, "256K") or `frames_per_sample` (x the encoder's tokens per frame,
//! plus `text_tokens`), one of `samples` or `tokens`, optional `global_batch` and `recompute`.
//! Counts are binary throughout, read and printed ([`UNITS`]): K = 1024, M = 1024^2,
//! G (or B) = 1024^3, T = 1024^4, as token sizes are elsewhere in mmsp.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cost::Recompute;
use crate::error::{Error, Result};
use crate::multimodal::MultiModal;
use crate::report::charts::{self, Span};
use crate::report::page::{self, Page, Section, Table};
use crate::report::{create_dir, short_layout, write_file};
use crate::search::{Request, Strategy};
use crate::spec::samples::Sample;
use crate::spec::{cluster::ClusterSpec, vision::VisionSpec};
use crate::topology::Topology;
use crate::units::{fmt_gib, fmt_tokens, parse_tokens};

/// `mmsp campaign`: what to plan and where to write it.
#[derive(Debug, Clone)]
pub struct CampaignRequest {
    /// The recipe (TOML); see examples/campaign.toml.
    pub recipe: String,
    /// Folder for campaign.html, campaign.md, campaign.csv, campaign.json and the stage plans.
    pub out: PathBuf,
}

/// The campaign's one unit convention, stated in its outputs.
pub const UNITS: &str =
    "units: K = 1024, M = 1024^2, G (or B) = 1024^3, T = 1024^4 (binary, for tokens and samples alike)";

const GI: u64 = 1024 * 1024 * 1024;
const TI: u64 = 1024 * GI;

/// A count written as a number or a string with a binary suffix ([`UNITS`]): "128K", "2M",
/// "2G" or "2B" (x1024^3), "1.5T" (x1024^4).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Count {
    Int(u64),
    Text(String),
}

fn parse_count(c: &Count, what: &str) -> Result<u64> {
    match c {
        Count::Int(0) => Err(Error::invalid(what, "must be positive")),
        Count::Int(n) => Ok(*n),
        Count::Text(s) => {
            let t = s.trim();
            let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
                Some('B' | 'G') => (&t[..t.len() - 1], GI as f64),
                Some('T') => (&t[..t.len() - 1], TI as f64),
                _ => return parse_tokens(t).map_err(|e| Error::invalid(what, e.to_string())),
            };
            let v: f64 = num.trim().parse().map_err(|_| {
                Error::invalid(
                    what,
                    format!(
                        "'{s}' is not a count (expected e.g. 2000000, \"128K\", \"2G\", \"1.5T\"; {UNITS})"
                    ),
                )
            })?;
            if !(v.is_finite() && v > 0.0 && v * mult < 1e18) {
                return Err(Error::invalid(what, format!("'{s}' is out of range")));
            }
            Ok((v * mult).round() as u64)
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: Option<String>,
    model: Option<String>,
    topology: Option<String>,
    vision: Option<String>,
    strategy: Option<String>,
    #[serde(default)]
    stage: Vec<RawStage>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Option<String>,
    model: Option<String>,
    topology: Option<String>,
    vision: Option<String>,
    strategy: Option<String>,
    gpus: Option<u32>,
    context: Option<Count>,
    frames_per_sample: Option<u64>,
    text_tokens: Option<u64>,
    samples: Option<Count>,
    tokens: Option<Count>,
    global_batch: Option<u64>,
    recompute: Option<String>,
}

/// One stage, validated.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    pub model: String,
    pub topology: String,
    pub strategy: Strategy,
    pub gpus: u32,
    /// Tokens per sample as planned (padded up to a multiple of 2 x GPUs).
    pub context_tokens: u64,
    pub frames_per_sample: Option<u64>,
    /// Vision encoder of a video stage (preset or config path) and its text tokens per sample.
    pub vision: Option<String>,
    pub text_tokens: u64,
    pub samples: u64,
    pub global_batch: Option<u64>,
    pub recompute: Option<Recompute>,
}

/// A recipe, validated.
#[derive(Debug, Clone, Serialize)]
pub struct Recipe {
    pub name: String,
    pub stages: Vec<Stage>,
}

impl Recipe {
    pub fn load(path: &str) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.into(),
            msg: e.to_string(),
        })?;
        Self::from_toml(&text, path)
    }

    pub fn from_toml(text: &str, path: &str) -> Result<Recipe> {
        let raw: RawRecipe = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.into(),
            msg: format!(
                "not a campaign recipe: {}",
                e.message().lines().next().unwrap_or("malformed TOML")
            ),
        })?;
        if raw.stage.is_empty() {
            return Err(Error::Parse {
                path: path.into(),
                msg: "no [[stage]] tables (expected at least one stage)".into(),
            });
        }
        let mut stages = Vec::new();
        for (i, s) in raw.stage.iter().enumerate() {
            let name = s.name.clone().unwrap_or_else(|| format!("stage {}", i + 1));
            let at = |e: Error| Error::Parse {
                path: path.into(),
                msg: format!("stage {} ({name}): {e}", i + 1),
            };
            stages.push(stage(&raw, s, name.clone()).map_err(at)?);
        }
        Ok(Recipe {
            name: raw.name.clone().unwrap_or_else(|| path.to_string()),
            stages,
        })
    }
}

fn stage(raw: &RawRecipe, s: &RawStage, name: String) -> Result<Stage> {
    let model = s
        .model
        .clone()
        .or_else(|| raw.model.clone())
        .unwrap_or_else(|| "llama3-8b".into());
    let topology = s
        .topology
        .clone()
        .or_else(|| raw.topology.clone())
        .unwrap_or_else(|| "dgx-h100".into());
    let strategy = Strategy::parse(
        s.strategy
            .as_deref()
            .or(raw.strategy.as_deref())
            .unwrap_or("2d"),
    )?;
    let gpus = s
        .gpus
        .filter(|g| *g > 0)
        .ok_or_else(|| Error::invalid("gpus", "missing or zero (expected a GPU count)"))?;
    let vision = s.frames_per_sample.map(|_| {
        s.vision
            .as_deref()
            .or(raw.vision.as_deref())
            .unwrap_or("siglip-so400m")
            .to_string()
    });
    let frames_tokens = match s.frames_per_sample {
        Some(0) => return Err(Error::invalid("frames_per_sample", "must be positive")),
        Some(f) => {
            let spec = VisionSpec::load(vision.as_deref().unwrap_or("siglip-so400m"))?;
            Some(f * spec.tokens_per_frame + s.text_tokens.unwrap_or(0))
        }
        None => None,
    };
    let given = s
        .context
        .as_ref()
        .map(|c| parse_count(c, "context"))
        .transpose()?;
    let context = match (given, frames_tokens) {
        (Some(c), Some(f)) if c < f => {
            return Err(Error::invalid(
                "context",
                format!(
                    "{} tokens is less than the {} tokens of frames_per_sample and text_tokens",
                    fmt_tokens(c),
                    fmt_tokens(f)
                ),
            ))
        }
        (Some(c), _) => c,
        (None, Some(f)) => f,
        (None, None) => {
            return Err(Error::invalid(
                "context",
                "missing (expected context = \"256K\" or frames_per_sample)",
            ))
        }
    };
    // Whole zigzag chunks for every sequence-parallel degree: pad to a multiple of 2 x GPUs.
    let granule = 2 * u64::from(gpus);
    let context_tokens = context.div_ceil(granule) * granule;
    let samples = match (&s.samples, &s.tokens) {
        (Some(n), None) => parse_count(n, "samples")?,
        (None, Some(t)) => parse_count(t, "tokens")?.div_ceil(context_tokens),
        _ => {
            return Err(Error::invalid(
                "samples",
                "give exactly one of samples or tokens",
            ))
        }
    };
    let recompute = match s.recompute.as_deref() {
        None => None,
        Some(r) => Some(Recompute::parse_requested(r).map_err(|m| Error::invalid("recompute", m))?),
    };
    if s.global_batch == Some(0) {
        return Err(Error::invalid("global_batch", "must be positive"));
    }
    Ok(Stage {
        name,
        model,
        topology,
        strategy,
        gpus,
        context_tokens,
        frames_per_sample: s.frames_per_sample,
        vision,
        text_tokens: s.text_tokens.unwrap_or(0),
        samples,
        global_batch: s.global_batch,
        recompute,
    })
}

/// One planned stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageResult {
    pub stage: Stage,
    pub plan_file: String,
    pub layout: String,
    pub zero_stage: u8,
    pub recompute: Recompute,
    pub global_batch: u64,
    pub steps: u64,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    pub memory_per_gpu_bytes: f64,
    pub tokens: u64,
    pub start_s: f64,
    pub wall_clock_s: f64,
    pub gpu_hours: f64,
}

/// A planned campaign.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignResult {
    pub schema: String,
    pub schema_version: u32,
    pub name: String,
    pub stages: Vec<StageResult>,
    pub wall_clock_s: f64,
    pub gpu_hours: f64,
}

fn slug(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            o.push(c.to_ascii_lowercase());
        } else if !o.ends_with('-') {
            o.push('-');
        }
    }
    o.trim_matches('-').chars().take(40).collect()
}

/// Plans every stage; writes each stage's plan into `out` when given.
pub fn plan(recipe: &Recipe, out: Option<&Path>) -> Result<CampaignResult> {
    let mut stages = Vec::new();
    let mut t = 0.0;
    for (i, s) in recipe.stages.iter().enumerate() {
        let model = crate::spec::model::load(&s.model)?;
        let cluster = ClusterSpec::load(&s.topology)?;
        let ctx_err =
            |e: Error| Error::invalid(format!("stage {} ({})", i + 1, s.name), e.to_string());
        cluster.check_gpus(u64::from(s.gpus)).map_err(ctx_err)?;
        let topo = Topology::build(&cluster, s.gpus);
        let req = Request {
            gpus: s.gpus,
            context: s.context_tokens,
            global_batch: s.global_batch,
            recompute: s.recompute,
            strategy: s.strategy,
            pin: None,
            zero: None,
        };
        // Video stages cost both MM-SP stages (vision encoder, re-shard) for each layout.
        let mm = match (s.frames_per_sample, &s.vision) {
            (Some(frames), Some(v)) => Some(
                MultiModal::new(
                    VisionSpec::load(v)?,
                    vec![Sample::uniform(frames, s.text_tokens)],
                    true,
                )?
                .with_context(s.context_tokens),
            ),
            _ => None,
        };
        // The same pipeline as `mmsp plan`: the same plan for the same stage.
        let planned = crate::pipeline::plan_training(&topo, &s.topology, &model, &req, mm.as_ref())
            .map_err(ctx_err)?;
        let (p, result, best) = (planned.plan, planned.result, &planned.best);
        let file = format!("stage-{}-{}.plan.json", i + 1, slug(&s.name));
        if let Some(dir) = out {
            let json = serde_json::to_string_pretty(&p)
                .map_err(|e| Error::invalid("plan", e.to_string()))?;
            write_file(&dir.join(&file), &(json + "\n"))?;
        }
        let steps = s.samples.div_ceil(result.global_batch);
        let e = &best.estimate;
        let wall = steps as f64 * e.step_time_s;
        stages.push(StageResult {
            stage: s.clone(),
            plan_file: file,
            layout: short_layout(best),
            zero_stage: best.candidate.zero_stage,
            recompute: best.candidate.recompute,
            global_batch: result.global_batch,
            steps,
            step_time_s: e.step_time_s,
            tokens_per_s: e.tokens_per_s,
            mfu: e.mfu,
            memory_per_gpu_bytes: e.memory_per_gpu_bytes,
            tokens: steps * result.global_batch * s.context_tokens,
            start_s: t,
            wall_clock_s: wall,
            gpu_hours: wall * f64::from(s.gpus) / 3600.0,
        });
        t += wall;
    }
    Ok(CampaignResult {
        schema: "mmsp-campaign".into(),
        schema_version: 1,
        name: recipe.name.clone(),
        gpu_hours: stages.iter().map(|s| s.gpu_hours).sum(),
        wall_clock_s: t,
        stages,
    })
}

/// Wall-clock time in hours or days.
pub fn fmt_duration(s: f64) -> String {
    let h = s / 3600.0;
    if h >= 72.0 {
        format!("{:.1} days", h / 24.0)
    } else if h >= 1.0 {
        format!("{h:.1} h")
    } else {
        format!("{:.0} min", s / 60.0)
    }
}

/// A count with a binary suffix ([`UNITS`]): "2G", "1.5T", "4M"; under 1024^2 in full.
fn fmt_count(n: u64) -> String {
    let trim = |v: f64| {
        let t = format!("{v:.2}");
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    if n >= TI {
        trim(n as f64 / TI as f64) + "T"
    } else if n >= GI {
        trim(n as f64 / GI as f64) + "G"
    } else if n >= 1024 * 1024 {
        fmt_tokens(n)
    } else {
        n.to_string()
    }
}

const HEADER: [&str; 13] = [
    "stage",
    "model",
    "GPUs",
    "context",
    "layout",
    "recompute",
    "global batch",
    "steps",
    "step (s)",
    "MFU",
    "memory/GPU",
    "wall-clock",
    "GPU-hours",
];

fn rows(c: &CampaignResult) -> Vec<Vec<String>> {
    c.stages
        .iter()
        .map(|s| {
            vec![
                s.stage.name.clone(),
                s.stage.model.clone(),
                s.stage.gpus.to_string(),
                fmt_tokens(s.stage.context_tokens),
                format!("{} ZeRO-{}", s.layout, s.zero_stage),
                s.recompute.as_str().into(),
                s.global_batch.to_string(),
                s.steps.to_string(),
                format!("{:.2}", s.step_time_s),
                format!("{:.0}%", s.mfu * 100.0),
                fmt_gib(s.memory_per_gpu_bytes),
                fmt_duration(s.wall_clock_s),
                format!("{:.0}", s.gpu_hours),
            ]
        })
        .collect()
}

/// The table printed on standard output.
pub fn table(c: &CampaignResult) -> String {
    let mut all = vec![HEADER.map(String::from).to_vec()];
    all.extend(rows(c));
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|i| all.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut o = format!("campaign: {}\n", c.name);
    for r in &all {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i == 0 || i == 1 || i == 4 {
                    format!("{v:<w$}", w = widths[i])
                } else {
                    format!("{v:>w$}", w = widths[i])
                }
            })
            .collect();
        o += line.join("  ").trim_end();
        o.push('\n');
    }
    o += &format!(
        "total: {} wall-clock, {:.0} GPU-hours\n{UNITS}\n",
        fmt_duration(c.wall_clock_s),
        c.gpu_hours
    );
    o
}

/// The campaign page: summary, timeline chart and the stage table.
pub fn build_page(c: &CampaignResult) -> Result<Page> {
    let days = c.wall_clock_s / 3600.0 >= 72.0;
    let unit = if days { 86400.0 } else { 3600.0 };
    let spans: Vec<Span> = c
        .stages
        .iter()
        .map(|s| Span {
            label: format!("{} ({} GPUs)", s.stage.name, s.stage.gpus),
            start: s.start_s / unit,
            end: (s.start_s + s.wall_clock_s) / unit,
        })
        .collect();
    let svg = charts::timeline(
        "Campaign timeline",
        if days {
            "wall-clock time (days)"
        } else {
            "wall-clock time (hours)"
        },
        &spans,
    )?;
    let mut summary = vec![format!(
        "{} stages take {} of wall-clock time and {:.0} GPU-hours in total.",
        c.stages.len(),
        fmt_duration(c.wall_clock_s),
        c.gpu_hours
    )];
    for s in &c.stages {
        summary.push(format!(
            "{}: {} on {} GPUs at {} tokens per sample{}, {} samples ({} tokens) in {} steps of {:.2} s: {} ({:.0} GPU-hours), MFU {:.0}%.",
            s.stage.name,
            s.stage.model,
            s.stage.gpus,
            fmt_tokens(s.stage.context_tokens),
            s.stage
                .frames_per_sample
                .map(|f| format!(" ({f} frames)"))
                .unwrap_or_default(),
            fmt_count(s.stage.samples),
            fmt_count(s.tokens),
            s.steps,
            s.step_time_s,
            fmt_duration(s.wall_clock_s),
            s.gpu_hours,
            s.mfu * 100.0
        ));
    }
    Ok(Page {
        title: format!("mmsp campaign: {}", c.name),
        subtitle: format!(
            "Each stage planned by the mmsp search; wall-clock = steps x predicted step time; GPU-hours = wall-clock x GPUs; {UNITS}. mmsp {}.",
            env!("CARGO_PKG_VERSION")
        ),
        summary,
        sections: vec![Section {
            title: "Stages".into(),
            text: vec![
                "Stages run one after another. Each stage's plan is written next to this page (stage-N-*.plan.json) for mmsp export or mmsp-runtime.".into(),
            ],
            charts: vec![svg],
            tables: vec![Table {
                caption: "Stages".into(),
                header: HEADER.map(String::from).to_vec(),
                rows: rows(c),
            }],
        }],
        files: c
            .stages
            .iter()
            .map(|s| s.plan_file.clone())
            .chain(["campaign.md", "campaign.csv", "campaign.json"].map(String::from))
            .collect(),
    })
}

/// Runs `mmsp campaign`: plans the recipe, writes the files, returns the table to print.
pub fn run(a: &CampaignRequest) -> Result<String> {
    let recipe = Recipe::load(&a.recipe)?;
    create_dir(&a.out)?;
    let c = plan(&recipe, Some(&a.out))?;
    let page = build_page(&c)?;
    write_file(&a.out.join("campaign.html"), &page::html(&page))?;
    write_file(&a.out.join("campaign.md"), &page::markdown(&page))?;
    let csv_rows: Vec<Vec<String>> = c
        .stages
        .iter()
        .map(|s| {
            vec![
                s.stage.name.clone(),
                s.stage.model.clone(),
                s.stage.topology.clone(),
                s.stage.gpus.to_string(),
                s.stage.context_tokens.to_string(),
                s.stage.samples.to_string(),
                s.global_batch.to_string(),
                s.steps.to_string(),
                format!("{:.6}", s.step_time_s),
                format!("{:.1}", s.start_s),
                format!("{:.1}", s.wall_clock_s),
                format!("{:.2}", s.gpu_hours),
                s.plan_file.clone(),
            ]
        })
        .collect();
    write_file(
        &a.out.join("campaign.csv"),
        &page::csv(
            &[
                "stage",
                "model",
                "topology",
                "gpus",
                "context_tokens",
                "samples",
                "global_batch",
                "steps",
                "step_time_s",
                "start_s",
                "wall_clock_s",
                "gpu_hours",
                "plan_file",
            ],
            &csv_rows,
        ),
    )?;
    let json =
        serde_json::to_string_pretty(&c).map_err(|e| Error::invalid("campaign", e.to_string()))?;
    write_file(&a.out.join("campaign.json"), &(json + "\n"))?;
    Ok(format!(
        "{}wrote {}\n",
        table(&c),
        a.out.join("campaign.html").display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = r#"
name = "t"
[[stage]]
name = "extend"
context = "64K"
tokens = "1B"
gpus = 8
[[stage]]
name = "video"
frames_per_sample = 256
text_tokens = 1000
samples = 100
gpus = 16
"#;

    #[test]
    fn parses_counts() {
        // One binary convention: B and G alike are 1024^3, T 1024^4, K and M as for tokens.
        assert_eq!(
            parse_count(&Count::Text("2B".into()), "x").unwrap(),
            2 * 1024 * 1024 * 1024
        );
        assert_eq!(
            parse_count(&Count::Text("2G".into()), "x").unwrap(),
            2 * 1024 * 1024 * 1024
        );
        assert_eq!(
            parse_count(&Count::Text("1.5T".into()), "x").unwrap(),
            3 * 512 * 1024 * 1024 * 1024
        );
        assert_eq!(fmt_count(2 * 1024 * 1024 * 1024), "2G");
        assert_eq!(fmt_count(3 * 512 * 1024 * 1024 * 1024), "1.5T");
        assert_eq!(fmt_count(20000), "20000");
        assert_eq!(fmt_count(4 * 1024 * 1024), "4M");
        assert_eq!(
            parse_count(&Count::Text("128K".into()), "x").unwrap(),
            131072
        );
        assert_eq!(parse_count(&Count::Int(7), "x").unwrap(), 7);
        assert!(parse_count(&Count::Text("lots".into()), "x").is_err());
        assert!(parse_count(&Count::Int(0), "x").is_err());
    }

    #[test]
    fn plans_stages_in_sequence() {
        let r = Recipe::from_toml(RECIPE, "r.toml").unwrap();
        // 256 frames x 196 tokens + 1000 text tokens, padded to a multiple of 2 x 16.
        assert_eq!(
            r.stages[1].context_tokens,
            (256 * 196 + 1000_u64).div_ceil(32) * 32
        );
        // "1B" tokens = 1024^3 (binary), in 64K-token samples.
        assert_eq!(r.stages[0].samples, (1u64 << 30).div_ceil(65536));
        let c = plan(&r, None).unwrap();
        assert_eq!(c.stages.len(), 2);
        let (a, b) = (&c.stages[0], &c.stages[1]);
        assert_eq!(b.start_s, a.wall_clock_s);
        assert!((a.gpu_hours - a.wall_clock_s * 8.0 / 3600.0).abs() < 1e-9);
        assert!(a.steps * a.global_batch >= a.stage.samples);
        assert!((c.wall_clock_s - a.wall_clock_s - b.wall_clock_s).abs() < 1e-6);
    }

    #[test]
    fn rejects_bad_recipes() {
        for (bad, want) in [
            ("name = 1", "not a campaign recipe"),
            ("name = \"x\"", "no [[stage]]"),
            ("[[stage]]\ncontext = \"64K\"\nsamples = 1", "gpus"),
            ("[[stage]]\ngpus = 8\nsamples = 1", "context"),
            (
                "[[stage]]\ngpus = 8\ncontext = \"64K\"",
                "exactly one of samples or tokens",
            ),
            (
                "[[stage]]\ngpus = 8\ncontext = \"64K\"\nsamples = 1\ncolour = 2",
                "not a campaign recipe",
            ),
        ] {
            let e = Recipe::from_toml(bad, "r.toml").unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
