"""Kernel factors for `mmsp compare`'s engine profiles and `mmsp validate` (planner/src/engines.rs).

Measures on the GPU, with PyTorch alone:
- bf16 GEMM (torch.matmul) against FP8 GEMM (torch._scaled_mm, e4m3 inputs, per-tensor scales,
  bf16 output) at Llama-2-7B's projection shapes split by tensor parallelism, which is what
  Transformer Engine's FP8 Linear runs on Hopper (cuBLASLt FP8);
- causal attention forward + backward of PyTorch's flash backend (FlashAttention-2, what
  ring-flash-attention, yunchang, DeepSpeed-Ulysses and VILA call) against its cuDNN backend
  (what mmsp-runtime's calibration and Transformer Engine's fused attention run), 32 heads of 128.

Prints one JSON object. Usage: python3 tools/engine_kernels.py > out.json
"""
import json
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, warm=3, reps=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps / 1e3


def gemms():
    out = []
    h, f = 4096, 11008
    for tokens in [4096, 8192, 16384]:
        for tp in [1, 4, 8]:
            for name, n, k in [("qkv", 3 * h // tp, h), ("mlp_up", 2 * f // tp, h), ("mlp_down", h, f // tp)]:
                a = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
                b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                t16 = bench(lambda: a @ b.t())
                a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
                one = torch.ones((), device="cuda")
                t8 = bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
                fl = 2.0 * tokens * n * k
                out.append({"tokens": tokens, "tp": tp, "proj": name, "bf16_tflops": fl / t16 / 1e12,
                            "fp8_tflops": fl / t8 / 1e12, "fp8_over_bf16": t16 / t8})
    return out


def attention():
    out = []
    for tokens in [8192, 32768, 131072]:
        q = torch.randn(1, 32, tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn_like(q, requires_grad=True)
        v = torch.randn_like(q, requires_grad=True)
        g = torch.randn_like(q)
        row = {"tokens": tokens}
        for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
            def step():
                with sdpa_kernel(be):
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                o.backward(g)
            t = bench(step, warm=2, reps=3 if tokens > 32768 else 10)
            row[name + "_fwd_bwd_tflops"] = 3.5 * 2.0 * tokens * tokens * 32 * 128 / 2 / t / 1e12
        row["flash_over_cudnn"] = row["flash_fwd_bwd_tflops"] / row["cudnn_fwd_bwd_tflops"]
        out.append(row)
    return out


if __name__ == "__main__":
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "gemm": gemms(), "attention": attention()}, indent=1))
