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
