# Sourced by the device scripts: the binary carried in carry/, torch's libraries and NCCL
# (a libnccl.so link to torch's libnccl.so.2 first, so cudarc loads the same NCCL as torch).
BIN=${BIN:-carry/mmsp-runtime}
PY=${TORCH_PY:-/opt/torch/.venv/bin/python3}
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p /tmp/mmsp-nccl && ln -sf "$SP/nvidia/nccl/lib/libnccl.so.2" /tmp/mmsp-nccl/libnccl.so
LD_LIBRARY_PATH=/tmp/mmsp-nccl:$SP/torch/lib:$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH RUST_BACKTRACE=0
