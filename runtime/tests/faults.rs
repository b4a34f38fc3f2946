//! Faults end every rank with an error naming the failed rank, within a bounded time:
//! in-process ranks that fail, panic or never arrive (short timeouts), the rendezvous's
//! liveness channel that tells the survivors which process is gone, and the binary's fault
//! injection and up-front launch checks.
use mmsp_runtime::comm::local::LocalComm;
use mmsp_runtime::comm::rendezvous::Rendezvous;
use mmsp_runtime::comm::Communicator;
use mmsp_runtime::RuntimeError;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Runs `f` on each member of a group named by `labels` (as global ranks), with a short
/// timeout; returns each member's result and how long it took.
fn on_group<T: Send>(
    labels: &[usize],
    timeout: Duration,
    f: impl Fn(LocalComm) -> T + Sync,
) -> Vec<(T, Duration)> {
    let comms = LocalComm::group_named(labels, timeout);
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let t0 = Instant::now();
                    let r = f(c);
                    (r, t0.elapsed())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("a test rank panicked")))
            .collect()
    })
}

fn all_reduce_once(c: &LocalComm) -> Result<(), RuntimeError> {
    let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    c.all_reduce(&t)
}

#[test]
fn a_rank_that_fails_makes_pending_and_later_collectives_fail_naming_it() {
    // Global ranks 4, 5, 6; rank 6 fails while 4 and 5 already wait in an all-reduce.
    let out = on_group(&[4, 5, 6], Duration::from_secs(30), |c| {
        if c.label() == 6 {
            std::thread::sleep(Duration::from_millis(200));
            c.fail("out of memory in layer 3 (test)");
            return None;
        }
        let first = all_reduce_once(&c);
        let next = c.barrier();
        Some((first, next))
    });
    for (r, took) in out.into_iter().filter_map(|(r, t)| r.map(|r| (r, t))) {
        for e in [r.0, r.1] {
            match e {
                Err(RuntimeError::PeerGone(m)) => {
                    assert!(m.contains("rank 6"), "{m}");
                    assert!(m.contains("out of memory in layer 3"), "{m}");
                }
                other => panic!("expected PeerGone naming rank 6, got {other:?}"),
            }
        }
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
}

#[test]
fn a_rank_that_panics_makes_its_peers_fail_naming_it() {
    let (tx, rx) = mpsc::channel();
    let comms = LocalComm::group_named(&[0, 1, 2, 3], Duration::from_secs(30));
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for c in comms {
        let tx = tx.clone();
        hs.push(std::thread::spawn(move || {
            if c.label() == 2 {
                std::thread::sleep(Duration::from_millis(100));
                panic!("rank 2 panics on purpose (test)");
            }
            let r = all_reduce_once(&c);
            tx.send((c.label(), r)).unwrap();
        }));
    }
    drop(tx);
    let got: Vec<_> = rx.iter().collect();
    assert_eq!(got.len(), 3);
    for (rank, r) in got {
        match r {
            Err(RuntimeError::PeerGone(m)) => {
                assert!(
                    m.contains("rank 2") && m.contains("panicked"),
                    "rank {rank}: {m}"
                )
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    let panicked = hs
        .into_iter()
        .map(|h| h.join().is_err())
        .filter(|p| *p)
        .count();
    assert_eq!(panicked, 1);
}

#[test]
fn a_collective_whose_peer_never_arrives_times_out_naming_it() {
    let timeout = Duration::from_millis(400);
    let out = on_group(&[0, 1, 2], timeout, |c| {
        if c.label() == 1 {
            // Alive but never calls the collective (until the others gave up).
            std::thread::sleep(Duration::from_millis(1500));
            return None;
        }
        Some(all_reduce_once(&c))
    });
    for (r, took) in out.into_iter().filter_map(|(r, t)| r.map(|r| (r, t))) {
        match r {
            Err(RuntimeError::Timeout(_, m)) => assert!(m.contains("[1]"), "{m}"),
            other => panic!("expected a timeout naming rank 1, got {other:?}"),
        }
        assert!(
            took >= timeout * 9 / 10 && took < timeout * 3,
            "took {took:?}"
        );
    }
}

#[test]
fn collective_time_is_counted() {
    let out = on_group(&[0, 1], Duration::from_secs(30), |c| {
        if c.label() == 1 {
            std::thread::sleep(Duration::from_millis(150));
        }
        all_reduce_once(&c).unwrap();
        c.comm_time_s()
    });
    // Rank 0 waited for rank 1 inside the collective.
    assert!(out[0].0 >= 0.1, "{}", out[0].0);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Tests that open liveness channels run one at a time: the process's exit hook holds the
/// last channel opened ([`mmsp_runtime::ffi::shutdown_on_exit`]).
static LIVENESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn liveness_lock() -> std::sync::MutexGuard<'static, ()> {
    LIVENESS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rank 0's rendezvous on `port` and `n` ranks watching it; each notice arrives on the
/// receiver with the rank that got it.
fn watching(
    port: u16,
    n: usize,
) -> (
    Vec<mmsp_runtime::comm::rendezvous::Liveness>,
    mpsc::Receiver<(usize, String)>,
) {
    let t = Duration::from_secs(10);
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let r0 = Rendezvous::connect("127.0.0.1", port, 0, t).unwrap();
    let mut live = Vec::new();
    for rank in 0..n {
        let tx = tx.clone();
        let c = Rendezvous::connect_client("127.0.0.1", port, rank, t).unwrap();
        live.push(c.watch(move |m| tx.send((rank, m)).unwrap()).unwrap());
    }
    r0.close();
    (live, rx)
}

/// Waits for the notices of ranks 0 and 1 that rank 2 is gone, within 2 s of `t0` (rank
/// 2's own watcher, whose connection ended, may hear of it too: it is leaving).
fn ranks_0_and_1_hear_of_rank_2(rx: &mpsc::Receiver<(usize, String)>, t0: Instant) {
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (rank, m) = rx.recv_timeout(Duration::from_secs(5)).expect("no notice");
        if rank == 2 {
            continue;
        }
        assert!(m.contains("rank 2 is gone"), "rank {rank} got {m}");
        seen.push(rank);
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1]);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn rendezvous_tells_survivors_which_rank_is_gone() {
    let _one = liveness_lock();
    let port = free_port();
    let t = Duration::from_secs(10);
    let (mut live, rx) = watching(port, 3);
    // Rank 2's process "dies": its liveness connection closes without a clean end.
    let t0 = Instant::now();
    drop(live.pop());
    ranks_0_and_1_hear_of_rank_2(&rx, t0);
    // A rendezvous lookup after the fault fails at once, naming the rank.
    let mut c = Rendezvous::connect_client("127.0.0.1", port, 1, t).unwrap();
    let t1 = Instant::now();
    match c.get("never-set") {
        Err(RuntimeError::PeerGone(m)) => assert!(m.contains("rank 2"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(t1.elapsed() < Duration::from_secs(2));
    c.close();
    for l in &live {
        l.finish();
    }
}

#[test]
fn a_clean_end_is_not_a_fault() {
    let _one = liveness_lock();
    let port = free_port();
    let t = Duration::from_secs(10);
    let (tx, rx) = mpsc::channel::<String>();
    let r0 = Rendezvous::connect("127.0.0.1", port, 0, t).unwrap();
    let live: Vec<_> = (0..2)
        .map(|rank| {
            let tx = tx.clone();
            Rendezvous::connect_client("127.0.0.1", port, rank, t)
                .unwrap()
                .watch(move |m| tx.send(m).unwrap())
                .unwrap()
        })
        .collect();
    r0.close();
    for l in &live {
        l.finish();
    }
    drop(live);
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
}

/// A rank that exits while its process is still alive (CUDA or NCCL teardown blocking after
/// a failure): the exit hook, which `exit` runs before that teardown, ends its liveness
/// connection, so the others hear at once, not when the process is finally gone.
#[test]
fn an_exit_is_heard_before_the_process_is_gone() {
    let _one = liveness_lock();
    let (live, rx) = watching(free_port(), 3);
    // Rank 2 (the last channel opened) "exits": `exit` runs the hook; its Liveness lives on.
    let t0 = Instant::now();
    mmsp_runtime::ffi::exit_hook();
    ranks_0_and_1_hear_of_rank_2(&rx, t0);
    for l in &live {
        l.finish();
    }
}

fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mmsp-runtime"));
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "MMSP_FAULT_INJECT",
    ] {
        c.env_remove(v);
    }
    c
}

fn plan_file(name: &str, ulysses: usize, ring: usize) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("mmsp-faults-{}-{name}.json", std::process::id()));
    std::fs::write(
        &p,
        mmsp_runtime::testing::plan_json(ulysses, ring, 1, 1, 64),
    )
    .unwrap();
    p
}

/// Runs the binary's `run` on in-process CPU ranks with a fault injected; returns (exit
/// code, stderr, seconds).
/// `timeout_s`: `MMSP_COMM_TIMEOUT_S`, or None for the default (adaptive) timeout.
fn run_injected(
    plan: &std::path::Path,
    inject: &str,
    timeout_s: Option<&str>,
    steps: usize,
) -> (Option<i32>, String, f64) {
    let t0 = Instant::now();
    let mut cmd = bin();
    cmd.args(["run", "--tiny", "--cpu", "--inprocess", "2", "--steps"])
        .arg(steps.to_string())
        .arg(plan)
        .env("MMSP_FAULT_INJECT", inject);
    match timeout_s {
        Some(s) => cmd.env("MMSP_COMM_TIMEOUT_S", s),
        None => cmd.env_remove("MMSP_COMM_TIMEOUT_S"),
    };
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t0.elapsed().as_secs_f64(),
    )
}

#[test]
fn binary_run_ends_with_an_error_naming_the_failed_rank() {
    let plan = plan_file("inject", 1, 2);
    for mode in ["error", "panic", "exit"] {
        let (code, err, secs) = run_injected(&plan, &format!("1:1:{mode}"), Some("30"), 3);
        assert_eq!(code, Some(1), "{mode}: {err}");
        let last = err.trim().lines().last().unwrap_or("");
        assert!(
            last.starts_with("error:") && last.contains("rank 1"),
            "{mode}: {err}"
        );
        assert!(secs < 60.0, "{mode}: {secs} s");
    }
    // A rank that stops calling collectives: its peer times out after 1 s naming it.
    let (code, err, secs) = run_injected(&plan, "1:1:hang", Some("1"), 3);
    assert_eq!(code, Some(1), "hang: {err}");
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.contains("timed out") && last.contains("[1]"),
        "hang: {err}"
    );
    assert!(secs < 60.0, "hang: {secs} s");
    // A malformed injection is bad input (exit 2).
    let (code, err, _) = run_injected(&plan, "one:1", Some("30"), 3);
    assert_eq!(code, Some(2), "{err}");
    let _ = std::fs::remove_file(&plan);
}

/// With the default timeouts, a rank that hangs once steps run ends the run within 30 s of
/// the fault (the steady-state limit: 4 x the longest step, 15 s at least), naming it.
#[test]
fn a_hang_with_the_default_timeouts_ends_within_30_s() {
    let plan = plan_file("hang-default", 1, 2);
    let (code, err, secs) = run_injected(&plan, "1:3:hang", None, 6);
    assert_eq!(code, Some(1), "hang: {err}");
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.contains("timed out") && last.contains("[1]"),
        "hang: {err}"
    );
    // Three tiny CPU steps come first (well under a second each); the bound is the issue's.
    assert!(secs < 30.0, "hang with default timeouts: {secs} s");
    let _ = std::fs::remove_file(&plan);
}

#[test]
fn binary_run_refuses_a_plan_for_other_than_the_gpus_found() {
    if tch::Cuda::device_count() == 2 {
        return; // the plan would fit this machine
    }
    let plan = plan_file("spawn", 1, 2);
    let out = bin()
        .args(["run", "--tiny", "--steps", "1"])
        .arg(&plan)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("2 ranks") && err.contains("GPUs were found"),
        "{err}"
    );
    let _ = std::fs::remove_file(&plan);
}
