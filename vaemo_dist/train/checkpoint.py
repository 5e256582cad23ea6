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

Resuming on another layout (`plan_resume`, checked by the launcher before any process group starts;
`ResumePlan.describe` is its log line): ZeRO-0 keeps everything whole in the model-states file and
loads on another data-parallel size as is; for ZeRO 1-3, whose optimizer partitions depend on the
data-parallel size, global rank 0 converts the checkpoint once with DeepSpeed's `ds_to_universal` into
`step_.../universal/` (per-parameter fp32 weights and Adam moments) and every rank loads it with
DeepSpeed's `checkpoint.load_universal`, re-partitioned for the new size. The same copy serves a ZeRO
stage change (1/2 -> 3, 1 <-> 2) and a tensor-parallel degree change (ZeRO 1-2), for which rank 0
re-cuts it into `step_.../universal-tp<N>/` by the model's TP plan (`prepare_universal`,
`checkpoints.reshard_universal`). Refused at start-up, with the ways out: another architecture, ZeRO-0
on either side of a stage or TP change, ZeRO-3 -> 1/2, ZeRO-3 under tensor parallelism when anything
changes, NVMe optimizer offload. Once the shards are listed, the launcher compares the corpus with the
checkpoint's fingerprint (`check_corpus`: refused, or with train.resume_data=reset resumed from a copy
whose data position is a fresh start).
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
import re
import shutil
import time
from collections.abc import Sequence
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
from vaemo_dist.checkpoints import link_or_copy, read_rank_states
from vaemo_dist.checkpoints import read_meta as read_meta
from vaemo_dist.checkpoints import resolve as resolve
from vaemo_dist.checkpoints import safe_torch_load as safe_torch_load
from vaemo_dist.checkpoints import weights_only_torch as weights_only_torch
from vaemo_dist.dist import barrier
from vaemo_dist.fsutil import write_atomic

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
UNIVERSAL = "universal"  # the converted copy inside a step folder, for resuming on another DP size
CORPUS_FILE = "corpus.json"  # the fingerprint of the shard list trained on (run folder, each checkpoint)
DATA_RESET = "data-reset"  # <run>/data-reset/<step>: a checkpoint's copy with its data position reset
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
        corpus = ckpt_root.parent / CORPUS_FILE  # written by the launcher (record_corpus)
        if corpus.is_file():
            shutil.copy2(corpus, tmp / CORPUS_FILE)
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
    if universal is not None:
        source = prepare_universal(folder, universal, int(getattr(engine, "mp_world_size", 1) or 1),
                                   zero3=bool(engine.zero_optimization_partition_weights()))
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
    """How this run resumes from `old`: as is, or onto another data-parallel size, worker count,
    tensor-parallel degree or ZeRO stage."""

    old: CheckpointMeta
    dp_size: int
    num_workers: int
    tp_size: int = 0  # 0: the checkpoint's (older callers)
    zero_stage: int = -1  # -1: the checkpoint's

    @property
    def folder(self) -> Path:
        return self.old.folder

    @property
    def new_tp(self) -> int:
        return self.tp_size or self.old.tp_size

    @property
    def new_stage(self) -> int:
        return self.old.zero_stage if self.zero_stage < 0 else self.zero_stage

    @property
    def reshard_tp(self) -> bool:
        """The tensor-parallel degree changes: every split weight and its moments are cut anew."""
        return self.new_tp != self.old.tp_size

    @property
    def change_stage(self) -> bool:
        return self.new_stage != self.old.zero_stage

    @property
    def resize_model(self) -> bool:
        """The data-parallel size or the tensor-parallel degree changes: optimizer partitions (ZeRO 1-3),
        per-rank files and RNG states do not fit the new ranks."""
        return self.old.dp_size != self.dp_size or self.reshard_tp

    @property
    def resize_data(self) -> bool:
        """The data slots change: the rest of the epoch is dealt anew (data.loader.resize_data_states)."""
        return (self.old.dp_size, self.old.num_workers) != (self.dp_size, self.num_workers)

    @property
    def universal(self) -> bool:
        """Loading needs the universal conversion: ZeRO 1-3 onto another data-parallel size, tensor-parallel
        degree or ZeRO stage."""
        return self.old.zero_stage > 0 and (self.resize_model or self.change_stage)

    def layouts(self) -> tuple[str, str]:
        """The old and the new layout, as the start-up log says them."""
        old = self.old
        return (f"DP {old.dp_size} x TP {old.tp_size} x ZeRO-{old.zero_stage} x {old.num_workers} workers",
                f"DP {self.dp_size} x TP {self.new_tp} x ZeRO-{self.new_stage} x {self.num_workers} workers")

    def describe(self) -> str:
        """One line for the start-up log: old -> new layout, what is resharded, what the data does."""
        was, now = self.layouts()
        if not (self.resize_model or self.resize_data or self.change_stage):
            return f"resume plan: {was}, the same layout: everything loaded as saved"
        model = []
        if self.universal:
            model.append("optimizer state re-partitioned from the universal checkpoint")
        elif self.resize_model:
            model.append("ZeRO-0 states loaded whole")
        if self.reshard_tp:
            model.append(f"tensor-parallel shards and their Adam moments re-cut from TP {self.old.tp_size} "
                         f"to TP {self.new_tp}")
        if self.change_stage:
            model.append(f"ZeRO-{self.old.zero_stage} -> ZeRO-{self.new_stage}")
        data = ("the rest of the epoch dealt anew to the new data slots; batch composition differs from an "
                "un-resized run (every sample still once per epoch)" if self.resize_data
                else "data slots unchanged")
        rng = "RNG reseeded per data-parallel rank" if self.resize_model else "RNG restored per rank"
        return f"resume plan: {was} -> {now}: {'; '.join(model) or 'model as saved'}; {data}; {rng}"


def architecture_differences(cfg: Any, raw: dict[str, Any]) -> list[str]:
    """The shape-determining config keys (model sizes, patch and input sizes) where `cfg` differs from
    a checkpoint's config.yaml (`raw`), as `key: checkpoint -> this run`. A key the checkpoint lacks had
    its default when it was written."""
    from vaemo_dist.checkpoints import _SHAPE_KEYS

    sections = {"model": cfg.model, "inputs.video": cfg.inputs.video, "inputs.audio": cfg.inputs.audio}
    found = []
    for section, keys in _SHAPE_KEYS.items():
        ours = sections[section]
        theirs: Any = raw
        for part in section.split("."):
            theirs = (theirs or {}).get(part) or {}
        default = type(ours)()
        for key in keys:
            before, now = theirs.get(key, getattr(default, key)), getattr(ours, key)
            if before != now:
                found.append(f"{section}.{key}: {before!r} in the checkpoint, {now!r} here")
    return found


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
    raw = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    differs = architecture_differences(cfg, raw)
    if differs:
        raise ResumeError(f"cannot resume from {folder}: the model's architecture differs from the "
                          f"checkpoint's ({'; '.join(differs)}); resume with the checkpoint's values, or "
                          f"start a new run (stage-2 runs: stage2.init_from={folder})")
    if cfg.model.heads % tp:
        raise ResumeError(f"cannot resume from {folder} with parallel.tensor={tp}: it must divide "
                          f"model.heads={cfg.model.heads}")
    plan = ResumePlan(old, world_size // tp, cfg.data.num_workers, tp, stage)
    if not (plan.resize_model or plan.change_stage):
        return plan
    was, now = plan.layouts()
    where = f"from {folder} ({was}) onto {now} ({plan.dp_size} data-parallel ranks)"
    way_out = (f"Resume on {old.dp_size} data-parallel ranks (world size {old.dp_size * old.tp_size}) with "
               f"parallel.tensor={old.tp_size} and train.zero_stage={old.zero_stage}, or keep the weights "
               f"only: `vaemo-export {folder} --out DIR` and start a fresh run from them (for a stage-2 run: "
               f"stage2.init_from={folder}); the optimizer state and the data position are lost that way.")
    if plan.change_stage and 0 in (stage, old.zero_stage):
        raise ResumeError(f"cannot resume {where}: the checkpoint is ZeRO-{old.zero_stage} and this run asks "
                          f"for train.zero_stage={stage}; a stage change goes through DeepSpeed's universal "
                          "checkpoint, which exists for ZeRO 1-3 only (set "
                          f"train.zero_stage={old.zero_stage}). {way_out}")
    if plan.change_stage and old.zero_stage == 3:
        raise ResumeError(f"cannot resume {where}: the checkpoint is ZeRO-3 and this run asks for "
                          f"train.zero_stage={stage}; DeepSpeed's universal copy of a ZeRO-3 checkpoint "
                          "keeps Adam's step only in the ZeRO-3 form, so a ZeRO-3 checkpoint resumes as "
                          f"ZeRO-3 (set train.zero_stage=3; ZeRO-1/2 -> 3 is supported). {way_out}")
    if plan.reshard_tp and 0 in (stage, old.zero_stage):
        raise ResumeError(f"cannot resume {where}: a parallel.tensor change ({old.tp_size} -> {tp}) goes "
                          "through DeepSpeed's universal checkpoint, which exists for ZeRO 1-3 only; the "
                          f"checkpoint is ZeRO-{old.zero_stage} and this run asks for "
                          f"train.zero_stage={stage} "
                          f"(resume with parallel.tensor={old.tp_size}, or from a ZeRO-1/2 checkpoint). "
                          f"{way_out}")
    if 3 in (old.zero_stage, stage) and max(tp, old.tp_size) > 1:
        raise ResumeError(f"cannot resume {where}: DeepSpeed's ZeRO-3 universal-checkpoint loader does not "
                          "cut tensor-parallel shards (it stops on the merged weights), so ZeRO-3 under "
                          "parallel.tensor>1 keeps its data-parallel size, tensor-parallel degree and stage. "
                          f"{way_out}")
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


def resharded_name(tp: int) -> str:
    return f"{UNIVERSAL}-tp{tp}"


def prepare_universal(folder: Path, universal: Path, tp: int, zero3: bool) -> Path:
    """Collective over all ranks: the universal copy of checkpoint `folder` to load for `tp`-way tensor
    parallelism, fitted to the loading ZeRO stage (`zero3`). Global rank 0 does the work, the others
    wait: a TP degree other than the checkpoint's gets `folder/universal-tp<tp>`, re-cut from `universal`
    (`checkpoints.reshard_universal`) if not there yet; then `_fit_to_stage`."""
    old_tp = read_meta(folder).tp_size
    out = universal if old_tp == tp else folder / resharded_name(tp)
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist_on else 0
    error = ""
    if rank == 0:
        start = time.perf_counter()
        try:
            if not out.is_dir():
                from vaemo_dist.checkpoints import reshard_universal

                n = reshard_universal(universal, out, old_tp, tp)
                log.info("re-cut the universal checkpoint from tensor parallel %d to %d: %d per-parameter "
                         "files rewritten into %s in %.1f s", old_tp, tp, n, out, time.perf_counter() - start)
            _fit_to_stage(out, zero3)
        except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised here
            error = f"{type(e).__name__}: {e}"
    if dist_on and torch.distributed.get_world_size() > 1:
        timeout = datetime.timedelta(seconds=CONVERT_TIMEOUT_S)
        group = torch.distributed.new_group(backend="gloo", timeout=timeout)
        verdict = torch.tensor([1 if error else 0])
        torch.distributed.broadcast(verdict, src=0, group=group)
        torch.distributed.destroy_process_group(group)
        if verdict[0] and not error:
            error = "rank 0 could not prepare it (its log says why)"
    if error:
        raise CheckpointError(f"preparing {universal} for parallel.tensor={tp}"
                              f"{' under ZeRO-3' if zero3 else ''} failed: {error}")
    return out


_ZERO3_PREFIX = "zero_pp_rank_0_"  # the model-states name ZeRO-3 looks for in a universal folder
_MODEL_STATES = re.compile(r"(zero_pp_rank_0_)?mp_rank_\d+_model_states\.pt")
_BASE_STATE = "optimizer_state_dict"  # DeepSpeed's OPTIMIZER_STATE_DICT


def _fit_to_stage(universal: Path, zero3: bool) -> None:
    """Let the universal copy load into either ZeRO family, whichever stage converted it (idempotent).

    The model-states file (step, scheduler; no weights) is looked for under the name the loading stage
    writes: mp_rank_XX_model_states.pt for ZeRO 1-2, zero_pp_rank_0_mp_rank_XX_... for ZeRO-3; each gets
    the other name too (a hard link, a copy where links fail). ZeRO-3 also reads Adam's step and the
    parameter groups from the base optimizer's state dict in zero/optimizer_state.pt, which a ZeRO-1/2
    conversion does not write: it is added from the per-parameter step.pt and the groups there."""
    for f in [f for f in universal.iterdir() if _MODEL_STATES.fullmatch(f.name)]:
        zero3_name = f.name.startswith(_ZERO3_PREFIX)
        other = f.name.removeprefix(_ZERO3_PREFIX) if zero3_name else _ZERO3_PREFIX + f.name
        if not (universal / other).exists():
            tmp = universal / f".tmp-{other}"
            tmp.unlink(missing_ok=True)
            try:
                os.link(f, tmp)
            except OSError:
                shutil.copy2(f, tmp)
            os.replace(tmp, universal / other)
    if not zero3:
        return
    state_file = universal / "zero" / "optimizer_state.pt"
    state = safe_torch_load(state_file)
    if _BASE_STATE in state:
        return
    steps = sorted((universal / "zero").glob("*/step.pt"))
    if not steps:
        raise CheckpointError(f"{universal}: no per-parameter step.pt to take Adam's step from")
    step = torch.as_tensor(safe_torch_load(steps[0]), dtype=torch.float32)
    state[_BASE_STATE] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    tmp = state_file.with_name(".tmp-optimizer_state.pt")
    torch.save(state, tmp)
    os.replace(tmp, state_file)  # the file may be a hard link into the source copy: replaced, not written


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


# --------------------------------------------------------------------------------------------
# The corpus a checkpoint was trained on


def corpus_fingerprint(urls: Sequence[str], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a corpus: its shard names in order (not their folder or bucket, so a corpus moved
    elsewhere stays the same one) and, when data.shards names a vaemo-shard set, its manifest (seed,
    counts, how it was made). Returns {"shards": count, "sha256": hex digest}."""
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]
    body = json.dumps({"shards": names, "manifest": manifest}, sort_keys=True, default=str)
    return {"shards": len(names), "sha256": hashlib.sha256(body.encode()).hexdigest()}


def record_corpus(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """<run>/corpus.json, copied into every checkpoint the run saves (global rank 0 calls it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CORPUS_FILE, json.dumps(fingerprint))


def check_corpus(cfg: Any, fingerprint: dict[str, Any], rank: int) -> Path | None:
    """Compare this run's corpus with that of the checkpoint `cfg.train.resume` names. The same corpus,
    no checkpoint, or a checkpoint that records none (written before fingerprints; a warning): None.
    Another corpus: a ResumeError naming data.shards and train.resume_data, unless
    train.resume_data=reset, which returns `<run>/data-reset/<step>`: a copy of the checkpoint (its
    files hard-linked) whose data positions are those of a fresh start, to resume from instead; global
    rank 0 writes it (`rank`), the others must wait for it (a barrier) before reading it."""
    run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
    folder = resolve(cfg.train.resume, run_dir / "checkpoints")
    if folder is None:
        return None
    recorded = folder / CORPUS_FILE
    if not recorded.is_file():
        if rank == 0:
            log.warning("%s records no corpus fingerprint (%s, written before they were): the corpus is not "
                        "compared with the checkpoint's", folder, CORPUS_FILE)
        return None
    old = json.loads(recorded.read_text())
    if old.get("sha256") == fingerprint["sha256"]:
        return None
    if cfg.train.resume_data != "reset":
        raise ResumeError(
            f"cannot resume from {folder}: data.shards={cfg.data.shards} is another corpus than the "
            f"checkpoint's ({fingerprint['shards']} shards, fingerprint {fingerprint['sha256'][:12]}; the "
            f"checkpoint's: {old.get('shards')} shards, {str(old.get('sha256'))[:12]}). Resume with the "
            "checkpoint's data.shards, or set train.resume_data=reset to carry the weights, optimizer state "
            "and step onto this corpus and start its data from the beginning.")
    out = run_dir / DATA_RESET / folder.name
    if rank == 0:
        _data_reset_copy(folder, out, fingerprint)
        log.info("train.resume_data=reset: weights, optimizer state and step %d carried from %s onto another "
                 "corpus (%d shards); the data position restarts at its start (resuming from %s)",
                 read_meta(folder).step, folder, fingerprint["shards"], out)
    return out


def _data_reset_copy(folder: Path, out: Path, fingerprint: dict[str, Any]) -> None:
    """`out`: `folder` with its files hard-linked (copied where links fail) but every rank's data state
    that of a fresh start in the same layout (its key log kept: counting goes on after its lines) and
    the new corpus's fingerprint. Replaces an earlier copy; renamed into place when complete."""
    from vaemo_dist.data.loader import DATA_STATE_VERSION, DataState

    tmp = out.with_name(TMP_PREFIX + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, tmp, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(UNIVERSAL, f"{UNIVERSAL}-*", TMP_PREFIX + "*"))
    for rank, state in enumerate(read_rank_states(folder)):
        old = DataState.from_dict(state["data"])
        fresh = DataState(old.num_workers, old.world_size, key_log_base=old.key_log_base + old.batches)
        state["data"] = {"version": DATA_STATE_VERSION, **fresh.to_dict()}
        target = rank_state_file(tmp, rank)
        target.unlink()  # a link to the checkpoint's own file: replaced, never written through
        target.write_text(json.dumps(state, indent=1))
    (tmp / CORPUS_FILE).unlink(missing_ok=True)
    (tmp / CORPUS_FILE).write_text(json.dumps(fingerprint))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
