"""The one reader of checkpoints and exports.

A training checkpoint (written by vaemo_dist/train/checkpoint.py) is a step folder under
`<run>/checkpoints/`:

    step_00000050/           DeepSpeed's files: *model_states.pt (model; with ZeRO 1-3 also the
                             *optim_states.pt partitions), one per tensor-parallel rank (mp_rank_XX)
        vaemo_rank00000.json our per-rank state: step, data position, skip counts
        rng_rank00000.safetensors
        config.yaml          the run's full config
    latest                   the name of the newest complete checkpoint

An export (written by vaemo_dist/export.py) is a folder of config.json (FORMAT) + model.safetensors (+
text_head.safetensors for stage 2).

This module finds them (`resolve`: a step folder, a `latest` pointer, a checkpoints folder or a run
folder; `is_checkpoint`, `is_export`, `describe_folder`), reads a checkpoint's small files
(`read_rank_states`, `read_meta`) and its weights (`read_layout`, `consolidate`: the data-parallel
partitions merged, then the tensor-parallel shards joined by the model's one TP plan,
vaemo_dist/model/parallelize.py), reads an export (`read_export`, used by `from_pretrained`), and
initialises a stage-2 model from either (`load_init`).

Loading never unpickles arbitrary objects: DeepSpeed's files are read with torch.load(weights_only=True)
and an allow-list of DeepSpeed's few classes (`safe_torch_load`), also inside DeepSpeed's own loaders
(`weights_only_torch`); our own files are JSON, YAML and safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, overload

import torch
import yaml

from vaemo_dist.config import (
    AudioInput,
    Config,
    LossConfig,
    ModelConfig,
    VideoInput,
    config_from_dict,
)
from vaemo_dist.model.parallelize import unshard
from vaemo_dist.model.text_head import TEXT_HEAD_PREFIX, VAEMO_PREFIX, Stage2Model, TextHead
from vaemo_dist.model.vaemo import VAEmoModel, is_decoder_key, strip_decoder

log = logging.getLogger(__name__)

LATEST = "latest"  # checkpoints/latest: the name of the newest complete checkpoint
RUN_CONFIG = "config.yaml"  # a checkpoint's copy of its run's config

# An export folder (vaemo-export's output, written by vaemo_dist/export.py).
FORMAT = "vaemo-pretrained"
# 2 added `stage`, `includes_text_head` and `text_head` to config.json (and text_head.safetensors);
# a version-1 folder reads as a stage-1 export without a text head.
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
# The text head goes in a file of its own so that model.safetensors stays exactly a VAEmoModel state
# dict: code that loads it strictly into VAEmoModel (ours before stage-2 exports, or anyone's) keeps
# working on a stage-2 export, and the stage-1 and stage-2 files of one run compare name for name.
TEXT_HEAD_WEIGHTS = "text_head.safetensors"
CONFIG = "config.json"
CLASSIFIER_CONFIG = "classifier.json"  # a classifier folder (probe / fine-tuning; vaemo_dist/eval/predict.py)

_RANK_FILE = re.compile(r"vaemo_rank(\d+)\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found or read as asked."""


class NotACheckpointError(CheckpointError):
    """The path exists but names no checkpoint (an export, a shard folder, ...): the message says what."""


class ExportError(CheckpointError):
    """An export (or the checkpoint it is made from) cannot be read or written as asked."""


# --------------------------------------------------------------------------------------------
# Reading DeepSpeed's files without unpickling arbitrary objects


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


class _WeightsOnlyTorch:
    """Stands in for the `torch` module inside DeepSpeed modules whose loaders call
    torch.load(weights_only=False); everything but `load` is the real torch."""

    def __init__(self, drop_none_module_entries: bool = False) -> None:
        self._drop_none = drop_none_module_entries

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def load(self, path: Any, map_location: Any = None, mmap: bool | None = None, **_ignored: Any) -> Any:
        state = safe_torch_load(path, map_location=map_location, mmap=mmap)
        if self._drop_none and isinstance(state, dict) and isinstance(state.get("module"), dict):
            # megatron-core's layers put `_extra_state: None` in the state dict (TransformerEngine's
            # slot); ds_to_universal would call .float() on it. It carries nothing.
            state = {**state, "module": {k: v for k, v in state["module"].items() if v is not None}}
        return state


@contextlib.contextmanager
def weights_only_torch(*module_names: str,
                       drop_none_module_entries: bool = False) -> Iterator[list[ModuleType]]:
    """The named modules with their torch.load forced to weights_only=True (DeepSpeed's few classes
    allowed, `safe_torch_load`), for the duration; yields the modules."""
    modules = [importlib.import_module(name) for name in module_names]
    real = [m.torch for m in modules]
    for m in modules:
        m.torch = _WeightsOnlyTorch(drop_none_module_entries)
    try:
        yield modules
    finally:
        for m, t in zip(modules, real):
            m.torch = t


# --------------------------------------------------------------------------------------------
# Finding a checkpoint, telling folders apart


def _named_by(pointer: Path) -> Path:
    folder = pointer.parent / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    return folder


@overload
def resolve(path: str | Path) -> Path: ...
@overload
def resolve(path: str | Path, ckpt_root: str | Path) -> Path | None: ...
def resolve(path: str | Path, ckpt_root: str | Path | None = None) -> Path | None:
    """The checkpoint step folder `path` names, the one resolver of checkpoints:

    * "latest" with `ckpt_root` (a run's `train.resume`): the newest complete checkpoint in
      `ckpt_root`, None when there is none yet (a fresh start);
    * a step folder (DeepSpeed model states): itself;
    * a `latest` pointer file, a checkpoints folder or a run folder: the step folder its pointer names.

    A missing path, or a pointer naming a missing folder, raises CheckpointError; anything else (an
    export, a run folder without checkpoints, ...) NotACheckpointError saying what it is."""
    if ckpt_root is not None and str(path) == LATEST:
        pointer = Path(ckpt_root) / LATEST
        return _named_by(pointer) if pointer.exists() else None
    p = Path(path)
    if p.name == LATEST and p.is_file():
        return _named_by(p)
    if is_checkpoint(p):
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            return _named_by(root / LATEST)
    if not p.exists():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    raise NotACheckpointError(f"{p} is {describe_folder(p)}, not a checkpoint (a step folder, "
                              "<run>/checkpoints/latest, a checkpoints folder or a run folder)")


def is_export(path: str | Path) -> bool:
    """True if `path` is an export folder (vaemo-export output: config.json of our format + weights)."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        return False
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_checkpoint(folder: str | Path) -> bool:
    """True if `folder` is a checkpoint step folder (DeepSpeed model states)."""
    return Path(folder).is_dir() and any(Path(folder).glob("*model_states.pt"))


def describe_folder(path: str | Path) -> str:
    """What kind of thing `path` is, in words ("an export (vaemo-export output) ...", "a DeepSpeed
    checkpoint ...", "a described set ...", "a shard folder ...", ...): for the messages of tools that
    were given the wrong kind of folder."""
    from vaemo_dist.data.media import VIDEO_EXTS
    from vaemo_dist.fsutil import OWNER_FILE, folder_owner

    p = Path(path)
    if not p.exists():
        return "missing (nothing at that path)"
    if p.is_file():
        kind = {".csv": "a CSV file", ".json": "a JSON file", ".tar": "a shard file",
                ".safetensors": "a safetensors file", ".yaml": "a YAML file"}.get(p.suffix.lower())
        if p.name == LATEST:
            kind = "a checkpoint pointer (checkpoints/latest)"
        return kind or f"a file ({p.suffix or 'no extension'})"
    if is_export(p):
        try:
            config = json.loads((p / CONFIG).read_text())
        except (OSError, ValueError):
            config = {}
        source = config.get("source") or {}
        return (f"an export (made by vaemo-export from {source.get('checkpoint', '?')} at step "
                f"{source.get('step', '?')}, stage {config.get('stage', 1)})")
    if is_checkpoint(p):
        return f"a DeepSpeed checkpoint ({p.name})"
    if (p / LATEST).is_file():
        return "a checkpoints folder"
    if (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file():
        return "a run folder" + ("" if (p / "checkpoints" / LATEST).is_file() else " without checkpoints")
    if (p / CONFIG).is_file():
        try:
            fmt = json.loads((p / CONFIG).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        return f"a folder with a {CONFIG} of format {fmt!r}"
    if (p / "descriptions.jsonl").is_file():
        return "a described set (vaemo-describe output)"
    owner = folder_owner(p)
    entries = [e for e in p.iterdir() if e.name not in (OWNER_FILE, ".lock")]
    tars = [e for e in entries if e.suffix == ".tar"]
    if tars:
        return f"a shard folder ({len(tars)} shards{f', made by {owner}' if owner else ''})"
    videos = [e for e in entries if e.suffix.lower() in VIDEO_EXTS]
    if videos:
        return f"a folder of {len(videos)} video files (vaemo-shard turns them into shards)"
    if not entries:
        return "an empty folder"
    names = ", ".join(sorted(e.name for e in entries)[:4])
    return f"a folder of other files ({names}{', ...' if len(entries) > 4 else ''})"


# --------------------------------------------------------------------------------------------
# A checkpoint's own small files


def read_rank_states(folder: Path) -> list[dict[str, Any]]:
    """Our state of every rank that wrote `folder` (vaemo_rank*.json), in rank order."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _RANK_FILE.match(p.name))}
    if not found or sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{folder} holds per-rank states for ranks {sorted(found)}: not 0..N-1")
    return [json.loads(found[r].read_text()) for r in range(len(found))]


@dataclass(frozen=True)
class CheckpointMeta:
    """What a resume must know of the run that wrote a checkpoint, from our files alone."""

    folder: Path
    step: int
    world_size: int  # processes that wrote it
    tp_size: int
    zero_stage: int
    num_workers: int
    nvme_offload: bool

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size


def read_meta(folder: Path) -> CheckpointMeta:
    config_file = folder / RUN_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: was this checkpoint written by vaemo_dist's "
                              "trainer?")
    raw = yaml.safe_load(config_file.read_text()) or {}
    train, parallel = raw.get("train") or {}, raw.get("parallel") or {}
    zero = ((train.get("deepspeed") or {}).get("zero_optimization") or {})
    states = read_rank_states(folder)
    steps = {int(s["step"]) for s in states}
    if len(steps) != 1:
        raise CheckpointError(f"the ranks of {folder} disagree on the step: {sorted(steps)}")
    tp = int(parallel.get("tensor", 1))
    if len(states) % tp:
        raise CheckpointError(f"{folder}: {len(states)} rank states, not a multiple of parallel.tensor={tp}")
    return CheckpointMeta(folder=folder, step=steps.pop(), world_size=len(states), tp_size=tp,
                          zero_stage=int(train.get("zero_stage", 1)),
                          num_workers=int(states[0]["data"]["num_workers"]),
                          nvme_offload=(zero.get("offload_optimizer") or {}).get("device") == "nvme")


# --------------------------------------------------------------------------------------------
# A checkpoint's weights, consolidated


@dataclass(frozen=True)
class CheckpointLayout:
    """How a checkpoint's weights are spread over files."""

    zero_stage: int
    dp_world_size: int
    tp_world_size: int  # mp_world_size in DeepSpeed's terms
    ds_version: str


def model_state_files(folder: Path) -> list[Path]:
    """A checkpoint's DeepSpeed model-states files (ExportError when it has none)."""
    files = sorted(folder.glob("*model_states.pt"))
    if not files:
        raise ExportError(f"{folder} holds no DeepSpeed model states (*model_states.pt): not a checkpoint?")
    return files


def read_layout(folder: Path) -> CheckpointLayout:
    states = safe_torch_load(model_state_files(folder)[0], mmap=True)
    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    return CheckpointLayout(zero_stage=stage, dp_world_size=int(states.get("dp_world_size", 1)),
                            tp_world_size=int(states.get("mp_world_size", 1)),
                            ds_version=str(states.get("ds_version", "?")))


def _files_of_tp_rank(folder: Path, tp_rank: int) -> list[Path]:
    tag = f"mp_rank_{tp_rank:02d}_"
    return [p for p in folder.iterdir() if tag in p.name and p.name.endswith(".pt")]


def _consolidate_data_parallel(folder: Path, layout: CheckpointLayout,
                               tp_rank: int) -> dict[str, torch.Tensor]:
    """The full (for TP: this TP rank's) state dict from the data-parallel partitions.

    ZeRO 1-3: DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`, its torch.load made
    weights-only) merges the fp32 master partitions; ZeRO 0: the model-states file holds every weight."""
    if layout.zero_stage == 0:
        states = safe_torch_load(folder / f"mp_rank_{tp_rank:02d}_model_states.pt")
        return {k: v for k, v in states["module"].items() if isinstance(v, torch.Tensor)}
    # DeepSpeed's consolidation reads every *_model_states.pt / *_optim_states.pt in one folder, so a
    # TP rank's files are linked into a folder of their own first.
    with tempfile.TemporaryDirectory(prefix="vaemo-export-") as tmp:
        source = folder
        if layout.tp_world_size > 1:
            source = Path(tmp) / folder.name
            source.mkdir()
            for f in _files_of_tp_rank(folder, tp_rank):
                (source / f.name).symlink_to(f.resolve())
        chatter = io.StringIO()  # its prints and progress bars
        quiet = (contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter))
        with weights_only_torch("deepspeed.utils.zero_to_fp32") as (z2f,), quiet[0], quiet[1]:
            state = z2f.get_fp32_state_dict_from_zero_checkpoint(str(source.parent), tag=source.name)
        log.debug("zero_to_fp32: %s", chatter.getvalue())
    return _with_frozen_parameters(dict(state), folder, tp_rank)


def _with_frozen_parameters(state: dict[str, torch.Tensor], folder: Path,
                            tp_rank: int) -> dict[str, torch.Tensor]:
    """Add what DeepSpeed's consolidation leaves out: frozen parameters (requires_grad=False).

    zero_to_fp32 finds them only in the frozen-fragment records that ZeRO-2/3 write; under ZeRO-1 they
    are missing from its output. The model-states file of ZeRO 0-2 holds every weight whole, so they
    come from there (ZeRO-3 keeps empty placeholders, hence the size check)."""
    module_file = folder / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if not module_file.is_file():
        return state
    module = safe_torch_load(module_file, mmap=True).get("module") or {}
    for name, value in module.items():
        if name not in state and isinstance(value, torch.Tensor) and value.numel() > 0:
            state[name] = value.float() if value.is_floating_point() else value
    return state


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join the state dicts of the TP ranks into one, by the model's TP plan
    (vaemo_dist.model.parallelize.TP_PLAN / `unshard`)."""
    if len(shards) == 1:
        return shards[0]
    return {key: unshard(key, [s[key] for s in shards]) for key in shards[0]}


def consolidate(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a DeepSpeed checkpoint folder (any ZeRO stage, any TP size) as one
    full-precision state dict on the CPU."""
    folder = Path(folder)
    layout = read_layout(folder)
    return merge_tensor_parallel([_consolidate_data_parallel(folder, layout, r)
                                  for r in range(layout.tp_world_size)])


# --------------------------------------------------------------------------------------------
# A universal checkpoint re-cut for another tensor-parallel degree

# The per-parameter files of a universal checkpoint (DeepSpeed's ds_to_universal, in <copy>/zero/<name>/):
# the fp32 master weight and Adam's two moments, each a dict {"param": tensor, "cat_dim": axis}.
UNIVERSAL_STATES = ("fp32", "exp_avg", "exp_avg_sq")


def tp_split_axis(name: str) -> tuple[int, int] | None:
    """(axis, groups) along which state-dict entry `name` is split over the tensor-parallel ranks by
    TP_PLAN (vaemo_dist/model/parallelize.py), or None where every rank holds it whole."""
    from vaemo_dist.model.parallelize import TP_PLAN

    module, _, param = name.rpartition(".")
    split = next((s for path, s in TP_PLAN.items() if module == path or module.endswith("." + path)), None)
    if split is None or param not in ("weight", "bias") or (split.style == "row" and param == "bias"):
        return None
    return (0 if split.style == "column" else 1), split.groups


def shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of the full value of entry `name` under `tp`-way tensor parallelism, cut as
    apply_tensor_parallel cuts it (the inverse of `unshard`); a replicated entry whole."""
    from vaemo_dist.model.parallelize import shard_indices

    how = tp_split_axis(name)
    if how is None or tp == 1:
        return full
    axis, groups = how
    width = full.shape[axis]
    if width % (groups * tp):
        raise CheckpointError(f"{name}: axis {axis} of size {width} ({groups} block(s)) cannot be split "
                              f"{tp} ways")
    return full.index_select(axis, shard_indices(width, tp, rank, groups))


def link_or_copy(src: str, dst: str) -> None:
    """A hard link `dst` to `src`, a copy where links fail (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def reshard_universal(source: Path, out: Path, old_tp: int, new_tp: int) -> int:
    """Write `out`: the universal checkpoint `source` (converted from a run with `old_tp`-way tensor
    parallelism) re-cut for `new_tp`-way. Returns how many per-parameter files were rewritten.

    ds_to_universal, told nothing of our layers, joins the TP ranks' pieces of every parameter along
    axis 0 (replicated ones too), and DeepSpeed's universal loader cuts them again with
    chunk(tp, cat_dim)[tp_rank] (a parameter whose stored shape is already the rank's is taken whole).
    So each piece is split off again, the full value made by `unshard` (TP_PLAN), and stored as the
    new ranks' pieces in rank order, cat_dim the split axis (q|k|v regrouped per rank); a replicated
    parameter is stored whole. Everything else is hard-linked (copied where links fail). Written
    under a temporary name and renamed into place, so an `out` that exists is complete."""
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link_or_copy)
    try:
        rewritten = _reshard_states(tmp / "zero", old_tp, new_tp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)
    return rewritten


def _reshard_states(zero: Path, old_tp: int, new_tp: int) -> int:
    rewritten = 0
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        name = param_dir.name
        for state in UNIVERSAL_STATES:
            file = param_dir / f"{state}.pt"
            if not file.is_file():
                continue
            saved = safe_torch_load(file)
            param = saved["param"]
            axis = int(saved.get("cat_dim", 0))
            pieces = [param] if param.dim() == 0 else list(param.chunk(old_tp, dim=axis))
            full = unshard(name, pieces)
            how = tp_split_axis(name)
            entry: dict[str, Any] = {"param": full}
            if how is not None and new_tp > 1:
                pieces = [shard(name, full, new_tp, r) for r in range(new_tp)]
                entry = {"param": torch.cat(pieces, dim=how[0]), "cat_dim": how[0]}
            file.unlink()  # a hard link to the source's file: never written through
            torch.save(entry, file)
            rewritten += 1
    return rewritten


# --------------------------------------------------------------------------------------------
# Configs


def model_config_from(raw: dict[str, Any]) -> Config:
    """A validated Config from the `model` and `inputs` sections (plus `loss`, `data.synth`) of a
    run's config, ignoring the sections export does not need (so older or newer runs still load)."""
    keep: dict[str, Any] = {k: raw[k] for k in ("model", "inputs", "loss") if k in raw}
    # Keys a newer vaemo_dist wrote are dropped with a warning rather than refused: a published
    # checkpoint must load in the version its user has. Weights that do not fit still fail, later.
    for name, section in (("model", ModelConfig), ("loss", LossConfig)):
        if isinstance(keep.get(name), dict):
            keep[name] = _known_keys(keep[name], section, name)
    inputs = keep.get("inputs")
    if isinstance(inputs, dict):
        keep["inputs"] = {**inputs, **{name: _known_keys(inputs[name], section, f"inputs.{name}")
                                       for name, section in (("video", VideoInput), ("audio", AudioInput))
                                       if isinstance(inputs.get(name), dict)}}
    synth = (raw.get("data") or {}).get("synth")
    if synth is None:
        # Validation checks the synthetic clip length against inputs.video; with no corpus named
        # (an export's config.json), give it one long enough for any window.
        video = {**dataclasses.asdict(VideoInput()), **(keep.get("inputs", {}).get("video") or {})}
        synth = {"duration": ((video["frames"] - 1) * video["stride"] + 1) / 25.0 + 1.0}
    keep["data"] = {"synth": synth}
    return config_from_dict(keep)


def _known_keys(values: dict[str, Any], section: type, name: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(section)}
    unknown = sorted(set(values) - known)
    if unknown:
        log.warning("ignoring %s keys this version does not know (written by a newer vaemo_dist?): %s",
                    name, unknown)
    return {k: v for k, v in values.items() if k in known}


# --------------------------------------------------------------------------------------------
# Reading an export


def build_model(config: dict[str, Any]) -> VAEmoModel:
    """An untrained VAEmoModel of the architecture an export's config.json describes."""
    cfg = model_config_from(config)
    return VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                      init_temperature=cfg.loss.init_temperature)


def load_text_head(folder: Path, config: dict[str, Any]) -> TextHead | None:
    """The exported TextHead of a stage-2 export (None for stage 1, old exports included)."""
    from safetensors.torch import load_file

    info = config.get("text_head") if config.get("includes_text_head") else None
    if not info:
        return None
    path = folder / info.get("file", TEXT_HEAD_WEIGHTS)
    if not path.is_file():
        raise ExportError(f"{folder / CONFIG} says a text head is included, but {path.name} is missing")
    loss = config.get("loss") or {}
    sizes = int(info["text_dim"]), int(config["model"]["embed_dim"]), int(info.get("text_head_hidden", 0))
    head = TextHead(*sizes, max_logit_scale=float(loss.get("max_logit_scale", 100.0)))
    try:
        head.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ExportError(f"{path} does not fit the text head described in {CONFIG}: {e}") from e
    return head


@dataclass
class Export:
    """An export folder, read: its config.json, its VAEmoModel (gradients off; without the decoder when
    the export has none) and, for stage 2, its TextHead (gradients off)."""

    folder: Path
    config: dict[str, Any]
    model: VAEmoModel
    text_head: TextHead | None

    @property
    def stage(self) -> int:
        """1 or 2; exports older than the `stage` field are stage-1 ones."""
        return int(self.config.get("stage", 1))


def check_format(info: dict[str, Any], file: Path, fmt: str = FORMAT,
                 version: int = FORMAT_VERSION) -> dict[str, Any]:
    """`info` (an export's config.json, a classifier.json) if its `format` is `fmt`: ExportError for
    another format; a newer format version than `version` is read with a warning (fields this version
    does not know are ignored)."""
    if info.get("format") != fmt:
        raise ExportError(f"{file}: format {info.get('format')!r}, expected {fmt!r}")
    if int(info.get("format_version", 1)) > version:
        log.warning("%s: format version %s is newer than this vaemo_dist reads (%d); fields it does not "
                    "know are ignored", file, info.get("format_version"), version)
    return info


def read_export(folder: str | Path) -> Export:
    """Read an export folder (vaemo-export output). Safetensors only: nothing is unpickled. Raises
    ExportError for a folder that is not one or whose weights do not fit its config.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG, folder / WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ExportError(f"{folder} is not an exported model (needs {CONFIG} and {WEIGHTS}; see "
                          "vaemo-export)")
    config = check_format(json.loads(config_file.read_text()), config_file)
    model = build_model(config)
    weights = load_file(str(weights_file))
    if not any(is_decoder_key(k) for k in weights):
        strip_decoder(model)
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes that differ from the architecture the config describes
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:300])
        raise ExportError(f"{weights_file} does not fit the architecture in {CONFIG}: {first}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"{weights_file} does not fit the architecture in {CONFIG}: missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.requires_grad_(False)
    text_head = load_text_head(folder, config)
    if text_head is not None:
        text_head.requires_grad_(False)
    return Export(folder=folder, config=config, model=model, text_head=text_head)


# --------------------------------------------------------------------------------------------
# Starting a stage-2 model from a stage-1 or stage-2 checkpoint or export (`stage2.init_from`)


def resolve_init(path: str | Path) -> Path:
    """What `stage2.init_from` names: an export folder (vaemo-export output) as given, else the
    checkpoint step folder `resolve` finds. Anything else raises ValueError saying what it is and what
    is wanted."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"stage2.init_from: {p} does not exist (run stage 1 first, e.g. README "
                                "command 1, or point stage2.init_from at a checkpoint or an export)")
    if is_export(p):
        return p
    try:
        return resolve(p)
    except NotACheckpointError:
        raise ValueError(f"stage2.init_from={p} is {describe_folder(p)}; it wants a stage-1 or stage-2 "
                         "checkpoint (a step folder, <run>/checkpoints/latest or the run folder) or an "
                         "export folder (vaemo-export output: config.json + model.safetensors)") from None


# Config keys that change the shapes or names of the weights (a mismatch cannot load) and the others.
# model.decoder: "full" and "cross" decoder blocks hold differently named layers (attn/mlp against
# cross_attn/norm_memory/ffn). model.decode_fraction changes no weight (only how many queries are drawn).
_SHAPE_KEYS = {"model": ("dim", "depth", "heads", "mlp_ratio", "decoder", "decoder_dim", "decoder_depth",
                         "decoder_heads", "embed_dim"),
               "inputs.video": ("frames", "size", "tubelet", "patch"),
               "inputs.audio": ("n_mels", "frames", "patch")}
_DECODER_KEYS = ("decoder", "decoder_dim", "decoder_depth", "decoder_heads")


def check_compatible(cfg: Config, folder: Path) -> None:
    """Compare the run's model/inputs with those the checkpoint (config.yaml) or export (config.json)
    was made with: shape keys must match."""
    config_file = folder / (CONFIG if is_export(folder) else RUN_CONFIG)
    if not config_file.is_file():
        log.warning("%s has no config.yaml: architecture not checked before loading", folder)
        return
    text = config_file.read_text()
    raw = (json.loads(text) if config_file.suffix == ".json" else yaml.safe_load(text)) or {}
    what = "export" if config_file.suffix == ".json" else "checkpoint"
    ours = {"model": dataclasses.asdict(cfg.model), "inputs.video": dataclasses.asdict(cfg.inputs.video),
            "inputs.audio": dataclasses.asdict(cfg.inputs.audio)}
    theirs = {"model": raw.get("model", {}), "inputs.video": raw.get("inputs", {}).get("video", {}),
              "inputs.audio": raw.get("inputs", {}).get("audio", {})}
    # A key the checkpoint's config lacks (written before the key existed) had its default then.
    sections = {"model": cfg.model, "inputs.video": cfg.inputs.video, "inputs.audio": cfg.inputs.audio}
    defaults = {section: dataclasses.asdict(type(dc)()) for section, dc in sections.items()}
    # An export made without the decoder brings no decoder weights: this run's decoder (whatever its
    # kind and size) starts from its initial weights, so its keys need not match.
    no_decoder = what == "export" and raw.get("includes_decoder") is False
    errors, notes = [], []
    for section, values in ours.items():
        for key, value in values.items():
            before = theirs[section].get(key, defaults[section].get(key))
            if key == "preset" or before == value:
                continue
            line = f"{section}.{key}: {before!r} in the {what}, {value!r} here"
            shape = key in _SHAPE_KEYS.get(section, ())
            if shape and no_decoder and section == "model" and key in _DECODER_KEYS:
                shape, line = False, line + " (the export has no decoder: this run's starts fresh)"
            (errors if shape else notes).append(line)
    if errors:
        raise ValueError(f"stage2.init_from={folder}: the architecture differs: " + "; ".join(errors))
    for line in notes:
        log.warning("stage2.init_from: %s", line)


def load_init(model: Stage2Model, path: str | Path, cfg: Config | None = None) -> Path:
    """Load a stage-1 checkpoint (any ZeRO stage; VAEmoModel weights), a stage-2 one (VAEmo + text
    head), consolidated without unpickling, or an export folder (safetensors only) into `model`.
    Returns the folder."""
    folder = resolve_init(path)
    if cfg is not None:
        check_compatible(cfg, folder)
    if is_export(folder):
        what = _load_export(model, folder)
        log.info("loaded the %s from %s", what, folder)
        return folder
    state = consolidate(folder)  # frozen parameters included (_with_frozen_parameters)
    if any(k.startswith((VAEMO_PREFIX, TEXT_HEAD_PREFIX)) for k in state):  # a stage-2 checkpoint
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith(VAEMO_PREFIX) for k in missing):
            raise ValueError(f"{folder}: weights do not fit: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        what = "stage-2 model (text head included)" if not missing else "VA model (text head fresh)"
    else:
        missing, unexpected = model.vaemo.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: not a VAEmoModel checkpoint: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        what = "stage-1 VA model"
    log.info("loaded the %s from %s", what, folder)
    return folder


def _load_export(model: Stage2Model, folder: Path) -> str:
    """An export's weights into `model` (what was loaded, in words). An export without the decoder
    leaves the reconstruction decoder as initialised; a text head is taken when it fits."""
    export = read_export(folder)
    stage = f"stage-{export.stage}"
    missing, unexpected = model.vaemo.load_state_dict(export.model.state_dict(), strict=False)
    if unexpected or any(not is_decoder_key(k) for k in missing):
        raise ValueError(f"{folder}: weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if missing:
        log.warning("%s has no reconstruction decoder (exported without --with-decoder): the decoder starts "
                    "from its initial weights%s", folder,
                    "; stage2.stage1_weight > 0 trains it from there" if model.needs_forward else "")
    source = (export.config.get("source") or {})
    made = f" (an export made by vaemo-export from {source.get('checkpoint')} at step {source.get('step')})"
    if export.text_head is None:
        return f"{stage} VA model{made}"
    head = export.text_head.state_dict()
    ours = model.text_head.state_dict()
    if {k: tuple(v.shape) for k, v in head.items()} != {k: tuple(v.shape) for k, v in ours.items()}:
        log.warning("%s: its text head (%s) does not fit this run's (stage2.text_head_hidden, the text "
                    "encoder's dim): the text head starts fresh", folder,
                    (export.config.get("text_head") or {}).get("text_encoder"))
        return f"{stage} VA model (text head fresh){made}"
    model.text_head.load_state_dict(head)
    return f"{stage} model (text head included){made}"
