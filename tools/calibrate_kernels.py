#!/usr/bin/env python3
"""Measures the kernel throughput curves the planner's cost model uses, on the GPU it runs on.

Prints one JSON object: bf16 GEMM throughput versus token count for the projection shapes of a
Llama-style layer, cuDNN/flash attention forward+backward throughput versus block size and
head count, for the block shapes that ring attention issues (a query chunk against a key chunk,
causal on the diagonal, full off it), and the achieved HBM bandwidth of memory-bound kernels
(copy, add, multiply of bf16 tensors from 1 MiB to 1 GiB). The runtime's own measurement,
through its attention kernels, is `mmsp-runtime calibrate --out FILE` (same format). Run on the
GPU machine:

    python3 tools/calibrate_kernels.py > calibration.json

FLOPs counting: GEMM 2*M*N*K (x3 for fwd+bwd); attention fwd 4*Sq*Sk*H*D (halved when
causal), fwd+bwd = 3.5 x fwd (FlashAttention-2 counting, as shared/reference/README.md).
Bandwidth: bytes read plus written per call (copy 2, add and mul 3 tensors) over its time.
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timeit(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def gemm_points(hidden=4096, ffn=14336):
    out = []
    for m in [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]:
        for n, k in [(hidden, hidden), (ffn, hidden), (hidden, ffn)]:
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            x = a.requires_grad_(True)

            def step():
                y = x @ w
                y.backward(torch.ones_like(y))

            t = timeit(step)
            out.append({"tokens": m, "n": n, "k": k, "fwd_bwd_s": t,
                        "tflops": 3 * 2 * m * n * k / t / 1e12})
    return out


def attention_points():
    out = []
    for backend_name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("flash", SDPBackend.FLASH_ATTENTION)]:
        for heads in [32, 8, 4, 1]:
            for s in [256, 512, 1024, 2048, 4096, 8192, 16384]:
                if heads * s > 32 * 16384:
                    continue
                for causal in [True, False]:
                    q = torch.randn(1, heads, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    k = torch.randn(1, heads, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    v = torch.randn(1, heads, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

                    def step():
                        with sdpa_kernel(backend):
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        o.backward(torch.ones_like(o))

                    try:
                        t = timeit(step)
                    except RuntimeError as e:  # backend refuses the shape
                        out.append({"backend": backend_name, "heads": heads, "tokens": s,
                                    "causal": causal, "error": str(e).splitlines()[0]})
                        continue
                    fwd = 4 * s * s * heads * 128 * (0.5 if causal else 1.0)
                    out.append({"backend": backend_name, "heads": heads, "tokens": s,
                                "causal": causal, "fwd_bwd_s": t,
                                "tflops": 3.5 * fwd / t / 1e12})
    return out


def bandwidth_points():
    out = []
    for mib in [1, 4, 16, 64, 256, 1024]:
        n = (mib << 20) // 2
        a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        c = torch.empty_like(a)
        ops = [("copy", 2, lambda: c.copy_(a)),
               ("add", 3, lambda: torch.add(a, b, out=c)),
               ("mul", 3, lambda: torch.mul(a, b, out=c))]
        for name, tensors, fn in ops:
            t = timeit(fn, iters=20)
            nbytes = tensors * (mib << 20)
            out.append({"op": name, "dtype": "bf16", "tensor_bytes": mib << 20, "bytes": nbytes,
                        "seconds": t, "gb_per_s": nbytes / t / 1e9})
    return out


def main():
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        sys.exit(2)
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "gemm": gemm_points(),
        "attention": attention_points(),
        "memory_bandwidth": bandwidth_points(),
    }
    json.dump(res, sys.stdout)
    print()


if __name__ == "__main__":
    main()
