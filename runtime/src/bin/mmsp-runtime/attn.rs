//! Attention subcommands: kernel and 2D benchmarks on one GPU, GPU correctness against
//! float64, bf16 error vs ring size, and the NCCL checks and benchmarks (one process per GPU).
use crate::util::{causal_flops, sync, time};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mmsp_runtime::attn2d::{Attention2d, AttnShape};
use mmsp_runtime::comm::local::local_groups;
use mmsp_runtime::comm::nccl::{LaunchEnv, NcclWorld};
use mmsp_runtime::comm::{Communicator, P2p, Work};
use mmsp_runtime::ffi::{sync_current_stream, use_pool_stream, TimingEvent};
use mmsp_runtime::kernel::{attention_bwd, attention_fwd, Backend};
use mmsp_runtime::plan::{GroupKind, Layout, Placement, Plan};
use mmsp_runtime::testing::{errors, reference, run_2d_local, Problem};
use serde_json::json;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Attention subcommands.
#[derive(Subcommand)]
pub enum Cmd {
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
        /// How the 2D in-process ranks queue GPU work: one (the default stream, shared),
        /// per-rank (a pool stream each, drained by the host around every collective),
        /// per-rank-events (a pool stream each, ordered by CUDA events); comma-separated.
        #[arg(long, default_value = "one,per-rank", value_delimiter = ',')]
        streams: Vec<String>,
        /// Profile the device kernels of the first 2D in-process run (its warm-up and timed
        /// iterations; libtorch's Kineto/CUPTI profiler): the Chrome trace to this file, the
        /// activity list and summary beside it (.kernels.tsv, .summary.json).
        #[arg(long)]
        profile_2d: Option<std::path::PathBuf>,
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
    NcclBench {
        #[arg(long)]
        plan: std::path::PathBuf,
        /// Sequence lengths, timed one after another in the same world.
        #[arg(
            long = "seqs",
            alias = "seq",
            default_value = "131072",
            value_delimiter = ','
        )]
        seqs: Vec<usize>,
        /// Run the nccl-check checks first, in the same launch.
        #[arg(long)]
        check: bool,
        #[arg(long, default_value_t = 32)]
        heads: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
    },
}

/// Seconds per call of `f`, timed as attn_bench.py times PyTorch: one warm-up call and a
/// device synchronise, then CUDA events recorded around `n` back-to-back calls (no host
/// synchronisation between them), mean.
fn time_events<F: FnMut() -> Result<()>>(dev: Device, n: usize, mut f: F) -> Result<f64> {
    let Device::Cuda(idx) = dev else {
        bail!("event timing needs a CUDA device");
    };
    f()?;
    sync(dev);
    let (start, end) = (TimingEvent::new()?, TimingEvent::new()?);
    start.record(idx)?;
    for _ in 0..n {
        f()?;
    }
    end.record(idx)?;
    Ok(start.elapsed_ms(&end)? / 1e3 / n as f64)
}

/// What `bench --what kernels` measures, stated in its JSON (the same as attn_bench.py).
const KERNEL_MEASURES: &str = "fwd: one ATen SDPA kernel call (cudnn: _scaled_dot_product_cudnn_attention with compute_log_sumexp, flash: _scaled_dot_product_flash_attention; both return the log-sum-exp, as PyTorch's do when q requires grad); fwd+bwd: that call plus the backward kernel writing dq, dk, dv (PyTorch adds autograd bookkeeping and accumulates .grad). Inputs: q, k, v contiguous (B, H, S, D) bf16, B=1, causal, scale 1/sqrt(D), no GQA; outputs allocated by the kernel, no copies, casts or layout changes on either side";
const KERNEL_TIMING: &str = "CUDA events around 5 (fwd) or 3 (fwd+bwd) back-to-back calls after 1 warm-up and a synchronise, mean; as attn_bench.py";

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
            let tf = time_events(dev, 5, || {
                let _ = attention_fwd(be, &q, &k, &v, true, scale)?;
                Ok(())
            });
            let tfb = time_events(dev, 3, || {
                let (o, l) = attention_fwd(be, &q, &k, &v, true, scale)?;
                let _ = attention_bwd(be, &dout, &q, &k, &v, &o, &l, true, scale)?;
                Ok(())
            });
            let r = match (tf, tfb) {
                (Ok(tf), Ok(tfb)) => {
                    json!({"bench": "kernel", "impl": "mmsp-runtime", "S": s, "backend": name,
                    "fwd_ms": tf * 1e3, "fwd_tflops": fl / tf / 1e12,
                    "fwdbwd_ms": tfb * 1e3, "fwdbwd_tflops": 3.5 * fl / tfb / 1e12,
                    "timing": KERNEL_TIMING, "measures": KERNEL_MEASURES})
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

/// An in-process communicator for ranks that each queue their work on their own CUDA stream
/// of one GPU. The in-process communicator copies on the receiver's stream from tensors the
/// sender wrote on its stream, and the sender may reuse that memory right after; so around
/// every collective each rank drains its own stream (host wait; the other ranks' streams keep
/// the GPU busy meanwhile) and the group meets at a barrier once every copy has run.
struct StreamSynced<C: Communicator> {
    inner: C,
    device: usize,
}

impl<C: Communicator> StreamSynced<C> {
    fn around<T>(&self, op: impl FnOnce(&C) -> mmsp_runtime::Result<T>) -> mmsp_runtime::Result<T> {
        sync_current_stream(self.device)?;
        let r = op(&self.inner);
        sync_current_stream(self.device)?;
        self.inner.barrier()?;
        r
    }
}

/// `Communicator` for a wrapper with an `inner` communicator and an `around` method that
/// orders the ranks' streams around each collective (the stream modes of `bench`).
macro_rules! ordered_communicator {
    ($wrapper:ident) => {
        impl<C: Communicator> Communicator for $wrapper<C> {
            fn rank(&self) -> usize {
                self.inner.rank()
            }
            fn size(&self) -> usize {
                self.inner.size()
            }
            fn all_to_all(&self, send: &[Tensor], recv: &[Tensor]) -> mmsp_runtime::Result<Work> {
                self.around(|c| c.all_to_all(send, recv)?.wait().map(|_| Work::done()))
            }
            fn send_recv(&self, ops: &[P2p]) -> mmsp_runtime::Result<Work> {
                self.around(|c| c.send_recv(ops)?.wait().map(|_| Work::done()))
            }
            fn all_gather(&self, send: &Tensor, recv: &Tensor) -> mmsp_runtime::Result<()> {
                self.around(|c| c.all_gather(send, recv))
            }
            fn reduce_scatter(&self, send: &Tensor, recv: &Tensor) -> mmsp_runtime::Result<()> {
                self.around(|c| c.reduce_scatter(send, recv))
            }
            fn all_reduce(&self, t: &Tensor) -> mmsp_runtime::Result<()> {
                self.around(|c| c.all_reduce(t))
            }
            fn barrier(&self) -> mmsp_runtime::Result<()> {
                self.inner.barrier()
            }
        }
    };
}

ordered_communicator!(StreamSynced);

/// Events of one in-process group, one slot per rank: recorded by their rank on its stream,
/// waited on by the others' streams.
type GroupEvents = std::sync::Arc<Vec<std::sync::Mutex<TimingEvent>>>;

fn group_events(n: usize) -> Result<GroupEvents> {
    let evs = (0..n)
        .map(|_| TimingEvent::new().map(std::sync::Mutex::new))
        .collect::<mmsp_runtime::Result<Vec<_>>>()?;
    Ok(std::sync::Arc::new(evs))
}

/// Like [`StreamSynced`], but the ranks order their streams through CUDA events instead of
/// draining them on the host, as NCCL's streams are ordered: before a collective each rank
/// records an event after its queued work and every rank's stream waits (on the device) for
/// the other ranks' events, so the copies read finished sends; after it, each rank records
/// again and waits for the others' copies before its stream reuses its buffers. The host
/// meets the other ranks at barriers but never waits for the GPU.
struct EventSynced<C: Communicator> {
    inner: C,
    device: usize,
    before: GroupEvents,
    after: GroupEvents,
}

impl<C: Communicator> EventSynced<C> {
    fn order_after(&self, evs: &GroupEvents) -> mmsp_runtime::Result<()> {
        let me = self.inner.rank();
        let lock = |i: usize| evs[i].lock().unwrap_or_else(|e| e.into_inner());
        lock(me).record(self.device)?;
        self.inner.barrier()?;
        for p in (0..evs.len()).filter(|&p| p != me) {
            lock(p).block(self.device)?;
        }
        // Nobody records this slot again before every rank has waited on it.
        self.inner.barrier()
    }

    fn around<T>(&self, op: impl FnOnce(&C) -> mmsp_runtime::Result<T>) -> mmsp_runtime::Result<T> {
        self.order_after(&self.before)?;
        let r = op(&self.inner);
        self.order_after(&self.after)?;
        r
    }
}

ordered_communicator!(EventSynced);

/// How the in-process ranks of a 2D run queue their GPU work.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Streams {
    /// Every rank on libtorch's default stream: kernels run one after another.
    One,
    /// Each rank on its own stream from libtorch's pool, drained by the host around every
    /// collective (see [`StreamSynced`]).
    PerRank,
    /// Each rank on its own pool stream, ordered by CUDA events (see [`EventSynced`]).
    PerRankEvents,
}

impl Streams {
    fn name(self) -> &'static str {
        match self {
            Streams::One => "one",
            Streams::PerRank => "per-rank",
            Streams::PerRankEvents => "per-rank-events",
        }
    }
}

/// The attention kernels alone that the ranks of a (ulysses, ring) layout run, one after
/// another on one stream (no merges, no copies, no communication): seconds for fwd and for
/// fwd+bwd. This is the bound the kernel curve sets: small ring blocks run below the big
/// kernel's throughput whatever the runtime does around them.
fn blocks_only(
    zz: &mmsp_runtime::shard::Zigzag,
    shape: AttnShape,
    backend: Backend,
    dev: Device,
) -> Result<(f64, f64)> {
    let (u, r) = (zz.ulysses, zz.ring);
    let h = (shape.q_heads / u) as i64;
    let d = shape.head_dim as i64;
    let scale = 1.0 / (shape.head_dim as f64).sqrt();
    let mut counts: std::collections::BTreeMap<(i64, i64, bool), usize> = Default::default();
    for rr in 0..r {
        for src in 0..r {
            for b in mmsp_runtime::ring::blocks(zz, rr, src) {
                *counts.entry((b.q_len, b.kv_len, b.causal)).or_default() += u;
            }
        }
    }
    let (mut f, mut fb) = (0.0, 0.0);
    for ((ql, kl, causal), n) in counts {
        let mk = |len: i64| Tensor::randn([1, h, len, d], (Kind::BFloat16, dev));
        let (q, k, v, dout) = (mk(ql), mk(kl), mk(kl), mk(ql));
        f += n as f64
            * time_events(dev, 5, || {
                let _ = attention_fwd(backend, &q, &k, &v, causal, scale)?;
                Ok(())
            })?;
        fb += n as f64
            * time_events(dev, 3, || {
                let (o, l) = attention_fwd(backend, &q, &k, &v, causal, scale)?;
                let _ = attention_bwd(backend, &dout, &q, &k, &v, &o, &l, causal, scale)?;
                Ok(())
            })?;
    }
    Ok((f, fb))
}

/// Per world rank, the (before, after) events of its group of `kind` (see [`EventSynced`]).
fn rank_events(layout: &Layout, kind: GroupKind) -> Result<Vec<(GroupEvents, GroupEvents)>> {
    let mut slots: Vec<Option<(GroupEvents, GroupEvents)>> =
        (0..layout.world_size()).map(|_| None).collect();
    for g in layout.all_groups(kind) {
        let evs = (group_events(g.len())?, group_events(g.len())?);
        for &m in &g {
            slots[m] = Some((evs.0.clone(), evs.1.clone()));
        }
    }
    slots
        .into_iter()
        .map(|s| s.context("a rank in no group"))
        .collect()
}

/// One rank's communicator for the given stream mode.
fn rank_comm<C: Communicator + 'static>(
    streams: Streams,
    inner: C,
    device: usize,
    (before, after): (GroupEvents, GroupEvents),
) -> Box<dyn Communicator> {
    match streams {
        Streams::One => Box::new(inner),
        Streams::PerRank => Box::new(StreamSynced { inner, device }),
        Streams::PerRankEvents => Box::new(EventSynced {
            inner,
            device,
            before,
            after,
        }),
    }
}

/// Times fwd+bwd (and fwd alone) of 2D attention with one thread per rank on one device.
fn time_2d(
    layout: Layout,
    shape: AttnShape,
    backend: Backend,
    dev: Device,
    iters: usize,
    streams: Streams,
) -> Result<(f64, f64, f64, f64)> {
    let Device::Cuda(dev_idx) = dev else {
        bail!("the 2D bench needs a CUDA device");
    };
    let p = Problem::random(shape, Kind::BFloat16, dev, 3);
    let zz = mmsp_runtime::shard::Zigzag::new(shape.seq_len, layout.ulysses, layout.ring)?;
    let w = layout.world_size();
    let uly = local_groups(&layout, GroupKind::Ulysses);
    let ring = local_groups(&layout, GroupKind::Ring);
    let world = mmsp_runtime::comm::local::LocalComm::group(w);
    let mut inputs = Vec::new();
    for rank in 0..w {
        let c = layout.coords(rank);
        let sh = |t: &Tensor| mmsp_runtime::shard::shard(&zz, t, 2, c.ring, c.ulysses);
        inputs.push((sh(&p.q)?, sh(&p.k)?, sh(&p.v)?, sh(&p.dout)?));
    }
    drop(p);
    let (uly_evs, ring_evs) = (
        rank_events(&layout, GroupKind::Ulysses)?,
        rank_events(&layout, GroupKind::Ring)?,
    );
    let comms = uly.into_iter().zip(ring).zip(uly_evs).zip(ring_evs);
    let res: Vec<Result<(f64, f64, f64, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .zip(world)
            .zip(inputs)
            .map(|(((((uc, rc), ue), re), wc), (q, k, v, dout))| {
                s.spawn(move || -> Result<(f64, f64, f64, f64)> {
                    if streams != Streams::One {
                        use_pool_stream(dev_idx)?;
                    }
                    let uly = rank_comm(streams, uc, dev_idx, ue);
                    let ring = rank_comm(streams, rc, dev_idx, re);
                    let attn = Attention2d::new(&*uly, &*ring, backend, shape)?;
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

#[allow(clippy::too_many_arguments)]
fn bench_2d(
    seqs: &[usize],
    ranks: &[usize],
    h: usize,
    d: usize,
    backend: Backend,
    dev: Device,
    streams: &[Streams],
    mut profile: Option<&std::path::Path>,
) -> Result<()> {
    let mut summary = Vec::new();
    for &s in seqs {
        let shape = AttnShape {
            batch: 1,
            seq_len: s,
            q_heads: h,
            kv_heads: h,
            head_dim: d,
        };
        let fl = causal_flops(s, h, d);
        // The single big kernel on the whole sequence (timed as the 2D runs are: host clock
        // around each call with a device synchronise, median of 3 after one warm-up).
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
                let zz = mmsp_runtime::shard::Zigzag::new(s, u, w / u)?;
                // The kernel-curve bound: the same ring blocks, kernels only.
                let bound = blocks_only(&zz, shape, backend, dev);
                if let Ok((bf, bfb)) = &bound {
                    println!(
                        "{}",
                        json!({"bench": "2d_blocks_only", "S": s, "ranks": w, "ulysses": u, "ring": w / u,
                            "measures": "the attention kernels of every rank's ring blocks, one after another on one stream, event-timed; no merges, copies or communication",
                            "fwd_ms": bf * 1e3, "fwdbwd_ms": bfb * 1e3,
                            "fwd_vs_single_kernel": tf / bf, "fwdbwd_vs_single_kernel": tfb / bfb})
                    );
                }
                for &st in streams {
                    let profiled = profile.take();
                    if profiled.is_some() {
                        mmsp_runtime::ffi::kernel_profile_start()?;
                    }
                    let timed = time_2d(layout, shape, backend, dev, 3, st);
                    if let Some(path) = profiled {
                        mmsp_runtime::train::kernel_profile::finish(path, 60)?;
                    }
                    let r = match timed {
                        Ok((f, fb, wf, wfb)) => {
                            let (bf, bfb) = bound
                                .as_ref()
                                .map(|b| (b.0, b.1))
                                .unwrap_or((f64::NAN, f64::NAN));
                            let j = json!({"bench": "2d_inprocess_one_gpu", "S": s, "ranks": w, "ulysses": u, "ring": w / u,
                            "streams": st.name(),
                            "fwd_ms": f * 1e3, "fwdbwd_ms": fb * 1e3, "fwdbwd_tflops": 3.5 * fl / fb / 1e12,
                            "first_fwd_s": wf, "first_fwdbwd_s": wfb,
                            "fwd_vs_single_kernel": tf / f, "fwdbwd_vs_single_kernel": tfb / fb,
                            "blocks_only_fwdbwd_vs_single_kernel": tfb / bfb,
                            "fwdbwd_vs_blocks_only": bfb / fb, "fwd_vs_blocks_only": bf / f});
                            summary.push(json!({"S": s, "ranks": w, "ulysses": u, "ring": w / u, "streams": st.name(),
                                "fwdbwd_vs_single_kernel": tfb / fb, "fwd_vs_single_kernel": tf / f,
                                "kernel_curve_bound_fwdbwd": tfb / bfb, "meets_0.90": tfb / fb >= 0.90}));
                            j
                        }
                        Err(e) => {
                            json!({"bench": "2d_inprocess_one_gpu", "S": s, "ranks": w, "ulysses": u, "streams": st.name(), "error": e.to_string()})
                        }
                    };
                    println!("{r}");
                }
            }
        }
    }
    println!(
        "{}",
        json!({"bench": "2d_summary", "what": "fwd+bwd throughput of 2D attention with in-process ranks on one GPU as a fraction of one kernel over the whole sequence; kernel_curve_bound_fwdbwd is the same fraction for the ring blocks' kernels alone", "rows": summary})
    );
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
    nccl_check_world(&plan, &env, &nw, seq)
}

/// The NCCL checks on a world already joined: collectives on known values, then 2D attention
/// over the plan's groups against float64.
fn nccl_check_world(plan: &Plan, env: &LaunchEnv, nw: &NcclWorld, seq: usize) -> Result<()> {
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
    let sh = |t: &Tensor| mmsp_runtime::shard::shard(&zz, t, 2, c.ring, c.ulysses);
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

/// One launch for a layout: joins the world once, optionally runs the checks, then times
/// every sequence length.
fn nccl_bench(
    plan_path: &std::path::Path,
    seqs: &[usize],
    h: usize,
    d: usize,
    check: bool,
) -> Result<()> {
    let plan = Plan::from_file(plan_path)
        .with_context(|| format!("reading plan {}", plan_path.display()))?;
    let env = LaunchEnv::from_env().context("reading the launch environment")?;
    let nw = NcclWorld::init(&plan, env.clone(), Duration::from_secs(300))
        .context("joining the NCCL world")?;
    if check {
        nccl_check_world(&plan, &env, &nw, 8192)?;
    }
    for &seq in seqs {
        nccl_bench_seq(&plan, &env, &nw, seq, h, d)?;
    }
    Ok(())
}

fn nccl_bench_seq(
    plan: &Plan,
    env: &LaunchEnv,
    nw: &NcclWorld,
    seq: usize,
    h: usize,
    d: usize,
) -> Result<()> {
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

/// Runs one attention subcommand.
pub fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Bench {
            seqs,
            seqs_2d,
            ranks,
            heads,
            head_dim,
            backend,
            what,
            streams,
            profile_2d,
        } => {
            let streams = streams
                .iter()
                .map(|x| match x.as_str() {
                    "one" => Ok(Streams::One),
                    "per-rank" => Ok(Streams::PerRank),
                    "per-rank-events" => Ok(Streams::PerRankEvents),
                    _ => Err(crate::util::usage(format!(
                        "--streams takes one, per-rank or per-rank-events, not {x:?}"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            let dev = crate::util::gpu()?;
            let be = Backend::parse(&backend)?;
            if !["all", "kernels", "2d"].contains(&what.as_str()) {
                return Err(crate::util::usage(format!(
                    "--what must be all, kernels or 2d, not {what:?}"
                )));
            }
            if what != "2d" {
                bench_kernels(&seqs, heads, head_dim, dev)?;
            }
            if what != "kernels" {
                bench_2d(
                    &seqs_2d,
                    &ranks,
                    heads,
                    head_dim,
                    be,
                    dev,
                    &streams,
                    profile_2d.as_deref(),
                )?;
            }
        }
        Cmd::Check => check_gpu(crate::util::gpu()?)?,
        Cmd::Bf16Error { seq, backend } => {
            let be = Backend::parse(&backend)?;
            let dev = if be == Backend::CpuMath {
                Device::Cpu
            } else {
                crate::util::gpu()?
            };
            bf16_error(seq, be, dev)?;
        }
        Cmd::NcclCheck { plan, seq } => nccl_check(&plan, seq)?,
        Cmd::NcclBench {
            plan,
            seqs,
            check,
            heads,
            head_dim,
        } => nccl_bench(&plan, &seqs, heads, head_dim, check)?,
    }
    Ok(())
}
