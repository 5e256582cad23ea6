"""A real micro sweep through `python -m vaemo_dist.sweep` and the deepspeed launcher (1 CPU process per
point): the first point is interrupted, the sweep resumes it, and a finished point is never run again.
The commands that launch nothing (plan, report, a run with every point done) run in this process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from vaemo_dist.sweep.cli import main

REPO = Path(__file__).resolve().parents[2]

# Small inputs and model (tests/integration/test_stage1_run.py): a step takes a fraction of a second.
OVERRIDES = {
    "inputs.video.frames": 8, "inputs.video.size": 64, "inputs.audio.frames": 128,
    "model.depth": 2, "model.decoder_depth": 1, "data.batch_size": 4, "data.num_workers": 1,
    "optim.warmup_steps": 1, "train.log_every": 1, "wandb.mode": "disabled", "eval.every": 0,
}


def sweep(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "vaemo_dist.sweep", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def sweep_here(capsys, *args: str) -> str:
    """The same command line in this process (no launch: plan, report, a run with every point done):
    its stdout."""
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def steps_logged(folder: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (folder / "metrics.jsonl").read_text().splitlines()]


def test_micro_sweep_resumes_an_interrupted_point_and_never_reruns_a_finished_one(tiny_corpus, tmp_path,
                                                                                  capsys):
    out = tmp_path / "micro"
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump({
        "name": "micro", "config": str(REPO / "configs" / "stage1" / "tiny.yaml"), "out_dir": str(out),
        "launch": {"nproc": 1}, "overrides": {**OVERRIDES, "data.shards": str(tiny_corpus)},
        "grid": {"preset": ["tiny"], "steps": [6, 3]},
    }))
    first, second = out / "tiny-n6-s0", out / "tiny-n3-s0"

    # A time slice of the first point only: it stops with a checkpoint at step 3 of 6.
    proc = sweep("run", str(path), "--only", "tiny-n6-s0", "train.stop_at=3")
    assert "[1/2] tiny-n6-s0: stopped at step 3/6" in proc.stdout
    assert (first / "checkpoints" / "latest").read_text() == "step_00000003" and not second.exists()
    plan = sweep_here(capsys, "plan", str(path))
    assert "interrupted (checkpoint at step 3/6)" in plan and plan.rstrip().endswith("new")

    # The whole sweep: the first point continues from step 3, the second starts.
    proc = sweep("run", str(path))
    assert "[1/2] tiny-n6-s0: resuming from step 3" in proc.stdout
    assert "[2/2] tiny-n3-s0: starting" in proc.stdout and "2 done" in proc.stdout
    assert "resumed from" in (first / "launch.log").read_text()
    assert steps_logged(first) == [1, 2, 3, 4, 5, 6] and steps_logged(second) == [1, 2, 3]
    assert (first / "checkpoints" / "latest").read_text() == "step_00000006"

    # Once more: nothing is launched, nothing in the run folders changes.
    names = ("metrics.jsonl", "launch.log", "checkpoints/latest")
    files = [run / name for run in (first, second) for name in names]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    again = sweep_here(capsys, "run", str(path))
    assert "tiny-n6-s0: done (step 6/6), skipped" in again
    assert "tiny-n3-s0: done (step 3/3), skipped" in again
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before

    sweep_here(capsys, "report", str(out))
    rows = list(csv.DictReader((out / "scaling.csv").open()))
    assert [(r["name"], r["status"], r["steps_reached"]) for r in rows] == [
        ("tiny-n6-s0", "done", "6"), ("tiny-n3-s0", "done", "3")]
    assert (out / "scaling.png").stat().st_size > 0
