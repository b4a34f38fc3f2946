//! Where a step's device time goes: the device activities that libtorch's Kineto profiler
//! recorded around one step (`run --kernel-trace FILE`, written by `ffi::kernel_profile_stop`
//! as `start_ns \t duration_ns \t device \t name` lines), summarised into time per kernel
//! class, the device's busy time (the union of the activity intervals, so overlapping
//! streams count once) and its idle time inside the step.
//!
//! The classes follow the planner's step-time terms (`planner/src/cost`): GEMMs, attention,
//! communication (NCCL), copies/memsets, the optimizer's multi-tensor kernels, and the rest
//! (memory-bound elementwise and reduction kernels). A kernel is classed by its name.
use crate::error::{Result, RuntimeError};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// One device activity: start and duration in nanoseconds, and its name.
#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    pub start_ns: u64,
    pub dur_ns: u64,
    pub name: String,
}

/// The step-time class of a kernel name.
pub fn class_of(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    if n.contains("nccl") {
        "communication"
    } else if n.contains("sdpa")
        || n.contains("fmha")
        || n.contains("flash")
        || n.contains("attention")
        || n.contains("attn")
    {
        "attention"
    } else if n.starts_with("memcpy") || n.starts_with("memset") {
        "copy_memset"
    } else if n.contains("gemm")
        || n.contains("nvjet")
        || n.contains("xmma")
        || n.contains("cutlass")
        || n.contains("cublas")
        || n.contains("matmul")
    {
        "gemm"
    } else if n.contains("adam") || n.contains("multi_tensor") {
        "optimizer"
    } else {
        "elementwise_other"
    }
}

/// Parses the shim's tab-separated activity list.
pub fn parse(text: &str) -> Result<Vec<Activity>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut f = line.splitn(4, '\t');
        let bad = || RuntimeError::Torch(format!("kernel profile line {}: {line:?}", i + 1));
        let start_ns = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let dur_ns = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let _device = f.next().ok_or_else(bad)?;
        let name = f.next().ok_or_else(bad)?.to_string();
        out.push(Activity {
            start_ns,
            dur_ns,
            name,
        });
    }
    Ok(out)
}

/// Summary of the activities of one step: span (first start to last end), busy (union of
/// intervals), idle = span - busy, seconds per class (summed durations, so overlapping
/// streams count twice there) and the `top` kernels by total time.
pub fn summarize(acts: &[Activity], top: usize) -> Value {
    if acts.is_empty() {
        return json!({"activities": 0});
    }
    let mut iv: Vec<(u64, u64)> = acts
        .iter()
        .map(|a| (a.start_ns, a.start_ns + a.dur_ns))
        .collect();
    iv.sort_unstable();
    let (first, last) = (iv[0].0, iv.iter().map(|x| x.1).max().unwrap_or(iv[0].1));
    let mut busy = 0u64;
    let (mut cs, mut ce) = iv[0];
    for &(s, e) in &iv[1..] {
        if s > ce {
            busy += ce - cs;
            (cs, ce) = (s, e);
        } else {
            ce = ce.max(e);
        }
    }
    busy += ce - cs;
    let mut by_class: HashMap<&'static str, (f64, usize)> = HashMap::new();
    let mut by_name: HashMap<&str, (f64, usize)> = HashMap::new();
    for a in acts {
        let s = a.dur_ns as f64 * 1e-9;
        let c = by_class.entry(class_of(&a.name)).or_default();
        c.0 += s;
        c.1 += 1;
        let k = by_name.entry(a.name.as_str()).or_default();
        k.0 += s;
        k.1 += 1;
    }
    let mut classes: Vec<_> = by_class.into_iter().collect();
    classes.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let mut names: Vec<_> = by_name.into_iter().collect();
    names.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let span = (last - first) as f64 * 1e-9;
    let busy = busy as f64 * 1e-9;
    json!({
        "activities": acts.len(),
        "span_s": span,
        "busy_s": busy,
        "idle_s": span - busy,
        "class_s": classes.iter().map(|(c, (s, n))| (c.to_string(), json!({"s": s, "count": n})))
            .collect::<serde_json::Map<String, Value>>(),
        "top_kernels": names.iter().take(top).map(|(n, (s, k))| {
            let short: String = n.chars().take(120).collect();
            json!({"name": short, "s": s, "count": k, "class": class_of(n)})
        }).collect::<Vec<_>>(),
    })
}

/// Reads the shim's activity file and summarises it.
pub fn summarize_file(path: &Path, top: usize) -> Result<Value> {
    let text = std::fs::read_to_string(path)?;
    Ok(summarize(&parse(&text)?, top))
}

/// `trace` with `ext` appended: the activity list and summary written beside a trace.
pub fn beside(trace: &Path, ext: &str) -> std::path::PathBuf {
    let mut s = trace.as_os_str().to_owned();
    s.push(ext);
    std::path::PathBuf::from(s)
}

/// Stops the profiler started by [`crate::ffi::kernel_profile_start`]: the Chrome trace to
/// `trace`, the activity list and its summary (the `top` kernels) beside it
/// (`trace` + `.kernels.tsv`, + `.summary.json`).
pub fn finish(trace: &Path, top: usize) -> Result<()> {
    let tsv = beside(trace, ".kernels.tsv");
    crate::ffi::kernel_profile_stop(Some(trace), &tsv)?;
    let summary = summarize_file(&tsv, top)?;
    std::fs::write(
        beside(trace, ".summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_names() {
        assert_eq!(
            class_of("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT"),
            "gemm"
        );
        assert_eq!(
            class_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop"),
            "attention"
        );
        assert_eq!(
            class_of("ncclDevKernel_AllReduce_Sum_bf16_RING_LL"),
            "communication"
        );
        assert_eq!(class_of("Memcpy DtoD (Device -> Device)"), "copy_memset");
        assert_eq!(
            class_of("void at::native::vectorized_elementwise_kernel<4>"),
            "elementwise_other"
        );
    }

    #[test]
    fn busy_is_the_union_and_idle_the_rest() {
        let text = "100\t50\t0\tnvjet_a\n120\t50\t0\tfoo_kernel\n300\t100\t0\tnvjet_a\n";
        let acts = parse(text).unwrap();
        let s = summarize(&acts, 5);
        // Span 100..400 = 300 ns; busy 100..170 and 300..400 = 170 ns.
        assert!((s["span_s"].as_f64().unwrap() - 300e-9).abs() < 1e-15);
        assert!((s["busy_s"].as_f64().unwrap() - 170e-9).abs() < 1e-15);
        assert!((s["idle_s"].as_f64().unwrap() - 130e-9).abs() < 1e-15);
        assert_eq!(s["class_s"]["gemm"]["count"], 2);
        assert_eq!(s["top_kernels"][0]["name"], "nvjet_a");
    }

    #[test]
    fn a_malformed_line_is_an_error() {
        assert!(parse("12\tx\t0\tk\n").is_err());
    }
}
