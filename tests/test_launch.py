"""What a launch does before training: it never writes over an earlier run, says a config error once,
and names the way out when the rendezvous port is taken (vaemo_dist/launch.py, vaemo_dist/dist.py)."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import REPO, SMALL, free_port, output, run_env, run_stage1
from vaemo_dist.config import SynthConfig, load_config
from vaemo_dist.data.synth import build_corpus
from vaemo_dist.launch import check_run_folder

RUN = ["train.steps=4", "train.ckpt_every=2"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(SynthConfig(clips=16, clips_per_shard=8, classes=4, size=64, duration=1.0),
                        tmp_path_factory.mktemp("corpus") / "synth", progress=False)


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> Path:
    """A finished 4-step run of one process, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("runs") / "finished"
    proc = run_stage1(run_dir, corpus, 1, *RUN)
    assert proc.returncode == 0, output(proc)[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    return run_dir


def test_a_second_launch_into_a_finished_run_exits_2_and_changes_nothing(finished, corpus):
    before = snapshot(finished)
    assert "metrics.jsonl" in before and "checkpoints/latest" in before
    assert any(name.startswith("checkpoints/step_00000004/") for name in before)
    proc = run_stage1(finished, corpus, 1, *RUN, "train.steps=2")
    assert proc.returncode == 2, output(proc)[-3000:]
    err = proc.stderr
    assert f"refusing to write into {finished}" in err and "metrics.jsonl with 4 lines" in err
    assert "checkpoints/latest -> step_00000004" in err
    for way in ("--resume latest", "train.run_name=<a new name>", "train.overwrite=true",
                "finished.old-<timestamp> (never deleted)"):
        assert way in err, err
    assert "Traceback" not in output(proc)
    assert snapshot(finished) == before  # metrics.jsonl, checkpoints and latest byte for byte
    assert sorted(p.name for p in finished.parent.iterdir()) == ["finished"]


def test_overwrite_moves_the_earlier_run_aside_and_starts_afresh(finished, corpus, tmp_path):
    run_dir = tmp_path / "again"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    proc = run_stage1(run_dir, corpus, 1, *RUN, "train.steps=2", "train.overwrite=true")
    assert proc.returncode == 0, output(proc)[-3000:]
    (aside,) = tmp_path.glob("again.old-*")
    assert snapshot(aside) == before  # the earlier run, whole, under its new name
    assert f"moved the earlier run {run_dir} aside to {aside}" in output(proc)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"


def test_check_run_folder_allows_new_empty_and_resumed_runs(tmp_path):
    def problem(*overrides: str) -> str | None:
        return check_run_folder(load_config("configs/stage1/tiny.yaml",
                                            [f"train.out_dir={tmp_path}", "train.run_name=r", *overrides]))

    assert problem() is None  # no folder yet
    (tmp_path / "r").mkdir()
    assert problem() is None  # an empty folder (made by hand, or by a run that died at once)
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    assert "refusing to write into" in problem()
    assert problem("train.resume=latest") is None
    assert problem("train.overwrite=true") is None
    assert "contradict" in problem("train.overwrite=true", "train.resume=latest")


def _two_processes(*args: str, port: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(port or free_port()), "launchers/stage1.py", "--config", "configs/stage1/tiny.yaml", *SMALL,
           *args]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)


def test_a_config_error_is_said_once_by_two_processes(tmp_path):
    proc = _two_processes(f"train.out_dir={tmp_path}", "model.dpth=3")
    assert proc.returncode == 2, output(proc)[-3000:]
    assert output(proc).count("unknown config key 'model.dpth'") == 1, output(proc)[-3000:]
    assert not any(tmp_path.iterdir())


def test_a_taken_rendezvous_port_is_named_with_the_way_out(corpus, tmp_path):
    """Another run holds the port (here: a socket listening on it): one line naming the port and
    --master_port, exit 2, no traceback."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _two_processes(f"data.shards={corpus}", f"train.out_dir={tmp_path}", "train.run_name=r",
                              "train.steps=2", port=port)
    text = output(proc)
    assert proc.returncode == 2, text[-3000:]
    said = f"rendezvous port {port} (MASTER_PORT) is already in use"
    lines = [line for line in text.splitlines() if said in line]
    assert len(lines) == 1, text[-3000:]
    assert "deepspeed --master_port" in lines[0] and "torchrun --master_port" in lines[0]
    assert "Traceback" not in text
