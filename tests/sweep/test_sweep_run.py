"""Running a sweep with a stand-in launcher (fast): skip, resume, go on after a failure; the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaemo_dist.data.shards import expand_shards
from vaemo_dist.sweep.cli import main
from vaemo_dist.sweep.plan import STATUS_FILE, SweepError, build_points, checkpoint_step, load_spec
from vaemo_dist.sweep.run import run_sweep

REPO = Path(__file__).resolve().parents[2]


class FakeLauncher:
    """Trains a point from its checkpoint to the end (or to train.stop_at) by writing what a run leaves."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.fail = fail

    def __call__(self, spec, point, extra, verbose) -> int:
        self.calls.append((point.name, extra))
        folder = Path(spec.out_dir) / point.name
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        start = checkpoint_step(folder)
        if point.name in self.fail:
            return 1
        stop = next((int(e.split("=")[1]) for e in extra if e.startswith("train.stop_at=")), point.steps)
        with (folder / "metrics.jsonl").open("a") as f:
            for step in range(start + 1, stop + 1):
                f.write(json.dumps({"step": step, "loss": 3.0 / step, "samples_seen": step * 8}) + "\n")
        (folder / "checkpoints" / "latest").write_text(f"step_{stop:08d}")
        return 0


@pytest.fixture
def sweep3(write_sweep):
    spec = load_spec(write_sweep(grid={"preset": ["tiny"], "steps": [4, 8, 12]}))
    out = Path(spec.out_dir)
    for name, step in (("tiny-n4-s0", 4), ("tiny-n8-s0", 4)):  # done, interrupted
        (out / name / "checkpoints").mkdir(parents=True)
        (out / name / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    return spec


def test_run_skips_done_resumes_interrupted_and_goes_on_after_a_failure(sweep3, capsys):
    launcher = FakeLauncher(fail=("tiny-n8-s0",))
    assert run_sweep(sweep3, launcher=launcher) == 1
    assert [c[0] for c in launcher.calls] == ["tiny-n8-s0", "tiny-n12-s0"]
    out = capsys.readouterr().out
    assert "[1/3] tiny-n4-s0: done (step 4/4), skipped" in out
    assert "[2/3] tiny-n8-s0: resuming from step 4" in out and "[2/3] tiny-n8-s0: FAILED (exit 1)" in out
    assert "[3/3] tiny-n12-s0: starting, 12 steps" in out and "[3/3] tiny-n12-s0: done in" in out
    assert "2 done, 1 failed" in out and "failed: tiny-n8-s0" in out
    folder = Path(sweep3.out_dir)
    assert json.loads((folder / "tiny-n8-s0" / STATUS_FILE).read_text())["returncode"] == 1
    assert (folder / "sweep.json").is_file()

    # Again, with the failure gone: only the failed point runs, from its checkpoint.
    launcher = FakeLauncher()
    assert run_sweep(sweep3, launcher=launcher) == 0
    assert [c[0] for c in launcher.calls] == ["tiny-n8-s0"]
    lines = (folder / "tiny-n8-s0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [5, 6, 7, 8]
    assert "3 done" in capsys.readouterr().out


def test_only_and_extra_overrides(sweep3, capsys):
    launcher = FakeLauncher()
    assert run_sweep(sweep3, only=["2", "tiny-n8-s0"], extra=["train.stop_at=6"], launcher=launcher) == 0
    assert launcher.calls == [("tiny-n8-s0", ["train.stop_at=6"]), ("tiny-n12-s0", ["train.stop_at=6"])]
    out = capsys.readouterr().out
    assert "[2/3] tiny-n8-s0: stopped at step 6/8" in out and "(resumable)" in out
    assert "1 done, 2 interrupted" in out
    with pytest.raises(SweepError, match="--only tiny-n9-s0: no such point"):
        run_sweep(sweep3, only=["tiny-n9-s0"], launcher=launcher)


def test_a_data_fraction_of_the_synthetic_corpus_builds_it_first(write_sweep, tmp_path):
    corpus = tmp_path / "corpus"
    spec = load_spec(write_sweep(
        overrides={"data.synth.dir": str(corpus), "data.synth.clips": 4, "data.synth.clips_per_shard": 2,
                   "data.synth.size": 64},
        grid={"data_fraction": [0.5], "steps": [2]}))
    launcher = FakeLauncher()
    assert run_sweep(spec, launcher=launcher) == 0
    (point,) = build_points(spec)
    (shards,) = [o.split("=", 1)[1] for o in point.overrides if o.startswith("data.shards=")]
    assert expand_shards(shards) == [str(corpus / "shard-000000.tar")]  # exists now


def test_a_data_fraction_of_the_users_shards_never_builds_the_synthetic_corpus(write_sweep, tiny_corpus,
                                                                             tmp_path):
    synth = tmp_path / "synthetic"
    spec = load_spec(write_sweep(
        overrides={"data.shards": str(tiny_corpus), "data.synth.dir": str(synth), "data.synth.clips": 4,
                   "data.synth.clips_per_shard": 2, "data.synth.size": 64},
        grid={"data_fraction": [0.5], "steps": [2]}))
    assert run_sweep(spec, launcher=FakeLauncher()) == 0
    assert not synth.exists()
    (point,) = build_points(spec)
    assert not point.synthetic_data and not any(o.startswith("eval.shards=") for o in point.overrides)
    (shards,) = [o.split("=", 1)[1] for o in point.overrides if o.startswith("data.shards=")]
    assert expand_shards(shards) == expand_shards(str(tiny_corpus))[:2]


def test_a_cut_of_the_synthetic_corpus_is_still_evaluated_on_synthetic_clips(write_sweep, tmp_path):
    spec = load_spec(write_sweep(overrides={"data.synth.dir": str(tmp_path / "corpus")},
                                 grid={"data_fraction": [0.5, 1.0], "steps": [2]}))
    half, full = build_points(spec)
    assert half.synthetic_data and full.synthetic_data
    assert "eval.shards=synthetic" in half.overrides  # data.shards names shards of the synthetic corpus
    assert not any(o.startswith("eval.shards=") for o in full.overrides)  # auto: synthetic already


def test_cli_plan_report_and_errors(write_sweep, tmp_path, capsys):
    path = write_sweep(grid={"preset": ["tiny", "small"], "steps": [3]})
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-n3-s0" in out and "small-n3-s0" in out and "new" in out
    assert main(["plan", str(path), "--emit", "commands"]) == 0
    assert capsys.readouterr().out.count("deepspeed --num_gpus 2") == 2
    assert main(["plan", str(path), "--emit", "slurm"]) == 0
    folder = Path(load_spec(path).out_dir)
    assert "#SBATCH --array=0,1" in (folder / "sweep.sbatch").read_text()
    assert main(["report", str(folder)]) == 0
    assert (folder / "scaling.csv").is_file() and (folder / "scaling.png").is_file()
    capsys.readouterr()

    bad = write_sweep(name="bad", grid={"preset": ["tiny"], "stepz": [3]})
    assert main(["plan", str(bad)]) == 2
    assert "sweep error: unknown grid axis 'grid.stepz'. Did you mean 'steps'?" in capsys.readouterr().err
    assert main(["run", str(path), "oops"]) == 2
    assert "extra overrides are key=value" in capsys.readouterr().err


def test_a_stop_reaches_the_sweep_even_when_it_was_started_with_sigint_ignored(write_sweep, monkeypatch,
                                                                              capsys):
    """A sweep started in the background of a script (`cmd &`) inherits SIGINT ignored, and Python then
    leaves it ignored: the sweep sets its own handler, and gives the caller's back when it returns."""
    import vaemo_dist.sweep.run as sweep_run

    def stopped_run(spec, **kwargs) -> int:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs here
        return 0

    monkeypatch.setattr(sweep_run, "run_sweep", stopped_run)
    path = write_sweep(grid={"steps": [3]})
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["run", str(path)]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, before)
    assert "run the same command again to resume" in capsys.readouterr().err


FAKE_STAGE = """import os, sys, time
open(os.environ["FAKE_PIDFILE"], "w").write(str(os.getpid()))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie waiting for its reaper has ended


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_sweep_stops_the_running_point_and_its_ranks(write_sweep, tmp_path, sig):
    """Through the real deepspeed launcher, with a stand-in stage script that sleeps."""
    script, pidfile = tmp_path / "fake_stage.py", tmp_path / "rank.pid"
    script.write_text(FAKE_STAGE)
    path = write_sweep(launch={"nproc": 1, "script": str(script), "env": {"FAKE_PIDFILE": str(pidfile)}},
                       grid={"steps": [3]})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "vaemo_dist.sweep", "run", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    rank = int(pidfile.read_text())
    assert _alive(rank)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "run the same command again to resume" in err
    deadline = time.monotonic() + 10
    while _alive(rank) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(rank), "the rank outlived the sweep"
