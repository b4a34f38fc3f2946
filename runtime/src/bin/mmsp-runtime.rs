//! `mmsp-runtime`: benchmarks and checks of the runtime on a GPU machine, printing one JSON
//! object per line. Subcommands: `bench` (kernels vs their PyTorch figures' shapes, and 2D
//! attention with in-process ranks on one GPU against one big kernel), `check` (GPU
//! correctness against float64), `bf16-error` (error vs ring size), `nccl-check` (NCCL
//! world from torchrun-style environment variables).
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mmsp_runtime::attn2d::{Attention2d, AttnShape};
use mmsp_runtime::comm::local::local_groups;
use mmsp_runtime::comm::nccl::{LaunchEnv, NcclWorld};
use mmsp_runtime::comm::{Communicator, P2p};
use mmsp_runtime::kernel::{attention_bwd, attention_fwd, Backend};
use mmsp_runtime::plan::{GroupKind, Layout, Placement, Plan};
use mmsp_runtime::testing::{errors, reference, run_2d_local, Problem};
use serde_json::json;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
#[command(name = "mmsp-runtime", about = "mmsp runtime benchmarks and checks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a plan (JSON from `mmsp plan --format json`) for N steps and report measured vs
    /// predicted; one process per GPU (RANK/WORLD_SIZE/...) or `--inprocess N` ranks.
    Run {
        plan: std::path::PathBuf,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// A Hugging Face config.json (default: the plan's model).
        #[arg(long, conflicts_with = "tiny")]
        model: Option<std::path::PathBuf>,
        /// The tiny CI model.
        #[arg(long)]
        tiny: bool,
        /// Run the plan's ranks as threads on one device.
        #[arg(long)]
        inprocess: Option<usize>,
        /// Run on the CPU in float32.
        #[arg(long)]
        cpu: bool,
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        /// Peak dense bf16 TFLOP/s of one GPU, for MFU (H100 SXM: 989).
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Kernel and 2D-attention throughput on one GPU (JSON lines).
    Bench {
        /// Sequence lengths for the kernel comparison.
        #[arg(long, default_value = "8192,32768,131072", value_delimiter = ',')]
        seqs: Vec<usize>,
        /// Sequence lengths for the 2D in-process comparison.
        #[arg(long, default_value = "32768,131072", value_delimiter = ',')]
        seqs_2d: Vec<usize>,
        /// World sizes for the 2D comparison (all factorisations of each).
        #[arg(long, default_value = "2,4,8", value_delimiter = ',')]
        ranks: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        heads: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// Backend of the 2D runs.
        #[arg(long, default_value = "cudnn")]
        backend: String,
        /// What to run: kernels, 2d or all.
        #[arg(long, default_value = "all")]
        what: String,
    },
    /// Correctness on the GPU: 2D attention in bf16 against a float64 CPU reference.
    Check,
    /// bf16 error against float64 as the ring grows.
    Bf16Error {
        #[arg(long, default_value_t = 8192)]
        seq: usize,
        #[arg(long, default_value = "cpu")]
        backend: String,
    },
    /// NCCL: join the world described by RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
    /// with the given plan and check collectives and 2D attention.
    NcclCheck {
        #[arg(long)]
        plan: std::path::PathBuf,
        #[arg(long, default_value_t = 8192)]
        seq: usize,
    },
    /// NCCL, one process per GPU (torchrun environment): time 2D attention fwd+bwd over the
    /// plan's groups against one cuDNN kernel on the whole sequence on one GPU.
    /// Inference from a plan made by `mmsp plan --mode inference`: sequence-parallel
    /// prefill and sharded-KV greedy decoding, one thread per rank of the plan in this
    /// process (a random model of the plan's shape, or --tiny). Token ids only.
    Infer(InferArgs),
    /// Needle in a haystack: sharded prefill and decode (in-process ranks) against a chunked
    /// single-device reference at the needle's positions, with the plan's predictions.
    Needle(NeedleArgs),
    NcclBench {
        #[arg(long)]
        plan: std::path::PathBuf,
        #[arg(long, default_value_t = 131072)]
        seq: usize,
        #[arg(long, default_value_t = 32)]
        heads: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
    },
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median seconds of `iters` runs of `f` after one warm-up, each run synchronised.
fn time<F: FnMut() -> Result<()>>(device: Device, iters: usize, mut f: F) -> Result<f64> {
    f()?;
    sync(device);
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        f()?;
        sync(device);
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

fn causal_flops(s: usize, h: usize, d: usize) -> f64 {
    // fwd = 4 * S^2 * H * D / 2 (causal half); fwd+bwd = 3.5 x fwd, as attn_bench.py counts.
    4.0 * (s as f64) * (s as f64) * h as f64 * d as f64 / 2.0
}

fn bench_kernels(
    seqs: &[usize],
    h: usize,
    d: usize,
    dev: Device,
) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for &s in seqs {
        let mk = || Tensor::randn([1, h as i64, s as i64, d as i64], (Kind::BFloat16, dev));
        let (q, k, v, dout) = (mk(), mk(), mk(), mk());
        let scale = 1.0 / (d as f64).sqrt();
        let fl = causal_flops(s, h, d);
        for (name, be) in [("cudnn", Backend::Cudnn), ("flash", Backend::Flash)] {
            let iters_f = if s >= 65536 { 3 } else { 5 };
            let tf = time(dev, iters_f, || {
                let _ = attention_fwd(be, &q, &k, &v, true, scale)?;
                Ok(())
            });
            let tfb = time(dev, 3, || {
                let (o, l) = attention_fwd(be, &q, &k, &v, true, scale)?;
                let _ = attention_bwd(be, &dout, &q, &k, &v, &o, &l, true, scale)?;
                Ok(())
            });
            let r = match (tf, tfb) {
                (Ok(tf), Ok(tfb)) => {
                    json!({"bench": "kernel", "impl": "mmsp-runtime", "S": s, "backend": name,
                    "fwd_ms": tf * 1e3, "fwd_tflops": fl / tf / 1e12,
                    "fwdbwd_ms": tfb * 1e3, "fwdbwd_tflops": 3.5 * fl / tfb / 1e12})
                }
                (a, b) => json!({"bench": "kernel", "S": s, "backend": name,
                    "error": format!("{:?} {:?}", a.err(), b.err())}),
            };
            println!("{r}");
            out.push(r);
        }
    }
    Ok(out)
}

/// Times fwd+bwd (and fwd alone) of 2D attention with one thread per rank on one device.
fn time_2d(
    layout: Layout,
    shape: AttnShape,
    backend: Backend,
    dev: Device,
    iters: usize,
) -> Result<(f64, f64, f64, f64)> {
    let p = Problem::random(shape, Kind::BFloat16, dev, 3);
    let zz = mmsp_runtime::shard::Zigzag::new(shape.seq_len, layout.ulysses, layout.ring)?;
    let w = layout.world_size();
    let uly = local_groups(&layout, GroupKind::Ulysses);
    let ring = local_groups(&layout, GroupKind::Ring);
    let world = mmsp_runtime::comm::local::LocalComm::group(w);
    let mut inputs = Vec::new();
    for rank in 0..w {
        let c = layout.coords(rank);
        let sh = |t: &Tensor| zz.shard(t, 2, c.ring, c.ulysses);
        inputs.push((sh(&p.q)?, sh(&p.k)?, sh(&p.v)?, sh(&p.dout)?));
    }
    drop(p);
    let res: Vec<Result<(f64, f64, f64, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = uly
            .into_iter()
            .zip(ring)
            .zip(world)
            .zip(inputs)
            .map(|(((uc, rc), wc), (q, k, v, dout))| {
                s.spawn(move || -> Result<(f64, f64, f64, f64)> {
                    let attn = Attention2d::new(&uc, &rc, backend, shape)?;
                    let run = |bwd: bool| -> Result<(f64, f64)> {
                        let mut ts = Vec::new();
                        let mut warm = 0.0;
                        for i in 0..=iters {
                            wc.barrier()?;
                            sync(dev);
                            wc.barrier()?;
                            let t0 = Instant::now();
                            let (o, ctx) = attn.forward(&q, &k, &v)?;
                            if bwd {
                                let _ = attn.backward(&ctx, &dout)?;
                            }
                            drop(o);
                            wc.barrier()?;
                            sync(dev);
                            wc.barrier()?;
                            if i > 0 {
                                ts.push(t0.elapsed().as_secs_f64());
                            } else {
                                warm = t0.elapsed().as_secs_f64();
                            }
                        }
                        ts.sort_by(|a, b| a.total_cmp(b));
                        Ok((ts[ts.len() / 2], warm))
                    };
                    let (f, wf) = run(false)?;
                    let (fb, wfb) = run(true)?;
                    Ok((f, fb, wf, wfb))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("rank thread panicked")))
            .collect()
    });
    let mut first = None;
    for r in res {
        let r = r?;
        first.get_or_insert(r);
    }
    first.context("no ranks")
}

fn bench_2d(
    seqs: &[usize],
    ranks: &[usize],
    h: usize,
    d: usize,
    backend: Backend,
    dev: Device,
) -> Result<()> {
    for &s in seqs {
        let shape = AttnShape {
            batch: 1,
            seq_len: s,
            q_heads: h,
            kv_heads: h,
            head_dim: d,
        };
        let fl = causal_flops(s, h, d);
        // The single big kernel on the whole sequence.
        let mk = || Tensor::randn([1, h as i64, s as i64, d as i64], (Kind::BFloat16, dev));
        let (q, k, v, dout) = (mk(), mk(), mk(), mk());
        let scale = 1.0 / (d as f64).sqrt();
        let tf = time(dev, 3, || {
            let _ = attention_fwd(backend, &q, &k, &v, true, scale)?;
            Ok(())
        })?;
        let tfb = time(dev, 3, || {
            let (o, l) = attention_fwd(backend, &q, &k, &v, true, scale)?;
            let _ = attention_bwd(backend, &dout, &q, &k, &v, &o, &l, true, scale)?;
            Ok(())
        })?;
        drop((q, k, v, dout));
        println!(
            "{}",
            json!({"bench": "2d_single_kernel", "S": s, "backend": format!("{backend:?}"),
                "fwd_ms": tf * 1e3, "fwd_tflops": fl / tf / 1e12, "fwdbwd_ms": tfb * 1e3, "fwdbwd_tflops": 3.5 * fl / tfb / 1e12})
        );
        for &w in ranks {
            for u in (1..=w).filter(|u| w.is_multiple_of(*u) && h.is_multiple_of(*u)) {
                let layout = Layout::sp(u, w / u, Placement::UlyssesInner);
                let r = match time_2d(layout, shape, backend, dev, 3) {
                    Ok((f, fb, wf, wfb)) => {
                        json!({"bench": "2d_inprocess_one_gpu", "S": s, "ranks": w, "ulysses": u, "ring": w / u,
                        "fwd_ms": f * 1e3, "fwdbwd_ms": fb * 1e3, "fwdbwd_tflops": 3.5 * fl / fb / 1e12,
                        "first_fwd_s": wf, "first_fwdbwd_s": wfb,
                        "fwd_vs_single_kernel": tf / f, "fwdbwd_vs_single_kernel": tfb / fb})
                    }
                    Err(e) => {
                        json!({"bench": "2d_inprocess_one_gpu", "S": s, "ranks": w, "ulysses": u, "error": e.to_string()})
                    }
                };
                println!("{r}");
            }
        }
    }
    Ok(())
}

fn check_gpu(dev: Device) -> Result<()> {
    for (name, be) in [("cudnn", Backend::Cudnn), ("flash", Backend::Flash)] {
        for (u, r, hq, hkv, s) in [
            (1, 1, 4, 4, 1024),
            (1, 4, 4, 4, 1024),
            (4, 1, 8, 2, 1024),
            (2, 2, 8, 8, 1000),
            (2, 4, 8, 2, 2048),
        ] {
            let shape = AttnShape {
                batch: 1,
                seq_len: s,
                q_heads: hq,
                kv_heads: hkv,
                head_dim: 64,
            };
            let p = Problem::random(shape, Kind::BFloat16, dev, 11);
            let res = run_2d_local(Layout::sp(u, r, Placement::RingInner), shape, be, &p)
                .map_err(anyhow::Error::from)
                .and_then(|g| Ok(errors(&g, &reference(&p)?)));
            let j = match res {
                Ok(e) => {
                    json!({"check": "2d_bf16_vs_f64", "backend": name, "ulysses": u, "ring": r, "q_heads": hq,
                    "kv_heads": hkv, "S": s, "rel_err": {"out": e[0], "dq": e[1], "dk": e[2], "dv": e[3]},
                    "pass": e.iter().all(|x| *x < 2e-2)})
                }
                Err(e) => {
                    json!({"check": "2d_bf16_vs_f64", "backend": name, "ulysses": u, "ring": r, "error": e.to_string(), "pass": false})
                }
            };
            println!("{j}");
        }
    }
    Ok(())
}

fn bf16_error(seq: usize, backend: Backend, dev: Device) -> Result<()> {
    let shape = AttnShape {
        batch: 1,
        seq_len: seq,
        q_heads: 2,
        kv_heads: 2,
        head_dim: 64,
    };
    let p = Problem::random(shape, Kind::BFloat16, dev, 5);
    let reference = reference(&p)?;
    for r in [1, 2, 4, 8] {
        let g = run_2d_local(Layout::sp(1, r, Placement::RingInner), shape, backend, &p)?;
        let e = errors(&g, &reference);
        println!(
            "{}",
            json!({"bf16_error": true, "backend": format!("{backend:?}"), "S": seq, "ring": r,
                "rel_err": {"out": e[0], "dq": e[1], "dk": e[2], "dv": e[3]}})
        );
    }
    Ok(())
}

fn nccl_check(plan_path: &std::path::Path, seq: usize) -> Result<()> {
    let plan = Plan::from_file(plan_path)
        .with_context(|| format!("reading plan {}", plan_path.display()))?;
    let env = LaunchEnv::from_env().context("reading the launch environment")?;
    let nw = NcclWorld::init(&plan, env.clone(), Duration::from_secs(120))
        .context("joining the NCCL world")?;
    let version = mmsp_runtime::ffi::cuda::nccl_version()?;
    let dev = Device::Cuda(env.local_rank);
    let n = nw.world.size();
    // Collectives on known values.
    let x = Tensor::full([4], (env.rank + 1) as f64, (Kind::Float, dev));
    nw.world.all_reduce(&x)?;
    let want = (n * (n + 1) / 2) as f64;
    let ar_ok = Vec::<f64>::try_from(x.to_kind(Kind::Double).to(Device::Cpu))?
        .iter()
        .all(|&v| v == want);
    let ag = Tensor::zeros([n as i64 * 2], (Kind::Float, dev));
    nw.world
        .all_gather(&Tensor::full([2], env.rank as f64, (Kind::Float, dev)), &ag)?;
    let ag_v = Vec::<f64>::try_from(ag.to_kind(Kind::Double).to(Device::Cpu))?;
    let ag_ok = ag_v.iter().enumerate().all(|(i, &v)| v == (i / 2) as f64);
    let rs = Tensor::zeros([1], (Kind::Float, dev));
    nw.world
        .reduce_scatter(&Tensor::ones([n as i64], (Kind::Float, dev)), &rs)?;
    let rs_ok = rs.double_value(&[0]) == n as f64;
    let send: Vec<Tensor> = (0..n)
        .map(|p| Tensor::full([p as i64 + 1], env.rank as f64, (Kind::Float, dev)))
        .collect();
    let recv: Vec<Tensor> = (0..n)
        .map(|_| Tensor::zeros([env.rank as i64 + 1], (Kind::Float, dev)))
        .collect();
    nw.world.all_to_all(&send, &recv)?.wait()?;
    let a2a_ok = recv.iter().enumerate().all(|(p, t)| {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).to(Device::Cpu))
            .map(|v| v.iter().all(|&x| x == p as f64))
            .unwrap_or(false)
    });
    let got = Tensor::zeros([3], (Kind::Float, dev));
    let next = (env.rank + 1) % n;
    let prev = (env.rank + n - 1) % n;
    nw.world
        .send_recv(&[
            P2p::Send {
                peer: next,
                tensor: Tensor::full([3], env.rank as f64, (Kind::Float, dev)),
            },
            P2p::Recv {
                peer: prev,
                tensor: got.shallow_clone(),
            },
        ])?
        .wait()?;
    let p2p_ok = got.double_value(&[0]) == prev as f64;
    nw.world.barrier()?;
    // 2D attention over NCCL groups, against a float64 reference of the whole sequence.
    let l = plan.layout;
    let shape = AttnShape {
        batch: 1,
        seq_len: seq,
        q_heads: 8,
        kv_heads: 8,
        head_dim: 64,
    };
    let p = Problem::random(shape, Kind::BFloat16, dev, 9);
    let c = l.coords(env.rank);
    let zz = mmsp_runtime::shard::Zigzag::new(seq, l.ulysses, l.ring)?;
    let sh = |t: &Tensor| zz.shard(t, 2, c.ring, c.ulysses);
    let attn = Attention2d::new(&nw.ulysses, &nw.ring, Backend::Cudnn, shape)?;
    let (o, ctx) = attn.forward(&sh(&p.q)?, &sh(&p.k)?, &sh(&p.v)?)?;
    let (dq, _, _) = attn.backward(&ctx, &sh(&p.dout)?)?;
    let r = reference(&p)?;
    let e_out = mmsp_runtime::testing::rel_err(&o, &sh(&r.out)?);
    let e_dq = mmsp_runtime::testing::rel_err(&dq, &sh(&r.dq)?);
    nw.world.barrier()?;
    println!(
        "{}",
        json!({"nccl_check": true, "rank": env.rank, "world": n, "nccl_version": version,
            "all_reduce": ar_ok, "all_gather": ag_ok, "reduce_scatter": rs_ok, "all_to_all": a2a_ok, "send_recv": p2p_ok,
            "attn2d_rel_err_out": e_out, "attn2d_rel_err_dq": e_dq, "layout": [l.ulysses, l.ring, l.dp]})
    );
    if !(ar_ok && ag_ok && rs_ok && a2a_ok && p2p_ok && e_out < 2e-2 && e_dq < 2e-2) {
        bail!("NCCL check failed");
    }
    Ok(())
}

fn nccl_bench(plan_path: &std::path::Path, seq: usize, h: usize, d: usize) -> Result<()> {
    let plan = Plan::from_file(plan_path)
        .with_context(|| format!("reading plan {}", plan_path.display()))?;
    let env = LaunchEnv::from_env().context("reading the launch environment")?;
    let nw = NcclWorld::init(&plan, env.clone(), Duration::from_secs(300))
        .context("joining the NCCL world")?;
    let dev = Device::Cuda(env.local_rank);
    let l = plan.layout;
    let shape = AttnShape {
        batch: 1,
        seq_len: seq,
        q_heads: h,
        kv_heads: h,
        head_dim: d,
    };
    let attn = Attention2d::new(&nw.ulysses, &nw.ring, Backend::Cudnn, shape)?;
    let (la, lb) = attn
        .sharding()
        .local_lens(l.coords(env.rank).ring, l.coords(env.rank).ulysses);
    let mk = || {
        Tensor::randn(
            [1, h as i64, (la + lb) as i64, d as i64],
            (Kind::BFloat16, dev),
        )
    };
    let (q, k, v, dout) = (mk(), mk(), mk(), mk());
    let step = |bwd: bool| -> Result<()> {
        let (_o, ctx) = attn.forward(&q, &k, &v)?;
        if bwd {
            let _ = attn.backward(&ctx, &dout)?;
        }
        Ok(())
    };
    let timed = |bwd: bool| -> Result<f64> {
        let mut ts = Vec::new();
        for i in 0..4 {
            nw.world.barrier()?;
            let t0 = Instant::now();
            step(bwd)?;
            nw.world.barrier()?;
            if i > 0 {
                ts.push(t0.elapsed().as_secs_f64());
            }
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        Ok(ts[ts.len() / 2])
    };
    let tf = timed(false)?;
    let tfb = timed(true)?;
    drop((q, k, v, dout));
    // One GPU running the whole sequence with one kernel, for the ratio.
    let (single_f, single_fb) = if env.rank == 0 {
        let mk = || Tensor::randn([1, h as i64, seq as i64, d as i64], (Kind::BFloat16, dev));
        let (q, k, v, dout) = (mk(), mk(), mk(), mk());
        let scale = 1.0 / (d as f64).sqrt();
        let f = time(dev, 3, || {
            let _ = attention_fwd(Backend::Cudnn, &q, &k, &v, true, scale)?;
            Ok(())
        })?;
        let fb = time(dev, 3, || {
            let (o, lse) = attention_fwd(Backend::Cudnn, &q, &k, &v, true, scale)?;
            let _ = attention_bwd(Backend::Cudnn, &dout, &q, &k, &v, &o, &lse, true, scale)?;
            Ok(())
        })?;
        (f, fb)
    } else {
        (f64::NAN, f64::NAN)
    };
    nw.world.barrier()?;
    if env.rank == 0 {
        let w = env.world_size as f64;
        let fl = causal_flops(seq, h, d);
        println!(
            "{}",
            json!({"bench": "2d_nccl", "S": seq, "world": env.world_size, "ulysses": l.ulysses, "ring": l.ring,
                "dp": l.dp, "fwd_ms": tf * 1e3, "fwdbwd_ms": tfb * 1e3,
                "fwdbwd_tflops_per_gpu": 3.5 * fl / tfb / 1e12 / (w / l.dp as f64),
                "single_gpu_fwd_ms": single_f * 1e3, "single_gpu_fwdbwd_ms": single_fb * 1e3,
                "fwd_vs_single_kernel_per_gpu": single_f / (tf * (w / l.dp as f64)),
                "fwdbwd_vs_single_kernel_per_gpu": single_fb / (tfb * (w / l.dp as f64))})
        );
    }
    Ok(())
}

#[derive(clap::Args)]
struct InferArgs {
    /// Plan JSON with "mode": "inference".
    plan: std::path::PathBuf,
    /// Prompt token ids, comma-separated.
    #[arg(long, default_value = "", conflicts_with = "haystack")]
    prompt: String,
    /// Instead of --prompt: this many seeded random token ids (long-context runs).
    #[arg(long)]
    haystack: Option<usize>,
    #[arg(long, default_value_t = 16)]
    max_new: usize,
    /// End-of-sequence token id.
    #[arg(long)]
    eos: Option<i64>,
    /// The CI model (2 layers, hidden 64, 4 heads, 2 kv heads, vocab 128) instead of the
    /// plan's model shape.
    #[arg(long)]
    tiny: bool,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f64, f32 or bf16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long)]
    dtype: Option<String>,
}

fn infer(a: InferArgs) -> Result<()> {
    use mmsp_runtime::infer::{run_local, InferPlan};
    use mmsp_runtime::model::{Decoder, ModelConfig};
    let plan = InferPlan::from_file(&a.plan)?;
    let prompt: Vec<i64> = match a.haystack {
        Some(n) => {
            tch::manual_seed(a.seed);
            let cfg_vocab = if a.tiny { 128 } else { 32000 };
            Vec::<i64>::try_from(Tensor::randint(
                cfg_vocab,
                [n as i64],
                (Kind::Int64, Device::Cpu),
            ))?
        }
        None => a
            .prompt
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<i64>()
                    .with_context(|| format!("bad token id {t:?} in --prompt"))
            })
            .collect::<Result<_>>()?,
    };
    plan.check_prompt(prompt.len())?;
    let cfg = if a.tiny {
        ModelConfig::tiny()
    } else {
        let m = plan
            .model
            .as_ref()
            .context("the plan has no model; use --tiny")?;
        ModelConfig::from_plan_value(m)?
    };
    if let Some(&t) = prompt
        .iter()
        .find(|&&t| t < 0 || t >= cfg.vocab_size as i64)
    {
        bail!(
            "token id {t} is outside the vocabulary of {}",
            cfg.vocab_size
        );
    }
    let dev = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => bail!("CUDA is not available to libtorch"),
        d => bail!("--device must be cpu or cuda, not {d:?}"),
    };
    let kind = match (a.dtype.as_deref(), dev) {
        (Some("f64"), _) => Kind::Double,
        (Some("f32"), _) | (None, Device::Cpu) => Kind::Float,
        (Some("bf16"), _) | (None, _) => Kind::BFloat16,
        (Some(d), _) => bail!("--dtype must be f64, f32 or bf16, not {d:?}"),
    };
    let l = plan.plan.layout;
    let t0 = Instant::now();
    let gens = run_local(
        l,
        plan.context_tokens,
        &|| Decoder::random(cfg.clone(), dev, kind, kind, a.seed),
        Backend::default_for(dev),
        &prompt,
        a.max_new,
        a.eos,
    )?;
    let g = &gens[0];
    let mut d = g.decode_s.clone();
    d.sort_by(|x, y| x.total_cmp(y));
    let med = d.get(d.len() / 2).copied();
    println!(
        "{}",
        json!({"bench": "infer", "world": l.world_size(), "ulysses": l.ulysses, "ring": l.ring,
            "device": format!("{dev:?}"), "dtype": format!("{kind:?}"),
            "prompt_tokens": prompt.len(), "tokens": g.tokens, "stopped_on_eos": g.stopped_on_eos,
            "prefill_s": g.prefill_s, "prefill_tokens_per_s": prompt.len() as f64 / g.prefill_s,
            "decode_ms_per_token_median": med.map(|x| x * 1e3),
            "kv_bytes_per_rank": gens.iter().map(|g| g.kv_bytes).collect::<Vec<_>>(),
            "kv_tokens_per_rank": gens.iter().map(|g| g.kv_tokens).collect::<Vec<_>>(),
            "wall_s": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}

#[derive(clap::Args)]
struct NeedleArgs {
    /// Plan JSON with "mode": "inference" (its model shape is used).
    plan: std::path::PathBuf,
    /// Prompt tokens [default: the plan's context minus --decode].
    #[arg(long)]
    tokens: Option<usize>,
    /// Run this layout ULYSSESxRING (in-process ranks on the same device) instead of the plan's.
    #[arg(long)]
    layout: Option<String>,
    #[arg(long, default_value_t = 16)]
    needle: usize,
    #[arg(long, default_value_t = 8)]
    decode: usize,
    /// Query chunk of the single-device reference.
    #[arg(long, default_value_t = 65536)]
    chunk: usize,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// cpu or cuda.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// f64, f32 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

fn needle(a: NeedleArgs) -> Result<()> {
    use mmsp_runtime::infer::needle::{run_needle, NeedleOpts};
    use mmsp_runtime::infer::InferPlan;
    use mmsp_runtime::model::{Decoder, ModelConfig};
    let text = std::fs::read_to_string(&a.plan)?;
    let plan = InferPlan::from_json(&text)?;
    let plan_json: serde_json::Value = serde_json::from_str(&text)?;
    let cfg = ModelConfig::from_plan_value(plan.model.as_ref().context("the plan has no model")?)?;
    let layout = match a.layout.as_deref() {
        None => plan.plan.layout,
        Some(s) => {
            let (u, r) = s.split_once('x').context("--layout is ULYSSESxRING")?;
            Layout::sp(u.parse()?, r.parse()?, Placement::UlyssesInner)
        }
    };
    let dev = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => bail!("CUDA is not available to libtorch"),
        d => bail!("--device must be cpu or cuda, not {d:?}"),
    };
    let kind = match a.dtype.as_str() {
        "f64" => Kind::Double,
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        d => bail!("--dtype must be f64, f32 or bf16, not {d:?}"),
    };
    let out = run_needle(&NeedleOpts {
        plan: &plan,
        plan_json: &plan_json,
        layout,
        make_model: &|| Decoder::random(cfg.clone(), dev, kind, kind, a.seed),
        backend: Backend::default_for(dev),
        prompt_len: a
            .tokens
            .unwrap_or(plan.context_tokens.saturating_sub(a.decode)),
        pattern: a.needle,
        places: &[0.05, 0.3, 0.61, 0.9],
        decode: a.decode,
        chunk: a.chunk,
        seed: a.seed as u64,
    })?;
    let mut out = out;
    out["model"] = json!({"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size,
        "vocab": cfg.vocab_size});
    out["device"] = json!(format!("{dev:?}"));
    out["dtype"] = json!(format!("{kind:?}"));
    println!("{out}");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let gpu = || -> Result<Device> {
        if !tch::Cuda::is_available() {
            bail!("CUDA is not available to libtorch (is libtorch_cuda linked and a GPU visible?)");
        }
        Ok(Device::Cuda(0))
    };
    match cli.cmd {
        Cmd::Run {
            plan,
            steps,
            model,
            tiny,
            inprocess,
            cpu,
            lr,
            peak_tflops,
            out,
        } => {
            use mmsp_runtime::train::run::{run, ModelSource, RunOptions};
            use mmsp_runtime::RuntimeError as E;
            let model = match (tiny, model) {
                (true, _) => ModelSource::Tiny,
                (false, Some(p)) => ModelSource::HfConfig(p),
                (false, None) => ModelSource::Plan,
            };
            let opts = RunOptions {
                plan,
                steps,
                model,
                inprocess,
                cpu,
                lr,
                peak_flops: peak_tflops * 1e12,
                out,
            };
            match run(&opts) {
                Ok(v) if !v.is_null() => println!("{v}"),
                Ok(_) => {}
                Err(
                    e @ (E::Plan(_)
                    | E::Config(_)
                    | E::Launch(_)
                    | E::Shape(_)
                    | E::Layout(_)
                    | E::Json(_)),
                ) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
                Err(e) => bail!("{e}"),
            }
        }
        Cmd::Bench {
            seqs,
            seqs_2d,
            ranks,
            heads,
            head_dim,
            backend,
            what,
        } => {
            let dev = gpu()?;
            let be = Backend::parse(&backend)?;
            if !["all", "kernels", "2d"].contains(&what.as_str()) {
                bail!("--what must be all, kernels or 2d, not {what:?}");
            }
            if what != "2d" {
                bench_kernels(&seqs, heads, head_dim, dev)?;
            }
            if what != "kernels" {
                bench_2d(&seqs_2d, &ranks, heads, head_dim, be, dev)?;
            }
        }
        Cmd::Check => check_gpu(gpu()?)?,
        Cmd::Bf16Error { seq, backend } => {
            let be = Backend::parse(&backend)?;
            let dev = if be == Backend::CpuMath {
                Device::Cpu
            } else {
                gpu()?
            };
            bf16_error(seq, be, dev)?;
        }
        Cmd::NcclCheck { plan, seq } => nccl_check(&plan, seq)?,
        Cmd::NcclBench {
            plan,
            seq,
            heads,
            head_dim,
        } => nccl_bench(&plan, seq, heads, head_dim)?,
        Cmd::Needle(a) => {
            if let Err(e) = needle(a) {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        }
        Cmd::Infer(a) => {
            // Bad plans and prompts: one line, exit 2.
            if let Err(e) = infer(a) {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        }
    }
    Ok(())
}
