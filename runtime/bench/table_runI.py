#!/usr/bin/env python3
"""Measured against predicted for the ZeRO x recompute runs on one H200 (issue 13; train.sh
as runtime/bench/README.md says, once called runI.sh): reads the reports in
runtime/bench/results/h200/raw/h200_runI/ and the plans they ran (p*.json beside them), and
prints one JSON line per run and a Markdown table: the caching allocator's peak bytes in
tensors per rank against the planner's memory less its reserve and fragmentation margins,
the step time, MFU and HFU against the plan's. Four in-process ranks share one allocator:
their peak is divided by four (the ranks run in lockstep, so their peaks coincide).
Run from the repository root: python3 runtime/bench/table_runI.py [RESULTS_DIR]"""
import glob, json, os, sys

R = sys.argv[1] if len(sys.argv) > 1 else "runtime/bench/results/h200/raw/h200_runI"
GIB = 2**30
rows = []
for f in sorted(glob.glob(os.path.join(R, "r[14]_*.json"))):
    name = os.path.basename(f)[:-5]
    m = json.load(open(f))
    plan = json.load(open(os.path.join(R, "p" + name[1:] + ".json")))
    p = plan["predicted"]
    mp = m["predicted"]  # the plan's prediction as the run's report carries it
    ranks = m["ranks"]
    tensors = (p["memory_per_gpu_bytes"] - p["memory"]["reserved_bytes"] - p["memory"]["fragmentation_bytes"]) / GIB
    meas = m["peak_allocated_bytes_rank0"] / ranks / GIB
    held = [r.get("held_weight_bytes_after_forward") for r in m.get("per_rank", [])]
    row = {"run": name, "ranks": ranks, "zero": m["zero_stage"], "recompute": m["recompute"],
           "tokens": m["context_tokens"], "tensors_GiB": round(meas, 3), "predicted_GiB": round(tensors, 3),
           "mem_err_pct": round(100 * (meas - tensors) / tensors, 2),
           "step_s": round(m["micro_step_s"], 4), "predicted_s": round(mp["micro_step_s"], 4),
           "time_err_pct": round(100 * (m["micro_step_s"] - mp["micro_step_s"]) / mp["micro_step_s"], 1),
           "mfu": round(m["mfu"], 4), "hfu": round(m["hfu"], 4),
           "predicted_mfu": round(mp["mfu"], 4), "predicted_hfu": round(mp.get("hfu") or 0, 4),
           "held_weight_bytes_after_forward": held}
    rows.append(row)
    print(json.dumps(row))
print("\n| run | ranks | ZeRO | recompute | tensors measured / predicted (GiB) | error | step measured / predicted | MFU / HFU measured | MFU / HFU predicted |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['run']} | {r['ranks']} | {r['zero']} | {r['recompute']} | {r['tensors_GiB']:.2f} / {r['predicted_GiB']:.2f} | "
          f"{r['mem_err_pct']:+.1f}% | {r['step_s']:.3f} / {r['predicted_s']:.3f} s ({r['time_err_pct']:+.1f}%) | "
          f"{100*r['mfu']:.1f}% / {100*r['hfu']:.1f}% | {100*r['predicted_mfu']:.1f}% / {100*r['predicted_hfu']:.1f}% |")
