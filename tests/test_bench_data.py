"""benchmarks/bench_data.py (issue 19) runs end to end on a tiny corpus and writes the figures the issue
asks for; the demand and cores-per-GPU follow from vaemo-flops' accounting; the finish modes, the DALI
CPU rows, the multi-core rows and the "## Decode" alias (bench_decode.py) are all there."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vaemo_dist.config import DataConfig, load_config
from vaemo_dist.model.flops import PEAK_TFLOPS, account

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/stage1/tiny.yaml", "--clips", "3", "--size", "32", "--passes", "1"]
HAS_FINISH = any(f.name == "finish" for f in DataConfig.__dataclass_fields__.values())


def run_bench(args: list[str], script: str = "bench_data.py", hide_finish: bool = False) -> None:
    """The benchmark in a subprocess: it pins its process to one core. `hide_finish`: as a version of
    DataConfig without the `finish` field would run it (bench_data.has_field says no)."""
    if hide_finish:
        code = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_data as b; real = b.has_field; "
                "b.has_field = lambda n: n != 'finish' and real(n); raise SystemExit(b.main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def demand_tiny() -> float:
    cfg = load_config(ROOT / "configs/stage1/tiny.yaml")
    return PEAK_TFLOPS["H100"] * 1e12 * 0.4 / account(cfg.model, cfg.inputs).train_flops


@pytest.mark.skipif(not HAS_FINISH, reason="this version's DataConfig has no finish field")
def test_bench_data_writes_supply_demand_and_cores_per_gpu(tmp_path):
    out, md = tmp_path / "data.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    run_bench([*TINY, "--repeats", "1,2", "--codecs", "h264", "--json", str(out), "--update", str(md)])
    res = json.loads(out.read_text())
    demand = demand_tiny()
    assert abs(res["gpu_demand_samples_per_s"] - demand) < 1e-6 * demand
    assert set(res["repeats"]) == {"1", "2"} and res["floor_clips_per_s_per_core"] > 0
    lean = res["codecs"]["h264@32"]["lean_floor_clips_per_s_per_core"]  # the floor as lean as the loader
    assert lean > 0
    # Both finish modes measured; every synthetic clip went out raw, so the headline is the device mode.
    assert res["finish_modes"] == ["loader", "device"] and res["headline_finish"] == "device"
    assert set(res["finish"]) == {"loader", "device"}
    for r, row in res["repeats"].items():
        assert row["samples_per_s_per_core"] > 0
        assert row["samples_per_s_per_core"] == res["samples_per_s_per_core"][r]
        assert row == res["finish"]["device"]["repeats"][r]
        assert abs(res["cores_per_gpu"][r] - demand / row["samples_per_s_per_core"]) < 1e-6 * demand
        # The device's share is its own figure, not folded into the loader's samples/s.
        assert row["raw_fraction"] == 1.0 and row["device_ms_per_sample_on_this_cpu"] > 0
        per_s, ms = row["device_samples_per_s_on_this_cpu"], row["device_ms_per_sample_on_this_cpu"]
        assert abs(per_s * ms - 1e3) < 1e-6
        assert "device_ms_per_sample_on_this_cpu" not in res["finish"]["loader"]["repeats"][r]
        assert abs(row["ratio_to_lean_floor_per_clip"] * lean * int(r) - row["samples_per_s_per_core"]) < 1e-6
    text = md.read_text()
    assert "## Other\n\nkept" in text and "## Data rate (issue 19)" in text
    assert "| h264@32 | 2 | loader |" in text and "| h264@32 | 2 | device |" in text
    assert "| PyAV bare decode (floor) | h264@32 | 1 |" in text


def test_bench_data_runs_loader_only_without_a_finish_field(tmp_path):
    out = tmp_path / "data.json"
    run_bench([*TINY, "--repeats", "1", "--codecs", "h264", "--json", str(out)], hide_finish=True)
    res = json.loads(out.read_text())
    assert res["finish_modes"] == ["loader"] and res["headline_finish"] == "loader"
    assert set(res["finish"]) == {"loader"} and res["repeats"] == res["finish"]["loader"]["repeats"]
    assert "raw_fraction" not in res["repeats"]["1"]


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="NVIDIA DALI not installed")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the 2-core rows need 2 CPUs")
def test_bench_decode_alias_reproduces_the_decode_rows(tmp_path):
    """bench_decode.py = bench_data.py with DALI CPU and 1- and 2-core rows, updating "## Decode"."""
    out, md = tmp_path / "decode.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n## Decode\n\nold\n\n## Data rate (issue 19)\n\nkept\n")
    run_bench([*TINY, "--finish", "loader", "--json", str(out), "--update", str(md)],
              script="bench_decode.py")
    res = json.loads(out.read_text())
    assert set(res["codecs"]) == {"vp9@32", "h264@32"} and set(res["repeats"]) == {"1"}
    vp9, h264 = res["codecs"]["vp9@32"], res["codecs"]["h264@32"]
    assert "dali" not in h264  # DALI's CPU backend decodes VP9 only
    assert vp9["dali"]["threads"] == 1 and vp9["dali"]["samples_per_s_per_core"] > 0
    # DALI against the PyAV path on the same clips, within the tolerances test_decode_dali.py states.
    parity = vp9["dali_parity"]
    assert parity["frames_mean_abs_per_255"] < 2.0 and parity["log_mel_mean_abs_db"] < 0.1
    for codec in (vp9, h264):
        two = codec["procs"]["2"]
        floor2 = two["floor_clips_per_s"]
        assert floor2 > 0 and abs(two["floor_clips_per_s_per_core"] * 2 - floor2) < 1e-9 * floor2
        assert two["pyav"]["loader"]["samples_per_s"] > 0
    assert vp9["procs"]["2"]["dali"]["threads"] == 2 and "dali" not in h264["procs"]["2"]
    text = md.read_text()
    assert "## Decode\n\nold" not in text and "## Decode\n" in text
    assert "## Data rate (issue 19)\n\nkept" in text
    for row in ("| DALI CPU loader, 1 thread | vp9@32 | 1 |", "| DALI CPU loader, 2 threads | vp9@32 | 2 |",
                "| PyAV bare decode (floor), 2 proc | h264@32 | 2 |",
                "| PyAV loader, finish loader, 2 workers | h264@32 | 2 |"):
        assert row in text, row
