//! Inference with the sequence sharded, on the CPU with thread ranks: greedy decoding of a
//! tiny random model (2 layers, hidden 64, 4 heads, 2 kv heads, vocab 128, fixed seed) over
//! 2, 4 and 8 ranks in several (ulysses, ring) layouts gives exactly the tokens of
//! single-device decoding, with logits within tolerance, with the default preallocated KV
//! cache and with short key chunks that new tokens cross (f64); end-of-sequence stops every
//! rank; bad plans and prompts fail before any collective, and the binary exits 2 with one
//! line.
use mmsp_runtime::infer::{generate_reference, run_local, run_local_chunked, InferPlan};
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::model::{Decoder, ModelConfig};
use mmsp_runtime::plan::{Layout, Placement};
use tch::{Device, Kind};

const SEED: i64 = 1234;

fn model(kind: Kind) -> mmsp_runtime::Result<Decoder> {
    Decoder::random(ModelConfig::tiny(), Device::Cpu, kind, kind, SEED)
}

fn prompt(len: usize) -> Vec<i64> {
    // A fixed pseudo-random prompt (LCG), vocab 128.
    let mut x: u64 = 99;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 128) as i64
        })
        .collect()
}

fn check(kind: Kind, tol: f64, layouts: &[(usize, usize, Placement)]) {
    check_chunked(kind, tol, layouts, None)
}

fn check_chunked(
    kind: Kind,
    tol: f64,
    layouts: &[(usize, usize, Placement)],
    kv_chunk: Option<usize>,
) {
    let p = prompt(37);
    let max_new = 12;
    let reference = model(kind).unwrap();
    let (ref_toks, ref_logits) =
        generate_reference(&reference, Backend::CpuMath, &p, max_new, None).unwrap();
    assert_eq!(ref_toks.len(), max_new);
    // The model is not degenerate: it does not emit one token only.
    assert!(ref_toks.iter().any(|&t| t != ref_toks[0]), "{ref_toks:?}");
    for &(u, r, pl) in layouts {
        let layout = Layout::sp(u, r, pl);
        let gens = run_local_chunked(
            layout,
            4096,
            &|| model(kind),
            Backend::CpuMath,
            &p,
            max_new,
            None,
            kv_chunk,
        )
        .unwrap();
        assert_eq!(gens.len(), u * r);
        let total_kv: usize = gens.iter().map(|g| g.kv_tokens).sum();
        // Every token but the last generated one is cached exactly once.
        assert_eq!(total_kv, p.len() + max_new - 1, "{u}x{r}");
        let (lo, hi) = (
            gens.iter().map(|g| g.kv_tokens).min().unwrap(),
            gens.iter().map(|g| g.kv_tokens).max().unwrap(),
        );
        // Zigzag shards differ by up to 2 tokens, round-robin appends by up to 1.
        assert!(hi - lo <= 3, "{u}x{r}: unbalanced KV shards {lo}..{hi}");
        for (rank, g) in gens.iter().enumerate() {
            assert_eq!(g.tokens, ref_toks, "{u}x{r} {pl:?} rank {rank}");
            for (i, (a, b)) in g.logits.iter().zip(&ref_logits).enumerate() {
                let err = (a - b).abs().max().double_value(&[]);
                assert!(err < tol, "{u}x{r} rank {rank} step {i}: {err}");
            }
        }
    }
}

#[test]
fn sharded_decoding_matches_single_device_f64() {
    use Placement::*;
    check(
        Kind::Double,
        1e-10,
        &[
            (1, 2, UlyssesInner),
            (2, 1, UlyssesInner),
            (1, 4, UlyssesInner),
            (2, 2, RingInner),
            (4, 1, UlyssesInner),
            (2, 4, UlyssesInner),
            (4, 2, RingInner),
            (1, 8, UlyssesInner),
        ],
    );
}

#[test]
fn sharded_decoding_matches_single_device_f32() {
    use Placement::*;
    check(
        Kind::Float,
        1e-4,
        &[
            (2, 1, UlyssesInner),
            (2, 2, UlyssesInner),
            (4, 2, UlyssesInner),
        ],
    );
}

/// The preallocated cache cut into short key chunks (1, 3 and 4 keys: every decoded token
/// crosses or starts a chunk, and the last chunk is partly masked) gives the tokens and the
/// logits of single-device decoding, as the default (one chunk here) does.
#[test]
fn chunked_kv_cache_matches_single_device_f64() {
    use Placement::*;
    for c in [1, 3, 4] {
        check_chunked(
            Kind::Double,
            1e-10,
            &[
                (1, 1, UlyssesInner),
                (1, 2, UlyssesInner),
                (2, 2, RingInner),
                (1, 8, UlyssesInner),
            ],
            Some(c),
        );
    }
}

#[test]
fn eos_stops_every_rank() {
    let p = prompt(37);
    let reference = model(Kind::Double).unwrap();
    let (ref_toks, _) = generate_reference(&reference, Backend::CpuMath, &p, 8, None).unwrap();
    // The token produced at step 3 (not earlier) as end-of-sequence.
    let eos = ref_toks[3];
    let stop = ref_toks.iter().position(|&t| t == eos).unwrap();
    let gens = run_local(
        Layout::sp(2, 2, Placement::UlyssesInner),
        4096,
        &|| model(Kind::Double),
        Backend::CpuMath,
        &p,
        8,
        Some(eos),
    )
    .unwrap();
    for g in &gens {
        assert!(g.stopped_on_eos);
        assert_eq!(g.tokens, ref_toks[..=stop].to_vec());
    }
}

#[test]
fn generation_stops_at_the_context() {
    let p = prompt(20);
    let gens = run_local(
        Layout::sp(2, 1, Placement::UlyssesInner),
        24,
        &|| model(Kind::Double),
        Backend::CpuMath,
        &p,
        100,
        None,
    )
    .unwrap();
    // 20 prompt tokens, the KV cache holds at most 24: 4 fed back plus the last one produced.
    assert_eq!(gens[0].tokens.len(), 5);
    assert_eq!(gens.iter().map(|g| g.kv_tokens).sum::<usize>(), 24);
}

/// A 2 x 2 plan of the tiny model for `mode` ("training" or "inference").
fn plan_json(mode: &str, context: usize) -> String {
    let p = match mode {
        "inference" => mmsp_runtime::testing::inference_plan(2, 2, context),
        _ => mmsp_runtime::testing::plan(2, 2, 1, 0, context),
    };
    serde_json::to_string(&p).unwrap()
}

#[test]
fn bad_plans_and_prompts() {
    let e = InferPlan::from_json(&plan_json("training", 64))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a plan for training"), "{e}");
    let plan = InferPlan::from_json(&plan_json("inference", 64)).unwrap();
    let e = plan.check_prompt(0).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = plan.check_prompt(65).unwrap_err().to_string();
    assert!(e.contains("more than the plan's context of 64"), "{e}");
    let e = plan.check_prompt(7).unwrap_err().to_string();
    assert!(e.contains("fewer than the 8 zigzag shards"), "{e}");
    plan.check_prompt(64).unwrap();
    // The runner refuses before starting any rank.
    let e = run_local(
        plan.plan.layout,
        64,
        &|| model(Kind::Double),
        Backend::CpuMath,
        &prompt(65),
        4,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("more than the plan's context"), "{e}");
}

#[test]
fn binary_errors_are_one_line_exit_2() {
    let dir = std::env::temp_dir().join(format!("mmsp-infer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let train = dir.join("train.json");
    let inf = dir.join("inf.json");
    std::fs::write(&train, plan_json("training", 64)).unwrap();
    std::fs::write(&inf, plan_json("inference", 64)).unwrap();
    let long: Vec<String> = prompt(65).iter().map(|t| t.to_string()).collect();
    let long = long.join(",");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![train.to_str().unwrap(), "--prompt", "1,2,3,4,5,6,7,8"],
            "is a plan for training",
        ),
        (vec![inf.to_str().unwrap(), "--prompt", ""], "empty"),
        (
            vec![inf.to_str().unwrap(), "--prompt", &long],
            "more than the plan's context",
        ),
    ];
    let p30: Vec<String> = prompt(30).iter().map(|t| t.to_string()).collect();
    let p30 = p30.join(",");
    let mut cases = cases;
    // --nccl without the torchrun environment.
    cases.push((
        vec![inf.to_str().unwrap(), "--nccl", "--prompt", &p30],
        "environment variable",
    ));
    for (args, want) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"))
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .arg("infer")
            .args(&args)
            .args(["--tiny"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{err}");
    }
    // And a good run prints one JSON line with the tokens.
    let p: Vec<String> = prompt(30).iter().map(|t| t.to_string()).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"))
        .args([
            "infer",
            inf.to_str().unwrap(),
            "--tiny",
            "--max-new",
            "4",
            "--prompt",
        ])
        .arg(p.join(","))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sampler_is_greedy_at_zero_and_follows_softmax_with_top_p() {
    use mmsp_runtime::infer::Sampler;
    use tch::Tensor;
    let logits = Tensor::from_slice(&[0.0f64, 2.0, 1.0, -1.0]);
    assert_eq!(Sampler::greedy().pick(&logits), 1);
    // top_p tiny: only the most likely token survives.
    let mut s = Sampler::new(1.0, 1e-6, 7).unwrap();
    assert!((0..50).all(|_| s.pick(&logits) == 1));
    // Full nucleus: frequencies follow softmax(logits / T) at T = 1.
    let mut s = Sampler::new(1.0, 1.0, 11).unwrap();
    let mut n = [0usize; 4];
    let draws = 20000;
    for _ in 0..draws {
        n[s.pick(&logits) as usize] += 1;
    }
    let p = Vec::<f64>::try_from(logits.softmax(0, tch::Kind::Double)).unwrap();
    for i in 0..4 {
        let f = n[i] as f64 / draws as f64;
        assert!((f - p[i]).abs() < 0.015, "token {i}: {f} vs {}", p[i]);
    }
    // top_p 0.8: the two most likely (0.66 + 0.24 >= 0.8) and nothing else.
    let mut s = Sampler::new(1.0, 0.8, 5).unwrap();
    assert!((0..500).all(|_| matches!(s.pick(&logits), 1 | 2)));
    assert!(Sampler::new(-1.0, 0.9, 0).is_err() && Sampler::new(1.0, 0.0, 0).is_err());
}

/// `calibrate-launch --into F` checks F before it looks for a GPU: a missing file or one that
/// is not a calibration is one line and exit 2, and the file is left as it was.
#[test]
fn calibrate_launch_refuses_bad_files_and_keeps_them() {
    let dir = std::env::temp_dir().join(format!("mmsp-cal-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_cal = dir.join("not_cal.json");
    std::fs::write(&not_cal, "{\"hello\": 1}\n").unwrap();
    let missing = dir.join("missing.json");
    for (path, says) in [(&missing, "--into"), (&not_cal, "expected a calibration")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"))
            .args(["calibrate-launch", "--into", path.to_str().unwrap()])
            .output()
            .expect("running mmsp-runtime");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "stderr: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        assert!(err.contains(says), "{err}");
    }
    assert_eq!(
        std::fs::read_to_string(&not_cal).unwrap(),
        "{\"hello\": 1}\n"
    );
    assert!(!missing.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
