//! NCCL communicator, one process per GPU, launched as torchrun does (RANK, WORLD_SIZE,
//! LOCAL_RANK, MASTER_ADDR, MASTER_PORT; under SLURM, SLURM_PROCID, SLURM_NTASKS and
//! SLURM_LOCALID stand in for the first three). Unique ids go through the TCP
//! [`Rendezvous`]; one communicator is made for the world and one for each of the plan's
//! Ulysses, ring and DP groups this rank belongs to. Operations run on the communicator's own
//! CUDA stream, ordered after the work already queued on libtorch's stream through an event,
//! and the caller's [`Work::wait`] orders libtorch's stream after them: the host never waits
//! for the device.
//!
//! Faults. A second rendezvous connection stays open as a liveness channel
//! ([`super::rendezvous::Liveness`]): when a rank's process dies (or ends on an error) every
//! survivor learns which rank within a TCP round trip. A watchdog thread per process polls
//! every communicator's `ncclCommGetAsyncError` and the completion event of every operation
//! in flight; an operation pending longer than the world's timeout
//! ([`super::CommTimeout`]: `MMSP_COMM_TIMEOUT_S`, or adaptive) is a timeout. On the first fault the watchdog records it (every
//! later call on any communicator returns it, naming the rank), aborts the communicators if an
//! operation is still in flight (so the device work behind them returns), and if the process
//! is still stuck in NCCL or on the device [`FAULT_GRACE`] later, prints the error and exits
//! with code 1. A run ends cleanly through [`NcclWorld::finish`].
use super::rendezvous::{Liveness, Rendezvous};
use super::{check_gather_shapes, CommTimeout, Communicator, P2p, Work};
use crate::error::{Result, RuntimeError};
use crate::ffi::cuda::{self, Event, NcclComm, NcclOp, NcclWatch, Stream};
use crate::plan::Plan;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// How long the watchdog lets a process that is stuck after a fault go on before it exits it.
pub const FAULT_GRACE: Duration = Duration::from_secs(5);

/// After a fault, the process is ended this long later if it has not exited by itself
/// (a bound on the time from a peer's death to every rank's exit).
pub const REAP_AFTER: Duration = Duration::from_secs(20);

/// How long work may stay in flight after a fault before the communicators are aborted.
const ABORT_DELAY: Duration = Duration::from_millis(500);

/// Watchdog polling period.
const POLL: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone)]
enum FaultKind {
    PeerGone,
    Timeout(u64),
    Nccl,
}

/// The first fault seen by this process's communicators (shared by all of them, the
/// liveness channel and the watchdog).
#[derive(Default)]
pub struct Health {
    fault: Mutex<Option<(FaultKind, String)>>,
    /// Inside NcclWorld::init (NCCL initialisation can block on a dead peer).
    in_init: AtomicBool,
}

impl Health {
    fn set(&self, kind: FaultKind, msg: String) {
        let mut f = lock(&self.fault);
        if f.is_none() {
            *f = Some((kind, msg.clone()));
            // Whatever happens next (the owner's error path, an abort that blocks, an NCCL
            // teardown that waits on the dead peer), the process ends within REAP_AFTER.
            std::thread::spawn(move || {
                std::thread::sleep(REAP_AFTER);
                eprintln!("error: {msg}");
                eprintln!(
                    "error: still running {} s after the fault (blocked in NCCL, CUDA or their \
                     teardown); ending the process",
                    REAP_AFTER.as_secs()
                );
                crate::ffi::hard_exit(1)
            });
        }
    }

    /// The fault as an error, if there was one.
    pub fn check(&self) -> Result<()> {
        match lock(&self.fault).clone() {
            None => Ok(()),
            Some((FaultKind::PeerGone, m)) => Err(RuntimeError::PeerGone(m)),
            Some((FaultKind::Timeout(s), m)) => Err(RuntimeError::Timeout(s, m)),
            Some((FaultKind::Nccl, m)) => Err(RuntimeError::Nccl(m)),
        }
    }
}

/// One group of operations in flight, bracketed by timed events on the comm stream.
struct Pending {
    start: Event,
    stop: Event,
    issued: Instant,
    what: &'static str,
}

/// What the watchdog knows about one communicator.
struct Tracker {
    group: String,
    global_rank: usize,
    watch: NcclWatch,
    pending: Mutex<VecDeque<Pending>>,
    /// Set while the owner is inside an NCCL call (enqueueing can block on a dead peer).
    in_call: Mutex<Option<(Instant, &'static str)>>,
    done_s: Mutex<f64>,
}

impl Tracker {
    /// Pops the completed operations, adding their device time.
    fn drain(&self) -> Result<()> {
        let mut q = lock(&self.pending);
        while let Some(p) = q.front() {
            match p.stop.query() {
                Ok(true) => {
                    let dt = Event::elapsed_s(&p.start, &p.stop).unwrap_or(0.0);
                    *lock(&self.done_s) += dt;
                    q.pop_front();
                }
                Ok(false) => break,
                Err(e) => {
                    q.pop_front();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The oldest operation not yet done (or the call being made), and its age.
    fn oldest(&self) -> Option<(Duration, &'static str)> {
        if let Some((t, what)) = *lock(&self.in_call) {
            return Some((t.elapsed(), what));
        }
        lock(&self.pending)
            .front()
            .map(|p| (p.issued.elapsed(), p.what))
    }
}

/// One rank of one NCCL group.
pub struct NcclCommunicator {
    comm: NcclComm,
    rank: usize,
    size: usize,
    device: usize,
    stream: Stream,
    tracker: Arc<Tracker>,
    health: Arc<Health>,
}

impl NcclCommunicator {
    /// Joins a group of `size` ranks as `rank` with the given unique id (no watchdog: see
    /// [`NcclWorld`] for one).
    pub fn new(id: &[u8], rank: usize, size: usize, device: usize) -> Result<NcclCommunicator> {
        Self::join("group", id, rank, rank, size, device, Arc::default())
    }

    fn join(
        group: &str,
        id: &[u8],
        global_rank: usize,
        rank: usize,
        size: usize,
        device: usize,
        health: Arc<Health>,
    ) -> Result<NcclCommunicator> {
        cuda::bind_primary_context(device)?;
        let comm = NcclComm::init_rank(size, id, rank)?;
        let tracker = Arc::new(Tracker {
            group: group.to_string(),
            global_rank,
            watch: comm.watch(),
            pending: Mutex::new(VecDeque::new()),
            in_call: Mutex::new(None),
            done_s: Mutex::new(0.0),
        });
        Ok(NcclCommunicator {
            comm,
            rank,
            size,
            device,
            stream: Stream::new_non_blocking()?,
            tracker,
            health,
        })
    }

    fn launch(&self, what: &'static str, ops: &[NcclOp<'_>]) -> Result<Work> {
        self.health.check()?;
        let (start, stop) = (Event::timed()?, Event::timed()?);
        *lock(&self.tracker.in_call) = Some((Instant::now(), what));
        let r = self
            .comm
            .launch_timed(self.device, ops, &self.stream, Some((&start, &stop)));
        if r.is_ok() {
            lock(&self.tracker.pending).push_back(Pending {
                start,
                stop,
                issued: Instant::now(),
                what,
            });
        }
        *lock(&self.tracker.in_call) = None;
        // A fault seen meanwhile wins over NCCL's own error (it names the rank).
        self.health.check()?;
        Ok(Work::pending(r.map_err(|e| {
            RuntimeError::Nccl(format!(
                "rank {}: {what} on the {} group: {e}",
                self.tracker.global_rank, self.tracker.group
            ))
        })?))
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.size {
            return Err(RuntimeError::Comm(format!(
                "peer {peer} outside group of {}",
                self.size
            )));
        }
        Ok(())
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_to_all(&self, send: &[Tensor], recv: &[Tensor]) -> Result<Work> {
        if send.len() != self.size || recv.len() != self.size {
            return Err(RuntimeError::Comm(format!(
                "all_to_all: {} send and {} receive buffers for a group of {}",
                send.len(),
                recv.len(),
                self.size
            )));
        }
        let mut ops = Vec::with_capacity(2 * self.size);
        for (p, (s, r)) in send.iter().zip(recv).enumerate() {
            ops.push(NcclOp::Send { tensor: s, peer: p });
            ops.push(NcclOp::Recv { tensor: r, peer: p });
        }
        self.launch("all_to_all", &ops)
    }

    fn send_recv(&self, ops: &[P2p]) -> Result<Work> {
        let mut nops = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                P2p::Send { peer, tensor } => {
                    self.check_peer(*peer)?;
                    nops.push(NcclOp::Send {
                        tensor,
                        peer: *peer,
                    });
                }
                P2p::Recv { peer, tensor } => {
                    self.check_peer(*peer)?;
                    nops.push(NcclOp::Recv {
                        tensor,
                        peer: *peer,
                    });
                }
            }
        }
        self.launch("send_recv", &nops)
    }

    fn all_gather(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        self.all_gather_async(send, recv)?.wait()
    }

    fn reduce_scatter(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        self.reduce_scatter_async(send, recv)?.wait()
    }

    fn all_gather_async(&self, send: &Tensor, recv: &Tensor) -> Result<Work> {
        check_gather_shapes(send, recv, self.size, "all_gather")?;
        self.launch("all_gather", &[NcclOp::AllGather { send, recv }])
    }

    fn reduce_scatter_async(&self, send: &Tensor, recv: &Tensor) -> Result<Work> {
        check_gather_shapes(recv, send, self.size, "reduce_scatter")?;
        self.launch("reduce_scatter", &[NcclOp::ReduceScatter { send, recv }])
    }

    fn all_reduce(&self, t: &Tensor) -> Result<()> {
        self.launch("all_reduce", &[NcclOp::AllReduce { tensor: t }])?
            .wait()
    }

    fn barrier(&self) -> Result<()> {
        let t = Tensor::zeros([1], (tch::Kind::Float, Device::Cuda(self.device)));
        self.all_reduce(&t)?;
        // The host waits here, and only here.
        let _ = t.f_double_value(&[])?;
        self.health.check()
    }

    fn comm_time_s(&self) -> f64 {
        let _ = self.tracker.drain();
        *lock(&self.tracker.done_s)
    }

    fn peer_failure(&self) -> Option<RuntimeError> {
        self.health.check().err()
    }
}

/// The launch environment, as torchrun sets it.
#[derive(Debug, Clone)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchEnv {
    /// Whether the environment describes a launched rank (torchrun's RANK or SLURM's
    /// SLURM_PROCID is set).
    pub fn present() -> bool {
        std::env::var_os("RANK").is_some() || std::env::var_os("SLURM_PROCID").is_some()
    }

    /// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. When RANK is not set,
    /// SLURM's SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID are used for the first three
    /// (MASTER_ADDR must then be rank 0's host, and MASTER_PORT defaults to 29500).
    pub fn from_env() -> Result<LaunchEnv> {
        fn var(name: &str) -> Result<String> {
            std::env::var(name).map_err(|_| {
                RuntimeError::Launch(format!("environment variable {name} is not set"))
            })
        }
        fn num<T: std::str::FromStr>(name: &str) -> Result<T> {
            let v = var(name)?;
            v.parse()
                .map_err(|_| RuntimeError::Launch(format!("{name}={v:?} is not a number")))
        }
        let slurm =
            std::env::var_os("RANK").is_none() && std::env::var_os("SLURM_PROCID").is_some();
        let (r, w, l) = if slurm {
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        } else {
            ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        };
        let port = if slurm && std::env::var_os("MASTER_PORT").is_none() {
            29500
        } else {
            num("MASTER_PORT")?
        };
        let e = LaunchEnv {
            rank: num(r)?,
            world_size: num(w)?,
            local_rank: num(l)?,
            master_addr: var("MASTER_ADDR")?,
            master_port: port,
        };
        if e.rank >= e.world_size {
            return Err(RuntimeError::Launch(format!(
                "RANK {} >= WORLD_SIZE {}",
                e.rank, e.world_size
            )));
        }
        Ok(e)
    }
}

/// Stops the watchdog thread when dropped (before the communicators it watches go).
struct Watchdog {
    stop: Arc<AtomicBool>,
    trackers: Arc<Mutex<Vec<Arc<Tracker>>>>,
    handle: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(
        rank: usize,
        device: usize,
        health: Arc<Health>,
        timeout: Arc<CommTimeout>,
    ) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let trackers: Arc<Mutex<Vec<Arc<Tracker>>>> = Arc::default();
        let (st, tr) = (stop.clone(), trackers.clone());
        let handle =
            std::thread::spawn(move || watchdog(rank, device, &health, &timeout, &st, &tr));
        Watchdog {
            stop,
            trackers,
            handle: Some(handle),
        }
    }

    fn add(&self, c: &NcclCommunicator) {
        lock(&self.trackers).push(c.tracker.clone());
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The watchdog loop (see the module header).
fn watchdog(
    rank: usize,
    device: usize,
    health: &Health,
    timeout: &CommTimeout,
    stop: &AtomicBool,
    trackers: &Mutex<Vec<Arc<Tracker>>>,
) {
    // Event queries need the device's context on this thread.
    let _ = cuda::bind_primary_context(device);
    let mut aborted_at: Option<Instant> = None;
    // When the fault was first seen with work in flight: operations that were about to
    // complete anyway (a peer that ended right after the last collective) get a moment.
    let mut busy_since: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(POLL);
        let ts: Vec<Arc<Tracker>> = lock(trackers).clone();
        let mut busy = health.in_init.load(Ordering::Acquire);
        for t in &ts {
            if let Err(e) = t.drain() {
                health.set(
                    FaultKind::Nccl,
                    format!("rank {rank}: the {} group's stream failed: {e}", t.group),
                );
            }
            if let Some((age, what)) = t.oldest() {
                busy = true;
                let limit = timeout.get();
                if age > limit {
                    health.set(
                        FaultKind::Timeout(limit.as_secs()),
                        format!(
                            "rank {rank}: {what} on the {} group did not complete within {:.0} s \
                             (a peer is stuck or gone; MMSP_COMM_TIMEOUT_S sets the limit)",
                            t.group,
                            limit.as_secs_f64()
                        ),
                    );
                }
            }
            if let Err(e) = t.watch.async_error() {
                health.set(
                    FaultKind::Nccl,
                    format!(
                        "rank {rank}: NCCL on the {} group: {e} (a peer failed)",
                        t.group
                    ),
                );
            }
        }
        let Err(fault) = health.check() else {
            continue;
        };
        if !busy {
            // Nothing in flight: the owner gets the fault from its next call.
            busy_since = None;
            continue;
        }
        let since = *busy_since.get_or_insert_with(Instant::now);
        match aborted_at {
            None if since.elapsed() < ABORT_DELAY => {}
            None => {
                // Said here as well, in case the owner dies of the abort before reporting.
                eprintln!("rank {rank}: {fault}; aborting this rank's NCCL communicators");
                for t in &ts {
                    t.watch.abort();
                }
                aborted_at = Some(Instant::now());
            }
            Some(t0) if t0.elapsed() > FAULT_GRACE => {
                eprintln!("error: {fault}");
                eprintln!(
                    "error: rank {rank} is still blocked in NCCL or on the device {} s after the \
                     fault; exiting",
                    FAULT_GRACE.as_secs()
                );
                crate::ffi::hard_exit(1);
            }
            Some(_) => {}
        }
    }
}

/// This process's communicators for a plan, with their liveness channel and watchdog.
pub struct NcclWorld {
    pub env: LaunchEnv,
    pub world: NcclCommunicator,
    pub ulysses: NcclCommunicator,
    pub ring: NcclCommunicator,
    pub dp: NcclCommunicator,
    health: Arc<Health>,
    liveness: Liveness,
    watchdog: Option<Watchdog>,
}

impl Drop for NcclWorld {
    fn drop(&mut self) {
        // The watchdog must stop before the communicators it polls are destroyed.
        self.watchdog.take();
    }
}

impl NcclWorld {
    /// The first fault seen by any of this process's communicators, as an error naming the
    /// rank (a peer that is gone, a timeout, an NCCL error).
    pub fn check(&self) -> Result<()> {
        self.health.check()
    }

    /// The fault state, for checks from other threads.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Ends the run cleanly: a barrier over the world (so that every rank is done with its
    /// collectives), then a goodbye on the liveness channel. Without it, this process's exit
    /// is reported to the other ranks as a failure.
    pub fn finish(&self) -> Result<()> {
        let t = Tensor::zeros([1], (tch::Kind::Float, Device::Cuda(self.world.device)));
        self.world.all_reduce(&t)?;
        let _ = t.f_double_value(&[])?;
        // No fault check after this point: a rank that passed the barrier first may already
        // be exiting, which is not a failure.
        self.liveness.finish();
        Ok(())
    }

    /// Checks the plan against the launch, then builds the world and the plan's groups.
    /// Every check that can fail without talking to other ranks runs first. `timeout`
    /// bounds the rendezvous; collectives time out after it too.
    pub fn init(plan: &Plan, env: LaunchEnv, timeout: Duration) -> Result<NcclWorld> {
        Self::init_shared(plan, env, CommTimeout::fixed(timeout))
    }

    /// As [`NcclWorld::init`], with a run's shared timeout: its start-up limit bounds the
    /// rendezvous, and the watchdog reads its current limit.
    pub fn init_shared(plan: &Plan, env: LaunchEnv, limit: Arc<CommTimeout>) -> Result<NcclWorld> {
        let timeout = limit.startup();
        plan.validate()?;
        plan.check_launch(env.world_size)?;
        let version = cuda::nccl_version()?;
        if !tch::Cuda::is_available() || env.local_rank >= tch::Cuda::device_count() as usize {
            return Err(RuntimeError::Launch(format!(
                "LOCAL_RANK {} but {} CUDA devices are visible",
                env.local_rank,
                tch::Cuda::device_count()
            )));
        }
        let mut store = Rendezvous::connect(&env.master_addr, env.master_port, env.rank, timeout)?;
        let health: Arc<Health> = Arc::default();
        health.in_init.store(true, Ordering::Release);
        let h = health.clone();
        let liveness =
            Rendezvous::connect_client(&env.master_addr, env.master_port, env.rank, timeout)?
                .watch(move |msg| h.set(FaultKind::PeerGone, msg))?;
        let watchdog = Watchdog::start(env.rank, env.local_rank, health.clone(), limit);
        // Every rank must run the same NCCL: the ids would not match otherwise.
        store.set(
            &format!("nccl_version/{}", env.rank),
            &version.to_le_bytes(),
        )?;
        if env.rank == 0 {
            for r in 1..env.world_size {
                let v = store.get(&format!("nccl_version/{r}"))?;
                if v != version.to_le_bytes() {
                    return Err(RuntimeError::Launch(format!(
                        "rank {r} loaded a different NCCL than rank 0"
                    )));
                }
            }
        }
        let l = plan.layout;
        let me = env.rank;
        let mut join = |name: &str, group: Vec<usize>| -> Result<NcclCommunicator> {
            let idx = group.iter().position(|&g| g == me).ok_or_else(|| {
                RuntimeError::Plan(format!(
                    "rank {me} is not in its own {name} group {group:?}"
                ))
            })?;
            let key = format!("nccl_id/{name}/{}", group[0]);
            let id = if idx == 0 {
                let id = cuda::nccl_unique_id()?;
                store.set(&key, &id)?;
                id
            } else {
                store.get(&key)?
            };
            health.check()?;
            let c = NcclCommunicator::join(
                name,
                &id,
                me,
                idx,
                group.len(),
                env.local_rank,
                health.clone(),
            )?;
            watchdog.add(&c);
            Ok(c)
        };
        // Each phase partitions the world, so creating them in this order cannot deadlock.
        let world = join("world", (0..env.world_size).collect())?;
        let ulysses = join("ulysses", l.ulysses_group(me))?;
        let ring = join("ring", l.ring_group(me))?;
        let dp = join("dp", l.dp_group(me))?;
        store.close();
        health.in_init.store(false, Ordering::Release);
        health.check()?;
        Ok(NcclWorld {
            env,
            world,
            ulysses,
            ring,
            dp,
            health,
            liveness,
            watchdog: Some(watchdog),
        })
    }
}
