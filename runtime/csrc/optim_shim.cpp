// mmsp-runtime C++ shim, training part: ATen calls that tch 0.24 does not expose.
//
// - mmsp_fused_adamw: ATen's fused AdamW (`at::_fused_adamw_`, one multi-tensor kernel on CUDA,
//   a vectorised loop on the CPU) over flat buffers, split here into views of at most `chunk`
//   elements so that no single tensor of the list is larger than the kernel's indexing expects.
// - mmsp_backward: `torch::autograd::backward(tensors, grads)`, i.e. a vector-Jacobian product
//   seeded with given output gradients, for several roots in one graph traversal.
// - mmsp_storage_resize / mmsp_storage_nbytes: release or re-allocate the storage behind a
//   tensor in place (every tensor sharing it, views and autograd's saved tensors included,
//   sees the change), as PyTorch FSDP frees a gathered flat parameter between a layer's
//   forward and its backward and all-gathers into the same storage again before the backward.
// - mmsp_tensor_version / mmsp_set_tensor_version: read and restore the autograd version
//   counter a tensor shares with its views, so that refilling released weights with the same
//   values is not taken for an in-place change of what the backward saved (PyTorch FSDP2 does
//   the same with torch.autograd._unsafe_preserve_version_counter).
// - mmsp_swiglu: silu(gate) * up as one autograd node that keeps gate and up for its backward
//   and recomputes silu(gate) there, so the graph holds two of the MLP's intermediate tensors
//   instead of three (autograd's own silu and product keep gate, silu(gate) and up); the
//   memory-efficient SwiGLU of Megatron-Core's fused bias-SwiGLU, without its bias.
//
// Errors as every shim reports them (shim_error.h): every function catches all C++ exceptions and returns
// nullptr on success or a malloc'd, NUL-terminated message freed with mmsp_free_error (defined
// in attn_shim.cpp). Tensors are `at::Tensor*` (tch's C_tensor).
#include <ATen/ATen.h>
#include "shim_error.h"
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/StorageImpl.h>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
// y = silu(g) * u. Backward: du = dy * silu(g), dg = silu'(g) * (dy * u) with ATen's
// silu_backward (dsilu/dg = s (1 + g (1 - s)), s = sigmoid(g)), each written over its own
// temporary so that at most dy, du and dg are alive besides the saved g and u.
struct SwiGlu : public torch::autograd::Function<SwiGlu> {
    static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &gate,
                              const at::Tensor &up) {
        ctx->save_for_backward({gate, up});
        return at::silu(gate) * up;
    }
    static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                   torch::autograd::variable_list grads) {
        torch::autograd::variable_list saved = ctx->get_saved_variables();
        const at::Tensor &g = saved[0];
        const at::Tensor &u = saved[1];
        const at::Tensor &dy = grads[0];
        at::Tensor du = at::silu(g);
        du.mul_(dy);
        at::Tensor dg = dy * u;
        at::silu_backward_out(dg, dg, g);
        return {dg, du};
    }
};
}  // namespace

extern "C" {

// In-place AdamW over 1-D tensors of equal length: param, grad, exp_avg (m), exp_avg_sq (v).
// `step` is a one-element float32 tensor on the parameters' device holding the step number
// already incremented (the kernel reads it for the bias corrections). Decoupled weight decay
// (p *= 1 - lr * wd), as torch.optim.AdamW. The handles are const: only the storage they
// point to is updated.
char *mmsp_fused_adamw(const at::Tensor *param, const at::Tensor *grad, const at::Tensor *exp_avg,
                       const at::Tensor *exp_avg_sq, const at::Tensor *step, double lr, double beta1,
                       double beta2, double weight_decay, double eps, int64_t chunk) {
    MMSP_SHIM_TRY
    TORCH_CHECK(chunk > 0, "chunk must be positive");
    TORCH_CHECK(param->dim() == 1 && grad->dim() == 1 && exp_avg->dim() == 1 && exp_avg_sq->dim() == 1,
                "fused AdamW takes 1-D buffers");
    const int64_t n = param->numel();
    TORCH_CHECK(grad->numel() == n && exp_avg->numel() == n && exp_avg_sq->numel() == n,
                "fused AdamW buffers differ in length");
    TORCH_CHECK(param->is_contiguous() && grad->is_contiguous() && exp_avg->is_contiguous() &&
                    exp_avg_sq->is_contiguous(),
                "fused AdamW buffers must be contiguous");
    std::vector<at::Tensor> ps = param->split(chunk);
    std::vector<at::Tensor> gs = grad->split(chunk);
    std::vector<at::Tensor> ms = exp_avg->split(chunk);
    std::vector<at::Tensor> vs = exp_avg_sq->split(chunk);
    // The kernel only reads the step count; every chunk shares the one tensor.
    std::vector<at::Tensor> steps(ps.size(), *step);
    at::_fused_adamw_(ps, gs, ms, vs, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    MMSP_SHIM_CATCH("mmsp optim shim")
}

// Backward from `n` roots `tensors[i]` seeded with `grads[i]` (same shape and dtype), in one
// traversal; gradients accumulate into the leaves' .grad as with Tensor::backward.
char *mmsp_backward(const at::Tensor *const *tensors, const at::Tensor *const *grads, int n) {
    MMSP_SHIM_TRY
    torch::autograd::variable_list ts, gs;
    for (int i = 0; i < n; ++i) {
        ts.push_back(*tensors[i]);
        gs.push_back(*grads[i]);
    }
    torch::autograd::backward(ts, gs);
    MMSP_SHIM_CATCH("mmsp optim shim")
}

// Sets the storage behind `t` to `nbytes` bytes: 0 releases its memory (to the caching
// allocator on CUDA), more allocates fresh memory of undefined contents from the storage's own
// allocator on the current stream (the caller fills it). The tensor's sizes, strides and offset
// are untouched: `nbytes` must cover them before the tensor is read again.
char *mmsp_storage_resize(const at::Tensor *t, int64_t nbytes) {
    MMSP_SHIM_TRY
    TORCH_CHECK(nbytes >= 0, "storage size must not be negative");
    c10::StorageImpl *s = t->storage().unsafeGetStorageImpl();
    TORCH_CHECK(s != nullptr, "tensor has no storage");
    TORCH_CHECK(s->resizable() && s->allocator() != nullptr, "storage is not resizable");
    c10::DeviceGuard guard(t->device());
    if (nbytes == 0) {
        s->set_data_ptr_noswap(at::DataPtr(nullptr, t->device()));
    } else {
        s->set_data_ptr_noswap(s->allocator()->allocate(static_cast<size_t>(nbytes)));
    }
    s->set_nbytes(static_cast<size_t>(nbytes));
    MMSP_SHIM_CATCH("mmsp optim shim")
}

// *out = the bytes of the storage behind `t`.
char *mmsp_storage_nbytes(const at::Tensor *t, int64_t *out) {
    MMSP_SHIM_TRY
    TORCH_CHECK(t->has_storage(), "tensor has no storage");
    *out = static_cast<int64_t>(t->storage().nbytes());
    MMSP_SHIM_CATCH("mmsp optim shim")
}

// *out = the autograd version counter of `t` (shared with its views).
char *mmsp_tensor_version(const at::Tensor *t, int64_t *out) {
    MMSP_SHIM_TRY
    *out = static_cast<int64_t>(t->_version());
    MMSP_SHIM_CATCH("mmsp optim shim")
}

// Sets the version counter of `t` (and of every view sharing it) to `v`.
char *mmsp_set_tensor_version(const at::Tensor *t, int64_t v) {
    MMSP_SHIM_TRY
    c10::VariableVersion counter = t->unsafeGetTensorImpl()->version_counter();
    counter.set_version(v);
    MMSP_SHIM_CATCH("mmsp optim shim")
}

// *out = silu(gate) * up through SwiGlu (an autograd node when grad mode is on and an input
// requires grad; plain kernels otherwise).
char *mmsp_swiglu(const at::Tensor *gate, const at::Tensor *up, at::Tensor **out) {
    MMSP_SHIM_TRY
    TORCH_CHECK(gate->sizes() == up->sizes(), "swiglu: gate and up differ in shape");
    *out = new at::Tensor(SwiGlu::apply(*gate, *up));
    MMSP_SHIM_CATCH("mmsp optim shim")
}

}  // extern "C"
