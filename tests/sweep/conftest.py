"""Sweep files written into a test's folder, on top of the repository's tiny stage-1 config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "stage1" / "tiny.yaml"

# The small inputs of tests/integration/test_stage1_run.py: FLOPs and params stay cheap to account.
SMALL_INPUTS = {"inputs.video.frames": 8, "inputs.video.size": 64, "inputs.audio.frames": 128,
                "data.batch_size": 4}


@pytest.fixture
def write_sweep(tmp_path: Path) -> Callable[..., Path]:
    """write_sweep(grid=..., **top-level keys) -> the path of a sweep file whose runs go under tmp_path."""

    def write(name: str = "t", **fields: Any) -> Path:
        spec = {"name": name, "config": str(TINY_CONFIG), "out_dir": str(tmp_path / "sweeps" / name),
                "launch": {"nproc": 2}, "overrides": dict(SMALL_INPUTS), **fields}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return write
