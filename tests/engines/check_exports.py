#!/usr/bin/env python3
"""Checks `mmsp export` output with the engines' own code, on CPU.

For the three plans of issue 16 (llama3-8b: 256 GPUs at 2M tokens, 64 GPUs at 512K tokens,
256 GPUs with one 2048-frame video), it runs `mmsp plan` and `mmsp export --to` megatron,
deepspeed, vila and torchrun, then:

- deepspeed: `deepspeed.runtime.config.DeepSpeedConfig` reads the exported JSON, with the plan's
  world size given to deepspeed.comm (no process group on CPU), so DeepSpeed's own batch assert
  runs; a copy with train_batch_size + 1 must be refused by it.
- torchrun: the launch script runs with a stand-in `torchrun` first on PATH that records its
  arguments, which `torch.distributed.run.get_args_parser()` then parses.
- megatron: the environment and the MMSP_MEGATRON_ARGS array come out of bash; every flag must
  be in planner/src/export/flags/megatron.txt (Megatron-LM core_v0.16.1, file and line); the
  ones generated from megatron-core dataclass fields must be fields of the installed
  megatron-core's TransformerConfig with the flag form of their default; and the model and
  parallel flags build a megatron-core `TransformerConfig` (its own validation runs).
- vila: VILA's own flags must be in flags/vila.txt; the transformers.TrainingArguments ones are
  parsed by the installed transformers' HfArgumentParser.

Usage: check_exports.py --mmsp path/to/mmsp [--keep DIR]
Exits 1 naming the first check that fails.
"""

import argparse
import copy
import dataclasses
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAGS = ROOT / "planner" / "src" / "export" / "flags"

PLANS = {
    "256gpu-2M": ["--gpus", "256", "--context", "2M"],
    "64gpu-512K": ["--gpus", "64", "--context", "512K"],
    "256gpu-video2048": ["--gpus", "256", "--frames", "2048", "--text-tokens", "1024"],
}
ENGINES = ["megatron", "deepspeed", "vila", "torchrun"]


class CheckFailed(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def listed(name):
    """flag -> (file, line, commit, kind) of a checked-in flag list."""
    rows = {}
    for line in (FLAGS / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        parts = line.split()
        rows[parts[0]] = parts[1:]
    return rows


def bash_array(path, name, extra=""):
    """The elements of a bash array defined by sourcing `path`, and `extra`'s output."""
    script = f'source "$1"; printf "%s\\0" "${{{name}[@]}}"; {extra}'
    out = subprocess.run(
        ["bash", "-c", script, "bash", str(path)], check=True, capture_output=True, text=True
    ).stdout
    *items, tail = out.split("\0")
    return items, tail


def flag_values(items):
    """--flag value... groups of an argument list, in order."""
    groups, cur = [], None
    for it in items:
        if it.startswith("--"):
            cur = [it]
            groups.append(cur)
        else:
            need(cur is not None, f"value {it!r} before any flag")
            cur.append(it)
    return groups


def check_deepspeed(path, plan):
    import deepspeed.comm as dscomm
    from deepspeed.runtime.config import DeepSpeedConfig

    world = plan["world_size"]
    # No process group on CPU: DeepSpeedConfig asks deepspeed.comm for the world size and rank.
    dscomm.get_world_size = lambda group=None: world
    dscomm.get_rank = lambda group=None: 0
    cfg_json = json.loads(path.read_text())
    # As a dict, as deepspeed.initialize(config=...) is given it: DeepSpeed 0.19.8 looks for
    # sequence_parallel_size only in a dict (runtime/config.py line 468 tests `in config`).
    cfg = DeepSpeedConfig(cfg_json)
    lay = plan["layout"]
    sp = lay["ulysses"] * lay["ring"]
    need(cfg.world_size == world / sp, f"DeepSpeed batch world {cfg.world_size} != {world}/{sp}")
    need(cfg.train_batch_size == plan["global_batch"], "train_batch_size")
    need(cfg.train_micro_batch_size_per_gpu == plan["micro_batch"], "micro batch")
    need(cfg.gradient_accumulation_steps == plan["grad_accum_steps"], "accumulation")
    need(cfg.zero_optimization_stage == plan["zero_stage"], "ZeRO stage")
    # The same config with a batch that does not add up is refused by DeepSpeed's assert.
    bad = copy.deepcopy(cfg_json)
    bad["train_batch_size"] += 1
    try:
        DeepSpeedConfig(bad)
        raise CheckFailed("DeepSpeed accepted a train_batch_size that does not add up")
    except AssertionError:
        pass
    kv = plan["model"]["num_kv_heads"]
    yc = cfg_json["mmsp"]["yunchang"]
    need(kv % yc["ulysses_degree"] == 0, f"Ulysses {yc['ulysses_degree']} does not divide {kv} kv heads")
    need(yc["ulysses_degree"] * yc["ring_degree"] == sp, "yunchang degrees")
    return (
        f"DeepSpeedConfig: train_batch_size {cfg.train_batch_size} = micro {cfg.train_micro_batch_size_per_gpu}"
        f" x accum {cfg.gradient_accumulation_steps} x world/SP {cfg.world_size:g}; ZeRO-{cfg.zero_optimization_stage};"
        f" batch+1 refused by its assert; yunchang ulysses {yc['ulysses_degree']} | {kv} kv heads"
    )


def check_torchrun(path, plan, tmp):
    from torch.distributed.run import get_args_parser

    bindir = tmp / "fakebin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "torchrun"
    record = tmp / "torchrun.args"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "{record}"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", MASTER_ADDR="10.0.0.1", NODE_RANK="0")
    subprocess.run(["bash", str(path)], check=True, env=env, cwd=tmp)
    args = record.read_text().split("\0")[:-1]
    ns = get_args_parser().parse_args(args)
    nodes = -(-plan["world_size"] // plan["gpus_per_node"])
    per = plan["world_size"] // nodes
    need(str(ns.nnodes) == str(nodes), f"nnodes {ns.nnodes} != {nodes}")
    need(str(ns.nproc_per_node) == str(per), f"nproc_per_node {ns.nproc_per_node} != {per}")
    need(ns.no_python and ns.training_script == "mmsp-runtime", "runs mmsp-runtime directly")
    need(ns.training_script_args[0] == "run", "mmsp-runtime run <plan>")
    return f"torch.distributed.run parser: nnodes {ns.nnodes} x nproc_per_node {ns.nproc_per_node}, --no-python {ns.training_script} {' '.join(ns.training_script_args)}"


def megatron_fields():
    """Fields of the installed megatron-core's TransformerConfig (with ModelParallelConfig's)."""
    from megatron.core.transformer import TransformerConfig

    return {f.name: f for f in dataclasses.fields(TransformerConfig)}


def check_field_flag(flag, kind, fields):
    name = kind.split(":", 1)[1] if ":" in kind else flag[2:].replace("-", "_")
    need(name in fields, f"{flag}: megatron-core has no TransformerConfig field {name}")
    f = fields[name]
    names = (f.metadata.get("argparse_meta") or {}).get("arg_names")
    if names:
        need(flag in names, f"{flag}: the field {name} names {names}")
    elif f.type is bool or f.type == "bool":
        need(f.default is False, f"{flag}: {name} defaults to True, so its flag is --no-/--disable-")


def transformer_config(groups):
    """A megatron-core TransformerConfig from the exported model and parallel flags."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    ints = {
        "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
        "--kv-channels", "--num-query-groups", "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size", "--context-parallel-size", "--recompute-num-layers",
    }
    kw = {}
    for g in groups:
        flag, vals = g[0], g[1:]
        key = flag[2:].replace("-", "_")
        if flag in ints:
            kw[key] = int(vals[0])
        elif flag in ("--normalization", "--recompute-granularity", "--recompute-method", "--cp-comm-type"):
            kw[key] = vals[0]
        elif flag == "--recompute-modules":
            kw[key] = vals
        elif flag == "--hierarchical-context-parallel-sizes":
            kw[key] = [int(v) for v in vals]
        elif flag in ("--sequence-parallel", "--add-qkv-bias"):
            kw[key] = True
        elif flag == "--disable-bias-linear":
            kw["add_bias_linear"] = False
        elif flag == "--swiglu":
            # What Megatron's --swiglu means for the core config (gated SiLU MLP).
            kw["gated_linear_unit"] = True
            kw["activation_func"] = F.silu
        elif flag == "--bf16":
            kw["bf16"] = True
            kw["params_dtype"] = torch.bfloat16
        elif flag == "--attention-backend":
            kw["attention_backend"] = AttnBackend[vals[0]]
    return TransformerConfig(**kw), kw


def check_megatron(path, plan):
    items, env = bash_array(
        path, "MMSP_MEGATRON_ARGS", 'printf "%s" "${CUDA_DEVICE_MAX_CONNECTIONS-unset}"'
    )
    rows = listed("megatron.txt")
    fields = megatron_fields()
    groups = flag_values(items)
    for g in groups:
        need(g[0] in rows, f"{g[0]} is not in flags/megatron.txt")
        kind = rows[g[0]][3]
        if kind.startswith("field") and rows[g[0]][0].startswith("megatron/core/"):
            check_field_flag(g[0], kind, fields)
    d = {g[0]: g[1:] for g in groups}
    cp = int(d["--context-parallel-size"][0])
    seq = int(d["--seq-length"][0])
    # validate_args (arguments.py core_v0.16.1 line 819 and line 405).
    need(seq % (2 * cp) == 0, f"seq-length {seq} is not a multiple of 2 x CP {cp}")
    if "--hierarchical-context-parallel-sizes" in d:
        sizes = [int(v) for v in d["--hierarchical-context-parallel-sizes"]]
        need(sizes[0] * sizes[1] == cp, "hierarchical CP sizes multiply to the CP size")
    fsdp = "--use-megatron-fsdp" in d
    tp = int(d["--tensor-model-parallel-size"][0])
    if fsdp:
        need(env != "1", "Megatron-FSDP asserts CUDA_DEVICE_MAX_CONNECTIONS != 1 (line 687)")
        need(d.get("--ckpt-format") == ["fsdp_dtensor"], "Megatron-FSDP needs --ckpt-format fsdp_dtensor (line 690)")
    elif tp > 1 or cp > 1:
        need(env == "1", "TP/CP without FSDP asserts CUDA_DEVICE_MAX_CONNECTIONS=1 (line 951)")
    cfg, _ = transformer_config(groups)
    m = plan["model"]
    need(cfg.num_query_groups == m["num_kv_heads"] and cfg.ffn_hidden_size == m["intermediate_size"], "model shape")
    need(cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear, "Llama block")
    need("--position-embedding-type" in d and d["--position-embedding-type"] == ["rope"], "RoPE")
    return (
        f"{len(groups)} flags, all in flags/megatron.txt (core_v0.16.1); megatron-core TransformerConfig built:"
        f" {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_query_groups} groups,"
        f" ffn {cfg.ffn_hidden_size}, {cfg.normalization}, gated SiLU, bias {cfg.add_bias_linear},"
        f" tp {cfg.tensor_model_parallel_size} cp {cfg.context_parallel_size} ({cfg.cp_comm_type or 'p2p'}"
        f"{' ' + str(cfg.hierarchical_context_parallel_sizes) if cfg.hierarchical_context_parallel_sizes else ''}),"
        f" recompute {cfg.recompute_granularity}; CUDA_DEVICE_MAX_CONNECTIONS={env}"
    )


def check_vila(path, plan, tmp):
    from transformers import HfArgumentParser, TrainingArguments

    items, _ = bash_array(path, "MMSP_VILA_ARGS")
    rows = listed("vila.txt")
    own, hf = [], []
    for g in flag_values(items):
        need(g[0] in rows, f"{g[0]} is not in flags/vila.txt")
        (hf if rows[g[0]][0].startswith("transformers/") else own).extend(g)
    ns = HfArgumentParser(TrainingArguments).parse_args(hf + ["--output_dir", str(tmp / "out")])
    need(ns.per_device_train_batch_size == plan["micro_batch"], "per-device batch")
    need(ns.gradient_accumulation_steps == plan["grad_accum_steps"], "accumulation")
    need("train_hybrid.py" in path.read_text(), "entry point train_hybrid.py")
    d = {g[0]: g[1:] for g in flag_values(own)}
    if plan.get("vision"):
        need(d.get("--num_video_frames") == [str(plan["vision"]["frames"])], "--num_video_frames")
        need(d.get("--tune_vision_tower") == [str(plan["vision"]["train_vision"])], "--tune_vision_tower")
    return (
        f"{len(flag_values(own))} VILA flags in flags/vila.txt (b760c34); transformers {__import__('transformers').__version__}"
        f" HfArgumentParser(TrainingArguments) parsed {' '.join(hf)}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmsp", required=True, help="the mmsp binary (release or debug)")
    ap.add_argument("--keep", help="write the plans and exports here instead of a temporary dir")
    a = ap.parse_args()
    # The exports run in the temporary directory: a relative binary path must not depend on it.
    a.mmsp = str(pathlib.Path(a.mmsp).resolve())
    if not os.access(a.mmsp, os.X_OK):
        print(f"check_exports.py: --mmsp {a.mmsp} is not an executable file", file=sys.stderr)
        return 2
    tmp = pathlib.Path(a.keep or tempfile.mkdtemp(prefix="mmsp-exports-"))
    tmp.mkdir(parents=True, exist_ok=True)
    failed = 0
    try:
        for name, args in PLANS.items():
            plan_path = tmp / f"{name}.json"
            out = subprocess.run([a.mmsp, "plan", *args, "--format", "json"], check=True, capture_output=True, text=True).stdout
            plan_path.write_text(out)
            plan = json.loads(out)
            lay = plan["layout"]
            print(f"== {name}: mmsp plan {' '.join(args)}: tp {lay['tp']} x ulysses {lay['ulysses']} x ring {lay['ring']} x dp {lay['dp']}, ZeRO-{plan['zero_stage']}, recompute {plan['recompute']}")
            for engine in ENGINES:
                ext = "json" if engine == "deepspeed" else "sh"
                exp = tmp / f"{name}.{engine}.{ext}"
                subprocess.run([a.mmsp, "export", "--to", engine, str(plan_path), "--out", str(exp)], check=True, cwd=tmp)
                try:
                    if engine == "deepspeed":
                        msg = check_deepspeed(exp, plan)
                    elif engine == "torchrun":
                        msg = check_torchrun(exp, plan, tmp)
                    elif engine == "megatron":
                        msg = check_megatron(exp, plan)
                    else:
                        msg = check_vila(exp, plan, tmp)
                    print(f"  {engine}: ok: {msg}")
                except CheckFailed as e:
                    failed += 1
                    print(f"  {engine}: FAILED: {e}")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        print(f"{failed} engine check(s) failed", file=sys.stderr)
        return 1
    print("all engine checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
