#!/usr/bin/env bash
# Runs every test of mmsp on a fresh machine: formatting, lints, the plan contract's tests, the
# planner's unit, property and CLI snapshot tests (default pure-Rust solver and the HiGHS feature), and the runtime's CPU
# tests against libtorch from a project-local virtual environment. Installs what it needs
# (cmake and libclang for HiGHS, torch==2.11.0 into .venv) and stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "plan contract and planner: clippy"
cargo clippy -p mmsp-plan -p mmsp-planner --all-targets -- -D warnings

step "plan contract: tests"
cargo test -p mmsp-plan

step "planner: tests (microlp)"
cargo test -p mmsp-planner

step "planner: tests with the HiGHS solver (feature highs)"
# HiGHS builds with cmake and generates its bindings with bindgen (libclang).
if ! command -v cmake >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake libclang-dev >/dev/null
  else
    echo "cmake and libclang-dev are needed to build HiGHS (feature highs): install them and re-run" >&2
    exit 1
  fi
fi
cargo test -p mmsp-planner --features highs --lib balance

step "runtime: CPU tests against libtorch (torch==2.11.0 in .venv)"
# shellcheck source=runtime/env.sh
source runtime/env.sh
cargo clippy -p mmsp-runtime --all-targets -- -D warnings
cargo test -p mmsp-runtime

step "exports: parsed by the engines' own code (DeepSpeedConfig, torchrun's parser, megatron-core, transformers)"
# The three plans of issue 16 exported to megatron, deepspeed, vila and torchrun (~20 s on CPU).
python -c "import deepspeed" >/dev/null 2>&1 || DS_BUILD_OPS=0 python -m pip install --disable-pip-version-check -q deepspeed==0.19.8
cargo build -q -p mmsp-planner --bin mmsp
python -W ignore tests/engines/check_exports.py --mmsp "${CARGO_TARGET_DIR:-target}/debug/mmsp"

step "all tests passed"
