"""Downstream protocols on a pretrained export: the linear probe, and the folds, clips, evaluation and
reports that fine-tuning (vaemo_dist/stages/finetune.py) uses.

    python launchers/finetune.py --mode probe --pretrained EXPORT --data manifest.csv --splits folds.csv
    deepspeed --num_gpus 2 launchers/finetune.py --mode finetune --pretrained EXPORT --data manifest.csv \
        --splits folds.csv --folds 1,2 --out runs/ft [--epochs 20] [train.zero_stage=2 optim.lr=5e-4 ...]

Both write to `--out`: `metrics.json` (per fold UAR / WAR / per-class recall / confusion matrix, and
their mean ± std over folds), `results.md` (the run's UAR / WAR beside the peers' published numbers
for its benchmark, vaemo_dist/eval/peers.py), `predictions.csv` (fold, key, label, prediction),
`confusion.png` (summed over folds), `confusion_fold_<f>.png` and `folds.csv` (the folds used, with
each clip's group).

Protocols (`--protocol`): official takes a benchmark's standard folds from the clips' `fold` fields
(refused when there are none, the clips are of several datasets or a speaker leaks between a fold's
train and test split); kfold makes the folds below; auto picks official when the clips carry folds
and a dataset name. Fine-tuning evaluates each test clip as `--test-views T,S` (default 2,2: T
evenly spaced temporal windows x S crops along the long side, logits averaged); the probe uses one.

Before anything is embedded or trained, the data's metadata is read (manifest rows, or only the json
members of local shards): no labelled clips, a single class, a missing `--group-by` field or folds
that cannot be made end the command at once with exit code 2, as does an `--out` folder that is not
this mode's (or, for fine-tuning, one holding a finished or started run without `--resume`):
`--overwrite` moves it aside (vaemo_dist.fsutil.claim_output_dir), never deletes.

Folds (without a split file or fold / split columns): seeded k folds, speaker-independent by default
when the clips have a speaker (`--group-by speaker`, stratified by class within the grouping, see
vaemo_dist/eval/splits.py), clip-level with `--group-by none`. Which one was used is logged and
written to metrics.json.

probe: features of every clip are computed once with the frozen encoder (cached in
`<out>/features.npz`), then a logistic-regression probe is fitted per fold (vaemo_dist/eval/probe.py).

finetune: every labelled training clip is written once, at the training resolution, to
`<out>/train_clips/` (a video whose short side exceeds the export's `inputs.video.size` is re-encoded
there by the shard writer's encoder, vaemo_dist/data/writer.py, at its own frame rate; smaller ones
and all audio keep their bytes, except audio from a video's own track, which becomes 16-bit FLAC;
the ranks share the work). Per fold, its training clips are copied from there into
`<out>/fold_<f>/train_shards/` (through the one shard writer, data/shards.ShardWriter). The training
itself is the fine-tuning stage (vaemo_dist/stages/finetune.py: the classifier of
objectives/finetune.py through the same DeepSpeed Trainer as pretraining, `<out>/fold_<f>/` holding
its checkpoints and metrics.jsonl); this module gives it the folds, the clips, the evaluation of the
consolidated final checkpoint on the fold's original test clips and the reports.
The trainer's config comes from `--config` (default configs/finetune/tiny.yaml) and dotted
overrides; the `model` and `inputs` sections always come from the export.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaemo_dist.eval.metrics import (
    format_summary,
    save_confusion_png,
    summarise,
    write_json,
)
from vaemo_dist.eval.splits import (
    Fold,
    check_keys,
    folds_from_assignment,
    folds_from_columns,
    group_overlap,
    grouped_folds,
    read_split_file,
    select_folds,
    stratified_folds,
    write_fold_file,
)
from vaemo_dist.fsutil import (
    OWNER_FILE,
    FolderInUseError,
    claim_output_dir,
    folder_owner,
    move_aside,
    refusal,
    write_atomic,
)

log = logging.getLogger("vaemo.downstream")

DEFAULT_CONFIG = "configs/finetune/tiny.yaml"
FOLDS_FILE = "folds.csv"  # the folds used, next to the results
RESULTS_FILE = "results.md"  # this run beside the peers' published numbers
CLIPS_DIR = "train_clips"  # fine-tuning: every training clip once, at the training resolution
# Bump when what write_training_clips stores changes: stored clips of another version are rewritten.
CLIPS_FORMAT = 1


class StartupError(ValueError):
    """Bad input found before any work (no labels, unusable folds, a folder not ours): exit 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["probe", "finetune"], default="probe")
    p.add_argument("--pretrained", required=True,
                   help="an exported model folder (vaemo-export), or a checkpoint (a step folder, "
                        "checkpoints/ or a run folder: exported once into $VAEMO_CACHE_DIR/exports)")
    p.add_argument("--data", required=True, help="labelled CSV manifest, shards, or folder")
    p.add_argument("--splits", default=None,
                   help="split file (key,fold or fold,split,key); see docs/downstream.md")
    p.add_argument("--folds", default="all", help="folds to run, e.g. 1,3 (default: all)")
    p.add_argument("--kfold", type=int, default=5,
                   help="without split information: seeded stratified k folds")
    p.add_argument("--seed", type=int, default=0, help="seed of --kfold folds")
    p.add_argument("--protocol", choices=["auto", "official", "kfold"], default="auto",
                   help="official: the benchmark's standard folds, from the clips' 'fold' fields (as the "
                        "dataset adapters of vaemo-shard --dataset write them); kfold: seeded --kfold folds "
                        "grouped by --group-by, ignoring any fold fields; auto (default): official when "
                        "the clips carry folds and a 'dataset' field (or --dataset), else a split file, "
                        "the data's fold / split fields or k folds")
    p.add_argument("--dataset", default=None,
                   help="the benchmark the data is (cremad, ravdess, mafw, dfew, or any name) when its "
                        "clips have no 'dataset' field: names the protocol and the peers in results.md")
    p.add_argument("--test-views", default=None,
                   help="T,S: each test clip is evaluated as T temporal windows (evenly spaced) x S "
                        "spatial crops (along the long side), logits averaged. Default 2,2 for "
                        "finetune; the probe uses 1,1 (one view) only")
    p.add_argument("--group-by", default="auto",
                   help="--kfold folds keep each value of this field (manifest column or shard json key) "
                        "in one fold: speaker-independent folds. auto (default): 'speaker' when the "
                        "clips have one; none: clip-level folds")
    p.add_argument("--classes", default=None, help="comma-separated class names, in label order")
    p.add_argument("--modality", choices=["av", "video", "audio"], default="av")
    p.add_argument("--out", default=None, help="output folder (default runs/<mode>-<export name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="if --out holds another result (or a finished fine-tuning without --resume), move "
                        "it aside to <out>.old-<timestamp> (never deleted) and start afresh")
    # probe
    p.add_argument("--features", default="auto",
                   help="probe features: auto (pooled tokens of the modalities used), joint_pooled, "
                        "joint_emb, video_emb, concat_emb, ...")
    p.add_argument("--l2", default="auto", help="probe L2 penalty, or auto (inner 3-fold CV on train)")
    p.add_argument("--balanced", action="store_true", help="class-balanced probe loss")
    p.add_argument("--batch-size", type=int, default=16, help="clips per encoder call when embedding")
    p.add_argument("--workers", type=int, default=0,
                   help="decoding processes when embedding, and per rank when preparing training clips")
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
    if args.test_views is None:
        args.test_views = "2,2" if args.mode == "finetune" else "1,1"
    if args.out is None:
        args.out = f"runs/{args.mode}-{Path(args.pretrained).resolve().name}"
    return args


# --------------------------------------------------------------------------------------------
# Folds


@dataclass
class Clips:
    """What the data's metadata says, read before any clip is decoded."""

    records: list[Any]  # every clip's Record (data/sources.py), without media bytes
    class_names: list[str]

    @property
    def labelled(self) -> list[Any]:
        return [r for r in self.records if r.label >= 0]


def scan_clips(source: Any, spec: str) -> Clips:
    """The clips' keys, labels, speakers, ... from metadata only (manifest rows, shard json members);
    StartupError if nothing is labelled or there are fewer than two classes."""
    records = list(source.metadata())
    labelled = [r for r in records if r.label >= 0]
    if not labelled:
        raise StartupError(
            f"no labelled clips in {spec}: {len(records)} clips, none with a label. Labels come from a "
            "manifest's 'label' column or a shard json's \"label\" (vaemo-shard writes it from its CSV's "
            "'label' column); nothing was embedded or trained")
    top = max(r.label for r in labelled)
    names = list(source.class_names)
    if not names:  # shards without a manifest: the clips' json "class_name", where complete
        named = {r.label: r.class_name for r in labelled if r.class_name}
        names = [named[i] for i in range(top + 1)] if all(i in named for i in range(top + 1)) else []
    if names and top >= len(names):
        raise StartupError(f"{spec}: a clip has label {top} but the data names {len(names)} classes {names}")
    names = names or [str(i) for i in range(top + 1)]
    present = sorted({r.label for r in labelled})
    if len(present) < 2:
        raise StartupError(f"{spec}: all {len(labelled)} labelled clips are of one class "
                           f"({names[present[0]]!r}); classification needs two or more")
    return Clips(records, names)


@dataclass
class FoldPlan:
    folds: dict[str, Fold]  # the folds to run (--folds)
    all_folds: dict[str, Fold]  # every fold of the protocol (what folds.csv records)
    origin: str  # where the folds came from, in words
    group_by: str | None  # the grouping field, None for clip-level folds
    group_of: dict[str, str]  # labelled key -> its group (speaker)
    overlap: dict[str, list[str]]  # fold -> groups in both its train and test split (given splits)
    protocol: str = "kfold"  # "official", "kfold" or "given" (a split file / the data's fold fields)
    protocol_why: str = ""  # why this protocol, in words (--protocol, or what auto found)
    dataset: str | None = None  # the benchmark's name (the clips' 'dataset' field or --dataset)

    def info(self) -> dict[str, Any]:
        """For metrics.json."""
        return {"protocol": self.protocol, "protocol_why": self.protocol_why, "dataset": self.dataset,
                "folds_from": self.origin, "group_by": self.group_by,
                "groups": len(set(self.group_of.values())) if self.group_by else None,
                "group_independent": (not self.overlap) if self.group_by else None,
                "folds_file": FOLDS_FILE}


def group_column(requested: str, labelled: list[Any]) -> str | None:
    """The field folds are grouped by: `requested`, or for "auto" `speaker` when the clips have one;
    None for "none". Every labelled clip must have a value (StartupError otherwise)."""
    if requested.lower() == "none":
        return None
    column = "speaker" if requested.lower() == "auto" else requested
    have = [r for r in labelled if r.group(column) is not None]
    if not have:
        if requested.lower() == "auto":
            return None
        seen = sorted({"speaker" for r in labelled if r.speaker} | {k for r in labelled for k in r.fields})
        raise StartupError(f"--group-by {column}: no labelled clip has a {column!r} field (a manifest column "
                           f"or a shard json key); fields present: {seen or 'none'}")
    if len(have) < len(labelled):
        missing = [r.key for r in labelled if r.group(column) is None]
        raise StartupError(f"{len(missing)} of {len(labelled)} labelled clips have no {column!r} (e.g. "
                           f"{missing[:3]}): give every clip one, or pass --group-by none for clip-level "
                           "folds")
    return column


def data_dataset(labelled: list[Any], requested: str | None) -> str | None:
    """The one dataset the labelled clips are: their 'dataset' field, else `requested` (--dataset);
    StartupError for clips of several datasets or a --dataset the clips contradict."""
    named = sorted({str(r.fields["dataset"]) for r in labelled if r.fields.get("dataset")})
    if len(named) > 1:
        counts = {n: sum(r.fields.get("dataset") == n for r in labelled) for n in named}
        raise StartupError(f"the labelled clips are of several datasets {counts}: a benchmark's protocol "
                           "needs one; evaluate each dataset on its own")
    if named and requested and requested.lower() != named[0].lower():
        raise StartupError(f"--dataset {requested}, but the clips say they are {named[0]!r} (their json "
                           "'dataset' field)")
    return named[0] if named else requested


def plan_folds(args: argparse.Namespace, clips: Clips) -> FoldPlan:
    """The folds of `--protocol`: official (the clips' fold fields, checked subject-independent by
    speaker), kfold (seeded k folds grouped by `--group-by`, speaker by default, stratified by class),
    or for auto official when the clips carry a dataset's folds, else a split file, the data's fold /
    split fields or k folds. StartupError / SplitError if unusable."""
    labelled = clips.labelled
    keys = [r.key for r in labelled]
    labels = [r.label for r in labelled]
    protocol = getattr(args, "protocol", "auto")
    dataset = data_dataset(labelled, getattr(args, "dataset", None))
    has_folds = any(r.fold is not None for r in labelled)
    if protocol != "auto" and args.splits:
        raise StartupError(f"--splits {args.splits} and --protocol {protocol} both say where the folds come "
                           "from: give one (--protocol auto uses the split file)")
    if protocol == "auto":
        if args.splits:
            protocol, why = "given", "--protocol auto: a split file was given"
        elif has_folds and dataset:
            protocol, why = "official", f"--protocol auto: the clips carry {dataset}'s folds"
        elif has_folds or any(r.split is not None for r in labelled):
            protocol, why = "given", ("--protocol auto: the clips carry fold / split fields but no dataset "
                                      "name")
        else:
            protocol, why = "kfold", "--protocol auto: the clips carry no folds"
    else:
        why = f"--protocol {protocol}"
    column = group_column(args.group_by, labelled)
    group_of = {r.key: str(r.group(column)) for r in labelled} if column else {}
    if protocol == "official":
        folds, origin, column, group_of = official_folds(labelled, dataset)
    elif protocol == "given" and args.splits:
        folds, origin = read_split_file(args.splits), f"the split file {args.splits}"
    elif protocol == "given":
        folds = folds_from_columns(keys, [r.fold for r in labelled], [r.split for r in labelled])
        assert folds is not None
        origin = "the data's fold / split fields"
    elif column:
        folds = grouped_folds(keys, labels, [group_of[k] for k in keys], args.kfold, args.seed, column)
        origin = (f"{args.kfold} folds by {column} ({len(set(group_of.values()))} values, each in one "
                  f"fold), stratified by class, seed {args.seed}")
    else:
        folds = stratified_folds(keys, labels, args.kfold, args.seed)
        origin = f"{args.kfold} clip-level folds, stratified by class, seed {args.seed}"
    selected = select_folds(folds, args.folds)
    missing = check_keys(selected, keys)
    if any(missing.values()):
        log.warning("keys named by the split but absent from the labelled data: %s", missing)
    overlap = group_overlap(selected, group_of) if column else {}
    return FoldPlan(selected, folds, origin, column, group_of, overlap, protocol, why, dataset)


def official_folds(labelled: list[Any], dataset: str | None) -> tuple[dict[str, Fold], str, str | None,
                                                                        dict[str, str]]:
    """A benchmark's standard folds from the clips' `fold` fields: (folds, origin, grouping field,
    key -> speaker). StartupError when no clip has a fold, some lack one, or a speaker is in a fold's
    train and test split (the folds are not subject-independent); clips without speakers are not
    checked (said in the log)."""
    from vaemo_dist.eval.peers import PROTOCOLS, benchmark

    name = dataset or "the data"
    with_fold = [r for r in labelled if r.fold is not None]
    if not with_fold:
        raise StartupError(f"--protocol official: no labelled clip of {name} has a 'fold' field (vaemo-shard "
                           "--dataset NAME writes each clip's official test fold); use --protocol kfold for "
                           "speaker-grouped k folds, or --splits FILE")
    if len(with_fold) < len(labelled):
        lacking = [r.key for r in labelled if r.fold is None]
        raise StartupError(f"--protocol official: {len(lacking)} of {len(labelled)} labelled clips have no "
                           f"'fold' field (e.g. {lacking[:3]})")
    folds = folds_from_assignment((r.key, str(r.fold)) for r in labelled)
    speakers = {r.key: str(r.speaker) for r in labelled if r.speaker}
    what = PROTOCOLS.get(benchmark(dataset) or "", "the data's own folds")
    origin = f"the official folds of {name} ({what}; {len(folds)} folds from the clips' 'fold' fields)"
    if not speakers:
        log.warning("--protocol official: the clips of %s have no speaker field: the folds cannot be "
                    "checked subject-independent", name)
        return folds, origin, None, {}
    if len(speakers) < len(labelled):
        raise StartupError(f"--protocol official: {len(labelled) - len(speakers)} of {len(labelled)} "
                           "labelled clips have no speaker: the folds cannot be checked subject-independent")
    leaks = group_overlap(folds, speakers)
    if leaks:
        said = "; ".join(f"fold {f}: {', '.join(g[:8])}{' ...' if len(g) > 8 else ''}"
                         for f, g in leaks.items())
        raise StartupError(f"--protocol official: the folds of {name} are not subject-independent: these "
                           f"speakers are in both the train and the test split of a fold ({said})")
    return folds, origin, "speaker", speakers


def log_plan(plan: FoldPlan, args: argparse.Namespace, where: Path) -> None:
    from vaemo_dist.eval.peers import benchmark

    known = benchmark(plan.dataset)
    log.info("protocol: %s (%s); dataset: %s%s", plan.protocol, plan.protocol_why, plan.dataset or "unnamed",
             f" (benchmark {known})" if known else " (no known benchmark: results.md has no peers)")
    if plan.group_by is None:
        why = ("--group-by none" if args.group_by.lower() == "none"
               else "the clips have no speaker field; --group-by <column> groups by another")
        log.info("folds: %s; clip-level (%s); fold of each clip in %s", plan.origin, why, where)
    elif plan.overlap:
        log.warning("folds: %s, which are NOT %s-independent: %s in train and test of the same fold (%s)",
                    plan.origin, plan.group_by, plan.group_by,
                    "; ".join(f"fold {f}: {', '.join(g[:5])}" for f, g in plan.overlap.items()))
    else:
        chosen = " (--group-by auto found it; --group-by none for clip-level folds)" \
            if args.group_by.lower() == "auto" else ""
        log.info("folds: %s; %s-independent: no %s in a fold's train and test%s; fold of each clip in %s",
                 plan.origin, plan.group_by, plan.group_by, chosen, where)


# --------------------------------------------------------------------------------------------
# Output folders


def _looks_like(out: Path, mode: str) -> bool:
    """Whether an unmarked folder is this mode's older output (written before folders were marked)."""
    try:
        if json.loads((out / "metrics.json").read_text()).get("mode") == mode:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return any(out.glob("fold_*/checkpoints")) if mode == "finetune" else (out / "features.npz").is_file()


def _holds_anything(out: Path) -> bool:
    return out.is_dir() and any(p.name not in (".lock", OWNER_FILE) for p in out.iterdir())


def out_folder_problem(out: Path, mode: str, args: argparse.Namespace) -> str | None:
    """Why `--out` may not be written (the project's one refusal wording), or None. Read-only: every
    rank may ask. A folder of this mode is reused (the probe's feature cache, --resume); a finished or
    started fine-tuning only with --resume; anything else only with --overwrite (moved aside)."""
    if out.exists() and not out.is_dir():
        return refusal(out, "it is a file, not a folder", "--overwrite")
    if not _holds_anything(out):
        return None
    owner = folder_owner(out)
    ours = owner == mode or (owner is None and _looks_like(out, mode))
    if args.overwrite and not (ours and args.resume):
        return None
    if not ours:
        why = (f"it holds the output of {owner}, not of {mode}" if owner
               else f"it is not empty and {mode} did not create it")
        return refusal(out, why, "--overwrite")
    if mode == "finetune" and not args.resume:
        if (out / "metrics.json").is_file():
            return refusal(out, "it holds a finished fine-tuning result (metrics.json; --resume re-evaluates "
                                "its folds from their last checkpoints)", "--overwrite")
        if any(out.glob("fold_*/checkpoints")):
            return refusal(out, "it holds the checkpoints of an unfinished fine-tuning run (--resume "
                                "continues it)", "--overwrite")
    return None


def claim_out(out: Path, mode: str, args: argparse.Namespace) -> Path:
    """Make `out` this mode's folder, after out_folder_problem said yes: with --overwrite (and not
    resuming our own run) an existing folder is moved aside first, never deleted."""
    problem = out_folder_problem(out, mode, args)
    if problem:
        raise FolderInUseError(problem)
    ours = folder_owner(out) == mode or (_holds_anything(out) and folder_owner(out) is None
                                         and _looks_like(out, mode))
    if args.overwrite and _holds_anything(out) and not (ours and args.resume):
        log.warning("--overwrite: moved %s aside to %s", out, move_aside(out))
        ours = False
    return claim_output_dir(out, mode, adopt=ours)


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
    write_atomic(out / RESULTS_FILE, results_markdown(report))
    log.info("%s on %s: %s", info["mode"], info["data"], format_summary(summary))
    return report


def results_markdown(report: dict[str, Any]) -> str:
    """`results.md`: this run's UAR / WAR (mean ± std over folds, and per fold) beside the peers'
    published numbers for its benchmark (vaemo_dist/eval/peers.py), with the data it used; a table
    without peers for data that is no known benchmark."""
    from vaemo_dist.eval.peers import PROTOCOLS, benchmark, peers_of

    summary, folds = report["summary"], report["folds"]
    dataset = report.get("dataset")
    known = benchmark(dataset)
    views = report.get("test_views") or [1, 1]
    tested = sum(int(f.get("n", 0)) for f in folds.values())

    def pct(mean: Any, std: Any = None) -> str:
        if mean is None or (isinstance(mean, float) and np.isnan(mean)):
            return "n/a"
        return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")

    title = f"{dataset} ({known})" if known and dataset != known else (dataset or f"`{report.get('data')}`")
    named = dataset or "not named (no dataset field, no --dataset)"
    lines = [f"# {report['mode']} on {title}", "",
             f"- data: `{report.get('data')}`; dataset: {named}"
             f"{'' if known else ' (no known benchmark: no peers to compare with)'}",
             f"- clips: {report.get('clips', 'n/a')} labelled, {tested} tested over {len(folds)} fold(s) "
             f"({', '.join(folds)}); skipped: {len(report.get('skipped') or [])}",
             f"- protocol: {report.get('protocol')} ({report.get('protocol_why', '')}); folds: "
             f"{report.get('folds_from')}",
             f"- test views: {views[0]} temporal x {views[1]} spatial, logits averaged per clip",
             f"- modality: {report.get('modality')}; pretrained: `{report.get('pretrained')}`", "",
             "| method | variant | UAR (%) | WAR (%) | source |", "| --- | --- | --- | --- | --- |",
             f"| this run (VAEmo, {report['mode']}) | {len(folds)} fold(s) | "
             f"{pct(summary.get('uar_mean'), summary.get('uar_std'))} | "
             f"{pct(summary.get('war_mean'), summary.get('war_std'))} | measured here (metrics.json) |"]
    peers = peers_of(dataset)
    for peer in peers:
        lines.append(f"| {peer.method} | {peer.variant} | {peer.uar:.2f} | {peer.war:.2f} | "
                     f"[{peer.source}]({peer.url}) |")
    lines += ["", "Mean ± population standard deviation over the folds run."]
    if peers:
        lines.append(f"The peers' numbers are quoted from their papers ({PROTOCOLS[known]}), not reproduced "
                     "here; a run on fewer folds, other views or another modality is not the same measure.")
    lines += ["", "| fold | test clips | UAR (%) | WAR (%) |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {f.get('n', 0)} | {pct(f.get('uar'))} | {pct(f.get('war'))} |"
              for name, f in folds.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Linear probe


def default_features(modality: str) -> str:
    return {"av": "concat_pooled", "video": "video_pooled", "audio": "audio_pooled"}[modality]


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    from vaemo_dist.data.sources import open_source
    from vaemo_dist.eval.embed import EmbeddingSet, embed_source
    from vaemo_dist.eval.probe import probe_folds
    from vaemo_dist.pretrained import from_pretrained

    out = Path(args.out)
    # Everything that can be wrong with the data, the folds or --out is found before any embedding.
    source = open_source(args.data, args.classes.split(",") if args.classes else None)
    if parse_views(args.test_views) != (1, 1):
        raise StartupError(f"--test-views {args.test_views}: the probe embeds each clip once (one view, "
                           "1,1); test views are for --mode finetune")
    clips = scan_clips(source, args.data)
    plan = plan_folds(args, clips)
    problem = out_folder_problem(out, "probe", args)
    if problem:
        raise FolderInUseError(problem)
    encoder = from_pretrained(args.pretrained)
    claim_out(out, "probe", args)
    write_fold_file(out / FOLDS_FILE, plan.all_folds, plan.group_of)
    log_plan(plan, args, out / FOLDS_FILE)
    labelled = {r.key for r in clips.labelled}
    cache = out / "features.npz"
    stamp = {"pretrained": str(Path(args.pretrained).resolve()),
             "weights": _file_digest(Path(args.pretrained)), "data": str(Path(args.data).resolve()),
             "modality": args.modality,
             "clips": hashlib.sha256("\n".join(sorted(labelled)).encode()).hexdigest()[:16]}
    emb = EmbeddingSet.load(cache) if cache.is_file() else None
    if emb is None or emb.meta.get("stamp") != stamp:
        emb = embed_source(encoder, source, modality=args.modality, batch_size=args.batch_size,
                           workers=args.workers, progress=sys.stderr.isatty(),
                           keep=lambda record: record.key in labelled)  # only the labelled clips
        emb.meta["stamp"] = stamp
        emb.save(cache)
    else:
        log.info("features from the cache %s", cache)
    features_name = default_features(args.modality) if args.features == "auto" else args.features
    features = emb.features(features_name)
    class_names = clips.class_names
    l2: float | str = args.l2 if args.l2 == "auto" else float(args.l2)
    per_fold = probe_folds(features, emb.labels, emb.keys, plan.folds, len(class_names), l2, args.balanced)
    results = {}
    index = {k: i for i, k in enumerate(emb.keys)}
    for name, m in per_fold.items():
        keys, preds = m.pop("keys"), m.pop("predictions")
        results[name] = FoldResult(m, keys, [int(emb.labels[index[k]]) for k in keys], preds)
    info = {"mode": "probe", "pretrained": args.pretrained, "data": args.data, "modality": args.modality,
            "features": features_name, "feature_dim": int(features.shape[1]), "clips": len(emb),
            "skipped": emb.meta.get("skipped", []), "test_views": [1, 1], **plan.info()}
    report = write_report(out, results, class_names, info)
    from vaemo_dist.eval.predict import save_probe_classifiers  # for vaemo-predict: per fold, and all clips

    save_probe_classifiers(out, args, features, emb.labels, emb.keys, plan.folds, report)
    return report


def _file_digest(folder: Path) -> str:
    """A cheap identity of an export's weights: size + the hash of the first MiB."""
    path = folder / "model.safetensors"
    with path.open("rb") as f:
        head = f.read(1 << 20)
    return f"{path.stat().st_size}-{hashlib.sha256(head).hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------
# Full fine-tuning




def record_sample(record: Any, inputs: Any) -> dict[str, Any]:
    """A WebDataset sample (bytes) of one labelled record, for the trainer's loader."""
    from vaemo_dist.data.decode_files import decode_audio
    from vaemo_dist.data.media import audio_field, audio_source, sidecar_meta, video_field
    from vaemo_dist.data.synth import encode_audio

    if record.sample is not None:
        sample = {k: v for k, v in record.sample.items() if not k.startswith("__")}
        meta = json.loads(bytes(sample.get("json") or b"{}").decode("utf-8"))
        meta["label"] = record.label
        return {"__key__": record.key, **sample, "json": json.dumps(meta).encode()}
    video = Path(record.path)
    # FFmpeg finds the container from the bytes; the field name only has to be one the decoder reads.
    sample = {"__key__": record.key, video_field(video): video.read_bytes()}
    audio = audio_source(record.audio_path or video)
    meta = {k: v for k, v in sidecar_meta(video).items() if k in ("frames", "duration", "fps")}
    field = audio_field(audio) if audio != video else None
    if field is not None:
        sample[field] = audio.read_bytes()
    else:  # the audio track of the video (or another format): decode, resample, store as FLAC
        wave = decode_audio(record.key, audio.read_bytes(), inputs.audio)
        peak = float(np.abs(wave).max()) if wave.size else 0.0
        sample["flac"] = encode_audio(wave / max(peak, 1.0), inputs.audio.sample_rate, "flac")
    sample["json"] = json.dumps({**meta, "label": record.label}).encode()
    return sample


def at_training_size(sample: dict[str, Any], size: int) -> dict[str, Any]:
    """`sample` with its video re-encoded once so that its short side is `size` (the export's
    inputs.video.size), when it is larger: by the shard writer's encoder (vaemo_dist/data/writer.py),
    at the video's own frame rate (exactly: 29.97 stays 29.97, a quarter-rate 6.25 stays 6.25), with the
    json's frames / fps / duration / width / height updated. The training decoder then crops and never
    shrinks. A video at or below `size` is returned as it is (no quality lost, no time spent)."""
    import av

    from vaemo_dist.data.media import VIDEO_FIELDS
    from vaemo_dist.data.writer import ShardOptions, encode_video, fps_json

    field = next((f for f in VIDEO_FIELDS if sample.get(f)), None)
    if field is None:
        return sample  # no video: the decoder says so when the clip is read
    data = bytes(sample[field])
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            return sample
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate
    if min(width, height) <= size:
        return sample
    fps = Fraction(rate) if rate else Fraction(25)  # exact: a 6.25 fps (quarter-rate) clip stays 6.25
    opts = ShardOptions(size=size, fps=fps)
    import tempfile

    # The writer's encoder reads a file (its declared input): the bytes go through a temporary one.
    with tempfile.NamedTemporaryFile(suffix=f".{field}") as tmp:
        tmp.write(data)
        tmp.flush()
        video, frames, _, new_width, new_height = encode_video(tmp.name, opts)
    meta = json.loads(bytes(sample.get("json") or b"{}").decode("utf-8"))
    meta.update(frames=frames, fps=fps_json(fps), duration=float(frames / fps), width=new_width,
                height=new_height, resized_from=[width, height])
    resized = {k: v for k, v in sample.items() if k not in VIDEO_FIELDS}
    resized.update(mp4=video, json=json.dumps(meta).encode())
    return resized


def training_sample(record: Any, inputs: Any) -> dict[str, Any] | str:
    """The training sample of one labelled record at the training resolution, or why it is left out."""
    import av

    from vaemo_dist.data.types import DecodeError

    try:
        return at_training_size(record_sample(record, inputs), inputs.video.size)
    except DecodeError as e:
        return e.reason
    except (OSError, ValueError, av.FFmpegError) as e:
        return f"{type(e).__name__}: {e}"


def _ordered_map(fn: Any, items: Iterable[Any], workers: int) -> Iterator[Any]:
    """fn over items in order, in `workers` processes (0 or 1: here), at most 2 per worker in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    from vaemo_dist.data.writer import one_torch_thread

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    # Forked from a process that has run torch: the workers must not enter its OpenMP pool.
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=one_torch_thread) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_tars(samples: Iterable[dict[str, Any]], out_dir: Path, prefix: str, per_shard: int = 64) -> int:
    """Write samples into `<out_dir>/<prefix>-000000.tar ...` through the project's one shard writer
    (atomic per shard; this prefix's stale tars of an earlier build removed). Returns how many."""
    from vaemo_dist.data.shards import ShardWriter

    with ShardWriter(out_dir, per_shard, prefix=prefix) as shards:
        for sample in samples:
            shards.write(sample)
    return shards.total


def _stamp(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_training_clips(source: Any, order: list[str], out_dir: Path, inputs: Any, rank: int = 0,
                         world: int = 1, workers: int = 0) -> str:
    """The labelled records named in `order` (keys in the source's order) once each at the training
    resolution (`training_sample`), into `out_dir` (claimed as fine-tuning's). Rank r of `world`
    writes the records r, r + world, ... of `order` to its own tars (`clips-<r>of<world>-*.tar`) with
    `workers` processes; call it on every rank, wait for all, then read them back in order with
    `training_clips`. Reused when already complete for these keys and settings. Returns the stamp of
    the content (the same on every rank)."""
    from vaemo_dist.fsutil import write_atomic

    keys = set(order)
    stamp = _stamp(CLIPS_FORMAT, order, inputs.video.size, inputs.audio.sample_rate)  # not the layout
    layout = f"of{world:03d}"
    prefix = f"clips-{rank:03d}{layout}"
    done = out_dir / f"_SUCCESS-{rank:03d}{layout}"
    if done.is_file() and done.read_text().strip() == stamp:
        return stamp
    claim_output_dir(out_dir, "finetune", adopt=any(out_dir.glob("_SUCCESS*")))
    done.unlink(missing_ok=True)
    if rank == 0:  # what an earlier run with another number of ranks wrote (ours: the folder is claimed)
        for old in [*out_dir.glob("clips-*.tar"), *out_dir.glob("_SUCCESS-*")]:
            if layout not in old.name:
                old.unlink(missing_ok=True)
    position = {k: i for i, k in enumerate(order)}
    mine = (r for r in source.records() if r.key in keys and position[r.key] % world == rank)
    left_out: list[str] = []
    resized = 0

    def good() -> Iterator[dict[str, Any]]:
        nonlocal resized
        for record, result in _pairs(mine, functools.partial(training_sample, inputs=inputs), workers):
            if isinstance(result, str):
                left_out.append(record.key)
                log.warning("left %s out of the training clips: %s", record.key, result)
                continue
            resized += "resized_from" in json.loads(result["json"])
            yield result

    written = write_tars(good(), out_dir, prefix)
    log.info("training clips at %d px (short side): %d written by rank %d, %d re-encoded from larger "
             "videos, %d left out, in %s", inputs.video.size, written, rank, resized, len(left_out), out_dir)
    write_atomic(done, stamp)
    return stamp


def _pairs(records: Iterator[Any], fn: Any, workers: int) -> Iterator[tuple[Any, Any]]:
    """(record, fn(record)) in order, fn run in `workers` processes."""
    from itertools import tee

    a, b = tee(records)
    return zip(a, _ordered_map(fn, b, workers))


def training_clips(out_dir: Path, world: int, order: list[str]) -> Iterator[dict[str, Any]]:
    """The samples write_training_clips wrote with `world` ranks (after every rank finished), in
    `order` (the keys it was given, in the source's order): the same sequence whatever the number of
    ranks that wrote them (rank r holds the r-th of every `world` keys, less those left out)."""
    from vaemo_dist.data.shards import read_shard

    def stream(rank: int) -> Iterator[dict[str, Any]]:
        for tar in sorted(out_dir.glob(f"clips-{rank:03d}of{world:03d}-*.tar")):
            yield from read_shard(str(tar))

    streams = [stream(r) for r in range(world)]
    heads = [next(s, None) for s in streams]
    for i, key in enumerate(order):
        head = heads[i % world]
        if head is not None and head["__key__"] == key:  # else: left out (undecodable)
            yield {k: v for k, v in head.items() if k != "__url__"}
            heads[i % world] = next(streams[i % world], None)


def write_fold_shards(samples: Iterable[dict[str, Any]], keys: set[str], out_dir: Path, clips_stamp: str,
                      per_shard: int = 64) -> list[str]:
    """Copy the training clips named in `keys` (from `training_clips`) into `out_dir`'s tar shards,
    in their order, atomically, in a folder claimed as fine-tuning's; reused when already complete."""
    from vaemo_dist.fsutil import write_atomic

    stamp = _stamp(clips_stamp, sorted(keys))
    done = out_dir / "_SUCCESS"
    if done.is_file() and done.read_text().strip() == stamp:
        return sorted(str(p) for p in out_dir.glob("train-*.tar"))
    claim_output_dir(out_dir, "finetune", adopt=done.is_file())
    done.unlink(missing_ok=True)

    if write_tars((s for s in samples if s["__key__"] in keys), out_dir, "train", per_shard) == 0:
        raise ValueError(f"no labelled training clips for {out_dir}")
    write_atomic(done, stamp)
    return sorted(str(p) for p in out_dir.glob("train-*.tar"))


# --------------------------------------------------------------------------------------------
# Test-time views


def parse_views(text: str) -> tuple[int, int]:
    """`--test-views` "T,S" -> (T, S): T temporal windows x S spatial crops, both 1 or more."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise StartupError(f"--test-views {text!r}: give T,S (temporal windows, spatial crops), two whole "
                           "numbers of 1 or more, e.g. 2,2")
    return int(parts[0]), int(parts[1])


def window_starts(total: int, span: int, segments: int) -> list[int]:
    """First frame of each of `segments` windows of `span` frames over a clip of `total` frames. One
    window: centred, as the training decoder samples it (data/decode_pyav.sample_indices). Several:
    evenly spaced from the clip's first frame to a window ending on its last, the step rounded down,
    as the peers' test code places its segments; a clip shorter than a window gives the same window
    (from frame 0, its end padded with the last frame) every time."""
    if segments == 1:
        return [max(0, (total - span) // 2)]
    step = max((total - span) / (segments - 1), 0.0)
    return [int(i * step) for i in range(segments)]


def crop_offsets(long: int, side: int, crops: int) -> list[int]:
    """Offsets along a frame's long side of `crops` squares of `side` pixels (the short side): one
    is centred (the training decoder's crop); several are evenly spaced from one end to the other,
    the step rounded down (two crops: the two ends, left and right of a landscape frame)."""
    if crops == 1:
        return [(long - side) // 2]
    step = (long - side) / (crops - 1)
    return [int(i * step) for i in range(crops)]


def decode_views(record: Any, inputs: Any, modality: str, views: tuple[int, int]) -> tuple[
        torch.Tensor | None, torch.Tensor | None]:
    """The test views of one record: video [V, 3, T, size, size] and audio [V, 1, F, M] (None for the
    modality not used), V = segments x crops, segment-major. Views (1, 1): exactly what the training
    decoder gives (data/sources.decode_record), with a leading axis of 1. Otherwise every frame is
    decoded (data/decode_pyav.decode_video_frames with a window as long as the clip), then each window
    (`window_starts`, the model's frames `inputs.video.stride` apart) is cut into `crop_offsets`
    squares of the short side, resized and normalised as in training (decode_pyav.video_tensor), and
    paired with the audio window centred on it (decode_pyav.audio_tensor). Audio alone: the crops are
    the same, so V = segments windows of the recording. Raises DecodeError."""
    from vaemo_dist.data.decode_pyav import NO_LIMITS, guarded
    from vaemo_dist.data.sources import decode_record

    if views == (1, 1):
        video, audio = decode_record(record, inputs, modality)
        return (None if video is None else video[None]), (None if audio is None else audio[None])
    return guarded(record.key, NO_LIMITS, lambda: _view_tensors(record, inputs, modality, *views))


def _record_media(record: Any, want_video: bool, want_audio: bool) -> tuple[
        bytes | None, int | None, tuple[bytes, Any, bool] | None]:
    """(video bytes, promised frames, (audio bytes, promised duration, from a file)) of a record."""
    from vaemo_dist.data.media import AUDIO_FIELDS, VIDEO_FIELDS, audio_source, is_audio, sidecar_meta
    from vaemo_dist.data.types import DecodeError

    if record.sample is not None:
        sample = record.sample
        meta = json.loads(bytes(sample.get("json") or b"{}").decode("utf-8"))
        video = next((bytes(sample[f]) for f in VIDEO_FIELDS if sample.get(f) is not None), None)
        audio = next((bytes(sample[f]) for f in AUDIO_FIELDS if sample.get(f) is not None), None)
        if want_video and video is None:
            raise DecodeError(record.key, "no video field in the sample", kind="no_video")
        if want_audio and audio is None:
            raise DecodeError(record.key, "no audio field in the sample", kind="no_audio")
        frames = meta.get("frames") if isinstance(meta.get("frames"), int) else None
        return (video if want_video else None), frames, \
            ((audio, meta.get("duration"), False) if want_audio and audio is not None else None)
    path = Path(record.path)
    if want_video and is_audio(path):
        raise DecodeError(record.key, f"{path.name} is an audio file: use modality 'audio'")
    video = frames = None
    if want_video:
        video = path.read_bytes()
        meta = sidecar_meta(path)
        frames = meta.get("frames") if isinstance(meta.get("frames"), int) else None
    audio = None
    if want_audio:
        source = audio_source(record.audio_path or path)
        audio = (source.read_bytes(), sidecar_meta(source).get("duration"), True)
    return video, frames, audio


def _frame_count(data: bytes) -> int:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            return int(container.streams.video[0].frames) if container.streams.video else 0
    except (av.FFmpegError, OSError, ValueError):
        return 0  # the decoder below says what is wrong


def _view_tensors(record: Any, inputs: Any, modality: str, segments: int, crops: int) -> tuple[
        torch.Tensor | None, torch.Tensor | None]:
    import dataclasses

    from vaemo_dist.data.audio import mel_spec_params
    from vaemo_dist.data.decode_files import decode_audio
    from vaemo_dist.data.decode_pyav import (
        audio_tensor,
        decode_audio_wave,
        decode_video_frames,
        video_tensor,
    )

    want_video, want_audio = modality in ("av", "video"), modality in ("av", "audio")
    video_data, promised, audio = _record_media(record, want_video, want_audio)
    wave = None
    if audio is not None:
        data, duration, from_file = audio
        wave = (decode_audio(record.key, data, inputs.audio, duration) if from_file
                else decode_audio_wave(record.key, data, inputs.audio, duration))
    cfg = inputs.video
    if video_data is None:  # audio alone: windows of the recording
        assert wave is not None
        n = mel_spec_params(inputs.audio).num_samples
        rate = inputs.audio.sample_rate
        if segments == 1:
            centres = [wave.size / rate / 2.0]  # as decode_media centres audio alone
        else:
            centres = [(s + n / 2) / rate for s in window_starts(wave.size, n, segments)]
        return None, torch.stack([audio_tensor(wave, inputs.audio, c) for c in centres])
    total = promised or _frame_count(video_data)
    if not total:  # no frame count anywhere: one pass to count them
        total = decode_video_frames(record.key, video_data, dataclasses.replace(cfg, frames=1, stride=1),
                                    None)[3]
    every = dataclasses.replace(cfg, frames=total, stride=1)
    frames, _, fps, total = decode_video_frames(record.key, video_data, every, promised)
    span = (cfg.frames - 1) * cfg.stride + 1
    videos, audios = [], []
    for start in window_starts(total, span, segments):
        index = [min(start + i * cfg.stride, len(frames) - 1) for i in range(cfg.frames)]
        window = np.stack([frames[i] for i in index])  # [T, H, W, 3] uint8
        height, width = window.shape[1:3]
        side = min(height, width)
        for offset in crop_offsets(max(height, width), side, crops):
            square = (window[:, offset:offset + side] if height > width
                      else window[:, :, offset:offset + side])
            videos.append(video_tensor(list(square), cfg))
            if wave is not None:
                centre_s = (index[0] + index[-1] + 1) / 2.0 / fps  # as the training decoder centres it
                audios.append(audio_tensor(wave, inputs.audio, centre_s))
    return torch.stack(videos), (torch.stack(audios) if audios else None)


def evaluate_logits(model: Any, source: Any, test_keys: list[str], inputs: Any, modality: str,
                    batch_size: int, rank: int, world: int, device: torch.device,
                    views: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Logits [N, C] of `test_keys`, each clip's the mean of its `views` (decode_views) logits, a mask
    of the clips evaluated (False where a clip could not be decoded, its row 0) and the skipped
    clips' reasons; the work split over ranks (clip i on rank i % world), batches of `batch_size`
    clips (all their views in one call)."""
    import torch.distributed as dist

    from vaemo_dist.data.types import DecodeError

    index = {k: i for i, k in enumerate(test_keys)}
    classes = getattr(model, "num_classes", None)
    logits_all: torch.Tensor | None = None
    done = torch.zeros(len(test_keys), dtype=torch.float32, device=device)
    skipped: list[str] = []
    batch: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []

    def flush() -> None:
        nonlocal logits_all
        if not batch:
            return
        per_clip = [(b[1] if b[1] is not None else b[2]).shape[0] for b in batch]  # type: ignore[union-attr]
        video = torch.cat([b[1] for b in batch]).to(device) if batch[0][1] is not None else None
        audio = torch.cat([b[2] for b in batch]).to(device) if batch[0][2] is not None else None
        with torch.no_grad():
            out = model(video if modality != "audio" else None, audio if modality != "video" else None)
        out = out.float()
        if logits_all is None:
            logits_all = torch.zeros(len(test_keys), out.shape[1], dtype=torch.float32, device=device)
        rows = torch.tensor([b[0] for b in batch], device=device)
        logits_all[rows] = torch.stack([chunk.mean(dim=0) for chunk in out.split(per_clip)])
        done[rows] = 1.0
        batch.clear()

    mine = (r for r in source.records() if r.key in index and index[r.key] % world == rank)
    for record in mine:
        try:
            video, audio = decode_views(record, inputs, "av" if modality == "av" else modality, views)
        except DecodeError as e:
            skipped.append(f"{record.key}: {e.reason}")
            continue
        batch.append((index[record.key], video, audio))
        if len(batch) == batch_size:
            flush()
    flush()
    if logits_all is None:
        if classes is None and world > 1:
            raise ValueError("evaluate over several ranks needs model.num_classes")
        logits_all = torch.zeros(len(test_keys), classes or 0, dtype=torch.float32, device=device)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(logits_all)  # each row is non-zero on one rank only: the sum is that rank's row
        dist.all_reduce(done)
    return logits_all.cpu().numpy(), done.cpu().numpy() > 0, skipped


def evaluate(model: Any, source: Any, test_keys: list[str], inputs: Any, modality: str, batch_size: int,
             rank: int, world: int, device: torch.device,
             views: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, list[str]]:
    """Predictions for `test_keys` (-1 where a clip could not be decoded) from the view-averaged
    logits of evaluate_logits; work split over ranks."""
    logits, done, skipped = evaluate_logits(model, source, test_keys, inputs, modality, batch_size, rank,
                                            world, device, views)
    preds = np.full(len(test_keys), -1, dtype=np.int64)
    if logits.shape[1]:
        preds[done] = logits[done].argmax(axis=1)
    return preds, skipped
