//! Snapshot tests of `mmsp export`: each engine's output for plans with a chosen layout (built
//! through the library, so that they do not move when the search ranks plans differently),
//! and the one-line errors (exit 2) where an engine cannot express a plan or the input is bad.

use std::path::{Path, PathBuf};
use std::process::Command;

use mmsp_planner::cost::{evaluate, Candidate, Layout, Placement, Recompute, Workload};
use mmsp_planner::export::fit::{self, EngineRecompute};
use mmsp_planner::search::Scored;
use mmsp_planner::spec::cluster::ClusterSpec;
use mmsp_planner::topology::Topology;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmsp-export-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct P {
    u: u32,
    r: u32,
    dp: u32,
    tp: u32,
    placement: Placement,
    zero: u8,
    recompute: Recompute,
    global_batch: u64,
}

/// Writes the plan of one candidate (llama3-8b, 64K tokens, dgx-h100) to `dir/plan.json`.
fn write_plan(dir: &Path, p: P) {
    // The 2-layer llama3-8b shape the runtime is measured with: a whole llama3-8b fits below
    // ZeRO-3 on no GPU count in mmsp-runtime (fp32 masters and gradients stay whole there),
    // and Megatron's and TE's exports need ZeRO-1 at most.
    let model = mmsp_planner::spec::model::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../runtime/tests/data/llama3-8b-2layer.json"
    ))
    .unwrap();
    let cluster = ClusterSpec::load("dgx-h100").unwrap();
    let layout = Layout {
        ulysses: p.u,
        ring: p.r,
        dp: p.dp,
        tp: p.tp,
        placement: p.placement,
    };
    let topo = Topology::build(&cluster, layout.world());
    let candidate = Candidate {
        layout,
        zero_stage: p.zero,
        recompute: p.recompute,
        micro_batch: 1,
    };
    let context = 65536;
    let w = Workload {
        model: &model,
        context,
        global_batch: p.global_batch,
        vision: None,
    };
    let estimate = evaluate(&topo, &w, &candidate).expect("test candidate fits");
    let plan = mmsp_planner::plan::build(
        &topo,
        "dgx-h100",
        &model,
        context,
        p.global_batch,
        &Scored {
            candidate,
            estimate,
        },
    )
    .unwrap();
    std::fs::write(
        dir.join("plan.json"),
        serde_json::to_string_pretty(&plan).unwrap(),
    )
    .unwrap();
}

fn mmsp(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mmsp"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run mmsp");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = mmsp(dir, args);
    assert_eq!(code, 0, "{args:?}: {err}");
    assert!(err.is_empty(), "{err}");
    format!("$ mmsp {}\n{out}", args.join(" "))
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = mmsp(dir, args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert!(out.is_empty(), "{args:?} printed to stdout: {out}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    format!("$ mmsp {}\n{err}", args.join(" "))
}

const UI: Placement = Placement::UlyssesInner;
const RI: Placement = Placement::RingInner;

/// The flags of an exported bash array (`NAME=(` ... `)`), one word per element.
fn array_flags(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("  --"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

/// Every flag in `out` is in the engine's checked-in list (`planner/src/export/flags/`), which
/// names the upstream file and line that define it.
fn assert_listed(out: &str, list: &str) {
    let path = format!("{}/src/export/flags/{list}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let listed: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let flags = array_flags(out);
    assert!(!flags.is_empty(), "no flags in {out}");
    for f in flags {
        assert!(listed.contains(&f.as_str()), "{f} is not in {list}");
    }
}

#[test]
fn megatron_hierarchical_cp() {
    let d = dir("meg-2d");
    write_plan(
        &d,
        P {
            u: 4,
            r: 8,
            dp: 1,
            tp: 1,
            placement: UI,
            zero: 1,
            recompute: Recompute::None,
            global_batch: 2,
        },
    );
    let out = ok(&d, &["export", "--to", "megatron", "plan.json"]);
    assert!(out.contains("--cp-comm-type a2a+p2p"));
    assert!(out.contains("--hierarchical-context-parallel-sizes 4 8"));
    // The model Megatron builds is the planned one: RoPE, SwiGLU, RMSNorm, no biases.
    for f in [
        "--position-embedding-type rope",
        "--swiglu",
        "--normalization RMSNorm",
        "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
        "--num-query-groups 8",
        "--use-distributed-optimizer",
    ] {
        assert!(out.contains(f), "{f} missing: {out}");
    }
    // Context parallelism without FSDP: Megatron asserts the variable is 1.
    assert!(out.contains("\nexport CUDA_DEVICE_MAX_CONNECTIONS=1\n"));
    // This model comes from a config.json: its rope base travels in the plan.
    assert!(out.contains("\n  --rotary-base 500000\n"), "{out}");
    assert!(!out.contains("add --rotary-base"));
    assert_listed(&out, "megatron.txt");
    insta::assert_snapshot!(out);
}

#[test]
fn megatron_tp_ring_recompute_is_recosted() {
    let d = dir("meg-tp");
    write_plan(
        &d,
        P {
            u: 1,
            r: 8,
            dp: 1,
            tp: 2,
            placement: UI,
            zero: 1,
            recompute: Recompute::Full,
            global_batch: 1,
        },
    );
    // The plan recomputes as mmsp-runtime does, each layer outside attention; Megatron's
    // nearest is its selective recompute of the norms and the MLP, exported with both step
    // times instead of refused.
    let out = ok(&d, &["export", "--to", "megatron", "plan.json"]);
    assert!(out.contains("--sequence-parallel") && out.contains("--cp-comm-type p2p"));
    assert!(out.contains("--recompute-granularity selective"), "{out}");
    assert!(out.contains("--recompute-modules layernorm mlp"), "{out}");
    assert_eq!(out.matches(" s/step").count(), 2, "{out}");
    assert_listed(&out, "megatron.txt");
    insta::assert_snapshot!(out);
}

#[test]
fn megatron_zero3_is_megatron_fsdp() {
    let d = dir("meg-z3");
    write_plan(
        &d,
        P {
            u: 4,
            r: 4,
            dp: 1,
            tp: 1,
            placement: UI,
            zero: 3,
            recompute: Recompute::None,
            global_batch: 1,
        },
    );
    let out = ok(&d, &["export", "--to", "megatron", "plan.json"]);
    assert!(out.contains("--use-megatron-fsdp"), "{out}");
    assert!(out.contains("--data-parallel-sharding-strategy optim_grads_params"));
    assert!(out.contains("--ckpt-format fsdp_dtensor"));
    // Megatron-FSDP asserts the variable is not 1.
    assert!(
        out.contains("\nunset CUDA_DEVICE_MAX_CONNECTIONS\n"),
        "{out}"
    );
    assert!(!out.contains("--use-distributed-optimizer"));
    assert_listed(&out, "megatron.txt");
}

#[test]
fn deepspeed_ring_inner() {
    let d = dir("ds");
    write_plan(
        &d,
        P {
            u: 2,
            r: 4,
            dp: 2,
            tp: 1,
            placement: RI,
            zero: 3,
            recompute: Recompute::Full,
            global_batch: 4,
        },
    );
    let out = ok(&d, &["export", "--to", "deepspeed", "plan.json"]);
    let json: serde_json::Value = serde_json::from_str(out.split_once('\n').unwrap().1).unwrap();
    // A DeepSpeed config at the top level; the batch holds with the world divided by SP.
    assert_eq!(json["train_batch_size"], 4);
    assert_eq!(json["train_micro_batch_size_per_gpu"], 1);
    assert_eq!(json["gradient_accumulation_steps"], 2);
    assert_eq!(json["sequence_parallel_size"], 8);
    assert_eq!(json["zero_optimization"]["stage"], 3);
    assert!(json["activation_checkpointing"].is_object());
    let setup = json["mmsp"]["yunchang"]["setup"].to_string();
    assert!(setup.contains("set_seq_parallel_pg(2, 4, rank, 16, use_ulysses_low=False)"));
    assert!(setup.contains("zigzag_extract_local"), "{setup}");
    // Whole-layer checkpointing in place of the runtime's recompute, with both step times.
    let notes = json["mmsp"]["notes"].to_string();
    assert!(notes.contains("recomputes whole layers"), "{notes}");
    assert_eq!(notes.matches(" s/step").count(), 2, "{notes}");
    insta::assert_snapshot!(out);
}

#[test]
fn vila_torchrun_slurm() {
    let d = dir("vila");
    write_plan(
        &d,
        P {
            u: 4,
            r: 4,
            dp: 1,
            tp: 1,
            placement: UI,
            zero: 3,
            // Recompute is a choice under ZeRO-3: this plan takes the runtime's.
            recompute: Recompute::OutsideAttention,
            global_batch: 2,
        },
    );
    let vila = ok(&d, &["export", "--to", "vila", "plan.json"]);
    assert!(vila.contains("--gradient_checkpointing True"));
    assert!(vila.contains("--seq_parallel_ring_type zigzag_ring_varlen"));
    assert!(vila.contains("llava/train/train_hybrid.py"));
    assert_eq!(vila.matches(" s/step").count(), 2, "{vila}");
    assert_listed(&vila, "vila.txt");
    insta::assert_snapshot!("vila", vila);
    insta::assert_snapshot!(
        "torchrun",
        ok(&d, &["export", "--to", "torchrun", "plan.json"])
    );
    insta::assert_snapshot!("slurm", ok(&d, &["export", "--to", "slurm", "plan.json"]));
    // --out writes an executable script.
    ok(
        &d,
        &[
            "export",
            "--to",
            "slurm",
            "plan.json",
            "--out",
            "job.sbatch",
        ],
    );
    let text = std::fs::read_to_string(d.join("job.sbatch")).unwrap();
    assert!(text.contains("#SBATCH --nodes=2") && text.contains("mmsp-runtime plan.json"));
}

/// Plans of older planners could say `selective`, or `full` without `recompute_scope` (then
/// costed as Korthikanti et al.'s whole-layer recompute): whole-layer exports as Megatron's
/// own, selective as its norms-and-MLP modules with both step times.
#[test]
fn older_plans_export_their_textbook_recompute() {
    let d = dir("sel");
    write_plan(
        &d,
        P {
            u: 1,
            r: 8,
            dp: 1,
            tp: 2,
            placement: UI,
            zero: 1,
            recompute: Recompute::Full,
            global_batch: 1,
        },
    );
    let path = d.join("plan.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["recompute_scope"], "outside_attention");
    v.as_object_mut().unwrap().remove("recompute_scope");
    std::fs::write(&path, v.to_string()).unwrap();
    let out = ok(&d, &["export", "--to", "megatron", "plan.json"]);
    assert!(out.contains("--recompute-granularity full"), "{out}");
    assert!(!out.contains("s/step"), "{out}");
    v["recompute"] = "selective".into();
    std::fs::write(&path, v.to_string()).unwrap();
    let out = ok(&d, &["export", "--to", "megatron", "plan.json"]);
    assert!(out.contains("--recompute-granularity selective"));
    assert!(out.contains("s/step"), "{out}");
}

/// Layouts an engine cannot run are re-planned within its constraints, and the export says
/// why, with the original plan and both step times; the re-plan's layout satisfies the
/// constraint.
#[test]
fn engines_replan_what_they_cannot_run() {
    let cases: Vec<(&str, P, &str, &str)> = vec![
        (
            "megatron",
            P {
                u: 2,
                r: 4,
                dp: 1,
                tp: 1,
                placement: RI,
                zero: 1,
                recompute: Recompute::None,
                global_batch: 1,
            },
            "ring_inner",
            "(ring_inner)",
        ),
        (
            "megatron",
            P {
                u: 16,
                r: 1,
                dp: 1,
                tp: 1,
                placement: UI,
                zero: 1,
                recompute: Recompute::None,
                global_batch: 1,
            },
            "does not replicate kv heads",
            "ulysses 16",
        ),
        (
            "deepspeed",
            P {
                u: 1,
                r: 8,
                dp: 1,
                tp: 2,
                placement: UI,
                zero: 1,
                recompute: Recompute::None,
                global_batch: 1,
            },
            "tensor parallel size 2",
            "tp 2",
        ),
        (
            "vila",
            P {
                u: 2,
                r: 4,
                dp: 1,
                tp: 1,
                placement: RI,
                zero: 3,
                recompute: Recompute::None,
                global_batch: 1,
            },
            "ring_inner",
            "(ring_inner)",
        ),
    ];
    // (engine, plan, the reason named, what the re-plan's layout no longer has)
    for (engine, p, why, bad) in cases {
        let d = dir(&format!("replan-{engine}-{}", why.len()));
        write_plan(&d, p);
        let out = ok(&d, &["export", "--to", engine, "plan.json"]);
        assert!(out.contains(&format!("re-planned for {engine}")), "{out}");
        assert!(out.contains(why), "{engine}: {out}");
        assert!(out.contains("the original plan"), "{out}");
        assert!(out.contains("this re-plan"), "{out}");
        let planned = out
            .lines()
            .find(|l| l.starts_with("# plan: ") || l.contains("\"plan\": "))
            .unwrap();
        assert!(!planned.contains(bad), "{engine}: {bad} in {planned}");
    }
}

#[test]
fn errors_are_one_line_exit_2() {
    let mut all = Vec::new();
    let d = dir("bad-inputs");
    std::fs::write(d.join("notaplan.json"), r#"{"schema": "something-else"}"#).unwrap();
    std::fs::write(d.join("garbage.json"), "not json").unwrap();
    for args in [
        vec!["export", "--to", "trt-llm", "plan.json"],
        vec!["export", "--to", "megatron", "notaplan.json"],
        vec!["export", "--to", "megatron", "garbage.json"],
        vec!["export", "--to", "megatron", "missing.json"],
        vec!["export", "plan.json"],
    ] {
        all.push(fails(&d, &args));
    }
    insta::assert_snapshot!(all.join("\n"));
}

/// A plan's model name, topology and path holding newlines and shell syntax end up in the
/// generated scripts as comment text or quoted words, never as commands: each script parses
/// (`bash -n`) and, with its `exec`/`srun` lines taken out, runs without creating the file
/// the injected command would.
#[test]
fn hostile_names_never_become_commands() {
    let d = dir("hostile");
    write_plan(
        &d,
        P {
            u: 4,
            r: 4,
            dp: 1,
            tp: 1,
            placement: UI,
            zero: 1,
            recompute: Recompute::None,
            global_batch: 2,
        },
    );
    let marker = d.join("pwned");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("plan.json")).unwrap()).unwrap();
    // Relative: the scripts run in `d`.
    v["model"]["name"] = "x\ntouch pwned\n#".into();
    v["topology"] = "t\r\ntouch pwned".into();
    let hostile = "p\ntouch pwned;.json".to_string();
    std::fs::write(d.join(&hostile), v.to_string()).unwrap();
    for engine in ["torchrun", "slurm", "megatron", "vila"] {
        let (code, out, err) = mmsp(&d, &["export", "--to", engine, &hostile]);
        assert_eq!(code, 0, "{engine}: {err}");
        for line in out.lines() {
            assert!(!line.trim_start().starts_with("touch"), "{engine}: {line}");
        }
        let script = d.join(format!("{engine}.sh"));
        let body: String = out
            .lines()
            .filter(|l| !l.starts_with("exec ") && !l.starts_with("srun ") && !l.starts_with("  "))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&script, body).unwrap();
        let st = Command::new("bash")
            .arg("-n")
            .arg(&script)
            .status()
            .unwrap();
        assert!(st.success(), "{engine}: the script does not parse");
        let _ = Command::new("bash")
            .arg(&script)
            .current_dir(&d)
            .env("SLURM_NTASKS", "16")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("NODE_RANK", "0")
            .output()
            .unwrap();
        assert!(!marker.exists(), "{engine}: the injected command ran");
    }
}

/// A saved plan with one field made garbage is refused by `simulate` and `export` in one line
/// naming that field (exit 2), as the runtime refuses it, instead of yielding NaN or a script.
#[test]
fn garbage_plans_are_refused_by_field() {
    let d = dir("garbage");
    write_plan(
        &d,
        P {
            u: 2,
            r: 4,
            dp: 2,
            tp: 1,
            placement: UI,
            zero: 1,
            recompute: Recompute::None,
            global_batch: 2,
        },
    );
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("plan.json")).unwrap()).unwrap();
    type Edit<'a> = &'a dyn Fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 7] = [
        (
            "head_dim",
            &|v| v["model"]["head_dim"] = 0.into(),
            "head_dim",
        ),
        (
            "layers",
            &|v| v["model"]["num_layers"] = 0.into(),
            "num_layers",
        ),
        ("batch", &|v| v["global_batch"] = 3.into(), "global_batch"),
        ("zero", &|v| v["zero_stage"] = 7.into(), "zero_stage"),
        (
            "context",
            &|v| v["context_tokens"] = 1000.into(),
            "ranges_per_rank",
        ),
        (
            "range",
            &|v| v["tokens"]["ranges_per_rank"][0][0] = serde_json::json!([5, 5]),
            "ranges_per_rank[0]",
        ),
        (
            "step",
            &|v| v["predicted"]["step_time_s"] = (-1.0).into(),
            "predicted.step_time_s",
        ),
    ];
    for (name, edit, want) in cases {
        let mut v = good.clone();
        edit(&mut v);
        let f = format!("{name}.json");
        std::fs::write(d.join(&f), v.to_string()).unwrap();
        for cmd in [
            vec!["simulate", f.as_str()],
            vec!["export", "--to", "torchrun", f.as_str()],
        ] {
            let err = fails(&d, &cmd);
            assert!(err.contains(want), "{name} {cmd:?}: {err}");
        }
    }
}

/// The exports' re-costing starts from the plan's own candidate: for a text plan and a video
/// plan (whose vision stage comes from the plan) it reproduces the plan's predicted step time.
#[test]
fn recosting_a_plan_reproduces_its_prediction() {
    let d = dir("recost");
    write_plan(
        &d,
        P {
            u: 2,
            r: 4,
            dp: 2,
            tp: 1,
            placement: UI,
            zero: 2,
            recompute: Recompute::OutsideAttention,
            global_batch: 4,
        },
    );
    let video = ok(
        &d,
        &[
            "plan",
            "--gpus",
            "16",
            "--frames",
            "64",
            "--text-tokens",
            "256",
            "--format",
            "json",
        ],
    );
    std::fs::write(d.join("video.json"), video.split_once('\n').unwrap().1).unwrap();
    for f in ["plan.json", "video.json"] {
        let plan = mmsp_planner::plan::load_training(d.join(f).to_str().unwrap()).unwrap();
        let c = fit::cost_plan(&plan).unwrap();
        let (got, want) = (
            c.estimate.step_time_s,
            plan.predicted.as_ref().unwrap().step_time_s,
        );
        assert!((got - want).abs() <= 1e-9 * want, "{f}: {got} vs {want}");
        // Whole layers run attention again: slower than the runtime's recompute, which runs
        // the QKV and output projections again that Megatron's norms-and-MLP modules keep.
        let whole = fit::engine_recompute_step(&c, EngineRecompute::WholeLayer).unwrap();
        if plan.recompute_policy() == Recompute::OutsideAttention {
            assert!(whole > got, "{f}: {whole} vs {got}");
            let norms = fit::engine_recompute_step(&c, EngineRecompute::NormsAndMlp).unwrap();
            assert!(norms < got, "{f}: {norms} vs {got}");
        }
    }
}

/// Writes `d/plan.json`: `mmsp plan` of a Hugging Face config fixture on 64 GPUs at 128K.
fn plan_hf_fixture(d: &Path, model: &str) {
    let cfg = format!(
        "{}/../tests/data/hf/{model}/config.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let args = ["plan", "--gpus", "64", "--context", "128K", "--model", &cfg];
    let (code, plan, err) = mmsp(d, &[&args[..], &["--format", "json"]].concat());
    assert_eq!(code, 0, "{model}: {err}");
    std::fs::write(d.join("plan.json"), plan).unwrap();
}

/// A model no export maps (experts, sliding windows) is refused by name for every engine,
/// not exported as a dense model with full attention.
#[test]
fn models_the_exports_do_not_map_are_refused_by_name() {
    let d = dir("unmapped");
    for (model, what) in [
        ("mixtral-8x7b-v0.1", "mixture-of-experts"),
        ("mistral-7b-v0.1", "sliding-window"),
    ] {
        plan_hf_fixture(&d, model);
        for engine in ["megatron", "deepspeed", "vila", "torchrun", "slurm"] {
            let e = fails(&d, &["export", "--to", engine, "plan.json"]);
            assert!(e.contains(what), "{model} to {engine}: {e}");
        }
    }
}

/// A model read from a config.json carries its RoPE base into Megatron's `--rotary-base`.
#[test]
fn megatron_takes_the_rope_base_of_a_config_json() {
    let d = dir("rope-base");
    plan_hf_fixture(&d, "qwen2-7b");
    let out = ok(&d, &["export", "--to", "megatron", "plan.json"]);
    assert!(out.contains("\n  --rotary-base 1000000\n"), "{out}");
    assert!(!out.contains("add --rotary-base"), "{out}");
}
