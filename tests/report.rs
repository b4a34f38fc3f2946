//! End-to-end tests of `mmsp report` and `mmsp campaign` on tiny grids: the files are written,
//! the HTML is well-formed and self-contained (inline SVG charts, no external URLs in src or
//! href), CSV and JSON hold one row per grid cell, and bad inputs fail with one line, exit 2.

use std::path::{Path, PathBuf};
use std::process::Command;

fn mmsp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mmsp"))
        .args(args)
        .output()
        .expect("run mmsp");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmsp-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Parses the page as XML and checks that nothing refers outside it.
fn check_self_contained(html: &str) -> roxmltree::Document<'_> {
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(html, opts).expect("well-formed HTML");
    for n in doc.descendants().filter(|n| n.is_element()) {
        for a in n.attributes() {
            let name = a.name().to_ascii_lowercase();
            if ["src", "href", "xlink:href", "action", "srcset"].contains(&name.as_str()) {
                let v = a.value().to_ascii_lowercase();
                assert!(
                    !v.contains("http://") && !v.contains("https://") && !v.starts_with("//"),
                    "external {name}={v}"
                );
            }
        }
        let tag = n.tag_name().name();
        assert!(
            !["script", "link", "iframe", "img"].contains(&tag),
            "unexpected <{tag}>"
        );
    }
    assert!(!html.contains("url(http"), "external url() in CSS");
    doc
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn report_on_a_tiny_grid() {
    let out = tmp("tiny");
    let (code, stdout, err) = mmsp(&[
        "report",
        "--out",
        out.to_str().unwrap(),
        "--gpus",
        "8,16",
        "--contexts",
        "32K,64K,128K",
        "--strategies",
        "2d,ring",
        "--recompute",
        "none,full",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.is_empty(),
        "progress or warnings on a non-terminal: {err}"
    );
    assert!(stdout.contains("report.html"));
    let html = read(&out.join("report.html"));
    let doc = check_self_contained(&html);
    let svgs = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "svg")
        .count();
    // max context x2, step time, throughput, memory, exposed communication.
    assert_eq!(svgs, 6, "charts");
    for s in [
        "Summary",
        "GPUs (log scale)",
        "max context (tokens, log scale)",
        "step time (s)",
        "throughput (tokens/s)",
        "memory per GPU (GiB)",
        "exposed communication (% of step)",
        "GPU memory 79 GiB", // dgx-h100: 79.18 GiB usable, measured
    ] {
        assert!(html.contains(s), "missing {s}");
    }
    let md = read(&out.join("report.md"));
    assert!(md.contains("## Summary") && md.contains("| GPUs |"));
    // One CSV row per grid cell, plus the header.
    let mc = read(&out.join("max_context.csv"));
    assert_eq!(mc.lines().count(), 1 + 2 * 2 * 2);
    assert!(mc.starts_with("model,topology,gpus,strategy,recompute,max_context_tokens"));
    let pts = read(&out.join("points.csv"));
    assert_eq!(pts.lines().count(), 1 + 2 * 3 * 2);
    let json: serde_json::Value = serde_json::from_str(&read(&out.join("report.json"))).unwrap();
    assert_eq!(json["schema"], "mmsp-report");
    assert_eq!(json["points"].as_array().unwrap().len(), 12);
    // The largest context grows with GPUs (more GPUs hold more activations).
    let mcs: Vec<u64> = json["max_context"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["strategy"] == "2d" && r["recompute"] == "outside_attention")
        .map(|r| r["max_context_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(mcs.len(), 2);
    assert!(mcs[1] > mcs[0], "{mcs:?}");
    // The summary quotes the computed numbers, not fixed text: without recompute (ZeRO-3 keeps
    // 16/N B per parameter and recompute is a choice under it) the largest context on each GPU
    // count, and with the runtime's recompute the 16 GPUs' largest context.
    let none: Vec<u64> = json["max_context"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["strategy"] == "2d" && r["recompute"] == "none")
        .map(|r| r["max_context_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(none.len(), 2);
    assert!(none[1] > none[0] && none[0] > 0, "{none:?}");
    let first = json["summary"][0].as_str().unwrap();
    for n in &none {
        let tokens = mmsp_planner::units::fmt_tokens(*n);
        assert!(first.contains(&tokens), "{first} lacks {tokens}");
    }
    let second = json["summary"][1].as_str().unwrap();
    let tokens = mmsp_planner::units::fmt_tokens(mcs[1]);
    assert!(second.contains(&tokens), "{second} lacks {tokens}");
    // The per-context sentence names the winner of each context row of the points table.
    let focus = json["grid"]["focus_gpus"].as_u64().unwrap();
    let per_context = json["summary"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .find(|s| s.starts_with("Fastest strategy at each context"))
        .expect("a per-context sentence");
    let rate = |p: &serde_json::Value| p["tokens_per_s"].as_f64().unwrap();
    for ctx in [32768u64, 65536, 131072] {
        let rows: Vec<&serde_json::Value> = json["points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["gpus"].as_u64() == Some(focus) && p["context_tokens"] == ctx)
            .filter(|p| p["feasible"] == true)
            .collect();
        let max = rows.iter().map(|p| rate(p)).fold(0.0, f64::max);
        let named = rows
            .iter()
            .find(|p| {
                let t = mmsp_planner::units::fmt_tokens(ctx);
                per_context.contains(&format!("{t} {} (", p["strategy"].as_str().unwrap()))
            })
            .unwrap_or_else(|| panic!("{per_context}: no strategy named at {ctx}"));
        assert_eq!(rate(named), max, "{per_context} at {ctx}");
    }
}

#[test]
fn campaign_example() {
    let out = tmp("campaign");
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/campaign.toml");
    let (code, stdout, err) = mmsp(&["campaign", recipe, "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("GPU-hours") && stdout.contains("total:"));
    let html = read(&out.join("campaign.html"));
    let doc = check_self_contained(&html);
    assert_eq!(
        doc.descendants()
            .filter(|n| n.tag_name().name() == "svg")
            .count(),
        1
    );
    assert!(html.contains("Campaign timeline"));
    let json: serde_json::Value = serde_json::from_str(&read(&out.join("campaign.json"))).unwrap();
    let stages = json["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    let total: f64 = stages
        .iter()
        .map(|s| s["gpu_hours"].as_f64().unwrap())
        .sum();
    assert!((total - json["gpu_hours"].as_f64().unwrap()).abs() < 1e-6);
    // Every stage plan is a valid plan that the exporters accept.
    for s in stages {
        let plan = out.join(s["plan_file"].as_str().unwrap());
        let p = mmsp_planner::plan::load_training(plan.to_str().unwrap()).unwrap();
        assert_eq!(p.world_size, s["stage"]["gpus"].as_u64().unwrap() as u32);
        let (code, _, err) = mmsp(&["export", "--to", "torchrun", plan.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
}

#[test]
fn bad_inputs_are_one_line_exit_2() {
    let dir = tmp("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let bad_recipe = dir.join("bad.toml");
    std::fs::write(&bad_recipe, "[[stage]]\ngpus = 8\n").unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    for args in [
        vec!["report", "--out", out, "--models", "gpt-9"],
        vec!["report", "--out", out, "--gpus", "12"],
        vec!["report", "--out", out, "--contexts", "lots"],
        vec!["report", "--out", out, "--strategies", "zigzag"],
        vec!["report", "--out", out, "--gpus", "8", "--focus-gpus", "16"],
        vec!["campaign", "/nonexistent/recipe.toml"],
        vec!["campaign", bad_recipe.to_str().unwrap(), "--out", out],
    ] {
        let (code, stdout, err) = mmsp(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error:"), "{err}");
    }
}
