#!/usr/bin/env python3
"""Measured against predicted for the training runs of
runtime/bench/results/h100-sxm-x4/raw/h100x4_runG/ (4 x H100 and GPU 0 of the same host): re-plans each configuration with the planner built here
(`cargo run -p mmsp-planner -- plan ...`, the calibration given, default
runtime/tests/data/h100-sxm-2layer-v3-nccl4.json) and prints one JSON line per run plus a Markdown
table. Run from the repository root: python3 runtime/bench/table.py [CALIBRATION]"""
import json, subprocess, sys

cal = sys.argv[1] if len(sys.argv) > 1 else "runtime/tests/data/h100-sxm-2layer-v3-nccl4.json"
R = "runtime/bench/results/h100-sxm-x4/raw/h100x4_runG/"
runs = [(f"1 GPU {c}", f"train1_{c}.json", ["--topology", "runtime/bench/inputs/h100-1gpu.toml", "--gpus", "1", "--context", c, "--layout", "1x1", "--zero", "0", "--recompute", "none"])
        for c in ("8K", "16K", "32K", "64K", "112K", "128K")]
runs += [(f"4 GPU 128K {l} ZeRO-1", f"train4_{l}.json", ["--topology", "runtime/tests/data/h100-4gpu.toml", "--gpus", "4", "--context", "128K", "--layout", l, "--zero", "1", "--recompute", "none"])
         for l in ("1x4", "2x2", "4x1")]
runs += [("4 GPU 128K 2x2 ZeRO-3", "train4_2x2_z3.json", ["--topology", "runtime/tests/data/h100-4gpu.toml", "--gpus", "4", "--context", "128K", "--layout", "2x2", "--zero", "3"])]
rows = []
for name, f, args in runs:
    m = json.load(open(R + f))
    cmd = ["cargo", "run", "-q", "-p", "mmsp-planner", "--", "plan", "--model", "runtime/tests/data/llama3-8b-2layer.json",
           "--global-batch", "1", "--calibration", cal, "--format", "json"] + args
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        # The planner refuses the configuration (its memory margins); say so in the table.
        print(json.dumps({"run": name, "measured_s": m["micro_step_s"], "planner": out.stderr.strip()}))
        rows.append({"run": name, "measured_s": m["micro_step_s"], "mfu": m["mfu"], "refused": out.stderr.strip()})
        continue
    p = json.loads(out.stdout)["predicted"]
    ms, ps = m["micro_step_s"], p["step_time_s"]
    mem_dev = m.get("peak_device_memory_used_bytes")
    mem_alloc = m.get("peak_allocated_bytes_rank0")
    pm = p["memory_per_gpu_bytes"]
    tensors = pm - p["memory"]["reserved_bytes"] - p["memory"]["fragmentation_bytes"]
    row = {"run": name, "measured_s": ms, "predicted_s": ps, "err_pct": 100 * (ms - ps) / ps, "mfu": m["mfu"],
           "measured_device_GiB": mem_dev / 2**30, "predicted_GiB": pm / 2**30,
           "measured_tensors_GiB": mem_alloc / 2**30, "predicted_tensors_GiB": tensors / 2**30}
    rows.append(row)
    print(json.dumps(row))
print("\n| run | measured step | predicted | error | MFU | device memory measured / predicted | tensors measured / predicted |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if "refused" in r:
        print(f"| {r['run']} | {r['measured_s']:.4f} s | refused | | {100*r['mfu']:.1f}% | {r['refused'][:90]} | |")
        continue
    print(f"| {r['run']} | {r['measured_s']:.4f} s | {r['predicted_s']:.4f} s | {r['err_pct']:+.1f}% | {100*r['mfu']:.1f}% | "
          f"{r['measured_device_GiB']:.1f} / {r['predicted_GiB']:.1f} GiB | {r['measured_tensors_GiB']:.1f} / {r['predicted_tensors_GiB']:.1f} GiB |")
