"""Foundation checkpoints: a DeepSpeed training checkpoint becomes one portable folder.

    vaemo-export runs/stage1-tiny --out exports/stage1-tiny [--with-decoder] [--dtype bf16]
    vaemo-export runs/stage2-tiny --out exports/stage2-tiny     # a knowledge-injected (stage-2) run

The input is a checkpoint folder written by our trainer (`runs/<name>/checkpoints/step_XXXXXXXX/`),
its `checkpoints/` folder or the run folder (both meaning `latest`). The output folder holds

    model.safetensors      the weights, named as in `VAEmoModel.state_dict()`: encoder, projection
                           heads and logit scale; the reconstruction decoder only with --with-decoder
    text_head.safetensors  stage-2 runs only: the trained text projection head, named as in
                           `TextHead.state_dict()` (vaemo_dist/model/text_head.py)
    config.json            architecture and preprocessing (the run's `model` and `inputs` sections),
                           `stage` (1 or 2) and, for stage 2, what the text head needs (`text_head`:
                           text encoder, text embedding dim, hidden width)
    README.md              a model card: stage, step, training and data summary, last logged losses

A stage-2 checkpoint holds `Stage2Model` (`vaemo.*` + `text_head.*`); it is recognised by those
names (every run's config.yaml has a `stage2` section, defaults included, so that cannot tell). Its
VAEmo weights are written under their usual names, so every consumer of a stage-1 export
(`from_pretrained().encode`, `vaemo-embed`, `launchers/finetune.py`) takes a stage-2 export as is;
`from_pretrained().embed_text` / `.zero_shot` use the text head (vaemo_dist/pretrained.py).

How the full weights are recovered depends on how the run was sharded, read from the checkpoint:

* ZeRO 1-3: DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`) merges the fp32 master
  partitions of every data-parallel rank; frozen parameters, which it leaves out under ZeRO-1, come
  from the model-states file (`_with_frozen_parameters`).
* ZeRO 0: the model-states file already holds every weight.
* Tensor parallelism (`mp_world_size` > 1): each TP rank's partitions are consolidated on their own,
  then the shards are joined by the model's one tensor-parallel plan (`TP_PLAN` in
  vaemo_dist/model/parallelize.py: column-parallel rows, row-parallel columns, the rest replicated).

Reading the checkpoint (finding it, consolidating its weights without unpickling arbitrary objects)
is vaemo_dist/checkpoints.py, as is reading an export; this module writes export folders and their
model cards.

The output folder is claimed first (fsutil.claim_output_dir): a new or empty folder, or an earlier
vaemo-export output (replaced); a non-empty folder vaemo-export did not create is refused with
nothing changed, unless `--overwrite` (moved aside to `<out>.old-<timestamp>`, never deleted). Given
an export instead of a checkpoint, vaemo-export says so. `export_or_checkpoint` gives consumers that
want an export (fine-tuning, say) one for either kind of folder, exporting a checkpoint once into a
cache folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

# What an export folder is (its file names, format) and how it is read live with the reader.
from vaemo_dist.checkpoints import (
    CONFIG,
    FORMAT,
    FORMAT_VERSION,
    TEXT_HEAD_WEIGHTS,
    WEIGHTS,
    CheckpointError,
    ExportError,
    NotACheckpointError,
    consolidate,
    describe_folder,
    is_export,
    model_config_from,
    model_state_files,
    read_layout,
    resolve,
)
from vaemo_dist.config import Config, InputConfig, ModelConfig
from vaemo_dist.model.text_head import TEXT_HEAD_PREFIX, VAEMO_PREFIX, TextHead
from vaemo_dist.model.vaemo import VAEmoModel, is_decoder_key
from vaemo_dist.startup import entry_point, fail

log = logging.getLogger(__name__)

CARD = "README.md"
WRITER = "vaemo-export"  # the owner recorded in output folders (fsutil.claim_output_dir)
CACHE_SOURCE = "export-source.json"  # export_or_checkpoint's record of the checkpoint a cached export is of
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# Writing an export


def select_weights(state: dict[str, torch.Tensor], model: ModelConfig, inputs: InputConfig,
                   include_decoder: bool, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Check `state` against the architecture and keep the exported part, cast to `dtype`."""
    with torch.device("meta"):  # shapes only, no memory
        expected = VAEmoModel(model, inputs).state_dict()
    missing = [k for k in expected if k not in state and (include_decoder or not is_decoder_key(k))]
    if missing:
        raise ExportError(f"the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:5]}")
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise ExportError(f"the checkpoint has weights the model does not, e.g. {unknown[:5]}")
    return {name: _fitted(name, state[name], ref, dtype, "in the model") for name, ref in expected.items()
            if include_decoder or not is_decoder_key(name)}


def _fitted(name: str, t: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """`t` as exported (a CPU copy, floating point cast to `dtype`) once its shape is `ref`'s."""
    if tuple(t.shape) != tuple(ref.shape):
        raise ExportError(f"{name}: shape {tuple(t.shape)} in the checkpoint, {tuple(ref.shape)} {where}")
    return t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous().clone()


def split_stage2_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                  dict[str, torch.Tensor] | None]:
    """(VAEmo weights, text-head weights) of a consolidated state dict, both without their prefix; the
    text head is None for a stage-1 state (plain VAEmoModel names)."""
    if not any(k.startswith((VAEMO_PREFIX, TEXT_HEAD_PREFIX)) for k in state):
        return state, None
    stray = [k for k in state if not k.startswith((VAEMO_PREFIX, TEXT_HEAD_PREFIX))]
    if stray:
        raise ExportError(f"a stage-2 checkpoint ({VAEMO_PREFIX}* / {TEXT_HEAD_PREFIX}*) with other "
                          f"weights too, e.g. {stray[:5]}")
    vaemo = {k.removeprefix(VAEMO_PREFIX): v for k, v in state.items() if k.startswith(VAEMO_PREFIX)}
    head = {k.removeprefix(TEXT_HEAD_PREFIX): v for k, v in state.items() if k.startswith(TEXT_HEAD_PREFIX)}
    if not head:
        raise ExportError(f"a stage-2 checkpoint without {TEXT_HEAD_PREFIX}* weights")
    return vaemo, head


def text_head_shape(head: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(text embedding dim, hidden width; 0 = linear head) read off the head's first layer."""
    try:
        return TextHead.sizes(head)
    except ValueError as e:
        raise ExportError(str(e)) from None


def select_text_head(head: dict[str, torch.Tensor], embed_dim: int,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Check the text-head weights against `TextHead` (their own shapes give its sizes) and cast them."""
    text_dim, hidden = text_head_shape(head)
    with torch.device("meta"):
        expected = TextHead(text_dim, embed_dim, hidden).state_dict()
    if set(head) != set(expected):
        raise ExportError(f"the text head's weights {sorted(head)} are not those of TextHead "
                          f"{sorted(expected)}")
    return {name: _fitted(f"text_head.{name}", head[name], ref, dtype, f"for embed_dim {embed_dim}")
            for name, ref in expected.items()}


def save_pretrained(out_dir: str | Path, weights: dict[str, torch.Tensor], cfg: Config, *,
                    source: dict[str, Any] | None = None, card: str | None = None,
                    text_head: dict[str, torch.Tensor] | None = None,
                    text_encoder: str | None = None) -> Path:
    """Write model.safetensors + config.json (+ README.md) for `from_pretrained`; with `text_head`
    (TextHead weights of a stage-2 run) also text_head.safetensors, and config.json says stage 2.
    `text_encoder`: the frozen encoder the head was trained on (default: `cfg.stage2.text_encoder`)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    includes_decoder = any(is_decoder_key(k) for k in weights)
    tensors = [*weights.values(), *(text_head or {}).values()]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    head_info = None
    if text_head is not None:
        text_dim, hidden = text_head_shape(text_head)
        head_info = {"file": TEXT_HEAD_WEIGHTS, "text_encoder": text_encoder or cfg.stage2.text_encoder,
                     "text_dim": text_dim, "text_head_hidden": hidden, "embed_dim": cfg.model.embed_dim}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "VAEmoModel",
        "stage": 2 if text_head is not None else 1,
        "includes_decoder": includes_decoder,
        "includes_text_head": text_head is not None,
        "text_head": head_info,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "model": dataclasses.asdict(cfg.model),
        "inputs": dataclasses.asdict(cfg.inputs),
        "loss": {"max_logit_scale": cfg.loss.max_logit_scale, "init_temperature": cfg.loss.init_temperature},
        "source": source or {},
    }
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(weights, str(tmp), metadata=meta)
    tmp.replace(out / WEIGHTS)
    head_file = out / TEXT_HEAD_WEIGHTS
    if text_head is not None:
        tmp = out / (TEXT_HEAD_WEIGHTS + ".tmp")
        save_file(text_head, str(tmp), metadata={**meta, "text_encoder": head_info["text_encoder"]})
        tmp.replace(head_file)
    elif head_file.exists():  # a stage-1 export over an earlier stage-2 one: no stale head left behind
        head_file.unlink()
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if card is not None:
        (out / CARD).write_text(card)
    return out


def checkpoint_to_export(path: str | Path) -> Path:
    """The checkpoint step folder `path` names (a step folder, `checkpoints/latest`, a checkpoints/ or
    run folder), or ExportError saying what `path` is instead (an export: "already an export")."""
    p = Path(path)
    if is_export(p):
        raise ExportError(f"{p} is already an export ({describe_folder(p).removeprefix('an export (')}: use "
                          "it as it is (from_pretrained, vaemo-embed, stage2.init_from, fine-tuning); to "
                          "export again with other options, give vaemo-export the checkpoint it came from")
    if not p.exists():
        raise ExportError(f"checkpoint folder not found: {p}")
    try:
        return resolve(p)
    except NotACheckpointError:
        raise ExportError(f"{p} is {describe_folder(p)}; vaemo-export wants a training checkpoint: a step "
                          "folder (runs/<name>/checkpoints/step_XXXXXXXX), a checkpoints/ folder or a run "
                          "folder (runs/<name>, meaning its latest checkpoint)") from None


def claim_export_dir(out_dir: str | Path, *, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Make `out_dir` vaemo-export's output folder (fsutil.claim_output_dir), adopting an unmarked
    earlier export; a non-empty folder of anyone else's raises FolderInUseError, nothing changed."""
    from vaemo_dist.fsutil import claim_output_dir

    out = Path(out_dir)
    return claim_output_dir(out, WRITER, overwrite=overwrite, flag=flag, adopt=is_export(out))


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, include_decoder: bool = False,
                      dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Export a DeepSpeed checkpoint of our trainer (any ZeRO stage) as a portable folder.

    `out_dir` must be new, empty or an earlier export (claim_export_dir); a non-empty folder of anyone
    else's raises fsutil.FolderInUseError before anything is read or written, unless `overwrite`
    (moved aside, never deleted)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    folder = checkpoint_to_export(checkpoint)
    out = Path(out_dir)
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out} is inside the checkpoint {folder}: name a folder of its own")
    claim_export_dir(out, overwrite=overwrite)
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"{config_file} is missing: was this checkpoint written by vaemo_dist's trainer?")
    raw = yaml.safe_load(config_file.read_text()) or {}
    cfg = model_config_from(raw)
    layout = read_layout(folder)
    state, head = split_stage2_state(consolidate(folder))
    weights = select_weights(state, cfg.model, cfg.inputs, include_decoder, DTYPES[dtype])
    text_head = None if head is None else select_text_head(head, cfg.model.embed_dim, DTYPES[dtype])
    ranks = sorted(folder.glob("vaemo_rank*.json"))
    step = json.loads(ranks[0].read_text()).get("step") if ranks else None
    source = {
        "checkpoint": str(folder.resolve()),
        "step": step,
        "zero_stage": layout.zero_stage,
        "dp_world_size": layout.dp_world_size,
        "tp_world_size": layout.tp_world_size,
        "world_size": len(ranks) or None,
        "deepspeed": layout.ds_version,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    stage2 = raw.get("stage2") or {}
    if text_head is not None:
        hidden = text_head_shape(text_head)[1]
        if stage2.get("text_head_hidden", hidden) != hidden:  # the config does not describe these weights
            raise ExportError(f"stage2.text_head_hidden is {stage2['text_head_hidden']} in {config_file}, "
                              f"but the checkpoint's text head has hidden width {hidden}")
    card = model_card(raw, source, weights, _logged_metrics(folder, step), text_head)
    return save_pretrained(out_dir, weights, cfg, source=source, card=card, text_head=text_head,
                           text_encoder=stage2.get("text_encoder"))


def default_export_cache() -> Path:
    """Where export_or_checkpoint keeps exports of checkpoints: $VAEMO_CACHE_DIR/exports, else
    ~/.cache/vaemo_dist/exports."""
    import os

    root = os.environ.get("VAEMO_CACHE_DIR") or str(Path.home() / ".cache" / "vaemo_dist")
    return Path(root) / "exports"


def _checkpoint_stamp(folder: Path) -> dict[str, Any]:
    """What identifies a checkpoint's contents for the cache: its path and its model-states files' sizes
    and modification times (a run overwritten at the same path gives another stamp)."""
    files = model_state_files(folder)
    return {"checkpoint": str(folder.resolve()),
            "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


def export_or_checkpoint(path: str | Path, cache_dir: str | Path | None = None, *,
                         include_decoder: bool = False) -> Path:
    """An export folder for `path`: `path` itself when it is an export; for a checkpoint (a step folder,
    `checkpoints/latest`, a checkpoints/ or run folder) an export of it in a cache folder
    (`cache_dir`, default default_export_cache()), made once and reused while the checkpoint is
    unchanged. Anything else raises ExportError saying what it is. Safe to call from several ranks at
    once (they take turns on a lock; the first exports)."""
    from vaemo_dist.fsutil import folder_lock, write_atomic

    p = Path(path)
    if is_export(p):
        return p
    folder = checkpoint_to_export(p)
    stamp = {**_checkpoint_stamp(folder), "include_decoder": include_decoder}
    run = folder.parent.parent.name if folder.parent.name == "checkpoints" else folder.parent.name
    key = hashlib.sha256(stamp["checkpoint"].encode()).hexdigest()[:12]
    out = Path(cache_dir) if cache_dir is not None else default_export_cache()
    out = out / f"{run}-{folder.name}-{key}"

    def current() -> bool:
        try:
            return is_export(out) and json.loads((out / CACHE_SOURCE).read_text()) == stamp
        except (OSError, ValueError):
            return False

    if current():
        return out
    claim_export_dir(out)  # a folder of someone else's at that path is refused, nothing changed
    with folder_lock(out):
        if not current():
            (out / CACHE_SOURCE).unlink(missing_ok=True)
            export_checkpoint(folder, out, include_decoder=include_decoder)
            write_atomic(out / CACHE_SOURCE, json.dumps(stamp, sort_keys=True))
            log.info("exported the checkpoint %s into the cache %s", folder, out)
    return out


def _logged_metrics(folder: Path, step: int | None) -> dict[str, Any] | None:
    """The metrics.jsonl record of `step` from the run folder (runs/<name>/checkpoints/step_X)."""
    path = folder.parent.parent / "metrics.jsonl"
    if step is None or not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("step") == step:
                found = record
    return found


STAGE1_METRICS = ("loss", "rec_video", "rec_audio", "contrastive", "acc_a2v")
STAGE2_METRICS = ("loss", "text_joint", "text_audio", "text_video", "acc_t2j", "acc_t2j_class",
                  "stage1_loss", "rec_video", "rec_audio", "contrastive")


def model_card(raw: dict[str, Any], source: dict[str, Any], weights: dict[str, torch.Tensor],
               metrics: dict[str, Any] | None, text_head: dict[str, torch.Tensor] | None = None) -> str:
    """A README.md for the export: what was trained, on what, for how long."""
    m, inp = raw.get("model", {}), raw.get("inputs", {})
    data, train = raw.get("data", {}), raw.get("train", {})
    optim, loss = raw.get("optim", {}), raw.get("loss", {})
    s2 = raw.get("stage2") or {}
    v, a = inp.get("video", {}), inp.get("audio", {})
    n_params = sum(t.numel() for t in weights.values())
    world = source.get("world_size") or source.get("dp_world_size") or 1
    batch = data.get("batch_size", 0) * train.get("grad_accum", 1) * (source.get("dp_world_size") or world)
    step = source.get("step")
    shards = data.get("shards", "?")
    if shards == "synthetic":
        s = data.get("synth", {})
        shards = (f"synthetic corpus ({s.get('clips')} clips, {s.get('classes')} classes, "
                  f"{s.get('codec')}, seed {s.get('seed')})")
        if text_head is not None:  # stage 2: data.shards=synthetic is the synthetic described set
            shards = f"synthetic described set (templated descriptions of the {shards})"
    encode_line = "out = encoder.encode(video='clip.mp4', audio='clip.mp4')  # out.joint_emb, ..."
    if text_head is None:
        title = f"# VAEmo encoder: {train.get('run_name', 'run')} at step {step}"
        what = ("Audio-visual emotion representation (VAEmo stage 1: masked reconstruction + audio-visual "
                "contrastive), exported by `vaemo-export`.")
        usage = [encode_line]
    else:
        title = f"# VAEmo stage-2 (knowledge-injected) model: {train.get('run_name', 'run')} at step {step}"
        what = ("Audio-visual emotion representation after VAEmo stage 2, knowledge injection: its joint "
                "and per-modality embeddings aligned (dual-path contrastive) with frozen "
                f"`{s2.get('text_encoder')}` embeddings of affective descriptions through a trainable text "
                "head, exported by `vaemo-export` with that text head.")
        usage = [encode_line,
                 "text = encoder.embed_text(['A person who looks and sounds happy.'])  # same space",
                 "res = encoder.zero_shot(video='clip.mp4', audio='clip.mp4', prompts={",
                 "    'happy': ['A happy face and voice.'], 'sad': ['A sad face and voice.']})",
                 "res.predicted, res.probs  # class names, [B, C]"]
    lines = [
        title,
        "",
        what,
        "",
        "```python",
        "import vaemo_dist",
        "encoder = vaemo_dist.from_pretrained('<this folder>')",
        *usage,
        "```",
        "",
        "## Model",
        "",
        f"- preset `{m.get('preset')}`: dim {m.get('dim')}, depth {m.get('depth')}, heads {m.get('heads')}, "
        f"embed_dim {m.get('embed_dim')}, fusion `{m.get('fusion')}`",
        f"- exported tensors: {len(weights)} ({n_params / 1e6:.2f} M values), "
        f"decoder {'included' if any(is_decoder_key(k) for k in weights) else 'not included'}",
    ]
    if text_head is not None:
        text_dim, hidden = text_head_shape(text_head)
        lines.append(f"- text head: `{s2.get('text_encoder')}` embedding ({text_dim}-d) -> "
                     f"{'linear' if not hidden else f'MLP (hidden {hidden})'} -> {m.get('embed_dim')}-d, "
                     f"L2-normalised ({sum(t.numel() for t in text_head.values())} values)")
    lines += [
        f"- video: {v.get('frames')} frames, stride {v.get('stride')}, {v.get('size')} px, "
        f"tubelet {v.get('tubelet')}, patch {v.get('patch')}, mean {v.get('mean')}, std {v.get('std')}",
        f"- audio: {a.get('sample_rate')} Hz, {a.get('n_mels')} mel bins x {a.get('frames')} frames "
        f"({a.get('win_ms')} ms window, {a.get('hop_ms')} ms hop), patch {a.get('patch')}, "
        f"log-mel mean {a.get('mean')}, std {a.get('std')}",
        "",
        "## Training",
        "",
        f"- step {step} of {train.get('steps')}, global batch {batch} "
        f"({data.get('batch_size')} per rank x {train.get('grad_accum', 1)} accumulation x {world} ranks), "
        f"about {step * batch if isinstance(step, int) else '?'} samples seen",
        f"- AdamW lr {optim.get('lr')} (warmup {optim.get('warmup_steps')}, "
        f"cosine to {optim.get('min_lr')}), "
        f"weight decay {optim.get('weight_decay')}, clip {optim.get('clip_grad')}",
    ]
    if text_head is None:
        lines.append(f"- mask ratios video {m.get('mask_ratio_video')} / audio {m.get('mask_ratio_audio')}; "
                     f"loss weights video {loss.get('video_weight')}, audio {loss.get('audio_weight')}, "
                     f"contrastive {loss.get('contrastive_weight')}")
    else:
        lines += [
            f"- stage 2 from `{s2.get('init_from') or 'random initialisation'}`; path weights text-joint "
            f"{s2.get('joint_weight')}, text-audio {s2.get('audio_weight')}, "
            f"text-video {s2.get('video_weight')}, stage-1 objective {s2.get('stage1_weight')}; "
            f"masked inputs {s2.get('masked')}, encoder frozen {s2.get('freeze_encoder')}",
        ]
    lines += [
        f"- DeepSpeed {source.get('deepspeed')}, ZeRO-{source.get('zero_stage')}, "
        f"TP {source.get('tp_world_size')}, precision `{train.get('precision')}`, seed {train.get('seed')}",
        f"- data: {shards}",
        f"- checkpoint: `{source.get('checkpoint')}`",
    ]
    names = STAGE1_METRICS if text_head is None else STAGE2_METRICS
    keys = [k for k in names if isinstance((metrics or {}).get(k), (int, float))]
    if metrics and keys:
        lines += ["", "## Logged at this step", "",
                  "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys),
                  "| " + " | ".join(f"{metrics[k]:.4f}" for k in keys) + " |"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line (registered as `vaemo-export`)


@entry_point("vaemo-export")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vaemo-export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a step folder, a checkpoints/ folder or a run folder (-> latest)")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty or an earlier vaemo-export output (replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out is a non-empty folder vaemo-export did not create: move it aside to "
                        "<out>.old-<timestamp> (never deleted) and export into a fresh one")
    p.add_argument("--with-decoder", action="store_true", help="also export the reconstruction decoder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args(argv)
    from vaemo_dist.fsutil import FolderInUseError
    start = time.perf_counter()
    try:
        out = export_checkpoint(args.checkpoint, args.out, include_decoder=args.with_decoder,
                                dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointError, NotImplementedError, FolderInUseError) as e:
        return fail(f"vaemo-export: {e}")
    config = json.loads((out / CONFIG).read_text())
    source = config["source"]
    print(f"exported stage-{config['stage']} step {source.get('step')} (ZeRO-{source.get('zero_stage')}"
          f"{', text head included' if config['includes_text_head'] else ''}) to {out} "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
