//! All `unsafe` foreign calls of the crate: the C++ attention shim (`csrc/attn_shim.cpp`)
//! and, in [`cuda`], NCCL and the CUDA driver through cudarc. Every return code becomes a
//! [`crate::Result`] here; nothing above this module touches raw pointers.
pub mod cuda;

use crate::error::{Result, RuntimeError};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    /// The C library's `_exit`: ends the process at once, without atexit handlers (which may
    /// block in CUDA or NCCL teardown after a peer died).
    fn _exit(code: c_int) -> !;
}

/// Ends the process now with `code`, running no destructors or atexit handlers: the last
/// resort of the fault watchdog when NCCL or the device is blocked on a dead peer.
pub fn hard_exit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: `_exit` takes an int and never returns; skipping destructors is the intent.
    unsafe { _exit(code) }
}

extern "C" {
    /// The C library's `atexit` and `shutdown(2)`.
    fn atexit(f: extern "C" fn()) -> c_int;
    fn shutdown(fd: c_int, how: c_int) -> c_int;
}

/// `SHUT_RDWR` of `<sys/socket.h>` (Linux).
const SHUT_RDWR: c_int = 2;

/// The socket [`shutdown_on_exit`] ends at exit (-1: none).
static EXIT_SOCKET: AtomicI32 = AtomicI32::new(-1);
static EXIT_HOOK: Once = Once::new();

/// The atexit handler: shuts the registered socket down, so that the peer sees it close now
/// rather than when the process has finished tearing down (CUDA and NCCL teardown after a
/// failure can block for many seconds while the process, and so its sockets, live on).
pub extern "C" fn exit_hook() {
    let fd = EXIT_SOCKET.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: shutdown(2) on a descriptor this process registered and has not closed
        // (the owner clears it before closing, `forget_exit_socket`); it only changes the
        // socket's state, and its result is of no use at exit.
        let _ = unsafe { shutdown(fd, SHUT_RDWR) };
    }
}

/// Shuts `fd` (a connected socket) down first thing when the process exits through `exit`
/// (returning from main, `std::process::exit`): registered after libtorch and NCCL are
/// loaded, the handler runs before their teardown. One socket per process; a later call
/// replaces it.
pub fn shutdown_on_exit(fd: c_int) -> Result<()> {
    EXIT_SOCKET.store(fd, Ordering::Release);
    let mut rc = 0;
    // SAFETY: registers a plain `extern "C" fn()` with no captured state, once per process.
    EXIT_HOOK.call_once(|| rc = unsafe { atexit(exit_hook) });
    if rc != 0 {
        return Err(RuntimeError::Comm(format!(
            "atexit failed (return code {rc})"
        )));
    }
    Ok(())
}

/// Unregisters `fd` (about to be closed) if it is the one [`shutdown_on_exit`] holds.
pub fn forget_exit_socket(fd: c_int) {
    let _ = EXIT_SOCKET.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire);
}

extern "C" {
    fn mmsp_free_error(p: *mut c_char);
    fn mmsp_attn_fwd(
        backend: c_int,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        causal: c_int,
        scale: f64,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn mmsp_attn_bwd(
        backend: c_int,
        dout: *const C_tensor,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        out: *const C_tensor,
        lse: *const C_tensor,
        causal: c_int,
        scale: f64,
        dq: *mut *mut C_tensor,
        dk: *mut *mut C_tensor,
        dv: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mmsp_stream_use_pool(device: c_int) -> *mut c_char;
    fn mmsp_stream_use_default(device: c_int) -> *mut c_char;
    fn mmsp_stream_sync_current(device: c_int) -> *mut c_char;
    fn mmsp_event_new(out: *mut *mut c_void) -> *mut c_char;
    fn mmsp_event_free(ev: *mut c_void);
    fn mmsp_event_record(ev: *mut c_void, device: c_int) -> *mut c_char;
    fn mmsp_event_block(ev: *mut c_void, device: c_int) -> *mut c_char;
    fn mmsp_event_synchronize(ev: *mut c_void) -> *mut c_char;
    fn mmsp_event_elapsed_ms(start: *mut c_void, end: *mut c_void, ms: *mut f64) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn mmsp_flash_varlen_fwd(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        cu_q: *const C_tensor,
        cu_k: *const C_tensor,
        seqused_k: *const C_tensor,
        max_q: i64,
        max_k: i64,
        scale: f64,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Turns the shim's error pointer into a `Result`, freeing the message.
fn check(err: *mut c_char, what: &str) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim; we copy it
    // and hand it back to the shim's free exactly once.
    let msg = unsafe {
        let m = CStr::from_ptr(err).to_string_lossy().into_owned();
        mmsp_free_error(err);
        m
    };
    Err(RuntimeError::Torch(format!("{what}: {msg}")))
}

/// Wraps a tensor pointer the shim allocated; null becomes an error.
fn own(p: *mut C_tensor, what: &str) -> Result<Tensor> {
    if p.is_null() {
        return Err(RuntimeError::Torch(format!(
            "{what}: shim returned a null tensor"
        )));
    }
    // SAFETY: the shim returned a fresh heap `at::Tensor*` that nobody else owns; tch takes
    // ownership and frees it with at_free on drop.
    Ok(unsafe { Tensor::from_ptr(p) })
}

/// Attention forward through the shim. `backend`: 0 CPU math, 1 flash, 2 cuDNN.
/// Returns (out, lse) with lse of shape (B, H, Sq).
pub fn attn_fwd(
    backend: i32,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut lse: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: q, k, v are live tch tensors whose pointers stay valid for the call; the two
    // out-pointers are written by the shim (null on error).
    let err = unsafe {
        mmsp_attn_fwd(
            backend,
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            c_int::from(causal),
            scale,
            &mut out,
            &mut lse,
        )
    };
    check(err, "attention forward")?;
    Ok((
        own(out, "attention forward")?,
        own(lse, "attention forward")?,
    ))
}

/// Attention backward through the shim, given the (global) output and log-sum-exp of the
/// rows of q. Returns (dq, dk, dv).
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd(
    backend: i32,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut dq: *mut C_tensor = std::ptr::null_mut();
    let mut dk: *mut C_tensor = std::ptr::null_mut();
    let mut dv: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: all inputs are live tch tensors for the duration of the call; the shim writes
    // the three out-pointers (null on error).
    let err = unsafe {
        mmsp_attn_bwd(
            backend,
            dout.as_ptr(),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            out.as_ptr(),
            lse.as_ptr(),
            c_int::from(causal),
            scale,
            &mut dq,
            &mut dk,
            &mut dv,
        )
    };
    check(err, "attention backward")?;
    Ok((
        own(dq, "attention backward")?,
        own(dk, "attention backward")?,
        own(dv, "attention backward")?,
    ))
}

fn device_index(device: usize) -> Result<c_int> {
    c_int::try_from(device)
        .map_err(|_| RuntimeError::Cuda(format!("device index {device} out of range")))
}

/// Makes the calling thread's current libtorch stream on `cuda:device` one from libtorch's
/// stream pool: later kernels of this thread on that device go there. For in-process ranks
/// sharing one GPU; data that another thread reads must be synchronised explicitly
/// ([`sync_current_stream`]).
pub fn use_pool_stream(device: usize) -> Result<()> {
    let d = device_index(device)?;
    // SAFETY: plain call with an integer; the shim reports failures as an error string.
    check(unsafe { mmsp_stream_use_pool(d) }, "setting a pool stream")
}

/// Makes the calling thread's current stream on `cuda:device` the default stream again.
pub fn use_default_stream(device: usize) -> Result<()> {
    let d = device_index(device)?;
    // SAFETY: plain call with an integer; the shim reports failures as an error string.
    check(
        unsafe { mmsp_stream_use_default(d) },
        "setting the default stream",
    )
}

/// Blocks the host until the calling thread's current stream on `cuda:device` is idle.
pub fn sync_current_stream(device: usize) -> Result<()> {
    let d = device_index(device)?;
    // SAFETY: plain call with an integer; the shim reports failures as an error string.
    check(
        unsafe { mmsp_stream_sync_current(d) },
        "synchronising the stream",
    )
}

/// A CUDA event with timing, recorded on the calling thread's current stream.
pub struct TimingEvent(*mut c_void);

// SAFETY: the handle is a heap `c10::Event` that any thread may record, wait on or free; the
// wrapper is not `Sync`, so two threads never use one event at the same time.
unsafe impl Send for TimingEvent {}

impl TimingEvent {
    /// A new, unrecorded event.
    pub fn new() -> Result<TimingEvent> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the shim writes a fresh heap `c10::Event*` into `p` (null on error).
        check(unsafe { mmsp_event_new(&mut p) }, "creating a CUDA event")?;
        if p.is_null() {
            return Err(RuntimeError::Cuda(
                "CUDA event creation returned null".into(),
            ));
        }
        Ok(TimingEvent(p))
    }

    /// Records the event on this thread's current stream of `cuda:device`.
    pub fn record(&self, device: usize) -> Result<()> {
        let d = device_index(device)?;
        // SAFETY: self.0 is a live event owned by self.
        check(
            unsafe { mmsp_event_record(self.0, d) },
            "recording a CUDA event",
        )
    }

    /// Makes this thread's current stream of `cuda:device` wait, on the device, for the
    /// work before the event's last record (on whichever stream that was).
    pub fn block(&self, device: usize) -> Result<()> {
        let d = device_index(device)?;
        // SAFETY: self.0 is a live event owned by self.
        check(
            unsafe { mmsp_event_block(self.0, d) },
            "waiting on a CUDA event",
        )
    }

    /// Waits on the host for the work before the event's last record (at once if never
    /// recorded).
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: self.0 is a live event owned by self.
        check(
            unsafe { mmsp_event_synchronize(self.0) },
            "waiting for a CUDA event",
        )
    }

    /// Waits (host) for `end`, then returns the milliseconds from `self` to `end`.
    pub fn elapsed_ms(&self, end: &TimingEvent) -> Result<f64> {
        let mut ms = 0.0f64;
        // SAFETY: both events are live and owned by their wrappers; `ms` is a valid out-pointer.
        check(
            unsafe { mmsp_event_elapsed_ms(self.0, end.0, &mut ms) },
            "reading CUDA event time",
        )?;
        Ok(ms)
    }
}

impl Drop for TimingEvent {
    fn drop(&mut self) {
        // SAFETY: self.0 came from mmsp_event_new and is freed exactly once, here.
        unsafe { mmsp_event_free(self.0) }
    }
}

/// Varlen FlashAttention forward over sequences whose used key counts are on the device:
/// q (total_q, Hq, D), k and v (total_k, Hkv, D), `cu_q`/`cu_k` the int32 start rows
/// (batch + 1), `seqused_k` the int32 keys used per sequence. Returns out (total_q, Hq, D)
/// and lse (Hq, total_q) in float32; a sequence with no keys used has a non-finite lse.
#[allow(clippy::too_many_arguments)]
pub fn flash_varlen_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_q: &Tensor,
    cu_k: &Tensor,
    seqused_k: &Tensor,
    max_q: i64,
    max_k: i64,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut lse: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: all inputs are live tch tensors for the duration of the call; the shim writes
    // both out-pointers (null on error).
    let err = unsafe {
        mmsp_flash_varlen_fwd(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            cu_q.as_ptr(),
            cu_k.as_ptr(),
            seqused_k.as_ptr(),
            max_q,
            max_k,
            scale,
            &mut out,
            &mut lse,
        )
    };
    check(err, "varlen FlashAttention forward")?;
    Ok((
        own(out, "varlen FlashAttention forward")?,
        own(lse, "varlen FlashAttention forward")?,
    ))
}

extern "C" {
    fn mmsp_pinned_i64(n: i64, out: *mut *mut C_tensor) -> *mut c_char;
}

/// A zeroed int64 host tensor of `n` elements in pinned memory (copies from it to a device
/// are queued without the host waiting).
pub fn pinned_i64(n: i64) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the shim writes the out-pointer (null on error).
    check(
        unsafe { mmsp_pinned_i64(n, &mut out) },
        "allocating pinned memory",
    )?;
    own(out, "allocating pinned memory")
}

// ---- CUDA graphs (`csrc/graph_shim.cpp`): ATen's CUDAGraph. ----

extern "C" {
    fn mmsp_graph_new(out: *mut *mut c_void) -> *mut c_char;
    fn mmsp_graph_free(g: *mut c_void);
    fn mmsp_graph_begin(g: *mut c_void, device: c_int) -> *mut c_char;
    fn mmsp_graph_end(g: *mut c_void) -> *mut c_char;
    fn mmsp_graph_replay(g: *mut c_void) -> *mut c_char;
    fn mmsp_graph_available() -> c_int;
}

/// Whether this build has CUDA graphs (it was built with the CUDA runtime headers).
pub fn cuda_graphs_built() -> bool {
    // SAFETY: a plain call returning a constant.
    unsafe { mmsp_graph_available() != 0 }
}

/// A captured chain of libtorch CUDA work, replayed with one launch (ATen's `CUDAGraph`).
/// Tensors allocated while capturing live in the graph's private memory pool; the caller
/// keeps the inputs it refills before each replay and the outputs it reads after.
pub struct CudaGraph(*mut c_void);

// SAFETY: the handle is a heap `at::cuda::CUDAGraph` that any one thread may use; the
// wrapper is not `Sync`, so two threads never use it at the same time.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Captures what `work` queues on `cuda:device` from this thread (nothing runs while
    /// capturing). The capture is ended whether or not `work` succeeds; a failure of either
    /// is an error and no graph.
    pub fn capture<T>(device: usize, work: impl FnOnce() -> Result<T>) -> Result<(CudaGraph, T)> {
        let d = device_index(device)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the shim writes a fresh heap graph into `p` (null on error).
        check(unsafe { mmsp_graph_new(&mut p) }, "creating a CUDA graph")?;
        if p.is_null() {
            return Err(RuntimeError::Cuda(
                "CUDA graph creation returned null".into(),
            ));
        }
        let g = CudaGraph(p);
        // SAFETY: g.0 is a live graph owned by g.
        check(
            unsafe { mmsp_graph_begin(g.0, d) },
            "beginning a CUDA graph capture",
        )?;
        let out = work();
        // SAFETY: g.0 is live and capturing; ending restores the thread's former stream.
        let ended = check(
            unsafe { mmsp_graph_end(g.0) },
            "ending a CUDA graph capture",
        );
        let out = out?;
        ended?;
        Ok((g, out))
    }

    /// Replays the captured work on this thread's current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: self.0 is a live, captured graph owned by self.
        check(
            unsafe { mmsp_graph_replay(self.0) },
            "replaying a CUDA graph",
        )
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: self.0 came from mmsp_graph_new and is freed exactly once, here.
        unsafe { mmsp_graph_free(self.0) }
    }
}

// ---- Training shim (`csrc/optim_shim.cpp`): fused AdamW and seeded multi-root backward. ----

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn mmsp_fused_adamw(
        param: *const C_tensor,
        grad: *const C_tensor,
        exp_avg: *const C_tensor,
        exp_avg_sq: *const C_tensor,
        step: *const C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        chunk: i64,
    ) -> *mut c_char;
    fn mmsp_backward(
        tensors: *const *const C_tensor,
        grads: *const *const C_tensor,
        n: c_int,
    ) -> *mut c_char;
    fn mmsp_swiglu(
        gate: *const C_tensor,
        up: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mmsp_storage_resize(t: *const C_tensor, nbytes: i64) -> *mut c_char;
    fn mmsp_storage_nbytes(t: *const C_tensor, out: *mut i64) -> *mut c_char;
    fn mmsp_tensor_version(t: *const C_tensor, out: *mut i64) -> *mut c_char;
    fn mmsp_set_tensor_version(t: *const C_tensor, v: i64) -> *mut c_char;
}

/// silu(gate) * up as one autograd node that keeps gate and up and recomputes silu(gate) in
/// its backward (the graph holds 2 of the MLP's intermediates, not 3).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: gate and up are live tch tensors for the call; the shim writes the out-pointer
    // (a fresh heap tensor, null on error).
    let err = unsafe { mmsp_swiglu(gate.as_ptr(), up.as_ptr(), &mut out) };
    check(err, "swiglu")?;
    own(out, "swiglu")
}

/// Sets the storage behind `t` to `nbytes` bytes in place: 0 releases its memory, more
/// allocates fresh memory of undefined contents (on CUDA from the caching allocator, on the
/// current stream). Every tensor sharing the storage (views, autograd's saved tensors) sees
/// it: the FSDP way of freeing gathered weights between a layer's forward and backward.
pub fn storage_resize(t: &Tensor, nbytes: i64) -> Result<()> {
    // SAFETY: `t` is a live tch tensor for the call; the shim swaps the storage's data
    // pointer through c10's own API and keeps no pointer.
    let err = unsafe { mmsp_storage_resize(t.as_ptr(), nbytes) };
    check(err, "storage resize")
}

/// The bytes of the storage behind `t` (0 after [`storage_resize`] to 0).
pub fn storage_nbytes(t: &Tensor) -> Result<i64> {
    let mut out = 0i64;
    // SAFETY: `t` is a live tch tensor for the call; `out` is a valid out-pointer.
    let err = unsafe { mmsp_storage_nbytes(t.as_ptr(), &mut out) };
    check(err, "storage size")?;
    Ok(out)
}

/// The autograd version counter of `t`, shared with its views.
pub fn tensor_version(t: &Tensor) -> Result<i64> {
    let mut out = 0i64;
    // SAFETY: `t` is a live tch tensor for the call; `out` is a valid out-pointer.
    let err = unsafe { mmsp_tensor_version(t.as_ptr(), &mut out) };
    check(err, "tensor version")?;
    Ok(out)
}

/// Sets the autograd version counter of `t` (and its views) back to `v`: after refilling
/// released weights with the values they had, so that the backward's saved views stay valid.
pub fn set_tensor_version(t: &Tensor, v: i64) -> Result<()> {
    // SAFETY: `t` is a live tch tensor for the call; the shim sets the counter through c10's
    // own API and keeps no pointer.
    let err = unsafe { mmsp_set_tensor_version(t.as_ptr(), v) };
    check(err, "set tensor version")
}

/// AdamW hyper-parameters of one fused update (torch.optim.AdamW semantics, decoupled decay).
#[derive(Debug, Clone, Copy)]
pub struct FusedAdamWArgs {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// In-place `at::_fused_adamw_` over equal-length 1-D contiguous buffers (`param`, `grad`,
/// `m`, `v`), split into views of at most `chunk` elements and updated by one multi-tensor
/// kernel launch (CUDA) or loop (CPU). `step` is a one-element float32 tensor on the same
/// device holding the (already incremented) step number.
pub fn fused_adamw(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: &Tensor,
    a: FusedAdamWArgs,
    chunk: i64,
) -> Result<()> {
    // SAFETY: all five are live tch tensors for the duration of the call; the shim mutates
    // param, m and v in place through ATen (no pointer is kept after it returns).
    let err = unsafe {
        mmsp_fused_adamw(
            param.as_ptr(),
            grad.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            step.as_ptr(),
            a.lr,
            a.beta1,
            a.beta2,
            a.weight_decay,
            a.eps,
            chunk,
        )
    };
    check(err, "fused AdamW")
}

/// Backward from several roots at once, each seeded with its output gradient (same shape and
/// dtype as the root): one traversal of the graph, gradients accumulated into the leaves.
pub fn backward_seeded(pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    for (t, g) in pairs {
        if t.size() != g.size() || t.kind() != g.kind() {
            return Err(RuntimeError::Shape(format!(
                "backward seed {:?} {:?} for a root {:?} {:?}",
                g.size(),
                g.kind(),
                t.size(),
                t.kind()
            )));
        }
    }
    let ts: Vec<*const C_tensor> = pairs.iter().map(|(t, _)| t.as_ptr()).collect();
    let gs: Vec<*const C_tensor> = pairs.iter().map(|(_, g)| g.as_ptr()).collect();
    // SAFETY: both arrays hold `pairs.len()` pointers to live tch tensors borrowed for the
    // call; the shim copies the tensor handles before running the backward.
    let err = unsafe { mmsp_backward(ts.as_ptr(), gs.as_ptr(), ts.len() as c_int) };
    check(err, "backward")
}

// ---- Diagnostics shim (`csrc/diag_shim.cpp`): allocator statistics, the Kineto profiler,
// deterministic algorithms. ----

extern "C" {
    fn mmsp_alloc_stats(device: c_int, out: *mut i64) -> *mut c_char;
    fn mmsp_alloc_reset_peak(device: c_int) -> *mut c_char;
    fn mmsp_kernel_profile_start() -> *mut c_char;
    fn mmsp_kernel_profile_stop(trace_path: *const c_char, tsv_path: *const c_char) -> *mut c_char;
    fn mmsp_set_deterministic(on: c_int) -> *mut c_char;
}

/// The CUDA caching allocator's bytes on one device: tensors' (allocated) and the allocator's
/// whole holding (reserved), now and at their peak since the last [`alloc_reset_peak`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AllocStats {
    pub allocated: i64,
    pub allocated_peak: i64,
    pub reserved: i64,
    pub reserved_peak: i64,
}

/// The caching allocator's statistics of CUDA device `device`.
pub fn alloc_stats(device: usize) -> Result<AllocStats> {
    let mut out = [0i64; 4];
    // SAFETY: `out` has the four slots the shim writes; the pointer is not kept.
    let err = unsafe { mmsp_alloc_stats(device as c_int, out.as_mut_ptr()) };
    check(err, "allocator statistics")?;
    Ok(AllocStats {
        allocated: out[0],
        allocated_peak: out[1],
        reserved: out[2],
        reserved_peak: out[3],
    })
}

/// Resets the allocator's peak statistics of CUDA device `device`.
pub fn alloc_reset_peak(device: usize) -> Result<()> {
    // SAFETY: plain call with an integer; the shim catches every C++ exception.
    let err = unsafe { mmsp_alloc_reset_peak(device as c_int) };
    check(err, "allocator peak reset")
}

/// Starts libtorch's Kineto profiler (CUDA activities only), process-wide.
pub fn kernel_profile_start() -> Result<()> {
    // SAFETY: no arguments; the shim catches every C++ exception.
    let err = unsafe { mmsp_kernel_profile_start() };
    check(err, "starting the kernel profiler")
}

/// Stops the profiler started by [`kernel_profile_start`]: writes its Chrome trace to `trace`
/// (if given) and one `start_ns \t duration_ns \t device \t name` line per device activity
/// to `tsv`.
pub fn kernel_profile_stop(trace: Option<&std::path::Path>, tsv: &std::path::Path) -> Result<()> {
    let c = |p: &std::path::Path| {
        std::ffi::CString::new(p.to_string_lossy().as_bytes())
            .map_err(|_| RuntimeError::Plan(format!("path {} contains a NUL byte", p.display())))
    };
    let trace = match trace {
        Some(p) => c(p)?,
        None => std::ffi::CString::default(),
    };
    let tsv = c(tsv)?;
    // SAFETY: both are NUL-terminated strings alive for the call; the shim does not keep them.
    let err = unsafe { mmsp_kernel_profile_stop(trace.as_ptr(), tsv.as_ptr()) };
    check(err, "stopping the kernel profiler")
}

/// Turns ATen's deterministic algorithms (errors on an op without a deterministic
/// implementation) and cuDNN's deterministic mode on or off, process-wide.
pub fn set_deterministic(on: bool) -> Result<()> {
    // SAFETY: plain call with an integer; the shim catches every C++ exception.
    let err = unsafe { mmsp_set_deterministic(on as c_int) };
    check(err, "setting deterministic algorithms")
}
