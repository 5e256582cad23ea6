"""benchmarks/bench_data.py (issue 19) runs end to end on a tiny corpus and writes the figures the issue
asks for; the demand and cores-per-GPU follow from vaemo-flops' accounting."""

import json
import os
import subprocess
import sys
from pathlib import Path

from vaemo_dist.config import load_config
from vaemo_dist.model.flops import PEAK_TFLOPS, account

ROOT = Path(__file__).resolve().parents[1]


def test_bench_data_writes_supply_demand_and_cores_per_gpu(tmp_path):
    out, md = tmp_path / "data.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--config", "configs/stage1/tiny.yaml",
           "--repeats", "1,2", "--clips", "3", "--size", "32", "--codecs", "h264", "--passes", "1",
           "--json", str(out), "--update", str(md)]
    # A subprocess: the benchmark pins its process to one core.
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    cfg = load_config(ROOT / "configs/stage1/tiny.yaml")
    demand = PEAK_TFLOPS["H100"] * 1e12 * 0.4 / account(cfg.model, cfg.inputs).train_flops
    assert abs(res["gpu_demand_samples_per_s"] - demand) < 1e-6 * demand
    assert set(res["repeats"]) == {"1", "2"} and res["floor_clips_per_s_per_core"] > 0
    for r, row in res["repeats"].items():
        assert row["samples_per_s_per_core"] > 0
        assert abs(res["cores_per_gpu"][r] - demand / row["samples_per_s_per_core"]) < 1e-6 * demand
    text = md.read_text()
    assert "## Other\n\nkept" in text and "## Data rate (issue 19)" in text and "| h264@32 | 2 |" in text
