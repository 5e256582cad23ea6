"""The profiler window and the peak-memory figures of the per-step metrics, without a process group.
A real run's traces: tests/integration/test_stage1_run.py::test_two_nodes_over_torchrun_rendezvous."""

import contextlib
import json
from pathlib import Path

import torch

from vaemo_dist.config import ProfileConfig
from vaemo_dist.train.metrics import memory_stats, profile_window

CPU = torch.device("cpu")


def _loop(window, first_step: int, last_step: int) -> None:
    """The trainer's use of the window: prof.step() at the start of every step, then the step's work."""
    x = torch.randn(32, 32)
    with window as prof:
        for step in range(first_step + 1, last_step + 1):
            if prof is not None:
                prof.step()
            with torch.profiler.record_function(f"train_step_{step}"):
                (x @ x).sum()


def _events(run_dir, rank: int = 0) -> list[dict]:
    (trace,) = (run_dir / "profile").glob(f"rank{rank}.*.json")
    return json.loads(trace.read_text())["traceEvents"]


def test_the_window_records_exactly_the_chosen_steps_also_after_a_resume(tmp_path, caplog):
    caplog.set_level("INFO", logger="vaemo_dist.train.metrics")
    cfg = ProfileConfig(start_step=3, steps=2)
    for first_step in (0, 1):  # a fresh run, and one resumed after step 1
        run_dir = tmp_path / f"from{first_step}"
        _loop(profile_window(cfg, 0, run_dir, CPU, first_step, 7), first_step, 7)
        names = {e["name"] for e in _events(run_dir)}
        assert sorted(n for n in names if n.startswith("train_step_")) == ["train_step_3", "train_step_4"]
        # The profiler counts this process's steps: on a fresh run its numbers are the trainer's.
        steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
        assert steps == [f"ProfilerStep#{3 - first_step}", f"ProfilerStep#{4 - first_step}"]
        assert "aten::mm" in names
    # Rank 0 logs the top ops by self time at the end of the window.
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("profile of steps 3-4")]
    assert len(tables) == 2 and "aten::mm" in tables[0] and "Self CPU" in tables[0]


def test_off_other_ranks_and_a_past_window_cost_nothing(tmp_path, caplog):
    caplog.set_level("INFO", logger="vaemo_dist.train.metrics")
    on = ProfileConfig(start_step=2, steps=5, ranks=[1])
    for window in (profile_window(ProfileConfig(), 0, tmp_path, CPU, 0, 3),  # start_step 0: off
                   profile_window(on, 0, tmp_path, CPU, 0, 3),  # rank 0 does not profile
                   profile_window(on, 1, tmp_path, CPU, 5, 9)):  # resumed after the window
        assert isinstance(window, contextlib.nullcontext)
    assert not (tmp_path / "profile").exists()
    _loop(profile_window(on, 1, tmp_path, CPU, 0, 3), 0, 3)  # the run ends inside the window: still written
    assert {e["name"] for e in _events(tmp_path, rank=1)} >= {"train_step_2", "train_step_3"}
    # The first profiled rank logs the table, naming only the steps the run has.
    assert any(r.getMessage().startswith("profile of steps 2-3") for r in caplog.records)


def _rss_gib() -> float:
    """This process's resident size now (Linux)."""
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(ln for ln in status if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 2**20


def test_cpu_memory_is_the_peak_resident_size_and_never_goes_down():
    stats = memory_stats(CPU)
    assert set(stats) == {"mem_peak_gib"}  # mem_reserved_gib only on CUDA
    first = stats["mem_peak_gib"]
    assert first > 0.05 and first >= _rss_gib() - 0.01  # read a moment apart
    big = torch.ones(64, 2**20)  # 256 MiB, touched
    now = _rss_gib()
    second = memory_stats(CPU)["mem_peak_gib"]
    assert second >= max(first, now - 0.01)
    del big
    assert memory_stats(CPU)["mem_peak_gib"] >= second  # a peak: freeing does not lower it
