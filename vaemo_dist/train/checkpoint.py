"""Checkpoints that are published atomically and resume to the exact step and data position.

Layout under `<run>/checkpoints/`:
    step_00000050/           DeepSpeed's files (model, optimizer partitions, scheduler)
        vaemo_rank00000.json our per-rank state: step, data position, skip counts
        rng_rank00000.safetensors
        config.yaml          the run's full config
    latest                   the name of the newest complete checkpoint

A checkpoint is written under `.tmp-step_...`, renamed into place once every rank has finished,
and only then named in `latest` (itself replaced atomically). A process killed mid-save leaves
`latest` pointing at the previous complete checkpoint.

Loading never unpickles arbitrary objects: DeepSpeed's files are read with torch.load(weights_only=True)
and our own state is JSON and safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from vaemo_dist.dist import barrier
from vaemo_dist.fsutil import write_atomic

log = logging.getLogger(__name__)

LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"




def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine: Any,
    ckpt_root: Path,
    step: int,
    rank: int,
    state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint folder."""
    tag = tag_for(step)
    tmp, final = ckpt_root / (TMP_PREFIX + tag), ckpt_root / tag
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash at this step
    barrier()
    engine.save_checkpoint(str(ckpt_root), tag=TMP_PREFIX + tag, save_latest=False)
    write_atomic(tmp / f"vaemo_rank{rank:05d}.json", json.dumps({"step": step, **state}, indent=1))
    save_file(rng_state(), str(tmp / f"rng_rank{rank:05d}.safetensors"))
    if rank == 0:
        write_atomic(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    barrier()
    if rank == 0:
        if final.exists():  # the same step written again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        write_atomic(ckpt_root / LATEST, tag)
        _prune(ckpt_root, keep_last)
    barrier()
    return final


def _prune(ckpt_root: Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve(which: str, ckpt_root: Path) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none yet); a path -> itself."""
    if which == LATEST:
        pointer = ckpt_root / LATEST
        if not pointer.exists():
            return None
        folder = ckpt_root / pointer.read_text().strip()
    else:
        folder = Path(which)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    return folder


def deepspeed_safe_globals() -> list[Any]:
    """The few DeepSpeed classes its checkpoints hold besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: Any, map_location: Any = "cpu", mmap: bool | None = None, **_ignored: Any) -> Any:
    """torch.load with weights_only=True (whatever the caller asked) and DeepSpeed's classes allowed:
    the one loader of DeepSpeed files, for resume (as DeepSpeed's checkpoint engine) and for export."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)


def load_checkpoint(engine: Any, folder: Path, rank: int) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG; return our per-rank state dict."""
    engine.checkpoint_engine.load = safe_torch_load  # DeepSpeed's own loader unpickles freely
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {folder}")
    state_file = folder / f"vaemo_rank{rank:05d}.json"
    if not state_file.exists():
        raise CheckpointError(f"{state_file} is missing: was the checkpoint written with another world size?")
    set_rng_state(load_file(str(folder / f"rng_rank{rank:05d}.safetensors")))
    return json.loads(state_file.read_text())
