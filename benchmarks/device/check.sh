#!/usr/bin/env bash
# The GPU check, as ONE device call (about 5 minutes on an H200). Prepare here first:
#   bash benchmarks/device/wheels.sh
# then, with the device tool:
#   run(command="bash benchmarks/device/check.sh", carry=[".whl"], timeout_s=540)
# Results come back under $OUT: log.txt, kernel_parity.json, kernels.json, step.json. Record them in
# BENCHMARKS.md with the device named.
set -uo pipefail
OUT=${OUT:-/tmp/vaemo-device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0
echo "== 1. Triton kernels vs torch reference (fp32, bf16)"
timeout 120 python3 benchmarks/device/kernel_parity.py --json "$OUT/kernel_parity.json" || status=1
echo "== 2. kernel speed and memory: fused Triton vs naive vs chunked"
timeout 150 python3 benchmarks/bench_kernels.py --device cuda --sizes 4096,16384,32768 --json "$OUT/kernels.json" \
    || status=1
echo "== 3. bf16 training step, MFU (SDPA attention: flash-attn is not in the image)"
timeout 200 python3 benchmarks/bench_step.py --device cuda --presets small,base,large --batch 32 --steps 10 \
    --zero 1 --json "$OUT/step.json" || status=1
exit $status
