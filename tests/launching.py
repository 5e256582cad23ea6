"""Launching real runs from tests: small settings, free ports, the deepspeed launcher, and a local S3
server in the environment. Shared by tests/integration, tests/faults and tests/sweep."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from vaemo_dist.dist import free_port  # noqa: F401 - re-exported for the tests

REPO = Path(__file__).resolve().parents[1]

# Small inputs and model: a step takes a fraction of a second on 2 cores. Later overrides win.
SMALL = [
    "train.log_every=1", "train.zero_stage=1", "optim.warmup_steps=1", "optim.lr=1e-3",
    "inputs.video.frames=8", "inputs.video.size=64", "inputs.audio.frames=128",
    "model.depth=2", "model.decoder_depth=1", "data.batch_size=4", "data.num_workers=1",
    "wandb.mode=disabled", "eval.every=0",
]


def stage1_command(run_dir: Path, shards: str | Path, nproc: int, *extra: str,
                   script: str = "launchers/stage1.py") -> list[str]:
    """`deepspeed --num_gpus nproc launchers/stage1.py ...` (or the launcher alone for one process);
    `script`: another entry point taking the same arguments (a test's probe around run_stage)."""
    launcher = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                 str(free_port())] if nproc > 1 else [sys.executable])
    return [*launcher, script, "--config", "configs/stage1/tiny.yaml", *SMALL,
            f"data.shards={shards}", f"train.out_dir={run_dir.parent}", f"train.run_name={run_dir.name}",
            *extra]


def run_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    env.pop("WANDB_API_KEY", None)
    env.pop("VAEMO_FAULTS", None)
    env.update(extra)
    return env


def run_stage1(run_dir: Path, shards: str | Path, nproc: int, *extra: str, faults: str = "",
               env: dict[str, str] | None = None, timeout: float = 300,
               script: str = "launchers/stage1.py") -> subprocess.CompletedProcess:
    full_env = run_env(**(env or {}))
    if faults:
        full_env["VAEMO_FAULTS"] = faults
    return subprocess.run(stage1_command(run_dir, shards, nproc, *extra, script=script), cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@contextlib.contextmanager
def s3_environment(server: object) -> Iterator[None]:
    """Point this process's storage layer (and the runs it starts) at a started LocalS3 server."""
    from vaemo_dist.data import storage

    env = server.env()  # type: ignore[attr-defined]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage.reset()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.reset()
