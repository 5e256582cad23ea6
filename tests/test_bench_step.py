"""benchmarks/bench_step.py's loop comparison (issue 19): the `vs plain` ratio and the refusals, without
running a model (the measured rows are in BENCHMARKS.md)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_step  # noqa: E402


def _row(loop: str, step_s: float, preset: str = "base") -> dict:
    return {"preset": preset, "decoder": "full", "loop": loop, "train_gflop_per_sample": 1.0, "params_m": 1.0,
            "batch": 2, "grad_accum": 1, "precision": "fp32", "zero": 1, "attention": "sdpa",
            "compile": False,
            "step_s": step_s, "first_step_s": 1.0, "samples_per_s": 1.0, "tflops": 0.1, "mfu": None,
            "peak_mem_gib": 1.0}


def test_vs_plain_is_the_step_over_the_same_presets_plain_loop():
    rows = [_row("plain", 2.0), _row("engine", 3.0), _row("engine", 5.0, preset="small")]
    lines = bench_step.table(rows).splitlines()
    assert len({ln.count("|") for ln in lines}) == 1  # header, rule and rows have the same columns
    cells = [[c.strip() for c in ln.split("|")] for ln in lines[2:]]
    assert [c[4] for c in cells] == ["1.00", "1.50", "-"]  # no plain row for small: no ratio
    # A row printed alone still finds the plain row among the run's rows.
    assert "| 1.50 |" in bench_step.table(rows[1:2], rows)


@pytest.mark.parametrize("argv", [["--loop", "fast"], ["--loop", "plain", "--precision", "bf16"]])
def test_bad_loops_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_step.main(argv)
    assert e.value.code == 2 and "--loop" in capsys.readouterr().err
