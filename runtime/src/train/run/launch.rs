//! Launching a run's ranks and ending it: one process per local GPU started and supervised
//! here when no launcher did ([`spawn_local`]), device memory, panics turned into errors
//! naming the rank, and the root cause among several ranks' failures.
use super::*;

/// Device memory (total, used) in bytes, device-wide.
pub(super) fn device_memory(dev: Device) -> Option<(f64, f64)> {
    let Device::Cuda(i) = dev else { return None };
    crate::ffi::cuda::bind_primary_context(i).ok()?;
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some((total as f64, (total - free) as f64))
}

/// The error for a rank whose thread panicked: libtorch's out-of-memory (raised as a panic
/// by tch's infallible calls) becomes [`RuntimeError::OutOfMemory`] with its first line; any
/// other panic is reported with its message.
pub(super) fn panic_to_error(rank: usize, payload: &(dyn std::any::Any + Send)) -> RuntimeError {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    let first = msg.lines().next().unwrap_or_default();
    if msg.contains("out of memory") {
        let detail = first
            .find("CUDA out of memory")
            .map_or(first, |i| &first[i..]);
        RuntimeError::OutOfMemory(format!("rank {rank}: {detail}"))
    } else {
        RuntimeError::Comm(format!("rank {rank} panicked: {first}"))
    }
}

/// The error to report when several ranks failed: a rank's own failure rather than the
/// peers' reports of it.
pub(super) fn root_cause(errs: Vec<RuntimeError>) -> RuntimeError {
    let rank = |e: &RuntimeError| match e {
        RuntimeError::PeerGone(_) => 2,
        RuntimeError::Timeout(..) => 1,
        _ => 0,
    };
    let mut errs = errs;
    errs.sort_by_key(rank);
    errs.into_iter()
        .next()
        .unwrap_or_else(|| RuntimeError::Comm("no rank reported".into()))
}

/// Number of CUDA devices libtorch sees (0 without CUDA).
pub fn local_gpus() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// Whether `run` must start its own ranks: neither `--inprocess` nor a launcher's
/// environment (torchrun's RANK, SLURM's SLURM_PROCID).
pub fn should_spawn(opts: &RunOptions) -> bool {
    opts.inprocess.is_none() && !LaunchEnv::present()
}

/// Starts one process per local GPU, each this binary with `args` and RANK, WORLD_SIZE,
/// LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT set; their output goes to this
/// process's stdout/stderr. Refuses (exit 2) a plan whose world size is not the number of
/// GPUs found, before starting anything. When a child fails, the others are given
/// `grace` to end on their own (they see the failure through the rendezvous) and are then
/// killed; the error names the first rank that failed.
pub fn spawn_local(opts: &RunOptions, args: &[std::ffi::OsString], grace: Duration) -> Result<()> {
    let plan = load(opts)?.plan;
    let gpus = local_gpus();
    let w = plan.world_size;
    if gpus != w {
        return Err(RuntimeError::Launch(format!(
            "the plan is for {w} ranks (one process per GPU) but {gpus} GPUs were found here; \
             use --inprocess {w} for thread ranks on one device, or torchrun/SLURM across hosts"
        )));
    }
    let exe = std::env::current_exe()?;
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port();
    let mut children = Vec::with_capacity(w);
    for r in 0..w {
        let child = std::process::Command::new(&exe)
            .args(args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", w.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", w.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(RuntimeError::Launch(format!("cannot start rank {r}: {e}")));
            }
        }
    }
    let mut first_failure: Option<(usize, std::process::ExitStatus, Instant)> = None;
    loop {
        let mut running = 0;
        for (r, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            let pid = c.id();
            match c.try_wait() {
                Ok(Some(st)) => {
                    *slot = None;
                    if !st.success() && first_failure.is_none() {
                        eprintln!(
                            "mmsp-runtime: rank {r} (pid {pid}) failed ({st}); the other ranks \
                             have {} s to end",
                            grace.as_secs()
                        );
                        first_failure = Some((r, st, Instant::now()));
                    }
                }
                Ok(None) => running += 1,
                Err(_) => *slot = None,
            }
        }
        if running == 0 {
            break;
        }
        if let Some((_, _, t0)) = first_failure {
            if t0.elapsed() > grace {
                for (r, c) in children.iter_mut().enumerate() {
                    if let Some(c) = c {
                        eprintln!("mmsp-runtime: killing rank {r} (pid {})", c.id());
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None => Ok(()),
        Some((r, st, _)) if st.code() == Some(2) => Err(RuntimeError::Launch(format!(
            "rank {r} refused its input (exit code 2)"
        ))),
        Some((r, st, _)) => Err(RuntimeError::PeerGone(format!("rank {r} failed ({st})"))),
    }
}

/// Refuses a plan whose predicted memory for `ranks` ranks exceeds `dev` (unless `skip`:
/// `MMSP_SKIP_MEMORY_CHECK=1`, to measure the real limit).
fn check_memory(tp: &TrainPlan, dev: Device, ranks: usize, skip: bool) -> Result<()> {
    let (Some((total, _)), Some(p)) = (device_memory(dev), &tp.predicted) else {
        return Ok(());
    };
    if p.memory_per_gpu_bytes * ranks as f64 <= total || skip {
        return Ok(());
    }
    let gib = |b: f64| b / 1073741824.0;
    let per = match ranks {
        1 => "per GPU".to_string(),
        n => format!("per rank x {n} in-process ranks"),
    };
    Err(RuntimeError::Launch(format!(
        "the plan predicts {:.1} GiB {per}, the GPU has {:.1} GiB",
        gib(p.memory_per_gpu_bytes),
        gib(total)
    )))
}

/// Runs every rank of the plan as a thread of this process on one device; a failing rank
/// makes its peers' collectives fail naming it. Returns every rank's records.
pub(super) fn launch_inprocess(
    p: &Prepared,
    opts: &RunOptions,
    extras: &RunExtras,
) -> Result<Vec<Vec<StepRecord>>> {
    let dev = if opts.cpu {
        Device::Cpu
    } else {
        Device::Cuda(0)
    };
    let (l, w) = (p.plan.layout, p.plan.world_size);
    check_memory(&p.tp, dev, w, extras.knobs.skip_memory_check)?;
    let timeout = extras.knobs.timeout_policy();
    let uly = local_groups_shared(&l, GroupKind::Ulysses, &timeout);
    let ring = local_groups_shared(&l, GroupKind::Ring, &timeout);
    let world = LocalComm::group_shared(&(0..w).collect::<Vec<_>>(), timeout.clone());
    let cx = p.ctx(opts, extras, dev, true, &timeout);
    let res: Vec<Result<Vec<StepRecord>>> = std::thread::scope(|s| {
        let hs: Vec<_> = uly
            .into_iter()
            .zip(ring)
            .zip(world)
            .enumerate()
            .map(|(rank, ((u, r), g))| {
                let cx = &cx;
                s.spawn(move || {
                    let groups = Groups {
                        ulysses: &u as &dyn Communicator,
                        ring: &r,
                        grad: &g,
                        dp: l.dp,
                    };
                    let out = rank_loop(rank, groups, cx);
                    if let Err(e) = &out {
                        // The peers' collectives fail naming this rank and why.
                        let why = e.to_string();
                        for c in [&u, &r, &g] {
                            c.fail(&why);
                        }
                    }
                    out
                })
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join()
                    .unwrap_or_else(|p| Err(panic_to_error(rank, p.as_ref())))
            })
            .collect()
    });
    let (good, errs): (Vec<_>, Vec<_>) = res.into_iter().partition(|r| r.is_ok());
    if !errs.is_empty() {
        return Err(root_cause(
            errs.into_iter().filter_map(|r| r.err()).collect(),
        ));
    }
    Ok(good.into_iter().filter_map(|r| r.ok()).collect())
}

/// Runs this process's rank over NCCL (the launcher's environment) and gathers every rank's
/// records on rank 0 (None on the others).
pub(super) fn launch_nccl(
    p: &Prepared,
    opts: &RunOptions,
    extras: &RunExtras,
) -> Result<Option<Vec<Vec<StepRecord>>>> {
    let env = LaunchEnv::from_env()?;
    p.plan.check_launch(env.world_size)?;
    let d = Device::Cuda(env.local_rank);
    check_memory(&p.tp, d, 1, extras.knobs.skip_memory_check)?;
    let rank = env.rank;
    let timeout = extras.knobs.timeout_policy();
    let nw = NcclWorld::init_shared(&p.plan, env, timeout.clone())?;
    let cx = p.ctx(opts, extras, d, false, &timeout);
    let groups = Groups {
        ulysses: &nw.ulysses,
        ring: &nw.ring,
        grad: &nw.world,
        dp: p.plan.layout.dp,
    };
    // tch's infallible calls panic on libtorch errors (a CUDA out-of-memory among them):
    // caught here so that this rank ends with an error naming it, as in-process ranks do.
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rank_loop(rank, groups, &cx)
    }))
    .unwrap_or_else(|p| Err(panic_to_error(rank, p.as_ref())))?;
    // Ranks reach the end at their own pace (rank 0 may still be writing files).
    let _relaxed = timeout.relax();
    let records = gather_records(&nw.world, &mine, d)?;
    nw.finish()?;
    Ok((rank == 0).then_some(records))
}

#[cfg(test)]
mod panic_tests {
    use super::*;

    #[test]
    fn out_of_memory_panics_become_typed_errors_naming_the_rank() {
        let oom: Box<dyn std::any::Any + Send> = Box::new(String::from(
            "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to \
             allocate 1.14 GiB.\nmore\")",
        ));
        match panic_to_error(3, oom.as_ref()) {
            RuntimeError::OutOfMemory(m) => {
                assert!(m.starts_with("rank 3: CUDA out of memory. Tried"), "{m}");
                assert!(!m.contains('\n'), "{m}");
            }
            e => panic!("{e:?}"),
        }
        let other: Box<dyn std::any::Any + Send> = Box::new("index out of bounds");
        match panic_to_error(1, other.as_ref()) {
            RuntimeError::Comm(m) => assert_eq!(m, "rank 1 panicked: index out of bounds"),
            e => panic!("{e:?}"),
        }
    }
}
