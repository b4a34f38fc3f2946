# shellcheck shell=bash
# Source this file (do not execute it): `source runtime/env.sh`.
#
# Makes the project-local Python virtual environment `.venv` at the repository root with
# PyPI's torch==2.11.0 (the libtorch that tch 0.24 builds against) and the packages the tests
# check the runtime against (Transformers, tokenizers, megatron-core, NumPy; pinned below)
# and the CUDA crt headers the CUDA-graph shim builds with, when they are missing, then
# exports what building and running mmsp-runtime needs: LIBTORCH_USE_PYTORCH=1, the venv
# first on PATH, and LD_LIBRARY_PATH with torch/lib and the nvidia/*/lib folders of the wheel.
# Idempotent; every failure is reported and returns non-zero.

_mmsp_env_main() {
    local root torch_version=2.11.0
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    local venv="$root/.venv"
    local py="$venv/bin/python"

    local refs="transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 megatron-core==0.16.1 numpy==2.4.6 pillow==13.0.0 deepspeed==0.19.8"
    if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" >/dev/null 2>&1; then
        echo "runtime/env.sh: installing torch==$torch_version into $venv (one time, ~2-4 GB)" >&2
        if [ ! -x "$py" ]; then
            python3 -m venv "$venv" || { echo "runtime/env.sh: python3 -m venv $venv failed" >&2; return 1; }
        fi
        "$venv/bin/pip" install --disable-pip-version-check -q "torch==$torch_version" \
            || { echo "runtime/env.sh: pip install torch==$torch_version failed" >&2; return 1; }
        "$py" -c "import torch" >/dev/null 2>&1 \
            || { echo "runtime/env.sh: torch does not import after install" >&2; return 1; }
    fi

    if ! "$py" -c "import transformers, tokenizers, megatron.core, numpy, PIL, sys; sys.exit(0 if transformers.__version__ == '5.24.0' else 1)" >/dev/null 2>&1; then
        echo "runtime/env.sh: installing the reference packages into $venv ($refs)" >&2
        # shellcheck disable=SC2086
        "$venv/bin/pip" install --disable-pip-version-check -q $refs \
            || { echo "runtime/env.sh: pip install $refs failed" >&2; return 1; }
    fi

    local site
    site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        || { echo "runtime/env.sh: cannot find site-packages of $venv" >&2; return 1; }
    # The CUDA runtime headers of torch's wheels lack crt/ (host_config.h and friends), which
    # cuda_runtime.h includes; the CUDA-graph shim (runtime/csrc/graph_shim.cpp) needs them at
    # build time. NVIDIA ships them alone as nvidia-cuda-crt (headers only, ~170 KB); this is
    # the 13.0 release of torch 2.11's CUDA 13.0 runtime.
    if [ -e "$site/nvidia/cu13/include/cuda_runtime.h" ] && [ ! -e "$site/nvidia/cu13/include/crt/host_config.h" ]; then
        echo "runtime/env.sh: installing nvidia-cuda-crt==13.0.88 (CUDA crt headers) into $venv" >&2
        "$venv/bin/pip" install --disable-pip-version-check -q --no-deps "nvidia-cuda-crt==13.0.88" \
            || { echo "runtime/env.sh: pip install nvidia-cuda-crt==13.0.88 failed" >&2; return 1; }
    fi
    local ld="$site/torch/lib"
    local d
    for d in "$site"/nvidia/*/lib; do
        [ -d "$d" ] && ld="$ld:$d"
    done
    # cudarc looks for libnccl.so before libnccl.so.2 and would find an older system copy;
    # two NCCLs in one process fail. Put a libnccl.so that is torch's own first.
    if [ -e "$site/nvidia/nccl/lib/libnccl.so.2" ]; then
        mkdir -p "$venv/mmsp-nccl" && ln -sf "$site/nvidia/nccl/lib/libnccl.so.2" "$venv/mmsp-nccl/libnccl.so" \
            || { echo "runtime/env.sh: cannot link libnccl.so" >&2; return 1; }
        ld="$venv/mmsp-nccl:$ld"
    fi
    export LIBTORCH_USE_PYTORCH=1
    export PATH="$venv/bin:$PATH"
    export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # Silence the missing-NumPy warning torch prints on import; the build only needs paths.
    export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
    return 0
}

_mmsp_env_main || return 1 2>/dev/null || exit 1
unset -f _mmsp_env_main
