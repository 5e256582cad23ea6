#!/usr/bin/env bash
# The GPU check, as ONE device call (about 5 minutes on an H200). Prepare here first:
#   bash benchmarks/device/wheels.sh
# then, with the device tool:
#   run(command="bash benchmarks/device/check.sh", carry=[".whl"], timeout_s=540)
# Results come back under $OUT: log.txt, kernel_parity.json, kernels.json, step.json, supply.json,
# finish.json. Record them in
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
echo "== 4. data supply at the base preset: short stage-1 runs on synthetic media (PyAV on 8 workers)"
# DALI cannot travel here (benchmarks/device/wheels.sh says why), so the GPU decode rate is not measured;
# this measures what the CPU path leaves the GPU waiting (data_wait_frac): data.finish=device (the GPU
# default: workers only decode) at repeats 1 and 4, and data.finish=loader (workers preprocess) at 1.
for run in device:1 device:4 loader:1; do
  f=${run%%:*}; r=${run##*:}
  timeout 110 python3 launchers/stage1.py --config configs/stage1/base.yaml data.shards=synthetic \
      data.synth.dir=/tmp/synth-base data.synth.clips=512 data.synth.clips_per_shard=32 data.synth.size=224 \
      data.num_workers=8 data.batch_size=32 data.repeats=$r data.finish=$f train.steps=15 train.zero_stage=1 \
      train.run_name=supply-$f-r$r train.out_dir=/tmp/runs eval.every=0 wandb.mode=disabled || status=1
  python3 - "$f-r$r" "$OUT/supply.json" <<'PY' || status=1
import json, sys
r, out = sys.argv[1], sys.argv[2]
recs = [json.loads(line) for line in open(f"/tmp/runs/supply-{r}/metrics.jsonl") if '"loss"' in line]
last = recs[5:] or recs  # past the first steps (compile, worker start)
keys = ("data_wait_frac", "samples_per_s", "step_time_s", "tflops_per_device")
row = {k: sum(x[k] for x in last) / len(last) for k in keys}
try:
    got = json.load(open(out))
except OSError:
    got = {}
got[r] = row
json.dump(got, open(out, "w"), indent=1)
print(f"{r}:", row)
PY
done
echo "== 5. the device's share of data.finish=device: Batch.to(cuda) per sample at base shapes"
timeout 60 python3 benchmarks/device/finish_cost.py --json "$OUT/finish.json" || status=1
exit $status
