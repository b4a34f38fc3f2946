//! NCCL communicator, one process per GPU, launched as torchrun does (RANK, WORLD_SIZE,
//! LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Unique ids go through the TCP [`Rendezvous`]; one
//! communicator is made for the world and one for each of the plan's Ulysses, ring and DP
//! groups this rank belongs to. Operations run on the communicator's own CUDA stream, ordered
//! after the work already queued on libtorch's stream through an event, and the caller's
//! [`Work::wait`] orders libtorch's stream after them: the host never waits for the device.
use super::rendezvous::Rendezvous;
use super::{check_buffer, check_gather_shapes, Communicator, P2p, Work};
use crate::error::{Result, RuntimeError};
use crate::ffi::cuda::{self, DevBuf, Event, NcclComm, Stream};
use crate::plan::Plan;
use std::time::Duration;
use tch::{Device, Tensor};

/// One rank of one NCCL group.
pub struct NcclCommunicator {
    comm: NcclComm,
    rank: usize,
    size: usize,
    device: usize,
    stream: Stream,
}

fn buf(t: &Tensor, device: usize, what: &str) -> Result<DevBuf> {
    check_buffer(t, what)?;
    if t.device() != Device::Cuda(device) {
        return Err(RuntimeError::Comm(format!(
            "{what}: tensor on {:?}, communicator on cuda:{device}",
            t.device()
        )));
    }
    Ok(DevBuf {
        ptr: t.data_ptr(),
        count: t.numel(),
        kind: t.kind(),
    })
}

impl NcclCommunicator {
    /// Joins a group of `size` ranks as `rank` with the given unique id.
    pub fn new(id: &[u8], rank: usize, size: usize, device: usize) -> Result<NcclCommunicator> {
        cuda::bind_primary_context(device)?;
        let comm = NcclComm::init_rank(size, id, rank)?;
        Ok(NcclCommunicator {
            comm,
            rank,
            size,
            device,
            stream: Stream::new_non_blocking()?,
        })
    }

    /// Runs `issue` on the communication stream after the work queued so far on libtorch's
    /// stream, and returns a handle that orders libtorch's stream after it.
    fn issue(&self, keep: Vec<Tensor>, issue: impl FnOnce(&Stream) -> Result<()>) -> Result<Work> {
        let ready = Event::new()?;
        ready.record(&Stream::torch_default())?;
        ready.wait_on(&self.stream)?;
        self.comm.group_start()?;
        let r = issue(&self.stream);
        // Always close the group, even when an operation failed to enqueue.
        let end = self.comm.group_end();
        r?;
        end?;
        let done = Event::new()?;
        done.record(&self.stream)?;
        Ok(Work::pending(done, keep))
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
        let sb: Vec<DevBuf> = send
            .iter()
            .map(|t| buf(t, self.device, "all_to_all send"))
            .collect::<Result<_>>()?;
        let rb: Vec<DevBuf> = recv
            .iter()
            .map(|t| buf(t, self.device, "all_to_all recv"))
            .collect::<Result<_>>()?;
        let keep = send.iter().chain(recv).map(|t| t.shallow_clone()).collect();
        self.issue(keep, |s| {
            for p in 0..self.size {
                // SAFETY: the buffers are live, contiguous CUDA tensors on this device, kept
                // alive by the returned Work until the compute stream is ordered after them.
                unsafe {
                    self.comm.send(&sb[p], p, s)?;
                    self.comm.recv(&rb[p], p, s)?;
                }
            }
            Ok(())
        })
    }

    fn send_recv(&self, ops: &[P2p]) -> Result<Work> {
        let mut bufs = Vec::with_capacity(ops.len());
        let mut keep = Vec::with_capacity(ops.len());
        for op in ops {
            let (peer, t, is_send) = match op {
                P2p::Send { peer, tensor } => (*peer, tensor, true),
                P2p::Recv { peer, tensor } => (*peer, tensor, false),
            };
            self.check_peer(peer)?;
            bufs.push((buf(t, self.device, "send_recv")?, peer, is_send));
            keep.push(t.shallow_clone());
        }
        self.issue(keep, |s| {
            for (b, peer, is_send) in &bufs {
                // SAFETY: as in all_to_all: live contiguous device buffers kept by the Work.
                unsafe {
                    if *is_send {
                        self.comm.send(b, *peer, s)?;
                    } else {
                        self.comm.recv(b, *peer, s)?;
                    }
                }
            }
            Ok(())
        })
    }

    fn all_gather(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        check_gather_shapes(send, recv, self.size, "all_gather")?;
        let (sb, rb) = (
            buf(send, self.device, "all_gather")?,
            buf(recv, self.device, "all_gather")?,
        );
        // SAFETY: live contiguous device buffers of matching sizes, kept by the Work.
        self.issue(
            vec![send.shallow_clone(), recv.shallow_clone()],
            |s| unsafe { self.comm.all_gather(&sb, &rb, s) },
        )?
        .wait()
    }

    fn reduce_scatter(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        check_gather_shapes(recv, send, self.size, "reduce_scatter")?;
        let (sb, rb) = (
            buf(send, self.device, "reduce_scatter")?,
            buf(recv, self.device, "reduce_scatter")?,
        );
        // SAFETY: live contiguous device buffers of matching sizes, kept by the Work.
        self.issue(
            vec![send.shallow_clone(), recv.shallow_clone()],
            |s| unsafe { self.comm.reduce_scatter(&sb, &rb, s) },
        )?
        .wait()
    }

    fn all_reduce(&self, t: &Tensor) -> Result<()> {
        let b = buf(t, self.device, "all_reduce")?;
        // SAFETY: in-place all-reduce on a live contiguous device buffer kept by the Work.
        self.issue(vec![t.shallow_clone()], |s| unsafe {
            self.comm.all_reduce(&b, &b, s)
        })?
        .wait()
    }

    fn barrier(&self) -> Result<()> {
        let t = Tensor::zeros([1], (tch::Kind::Float, Device::Cuda(self.device)));
        self.all_reduce(&t)?;
        // The host waits here, and only here.
        let _ = t.double_value(&[]);
        Ok(())
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
    /// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
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
        let e = LaunchEnv {
            rank: num("RANK")?,
            world_size: num("WORLD_SIZE")?,
            local_rank: num("LOCAL_RANK")?,
            master_addr: var("MASTER_ADDR")?,
            master_port: num("MASTER_PORT")?,
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

/// This process's communicators for a plan.
pub struct NcclWorld {
    pub env: LaunchEnv,
    pub world: NcclCommunicator,
    pub ulysses: NcclCommunicator,
    pub ring: NcclCommunicator,
    pub dp: NcclCommunicator,
}

impl NcclWorld {
    /// Checks the plan against the launch, then builds the world and the plan's groups.
    /// Every check that can fail without talking to other ranks runs first.
    pub fn init(plan: &Plan, env: LaunchEnv, timeout: Duration) -> Result<NcclWorld> {
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
            NcclCommunicator::new(&id, idx, group.len(), env.local_rank)
        };
        // Each phase partitions the world, so creating them in this order cannot deadlock.
        let world = join("world", (0..env.world_size).collect())?;
        let ulysses = join("ulysses", l.ulysses_group(me))?;
        let ring = join("ring", l.ring_group(me))?;
        let dp = join("dp", l.dp_group(me))?;
        Ok(NcclWorld {
            env,
            world,
            ulysses,
            ring,
            dp,
        })
    }
}
