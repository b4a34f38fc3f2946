//! `calibrate`: measures, on one CUDA GPU in bf16, the throughputs the planner's cost model
//! uses and writes them as a calibration file for `mmsp plan --calibration FILE`
//! (`planner/src/calibration.rs` reads it):
//! - `gemm`: projection GEMMs forward + backward (y = x W^T, dX = dY W, dW = dY^T X; 3 x 2mnk
//!   FLOPs) over token counts, for the Llama-style layer shapes or a given model's exact ones
//!   (with `--model`, also its output head `lm_head` at up to the loss's 4096-row chunks);
//! - `attention`: the runtime's own attention kernels ([`attention_fwd`], [`attention_bwd`],
//!   GQA expansion included) over (heads, tokens), causal and not (forward 4 S^2 H D FLOPs,
//!   halved when causal; forward + backward = 3.5 x forward, FlashAttention-2 counting);
//! - `memory_bandwidth`: achieved HBM bandwidth of memory-bound kernels (a copy, an add and a
//!   multiply over large bf16 tensors, and the layers' two layout copies: a heads-to-front
//!   transpose and RoPE's rotate-half cat), as bytes read plus written per call over its time;
//! - `launch`: seconds per kernel of a chain of dependent tiny kernels launched one by one
//!   from the host (`eager_kernel_s`) and replayed from one captured CUDA graph
//!   (`graph_kernel_s`, the floor of a decode step on one rank), and in a graph, chains of
//!   copies (`graph_copy`) and of one-token projections (`graph_gemv`) by size; `calibrate-launch`
//!   adds this section alone to an existing calibration.
//!
//! Every figure is the median over several batches of back-to-back calls after warm-up, each
//! batch bracketed by device synchronisation.
use anyhow::{Context, Result};
use clap::Subcommand;
use mmsp_runtime::kernel::{attention_bwd, attention_fwd, Backend};
use mmsp_runtime::model::ModelConfig;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::util::{gpu, sync, usage};

/// Calibration subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Measure GEMM, attention and memory-bandwidth throughput on this GPU (bf16) and write a
    /// calibration file for `mmsp plan --calibration FILE` (about a minute on an H100).
    Calibrate {
        /// Output calibration JSON.
        #[arg(long)]
        out: PathBuf,
        /// Hugging Face config.json whose exact projection shapes and GQA ratio to measure
        /// [default: Llama-3-8B-like: hidden 4096, ffn 14336, 32 heads, 8 kv heads, d 128].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Attention kernel: cudnn (the runtime's default on CUDA) or flash.
        #[arg(long, default_value = "cudnn")]
        backend: String,
        /// Timed batches per point (the median is kept).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Length of one timed batch of back-to-back calls, in ms. Long batches keep the GPU
        /// at its sustained clock and power, as in a training step; short ones measure it
        /// fresh from idle (boost clocks).
        #[arg(long, default_value_t = 5.0)]
        batch_ms: f64,
        /// Seconds of back-to-back large GEMMs before measuring (the GPU reaches its
        /// sustained clock, power and temperature first).
        #[arg(long, default_value_t = 0.0)]
        preheat_s: f64,
    },
    /// Measure the per-kernel launch floor, eager and in a CUDA graph (a chain of tiny
    /// dependent kernels), and add it to a calibration file as its `launch` section.
    CalibrateLaunch {
        /// Calibration JSON (from `calibrate`) to add the `launch` section to (rewritten whole
        /// only after the measurement succeeded).
        #[arg(long)]
        into: PathBuf,
        /// Timed batches per point (the median is kept).
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
    /// NCCL, one process per GPU of one host (torchrun-style environment, as `nccl-bench`):
    /// time all-gather, reduce-scatter, all-reduce and all-to-all over every rank for bf16
    /// tensors of 16 MiB to 1 GiB and add them, as nccl-tests bus bandwidths, to a calibration
    /// file (`collectives`), from which `mmsp plan --calibration` takes the fabric's achieved
    /// bandwidth.
    CalibrateComm {
        /// A plan whose world size is the launch's (only its world size is used).
        #[arg(long)]
        plan: PathBuf,
        /// Calibration JSON (from `calibrate`) that rank 0 adds the `collectives` section to.
        #[arg(long)]
        into: PathBuf,
        /// Timed calls per point (after two warm-up calls; the median is kept).
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
}

/// Runs one calibration subcommand.
pub fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Calibrate {
            out,
            model,
            backend,
            iters,
            batch_ms,
            preheat_s,
        } => {
            let ok = batch_ms > 0.0 && batch_ms <= 10_000.0 && (0.0..=600.0).contains(&preheat_s);
            if !ok {
                return Err(usage(format!(
                    "--batch-ms {batch_ms} / --preheat-s {preheat_s}: want 0 < batch-ms <= 10000 \
                     and 0 <= preheat-s <= 600"
                )));
            }
            let timing = Timing {
                iters,
                batch_s: batch_ms * 1e-3,
            };
            calibrate(&out, model.as_deref(), &backend, timing, preheat_s)
        }
        Cmd::CalibrateComm { plan, into, iters } => calibrate_comm(&plan, &into, iters),
        Cmd::CalibrateLaunch { into, iters } => calibrate_launch(&into, iters),
    }
}

/// Kernels in each chain [`launch_point`] times.
const LAUNCH_CHAIN: usize = 256;

/// Tensor sizes (bytes) of the graph-replayed copy chains: the sizes of a decode step's
/// kernels on one rank, below the `memory_bandwidth` sweep's smallest (1 MiB).
const GRAPH_COPY_BYTES: [i64; 8] = [
    1 << 10,
    1 << 12,
    1 << 14,
    1 << 16,
    1 << 18,
    1 << 20,
    1 << 22,
    1 << 24,
];

/// Seconds per kernel of `chain` (which queues [`LAUNCH_CHAIN`] kernels), run once eagerly
/// (libraries such as cuBLAS make their handles then: not allowed while capturing), then
/// captured in a CUDA graph and replayed.
fn graph_per_kernel(
    dev: Device,
    tm: Timing,
    chain: impl FnMut() -> mmsp_runtime::error::Result<()>,
) -> Result<f64> {
    graph_per_call(dev, tm, LAUNCH_CHAIN, chain)
}

/// [`graph_per_kernel`] for a chain of `calls` calls.
fn graph_per_call(
    dev: Device,
    tm: Timing,
    calls: usize,
    mut chain: impl FnMut() -> mmsp_runtime::error::Result<()>,
) -> Result<f64> {
    let Device::Cuda(device) = dev else {
        return Err(usage("the launch floor is measured on a CUDA GPU"));
    };
    chain()?;
    sync(dev);
    let (graph, ()) = mmsp_runtime::ffi::CudaGraph::capture(device, chain)?;
    Ok(per_call(dev, tm, || Ok(graph.replay()?))? / calls as f64)
}

/// The `launch` section: seconds per kernel of a chain of [`LAUNCH_CHAIN`] dependent
/// kernels, (1) in-place adds to 256 bf16 elements launched from the host one by one
/// (`eager_kernel_s`) and replayed from one captured CUDA graph (`graph_kernel_s`), and (2)
/// in the graph, copies of [`GRAPH_COPY_BYTES`] (`graph_copy`: bytes read plus written per
/// kernel and seconds per kernel), each copy reading what the one before wrote.
fn launch_point(dev: Device, tm: Timing) -> Result<Value> {
    let mut t = Tensor::zeros([256], (Kind::BFloat16, dev));
    let adds = |t: &mut Tensor| -> mmsp_runtime::error::Result<()> {
        for _ in 0..LAUNCH_CHAIN {
            let _ = t.f_add_scalar_(1.0)?;
        }
        Ok(())
    };
    let eager = per_call(dev, tm, || Ok(adds(&mut t)?))? / LAUNCH_CHAIN as f64;
    let graph = graph_per_kernel(dev, tm, || adds(&mut t))?;
    let mut copies = Vec::new();
    for &bytes in &GRAPH_COPY_BYTES {
        let mut a = randn(&[bytes / 2], dev);
        let mut b = randn(&[bytes / 2], dev);
        let s = graph_per_kernel(dev, tm, || {
            for _ in 0..LAUNCH_CHAIN / 2 {
                b.f_copy_(&a)?;
                a.f_copy_(&b)?;
            }
            Ok(())
        })?;
        copies.push(
            json!({"bytes": 2 * bytes, "tensor_bytes": bytes, "seconds": s,
            "gb_per_s": 2.0 * bytes as f64 / s / 1e9}),
        );
    }
    Ok(json!({
        "kernels": LAUNCH_CHAIN,
        "op": "add_ of 256 bf16 elements, each kernel after the one before",
        "eager_kernel_s": eager,
        "graph_kernel_s": graph,
        "graph_copy": copies,
        "graph_gemv": gemv_points(dev, tm)?,
        "graph_small_ops": small_op_points(dev, tm)?,
        "graph_decode_attention": decode_attention_points(dev, tm)?,
        "host_token_s": host_token_s(dev, tm)?,
    }))
}

/// `host_token_s`: seconds of the host's part of one greedy decode step replayed from a
/// graph, around a graph of one small kernel: the step's int64 inputs loaded as the decode
/// graph loads them (`graph::StagedInput`: pinned memory, copied to the device and into the
/// graph's buffer), the replay, the argmax over 32000 float64 logits and the token read back
/// on the host. Each step starts after the one before has been read back, so the device waits
/// on the host throughout.
fn host_token_s(dev: Device, tm: Timing) -> Result<f64> {
    let Device::Cuda(device) = dev else {
        return Err(usage("the launch floor is measured on a CUDA GPU"));
    };
    let width = 64;
    let inputs = mmsp_runtime::infer::graph::StagedInput::new(width, device)?;
    let logits = Tensor::randn([32000], (Kind::Double, dev));
    let mut x = Tensor::zeros([256], (Kind::BFloat16, dev));
    let _ = x.f_add_scalar_(1.0)?;
    sync(dev);
    let (graph, ()) = mmsp_runtime::ffi::CudaGraph::capture(device, || {
        let _ = x.f_add_scalar_(1.0)?;
        Ok(())
    })?;
    let host: Vec<i64> = (0..width).collect();
    let s = per_call(dev, tm, || {
        inputs.load(&host)?;
        graph.replay()?;
        let _token = logits.f_argmax(0, false)?.f_int64_value(&[])?;
        Ok(())
    })?;
    Ok(s)
}

/// `graph_small_ops`: seconds per op of the small ATen ops a decode step runs besides its
/// projections and attention, each kind in its own graph-replayed chain on (8, 1024) fp32
/// (a row per q head of a small model): an elementwise op, a broadcast multiply, a reduction
/// over the last dim, a dtype cast, a concatenation. Their median is what the planner takes
/// for a small op in a graph.
fn small_op_points(dev: Device, tm: Timing) -> Result<Value> {
    let x0 = Tensor::randn([8, 1024], (Kind::Float, dev));
    let col = Tensor::randn([8, 1], (Kind::Float, dev));
    let mut out = serde_json::Map::new();
    let mut all = Vec::new();
    for op in ["exp", "broadcast_mul", "sum_last", "cast", "cat"] {
        let mut x = x0.copy();
        let s = graph_per_kernel(dev, tm, || {
            for _ in 0..LAUNCH_CHAIN {
                x = match op {
                    "exp" => x.f_exp()?,
                    "broadcast_mul" => x.f_mul(&col)?,
                    "sum_last" => x
                        .f_sum_dim_intlist([-1i64].as_slice(), true, Kind::Float)?
                        .f_expand([8, 1024], false)?,
                    "cast" => x
                        .f_to_kind(Kind::BFloat16)?
                        .f_to_kind(Kind::Float)?
                        .narrow(0, 0, 8),
                    _ => Tensor::f_cat(&[x.narrow(1, 512, 512), x.narrow(1, 0, 512)], 1)?,
                };
            }
            Ok(())
        })?;
        // The cast chain launches two kernels per step.
        let s = if op == "cast" { s / 2.0 } else { s };
        out.insert(op.into(), json!(s));
        all.push(s);
    }
    all.sort_by(f64::total_cmp);
    out.insert("median_s".into(), json!(all[all.len() / 2]));
    Ok(Value::Object(out))
}

/// KV tokens (per kv head) of the `graph_decode_attention` points.
const DECODE_ATTENTION_TOKENS: [usize; 3] = [1 << 16, 1 << 18, 1 << 20];

/// `graph_decode_attention`: seconds of the decode step's attention call (varlen
/// FlashAttention over every (chunk, kv head) of a cache, `mmsp_runtime::infer::graph`) in a
/// graph-replayed chain, each on the output of the one before: 2 kv heads of 4 q heads each,
/// head dim 128, chunks as the runtime cuts them; keyed by the K/V bytes read.
fn decode_attention_points(dev: Device, tm: Timing) -> Result<Vec<Value>> {
    use mmsp_runtime::infer::cache::{chunk_len, KvCache};
    let (hkv, g, d) = (2i64, 4i64, 128i64);
    let mut out = Vec::new();
    for &tokens in &DECODE_ATTENTION_TOKENS {
        let chunk = chunk_len(tokens, hkv as usize);
        let mut cache = KvCache::new(hkv as usize, d as usize, tokens, chunk, Kind::BFloat16, dev)?;
        let (k, v) = cache.storage();
        for t in [k, v] {
            t.shallow_clone().f_copy_(&randn(&t.size(), dev))?;
        }
        let chunks = k.size()[0];
        cache.advance(tokens)?;
        let b = chunks * hkv;
        let used = Tensor::full([b], chunk as i64, (Kind::Int, dev));
        let (cu_q, cu_k) = mmsp_runtime::infer::graph::varlen_starts(&cache);
        let (k, v) = cache.storage();
        let kv = |t: &Tensor| t.view([b * chunk as i64, 1, d]);
        let (kk, vv) = (kv(k), kv(v));
        let mut q = randn(&[b, g, d], dev);
        let calls = 16;
        let s = graph_per_call(dev, tm, calls, || {
            for _ in 0..calls {
                let (o, _) = mmsp_runtime::ffi::flash_varlen_fwd(
                    &q,
                    &kk,
                    &vv,
                    &cu_q,
                    &cu_k,
                    &used,
                    1,
                    chunk as i64,
                    0.088,
                )?;
                q = o;
            }
            Ok(())
        })?;
        let bytes = 2 * tokens as i64 * hkv * d * 2;
        out.push(
            json!({"kv_tokens": tokens, "kv_heads": hkv, "q_heads": hkv * g, "head_dim": d,
            "chunk": chunk, "kv_bytes": bytes, "seconds": s, "gb_per_s": bytes as f64 / s / 1e9}),
        );
    }
    Ok(out)
}

/// (input features, output features) of the one-token projections timed in a graph: a
/// decode step's shapes (hidden 1024 to 8192, MLP and head widths).
const GEMV_SHAPES: [(i64, i64); 7] = [
    (1024, 256),
    (1024, 1024),
    (1024, 2816),
    (4096, 1024),
    (4096, 4096),
    (4096, 14336),
    (1024, 32000),
];

/// Weight bytes the projections of one `graph_gemv` chain read in all: more than an H100's
/// 50 MB of L2, so that each weight comes from HBM, as in a decode step, which reads every
/// weight once.
const GEMV_SET_BYTES: i64 = 256 << 20;

/// `graph_gemv`: seconds per one-token projection y = x W^T (bf16, W of k x n inputs and
/// outputs) in a replayed graph, each on the output of the one before (alternately k -> n
/// and n -> k), cycling over enough distinct weights that none is served from L2.
fn gemv_points(dev: Device, tm: Timing) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for &(k, n) in &GEMV_SHAPES {
        let bytes = 2 * k * n;
        let pairs = (GEMV_SET_BYTES / (2 * bytes)).clamp(1, LAUNCH_CHAIN as i64 / 2);
        let ws: Vec<(Tensor, Tensor)> = (0..pairs)
            .map(|_| (randn(&[n, k], dev), randn(&[k, n], dev)))
            .collect();
        let mut x = randn(&[1, k], dev);
        let s = graph_per_kernel(dev, tm, || {
            for i in 0..LAUNCH_CHAIN / 2 {
                let (w1, w2) = &ws[i % ws.len()];
                let y = x.f_linear::<Tensor>(w1, None)?;
                x = y.f_linear::<Tensor>(w2, None)?;
            }
            Ok(())
        })?;
        out.push(json!({"k": k, "n": n, "weight_bytes": bytes, "seconds": s,
            "gb_per_s": bytes as f64 / s / 1e9}));
    }
    Ok(out)
}

/// `calibrate-launch`: see [`Cmd::CalibrateLaunch`].
fn calibrate_launch(into: &std::path::Path, iters: usize) -> Result<()> {
    if iters == 0 {
        return Err(usage("--iters must be >= 1"));
    }
    let text = std::fs::read_to_string(into)
        .map_err(|e| usage(format!("--into {}: {e}", into.display())))?;
    let mut cal: Value = serde_json::from_str(&text).map_err(|e| {
        usage(format!(
            "--into {}: not a calibration JSON ({e})",
            into.display()
        ))
    })?;
    if !cal.is_object() || cal.get("gemm").is_none() {
        return Err(usage(format!(
            "--into {}: expected a calibration from `mmsp-runtime calibrate` (an object with \"gemm\")",
            into.display()
        )));
    }
    let dev = gpu().context("calibrate-launch measures the GPU it runs on")?;
    let _ng = tch::no_grad_guard();
    let tm = Timing {
        iters,
        batch_s: 5e-3,
    };
    let launch = launch_point(dev, tm)?;
    cal["launch"] = launch.clone();
    let text = serde_json::to_string_pretty(&cal)? + "\n";
    mmsp_runtime::durable::replace_bytes(into, text.as_bytes())
        .map_err(|e| usage(format!("--into {}: {e}", into.display())))?;
    println!(
        "{}",
        json!({"calibration": into.display().to_string(), "device": device_name(), "launch": launch})
    );
    Ok(())
}

/// Tensor sizes of the collective sweep (the whole tensor, all ranks' data), MiB.
const COMM_MIB: [i64; 4] = [16, 64, 256, 1024];

/// `calibrate-comm`: see [`Cmd::CalibrateComm`]. Bus bandwidth as nccl-tests counts it
/// (doc/PERFORMANCE.md): all-gather, reduce-scatter and all-to-all move (n-1)/n of the tensor
/// per rank, all-reduce 2(n-1)/n.
fn calibrate_comm(plan: &std::path::Path, into: &std::path::Path, iters: usize) -> Result<()> {
    use mmsp_runtime::comm::nccl::{LaunchEnv, NcclWorld};
    use mmsp_runtime::comm::Communicator;
    use mmsp_runtime::plan::Plan;
    if iters == 0 {
        return Err(usage("--iters must be >= 1"));
    }
    let text = std::fs::read_to_string(into)
        .map_err(|e| usage(format!("--into {}: {e}", into.display())))?;
    let mut cal: Value = serde_json::from_str(&text)
        .map_err(|e| usage(format!("--into {}: not JSON: {e}", into.display())))?;
    if !cal.get("gemm").is_some_and(Value::is_array) {
        return Err(usage(format!(
            "--into {}: not a calibration from `mmsp-runtime calibrate` (no gemm points)",
            into.display()
        )));
    }
    let plan = Plan::from_file(plan).map_err(|e| usage(format!("--plan: {e}")))?;
    let env = LaunchEnv::from_env().context("reading the launch environment")?;
    let nw = NcclWorld::init(&plan, env.clone(), std::time::Duration::from_secs(120))
        .context("joining the NCCL world")?;
    let world: &dyn Communicator = &nw.world;
    let n = world.size() as i64;
    let dev = Device::Cuda(env.local_rank);
    let mut points = Vec::new();
    for &mib in &COMM_MIB {
        let elems = (mib << 20) / 2 / n * n; // bf16, a multiple of n
        let full = Tensor::randn([elems], (Kind::BFloat16, dev));
        let part = Tensor::empty([elems / n], (Kind::BFloat16, dev));
        let sends: Vec<Tensor> = full.chunk(n, 0);
        let recvs: Vec<Tensor> = (0..n)
            .map(|_| Tensor::empty([elems / n], (Kind::BFloat16, dev)))
            .collect();
        let ops: [(&str, f64); 4] = [
            ("all_gather", (n - 1) as f64 / n as f64),
            ("reduce_scatter", (n - 1) as f64 / n as f64),
            ("all_reduce", 2.0 * (n - 1) as f64 / n as f64),
            ("all_to_all", (n - 1) as f64 / n as f64),
        ];
        for (op, factor) in ops {
            let call = || -> Result<()> {
                match op {
                    "all_gather" => world.all_gather(&part, &full)?,
                    "reduce_scatter" => world.reduce_scatter(&full, &part)?,
                    "all_reduce" => world.all_reduce(&full)?,
                    _ => world.all_to_all(&sends, &recvs)?.wait()?,
                }
                Ok(())
            };
            let mut ts = Vec::with_capacity(iters);
            for i in 0..iters + 2 {
                world.barrier()?;
                sync(dev);
                let t = Instant::now();
                call()?;
                sync(dev);
                if i >= 2 {
                    ts.push(t.elapsed().as_secs_f64());
                }
            }
            ts.sort_by(f64::total_cmp);
            let t = ts[ts.len() / 2];
            let bytes = (elems * 2) as f64;
            let p = json!({"op": op, "bytes": bytes, "seconds": t,
                           "bus_gb_per_s": factor * bytes / t / 1e9});
            if env.rank == 0 {
                println!("{}", json!({"calibrate_comm": p, "gpus": n}));
            }
            points.push(p);
        }
    }
    if env.rank == 0 {
        cal["collectives"] = json!({
            "tool": "mmsp-runtime calibrate-comm",
            "gpus": n,
            "timing": "host time of one call between device synchronisations after a barrier, median of the calls after two warm-ups",
            "points": points,
        });
        std::fs::write(into, serde_json::to_string_pretty(&cal)? + "\n")
            .map_err(|e| usage(format!("--into {}: {e}", into.display())))?;
    }
    nw.finish().context("leaving the NCCL world")?;
    Ok(())
}

/// Token counts of the GEMM sweep (rows of the projections).
const GEMM_TOKENS: [i64; 8] = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768];
/// Rows of one chunk of the runtime's chunked cross-entropy (`train::LOSS_CHUNK`): the output
/// head's GEMMs never see more.
const HEAD_CHUNK_TOKENS: i64 = 4096;
/// Query heads and tokens of the attention sweep (calls up to 32 heads x 32K tokens).
const ATTN_HEADS: [i64; 5] = [32, 16, 8, 4, 1];
const ATTN_TOKENS: [i64; 8] = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768];
const ATTN_MAX_WORK: i64 = 32 * 32768;
/// Bytes of one tensor in the bandwidth sweep: 1 MiB to 1 GiB.
const BW_TENSOR_MIB: [i64; 6] = [1, 4, 16, 64, 256, 1024];
/// How each point is timed: `iters` batches of back-to-back calls, each lasting at least
/// `batch_s` (launch gaps and the synchronisation amortised; `--batch-ms`).
#[derive(Clone, Copy)]
struct Timing {
    iters: usize,
    batch_s: f64,
}

/// The shapes measured: the model's (or Llama-3-8B's) projections and attention heads.
struct Shapes {
    /// (name, n = output features, k = input features) of each projection.
    proj: Vec<(&'static str, i64, i64)>,
    /// The output head (n = vocab, k = hidden) of a given model, measured at the loss's chunk
    /// of rows and fewer (the runtime's chunked cross-entropy runs it 4096 rows at a time).
    head: Option<(i64, i64)>,
    /// Query heads per kv head.
    gqa: i64,
    head_dim: i64,
    source: String,
}

impl Shapes {
    fn new(model: Option<&std::path::Path>) -> Result<Shapes> {
        let Some(path) = model else {
            // The shapes of tools/calibrate_kernels.py: (h, h), (f, h), (h, f).
            let (h, f) = (4096, 14336);
            return Ok(Shapes {
                proj: vec![("h x h", h, h), ("f x h", f, h), ("h x f", h, f)],
                head: None,
                gqa: 4,
                head_dim: 128,
                source: "llama3-8b shapes".into(),
            });
        };
        let c = ModelConfig::from_hf_file(path)
            .map_err(|e| usage(format!("--model {}: {e}", path.display())))?;
        let (h, f) = (c.hidden_size as i64, c.intermediate_size as i64);
        let q = (c.num_heads * c.head_dim) as i64;
        let kv = (c.num_kv_heads * c.head_dim) as i64;
        Ok(Shapes {
            // Every projection of a layer once (k and v both), so that the planner's mean over
            // the points weights the shapes as the layer does.
            proj: vec![
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
                ("gate_proj", f, h),
                ("up_proj", f, h),
                ("down_proj", h, f),
            ],
            head: Some((c.vocab_size as i64, h)),
            gqa: (c.num_heads / c.num_kv_heads.max(1)).max(1) as i64,
            head_dim: c.head_dim as i64,
            source: path.display().to_string(),
        })
    }
}

/// Median seconds per call of `f`: after two warm-up calls, `iters` batches of back-to-back
/// calls (as many as fill `batch_s`), each ended by a device synchronisation.
fn per_call(dev: Device, tm: Timing, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    sync(dev);
    let t = Instant::now();
    f()?;
    sync(dev);
    let one = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((tm.batch_s / one).ceil() as usize).clamp(1, 100_000);
    let mut ts = Vec::with_capacity(tm.iters);
    for _ in 0..tm.iters {
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        sync(dev);
        ts.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

/// bf16 normal(0, 1) tensor on the device.
fn randn(shape: &[i64], dev: Device) -> Tensor {
    Tensor::randn(shape, (Kind::BFloat16, dev))
}

fn gemm_points(dev: Device, tm: Timing, shapes: &Shapes) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for &m in &GEMM_TOKENS {
        let head = shapes
            .head
            .filter(|_| m <= HEAD_CHUNK_TOKENS)
            .map(|(n, k)| ("lm_head", n, k));
        for &(name, n, k) in shapes.proj.iter().chain(head.iter()) {
            let x = randn(&[m, k], dev);
            let w = randn(&[n, k], dev);
            let dy = randn(&[m, n], dev);
            let t = per_call(dev, tm, || {
                let _y = x.f_linear::<Tensor>(&w, None)?;
                let _dx = dy.f_mm(&w)?;
                let _dw = dy.f_tr()?.f_mm(&x)?;
                Ok(())
            })?;
            let flops = 3.0 * 2.0 * (m * n * k) as f64;
            out.push(
                json!({"proj": name, "tokens": m, "n": n, "k": k, "fwd_bwd_s": t,
                            "tflops": flops / t / 1e12}),
            );
        }
        eprintln!("calibrate: gemm {m} tokens done");
    }
    Ok(out)
}

fn attention_points(
    dev: Device,
    tm: Timing,
    shapes: &Shapes,
    backend: Backend,
    name: &str,
) -> Result<Vec<Value>> {
    let d = shapes.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Vec::new();
    for &heads in &ATTN_HEADS {
        // kv heads as a Ulysses rank with `heads` query heads holds them (at least one).
        let kv = (heads / shapes.gqa).max(1);
        for &s in &ATTN_TOKENS {
            if heads * s > ATTN_MAX_WORK {
                continue;
            }
            for causal in [true, false] {
                let q = randn(&[1, heads, s, d], dev);
                let k = randn(&[1, kv, s, d], dev);
                let v = randn(&[1, kv, s, d], dev);
                let dout = randn(&[1, heads, s, d], dev);
                let point = json!({"backend": name, "heads": heads, "kv_heads": kv, "tokens": s,
                                   "head_dim": d, "causal": causal});
                let measured = (|| -> Result<(f64, f64)> {
                    let (o, lse) = attention_fwd(backend, &q, &k, &v, causal, scale)?;
                    let fwd = per_call(dev, tm, || {
                        let _ = attention_fwd(backend, &q, &k, &v, causal, scale)?;
                        Ok(())
                    })?;
                    let bwd = per_call(dev, tm, || {
                        let _ = attention_bwd(backend, &dout, &q, &k, &v, &o, &lse, causal, scale)?;
                        Ok(())
                    })?;
                    Ok((fwd, bwd))
                })();
                let mut p = point;
                match measured {
                    Ok((fwd, bwd)) => {
                        let f = 4.0 * (s * s * heads * d) as f64 * if causal { 0.5 } else { 1.0 };
                        p["fwd_s"] = json!(fwd);
                        p["bwd_s"] = json!(bwd);
                        p["fwd_bwd_s"] = json!(fwd + bwd);
                        p["tflops"] = json!(3.5 * f / (fwd + bwd) / 1e12);
                    }
                    // The kernel refuses the shape (or runs out of memory): recorded, skipped
                    // by the planner.
                    Err(e) => {
                        let msg = format!("{e:#}");
                        p["error"] = json!(msg.lines().next().unwrap_or_default());
                    }
                }
                out.push(p);
            }
        }
        eprintln!("calibrate: attention {heads} heads done");
    }
    Ok(out)
}

fn bandwidth_points(dev: Device, tm: Timing) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for &mib in &BW_TENSOR_MIB {
        let tensor_bytes = mib << 20;
        let n = tensor_bytes / 2; // bf16 elements
        let a = randn(&[n], dev);
        let b = randn(&[n], dev);
        let mut c = Tensor::empty([n], (Kind::BFloat16, dev));
        // (op, tensors read + written per call). Besides the streaming copy/add/mul, the two
        // layout copies the runtime's layers run: "transpose", a (S, 32, 128) -> (32, S, 128)
        // copy (heads to the front for the attention kernel and back), and "cat", RoPE's
        // rotate-half cat([x2, x1]) over the last dimension of 128.
        let hd = 128;
        let rows = n / (32 * hd);
        for (op, tensors) in [
            ("copy", 2),
            ("add", 3),
            ("mul", 3),
            ("transpose", 2),
            ("cat", 2),
        ] {
            let t = per_call(dev, tm, || {
                match op {
                    "copy" => c.f_copy_(&a)?,
                    "add" => {
                        let _ = a.f_add_out(&c, &b)?;
                    }
                    "mul" => {
                        let _ = a.f_mul_out(&c, &b)?;
                    }
                    "transpose" => {
                        let src = a.view([rows, 32, hd]).transpose(0, 1);
                        c.view([32, rows, hd]).f_copy_(&src)?;
                    }
                    _ => {
                        let x = a.view([-1, hd]);
                        let halves = [x.narrow(1, hd / 2, hd / 2), x.narrow(1, 0, hd / 2)];
                        let _ = Tensor::f_cat_out(&c.view([-1, hd]), &halves, 1)?;
                    }
                }
                Ok(())
            })?;
            let bytes = tensors * tensor_bytes;
            out.push(
                json!({"op": op, "dtype": "bf16", "tensor_bytes": tensor_bytes,
                            "bytes": bytes, "seconds": t, "gb_per_s": bytes as f64 / t / 1e9}),
            );
        }
    }
    eprintln!("calibrate: memory bandwidth done");
    Ok(out)
}

/// The CUDA device's name from the driver (libtorch does not expose it).
fn device_name() -> String {
    let name = || -> Option<String> {
        cudarc::driver::result::init().ok()?;
        let d = cudarc::driver::result::device::get(0).ok()?;
        cudarc::driver::result::device::get_name(d).ok()
    };
    name().unwrap_or_else(|| "unknown CUDA device".into())
}

fn calibrate(
    out: &std::path::Path,
    model: Option<&std::path::Path>,
    backend: &str,
    tm: Timing,
    preheat: f64,
) -> Result<()> {
    if tm.iters == 0 {
        return Err(usage("--iters must be >= 1"));
    }
    let kernel = match backend {
        "cudnn" => Backend::Cudnn,
        "flash" => Backend::Flash,
        other => {
            return Err(usage(format!(
                "--backend {other:?}: expected cudnn or flash"
            )))
        }
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(usage(format!(
                "--out {}: no directory {}",
                out.display(),
                dir.display()
            )));
        }
    }
    let shapes = Shapes::new(model)?;
    let dev = gpu().context("calibrate measures the GPU it runs on")?;
    let _ng = tch::no_grad_guard();
    if preheat > 0.0 {
        let (a, b) = (randn(&[8192, 8192], dev), randn(&[8192, 8192], dev));
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < preheat {
            for _ in 0..20 {
                let _ = a.f_mm(&b)?;
            }
            sync(dev);
        }
    }
    let t0 = Instant::now();
    let bandwidth = bandwidth_points(dev, tm)?;
    let gemm = gemm_points(dev, tm, &shapes)?;
    let attention = attention_points(dev, tm, &shapes, kernel, backend)?;
    let launch = launch_point(dev, tm)?;
    let res = json!({
        "device": device_name(),
        "tool": "mmsp-runtime calibrate",
        "batch_ms": tm.batch_s * 1e3,
        "preheat_s": preheat,
        "dtype": "bf16",
        "shapes": shapes.source,
        "gemm": gemm,
        "attention": attention,
        "memory_bandwidth": bandwidth,
        "launch": launch,
    });
    std::fs::write(out, serde_json::to_string_pretty(&res)? + "\n")
        .map_err(|e| usage(format!("--out {}: {e}", out.display())))?;
    let peak_bw = res["memory_bandwidth"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["gb_per_s"].as_f64())
        .fold(0.0, f64::max);
    let peak = |sec: &str| {
        res[sec]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["tflops"].as_f64())
            .fold(0.0, f64::max)
    };
    println!(
        "{}",
        json!({"calibration": out.display().to_string(), "device": res["device"],
               "seconds": t0.elapsed().as_secs_f64(), "max_gemm_tflops": peak("gemm"),
               "max_attention_tflops": peak("attention"), "max_gb_per_s": peak_bw})
    );
    Ok(())
}
