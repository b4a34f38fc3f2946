// mmsp-runtime C++ shim: ATen attention kernels that tch 0.24 does not expose.
//
// Every function catches all C++ exceptions and returns nullptr on success or a malloc'd,
// NUL-terminated error message that the caller frees with mmsp_free_error. Tensors are
// passed as `at::Tensor*` (tch's C_tensor); outputs are new heap `at::Tensor`s that tch
// owns and frees with at_free.
//
// Besides the kernels: per-thread current CUDA streams (so that in-process ranks sharing one
// GPU queue their work on separate streams) and CUDA-event timers, both through c10's
// device-generic interface, so the shim needs no CUDA headers.
#include <ATen/ATen.h>
#include "shim_error.h"
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

namespace {
using mmsp_shim::dup_error;
// Whether the cuDNN forward returned its log-sum-exp as (B, H, S, 1); the backward gets it back
// in the same shape.
std::atomic<int> g_cudnn_lse_4d{-1};

enum Backend { kCpuMath = 0, kFlash = 1, kCudnn = 2 };

// The cuDNN backward wants philox seed/offset tensors even without dropout (where it ignores
// their values). Made once per device and never freed (no destructor runs after CUDA is torn
// down), rather than allocating and zero-filling two tensors on every backward call.
constexpr int kMaxDevices = 64;
std::mutex g_philox_mu;
at::Tensor *g_philox[kMaxDevices] = {};

const at::Tensor &cudnn_philox(const at::Tensor &like) {
    const int dev = like.device().index();
    if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("cuDNN backward: device index out of range");
    std::lock_guard<std::mutex> lock(g_philox_mu);
    if (g_philox[dev] == nullptr) {
        auto t = at::zeros({1}, like.options().dtype(at::kLong));
        // Made on whatever stream this thread uses; later readers may run on other streams.
        c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->synchronizeDevice(static_cast<c10::DeviceIndex>(dev));
        g_philox[dev] = new at::Tensor(std::move(t));
    }
    return *g_philox[dev];
}

const c10::impl::DeviceGuardImplInterface *cuda_impl() {
    return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

c10::Device cuda_device(int device) {
    return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
}
}  // namespace


extern "C" {

void mmsp_free_error(char *p) { std::free(p); }

// Attention forward on (B, H, S, D) tensors. Returns out (B, H, Sq, D) in the input dtype and
// lse (B, H, Sq) in float32 (float64 for float64 inputs on the CPU path), natural log.
char *mmsp_attn_fwd(int backend, const at::Tensor *q, const at::Tensor *k, const at::Tensor *v,
                    int causal, double scale, at::Tensor **out, at::Tensor **lse) {
    MMSP_SHIM_TRY
    *out = nullptr;
    *lse = nullptr;
    const bool is_causal = causal != 0;
    const int64_t b = q->size(0), h = q->size(1), s = q->size(2);
    at::Tensor o, l;
    switch (backend) {
        case kCpuMath: {
            auto r = at::_scaled_dot_product_flash_attention_for_cpu(*q, *k, *v, 0.0, is_causal, {}, scale);
            o = std::get<0>(r);
            l = std::get<1>(r);
            break;
        }
        case kFlash: {
            auto r = at::_scaled_dot_product_flash_attention(*q, *k, *v, 0.0, is_causal, false, scale);
            o = std::get<0>(r);
            l = std::get<1>(r);
            break;
        }
        case kCudnn: {
            auto r = at::_scaled_dot_product_cudnn_attention(*q, *k, *v, std::nullopt, true, 0.0, is_causal, false, scale);
            o = std::get<0>(r);
            l = std::get<1>(r);
            g_cudnn_lse_4d.store(l.dim() == 4 ? 1 : 0);
            break;
        }
        default:
            return dup_error("mmsp_attn_fwd: unknown backend " + std::to_string(backend));
    }
    *out = new at::Tensor(std::move(o));
    *lse = new at::Tensor(l.reshape({b, h, s}));
    MMSP_SHIM_CATCH("mmsp shim")
}

// Attention backward. `out` and `lse` are the (possibly merged, global) softmax output and
// log-sum-exp of the rows of q; the kernel recomputes P = exp(qk^T*scale - lse).
char *mmsp_attn_bwd(int backend, const at::Tensor *dout, const at::Tensor *q, const at::Tensor *k,
                    const at::Tensor *v, const at::Tensor *out, const at::Tensor *lse, int causal,
                    double scale, at::Tensor **dq, at::Tensor **dk, at::Tensor **dv) {
    MMSP_SHIM_TRY
    *dq = nullptr;
    *dk = nullptr;
    *dv = nullptr;
    const bool is_causal = causal != 0;
    std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
    switch (backend) {
        case kCpuMath:
            r = at::_scaled_dot_product_flash_attention_for_cpu_backward(*dout, *q, *k, *v, *out, *lse, 0.0, is_causal, {}, scale);
            break;
        case kFlash: {
            // With dropout 0 the forward returns empty CPU scalars as its philox state.
            auto seed = at::empty({}, at::dtype(at::kLong));
            auto offset = at::empty({}, at::dtype(at::kLong));
            at::Tensor none;
            r = at::_scaled_dot_product_flash_attention_backward(*dout, *q, *k, *v, *out, *lse, none, none,
                                                                 q->size(2), k->size(2), 0.0, is_causal, seed, offset, scale);
            break;
        }
        case kCudnn: {
            const at::Tensor &seed = cudnn_philox(*q);
            const at::Tensor &offset = seed;
            at::Tensor none;
            at::Tensor l = *lse;
            if (g_cudnn_lse_4d.load() == 1) l = l.unsqueeze(-1);
            r = at::_scaled_dot_product_cudnn_attention_backward(*dout, *q, *k, *v, *out, l, seed, offset, none, none, none,
                                                                 q->size(2), k->size(2), 0.0, is_causal, scale);
            break;
        }
        default:
            return dup_error("mmsp_attn_bwd: unknown backend " + std::to_string(backend));
    }
    *dq = new at::Tensor(std::move(std::get<0>(r)));
    *dk = new at::Tensor(std::move(std::get<1>(r)));
    *dv = new at::Tensor(std::move(std::get<2>(r)));
    MMSP_SHIM_CATCH("mmsp shim")
}

// Varlen FlashAttention forward with per-sequence key counts (decode over a fixed-shape KV cache,
// as a captured CUDA graph needs): q (total_q, Hq, D), k and v (total_k, Hkv, D); sequence i's
// queries are rows [cu_q[i], cu_q[i+1]), its keys start at row cu_k[i], and only the first
// seqused_k[i] of them are used (int32 tensors on the device, so their values may change
// between replays). Returns out (total_q, Hq, D) in the input dtype and lse (Hq, total_q) in
// float32; a sequence with no keys used gets out 0 and a non-finite lse.
char *mmsp_flash_varlen_fwd(const at::Tensor *q, const at::Tensor *k, const at::Tensor *v,
                            const at::Tensor *cu_q, const at::Tensor *cu_k, const at::Tensor *seqused_k,
                            int64_t max_q, int64_t max_k, double scale, at::Tensor **out, at::Tensor **lse) {
    MMSP_SHIM_TRY
    *out = nullptr;
    *lse = nullptr;
    auto r = at::_flash_attention_forward(*q, *k, *v, *cu_q, *cu_k, max_q, max_k, 0.0, false, false, scale,
                                          std::nullopt, std::nullopt, *seqused_k, std::nullopt);
    *out = new at::Tensor(std::move(std::get<0>(r)));
    *lse = new at::Tensor(std::move(std::get<1>(r)));
    MMSP_SHIM_CATCH("mmsp shim")
}

// A zeroed int64 host tensor of `n` elements in pinned (page-locked) memory, so that copies
// from it to a device are queued without the host waiting.
char *mmsp_pinned_i64(int64_t n, at::Tensor **out) {
    MMSP_SHIM_TRY
    *out = nullptr;
    *out = new at::Tensor(at::zeros({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true)));
    MMSP_SHIM_CATCH("mmsp shim")
}

// Makes the calling thread's current stream on `device` one from libtorch's stream pool (a
// different one per call, round-robin). libtorch queues this thread's later kernels there.
char *mmsp_stream_use_pool(int device) {
    MMSP_SHIM_TRY
    auto s = cuda_impl()->getStreamFromGlobalPool(cuda_device(device), false);
    cuda_impl()->exchangeStream(s);
    MMSP_SHIM_CATCH("mmsp shim")
}

// Makes the calling thread's current stream on `device` the default stream again.
char *mmsp_stream_use_default(int device) {
    MMSP_SHIM_TRY
    cuda_impl()->exchangeStream(cuda_impl()->getDefaultStream(cuda_device(device)));
    MMSP_SHIM_CATCH("mmsp shim")
}

// Blocks the host until the calling thread's current stream on `device` has run its work.
char *mmsp_stream_sync_current(int device) {
    MMSP_SHIM_TRY
    cuda_impl()->synchronizeStream(cuda_impl()->getStream(cuda_device(device)));
    MMSP_SHIM_CATCH("mmsp shim")
}

// A CUDA event with timing enabled (freed with mmsp_event_free).
char *mmsp_event_new(void **out) {
    MMSP_SHIM_TRY
    *out = nullptr;
    *out = new c10::Event(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    MMSP_SHIM_CATCH("mmsp shim")
}

void mmsp_event_free(void *ev) { delete static_cast<c10::Event *>(ev); }

// Records the event on the calling thread's current stream of `device`.
char *mmsp_event_record(void *ev, int device) {
    MMSP_SHIM_TRY
    static_cast<c10::Event *>(ev)->record(cuda_impl()->getStream(cuda_device(device)));
    MMSP_SHIM_CATCH("mmsp shim")
}

// Makes the calling thread's current stream of `device` wait (on the device, not the host)
// for the work before the event's last record.
char *mmsp_event_block(void *ev, int device) {
    MMSP_SHIM_TRY
    static_cast<c10::Event *>(ev)->block(cuda_impl()->getStream(cuda_device(device)));
    MMSP_SHIM_CATCH("mmsp shim")
}

// Blocks the host until the work before the event's last record has run (at once if the
// event was never recorded).
char *mmsp_event_synchronize(void *ev) {
    MMSP_SHIM_TRY
    static_cast<c10::Event *>(ev)->synchronize();
    MMSP_SHIM_CATCH("mmsp shim")
}

// Waits for `end` on the host, then writes the milliseconds from `start` to `end`.
char *mmsp_event_elapsed_ms(void *start, void *end, double *ms) {
    MMSP_SHIM_TRY
    auto *e = static_cast<c10::Event *>(end);
    e->synchronize();
    *ms = static_cast<c10::Event *>(start)->elapsedTime(*e);
    MMSP_SHIM_CATCH("mmsp shim")
}

}  // extern "C"
