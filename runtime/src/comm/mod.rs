//! Collective communication between ranks: the [`Communicator`] trait, its in-process
//! implementation ([`local`], threads as ranks) and its NCCL implementation ([`nccl`], one
//! process per GPU, with a TCP rendezvous as torchrun sets it up).
//!
//! Faults: a collective never hangs. A rank that fails or leaves makes its peers' pending and
//! later collectives fail with [`RuntimeError::PeerGone`] naming it, and a collective whose
//! peers do not arrive fails with [`RuntimeError::Timeout`] after its timeout
//! ([`timeout::CommTimeout`]: `MMSP_COMM_TIMEOUT_S` when set; otherwise
//! [`DEFAULT_COMM_TIMEOUT_S`] while a run starts and saves, and a multiple of its longest step
//! once steps run).
pub mod local;
pub mod nccl;
pub mod rendezvous;
pub mod timeout;

pub use timeout::CommTimeout;

use crate::error::{Result, RuntimeError};
use crate::ffi::cuda::InFlight;
use std::time::Duration;
use tch::Tensor;

/// How long a collective waits for its peers while a run starts (and during saves) unless
/// told otherwise ([`crate::knobs::Knobs::comm_timeout`], `MMSP_COMM_TIMEOUT_S` in the
/// binary); see [`timeout`] for the limit once steps run.
pub const DEFAULT_COMM_TIMEOUT_S: f64 = 300.0;

/// [`DEFAULT_COMM_TIMEOUT_S`] as a duration.
pub fn default_comm_timeout() -> Duration {
    Duration::from_secs_f64(DEFAULT_COMM_TIMEOUT_S)
}

/// One point-to-point operation of a batched [`Communicator::send_recv`]. Tensors are
/// (shallow) handles; a receive writes into the storage of its tensor.
pub enum P2p {
    Send { peer: usize, tensor: Tensor },
    Recv { peer: usize, tensor: Tensor },
}

/// An operation that has been issued. Its results are safe to use on the compute stream
/// after [`Work::wait`], which makes the compute stream (not the host) wait.
#[must_use = "call wait() before using the received tensors"]
pub struct Work(InFlight);

impl Work {
    /// An operation that already completed (in-process communicator).
    pub fn done() -> Work {
        Work(InFlight::ready())
    }

    /// Operations queued on a communication stream.
    pub fn pending(inflight: InFlight) -> Work {
        Work(inflight)
    }

    /// Orders the compute stream after the operation (a device-side wait; the host does not
    /// block).
    pub fn wait(self) -> Result<()> {
        self.0.wait()
    }
}

/// Collectives over a fixed group of ranks. Every rank of the group must make the same
/// sequence of calls (as with NCCL); element types and sizes must agree between peers.
pub trait Communicator: Send {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// All-to-all with uneven splits: `send[i]` goes to rank i and `recv[i]` is filled from
    /// rank i; the element counts of `send[i]` on rank j and `recv[j]` on rank i must match.
    fn all_to_all(&self, send: &[Tensor], recv: &[Tensor]) -> Result<Work>;
    /// A batch of sends and receives issued together.
    fn send_recv(&self, ops: &[P2p]) -> Result<Work>;
    /// Concatenates every rank's `send` along dim 0 into `recv` (`size` times as long).
    fn all_gather(&self, send: &Tensor, recv: &Tensor) -> Result<()>;
    /// Sums `send` (`size` slices along dim 0) over ranks; this rank's slice goes to `recv`.
    fn reduce_scatter(&self, send: &Tensor, recv: &Tensor) -> Result<()>;
    /// Sums `t` over ranks, in place.
    fn all_reduce(&self, t: &Tensor) -> Result<()>;
    /// [`Communicator::all_gather`], issued without ordering the compute stream after it: the
    /// caller keeps `send` and `recv` alive and calls [`Work::wait`] before reading `recv`
    /// (prefetching a layer's weights while another layer computes). The in-process
    /// communicator completes it before returning.
    fn all_gather_async(&self, send: &Tensor, recv: &Tensor) -> Result<Work> {
        self.all_gather(send, recv).map(|()| Work::done())
    }
    /// [`Communicator::reduce_scatter`], issued as [`Communicator::all_gather_async`] is.
    fn reduce_scatter_async(&self, send: &Tensor, recv: &Tensor) -> Result<Work> {
        self.reduce_scatter(send, recv).map(|()| Work::done())
    }
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Seconds spent in this communicator's completed operations so far: host time inside
    /// the calls for the in-process communicator (waiting for peers included), device time
    /// between events around each group on the communication stream for NCCL.
    fn comm_time_s(&self) -> f64 {
        0.0
    }
    /// A failure of a peer (or of the group) already known without a collective: a rank
    /// that failed or left, a timeout or a fault seen by a watchdog. Lets a rank that is
    /// busy elsewhere stop early.
    fn peer_failure(&self) -> Option<RuntimeError> {
        None
    }
}

/// Checks that `recv` has room for `n` copies of `send` along dim 0.
pub(crate) fn check_gather_shapes(
    send: &Tensor,
    recv: &Tensor,
    n: usize,
    what: &str,
) -> Result<()> {
    let (s, r) = (send.size(), recv.size());
    let ok = !s.is_empty()
        && s.len() == r.len()
        && r[0] == s[0] * n as i64
        && s[1..] == r[1..]
        && send.kind() == recv.kind();
    if !ok {
        return Err(RuntimeError::Shape(format!(
            "{what}: big tensor {r:?} {:?} must be {n} x small tensor {s:?} {:?} along dim 0",
            recv.kind(),
            send.kind()
        )));
    }
    Ok(())
}
