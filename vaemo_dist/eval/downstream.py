"""Downstream protocols on a pretrained export: linear probe and full fine-tuning, per fold.

    python launchers/finetune.py --mode probe --pretrained EXPORT --data manifest.csv --splits folds.csv
    deepspeed --num_gpus 2 launchers/finetune.py --mode finetune --pretrained EXPORT --data manifest.csv \
        --splits folds.csv --folds 1,2 --out runs/ft [--epochs 20] [train.zero_stage=2 optim.lr=5e-4 ...]

Both write to `--out`: `metrics.json` (per fold UAR / WAR / per-class recall / confusion matrix, and
their mean ± std over folds), `predictions.csv` (fold, key, label, prediction), `confusion.png`
(summed over folds) and `confusion_fold_<f>.png`.

probe: features of every clip are computed once with the frozen encoder (cached in
`<out>/features.npz`), then a logistic-regression probe is fitted per fold (vaemo_dist/eval/probe.py).

finetune: per fold, the labelled training clips are packed into WebDataset shards under
`<out>/fold_<f>/train_shards/` (bytes copied, never re-encoded, except audio from a video's own
track, which becomes 16-bit FLAC), the classifier (objectives/finetune.py) trains through the same
DeepSpeed Trainer as pretraining (`<out>/fold_<f>/` holds its checkpoints and metrics.jsonl), and
the final checkpoint, consolidated like an export, is evaluated on the fold's test clips by all ranks.
The trainer's config comes from `--config` (default configs/finetune/tiny.yaml) and dotted
overrides; the `model` and `inputs` sections always come from the export.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaemo_dist.eval.metrics import (
    classification_metrics,
    format_summary,
    save_confusion_png,
    summarise,
    write_json,
)
from vaemo_dist.eval.splits import (
    Fold,
    check_keys,
    folds_from_columns,
    read_split_file,
    select_folds,
    stratified_folds,
)

log = logging.getLogger("vaemo.downstream")

DEFAULT_CONFIG = "configs/finetune/tiny.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["probe", "finetune"], default="probe")
    p.add_argument("--pretrained", required=True, help="an exported model folder (vaemo-export)")
    p.add_argument("--data", required=True, help="labelled CSV manifest, shards, or folder")
    p.add_argument("--splits", default=None,
                   help="split file (key,fold or fold,split,key); see docs/downstream.md")
    p.add_argument("--folds", default="all", help="folds to run, e.g. 1,3 (default: all)")
    p.add_argument("--kfold", type=int, default=5,
                   help="without split information: seeded stratified k folds")
    p.add_argument("--seed", type=int, default=0, help="seed of --kfold folds")
    p.add_argument("--classes", default=None, help="comma-separated class names, in label order")
    p.add_argument("--modality", choices=["av", "video", "audio"], default="av")
    p.add_argument("--out", default=None, help="output folder (default runs/<mode>-<export name>)")
    # probe
    p.add_argument("--features", default="auto",
                   help="probe features: auto (pooled tokens of the modalities used), joint_pooled, "
                        "joint_emb, video_emb, concat_emb, ...")
    p.add_argument("--l2", default="auto", help="probe L2 penalty, or auto (inner 3-fold CV on train)")
    p.add_argument("--balanced", action="store_true", help="class-balanced probe loss")
    p.add_argument("--batch-size", type=int, default=16, help="clips per encoder call when embedding")
    p.add_argument("--workers", type=int, default=0, help="decoding processes when embedding / evaluating")
    # finetune
    p.add_argument("--config", default=DEFAULT_CONFIG, help="trainer config for --mode finetune")
    p.add_argument("--epochs", type=float, default=0.0,
                   help="finetune length in epochs (overrides train.steps)")
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--head-dropout", type=float, default=0.0)
    p.add_argument("--resume", action="store_true", help="continue each fold from its latest checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="trainer config overrides (finetune), e.g. train.steps=200")
    args = p.parse_intermixed_args(argv)
    if args.out is None:
        args.out = f"runs/{args.mode}-{Path(args.pretrained).resolve().name}"
    return args


# --------------------------------------------------------------------------------------------
# Folds


def resolve_folds(args: argparse.Namespace, keys: list[str], labels: np.ndarray,
                  fold_of: dict[str, str], split_of: dict[str, str]) -> dict[str, Fold]:
    labelled = [k for k, y in zip(keys, labels) if y >= 0]
    if args.splits:
        folds = read_split_file(args.splits)
    else:
        folds = folds_from_columns(labelled, [fold_of.get(k) for k in labelled],
                                   [split_of.get(k) for k in labelled])
        if folds is None:
            folds = stratified_folds(labelled, [int(y) for y in labels if y >= 0], args.kfold, args.seed)
    folds = select_folds(folds, args.folds)
    missing = check_keys(folds, labelled)
    if any(missing.values()):
        log.warning("keys named by the split but absent from the labelled data: %s", missing)
    return folds


# --------------------------------------------------------------------------------------------
# Reports


@dataclass
class FoldResult:
    metrics: dict[str, Any]
    keys: list[str]
    labels: list[int]
    predictions: list[int]


def write_report(out: Path, results: dict[str, FoldResult], class_names: list[str],
                 info: dict[str, Any]) -> dict[str, Any]:
    summary = summarise({k: r.metrics for k, r in results.items()})
    report = {**info, "class_names": class_names, "summary": summary,
              "folds": {k: r.metrics for k, r in results.items()}}
    write_json(out / "metrics.json", report)
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fold", "key", "label", "prediction"])
        for name, r in results.items():
            writer.writerows([name, k, y, p] for k, y, p in zip(r.keys, r.labels, r.predictions))
    n = len(class_names)
    total = np.zeros((n, n), dtype=np.int64)
    for name, r in results.items():
        cm = np.array(r.metrics["confusion"], dtype=np.int64)
        total += cm
        save_confusion_png(cm, class_names, out / f"confusion_fold_{name}.png",
                           f"{info['mode']}: fold {name}")
    save_confusion_png(total, class_names, out / "confusion.png",
                       f"{info['mode']}: {len(results)} folds summed")
    log.info("%s on %s: %s", info["mode"], info["data"], format_summary(summary))
    return report


# --------------------------------------------------------------------------------------------
# Linear probe


def default_features(modality: str) -> str:
    return {"av": "concat_pooled", "video": "video_pooled", "audio": "audio_pooled"}[modality]


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    from vaemo_dist.eval.embed import EmbeddingSet, embed_source
    from vaemo_dist.eval.probe import probe_folds
    from vaemo_dist.eval.sources import open_source
    from vaemo_dist.pretrained import from_pretrained

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = from_pretrained(args.pretrained)
    source = open_source(args.data, args.classes.split(",") if args.classes else None)
    cache = out / "features.npz"
    stamp = {"pretrained": str(Path(args.pretrained).resolve()),
             "weights": _file_digest(Path(args.pretrained)), "data": str(Path(args.data).resolve()),
             "modality": args.modality}
    emb = EmbeddingSet.load(cache) if cache.is_file() else None
    if emb is None or emb.meta.get("stamp") != stamp:
        emb = embed_source(encoder, source, modality=args.modality, batch_size=args.batch_size,
                           workers=args.workers, progress=sys.stderr.isatty())
        emb.meta["stamp"] = stamp
        emb.save(cache)
    else:
        log.info("features from the cache %s", cache)
    if not (emb.labels >= 0).any():
        raise SystemExit(f"probe: no labelled clips in {args.data} (labels come from a manifest's 'label' "
                         "column or a shard json's \"label\")")
    features_name = default_features(args.modality) if args.features == "auto" else args.features
    features = emb.features(features_name)
    class_names = emb.class_names
    if not class_names or emb.labels.max() >= len(class_names):
        class_names = [str(i) for i in range(int(emb.labels.max()) + 1)]
    folds = resolve_folds(args, emb.keys, emb.labels, emb.meta.get("folds", {}), emb.meta.get("splits", {}))
    l2: float | str = args.l2 if args.l2 == "auto" else float(args.l2)
    per_fold = probe_folds(features, emb.labels, emb.keys, folds, len(class_names), l2, args.balanced)
    results = {}
    for name, m in per_fold.items():
        keys, preds = m.pop("keys"), m.pop("predictions")
        index = {k: i for i, k in enumerate(emb.keys)}
        results[name] = FoldResult(m, keys, [int(emb.labels[index[k]]) for k in keys], preds)
    info = {"mode": "probe", "pretrained": args.pretrained, "data": args.data, "modality": args.modality,
            "features": features_name, "feature_dim": int(features.shape[1]), "clips": len(emb),
            "skipped": emb.meta.get("skipped", [])}
    return write_report(out, results, class_names, info)


def _file_digest(folder: Path) -> str:
    """A cheap identity of an export's weights: size + the hash of the first MiB."""
    path = folder / "model.safetensors"
    with path.open("rb") as f:
        head = f.read(1 << 20)
    return f"{path.stat().st_size}-{hashlib.sha256(head).hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------
# Full fine-tuning


def finetune_config(args: argparse.Namespace, export_config: dict[str, Any]) -> Any:
    """The trainer's Config: --config + overrides, with model / inputs / loss from the export."""
    from vaemo_dist.config import ConfigError, LossConfig, config_from_dict, read_config_dict

    touched = [o for o in args.overrides if o.split("=", 1)[0].split(".")[0] in ("model", "inputs")]
    if touched:
        raise ConfigError(f"{touched}: model and inputs come from the pretrained export and cannot be "
                          "overridden")
    # Validated once, with the export's architecture in place (parallel.tensor must divide its heads).
    raw = read_config_dict(args.config, args.overrides)
    raw["model"], raw["inputs"] = export_config["model"], export_config["inputs"]
    loss_keys = {f.name for f in dataclasses.fields(LossConfig)}
    raw["loss"] = {**(raw.get("loss") or {}),
                   **{k: v for k, v in export_config.get("loss", {}).items() if k in loss_keys}}
    return config_from_dict(raw)


VIDEO_FIELD_OF = {".mp4": "mp4", ".webm": "webm", ".mkv": "mkv", ".mov": "mov", ".avi": "avi"}


def record_sample(record: Any, inputs: Any) -> dict[str, Any]:
    """A WebDataset sample (bytes) of one labelled record, for the trainer's loader."""
    from vaemo_dist.data.synth import encode_audio
    from vaemo_dist.pretrained import audio_source, decode_audio, sidecar_meta

    if record.sample is not None:
        sample = {k: v for k, v in record.sample.items() if not k.startswith("__")}
        meta = json.loads(bytes(sample.get("json") or b"{}").decode("utf-8"))
        meta["label"] = record.label
        return {"__key__": record.key, **sample, "json": json.dumps(meta).encode()}
    video = Path(record.path)
    # FFmpeg finds the container from the bytes; the field name only has to be one the decoder reads.
    sample = {"__key__": record.key, VIDEO_FIELD_OF.get(video.suffix.lower(), "mp4"): video.read_bytes()}
    audio = audio_source(record.audio_path or video)
    meta = {k: v for k, v in sidecar_meta(video).items() if k in ("frames", "duration", "fps")}
    if audio != video and audio.suffix.lower() in (".flac", ".wav"):
        sample[audio.suffix.lower().lstrip(".")] = audio.read_bytes()
    else:  # the audio track of the video (or another format): decode, resample, store as FLAC
        wave = decode_audio(record.key, audio.read_bytes(), inputs.audio)
        peak = float(np.abs(wave).max()) if wave.size else 0.0
        sample["flac"] = encode_audio(wave / max(peak, 1.0), inputs.audio.sample_rate, "flac")
    sample["json"] = json.dumps({**meta, "label": record.label}).encode()
    return sample


def write_fold_shards(source: Any, keys: set[str], out_dir: Path, inputs: Any,
                      per_shard: int = 64) -> list[str]:
    """Pack the labelled records named in `keys` into tar shards; reused when already complete."""
    import webdataset as wds

    from vaemo_dist.data.types import DecodeError

    stamp = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    done = out_dir / "_SUCCESS"
    if done.is_file() and done.read_text().strip() == stamp:
        return sorted(str(p) for p in out_dir.glob("train-*.tar"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("train-*.tar"):
        old.unlink()
    written, shard, writer = 0, 0, None
    for record in source.records():
        if record.key not in keys or record.label < 0:
            continue
        try:
            sample = record_sample(record, inputs)
        except (DecodeError, OSError) as e:
            log.warning("left %s out of the training shards: %s", record.key, e)
            continue
        if writer is None or written % per_shard == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(out_dir / f"train-{shard:06d}.tar"), encoder=False)
            shard += 1
        writer.write(sample)
        written += 1
    if writer is not None:
        writer.close()
    if written == 0:
        raise ValueError(f"no labelled training clips for {out_dir}")
    done.write_text(stamp)
    return sorted(str(p) for p in out_dir.glob("train-*.tar"))


def build_classifier(pretrained: str | Path, num_classes: int, args: argparse.Namespace, seed: int) -> Any:
    from vaemo_dist.objectives.finetune import Classifier
    from vaemo_dist.pretrained import from_pretrained

    backbone = from_pretrained(pretrained).model.train()
    torch.manual_seed(seed)  # the same head on every rank
    return Classifier(backbone, num_classes, args.modality, layer_decay=args.layer_decay,
                      dropout=args.head_dropout)


def evaluate(model: Any, source: Any, test_keys: list[str], inputs: Any, modality: str, batch_size: int,
             rank: int, world: int, device: torch.device) -> tuple[np.ndarray, list[str]]:
    """Predictions for `test_keys` (-1 where a clip could not be decoded), work split over ranks."""
    import torch.distributed as dist

    from vaemo_dist.data.types import DecodeError
    from vaemo_dist.eval.sources import decode_record

    index = {k: i for i, k in enumerate(test_keys)}
    preds = torch.zeros(len(test_keys), dtype=torch.long, device=device)  # prediction + 1; 0 = none
    skipped: list[str] = []
    batch: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        video = torch.stack([b[1] for b in batch]).to(device)
        audio = torch.stack([b[2] for b in batch]).to(device)
        with torch.no_grad():
            logits = model(video if modality != "audio" else None, audio if modality != "video" else None)
        preds[torch.tensor([b[0] for b in batch], device=device)] = logits.argmax(dim=1) + 1
        batch.clear()

    mine = (r for r in source.records() if r.key in index and index[r.key] % world == rank)
    for record in mine:
        try:
            video, audio = decode_record(record, inputs, "av" if modality == "av" else modality)
        except DecodeError as e:
            skipped.append(f"{record.key}: {e.reason}")
            continue
        empty = torch.zeros(0)  # stands in for the modality not used
        batch.append((index[record.key], empty if video is None else video,
                      empty if audio is None else audio))
        if len(batch) == batch_size:
            flush()
    flush()
    if dist.is_initialized() and world > 1:
        dist.all_reduce(preds)
    return (preds - 1).cpu().numpy(), skipped


def run_finetune(args: argparse.Namespace) -> int:
    from vaemo_dist import dist
    from vaemo_dist.config import ConfigError
    from vaemo_dist.eval.sources import open_source

    rank = int(os.environ.get("RANK", "0"))
    export_config = json.loads((Path(args.pretrained) / "config.json").read_text())
    try:
        cfg = finetune_config(args, export_config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % cfg.parallel.tensor:
        print(f"config error: parallel.tensor: {cfg.parallel.tensor} does not divide the world size {world}",
              file=sys.stderr)
        return 2
    exit_code = 0
    try:
        info = dist.init_distributed(cfg.train.dist_timeout_s, cfg.parallel.tensor)
        exit_code = _finetune_folds(args, cfg, info, open_source(args.data, args.classes.split(",")
                                                                  if args.classes else None))
    except Exception:  # noqa: BLE001 - report and leave with a non-zero code instead of hanging peers
        log.error("finetune failed on rank %d:\n%s", rank, traceback.format_exc())
        exit_code = 1
    dist.shutdown(exit_code)
    return exit_code  # not reached: shutdown leaves the process


def _finetune_folds(args: argparse.Namespace, cfg: Any, info: Any, source: Any) -> int:
    import copy

    from safetensors.torch import load_file, save_file

    from vaemo_dist import dist
    from vaemo_dist.export import consolidate, resolve_checkpoint
    from vaemo_dist.model.parallelize import parallelize
    from vaemo_dist.objectives.finetune import FinetuneObjective
    from vaemo_dist.train.trainer import Trainer

    out = Path(args.out)
    records = [(r.key, r.label, r.fold, r.split) for r in source.records()]  # metadata only
    keys = [r[0] for r in records]
    labels = np.array([r[1] for r in records], dtype=np.int64)
    class_names = source.class_names or [str(i) for i in range(int(labels.max()) + 1)]
    folds = resolve_folds(args, keys, labels, {k: f for k, _, f, _ in records if f is not None},
                          {k: s for k, _, _, s in records if s is not None})
    label_of = dict(zip(keys, labels.tolist()))
    objective = FinetuneObjective(len(class_names), args.mixup, args.label_smoothing)
    results: dict[str, FoldResult] = {}
    for name, fold in folds.items():
        fold_dir = out / f"fold_{name}"
        train_keys = {k for k in fold.train if label_of.get(k, -1) >= 0}
        if info.is_main:
            write_fold_shards(source, train_keys, fold_dir / "train_shards", cfg.inputs)
        dist.barrier()
        urls = sorted(str(p) for p in (fold_dir / "train_shards").glob("train-*.tar"))
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.shards = str(fold_dir / "train_shards")
        fold_cfg.train.out_dir, fold_cfg.train.run_name = str(out), fold_dir.name
        if args.resume:
            fold_cfg.train.resume = "latest"
        if args.epochs > 0:
            per_step = cfg.data.batch_size * cfg.train.grad_accum * info.dp_size
            fold_cfg.train.steps = max(1, math.ceil(args.epochs * len(train_keys) / per_step))
            fold_cfg.train.stop_at = 0
        fold_cfg.train.ckpt_every = min(fold_cfg.train.ckpt_every, fold_cfg.train.steps)
        # Tensor parallelism (parallel.tensor) splits the pretrained blocks as in pretraining; the
        # evaluation below runs the consolidated (merged) classifier whole on every rank.
        model = parallelize(build_classifier(args.pretrained, len(class_names), args, cfg.train.seed),
                            cfg.parallel)

        def compute_loss(engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
            return objective(engine, batch.video, batch.audio, batch.label)

        Trainer(fold_cfg, model, compute_loss, urls, info).fit()

        # Evaluate what was saved: the final checkpoint, consolidated as for an export.
        weights = fold_dir / "classifier.safetensors"
        if info.is_main:
            state = consolidate(resolve_checkpoint(fold_dir / "checkpoints"))
            save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
        dist.barrier()
        model = build_classifier(args.pretrained, len(class_names), args, cfg.train.seed)
        model.load_state_dict(load_file(str(weights)))
        model.to(info.device).eval()
        test_keys = [k for k in fold.test if label_of.get(k, -1) >= 0]
        preds, skipped = evaluate(model, source, test_keys, cfg.inputs, args.modality, args.batch_size,
                                  info.rank, info.world_size, info.device)
        ok = preds >= 0
        kept = [k for k, good in zip(test_keys, ok) if good]
        y = np.array([label_of[k] for k in kept], dtype=np.int64)
        metrics = classification_metrics(y, preds[ok], len(class_names))
        metrics.update(n_train=len(train_keys), steps=fold_cfg.train.steps, skipped_test=int((~ok).sum()))
        results[name] = FoldResult(metrics, kept, y.tolist(), preds[ok].tolist())
        if info.is_main:
            log.info("fold %s: UAR %.2f WAR %.2f (%d test clips)", name, 100 * metrics["uar"],
                     100 * metrics["war"], metrics["n"])
    if info.is_main:
        info_dict = {"mode": "finetune", "pretrained": args.pretrained, "data": args.data,
                     "modality": args.modality, "layer_decay": args.layer_decay, "mixup": args.mixup,
                     "config": cfg.to_dict()}
        write_report(out, results, class_names, info_dict)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.mode == "probe":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print("--mode probe runs in one process: start it with python, not deepspeed", file=sys.stderr)
            return 2
        report = run_probe(args)
        print(f"probe: {format_summary(report['summary'])} -> {args.out}/metrics.json", file=sys.stderr)
        return 0
    return run_finetune(args)
