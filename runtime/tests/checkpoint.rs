//! Checkpoint and resume are bit-exact: 4 steps straight against 2 steps + save + resume +
//! 2 steps give identical losses, parameters and optimizer state, for SP 1 and SP 2
//! (in-process thread ranks, CPU) with ZeRO-0 and ZeRO-1, and for ZeRO-3 (sharded parameters)
//! over SP 2 and over DP 2; a checkpoint of another layout or
//! model is refused with one line. A `--deterministic` run reports itself and repeats bit for
//! bit; asking it for cuDNN attention is refused as bad input.
use mmsp_runtime::testing::report_json;
use mmsp_runtime::train::run::{run_with, ModelSource, RunExtras, RunOptions};
use mmsp_runtime::RuntimeError;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Tensor;

fn plan_json(ulysses: usize, ring: usize, dp: usize, zero: u32) -> String {
    mmsp_runtime::testing::plan_json(ulysses, ring, dp, zero, 64)
}

struct Case {
    dir: PathBuf,
    plan: PathBuf,
    ranks: usize,
}

impl Case {
    fn new(name: &str, ulysses: usize, ring: usize, dp: usize, zero: u32) -> Case {
        let dir = std::env::temp_dir().join(format!("mmsp-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let plan = dir.join("plan.json");
        std::fs::write(&plan, plan_json(ulysses, ring, dp, zero)).unwrap();
        Case {
            dir,
            plan,
            ranks: ulysses * ring * dp,
        }
    }

    fn run(&self, steps: usize, save: &str, resume: Option<&str>) -> Result<Value, RuntimeError> {
        let opts = RunOptions {
            plan: self.plan.clone(),
            steps,
            model: ModelSource::Tiny,
            inprocess: Some(self.ranks),
            cpu: true,
            lr: 1e-2,
            peak_flops: 1e12,
            out: None,
        };
        let extras = RunExtras {
            save: Some(self.dir.join(save)),
            save_every: 0,
            resume: resume.map(|r| self.dir.join(r)),
            trace: None,
            progress: false,
            ..RunExtras::default()
        };
        run_with(&opts, &extras).map(|r| r.expect("an in-process run reports").to_json())
    }
}

fn losses(v: &Value) -> Vec<u64> {
    v["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap().to_bits())
        .collect()
}

fn shards(dir: &Path) -> Vec<(String, Vec<(String, Tensor)>)> {
    let man: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    man["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let f = f.as_str().unwrap().to_string();
            let mut ts = Tensor::read_safetensors(dir.join(&f)).unwrap();
            ts.sort_by(|a, b| a.0.cmp(&b.0));
            (f, ts)
        })
        .collect()
}

fn assert_same_state(a: &Path, b: &Path, what: &str) {
    let (sa, sb) = (shards(a), shards(b));
    assert_eq!(sa.len(), sb.len(), "{what}: shard counts");
    for ((fa, ta), (fb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(fa, fb, "{what}");
        assert_eq!(ta.len(), tb.len(), "{what}: {fa}");
        for ((na, xa), (nb, xb)) in ta.iter().zip(tb) {
            assert_eq!(na, nb, "{what}: {fa}");
            assert_eq!(xa.size(), xb.size(), "{what}: {fa} {na}");
            assert!(xa.equal(xb), "{what}: {fa} {na} differs after resume");
        }
    }
}

fn bit_exact(name: &str, ulysses: usize, ring: usize, dp: usize, zero: u32) {
    let c = Case::new(name, ulysses, ring, dp, zero);
    let straight = c.run(4, "straight", None).unwrap();
    let first = c.run(2, "half", None).unwrap();
    let resumed = c.run(2, "resumed", Some("half")).unwrap();
    let (l4, l2, lr) = (losses(&straight), losses(&first), losses(&resumed));
    assert_eq!(l4.len(), 4);
    assert_eq!(&l4[..2], l2.as_slice(), "{name}: first two losses");
    assert_eq!(&l4[2..], lr.as_slice(), "{name}: losses after resume");
    assert_eq!(resumed["first_step_index"], 2);
    assert_same_state(&c.dir.join("straight"), &c.dir.join("resumed"), name);
    let man: Value = serde_json::from_str(
        &std::fs::read_to_string(c.dir.join("resumed/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(man["step"], 4);
    assert_eq!(man["losses"].as_array().unwrap().len(), 4);
    // Training changed the state (the comparison is not between two untouched copies).
    assert_ne!(l4[0], l4[3], "{name}: loss did not move");
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[test]
fn resume_is_bit_exact_sp1_zero0() {
    bit_exact("sp1z0", 1, 1, 1, 0);
}

#[test]
fn resume_is_bit_exact_sp1_zero1_dp2() {
    // ZeRO-1 over DP 2: two optimizer shards.
    bit_exact("sp1z1dp2", 1, 1, 2, 1);
}

#[test]
fn resume_is_bit_exact_sp2_zero0() {
    bit_exact("sp2z0", 1, 2, 1, 0);
}

#[test]
fn resume_is_bit_exact_sp2_zero1() {
    bit_exact("sp2z1", 2, 1, 1, 1);
}

#[test]
fn resume_is_bit_exact_sp2_zero2_dp2() {
    // ZeRO-2: gradients per unit in flight, masters and moments sharded over 4 ranks.
    bit_exact("sp2z2dp2", 2, 1, 2, 2);
}

#[test]
fn resume_is_bit_exact_sp2_zero3() {
    // ZeRO-3: each shard file holds that rank's slices of the parameter units.
    bit_exact("sp2z3", 2, 1, 1, 3);
}

#[test]
fn resume_is_bit_exact_sp1_zero3_dp2() {
    bit_exact("sp1z3dp2", 1, 1, 2, 3);
}

#[test]
fn zero3_checkpoint_holds_parameter_slices() {
    // Two shards of ZeRO-3 together hold every parameter once (plus the units' padding),
    // each shard's params as long as its moments; resuming it as ZeRO-1 is refused.
    let c = Case::new("z3slices", 1, 2, 1, 3);
    c.run(1, "ck", None).unwrap();
    let sh = shards(&c.dir.join("ck"));
    assert_eq!(sh.len(), 2);
    let man: Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("ck/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(man["param_layout"], "sharded-units");
    let mut held = 0;
    for (f, ts) in &sh {
        let get = |k: &str| &ts.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get("params").size(), get("exp_avg").size(), "{f}");
        held += get("params").size()[0];
    }
    assert_eq!(held, man["padded"].as_i64().unwrap());
    assert!(held >= man["numel"].as_i64().unwrap());
    let p = c.dir.join("z1.json");
    std::fs::write(&p, plan_json(1, 2, 1, 1)).unwrap();
    let d = Case {
        dir: c.dir.clone(),
        plan: p,
        ranks: 2,
    };
    assert!(matches!(
        d.run(1, "ck2", Some("ck")),
        Err(RuntimeError::Plan(_))
    ));
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[test]
fn resume_refuses_another_layout_or_zero_stage_in_one_line() {
    let c = Case::new("mismatch", 1, 2, 1, 1);
    c.run(1, "ck", None).unwrap();
    for (name, other) in [
        ("layout", plan_json(2, 1, 1, 1)),
        ("zero", plan_json(1, 2, 1, 0)),
    ] {
        let p = c.dir.join(format!("{name}.json"));
        std::fs::write(&p, other).unwrap();
        let d = Case {
            dir: c.dir.clone(),
            plan: p,
            ranks: 2,
        };
        match d.run(1, "ck2", Some("ck")) {
            Err(RuntimeError::Plan(m)) => {
                assert!(m.contains("does not match"), "{name}: {m}");
                assert!(!m.contains('\n'), "{name}: more than one line: {m}");
            }
            other => panic!("{name}: resumed a mismatching checkpoint: {other:?}"),
        }
    }
    // Through the binary: exit code 2 and one line on stderr.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"))
        .args([
            "run",
            "--tiny",
            "--cpu",
            "--inprocess",
            "2",
            "--steps",
            "1",
            "--quiet",
        ])
        .arg(c.dir.join("zero.json"))
        .arg("--resume")
        .arg(c.dir.join("ck"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "stderr: {err}");
    assert!(err.contains("zero_stage"), "stderr: {err}");
    // A directory without a manifest is refused the same way.
    match c.run(1, "ck3", Some("nothing-here")) {
        Err(RuntimeError::Plan(m)) => assert!(m.contains("manifest.json"), "{m}"),
        other => panic!("resumed from nothing: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

fn det_extras(backend: Option<mmsp_runtime::kernel::Backend>) -> RunExtras {
    RunExtras {
        progress: false,
        deterministic: true,
        attn_backend: backend,
        ..RunExtras::default()
    }
}

fn det_opts(c: &Case) -> RunOptions {
    RunOptions {
        plan: c.plan.clone(),
        steps: 2,
        model: ModelSource::Tiny,
        inprocess: Some(c.ranks),
        cpu: true,
        lr: 1e-2,
        peak_flops: 1e12,
        out: None,
    }
}

#[test]
fn deterministic_runs_repeat_bit_for_bit() {
    let c = Case::new("det", 1, 2, 1, 0);
    let a = report_json(run_with(&det_opts(&c), &det_extras(None)));
    let b = report_json(run_with(&det_opts(&c), &det_extras(None)));
    assert_eq!(a["deterministic"], Value::Bool(true));
    assert_eq!(a["losses"], b["losses"]);
    assert_eq!(a["losses"].as_array().unwrap().len(), 2);
}

#[test]
fn deterministic_refuses_cudnn_attention() {
    let c = Case::new("det-cudnn", 1, 1, 1, 0);
    let e = run_with(
        &det_opts(&c),
        &det_extras(Some(mmsp_runtime::kernel::Backend::Cudnn)),
    )
    .unwrap_err();
    assert!(e.is_bad_input(), "{e}");
    assert!(e.to_string().contains("--attn-backend flash"), "{e}");
}

#[test]
fn a_save_interrupted_midway_leaves_the_previous_checkpoint_loadable() {
    // ZeRO-1 over DP 2: two shard files per save. A save of step 2 completes; a later save
    // dies after one rank wrote its shard of step 4 and another left a temporary file (the
    // manifest still names step 2's files): resuming from the directory continues from step 2
    // as a straight run does, and a completed save keeps only its own step's files.
    let c = Case::new("interrupted", 1, 1, 2, 1);
    let straight = c.run(4, "straight", None).unwrap();
    c.run(2, "ck", None).unwrap();
    let ck = c.dir.join("ck");
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("shard-"))
            .collect();
        v.sort();
        v
    };
    let before = names(&ck);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before.iter().all(|n| n.contains(".step2.")), "{before:?}");
    std::fs::write(
        ck.join("shard-00000-of-00002.step4.safetensors"),
        b"half a shard",
    )
    .unwrap();
    std::fs::write(ck.join("shard-00001-of-00002.step4.safetensors.tmp"), b"").unwrap();
    let resumed = c.run(2, "after", Some("ck")).unwrap();
    assert_eq!(losses(&resumed), losses(&straight)[2..].to_vec());
    assert_same_state(&c.dir.join("straight"), &c.dir.join("after"), "interrupted");
    // Saving into the directory again replaces the debris with complete step-4 files.
    c.run(2, "ck", Some("ck")).unwrap();
    let after = names(&ck);
    assert!(
        after
            .iter()
            .all(|n| n.contains(".step4.") && n.ends_with(".safetensors")),
        "{after:?}"
    );
    assert_eq!(after.len(), 2);
    let _ = std::fs::remove_dir_all(&c.dir);
}
