//! NCCL and CUDA-driver calls through cudarc (dynamically loaded, so the crate builds and its
//! CPU tests run on machines with no CUDA). Handles are wrapped in owning types whose `Drop`
//! releases them and never panics; every NCCL/CUDA status becomes a `Result`.
use crate::error::{Result, RuntimeError};
use cudarc::driver::{result as dr, sys as dsys};
use cudarc::nccl::{result as nr, sys as ns};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use tch::{Kind, Tensor};

fn nccl_err(what: &str, e: nr::NcclError) -> RuntimeError {
    RuntimeError::Nccl(format!("{what}: {:?}", e.0))
}

fn cuda_err(what: &str, e: dr::DriverError) -> RuntimeError {
    RuntimeError::Cuda(format!("{what}: {:?}", e.0))
}

/// Whether a libnccl can be loaded at all (the loader looks for `libnccl.so` first: put a
/// link to torch's `libnccl.so.2` first on `LD_LIBRARY_PATH`, as `runtime/env.sh` does).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen candidate library names; loads nothing else.
    unsafe { ns::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded.
pub fn cuda_driver_present() -> bool {
    // SAFETY: only tries to dlopen candidate library names.
    unsafe { dsys::is_culib_present() }
}

/// Version of the loaded NCCL as NCCL encodes it (2.28.9 is 22809).
pub fn nccl_version() -> Result<i32> {
    if !nccl_present() {
        return Err(RuntimeError::Nccl("libnccl could not be loaded".into()));
    }
    nr::get_nccl_version().map_err(|e| nccl_err("ncclGetVersion", e))
}

/// A 128-byte NCCL unique id.
pub fn nccl_unique_id() -> Result<Vec<u8>> {
    if !nccl_present() {
        return Err(RuntimeError::Nccl("libnccl could not be loaded".into()));
    }
    let id = nr::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// NCCL element type of a torch kind.
fn nccl_type(kind: Kind) -> Result<ns::ncclDataType_t> {
    Ok(match kind {
        Kind::Float => ns::ncclDataType_t::ncclFloat32,
        Kind::Double => ns::ncclDataType_t::ncclFloat64,
        Kind::Half => ns::ncclDataType_t::ncclFloat16,
        Kind::BFloat16 => ns::ncclDataType_t::ncclBfloat16,
        Kind::Int => ns::ncclDataType_t::ncclInt32,
        Kind::Int64 => ns::ncclDataType_t::ncclInt64,
        Kind::Uint8 => ns::ncclDataType_t::ncclUint8,
        Kind::Int8 => ns::ncclDataType_t::ncclInt8,
        k => return Err(RuntimeError::Nccl(format!("no NCCL type for {k:?}"))),
    })
}

/// Makes the device's primary context current on this thread (the one the CUDA runtime and
/// so libtorch use).
pub fn bind_primary_context(device: usize) -> Result<()> {
    dr::init().map_err(|e| cuda_err("cuInit", e))?;
    let dev = dr::device::get(device as i32).map_err(|e| cuda_err("cuDeviceGet", e))?;
    // SAFETY: retains the primary context of a valid device and makes it current; the
    // context lives as long as the process (libtorch holds it too).
    unsafe {
        let ctx =
            dr::primary_ctx::retain(dev).map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        dr::ctx::set_current(ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
    }
    Ok(())
}

/// A CUDA stream: one this crate created (destroyed on drop) or libtorch's default stream.
pub struct Stream {
    raw: dsys::CUstream,
    owned: bool,
}

// SAFETY: a CUstream handle may be used from any thread of the process.
unsafe impl Send for Stream {}

impl Stream {
    /// A new stream that does not synchronise with the legacy default stream.
    pub fn new_non_blocking() -> Result<Stream> {
        let s = dr::stream::create(dr::stream::StreamKind::NonBlocking)
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        Ok(Stream {
            raw: s,
            owned: true,
        })
    }

    /// The legacy default stream, on which libtorch runs its kernels unless told otherwise.
    pub fn torch_default() -> Stream {
        Stream {
            raw: dr::stream::null(),
            owned: false,
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: the handle came from cuStreamCreate and is destroyed once; errors ignored.
            let _ = unsafe { dr::stream::destroy(self.raw) };
        }
    }
}

/// A CUDA event without timing, used to order one stream after another on the device.
pub struct Event(dsys::CUevent);

// SAFETY: a CUevent handle may be used from any thread of the process.
unsafe impl Send for Event {}

impl Event {
    pub fn new() -> Result<Event> {
        let e = dr::event::create(dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| cuda_err("cuEventCreate", e))?;
        Ok(Event(e))
    }

    /// An event that records a timestamp (for [`Event::elapsed_s`]).
    pub fn timed() -> Result<Event> {
        let e = dr::event::create(dsys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| cuda_err("cuEventCreate", e))?;
        Ok(Event(e))
    }

    /// Whether the work before the last record has completed (never blocks).
    pub fn query(&self) -> Result<bool> {
        // SAFETY: the handle is live for the call.
        match unsafe { dr::event::query(self.0) } {
            Ok(()) => Ok(true),
            Err(dr::DriverError(dsys::cudaError_enum::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(cuda_err("cuEventQuery", e)),
        }
    }

    /// Seconds between two completed timed events recorded on the same stream.
    pub fn elapsed_s(start: &Event, end: &Event) -> Result<f64> {
        // SAFETY: both handles are live, created with timing, and completed (the caller
        // checked `end.query()`; `start` precedes it on the same stream).
        let ms = unsafe { dr::event::elapsed(start.0, end.0) }
            .map_err(|e| cuda_err("cuEventElapsedTime", e))?;
        Ok(f64::from(ms) / 1e3)
    }

    /// Records the event on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: both handles are live for the call.
        unsafe { dr::event::record(self.0, stream.raw) }.map_err(|e| cuda_err("cuEventRecord", e))
    }

    /// Makes `stream` wait on the device (not the host) for the last record of this event.
    pub fn wait_on(&self, stream: &Stream) -> Result<()> {
        // SAFETY: both handles are live for the call.
        unsafe {
            dr::stream::wait_event(
                stream.raw,
                self.0,
                dsys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cuStreamWaitEvent", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the handle came from cuEventCreate and is destroyed once; errors ignored.
        let _ = unsafe { dr::event::destroy(self.0) };
    }
}

const LIVE: u8 = 0;
const ABORTED: u8 = 1;
const DESTROYED: u8 = 2;

/// The raw communicator and who has released it: exactly one of `ncclCommDestroy` (its
/// owner's drop) and `ncclCommAbort` (a watchdog) runs, decided by a compare-and-swap.
struct CommHandle {
    raw: ns::ncclComm_t,
    state: AtomicU8,
}

// SAFETY: the pointer is only passed to NCCL; the functions called from other threads than
// the owner's (ncclCommGetAsyncError, ncclCommAbort) are the ones NCCL documents for use by
// a watchdog thread, and the state guards against use after release.
unsafe impl Send for CommHandle {}
// SAFETY: as above; the state is atomic.
unsafe impl Sync for CommHandle {}

/// One NCCL communicator (one rank of it).
pub struct NcclComm {
    comm: ns::ncclComm_t,
    handle: Arc<CommHandle>,
}

// SAFETY: an NCCL communicator may be used from another thread as long as calls on it are not
// concurrent; `NcclComm` is used through `&self` from one thread (it is `Send`, not `Sync`).
unsafe impl Send for NcclComm {}

/// What a watchdog thread may do to a communicator it does not own: read its asynchronous
/// error and abort it (which makes its pending kernels return and its owner's later drop a
/// no-op).
#[derive(Clone)]
pub struct NcclWatch(Arc<CommHandle>);

impl NcclWatch {
    /// The communicator's asynchronous error (a peer that failed, a network error), if any.
    pub fn async_error(&self) -> Result<()> {
        if self.0.state.load(Ordering::Acquire) != LIVE {
            return Ok(());
        }
        let mut err = ns::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is live (checked just above; a concurrent abort by this
        // same watchdog cannot happen, and the owner destroys it only after stopping the
        // watchdog); `err` is a valid out-pointer.
        let r = unsafe { ns::ncclCommGetAsyncError(self.0.raw, &mut err) };
        if r != ns::ncclResult_t::ncclSuccess {
            return Err(RuntimeError::Nccl(format!("ncclCommGetAsyncError: {r:?}")));
        }
        match err {
            ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress => Ok(()),
            e => Err(RuntimeError::Nccl(format!("asynchronous error {e:?}"))),
        }
    }

    /// Aborts the communicator once; returns whether this call aborted it.
    pub fn abort(&self) -> bool {
        if self
            .0
            .state
            .compare_exchange(LIVE, ABORTED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        // SAFETY: the state moved from live to aborted here, so the communicator has not
        // been destroyed and will not be (its owner's drop sees ABORTED).
        let _ = unsafe { nr::comm_abort(self.0.raw) };
        true
    }

    /// Whether the communicator was aborted.
    pub fn aborted(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == ABORTED
    }
}

/// Where a device buffer for NCCL lives.
struct DevBuf {
    ptr: *mut c_void,
    count: usize,
    kind: Kind,
}

impl NcclComm {
    /// ncclCommInitRank with a unique id from [`nccl_unique_id`] on the group's first rank.
    pub fn init_rank(nranks: usize, id: &[u8], rank: usize) -> Result<NcclComm> {
        if id.len() != 128 {
            return Err(RuntimeError::Nccl(format!(
                "unique id of {} bytes, want 128",
                id.len()
            )));
        }
        let mut uid = ns::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as std::ffi::c_char;
        }
        let mut comm: ns::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is 128 bytes as NCCL wants.
        unsafe { nr::comm_init_rank(&mut comm, nranks as i32, uid, rank as i32) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclComm {
            comm,
            handle: Arc::new(CommHandle {
                raw: comm,
                state: AtomicU8::new(LIVE),
            }),
        })
    }

    /// A handle for a watchdog thread.
    pub fn watch(&self) -> NcclWatch {
        NcclWatch(self.handle.clone())
    }

    fn check_live(&self) -> Result<()> {
        if self.handle.state.load(Ordering::Acquire) != LIVE {
            return Err(RuntimeError::Nccl(
                "the communicator was aborted after a fault".into(),
            ));
        }
        Ok(())
    }

    fn stream(s: &Stream) -> ns::cudaStream_t {
        s.raw as ns::cudaStream_t
    }

    fn group_start(&self) -> Result<()> {
        nr::group_start()
            .map(|_| ())
            .map_err(|e| nccl_err("ncclGroupStart", e))
    }

    fn group_end(&self) -> Result<()> {
        nr::group_end()
            .map(|_| ())
            .map_err(|e| nccl_err("ncclGroupEnd", e))
    }

    /// # Safety
    /// `buf` must describe a live device allocation of `count` elements that stays alive until
    /// the stream has run the operation.
    unsafe fn send(&self, buf: &DevBuf, peer: usize, s: &Stream) -> Result<()> {
        let t = nccl_type(buf.kind)?;
        nr::send(
            buf.ptr,
            buf.count,
            t,
            peer as i32,
            self.comm,
            Self::stream(s),
        )
        .map(|_| ())
        .map_err(|e| nccl_err("ncclSend", e))
    }

    /// # Safety
    /// As for [`NcclComm::send`].
    unsafe fn recv(&self, buf: &DevBuf, peer: usize, s: &Stream) -> Result<()> {
        let t = nccl_type(buf.kind)?;
        nr::recv(
            buf.ptr,
            buf.count,
            t,
            peer as i32,
            self.comm,
            Self::stream(s),
        )
        .map(|_| ())
        .map_err(|e| nccl_err("ncclRecv", e))
    }

    /// Sum all-reduce.
    ///
    /// # Safety
    /// As for [`NcclComm::send`], for both buffers.
    unsafe fn all_reduce(&self, send: &DevBuf, recv: &DevBuf, s: &Stream) -> Result<()> {
        let t = nccl_type(send.kind)?;
        nr::all_reduce(
            send.ptr,
            recv.ptr,
            send.count,
            t,
            ns::ncclRedOp_t::ncclSum,
            self.comm,
            Self::stream(s),
        )
        .map(|_| ())
        .map_err(|e| nccl_err("ncclAllReduce", e))
    }

    /// All-gather of `send.count` elements per rank.
    ///
    /// # Safety
    /// As for [`NcclComm::send`], for both buffers.
    unsafe fn all_gather(&self, send: &DevBuf, recv: &DevBuf, s: &Stream) -> Result<()> {
        let t = nccl_type(send.kind)?;
        nr::all_gather(
            send.ptr,
            recv.ptr,
            send.count,
            t,
            self.comm,
            Self::stream(s),
        )
        .map(|_| ())
        .map_err(|e| nccl_err("ncclAllGather", e))
    }

    /// Sum reduce-scatter to `recv.count` elements per rank.
    ///
    /// # Safety
    /// As for [`NcclComm::send`], for both buffers.
    unsafe fn reduce_scatter(&self, send: &DevBuf, recv: &DevBuf, s: &Stream) -> Result<()> {
        let t = nccl_type(send.kind)?;
        nr::reduce_scatter(
            send.ptr,
            recv.ptr,
            recv.count,
            t,
            ns::ncclRedOp_t::ncclSum,
            self.comm,
            Self::stream(s),
        )
        .map(|_| ())
        .map_err(|e| nccl_err("ncclReduceScatter", e))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let live = self
            .handle
            .state
            .compare_exchange(LIVE, DESTROYED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if live && !self.comm.is_null() {
            // SAFETY: the communicator came from ncclCommInitRank and is destroyed once (the
            // state moved from live to destroyed here, so no watchdog aborted it); errors are
            // ignored (no panic in Drop).
            let _ = unsafe { nr::comm_destroy(self.comm) };
        }
    }
}

/// One operation of a [`NcclComm::launch`] group.
pub enum NcclOp<'a> {
    Send {
        tensor: &'a Tensor,
        peer: usize,
    },
    Recv {
        tensor: &'a Tensor,
        peer: usize,
    },
    /// In-place sum.
    AllReduce {
        tensor: &'a Tensor,
    },
    AllGather {
        send: &'a Tensor,
        recv: &'a Tensor,
    },
    /// Sum; `recv` gets this rank's slice.
    ReduceScatter {
        send: &'a Tensor,
        recv: &'a Tensor,
    },
}

/// Operations queued on a communication stream. Holds the tensors they read and write, so that
/// their memory cannot be handed out again before the compute stream is ordered after them;
/// dropping it without [`InFlight::wait`] still orders libtorch's stream after the operations.
pub struct InFlight {
    done: Option<Event>,
    _keep: Vec<Tensor>,
}

impl InFlight {
    /// Nothing in flight.
    pub fn ready() -> InFlight {
        InFlight {
            done: None,
            _keep: Vec::new(),
        }
    }

    /// Makes libtorch's stream wait (on the device) for the operations.
    pub fn wait(mut self) -> Result<()> {
        match self.done.take() {
            Some(e) => e.wait_on(&Stream::torch_default()),
            None => Ok(()),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(e) = self.done.take() {
            // Errors are ignored: no panic in Drop.
            let _ = e.wait_on(&Stream::torch_default());
        }
    }
}

fn dev_buf(t: &Tensor, device: usize) -> Result<DevBuf> {
    if t.device() != tch::Device::Cuda(device) {
        return Err(RuntimeError::Nccl(format!(
            "tensor on {:?}, communicator on cuda:{device}",
            t.device()
        )));
    }
    if !t.is_contiguous() {
        return Err(RuntimeError::Nccl("NCCL buffers must be contiguous".into()));
    }
    Ok(DevBuf {
        ptr: t.data_ptr(),
        count: t.numel(),
        kind: t.kind(),
    })
}

impl NcclComm {
    /// Queues `ops` as one NCCL group on `stream`, after the work already queued on
    /// libtorch's stream. Every tensor is checked (on `cuda:device`, contiguous) first.
    pub fn launch(&self, device: usize, ops: &[NcclOp<'_>], stream: &Stream) -> Result<InFlight> {
        self.launch_timed(device, ops, stream, None)
    }

    /// As [`NcclComm::launch`]; with `timing`, its two timed events are recorded on `stream`
    /// just before and just after the group (so they bracket the communication itself, not
    /// the wait for libtorch's stream).
    pub fn launch_timed(
        &self,
        device: usize,
        ops: &[NcclOp<'_>],
        stream: &Stream,
        timing: Option<(&Event, &Event)>,
    ) -> Result<InFlight> {
        self.check_live()?;
        let mut bufs = Vec::with_capacity(ops.len());
        let mut keep = Vec::with_capacity(2 * ops.len());
        for op in ops {
            let (a, b) = match op {
                NcclOp::Send { tensor, .. }
                | NcclOp::Recv { tensor, .. }
                | NcclOp::AllReduce { tensor } => (*tensor, None),
                NcclOp::AllGather { send, recv } | NcclOp::ReduceScatter { send, recv } => {
                    (*send, Some(*recv))
                }
            };
            keep.push(a.shallow_clone());
            let bb = match b {
                Some(t) => {
                    keep.push(t.shallow_clone());
                    Some(dev_buf(t, device)?)
                }
                None => None,
            };
            bufs.push((dev_buf(a, device)?, bb));
        }
        let ready = Event::new()?;
        ready.record(&Stream::torch_default())?;
        ready.wait_on(stream)?;
        if let Some((start, _)) = timing {
            start.record(stream)?;
        }
        self.group_start()?;
        let mut res = Ok(());
        for (op, (a, b)) in ops.iter().zip(&bufs) {
            // SAFETY: every buffer is a live, contiguous tensor on this communicator's device
            // (checked above) whose storage `keep` holds until the compute stream is ordered
            // after the group (InFlight::wait or its Drop).
            let r = unsafe {
                match (op, b) {
                    (NcclOp::Send { peer, .. }, _) => self.send(a, *peer, stream),
                    (NcclOp::Recv { peer, .. }, _) => self.recv(a, *peer, stream),
                    (NcclOp::AllReduce { .. }, _) => self.all_reduce(a, a, stream),
                    (NcclOp::AllGather { .. }, Some(b)) => self.all_gather(a, b, stream),
                    (NcclOp::ReduceScatter { .. }, Some(b)) => self.reduce_scatter(a, b, stream),
                    _ => Err(RuntimeError::Nccl(
                        "collective without its second buffer".into(),
                    )),
                }
            };
            if let Err(e) = r {
                res = Err(e);
                break;
            }
        }
        // Always close the group, even when an operation failed to enqueue.
        let end = self.group_end();
        res?;
        end?;
        if let Some((_, stop)) = timing {
            stop.record(stream)?;
        }
        let done = Event::new()?;
        done.record(stream)?;
        Ok(InFlight {
            done: Some(done),
            _keep: keep,
        })
    }
}
