#!/usr/bin/env bash
# The prepared GPU check (issue 14, goal 4) for a session that is lent a GPU machine:
#
#   run(command="bash bench/gpu_check.sh", timeout_s=540)     # the device tool
#
# The aggregation engine imports only torch and numpy, so this runs on the GPU image's own
# python3 with nothing carried. It prints the GPU, then the engine benchmark at LLaMA-7B
# shapes (64 modules of 4096 x 4096, ranks 4..64) for 8, 32 and 100 clients on CUDA, each
# against the naive dense path on the same device and the host memcpy floor, and the engine's
# agreement with that path (relative error, σ error). Record what it prints in
# docs/benchmarks.md. Extra arguments go to bench_aggregation.py; DEVICE=cpu smoke-tests it.
# (The 64-client service round needs the server's own dependencies there — pydantic,
# pydantic-settings, grpcio-status/-health-checking/-reflection, dp-accounting — carried as
# wheels, see /work/.library/device/README.md.)
set -uo pipefail
export PYTHONPATH=server:proto:client_sdk PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
out=${OUT:-out/gpu-check}
mkdir -p "$out"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
"$py" bench/bench_aggregation.py --device "$device" --clients 8,32,100 \
  --json "$out/aggregation-$device.json" "$@" 2>&1 | tee "$out/aggregation-$device.txt"
