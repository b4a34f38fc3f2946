//! Fuzz test of the `mmsp` binary (issue 17): seeded mutations of the real inputs it reads —
//! the shipped topologies/*.toml, calibration/*.json, examples/samples.jsonl and
//! examples/campaign.toml, plans written by `mmsp plan --format json`, and command-line flag
//! sets — each run as a child process with a time bound. A case fails on a panic or abort
//! (an exit code other than 0 or 2, a signal, "panicked" on stderr), a run over the bound
//! (killed), or a successful answer with a non-finite or negative figure (a "NaN" or "inf"
//! word in a table; a non-finite, null or negative number in a plan's or simulation's JSON
//! predictions).
//!
//! Reproducible: the seed is fixed (`MMSP_FUZZ_SEED` changes it). `MMSP_FUZZ_CASES` sets the
//! cases per input class (default 40: 240 runs, about 30 s in the debug build on 2 busy cores);
//! `MMSP_FUZZ_VERBOSE=1` prints every case; `MMSP_FUZZ_REPORT=file.json` writes the counts and
//! worst time per class (planner/bench/results/fuzz.json);
//! `MMSP_FUZZ_BOUND_S` the time bound (default 60 s in debug builds (where `compare --gpus 65536`, six engines searched, takes 15-20 s on two loaded cores), 5 s in release). A long
//! local session: `MMSP_FUZZ_CASES=1000 cargo test --release -p mmsp-planner --test fuzz --
//! --nocapture` prints per class the count, refusals, answers and worst time.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mmsp");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// splitmix64 (Steele, Lea & Flood 2014): a small seeded generator, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Hostile replacements for a number.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "-0.0",
    "1",
    "3",
    "7",
    "0.5",
    "1e308",
    "1e-308",
    "4294967295",
    "18446744073709551615",
    "99999999999999999999999",
    "65537",
    "nan",
    "inf",
    "-inf",
    "NaN",
    "\"x\"",
    "true",
    "[]",
    "",
];

/// Hostile replacements for a string.
const STRINGS: &[&str] = &[
    "",
    "x",
    "a\nb",
    "$(touch /tmp/mmsp-fuzz)",
    "'; rm -rf / #",
    "../../../../etc/passwd",
    "\u{0}",
    "\u{202e}evil",
    "llama3-70b",
    "gb200-nvl72",
];

/// What one run gave.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    secs: f64,
    timed_out: bool,
}

fn run(args: &[String], dir: &Path, bound: Duration) -> Outcome {
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let t0 = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("start mmsp");
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for mmsp") {
            break s;
        }
        if t0.elapsed() > bound {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("reap mmsp");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Outcome {
        code: status.code(),
        stdout: read(&out),
        stderr: read(&err),
        secs: t0.elapsed().as_secs_f64(),
        timed_out,
    }
}

/// Why an outcome is a failure, if it is one; `input` is the mutated text (a word of it, a
/// name such as "nan frames", may be echoed).
fn fault(o: &Outcome, input: &str) -> Option<String> {
    if o.timed_out {
        return Some(format!("ran over the bound ({:.1} s)", o.secs));
    }
    match o.code {
        Some(0) | Some(2) => {}
        Some(c) => return Some(format!("exit code {c}")),
        None => return Some("killed by a signal (abort?)".into()),
    }
    if o.stderr.contains("panicked") {
        return Some("panicked".into());
    }
    if o.code == Some(0) {
        return bad_figure(&o.stdout, input);
    }
    None
}

/// A non-finite or negative figure in a successful answer.
fn bad_figure(stdout: &str, input: &str) -> Option<String> {
    if let Ok(v) = serde_json::from_str::<Value>(stdout) {
        for key in ["predicted", "simulated", "step_time_s", "rows"] {
            if let Some(p) = v.get(key) {
                if let Some(bad) = bad_number(p, key) {
                    return Some(bad);
                }
            }
        }
        return None;
    }
    let word = stdout
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .find(|w| matches!(*w, "NaN" | "nan" | "inf" | "-inf" | "Infinity") && !input.contains(*w));
    word.map(|w| format!("'{w}' in the answer"))
}

fn bad_number(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            (!x.is_finite() || x < 0.0).then(|| format!("{at} = {x}"))
        }
        Value::Object(m) => m
            .iter()
            .find_map(|(k, x)| bad_number(x, &format!("{at}.{k}"))),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| bad_number(x, &format!("{at}[{i}]"))),
        _ => None,
    }
}

/// Replaces one number of a text (TOML, JSONL) with a hostile one, or one quoted string with
/// a hostile string, or deletes, duplicates or truncates, or adds an unknown field.
fn mutate_text(rng: &mut Rng, text: &str, extra: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    match rng.below(6) {
        0 | 1 => {
            // A number: a maximal run of digits, '.', 'e', '-' starting at a digit.
            let b = text.as_bytes();
            let starts: Vec<usize> = (0..b.len())
                .filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_alphanumeric()))
                .collect();
            if starts.is_empty() {
                return text.to_string();
            }
            let s = *rng.pick(&starts);
            let mut e = s;
            while e < b.len() && (b[e].is_ascii_digit() || b[e] == b'.' || b[e] == b'e') {
                e += 1;
            }
            format!("{}{}{}", &text[..s], rng.pick(NUMBERS), &text[e..])
        }
        2 => {
            let quotes: Vec<usize> = text.match_indices('"').map(|(i, _)| i).collect();
            if quotes.len() < 2 {
                return text.to_string();
            }
            let k = rng.below(quotes.len() / 2) * 2;
            let (a, b) = (quotes[k], quotes[k + 1]);
            let s = serde_json::to_string(rng.pick(STRINGS)).unwrap();
            format!("{}{}{}", &text[..a], s, &text[b + 1..])
        }
        3 => {
            let k = rng.below(lines.len());
            let mut v = lines.clone();
            if rng.chance(50) {
                v.remove(k);
            } else {
                v.insert(k, lines[k]);
            }
            v.join("\n")
        }
        4 => {
            let mut cut = rng.below(text.len());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text[..cut].to_string()
        }
        _ => {
            let k = rng.below(lines.len() + 1);
            let mut v = lines.clone();
            v.insert(k, extra);
            v.join("\n")
        }
    }
}

/// `v` mutated 1 to `rounds` times ([`mutate_json`]), written to `path` as pretty JSON, one
/// time in ten cut short at a random byte.
fn write_mutated(rng: &mut Rng, v: &mut Value, rounds: usize, path: &std::path::Path) {
    for _ in 0..1 + rng.below(rounds) {
        mutate_json(rng, v);
    }
    let mut text = serde_json::to_string_pretty(v).unwrap();
    if rng.chance(10) {
        text.truncate(rng.below(text.len()));
    }
    std::fs::write(path, text).unwrap();
}

/// Mutates one leaf of a JSON document (a hostile number or string, a wrong type, null), or
/// deletes a key, or adds one.
fn mutate_json(rng: &mut Rng, v: &mut Value) {
    let mut paths = Vec::new();
    collect(v, &mut Vec::new(), &mut paths);
    if paths.is_empty() {
        return;
    }
    let path = rng.pick(&paths).clone();
    let leaf = {
        let mut p = &*v;
        for k in &path {
            p = match k {
                Key::Field(f) => &p[f.as_str()],
                Key::Index(i) => &p[*i],
            };
        }
        p.as_f64()
    };
    let (last, parent) = path.split_last().unwrap();
    let mut p = &mut *v;
    for k in parent {
        p = match k {
            Key::Field(f) => &mut p[f.as_str()],
            Key::Index(i) => &mut p[*i],
        };
    }
    let numeric = |rng: &mut Rng, x: f64| -> Value {
        let y = match rng.below(8) {
            0 => 0.0,
            1 => -x,
            2 => x * 2.0,
            3 => (x / 3.0).floor(),
            4 => x + 1.0,
            5 => 1e308,
            6 => 4294967296.0,
            _ => 1.5,
        };
        serde_json::json!(y)
    };
    let replacement: Value = match (leaf, rng.below(8)) {
        (Some(x), 0..=4) => numeric(&mut *rng, x),
        (_, 0) => Value::Null,
        (_, 1) => Value::String(rng.pick(STRINGS).to_string()),
        (_, 2) => serde_json::json!([]),
        (_, 3) => serde_json::json!({"extra": 1}),
        _ => {
            let n: &&str = rng.pick(NUMBERS);
            serde_json::from_str(n).unwrap_or_else(|_| serde_json::json!(-1))
        }
    };
    match (last, p) {
        (Key::Field(f), Value::Object(m)) => {
            if rng.chance(20) {
                m.remove(f);
            } else if rng.chance(10) {
                m.insert(format!("{f}_extra"), replacement);
            } else {
                m.insert(f.clone(), replacement);
            }
        }
        (Key::Index(i), Value::Array(a)) => {
            if rng.chance(20) {
                a.remove(*i);
            } else {
                a[*i] = replacement;
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum Key {
    Field(String),
    Index(usize),
}

fn collect(v: &Value, at: &mut Vec<Key>, out: &mut Vec<Vec<Key>>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push(Key::Field(k.clone()));
                out.push(at.clone());
                collect(x, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(64) {
                at.push(Key::Index(i));
                out.push(at.clone());
                collect(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A flag set: a base request with flags added, values made hostile, flags dropped.
fn flag_case(rng: &mut Rng) -> Vec<String> {
    let gpus = ["8", "16", "64", "72", "144", "256", "512", "1024", "4096"];
    let bad_gpus = ["0", "-8", "7", "65537", "4294967296", "abc", "", "65536"];
    let ctx = [
        "16", "128K", "1M", "2M", "16M", "1.5M", "2", "100000", "3M", "64M",
    ];
    let bad_ctx = [
        "0",
        "-1",
        "1T",
        "nan",
        "1e400",
        "99999999999999999999",
        "K",
        "1.0000001M",
    ];
    let g_pool: &[&str] = if rng.chance(20) { &bad_gpus } else { &gpus };
    let g = *rng.pick(g_pool);
    let c_pool: &[&str] = if rng.chance(20) { &bad_ctx } else { &ctx };
    let c = *rng.pick(c_pool);
    let mut args = s(&[
        *rng.pick(&["plan", "compare", "plan", "plan"]),
        "--gpus",
        g,
        "--context",
        c,
    ]);
    let optional: [(&str, &[&str]); 14] = [
        (
            "--global-batch",
            &["1", "3", "1000000", "0", "-2", "18446744073709551615"],
        ),
        (
            "--model",
            &[
                "llama3-70b",
                "llama2-7b",
                "qwen2-7b",
                "nope",
                "/dev/null",
                "../../etc/passwd",
            ],
        ),
        (
            "--topology",
            &[
                "gb200-nvl72",
                "pcie-l40s",
                "dgx-a100",
                "hgx-h200",
                "missing.toml",
                "",
            ],
        ),
        ("--recompute", &["none", "full", "selective", "x"]),
        (
            "--layout",
            &["2x4", "1x8", "8x1", "0x0", "3x3", "x", "4294967295x2"],
        ),
        ("--zero", &["0", "1", "2", "3", "4", "-1", "255"]),
        (
            "--strategy",
            &["ring", "ulysses", "megatron-cp-tp", "te-a2a-p2p", "bogus"],
        ),
        ("--format", &["json", "table", "yaml"]),
        ("--mode", &["inference", "training", "x"]),
        ("--frames", &["8", "0", "4294967295", "-1"]),
        ("--text-tokens", &["512", "0", "18446744073709551615"]),
        ("--decode-tokens", &["1", "0", "99999999999"]),
        ("--calibration", &["h200-sxm", "h100-sxm", "nope.json"]),
        ("--max-context", &[]),
    ];
    for _ in 0..rng.below(4) {
        let (flag, values) = rng.pick(&optional);
        args.push(flag.to_string());
        if !values.is_empty() {
            args.push(rng.pick(values).to_string());
        }
    }
    match rng.below(12) {
        0 if args.len() > 3 => {
            let k = 1 + rng.below(args.len() - 1);
            args.remove(k);
        }
        1 => args.push("--unknown-flag".into()),
        2 => {
            let k = 1 + rng.below(args.len() - 1);
            args[k] = rng.pick(NUMBERS).to_string();
        }
        _ => {}
    }
    args
}

/// The base plans mutated by the plan class: written by `mmsp plan --format json`.
fn base_plans(dir: &Path) -> Vec<String> {
    let requests: [&[&str]; 3] = [
        &["--gpus", "8", "--context", "128K"],
        &[
            "--gpus",
            "16",
            "--context",
            "256K",
            "--zero",
            "3",
            "--recompute",
            "full",
        ],
        &["--gpus", "8", "--frames", "64", "--text-tokens", "512"],
    ];
    requests
        .iter()
        .map(|r| {
            let mut args = s(&["plan", "--format", "json"]);
            args.extend(s(r));
            let o = run(&args, dir, Duration::from_secs(120));
            assert_eq!(o.code, Some(0), "base plan {r:?}: {}", o.stderr);
            o.stdout
        })
        .collect()
}

struct Tally {
    cases: usize,
    refusals: usize,
    answers: usize,
    worst_s: f64,
    worst_args: String,
}

#[test]
fn mutated_inputs_never_panic_hang_or_answer_garbage() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("MMSP_FUZZ_CASES").unwrap_or(40) as usize;
    let seed = env("MMSP_FUZZ_SEED").unwrap_or(17);
    let bound = Duration::from_secs(
        env("MMSP_FUZZ_BOUND_S").unwrap_or(if cfg!(debug_assertions) { 60 } else { 5 }),
    );
    let verbose = std::env::var_os("MMSP_FUZZ_VERBOSE").is_some();
    let dir = std::env::temp_dir().join(format!("mmsp-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    let topologies: Vec<String> = [
        "dgx-h100",
        "gb200-nvl72",
        "pcie-l40s",
        "dgx-a100",
        "hgx-h200",
    ]
    .iter()
    .map(|t| read(&format!("topologies/{t}.toml")))
    .collect();
    let calibrations: Vec<Value> = ["h100-sxm", "h200-sxm"]
        .iter()
        .map(|c| serde_json::from_str(&read(&format!("calibration/{c}.json"))).unwrap())
        .collect();
    let samples = read("examples/samples.jsonl");
    let campaign = read("examples/campaign.toml");
    let plans = base_plans(&dir);
    let mut rng = Rng(seed);
    let mut tally: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    for i in 0..cases {
        for class in [
            "flags",
            "topology",
            "calibration",
            "plan",
            "manifest",
            "campaign",
        ] {
            let args: Vec<String> = match class {
                "flags" => flag_case(&mut rng),
                "topology" => {
                    let t = rng.pick(&topologies).clone();
                    let path = dir.join(format!("t{i}.toml"));
                    std::fs::write(&path, mutate_text(&mut rng, &t, "extra_field = 1")).unwrap();
                    let gpus = rng.pick(&["8", "16", "64", "72", "144"]).to_string();
                    s(&[
                        "plan",
                        "--gpus",
                        &gpus,
                        "--context",
                        "256K",
                        "--topology",
                        path.to_str().unwrap(),
                    ])
                }
                "calibration" => {
                    let mut c = rng.pick(&calibrations).clone();
                    let path = dir.join(format!("c{i}.json"));
                    write_mutated(&mut rng, &mut c, 3, &path);
                    s(&[
                        "plan",
                        "--gpus",
                        "8",
                        "--context",
                        "128K",
                        "--calibration",
                        path.to_str().unwrap(),
                    ])
                }
                "plan" => {
                    let mut p: Value = serde_json::from_str(rng.pick(&plans).as_str()).unwrap();
                    let path = dir.join(format!("p{i}.json"));
                    write_mutated(&mut rng, &mut p, 2, &path);
                    let path = path.to_str().unwrap().to_string();
                    match rng.below(3) {
                        0 => s(&["simulate", &path, "--format", "json"]),
                        1 => s(&["simulate", &path]),
                        _ => {
                            let to =
                                rng.pick(&["megatron", "deepspeed", "vila", "torchrun", "slurm"]);
                            s(&["export", "--to", to, &path])
                        }
                    }
                }
                "manifest" => {
                    let path = dir.join(format!("m{i}.jsonl"));
                    let mut text = samples.clone();
                    for _ in 0..1 + rng.below(2) {
                        text = mutate_text(&mut rng, &text, "{\"frames\": 1, \"extra\": true}");
                    }
                    std::fs::write(&path, text).unwrap();
                    s(&["plan", "--gpus", "128", "--samples", path.to_str().unwrap()])
                }
                _ => {
                    let path = dir.join(format!("r{i}.toml"));
                    let text = mutate_text(&mut rng, &campaign, "extra_field = \"x\"");
                    std::fs::write(&path, text).unwrap();
                    let out = dir.join(format!("r{i}"));
                    s(&[
                        "campaign",
                        path.to_str().unwrap(),
                        "--out",
                        out.to_str().unwrap(),
                    ])
                }
            };
            let o = run(&args, &dir, bound);
            let input = args
                .iter()
                .filter(|a| a.starts_with(dir.to_str().unwrap()))
                .filter_map(|a| std::fs::read_to_string(a).ok())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
                .join("\n");
            if verbose {
                let first = o.stderr.lines().next().unwrap_or("");
                eprintln!(
                    "{class} {i} exit {:?} {:.2} s {args:?}: {first}",
                    o.code, o.secs
                );
            }
            let t = tally.entry(class).or_insert(Tally {
                cases: 0,
                refusals: 0,
                answers: 0,
                worst_s: 0.0,
                worst_args: String::new(),
            });
            t.cases += 1;
            match o.code {
                Some(0) => t.answers += 1,
                Some(2) => t.refusals += 1,
                _ => {}
            }
            if o.secs > t.worst_s {
                t.worst_s = o.secs;
                t.worst_args = format!("{args:?}");
            }
            if let Some(why) = fault(&o, &input) {
                let keep = dir.join(format!("failed-{class}-{i}"));
                let _ = std::fs::create_dir_all(&keep);
                for a in args.iter().filter(|a| a.starts_with(dir.to_str().unwrap())) {
                    let _ = std::fs::copy(a, keep.join(Path::new(a).file_name().unwrap()));
                }
                let tail: String = o.stderr.lines().take(3).collect::<Vec<_>>().join(" | ");
                failures.push(format!("{class} case {i}: {why}: mmsp {args:?}: {tail}"));
            }
        }
    }
    eprintln!(
        "fuzz seed {seed}, {cases} cases per class, bound {} s:",
        bound.as_secs()
    );
    for (class, t) in &tally {
        eprintln!(
            "  {class:12} {:5} cases: {:5} refused (exit 2), {:5} answered (exit 0); worst {:.2} s ({})",
            t.cases, t.refusals, t.answers, t.worst_s, t.worst_args
        );
    }
    if let Some(path) = std::env::var_os("MMSP_FUZZ_REPORT") {
        write_report(Path::new(&path), seed, cases, bound, &tally, failures.len());
    }
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(
        failures.is_empty(),
        "{} failing cases (inputs kept under {}):\n{}",
        failures.len(),
        dir.display(),
        failures.join("\n")
    );
}

/// The campaign's counts per input class as JSON (`MMSP_FUZZ_REPORT`), for the bench results.
fn write_report(
    path: &Path,
    seed: u64,
    cases: usize,
    bound: Duration,
    tally: &BTreeMap<&str, Tally>,
    failures: usize,
) {
    let classes: serde_json::Map<String, Value> = tally
        .iter()
        .map(|(class, t)| {
            let v = serde_json::json!({
                "cases": t.cases,
                "refused_exit_2": t.refusals,
                "answered_exit_0": t.answers,
                "worst_s": (t.worst_s * 1000.0).round() / 1000.0,
                "worst_args": t.worst_args,
            });
            (class.to_string(), v)
        })
        .collect();
    let report = serde_json::json!({
        "seed": seed,
        "cases_per_class": cases,
        "bound_s": bound.as_secs(),
        "release_build": !cfg!(debug_assertions),
        "failures": failures,
        "classes": classes,
    });
    std::fs::write(path, serde_json::to_string_pretty(&report).unwrap() + "\n")
        .expect("write the fuzz report");
}

/// The inputs the fuzz test found faults with (issue 17), each refused with exit code 2 in
/// well under the bound: a context of "1e-308K" (a campaign divided by zero), 2^64 - 1 frames
/// in a sample and 2^32 - 1 frames per campaign sample (capacity overflow, a 34 GB
/// allocation), a frame 2^32 - 1 pixels tall (24 s), 1e-308 GB/s links ("inf" step times),
/// 2^32 - 1 NICs per node (an abort on memory), a frame of 1 x 448 pixels (no patch: 32 s),
/// a sample of 2^32 - 1 text tokens (told "131072 GPUs would fit", past what --gpus takes) and
/// a 1e308 GB/s calibration point ("NaN" step times).
#[test]
fn inputs_the_fuzz_test_found_are_refused() {
    let dir = std::env::temp_dir().join(format!("mmsp-fuzz-found-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let campaign = read("examples/campaign.toml");
    let samples = read("examples/samples.jsonl");
    let topo = read("topologies/gb200-nvl72.toml");
    let calibration = read("calibration/h100-sxm.json");
    let cases: Vec<Vec<String>> = vec![
        {
            let r = write("a.toml", campaign.replacen("\"256K\"", "\"1e-308K\"", 1));
            s(&["campaign", &r, "--out", dir.join("a").to_str().unwrap()])
        },
        {
            let r = write("b.toml", campaign.replacen("= 1024", "= 4294967295", 1));
            s(&["campaign", &r, "--out", dir.join("b").to_str().unwrap()])
        },
        {
            let m = samples.replacen("\"frames\": 32", "\"frames\": 18446744073709551615", 1);
            s(&["plan", "--gpus", "128", "--samples", &write("c.jsonl", m)])
        },
        {
            let m = samples.replacen("[448, 448]", "[4294967295, 448]", 1);
            s(&["plan", "--gpus", "128", "--samples", &write("d.jsonl", m)])
        },
        {
            let m = samples.replacen("[448, 448]", "[1, 448]", 1);
            s(&["plan", "--gpus", "128", "--samples", &write("h.jsonl", m)])
        },
        {
            let m = samples.replacen("\"text_tokens\": 817", "\"text_tokens\": 4294967295", 1);
            s(&["plan", "--gpus", "128", "--samples", &write("i.jsonl", m)])
        },
        {
            let t = topo.replacen("gbps_per_gpu = 900.0", "gbps_per_gpu = 1e-308", 1);
            s(&[
                "plan",
                "--gpus",
                "72",
                "--context",
                "256K",
                "--topology",
                &write("e.toml", t),
            ])
        },
        {
            let t = topo.replacen("nics_per_node = 4", "nics_per_node = 4294967295", 1);
            s(&[
                "plan",
                "--gpus",
                "144",
                "--context",
                "256K",
                "--topology",
                &write("g.toml", t),
            ])
        },
        {
            let mut c: Value = serde_json::from_str(&calibration).unwrap();
            for p in c["memory_bandwidth"].as_array_mut().unwrap() {
                p["gb_per_s"] = serde_json::json!(1e308);
            }
            let f = write("f.json", c.to_string());
            s(&[
                "plan",
                "--gpus",
                "8",
                "--context",
                "128K",
                "--calibration",
                &f,
            ])
        },
    ];
    for (k, args) in cases.iter().enumerate() {
        let o = run(args, &dir, Duration::from_secs(20));
        assert_eq!(fault(&o, ""), None, "case {k}: {args:?}: {}", o.stderr);
        // No suggestion past the 65536 GPUs a request may name (the 2^32 - 1 text tokens).
        assert!(!o.stderr.contains("131072"), "case {k}: {}", o.stderr);
        // The calibration's absurd points (the last case) are skipped like failed
        // measurements (a plan); every other input is refused.
        let expect = if k + 1 == cases.len() { 0 } else { 2 };
        assert_eq!(o.code, Some(expect), "case {k}: {args:?}: {}", o.stderr);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
