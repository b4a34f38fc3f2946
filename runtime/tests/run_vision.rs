//! `run` of a plan with a vision section (MM-SP stage 1 + 2), CPU, thread ranks: a tiny
//! VLM plan (4 packed samples, 8 frames, 8 padding tokens) trained at SP 1, 2 (1 x 2), 4
//! (2 x 2) and SP 2 x DP 2 gives the same losses; stage 2 runs the plan's per-sample ranges
//! (`plan_ranges_match`); the report carries the vision stage's times next to the plan's;
//! plans the planner made for samples of odd lengths (each padded at its end to a multiple of
//! 2 x SP) run with the plan's ranges; bad vision sections (a sample length that is not a
//! multiple of 2 x SP among them, padding included) are one-line errors with exit code 2.
use mmsp_runtime::testing::{quiet_run as quiet, report_json, report_losses as losses};
use mmsp_runtime::train::run::{run_vlm, ModelSource, RunOptions, VisionOptions};
use mmsp_runtime::vision::balanced_frames;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Samples (frames, text tokens): 3 + 4, 1 + 4, 0 + 8, 4 + 0; 4 tokens per frame: 16, 8,
/// 8 and 16 tokens, multiples of 2 x SP for SP up to 4 (each sample is zigzag-sharded on its
/// own); the padding up to the context is one more sample of 8.
const SAMPLES: [(usize, usize); 4] = [(3, 4), (1, 4), (0, 8), (4, 0)];
const CONTEXT: usize = 56;

fn vision_plan(ulysses: usize, ring: usize, dp: usize, fpr: Option<Vec<Vec<usize>>>) -> Value {
    mmsp_runtime::testing::vision_plan(&SAMPLES, 4, CONTEXT, (ulysses, ring, dp), fpr)
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmsp-run-vision-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(name: &str, v: &Value) -> PathBuf {
    let p = dir().join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
    p
}

fn opts(plan: &Path, n: usize, steps: usize) -> RunOptions {
    RunOptions {
        plan: plan.to_path_buf(),
        steps,
        model: ModelSource::Tiny,
        inprocess: Some(n),
        cpu: true,
        lr: 1e-2,
        peak_flops: 1e12,
        out: None,
    }
}

#[test]
fn run_vision_plan_same_losses_at_sp_1_2_4() {
    let mut reference: Option<Vec<f64>> = None;
    for (u, r, dp) in [(1, 1, 1), (1, 2, 1), (2, 2, 1), (2, 1, 2)] {
        let plan = write(
            &format!("vlm_{u}x{r}x{dp}.json"),
            &vision_plan(u, r, dp, None),
        );
        let v = report_json(run_vlm(
            &opts(&plan, u * r * dp, 3),
            &quiet(),
            &VisionOptions::default(),
        ));
        let l = losses(&v);
        assert_eq!(l.len(), 3);
        assert!(l.iter().all(|x| x.is_finite() && *x > 0.0), "{l:?}");
        let vis = &v["vision"];
        assert_eq!(vis["padding_tokens"], 8);
        assert_eq!(vis["stage2"]["plan_ranges_match"], true, "{u}x{r}x{dp}");
        assert_eq!(vis["stage2"]["sample_lens"], json!([16, 8, 8, 16, 8]));
        for k in [
            "encode_s",
            "reshard_s",
            "reshard_backward_s",
            "encoder_backward_s",
        ] {
            assert!(vis["measured_rank0"][k].as_f64().unwrap() >= 0.0, "{k}");
        }
        assert!(vis["predicted"]["encoder_s"].as_f64().unwrap() > 0.0);
        assert_eq!(
            vis["frames_per_rank"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .sum::<u64>(),
            8
        );
        match &reference {
            None => reference = Some(l),
            Some(r0) => {
                for (a, b) in l.iter().zip(r0) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs(),
                        "{u}x{r}x{dp}: losses {l:?} vs SP 1 {r0:?}"
                    );
                }
            }
        }
    }
    // The steps trained: the loss moved.
    let r0 = reference.unwrap();
    assert!((r0[2] - r0[0]).abs() > 1e-6, "{r0:?}");
}

/// ZeRO-3 (parameters, gradients and moments sharded, the embedding table gathered for the
/// text rows' lookup) trains a VLM plan as ZeRO-0 does, at SP 2x2 and over DP 2.
#[test]
fn run_vision_plan_zero3_equals_zero0() {
    for (u, r, dp) in [(2, 2, 1), (1, 2, 2)] {
        let mut per_stage = Vec::new();
        for zero in [0, 3] {
            let mut v = vision_plan(u, r, dp, None);
            v["zero_stage"] = json!(zero);
            let plan = write(&format!("vlm_z{zero}_{u}x{r}x{dp}.json"), &v);
            let out = report_json(run_vlm(
                &opts(&plan, u * r * dp, 3),
                &quiet(),
                &VisionOptions::default(),
            ));
            assert_eq!(out["zero_stage"], zero);
            per_stage.push(losses(&out));
        }
        for (a, b) in per_stage[1].iter().zip(&per_stage[0]) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "{u}x{r}x{dp}: ZeRO-3 {:?} vs ZeRO-0 {:?}",
                per_stage[1],
                per_stage[0]
            );
        }
    }
}

/// Plans made by the planner for two samples whose lengths do not divide (2 frames + 7 text
/// tokens, 3 frames + 5, 196 tokens per frame: 399 and 593 tokens), written by
/// `mmsp plan --gpus 4 --topology runtime/tests/data/h100-4gpu.toml --model
/// runtime/tests/data/llama3-8b-2layer.json --samples runtime/tests/data/odd_samples.jsonl --zero 1
/// --format json` with `--layout 2x2 --global-batch 1` and `--layout 1x2 --global-batch 2`:
/// each sample is padded at its end to a multiple of 2 x SP (1 and 7 tokens at SP 4, 1 and 3 at
/// SP 2), and `run` executes the plan's ranges. The padding carries no loss and no real token
/// attends to it, so both layouts train alike.
#[test]
fn run_planner_made_plans_with_padded_samples() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut reference: Option<Vec<f64>> = None;
    for (file, pads, lens) in [
        ("plan_vlm_padded_2x2.json", [1, 7], [400, 600]),
        ("plan_vlm_padded_1x2.json", [1, 3], [400, 596]),
    ] {
        let path = data.join(file);
        let plan: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            plan["vision"]["pad_tokens_per_sample"],
            json!(pads),
            "{file}"
        );
        assert_eq!(plan["vision"]["sample_lens"], json!(lens), "{file}");
        assert_eq!(
            plan["vision"]["text_tokens_per_sample"],
            json!([7, 5]),
            "{file}"
        );
        let v = report_json(run_vlm(
            &opts(&path, 4, 2),
            &quiet(),
            &VisionOptions::default(),
        ));
        let vis = &v["vision"];
        assert_eq!(vis["stage2"]["plan_ranges_match"], true, "{file}");
        assert_eq!(vis["stage2"]["sample_lens"], json!(lens), "{file}");
        assert_eq!(vis["padding_tokens"], pads[0] + pads[1], "{file}");
        let l = losses(&v);
        assert!(l.iter().all(|x| x.is_finite() && *x > 0.0), "{file}: {l:?}");
        match &reference {
            None => reference = Some(l),
            Some(r0) => {
                for (a, b) in l.iter().zip(r0) {
                    assert!((a - b).abs() <= 1e-4 * b.abs(), "{file}: {l:?} vs {r0:?}");
                }
            }
        }
    }
}

#[test]
fn run_vision_frozen_encoder_and_balanced_frames() {
    let mut p = vision_plan(1, 2, 1, Some(balanced_frames(8, 2).unwrap()));
    p["vision"]["train_vision"] = json!(false);
    let plan = write("vlm_frozen.json", &p);
    let v = report_json(run_vlm(
        &opts(&plan, 2, 2),
        &quiet(),
        &VisionOptions::default(),
    ));
    assert_eq!(v["vision"]["train_vision"], false);
    assert_eq!(v["vision"]["measured_rank0"]["encoder_backward_s"], 0.0);
}

/// Runs the binary; returns (exit code, stderr).
fn binary(plan: &Path, n: usize) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"))
        .args([
            "run",
            "--cpu",
            "--tiny",
            "--steps",
            "1",
            "--quiet",
            "--inprocess",
        ])
        .arg(n.to_string())
        .arg(plan)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The plan's token ranges made again for its (edited) `vision.sample_lens`, as the planner
/// would write them, so that the runtime's own checks of the section are what is tested.
fn reshard(p: &mut Value, ulysses: usize, ring: usize) {
    let lens: Vec<u64> = serde_json::from_value(p["vision"]["sample_lens"].clone()).unwrap();
    let r = mmsp_plan::zigzag::ranges_per_rank(&lens, ulysses, ring).unwrap();
    p["tokens"]["ranges_per_rank"] = json!(r
        .iter()
        .map(|rs| rs.iter().map(|&(a, b)| [a, b]).collect::<Vec<_>>())
        .collect::<Vec<_>>());
}

#[test]
fn bad_vision_sections_are_one_line_errors_exit_2() {
    let mut cases: Vec<(&str, Value, usize, &str)> = Vec::new();
    // Stage 1 for 2 ranks in a plan whose SP group has 4.
    cases.push((
        "ranks",
        vision_plan(2, 2, 1, Some(balanced_frames(8, 2).unwrap())),
        4,
        "frames_per_rank has 2 ranks",
    ));
    // A frame missing: frames_per_rank does not sum to the frames.
    cases.push((
        "sum",
        vision_plan(1, 2, 1, Some(vec![vec![0, 1, 2], vec![3, 4, 5, 6]])),
        2,
        "holds 7 frames",
    ));
    // A frame twice (the count is right).
    cases.push((
        "dup",
        vision_plan(1, 2, 1, Some(vec![vec![0, 1, 2, 3], vec![3, 4, 5, 6]])),
        2,
        "more than one rank",
    ));
    // Per-sample frames inconsistent with the total.
    let mut p = vision_plan(1, 2, 1, None);
    p["vision"]["frames_per_sample"] = json!([3, 1, 0, 3]);
    cases.push(("fps", p, 2, "frames_per_sample sums to 7"));
    // More tokens than the context.
    let mut p = vision_plan(1, 2, 1, None);
    p["context_tokens"] = json!(40);
    cases.push(("ctx", p, 2, "add up to more than the context of 40"));
    // A sample of 6 tokens at SP 2 x 2 (not a multiple of 8).
    let mut p = vision_plan(2, 2, 1, None);
    p["vision"]["sample_lens"][2] = json!(6);
    p["vision"]["text_tokens_per_sample"][2] = json!(6);
    reshard(&mut p, 2, 2);
    cases.push(("len", p, 4, "packed sample 2 has 6 tokens"));
    // Padding that makes a sample no multiple of 8 at SP 2 x 2 (2 + 8 = 10 tokens).
    let mut p = vision_plan(2, 2, 1, None);
    p["vision"]["sample_lens"][2] = json!(10);
    p["vision"]["pad_tokens_per_sample"] = json!([0, 0, 2, 0]);
    reshard(&mut p, 2, 2);
    cases.push(("pad", p, 4, "packed sample 2 has 10 tokens"));
    // Padding longer than the sample's tokens beyond its frames.
    let mut p = vision_plan(1, 2, 1, None);
    p["vision"]["pad_tokens_per_sample"] = json!([0, 0, 0, 4]);
    cases.push(("padfit", p, 2, "4 padding tokens but 16 tokens in all"));
    // A launch of the wrong size.
    cases.push(("world", vision_plan(1, 2, 1, None), 4, "2"));
    for (name, plan, n, want) in cases {
        let path = write(&format!("bad_{name}.json"), &plan);
        let (code, err) = binary(&path, n);
        assert_eq!(code, 2, "{name}: exit {code}, stderr {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
    }
    // The library says the same without a device.
    let path = write(
        "bad_lib.json",
        &vision_plan(1, 2, 1, Some(vec![vec![0, 1, 2], vec![3, 4, 5, 6]])),
    );
    let e = run_vlm(&opts(&path, 2, 1), &quiet(), &VisionOptions::default()).unwrap_err();
    assert!(e.is_bad_input(), "{e}");
}
