//! NCCL communicator, one process per GPU, launched as torchrun does (RANK, WORLD_SIZE,
//! LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Unique ids go through the TCP [`Rendezvous`]; one
//! communicator is made for the world and one for each of the plan's Ulysses, ring and DP
//! groups this rank belongs to. Operations run on the communicator's own CUDA stream, ordered
//! after the work already queued on libtorch's stream through an event, and the caller's
//! [`Work::wait`] orders libtorch's stream after them: the host never waits for the device.
use super::rendezvous::Rendezvous;
use super::{check_gather_shapes, Communicator, P2p, Work};
use crate::error::{Result, RuntimeError};
use crate::ffi::cuda::{self, NcclComm, NcclOp, Stream};
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

    fn launch(&self, ops: &[NcclOp<'_>]) -> Result<Work> {
        Ok(Work::pending(self.comm.launch(
            self.device,
            ops,
            &self.stream,
        )?))
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
        self.launch(&ops)
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
        self.launch(&nops)
    }

    fn all_gather(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        check_gather_shapes(send, recv, self.size, "all_gather")?;
        self.launch(&[NcclOp::AllGather { send, recv }])?.wait()
    }

    fn reduce_scatter(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        check_gather_shapes(recv, send, self.size, "reduce_scatter")?;
        self.launch(&[NcclOp::ReduceScatter { send, recv }])?.wait()
    }

    fn all_reduce(&self, t: &Tensor) -> Result<()> {
        self.launch(&[NcclOp::AllReduce { tensor: t }])?.wait()
    }

    fn barrier(&self) -> Result<()> {
        let t = Tensor::zeros([1], (tch::Kind::Float, Device::Cuda(self.device)));
        self.all_reduce(&t)?;
        // The host waits here, and only here.
        let _ = t.f_double_value(&[])?;
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
