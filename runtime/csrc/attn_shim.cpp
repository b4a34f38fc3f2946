// mmsp-runtime C++ shim: ATen attention kernels that tch 0.24 does not expose.
//
// Every function catches all C++ exceptions and returns nullptr on success or a malloc'd,
// NUL-terminated error message that the caller frees with mmsp_free_error. Tensors are
// passed as `at::Tensor*` (tch's C_tensor); outputs are new heap `at::Tensor`s that tch
// owns and frees with at_free.
#include <ATen/ATen.h>
#include <cstdlib>
#include <cstring>
#include <string>
#include <atomic>

namespace {
char *dup_error(const std::string &msg) {
    char *p = static_cast<char *>(std::malloc(msg.size() + 1));
    if (p != nullptr) std::memcpy(p, msg.c_str(), msg.size() + 1);
    return p;
}
// Whether the cuDNN forward returned its log-sum-exp as (B, H, S, 1); the backward gets it back
// in the same shape.
std::atomic<int> g_cudnn_lse_4d{-1};

enum Backend { kCpuMath = 0, kFlash = 1, kCudnn = 2 };
}  // namespace

#define MMSP_TRY try {
#define MMSP_CATCH                                             \
    }                                                          \
    catch (const std::exception &e) {                          \
        return dup_error(e.what());                            \
    }                                                          \
    catch (...) {                                              \
        return dup_error("unknown C++ exception in mmsp shim"); \
    }                                                          \
    return nullptr;

extern "C" {

void mmsp_free_error(char *p) { std::free(p); }

// Attention forward on (B, H, S, D) tensors. Returns out (B, H, Sq, D) in the input dtype and
// lse (B, H, Sq) in float32 (float64 for float64 inputs on the CPU path), natural log.
char *mmsp_attn_fwd(int backend, const at::Tensor *q, const at::Tensor *k, const at::Tensor *v,
                    int causal, double scale, at::Tensor **out, at::Tensor **lse) {
    MMSP_TRY
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
    MMSP_CATCH
}

// Attention backward. `out` and `lse` are the (possibly merged, global) softmax output and
// log-sum-exp of the rows of q; the kernel recomputes P = exp(qk^T*scale - lse).
char *mmsp_attn_bwd(int backend, const at::Tensor *dout, const at::Tensor *q, const at::Tensor *k,
                    const at::Tensor *v, const at::Tensor *out, const at::Tensor *lse, int causal,
                    double scale, at::Tensor **dq, at::Tensor **dk, at::Tensor **dv) {
    MMSP_TRY
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
            auto seed = at::zeros({1}, q->options().dtype(at::kLong));
            auto offset = at::zeros({1}, q->options().dtype(at::kLong));
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
    MMSP_CATCH
}

}  // extern "C"
