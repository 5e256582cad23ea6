"""Predictions on new clips with a classifier that the linear probe or fine-tuning saved.

    vaemo-predict --model runs/probe/fold_1/classifier --input new_clips/ --out predictions.csv

    import vaemo_dist
    clf = vaemo_dist.from_pretrained("runs/probe/classifier")
    res = clf.predict(video="clip.mp4")          # audio from the same file (sibling .flac/.wav or own track)
    res.predicted, res.probs, res.classes        # class names [B], probabilities [B, C], column names

Where classifiers come from (launchers/finetune.py, vaemo_dist/eval/downstream.py):

    --mode probe      <out>/fold_<f>/classifier/   the probe of fold f (fitted on that fold's training
                                                    clips: the one its predictions.csv rows came from)
                      <out>/classifier/             the probe fitted on every labelled clip, after the
                                                    folds: the one to label new clips with
    --mode finetune   <out>/fold_<f>/classifier/   the fine-tuned model of fold f

A classifier folder holds:

    classifier.json     format "vaemo-classifier"; kind "probe" or "finetune"; class_names (the order of
                        the probability columns); modality (av, video, audio); features (probe: which
                        encoder output the head reads); preprocessing (the export's `inputs` section:
                        frames, stride, size, sample rate, mel bins); encoder (the export's path,
                        absolute and relative to this folder, the sha256 of its model.safetensors, its
                        config.json); trained_on (mode, data, fold, training clips, the fold's test
                        metrics; for fold "all", the k-fold summary of the run)
    head.safetensors    probe: the standardisation (mean, std) and linear layer (weight, bias), float64
    model.safetensors   finetune: the whole fine-tuned classifier (encoder and head): self-contained

Safetensors and JSON only: nothing is unpickled. A probe's head runs on the frozen export it was
trained on, found by path and checked by hash (a moved export: `--encoder` / `encoder=`).

`vaemo-predict --input` takes what the other commands take (vaemo_dist/data/sources.py: a folder of
media files, a CSV manifest, shards, a shard folder or its manifest.json), and media files named one
by one. It writes one row per clip, in input order: key, path, label (where the input has one),
predicted (a class name), one `prob_<class>` column per class, and error. A clip that cannot be read
or decoded gets a row with its error and no prediction; such clips are counted, never fatal.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vaemo_dist.checkpoints import CLASSIFIER_CONFIG, check_format
from vaemo_dist.export import CONFIG, WEIGHTS, ExportError
from vaemo_dist.fsutil import claim_output_dir, move_aside
from vaemo_dist.startup import entry_point, fail

if TYPE_CHECKING:
    from vaemo_dist.data.sources import Source
    from vaemo_dist.eval.probe import LinearProbe
    from vaemo_dist.eval.splits import Fold
    from vaemo_dist.pretrained import Encoder, MediaArg

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "head.safetensors"  # probe
MODEL_WEIGHTS = "model.safetensors"  # finetune
FORMAT = "vaemo-classifier"
FORMAT_VERSION = 1
WRITER = "classifier"  # the owner name of classifier folders (vaemo_dist.fsutil.claim_output_dir)
PROBE_TENSORS = ("mean", "std", "weight", "bias")


# --------------------------------------------------------------------------------------------
# Saving


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (remembered per path, size and mtime: a run hashes its export once)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def encoder_reference(export: str | Path, folder: str | Path,
                      config: dict[str, Any] | None = None) -> dict[str, Any]:
    """How a classifier folder names the encoder it was trained on: the export's path (absolute and
    relative to `folder`), the sha256 of its weights (None where `export` holds no model.safetensors)
    and the architecture (`config`, else the export's config.json: its model, inputs, loss sections)."""
    export, folder = Path(export).resolve(), Path(folder).resolve()
    if config is None:
        config = json.loads((export / CONFIG).read_text())
    weights = export / WEIGHTS
    return {"path": str(export), "relative": os.path.relpath(export, folder),
            "sha256": file_sha256(weights) if weights.is_file() else None,
            "config": {k: config[k] for k in ("model", "inputs", "loss") if k in config}}


def _write_info(folder: Path, info: dict[str, Any]) -> None:
    from vaemo_dist.eval.metrics import write_json

    tmp = folder / f".{CLASSIFIER_CONFIG}.tmp-{os.getpid()}"
    write_json(tmp, info)  # NaN (a class absent from a test fold) written as null
    os.replace(tmp, folder / CLASSIFIER_CONFIG)


def _classifier_info(kind: str, export: str | Path, folder: Path, class_names: Sequence[str],
                     modality: str, trained_on: dict[str, Any], config: dict[str, Any] | None = None,
                     **extra: Any) -> dict[str, Any]:
    encoder = encoder_reference(export, folder, config)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "class_names": list(class_names), "modality": modality, **extra,
            "preprocessing": encoder["config"]["inputs"], "encoder": encoder, "trained_on": trained_on}


def save_probe_classifier(folder: str | Path, probe: LinearProbe, *, export: str | Path,
                          class_names: Sequence[str], modality: str, features: str,
                          trained_on: dict[str, Any]) -> Path:
    """Write a probe's classifier folder: head.safetensors + classifier.json (written last)."""
    from safetensors.numpy import save_file

    folder = claim_output_dir(folder, WRITER)
    tmp = folder / f".{HEAD_WEIGHTS}.tmp-{os.getpid()}"
    save_file({name: np.ascontiguousarray(getattr(probe, name), dtype=np.float64) for name in PROBE_TENSORS},
              str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, folder / HEAD_WEIGHTS)
    _write_info(folder, _classifier_info("probe", export, folder, class_names, modality,
                                         {**trained_on, "l2": probe.l2}, features=features,
                                         head={"file": HEAD_WEIGHTS, "tensors": list(PROBE_TENSORS)}))
    return folder


def save_finetune_classifier(folder: str | Path, weights: str | Path, *, export: str | Path,
                             class_names: Sequence[str], modality: str, trained_on: dict[str, Any],
                             config: dict[str, Any] | None = None) -> Path:
    """Write a fine-tuned classifier's folder: a copy of `weights` (the consolidated Classifier state) as
    model.safetensors + classifier.json (written last). A copy, not a hard link: a later run that
    rewrites `weights` in place must not change a classifier folder that was already handed out.
    `config`: the run's config (its model / inputs / loss sections describe the architecture); by
    default the export's config.json."""
    folder = claim_output_dir(folder, WRITER)
    tmp = folder / f".{MODEL_WEIGHTS}.tmp-{os.getpid()}"
    shutil.copyfile(weights, tmp)
    os.replace(tmp, folder / MODEL_WEIGHTS)
    _write_info(folder, _classifier_info("finetune", export, folder, class_names, modality, trained_on,
                                         config, head={"file": MODEL_WEIGHTS}))
    return folder


def save_probe_classifiers(out: str | Path, args: argparse.Namespace, features: np.ndarray,
                           labels: np.ndarray, keys: Sequence[str], folds: dict[str, Fold],
                           report: dict[str, Any]) -> list[Path]:
    """After `launchers/finetune.py --mode probe`: the classifier of each fold (<out>/fold_<f>/classifier,
    refitted with the fold's chosen penalty: the probe is deterministic, so it is the probe whose
    predictions the report holds) and the probe fitted on every labelled clip (<out>/classifier, its
    penalty chosen as the folds' were)."""
    from vaemo_dist.eval.probe import _indices, choose_l2, fit_logistic

    out = Path(out)
    names, balanced = report["class_names"], bool(args.balanced)
    common = {"export": args.pretrained, "class_names": names, "modality": report["modality"],
              "features": report["features"]}
    index = {k: i for i, k in enumerate(keys)}
    saved = []
    for name, fold in folds.items():
        metrics = report["folds"][name]
        rows = _indices(fold.train, index, labels)
        probe = fit_logistic(features[rows], labels[rows], len(names), float(metrics["l2"]),
                             class_balanced=balanced)
        trained_on = {"mode": "probe", "data": report["data"], "fold": name, "n_train": int(len(rows)),
                      "train_keys_sha256": _keys_digest(keys[i] for i in rows), "metrics": metrics}
        saved.append(save_probe_classifier(out / f"fold_{name}" / "classifier", probe, trained_on=trained_on,
                                           **common))
    rows = np.flatnonzero(labels >= 0)
    x, y = features[rows], labels[rows]
    l2 = choose_l2(x, y, len(names), class_balanced=balanced) if args.l2 == "auto" else float(args.l2)
    trained_on = {"mode": "probe", "data": report["data"], "fold": "all", "n_train": int(len(rows)),
                  "train_keys_sha256": _keys_digest(keys[i] for i in rows),
                  "metrics": {"estimated_by": f"the {len(folds)} folds of this run", **report["summary"]}}
    saved.append(save_probe_classifier(out / "classifier", fit_logistic(x, y, len(names), l2,
                                                                        class_balanced=balanced),
                                       trained_on=trained_on, **common))
    log.info("probe classifiers (for vaemo-predict): %s (all labelled clips) and %s", saved[-1],
             ", ".join(str(p) for p in saved[:-1]))
    return saved


def _keys_digest(keys: Iterator[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading and predicting


@dataclass
class Predictions:
    """Class predictions for a batch of clips."""

    classes: list[str]  # class names, in the order of the probability columns
    probs: torch.Tensor  # [B, C] softmax of the classifier's logits
    labels: torch.Tensor  # [B] long: the argmax class index
    predicted: list[str]  # [B] the argmax class names


class Predictor:
    """A saved classifier: `predict` on files or tensors, as `Encoder.encode` takes them."""

    def __init__(self, folder: Path, info: dict[str, Any], encoder: Encoder, probe: LinearProbe | None = None,
                 classifier: torch.nn.Module | None = None) -> None:
        self.folder, self.info, self.encoder = folder, info, encoder
        self.probe, self.classifier = probe, classifier

    @property
    def classes(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    @property
    def modality(self) -> str:
        return str(self.info["modality"])

    @property
    def inputs(self) -> Any:
        """The preprocessing (InputConfig) clips are decoded with."""
        return self.encoder.inputs

    @torch.no_grad()
    def logits(self, video: torch.Tensor | None, audio: torch.Tensor | None) -> torch.Tensor:
        """[B, C] float64 logits of a batch of decoded inputs (only the classifier's modalities are used)."""
        video = video if self.modality != "audio" else None
        audio = audio if self.modality != "video" else None
        if self.probe is not None:
            from vaemo_dist.eval.embed import OUTPUTS, EmbeddingSet

            out = self.encoder.encode(video=video, audio=audio)
            arrays = {n: getattr(out, n).float().cpu().numpy() for n in OUTPUTS
                      if getattr(out, n) is not None}
            x = EmbeddingSet([], np.zeros(0, dtype=np.int64), arrays).features(self.info["features"])
            return torch.from_numpy(self.probe.logits(x))
        assert self.classifier is not None
        move = dict(device=self.encoder.device, dtype=self.encoder.dtype)
        return self.classifier(None if video is None else video.to(**move),
                               None if audio is None else audio.to(**move)).double().cpu()

    def predict(self, video: MediaArg = None, audio: MediaArg = None) -> Predictions:
        """Class names and probabilities for a batch: files (one path or a list) decoded with the
        export's preprocessing, or tensors as `Encoder.encode` takes them. An audio-visual classifier
        given only video files takes their audio from the same files (a sibling .flac/.wav or the
        file's own track); an audio classifier given only video files takes their audio tracks."""
        is_file = video is not None and not isinstance(video, torch.Tensor)
        if self.modality != "video" and audio is None and is_file:
            audio = video
        if self.modality == "audio":
            video = None
        elif self.modality == "video":
            audio = None
        missing = [m for m, x in (("video", video), ("audio", audio))
                   if x is None and self.modality in ("av", m)]
        if missing:
            raise ValueError(f"this {self.modality} classifier needs {' and '.join(missing)} input")
        v, a = self.encoder.load(video, audio)
        logits = self.logits(v, a)
        labels = logits.argmax(dim=1)
        return Predictions(classes=self.classes, probs=logits.softmax(dim=1).float(), labels=labels,
                           predicted=[self.classes[i] for i in labels.tolist()])

    def __getattr__(self, name: str) -> Any:
        # Only reached for names a Predictor lacks: code that wanted an export's Encoder says why.
        if name.startswith("__") or name in ("folder", "info", "encoder", "probe", "classifier"):
            raise AttributeError(name)
        raise AttributeError(f"{name!r}: {self.folder} is a classifier folder ({self.info.get('kind')}), "
                             "not an exported encoder: it predicts classes (.predict, vaemo-predict); its "
                             "encoder is `.encoder`")

    def __repr__(self) -> str:
        fold = self.info.get("trained_on", {}).get("fold")
        return (f"Predictor({self.folder}, kind={self.kind}, modality={self.modality}, fold={fold}, "
                f"classes={self.classes})")


def _read_info(folder: Path) -> dict[str, Any]:
    file = folder / CLASSIFIER_CONFIG
    if not file.is_file():
        if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
            raise ExportError(f"{folder} is an exported encoder, not a classifier: fit one with "
                              "`python launchers/finetune.py --mode probe --pretrained <export> --data "
                              "<labelled clips>` (it saves <out>/classifier/) or --mode finetune "
                              "(<out>/fold_<f>/classifier/); docs/downstream.md")
        raise ExportError(f"{folder} is not a classifier folder (no {CLASSIFIER_CONFIG}); the linear probe "
                          "and fine-tuning save one under their --out (docs/downstream.md)")
    return check_format(json.loads(file.read_text()), file, FORMAT, FORMAT_VERSION)


def _find_export(folder: Path, ref: dict[str, Any], given: str | Path | None) -> Path:
    """The export a probe was trained on: `given`, else its recorded path, else the path relative to
    the classifier folder (a run folder moved as a whole); its weights must hash as recorded."""
    candidates = [Path(given)] if given is not None else [Path(ref["path"]), folder / ref["relative"]]
    for export in candidates:
        if (export / WEIGHTS).is_file():
            digest = file_sha256(export / WEIGHTS)
            if digest != ref["sha256"]:
                raise ExportError(f"{export / WEIGHTS} is not the encoder this classifier was trained on "
                                  f"(sha256 {digest[:12]}..., recorded {ref['sha256'][:12]}...): a probe's "
                                  "head only fits the features of its own export")
            return export
    where = " or ".join(str(c) for c in candidates)
    raise ExportError(f"the export this classifier was trained on is not at {where}; pass its new place "
                      "(vaemo-predict --encoder DIR, from_pretrained(..., encoder=DIR))")


def load_classifier(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    encoder: str | Path | None = None) -> Predictor:
    """A classifier folder -> Predictor in eval mode (see the module doc)."""
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file

    from vaemo_dist.checkpoints import build_model
    from vaemo_dist.eval.probe import LinearProbe
    from vaemo_dist.pretrained import Encoder, from_pretrained

    folder = Path(folder)
    info = _read_info(folder)
    kind, names = info.get("kind"), info["class_names"]
    if kind == "probe":
        export = _find_export(folder, info["encoder"], encoder)
        enc = from_pretrained(export, device=device, dtype=dtype)
        if not isinstance(enc, Encoder):
            raise ExportError(f"{export} is not an exported encoder")
        tensors = load_numpy(str(folder / info["head"]["file"]))
        probe = LinearProbe(*(tensors[n] for n in PROBE_TENSORS), l2=float(info["trained_on"].get("l2", 0.0)))
        if probe.weight.shape[0] != len(names):
            raise ExportError(f"{folder}: the head has {probe.weight.shape[0]} classes, class_names "
                              f"{len(names)}")
        predictor = Predictor(folder, info, enc, probe=probe)
    elif kind == "finetune":
        from vaemo_dist.objectives.finetune import Classifier

        config = info["encoder"]["config"]
        model = Classifier(build_model(config), len(names), info["modality"])
        weights = folder / info["head"]["file"]
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as e:
            raise ExportError(f"{weights} does not fit the classifier described in {CLASSIFIER_CONFIG}: "
                              f"{str(e)[:300]}") from e
        model.requires_grad_(False)
        model = model.to(device=device, dtype=dtype).eval()
        predictor = Predictor(folder, info, Encoder(model.backbone, config, folder=folder), classifier=model)
    else:
        raise ExportError(f"{folder / CLASSIFIER_CONFIG}: kind {kind!r}, expected probe or finetune")
    want = info.get("preprocessing")
    if want is not None and predictor.encoder.config.get("inputs") != want:
        raise ExportError(f"{folder}: the encoder's inputs section differs from the classifier's "
                          "preprocessing")
    return predictor


# --------------------------------------------------------------------------------------------
# vaemo-predict


def open_inputs(specs: Sequence[str]) -> list[Source]:
    """--input values -> sources, in order: media files named one by one (keyed by the path as given)
    form one source; anything else is opened as the other commands open it (open_source)."""
    from vaemo_dist.data.media import AUDIO_EXTS, VIDEO_EXTS
    from vaemo_dist.data.sources import Record, Source, open_source

    sources: list[Source] = []
    files: list[Record] = []

    def flush() -> None:
        if files:
            records = list(files)
            spec = ",".join(r.key for r in records)
            sources.append(Source("files", spec, lambda: iter(records), len(records)))
            files.clear()

    for spec in specs:
        if Path(spec).suffix.lower() in VIDEO_EXTS + AUDIO_EXTS and not Path(spec).is_dir():
            files.append(Record(key=spec, path=spec))  # a missing or broken file gets its error row
            continue
        flush()
        sources.append(open_source(spec))
    flush()
    return sources


def predict_sources(predictor: Predictor, sources: Sequence[Source], batch_size: int = 16, workers: int = 0,
                    progress: bool = False) -> Iterator[dict[str, Any]]:
    """One dict per clip, in input order: key, path, label, predicted, probs (None with an error)."""
    from tqdm import tqdm

    from vaemo_dist.data.sources import decoded_loader

    total = sum(s.size or 0 for s in sources) if all(s.size for s in sources) else None
    bar = tqdm(total=total, desc="predict", unit="clip", disable=not progress, dynamic_ncols=True)
    for source in sources:
        paths = {r.key: r.path or "" for r in source.records()} if source.kind != "shards" else {}
        batch: list[tuple[Any, dict[str, Any]]] = []
        for item in decoded_loader(source, predictor.inputs, predictor.modality, workers):
            label = ""
            if item.label >= 0:
                names = source.class_names
                label = names[item.label] if item.label < len(names) else str(item.label)
            batch.append((item, {"key": item.key, "path": paths.get(item.key, ""), "label": label,
                                 "predicted": "", "probs": None, "error": item.error or ""}))
            if len(batch) == batch_size:
                yield from _predict_batch(predictor, batch)
                bar.update(len(batch))
                batch = []
        yield from _predict_batch(predictor, batch)
        bar.update(len(batch))
    bar.close()


def _predict_batch(predictor: Predictor, batch: list[tuple[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
    ok = [(item, row) for item, row in batch if item.error is None]
    if ok:
        video = torch.stack([item.video for item, _ in ok]) if ok[0][0].video is not None else None
        audio = torch.stack([item.audio for item, _ in ok]) if ok[0][0].audio is not None else None
        for (_, row), p in zip(ok, predictor.logits(video, audio).softmax(dim=1).numpy()):
            row["probs"], row["predicted"] = p, predictor.classes[int(np.argmax(p))]
    return [row for _, row in batch]


def write_predictions(path: Path, rows: Iterator[dict[str, Any]], classes: Sequence[str]) -> tuple[int, int]:
    """Write the CSV (to a temporary name, renamed when complete); returns (predicted, failed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    done = failed = 0
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "path", "label", "predicted", *(f"prob_{c}" for c in classes), "error"])
        for row in rows:
            probs = row["probs"]
            cells = [f"{p:.6f}" for p in probs] if probs is not None else [""] * len(classes)
            writer.writerow([row["key"], row["path"], row["label"], row["predicted"], *cells, row["error"]])
            if probs is None:
                failed += 1
                log.warning("no prediction for %s: %s", row["key"], row["error"])
            else:
                done += 1
    os.replace(tmp, path)
    return done, failed


@entry_point("vaemo-predict")
def main(argv: list[str] | None = None) -> int:
    from vaemo_dist.data.writer import HelpWithDefaults

    p = argparse.ArgumentParser(prog="vaemo-predict", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--model", required=True,
                   help="a classifier folder: <probe out>/classifier, <out>/fold_<f>/classifier")
    p.add_argument("--input", required=True, nargs="+",
                   help="media files, a folder of them, a CSV manifest, shards, a shard folder or its "
                        "manifest.json")
    p.add_argument("--out", required=True, help="the predictions CSV to write")
    p.add_argument("--overwrite", action="store_true",
                   help="if --out exists, move it aside to <out>.old-<timestamp> (never deleted)")
    p.add_argument("--encoder", default=None,
                   help="a probe's export, where it has moved since training (its hash is checked)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per forward pass")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: decode in this one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from vaemo_dist.data.sources import SourceError

    out = Path(args.out)
    if out.is_dir():
        return fail(f"vaemo-predict: --out {out} is a folder; name the CSV file to write")
    if out.exists() and not args.overwrite:
        return fail(f"vaemo-predict: refusing to write {out}: the file exists. Nothing was changed. Name "
                    f"another file, or pass --overwrite to move it aside to {out.name}.old-<timestamp> "
                    "(never deleted)")
    try:
        predictor = load_classifier(args.model, device=args.device, encoder=args.encoder)
        sources = open_inputs(args.input)
    except (ExportError, SourceError, OSError) as e:
        return fail(f"vaemo-predict: {e}")
    log.info("%r", predictor)
    if out.exists():
        log.info("moved the old %s aside to %s", out, move_aside(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = predict_sources(predictor, sources, args.batch_size, args.workers, progress=not args.quiet)
    done, failed = write_predictions(out, rows, predictor.classes)
    print(f"vaemo-predict: {done} clips predicted, {failed} could not be read (their rows say why) -> {out}",
          file=sys.stderr)
    return 0 if done or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
