"""A bad config fails before any process group starts, naming the key and what is allowed.

The launcher runs as rank 0 of a claimed 2-process world whose other rank never comes: had it tried to
start the process group, it would wait there (the test's timeout would fail it) instead of exiting 2."""

import subprocess
import sys
import time

import pytest

from tests.launching import REPO, free_port, run_env

CASES = [
    (["model.dpth=3"], ["unknown config key 'model.dpth'", "Did you mean 'depth'", "Valid keys in 'model'"]),
    (["train.steps=ten"], ["train.steps: expected an integer, got 'ten'"]),
    (["train.precision=fp16"],
     ["train.precision: 'fp16' is not allowed; choose one of ['auto', 'fp32', 'bf16']"]),
    (["model.mask_ratio_video=1.2"], ["model.mask_ratio_video: 1.2 must be in [0, 1)"]),
    (["parallel.tensor=2"], ["parallel.tensor: 2 must divide model.heads (3)"]),
    (["parallel.tensor=3", "model.decoder_heads=3", "model.decoder_dim=96"],
     ["parallel.tensor: 3 must divide the world size (2)"]),
    (["data.global_batch_size=7"],
     ["data.global_batch_size: 7 is not divisible by the data-parallel size 2"]),
    (["data.global_batch_size=12", "data.batch_size=4"],
     ["data.global_batch_size: 12 != data.batch_size (4) x train.grad_accum (1) x data-parallel size (2) = 8",
      "set data.batch_size=6"]),
]


@pytest.mark.parametrize("overrides, fragments", CASES, ids=[c[0][0] for c in CASES])
def test_bad_config_fails_before_the_process_group(overrides, fragments, tmp_path):
    env = run_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "launchers/stage1.py", f"train.out_dir={tmp_path}", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # no run folder, corpus or checkpoint was started
    assert time.monotonic() - started < 60


def _claimed_world(rank: int) -> dict[str, str]:
    """This process as rank `rank` of a 2-process world whose other rank never comes."""
    return run_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))


def test_config_error_is_printed_by_rank_0_only(tmp_path):
    quiet = subprocess.run([sys.executable, "launchers/stage1.py", f"train.out_dir={tmp_path}",
                            "model.dpth=3"], cwd=REPO, env=_claimed_world(1), capture_output=True, text=True,
                           timeout=120)
    assert quiet.returncode == 2
    assert "config error" not in quiet.stderr + quiet.stdout and "model.dpth" not in quiet.stderr


def _folder_with(path, name: str, content: bytes) -> dict:
    path.mkdir(parents=True)
    (path / name).write_bytes(content)
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_an_earlier_run_is_refused_before_the_process_group(tmp_path):
    run = tmp_path / "runs" / "mine"
    before = _folder_with(run, "metrics.jsonl", b'{"step": 1, "loss": 2.0}\n')
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "launchers/stage1.py", f"train.out_dir={run.parent}",
                           "train.run_name=mine", f"data.shards={tmp_path / 'none'}"],
                          cwd=REPO, env=_claimed_world(0), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"refusing to write into {run}" in proc.stderr and "metrics.jsonl with 1 lines" in proc.stderr
    for way in ("--resume latest", "train.run_name=", "train.overwrite=true", "mine.old-<timestamp>"):
        assert way in proc.stderr, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["mine"]
    assert time.monotonic() - started < 60


def test_resume_and_overwrite_together_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "launchers/stage1.py", f"train.out_dir={tmp_path}", "--resume",
                           "latest", "train.overwrite=true", f"data.shards={tmp_path / 'none'}"],
                          cwd=REPO, env=_claimed_world(0), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "contradict each other" in proc.stderr, proc.stderr[-2000:]


def test_a_users_folder_as_the_synthetic_corpus_is_refused_before_the_process_group(tmp_path):
    mine = tmp_path / "my-clips"
    before = _folder_with(mine, "clip.mp4", b"my own clip")
    proc = subprocess.run([sys.executable, "launchers/stage1.py", f"train.out_dir={tmp_path / 'runs'}",
                           f"data.synth.dir={mine}"],
                          cwd=REPO, env=_claimed_world(0), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"data.synth.dir: refusing to write into {mine}" in proc.stderr
    assert "vaemo-synth --out" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-clips"]
