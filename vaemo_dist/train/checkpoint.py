"""Checkpoints that are published atomically and resume to the exact step and data position.

Layout under `<run>/checkpoints/`:
    step_00000050/           DeepSpeed's files (model, optimizer partitions, scheduler)
        vaemo_rank00000.json our per-rank state: step, data position, skip counts
        rng_rank00000.safetensors
        config.yaml          the run's full config
    latest                   the name of the newest complete checkpoint

A checkpoint is a dict of parts (`checkpoint_parts`) that save and restore themselves, in order: the
DeepSpeed engine (`EngineState`: model, optimizer, scheduler, in DeepSpeed's files), any parts with a
`state_dict()` / `load_state_dict()` (the data loader under "data", the trainer's counters under
"train", whose entries sit at the top of vaemo_rank*.json as they always did), and the RNG last
(`RNGState`: rng_rank*.safetensors).

A checkpoint is written under `.tmp-step_...`, renamed into place once every rank has finished,
and only then named in `latest` (itself replaced atomically). A process killed mid-save leaves
`latest` pointing at the previous complete checkpoint.

Loading never unpickles arbitrary objects: DeepSpeed's files are read with torch.load(weights_only=True)
and our own state is JSON and safetensors.

Resuming on another data-parallel size (`plan_resume`, checked by the launcher before any process
group starts): ZeRO-0 keeps everything whole in the model-states file and loads as is; for ZeRO 1-3,
whose optimizer partitions depend on the data-parallel size, global rank 0 converts the checkpoint
once with DeepSpeed's `ds_to_universal` into `step_.../universal/` (per-parameter fp32 weights and
Adam moments) and every rank loads it with DeepSpeed's `checkpoint.load_universal`, re-partitioned
for the new size. Tensor parallelism must stay the same; ZeRO-3 under tensor parallelism and NVMe
optimizer offload cannot be resized (refused at start-up, with the ways out).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from safetensors.torch import load_file, save_file

# Reading checkpoints is vaemo_dist/checkpoints.py; the names below are used here (and imported from
# here by older code).
from vaemo_dist.checkpoints import LATEST as LATEST
from vaemo_dist.checkpoints import CheckpointError as CheckpointError
from vaemo_dist.checkpoints import CheckpointMeta as CheckpointMeta
from vaemo_dist.checkpoints import read_meta as read_meta
from vaemo_dist.checkpoints import resolve as resolve
from vaemo_dist.checkpoints import safe_torch_load as safe_torch_load
from vaemo_dist.checkpoints import weights_only_torch as weights_only_torch
from vaemo_dist.dist import barrier
from vaemo_dist.fsutil import write_atomic

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
UNIVERSAL = "universal"  # the converted copy inside a step folder, for resuming on another DP size
# How long the other ranks wait for rank 0's conversion: it reads and writes the whole optimizer
# state once, which on a large model takes far longer than an ordinary collective may.
CONVERT_TIMEOUT_S = 3 * 3600


class ResumeError(CheckpointError):
    """The checkpoint cannot be resumed as this run is configured: reported at start-up."""


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


TOP_LEVEL = "train"  # the part whose state sits at the top of vaemo_rank*.json (step, non-finite steps)


class Stateful(Protocol):
    """A checkpoint part kept in this rank's vaemo_rank*.json, under its name: JSON in, JSON out."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SavesItself(Protocol):
    """A checkpoint part with files of its own in the step folder."""

    def save(self, folder: Path, rank: int) -> None: ...

    def load(self, folder: Path, rank: int) -> None: ...


Part = Stateful | SavesItself | dict  # a plain dict: JSON kept as it is, refilled in place on load


def rank_state_file(folder: Path, rank: int) -> Path:
    return folder / f"vaemo_rank{rank:05d}.json"


class EngineState:
    """Model, optimizer and LR scheduler, in DeepSpeed's own files (collective: every rank saves and
    loads). `universal`: load from that converted copy instead (a resize of ZeRO 1-3)."""

    def __init__(self, engine: Any, universal: Path | None = None) -> None:
        self.engine, self.universal = engine, universal

    def save(self, folder: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path, rank: int) -> None:
        load_model_state(self.engine, folder, self.universal)


class RNGState:
    """This process's torch (and CUDA) generators: rng_rank<R>.safetensors."""

    def save(self, folder: Path, rank: int) -> None:
        save_file(rng_state(), str(folder / f"rng_rank{rank:05d}.safetensors"))

    def load(self, folder: Path, rank: int) -> None:
        set_rng_state(load_file(str(folder / f"rng_rank{rank:05d}.safetensors")))


def checkpoint_parts(engine: Any, universal: Path | None = None, **states: Part) -> dict[str, Part]:
    """The parts of a checkpoint in the order they are saved and loaded: the engine (loading from
    `universal` when given), `states` (e.g. data=<the loader>, train=<the trainer's counters>), the RNG
    last (nothing is drawn after it is set)."""
    return {"model": EngineState(engine, universal), **states, "rng": RNGState()}


def save_checkpoint(
    parts: dict[str, Part],
    ckpt_root: Path,
    step: int,
    rank: int,
    config: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. Every part saves itself into the step folder, the Stateful ones
    into this rank's vaemo_rank*.json. Returns the published checkpoint folder."""
    tag = tag_for(step)
    tmp, final = ckpt_root / (TMP_PREFIX + tag), ckpt_root / tag
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash at this step
    barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"step": step}
    for name, part in parts.items():
        if hasattr(part, "save"):
            part.save(tmp, rank)
            continue
        own = dict(part) if isinstance(part, dict) else part.state_dict()
        if name == TOP_LEVEL:
            state.update(own)
        else:
            state[name] = own
    write_atomic(rank_state_file(tmp, rank), json.dumps(state, indent=1))
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


# DeepSpeed modules that call torch.load themselves: the universal-checkpoint converter and what it
# reads with, and the loaders of a universal checkpoint (per-parameter files, the optimizer's state).
_CONVERTER_MODULES = ("deepspeed.checkpoint.ds_to_universal", "deepspeed.checkpoint.deepspeed_checkpoint",
                      "deepspeed.checkpoint.zero_checkpoint", "deepspeed.checkpoint.reshape_3d_utils",
                      "deepspeed.checkpoint.autoep_universal")
_UNIVERSAL_LOADER_MODULES = ("deepspeed.checkpoint.universal_checkpoint", "deepspeed.runtime.base_optimizer",
                             "deepspeed.runtime.zero.stage3")


def load_checkpoint(parts: dict[str, Part], folder: Path, rank: int) -> dict[str, Any]:
    """Restore every part from `folder` (written by this layout), in order; return this rank's
    vaemo_rank*.json as read."""
    state_file = rank_state_file(folder, rank)
    if not state_file.exists():
        raise CheckpointError(f"{state_file} is missing: was the checkpoint written with another world size?")
    state = json.loads(state_file.read_text())
    for name, part in parts.items():
        own = state if name == TOP_LEVEL else state.get(name)
        if hasattr(part, "load"):
            part.load(folder, rank)
        elif own is None:
            raise CheckpointError(f"{state_file} holds no {name!r} state")
        elif isinstance(part, dict):
            part.clear()
            part.update(own)
        else:
            part.load_state_dict(own)
    return state


def load_model_state(engine: Any, folder: Path, universal: Path | None = None) -> None:
    """Restore model, optimizer and scheduler from `folder`, or from its converted copy `universal`
    (the engine's config then has checkpoint.load_universal)."""
    engine.checkpoint_engine.load = safe_torch_load  # DeepSpeed's own loader unpickles freely
    source = universal or folder
    with weights_only_torch(*_UNIVERSAL_LOADER_MODULES):
        path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {source}")
    if universal is not None and engine.zero_optimization_partition_weights():
        _undo_zero3_universal_slips(engine, universal)


def _undo_zero3_universal_slips(engine: Any, universal: Path) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load (load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    gives every parameter group the hyperparameters of the first, so our no-decay group (norms,
    biases, the logit scale) would be decayed, and every sub-group one shared `step` tensor, which
    AdamW advances in place once per sub-group and step. Each group gets its saved values back and
    each sub-group a step of its own."""
    base = engine.optimizer.optimizer
    state_file = universal / "zero" / "optimizer_state.pt"  # mmap: only the small group dicts are read
    saved = safe_torch_load(state_file, mmap=True)["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(base.param_groups):
        raise CheckpointError(f"{universal}: {len(saved)} parameter groups saved, the optimizer has "
                              f"{len(base.param_groups)}")
    for group, old in zip(base.param_groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})
    seen: set[int] = set()
    for state in base.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


@dataclass(frozen=True)
class ResumePlan:
    """How this run resumes from `old`: as is, or onto another data-parallel size or worker count."""

    old: CheckpointMeta
    dp_size: int
    num_workers: int

    @property
    def folder(self) -> Path:
        return self.old.folder

    @property
    def resize_model(self) -> bool:
        """The data-parallel size changes: optimizer partitions (ZeRO 1-3) and RNG states do not fit."""
        return self.old.dp_size != self.dp_size

    @property
    def resize_data(self) -> bool:
        """The data slots change: the rest of the epoch is dealt anew (data.loader.resize_data_states)."""
        return (self.old.dp_size, self.old.num_workers) != (self.dp_size, self.num_workers)

    @property
    def universal(self) -> bool:
        """Loading needs the universal conversion (ZeRO 1-3 onto another data-parallel size)."""
        return self.resize_model and self.old.zero_stage > 0


def plan_resume(cfg: Any, world_size: int) -> ResumePlan | None:
    """The resume `cfg.train.resume` asks for on `world_size` processes (None: a fresh start), or a
    ResumeError saying why it cannot be done and what to do instead. Reads only our small files, so
    the launcher calls it before any process group exists."""
    if not cfg.train.resume:
        return None
    folder = resolve(cfg.train.resume, Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints")
    if folder is None:
        return None
    old = read_meta(folder)
    tp, stage = cfg.parallel.tensor, cfg.train.zero_stage
    plan = ResumePlan(old, world_size // tp, cfg.data.num_workers)
    if old.tp_size != tp:
        raise ResumeError(
            f"cannot resume from {folder}: it was written with parallel.tensor={old.tp_size} and this run "
            f"has parallel.tensor={tp}. Tensor parallelism must stay the same across a resume (every weight "
            f"is sharded by it); set parallel.tensor={old.tp_size}. The data-parallel size may change.")
    if not plan.resize_model:
        return plan
    where = (f"from {folder} ({old.dp_size} data-parallel ranks x TP {old.tp_size}) onto {plan.dp_size} "
             f"data-parallel ranks")
    way_out = (f"Resume on {old.dp_size} data-parallel ranks (world size {old.dp_size * tp}), or keep the "
               f"weights only: `vaemo-export {folder} --out DIR` and start a fresh run from them (for a "
               f"stage-2 run: stage2.init_from={folder}); the optimizer state and the data position are "
               "lost that way.")
    if stage != old.zero_stage:
        raise ResumeError(f"cannot resume {where}: the checkpoint is ZeRO-{old.zero_stage} and this run asks "
                          f"for train.zero_stage={stage}; a resize keeps the ZeRO stage (set "
                          f"train.zero_stage={old.zero_stage}). {way_out}")
    if old.zero_stage == 3 and tp > 1:
        raise ResumeError(f"cannot resume {where}: DeepSpeed's ZeRO-3 universal-checkpoint loader does not "
                          "cut tensor-parallel shards (it stops on the merged weights), so ZeRO-3 under "
                          f"parallel.tensor={tp} keeps its data-parallel size. {way_out}")
    if old.nvme_offload:
        raise ResumeError(f"cannot resume {where}: ZeRO-{old.zero_stage} with NVMe optimizer offload keeps "
                          "its optimizer state per rank in swap files (offloaded_tensors/), which DeepSpeed "
                          f"cannot re-partition. {way_out}")
    return plan


def ensure_universal(folder: Path, rank: int, world_size: int) -> tuple[Path, float]:
    """Collective: the universal copy of `folder` (converted by global rank 0 if there is none yet,
    the others waiting) and the seconds rank 0 spent converting (0 when it already existed)."""
    out, took, error = folder / UNIVERSAL, 0.0, ""
    if rank == 0:
        try:
            took = convert_to_universal(folder)
        except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised here
            error = f"{type(e).__name__}: {e}"
    if world_size > 1:
        # Its own gloo group: a long timeout for this wait only, and CPU tensors on any backend.
        timeout = datetime.timedelta(seconds=CONVERT_TIMEOUT_S)
        group = torch.distributed.new_group(backend="gloo", timeout=timeout)
        verdict = torch.tensor([1 if error else 0, took])
        torch.distributed.broadcast(verdict, src=0, group=group)
        torch.distributed.destroy_process_group(group)
        if verdict[0] and not error:
            error = "rank 0 could not convert it (its log says why)"
        took = float(verdict[1])
    if error:
        raise CheckpointError(f"converting {folder} to a universal checkpoint failed: {error}")
    return out, took


def convert_to_universal(folder: Path) -> float:
    """DeepSpeed's ds_to_universal on `folder` into `folder/universal`, reading only under
    weights-only loading; a no-op when that copy exists. Returns the seconds it took."""
    out = folder / UNIVERSAL
    if out.is_dir():  # complete: it is renamed into place only when done
        return 0.0
    # The converter walks the whole folder: debris of an interrupted conversion must go first.
    for stale in folder.glob(TMP_PREFIX + UNIVERSAL + "-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f"{TMP_PREFIX}{UNIVERSAL}-{os.getpid()}"
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our engines record no universal info
    start = time.perf_counter()
    chatter = io.StringIO()  # its prints and progress bars
    with (weights_only_torch(*_CONVERTER_MODULES, drop_none_module_entries=True) as (ds_to_universal, *_),
          contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter)):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", chatter.getvalue())
    (folder / "latest_universal").unlink(missing_ok=True)  # it names the temporary folder; unused
    os.replace(tmp, out)
    _fsync_dir(folder)
    return time.perf_counter() - start


def resized_seed(seed: int, dp_rank: int, step: int) -> int:
    """The torch seed of a data-parallel rank after a resize (its saved RNG state belongs to another
    layout): a hash of (train.seed, data-parallel rank, step), so reruns draw the same masks and
    the ranks of a tensor-parallel group the same ones."""
    digest = hashlib.sha256(f"vaemo-resize:{seed}:{dp_rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
