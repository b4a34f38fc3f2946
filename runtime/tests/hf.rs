//! The decoder against Hugging Face Transformers, in float32 on the CPU: tiny random Llama
//! (llama3 and linear rope scaling, tied and untied) and Qwen2 (q/k/v bias, rope_theta 1e6,
//! yarn, tied and untied) models made and saved by Transformers (`hf/reference.py`, run with
//! the project venv's python): logits equal Transformers' to 1e-5 on one rank, greedy
//! generations equal token for token over 2D layouts of 4 and 8 in-process ranks, the first
//! training loss equals the cross entropy of Transformers' logits over those layouts (ZeRO-0
//! reads the whole checkpoint, ZeRO-1/3 each rank's slices). A run on the shipped text with
//! `--save-hf` writes a model Transformers loads with the same logits, and its loss falls; a
//! resumed run repeats a straight one. Bad checkpoints, configs and data are one error each.
use mmsp_runtime::infer::run_local;
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::model::decoder::local_causal;
use mmsp_runtime::model::hf::HfCheckpoint;
use mmsp_runtime::model::{Decoder, Input};
use mmsp_runtime::plan::{Layout, Placement};
use mmsp_runtime::testing::plan_json;
use mmsp_runtime::testing::{quiet_run as quiet, report_json, report_losses as losses};
use mmsp_runtime::train::data::{Dataset, TextTokenizer};
use mmsp_runtime::train::run::{run_with, ModelSource, RunExtras, RunOptions};
use mmsp_runtime::train::session::{LrSchedule, SaveHf};
use mmsp_runtime::RuntimeError;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const CASES: &[&str] = &[
    "llama3",
    "qwen2_tied",
    "qwen2_yarn",
    "llama_linear",
    "llama_linear_v4",
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf/reference.py")
}

/// Runs the reference script (the venv's python is first on PATH under runtime/env.sh).
fn python(args: &[&str]) {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .expect("python3 runs (source runtime/env.sh: torch and transformers in .venv)");
    assert!(
        out.status.success(),
        "reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Transformers models and their reference outputs, made once per test binary.
fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hf-reference");
        let _ = std::fs::remove_dir_all(&d);
        python(&["make", d.to_str().unwrap()]);
        d
    })
}

struct Reference {
    ids: Vec<i64>,
    logits: Tensor,
    loss: f64,
    generated: Vec<i64>,
}

fn reference(case: &str) -> Reference {
    let t: Vec<(String, Tensor)> =
        Tensor::read_safetensors(models().join(case).join("reference.safetensors")).unwrap();
    let get = |n: &str| t.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    Reference {
        ids: Vec::<i64>::try_from(get("ids").reshape([-1])).unwrap(),
        logits: get("logits").to_kind(Kind::Double),
        loss: get("loss").double_value(&[0]),
        generated: Vec::<i64>::try_from(get("generated")).unwrap(),
    }
}

fn forward_logits(model: &Decoder, ids: &[i64]) -> Tensor {
    tch::no_grad(|| {
        let x = Tensor::from_slice(ids).unsqueeze(0);
        let pos = Tensor::arange(ids.len() as i64, (Kind::Int64, Device::Cpu));
        model
            .forward(Input::Ids(&x), &pos, &mut local_causal(Backend::CpuMath))
            .unwrap()
            .to_kind(Kind::Double)
    })
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn load(dir: &Path) -> Decoder {
    let ck = HfCheckpoint::open(dir).unwrap();
    Decoder::from_hf(&ck, Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

#[test]
fn logits_equal_transformers_one_rank() {
    for case in CASES {
        let r = reference(case);
        let m = load(&models().join(case));
        let e = max_abs(&forward_logits(&m, &r.ids), &r.logits);
        eprintln!("{case}: max |logit - Transformers| = {e:e}");
        assert!(e < 1e-5, "{case}: {e:e}");
    }
}

#[test]
fn greedy_generation_equals_transformers_on_2d_layouts() {
    let layouts = [
        Layout::sp(1, 1, Placement::UlyssesInner),
        Layout::sp(2, 2, Placement::UlyssesInner),
        Layout::sp(2, 4, Placement::UlyssesInner),
        Layout::sp(4, 2, Placement::RingInner),
    ];
    for case in CASES {
        let r = reference(case);
        let dir = models().join(case);
        let ck = HfCheckpoint::open(&dir).unwrap();
        let make = || Decoder::from_hf(&ck, Device::Cpu, Kind::Float, Kind::Float);
        for l in layouts {
            let gens = run_local(l, 64, &make, Backend::CpuMath, &r.ids[..16], 8, None).unwrap();
            for g in &gens {
                assert_eq!(g.tokens, r.generated, "{case} {l:?}");
                let e = max_abs(&g.logits[0], &r.logits.get(0).get(15));
                assert!(e < 1e-5, "{case} {l:?}: prefill logits {e:e}");
            }
        }
    }
}

/// Mean cross entropy of Transformers' logits for labels ids[1..] (the runtime's loss).
fn expected_loss(r: &Reference, next: i64) -> f64 {
    let mut labels = r.ids[1..].to_vec();
    labels.push(next);
    let lsm = r.logits.get(0).log_softmax(-1, Kind::Double);
    let l = Tensor::from_slice(&labels).unsqueeze(1);
    -lsm.gather(1, &l, false)
        .mean(Kind::Double)
        .double_value(&[])
}

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts(plan: &Path, model: ModelSource, steps: usize, ranks: usize, lr: f64) -> RunOptions {
    RunOptions {
        plan: plan.to_path_buf(),
        steps,
        model,
        inprocess: Some(ranks),
        cpu: true,
        lr,
        peak_flops: 1e12,
        out: None,
    }
}

#[test]
fn first_training_loss_equals_transformers_on_2d_layouts() {
    let d = tmp("hf-train-loss");
    for case in ["llama3", "qwen2_tied", "qwen2_yarn"] {
        let r = reference(case);
        let mut ids = r.ids.clone();
        ids.push(7);
        let data = d.join(format!("{case}.jsonl"));
        std::fs::write(&data, serde_json::to_string(&ids).unwrap()).unwrap();
        let want = expected_loss(&r, 7);
        for (u, ring, zero) in [(1, 1, 0), (2, 2, 3), (2, 4, 1), (4, 2, 0)] {
            let plan = d.join(format!("{case}-{u}x{ring}-z{zero}.json"));
            std::fs::write(&plan, plan_json(u, ring, 1, zero, 64)).unwrap();
            let model = ModelSource::HfDir(models().join(case));
            let ex = RunExtras {
                data: Some(data.clone()),
                ..quiet()
            };
            let v = report_json(run_with(&opts(&plan, model, 1, u * ring, 1e-3), &ex));
            // ZeRO ranks read only their slices: one model's bytes in all; ZeRO-0 ranks each
            // read it whole.
            let w = &v["weights"];
            let copies = if zero == 0 { u * ring } else { 1 } as u64;
            assert_eq!(
                w["bytes_read"].as_u64().unwrap(),
                copies * w["model_bytes"].as_u64().unwrap()
            );
            let got = losses(&v)[0];
            assert!(
                (got - want).abs() < 1e-5 * want,
                "{case} {u}x{ring} ZeRO-{zero}: {got} vs {want}"
            );
        }
        // Transformers' own loss (63 predictions) agrees with the same logits.
        let mut short = r
            .logits
            .get(0)
            .narrow(0, 0, 63)
            .log_softmax(-1, Kind::Double);
        short = short.gather(1, &Tensor::from_slice(&r.ids[1..]).unsqueeze(1), false);
        let hf = -short.mean(Kind::Double).double_value(&[]);
        assert!((hf - r.loss).abs() < 1e-5, "{case}: {hf} vs {}", r.loss);
    }
}

/// The llama3 model with a BPE tokenizer (trained by the Python tokenizers package on the
/// shipped text) beside it.
fn text_model() -> (PathBuf, PathBuf) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/text/public_domain.jsonl");
    let d = DIR.get_or_init(|| {
        let d = tmp("hf-text-model");
        for e in std::fs::read_dir(models().join("llama3")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        let plain = d.join("corpus.txt");
        let docs: Vec<String> = std::fs::read_to_string(&text)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        std::fs::write(&plain, docs.join("\n")).unwrap();
        python(&[
            "tokenizer",
            plain.to_str().unwrap(),
            d.join("tokenizer.json").to_str().unwrap(),
        ]);
        d
    });
    (d.clone(), text)
}

#[test]
fn text_is_tokenized_as_the_python_tokenizers_package_does() {
    let (dir, text) = text_model();
    let out = dir.join("python-ids.json");
    python(&[
        "encode",
        dir.join("tokenizer.json").to_str().unwrap(),
        text.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let want: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tok = TextTokenizer::from_model_dir(&dir, &cfg).unwrap();
    let mut got = Vec::new();
    for line in std::fs::read_to_string(&text).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        got.extend(tok.encode(v["text"].as_str().unwrap(), true).unwrap());
        got.push(tok.eos.unwrap());
    }
    assert_eq!(got, want);
    // And the dataset holds exactly that stream.
    let ds = Dataset::open(&text, 64, 512, 0, Some(&tok)).unwrap();
    assert_eq!(ds.num_tokens, want.len() as u64);
    let s = ds.sample(1, 0, 1).unwrap();
    let w: Vec<i64> = want[64..128].iter().map(|&t| t as i64).collect();
    assert_eq!(s.ids, w);
    assert_eq!(s.labels[63], want[128] as i64);
    // SFT: a prompt's tokens are never a label; the completion's and the EOS are.
    let sft = tmp("hf-sft").join("sft.jsonl");
    let line = r#"{"prompt": "We the People", "completion": " of the United States."}"#;
    std::fs::write(&sft, format!("{line}\n").repeat(12)).unwrap();
    let p = tok.encode("We the People", true).unwrap();
    let c = tok.encode(" of the United States.", false).unwrap();
    let ds = Dataset::open(&sft, 32, 512, 0, Some(&tok)).unwrap();
    let doc = p.len() + c.len() + 1;
    assert_eq!(ds.num_tokens, (12 * doc) as u64);
    let s = ds.sample(0, 0, 1).unwrap();
    for (i, &l) in s.labels.iter().enumerate() {
        let next = (i + 1) % doc;
        let in_prompt = next < p.len();
        assert_eq!(l == -100, in_prompt, "position {i}");
        if !in_prompt {
            assert_eq!(l, s.ids.get(i + 1).copied().unwrap_or(l));
        }
    }
}

#[test]
fn trained_checkpoint_loads_in_transformers_with_the_same_logits() {
    let (model_dir, text) = text_model();
    let d = tmp("hf-save");
    let plan = d.join("plan.json");
    std::fs::write(&plan, plan_json(1, 2, 1, 3, 64)).unwrap();
    let out = d.join("trained");
    let ex = RunExtras {
        data: Some(text),
        schedule: Some(LrSchedule {
            peak: 3e-3,
            warmup_steps: 4,
            decay_steps: 20,
            min_ratio: 0.1,
        }),
        max_grad_norm: 1.0,
        metrics: Some(d.join("metrics.jsonl")),
        save_hf: Some(SaveHf {
            dir: out.clone(),
            dtype: None,
            max_shard_bytes: 64 << 10,
        }),
        ..quiet()
    };
    let v = report_json(run_with(
        &opts(&plan, ModelSource::HfDir(model_dir), 20, 2, 3e-3),
        &ex,
    ));
    assert!(v.get("warnings").is_none(), "{}", v["warnings"]);
    let l = losses(&v);
    let (head, tail) = (
        l[..4].iter().sum::<f64>() / 4.0,
        l[16..].iter().sum::<f64>() / 4.0,
    );
    assert!(tail < head - 0.5, "loss did not fall: {l:?}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|x| serde_json::from_str(x).unwrap())
        .collect();
    assert_eq!(lines.len(), 20);
    assert!((lines[0]["lr"].as_f64().unwrap() - 3e-3 / 4.0).abs() < 1e-12);
    assert!(lines.iter().all(|m| m["grad_norm"].as_f64().unwrap() > 0.0));
    assert!(
        out.join("model.safetensors.index.json").is_file(),
        "sharded at 64 KiB"
    );
    assert!(out.join("tokenizer.json").is_file());
    // Transformers' logits of the trained model against the runtime's.
    let ids: Vec<i64> = (0..48).map(|i| (i * 37 + 11) % 512).collect();
    let ids_file = d.join("ids.json");
    std::fs::write(&ids_file, serde_json::to_string(&ids).unwrap()).unwrap();
    let hf_out = d.join("hf-logits.safetensors");
    python(&[
        "logits",
        out.to_str().unwrap(),
        ids_file.to_str().unwrap(),
        hf_out.to_str().unwrap(),
    ]);
    let hf = Tensor::read_safetensors(&hf_out)
        .unwrap()
        .remove(0)
        .1
        .to_kind(Kind::Double);
    let ours = forward_logits(&load(&out), &ids);
    let e = max_abs(&ours, &hf);
    eprintln!("trained model: max |logit - Transformers| = {e:e}");
    assert!(e < 1e-4, "{e:e}");
}

#[test]
fn resumed_run_with_data_repeats_a_straight_run() {
    let (model_dir, text) = text_model();
    let d = tmp("hf-resume");
    let plan = d.join("plan.json");
    std::fs::write(&plan, plan_json(2, 1, 1, 1, 64)).unwrap();
    let ex = |save: Option<PathBuf>, resume: Option<PathBuf>| RunExtras {
        data: Some(text.clone()),
        data_seed: 5,
        schedule: Some(LrSchedule {
            peak: 2e-3,
            warmup_steps: 2,
            decay_steps: 6,
            min_ratio: 0.1,
        }),
        max_grad_norm: 0.5,
        save,
        resume,
        ..quiet()
    };
    let m = || ModelSource::HfDir(model_dir.clone());
    let straight = losses(&report_json(run_with(
        &opts(&plan, m(), 6, 2, 2e-3),
        &ex(None, None),
    )));
    let ck = d.join("ck");
    let a = losses(&report_json(run_with(
        &opts(&plan, m(), 3, 2, 2e-3),
        &ex(Some(ck.clone()), None),
    )));
    let b = losses(&report_json(run_with(
        &opts(&plan, m(), 3, 2, 2e-3),
        &ex(None, Some(ck)),
    )));
    assert_eq!(&a[..], &straight[..3]);
    // The resumed report lists the earlier losses, then its own.
    assert_eq!(&b[b.len() - 3..], &straight[3..]);
}

fn err_line(e: RuntimeError) -> String {
    assert!(e.is_bad_input(), "{e}");
    let s = e.to_string();
    assert!(!s.contains('\n'), "{s}");
    s
}

#[test]
fn bad_checkpoints_configs_and_data_are_one_error_each() {
    let src = models().join("qwen2_yarn");
    let d = tmp("hf-bad");
    let copy = |name: &str| {
        let t = d.join(name);
        std::fs::create_dir_all(&t).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), t.join(e.file_name())).unwrap();
        }
        t
    };
    let edit = |dir: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    let open_err = |dir: &Path| err_line(HfCheckpoint::open(dir).unwrap_err());
    let layers = copy("layers");
    edit(&layers, &|v| v["num_hidden_layers"] = 3.into());
    assert!(
        open_err(&layers).contains("model.layers.2."),
        "{}",
        open_err(&layers)
    );
    let shape = copy("shape");
    edit(&shape, &|v| v["intermediate_size"] = 96.into());
    let e = open_err(&shape);
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[96, 64]"),
        "{e}"
    );
    let fewer = copy("fewer");
    edit(&fewer, &|v| v["num_hidden_layers"] = 1.into());
    assert!(
        open_err(&fewer).contains("model.layers.1."),
        "{}",
        open_err(&fewer)
    );
    let dynamic = copy("dynamic");
    edit(&dynamic, &|v| {
        v["rope_parameters"]["rope_type"] = "dynamic".into()
    });
    assert!(open_err(&dynamic).contains("dynamic"));
    let window = copy("window");
    edit(&window, &|v| v["use_sliding_window"] = true.into());
    assert!(open_err(&window).contains("sliding_window"));
    let act = copy("act");
    edit(&act, &|v| v["hidden_act"] = "gelu".into());
    assert!(open_err(&act).contains("hidden_act"));
    let trunc = copy("trunc");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(trunc.join("model.safetensors"))
        .unwrap();
    f.set_len(2000).unwrap();
    assert!(open_err(&trunc).contains("model.safetensors"));
    // Data: a bad line names the file and line; ids past the vocabulary; too little data.
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "[1, 2, 3]\n{\"txt\": 1}\n").unwrap();
    let e = err_line(Dataset::open(&bad, 2, 100, 0, None).err().unwrap());
    assert!(e.contains("bad.jsonl: line 2"), "{e}");
    let big = d.join("big.jsonl");
    std::fs::write(&big, "[1, 2, 300]\n").unwrap();
    assert!(err_line(Dataset::open(&big, 2, 100, 0, None).err().unwrap()).contains("id 300"));
    let short = d.join("short.jsonl");
    std::fs::write(&short, "[1, 2, 3]\n").unwrap();
    assert!(err_line(Dataset::open(&short, 64, 100, 0, None).err().unwrap()).contains("65"));
    let text = d.join("text.jsonl");
    std::fs::write(&text, "{\"text\": \"hello\"}\n").unwrap();
    assert!(
        err_line(Dataset::open(&text, 2, 100, 0, None).err().unwrap()).contains("tokenizer.json")
    );
}

#[test]
fn npy_and_megatron_token_files() {
    let d = tmp("hf-token-files");
    let ids: Vec<i64> = (0..200).map(|i| (i * 13) % 97).collect();
    // NumPy's own writer (format 1.0, little-endian int32).
    let npy = d.join("ids.npy");
    let st = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import numpy as np; np.save({:?}, np.array({ids:?}, dtype=np.int32))",
                npy.to_str().unwrap()
            ),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let ds = Dataset::open(&npy, 32, 100, 0, None).unwrap();
    assert_eq!(ds.num_tokens, 200);
    assert_eq!(ds.sample(2, 0, 1).unwrap().ids, ids[64..96].to_vec());
    // Megatron's indexed format, written by megatron-core: documents of 50, 70 and 80 tokens.
    let prefix = d.join("corpus");
    let docs = [&ids[..50], &ids[50..120], &ids[120..]];
    let docs_file = d.join("docs.json");
    std::fs::write(&docs_file, serde_json::to_string(&docs).unwrap()).unwrap();
    python(&[
        "megatron",
        docs_file.to_str().unwrap(),
        prefix.to_str().unwrap(),
    ]);
    let ds = Dataset::open(&prefix.with_extension("bin"), 32, 100, 0, None).unwrap();
    assert_eq!(ds.num_tokens, 200);
    for step in 0..6 {
        let s = ds.sample(step, 0, 1).unwrap();
        let a = (step % 6) * 32;
        assert_eq!(s.ids, ids[a..a + 32].to_vec(), "step {step}");
        assert_eq!(s.labels[31], ids[a + 32]);
    }
    // A seeded order is a permutation per epoch, the same for the same seed.
    let seeded = Dataset::open(&npy, 32, 100, 9, None).unwrap();
    let firsts: Vec<i64> = (0..6)
        .map(|s| seeded.sample(s, 0, 1).unwrap().ids[0])
        .collect();
    let mut sorted = firsts.clone();
    sorted.sort();
    let mut plain: Vec<i64> = (0..6).map(|s| ds.sample(s, 0, 1).unwrap().ids[0]).collect();
    plain.sort();
    assert_eq!(sorted, plain);
    assert_ne!(
        firsts,
        (0..6)
            .map(|s| ds.sample(s, 0, 1).unwrap().ids[0])
            .collect::<Vec<_>>()
    );
    // DP ranks take consecutive samples.
    assert_eq!(ds.sample(1, 1, 2).unwrap().ids, ids[96..128].to_vec());
}

#[test]
fn binary_refuses_bad_models_and_data_with_one_line_exit_2() {
    let d = tmp("hf-cli");
    let plan = d.join("plan.json");
    std::fs::write(&plan, plan_json(1, 1, 1, 0, 64)).unwrap();
    let good = models().join("qwen2_tied");
    let empty = d.join("empty-model");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(good.join("config.json"), empty.join("config.json")).unwrap();
    let bad_data = d.join("bad.jsonl");
    std::fs::write(&bad_data, "[1, 2]\nnot json\n").unwrap();
    let missing = d.join("none.npy");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--model", empty.to_str().unwrap()],
            "no model.safetensors",
        ),
        (
            &[
                "--model",
                good.to_str().unwrap(),
                "--data",
                bad_data.to_str().unwrap(),
            ],
            "bad.jsonl: line 2",
        ),
        (
            &[
                "--model",
                good.to_str().unwrap(),
                "--data",
                missing.to_str().unwrap(),
            ],
            "none.npy",
        ),
        (&["--tiny", "--save-hf-dtype", "f8"], "f8"),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"))
            .args([
                "run",
                plan.to_str().unwrap(),
                "--cpu",
                "--inprocess",
                "1",
                "--steps",
                "1",
            ])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        // clap adds its "For more information, try '--help'." under a usage error.
        let lines = err
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"));
        assert_eq!(lines.count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn infer_prompt_text_prints_the_greedy_completion() {
    let (model_dir, _) = text_model();
    let d = tmp("hf-infer");
    let plan = d.join("infer.json");
    // The plan's model shape is not the checkpoint's: --model decides, predictions are null.
    let text = serde_json::to_string(&mmsp_runtime::testing::inference_plan(2, 1, 64)).unwrap();
    std::fs::write(&plan, text).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"))
            .args([
                "infer",
                plan.to_str().unwrap(),
                "--model",
                model_dir.to_str().unwrap(),
            ])
            .args([
                "--prompt-text",
                "It was the best of times, it was the",
                "--max-new",
                "6",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&run(&["--json"])).unwrap();
    let tokens: Vec<i64> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 6);
    // The same tokens as the single-device reference on the same prompt ids.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    let tok = TextTokenizer::from_model_dir(&model_dir, &cfg).unwrap();
    let prompt: Vec<i64> = tok
        .encode("It was the best of times, it was the", true)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let m = load(&model_dir);
    let (want, _) =
        mmsp_runtime::infer::generate_reference(&m, Backend::CpuMath, &prompt, 6, Some(2)).unwrap();
    assert_eq!(tokens, want);
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    assert_eq!(v["text"].as_str().unwrap(), tok.decode(&ids).unwrap());
    assert_eq!(run(&[]).trim_end_matches('\n'), tok.decode(&ids).unwrap());
    // Sampling is seeded: the same seed repeats, and runs end without error.
    let a = run(&[
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--json",
    ]);
    let b = run(&[
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--json",
    ]);
    let tk = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["tokens"].clone();
    assert_eq!(tk(&a), tk(&b));
}

/// A tiny SigLIP vision model, frames and a manifest made by Transformers and Pillow.
fn vision_fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tmp("hf-vision");
        python(&["vision", d.to_str().unwrap()]);
        d
    })
}

#[test]
fn frames_are_the_pixels_siglips_image_processor_makes() {
    use mmsp_runtime::train::video::{load_frame, Normalize};
    let d = vision_fixture();
    let norm = Normalize::from_preprocessor(&d.join("model/preprocessor_config.json")).unwrap();
    assert_eq!(norm, Normalize::SIGLIP);
    let px = Tensor::read_safetensors(d.join("pixels.safetensors")).unwrap();
    for i in 0..7 {
        let want = &px.iter().find(|(n, _)| n == &format!("px{i}")).unwrap().1;
        let ext = if (4..7).contains(&i) && i % 2 == 1 {
            "jpg"
        } else {
            "png"
        };
        let got = load_frame(&d.join(format!("frames/f{i}.{ext}")), 32, &norm).unwrap();
        let e = max_abs(&got.to_kind(Kind::Double), &want.to_kind(Kind::Double));
        let mean = (&got - want).abs().mean(Kind::Float).double_value(&[]);
        eprintln!("frame {i} ({ext}): max |pixel - SigLIP processor| = {e:.2e}, mean {mean:.2e}");
        // At the encoder's size no resize happens: the same numbers. Downscaled frames differ
        // by the two bicubic resamplers (Pillow's and the image crate's Catmull-Rom).
        if i < 4 {
            assert!(e < 1e-6, "frame {i}: {e:e}");
        } else {
            assert!(
                mean < 0.02 && e < 0.2,
                "frame {i}: max {e:e}, mean {mean:e}"
            );
        }
    }
}

#[test]
fn video_manifest_trains_with_the_same_losses_over_sp_layouts() {
    let (model_dir, _) = text_model();
    let vis = vision_fixture();
    let d = tmp("hf-video-run");
    // Three packed slots: 3, 1 and 2 frames of 4 tokens, 12 text tokens each.
    let samples = [(3, 12), (1, 12), (2, 12)];
    let mut reference: Option<Vec<f64>> = None;
    for (u, r) in [(1, 1), (1, 2), (2, 1)] {
        let plan = d.join(format!("vlm_{u}x{r}.json"));
        let p = mmsp_runtime::testing::vision_plan(&samples, 4, 60, (u, r, 1), None);
        std::fs::write(&plan, p.to_string()).unwrap();
        let ex = RunExtras {
            data: Some(vis.join("manifest.jsonl")),
            ..quiet()
        };
        let vopts = mmsp_runtime::train::run::VisionOptions {
            config: Some(vis.join("model")),
        };
        let o = opts(&plan, ModelSource::HfDir(model_dir.clone()), 3, u * r, 1e-3);
        let v = report_json(mmsp_runtime::train::run::run_vlm(&o, &ex, &vopts));
        assert_eq!(v["data"]["video_samples"], 3);
        let l = losses(&v);
        assert!(l.iter().all(|x| x.is_finite() && *x > 0.0), "{l:?}");
        match &reference {
            None => reference = Some(l),
            Some(want) => {
                for (a, b) in l.iter().zip(want) {
                    assert!((a - b).abs() < 1e-4 * b, "{u}x{r}: {l:?} vs {want:?}");
                }
            }
        }
    }
    // A missing frame is one error naming the file and the sample's line.
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"frames\": [\"frames/f0.png\"], \"text\": \"a\"}\n{\"frames\": [\"frames/nope.png\"], \"text\": \"b\"}\n").unwrap();
    std::fs::copy(vis.join("frames/f0.png"), d.join("f0.png")).unwrap();
    std::fs::create_dir_all(d.join("frames")).unwrap();
    std::fs::copy(vis.join("frames/f0.png"), d.join("frames/f0.png")).unwrap();
    let plan = d.join("vlm_1x1.json");
    let ex = RunExtras {
        data: Some(bad),
        ..quiet()
    };
    let vopts = mmsp_runtime::train::run::VisionOptions {
        config: Some(vis.join("model")),
    };
    let o = opts(&plan, ModelSource::HfDir(model_dir), 1, 1, 1e-3);
    let e = err_line(mmsp_runtime::train::run::run_vlm(&o, &ex, &vopts).unwrap_err());
    assert!(e.contains("line 2") && e.contains("nope.png"), "{e}");
}

#[test]
fn a_context_past_max_position_embeddings_is_trained_and_warned_about() {
    let d = tmp("hf-long");
    let plan = d.join("plan.json");
    std::fs::write(&plan, plan_json(1, 2, 1, 0, 320)).unwrap();
    let v = report_json(run_with(
        &opts(
            &plan,
            ModelSource::HfDir(models().join("qwen2_tied")),
            1,
            2,
            1e-3,
        ),
        &quiet(),
    ));
    let w = v["warnings"][0].as_str().unwrap();
    assert!(
        w.contains("320") && w.contains("max_position_embeddings 256"),
        "{w}"
    );
    assert!(losses(&v)[0].is_finite());
}

#[test]
fn packed_documents_attend_within_themselves() {
    use mmsp_runtime::model::ModelConfig;
    use mmsp_runtime::train::data::pack_documents;
    // Documents of 5, 13, 30, 9 and 40 tokens (token-id JSONL, one per line), context 64 over
    // 2 x 2 ranks: each document a sample of its own, padded to a multiple of 8. The first
    // loss equals the mean cross entropy of each document run alone on one device (positions
    // from 0), with no label crossing documents; with cross-document attention it differs.
    let d = tmp("hf-docs");
    let docs: [usize; 5] = [5, 13, 30, 9, 40];
    let mut text = String::new();
    let mut k = 0i64;
    for n in docs {
        let ids: Vec<i64> = (0..n)
            .map(|_| {
                k += 1;
                (k * 37 + 11) % 125 + 3
            })
            .collect();
        text += &format!("{}\n", serde_json::to_string(&ids).unwrap());
    }
    let data = d.join("docs.jsonl");
    std::fs::write(&data, text).unwrap();
    let plan = d.join("plan.json");
    std::fs::write(&plan, plan_json(2, 2, 1, 0, 64)).unwrap();
    let run = |cross: bool| {
        let ex = RunExtras {
            data: Some(data.clone()),
            cross_document_attention: cross,
            ..quiet()
        };
        losses(&report_json(run_with(
            &opts(&plan, ModelSource::Tiny, 1, 4, 1e-3),
            &ex,
        )))[0]
    };
    let (masked, cross) = (run(false), run(true));
    // The reference: the packed samples, each alone.
    let ds = Dataset::open(&data, 64, 128, 0, None).unwrap();
    let smp = ds.sample(0, 0, 1).unwrap();
    assert_eq!(smp.doc_lens, vec![5, 13, 30, 9, 7]);
    let p = pack_documents(&smp, 8, 0).unwrap();
    assert_eq!(p.sample_lens, vec![8, 16, 32, 8]);
    let m = Decoder::random(
        ModelConfig::tiny(),
        Device::Cpu,
        Kind::Float,
        Kind::Float,
        1,
    )
    .unwrap();
    let (mut sum, mut count) = (0.0, 0usize);
    let mut at = 0;
    for &len in &p.sample_lens {
        let lg = forward_logits(&m, &p.ids[at..at + len])
            .get(0)
            .log_softmax(-1, Kind::Double);
        for i in 0..len {
            let l = p.labels[at + i];
            if l >= 0 {
                sum -= lg.double_value(&[i as i64, l]);
                count += 1;
            }
        }
        at += len;
    }
    let want = sum / count as f64;
    assert!((masked - want).abs() < 1e-5 * want, "{masked} vs {want}");
    assert!(
        (cross - want).abs() > 1e-3 * want,
        "cross-document attention gave the same loss"
    );
}
