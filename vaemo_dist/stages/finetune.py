"""Fine-tuning, and the command line of `launchers/finetune.py` (linear probe or fine-tuning, per fold).

    python launchers/finetune.py --mode probe --pretrained EXPORT --data manifest.csv --splits folds.csv
    deepspeed --num_gpus 2 launchers/finetune.py --mode finetune --pretrained EXPORT --data manifest.csv \
        --splits folds.csv --folds 1,2 --out runs/ft [--epochs 20] [train.zero_stage=2 optim.lr=5e-4 ...]

The protocol (its arguments, the clips' metadata, the folds, the `--out` folder, the training clips,
the evaluation of a fold's test clips, the reports) and the linear probe are vaemo_dist/eval/downstream.py;
here is what trains: per fold, a `Finetune` stage (the classifier of objectives/finetune.py on the
pretrained export, its loss, the fold's training shards) through the same Trainer as pretraining, then
the final checkpoint, consolidated like an export, evaluated on the fold's test clips by all ranks.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaemo_dist.eval.downstream import (
    CLIPS_DIR,
    DEFAULT_CONFIG,
    FOLDS_FILE,
    Clips,
    FoldPlan,
    FoldResult,
    StartupError,
    claim_out,
    evaluate,
    log_plan,
    out_folder_problem,
    parse_args,
    parse_views,
    plan_folds,
    run_probe,
    scan_clips,
    training_clips,
    write_fold_shards,
    write_report,
    write_training_clips,
)
from vaemo_dist.eval.metrics import classification_metrics, format_summary
from vaemo_dist.eval.splits import SplitError, write_fold_file
from vaemo_dist.fsutil import FolderInUseError, claim_output_dir
from vaemo_dist.stages.base import Stage, train
from vaemo_dist.startup import env_rank, fail, setup_logging

log = logging.getLogger("vaemo.finetune")


def startup_errors() -> tuple[type[BaseException], ...]:
    """The errors of bad input found before any work: exit 2 with one line."""
    from vaemo_dist.checkpoints import ExportError
    from vaemo_dist.data.sources import SourceError

    return (StartupError, SourceError, SplitError, FolderInUseError, ExportError)


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


def build_classifier(pretrained: str | Path, num_classes: int, args: argparse.Namespace, seed: int) -> Any:
    """The classifier on the pretrained export's encoder; its head seeded alike on every rank."""
    from vaemo_dist.objectives.finetune import Classifier
    from vaemo_dist.pretrained import from_pretrained

    backbone = from_pretrained(pretrained).model.train()
    torch.manual_seed(seed)  # the same head on every rank
    return Classifier(backbone, num_classes, args.modality, layer_decay=args.layer_decay,
                      dropout=args.head_dropout)


class Finetune(Stage):
    """One fold's fine-tuning: `cfg` is the fold's config (data.shards its training shards,
    train.run_name its folder), `args` the command line, `samples` the training clips (those of
    `train_keys` are this fold's), `clips_stamp` their content's stamp."""

    name = "finetune"
    default_config = DEFAULT_CONFIG

    def __init__(self, cfg: Any, args: argparse.Namespace, num_classes: int,
                 samples: Callable[[], Iterable[dict[str, Any]]] | None = None,
                 train_keys: set[str] | None = None, clips_stamp: str = "") -> None:
        super().__init__(cfg)
        self.args, self.num_classes = args, num_classes
        self.samples, self.train_keys, self.clips_stamp = samples, train_keys or set(), clips_stamp

    @staticmethod
    def command(argv: list[str] | None = None) -> int:
        """The stage's own command line (probe or fine-tuning, per fold): `main`."""
        return main(argv)

    def prepare(self) -> None:
        """The fold's training shards, copied from the training clips (reused when complete). One
        process writes them (the main rank), into `--out`."""
        assert self.samples is not None, "a Finetune stage without training clips has nothing to prepare"
        write_fold_shards(self.samples(), self.train_keys, Path(self.cfg.data.shards), self.clips_stamp)

    def shards(self) -> list[str]:
        return sorted(str(p) for p in Path(self.cfg.data.shards).glob("train-*.tar"))

    def init_from(self) -> str | None:
        return self.args.pretrained

    def build_model(self, info: Any) -> torch.nn.Module:
        from vaemo_dist.objectives.finetune import FinetuneObjective

        self.objective = FinetuneObjective(self.num_classes, self.args.mixup, self.args.label_smoothing)
        return build_classifier(self.args.pretrained, self.num_classes, self.args, self.cfg.train.seed)

    def loss(self, engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(engine, batch.video, batch.audio, batch.label)

    def cost(self) -> tuple[float, int]:
        return 0.0, 0  # no analytic FLOPs of the classifier: no throughput figures


def run_finetune(args: argparse.Namespace) -> int:
    """--mode finetune: the start-up checks (every rank, read-only), then the folds in a process group."""
    from vaemo_dist import dist
    from vaemo_dist.config import ConfigError
    from vaemo_dist.data.sources import open_source

    rank = env_rank()
    export_config = json.loads((Path(args.pretrained) / "config.json").read_text())
    try:
        cfg = finetune_config(args, export_config)
    except ConfigError as e:
        return fail(f"config error: {e}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % cfg.parallel.tensor:
        return fail(f"config error: parallel.tensor: {cfg.parallel.tensor} does not divide the world size "
                    f"{world}")
    # The data, the folds and --out are checked by every rank alike (read-only) before any process
    # group or work starts; one rank says what is wrong.
    try:
        source = open_source(args.data, args.classes.split(",") if args.classes else None)
        views = parse_views(args.test_views)
        clips = scan_clips(source, args.data)
        plan = plan_folds(args, clips)
        problem = out_folder_problem(Path(args.out), "finetune", args)
        if problem:
            raise FolderInUseError(problem)
    except startup_errors() as e:
        return fail(f"finetune: {e}")
    exit_code = 0
    try:
        info = dist.init_distributed(cfg.train.dist_timeout_s, cfg.parallel.tensor)
        exit_code = finetune_folds(args, cfg, info, source, clips, plan, views)
    except Exception:  # noqa: BLE001 - report and leave with a non-zero code instead of hanging peers
        log.error("finetune failed on rank %d:\n%s", rank, traceback.format_exc())
        exit_code = 1
    dist.shutdown(exit_code)
    return exit_code  # not reached: shutdown leaves the process


def finetune_folds(args: argparse.Namespace, cfg: Any, info: Any, source: Any, clips: Clips,
                   plan: FoldPlan, views: tuple[int, int] = (2, 2)) -> int:
    """Every fold of `plan`: its Finetune stage trained, then evaluated on its test clips (each clip's
    logits averaged over `views`: temporal windows x spatial crops); the report."""
    from safetensors.torch import load_file, save_file

    from vaemo_dist import dist
    from vaemo_dist.checkpoints import consolidate, resolve

    out = Path(args.out)
    class_names = clips.class_names
    label_of = {r.key: r.label for r in clips.labelled}
    if info.is_main:
        claim_out(out, "finetune", args)
        write_fold_file(out / FOLDS_FILE, plan.all_folds, plan.group_of)
        log_plan(plan, args, out / FOLDS_FILE)
        log.info("test views: %d temporal window(s) x %d spatial crop(s) per test clip, logits averaged "
                 "(--test-views)", *views)
        claim_output_dir(out / CLIPS_DIR, "finetune", adopt=any((out / CLIPS_DIR).glob("_SUCCESS*")))
    dist.barrier()
    # Every training clip once at the training resolution, the ranks sharing the work.
    wanted = {k for fold in plan.folds.values() for k in fold.train if label_of.get(k, -1) >= 0}
    order = [r.key for r in clips.labelled if r.key in wanted]  # the source's order
    clips_stamp = write_training_clips(source, order, out / CLIPS_DIR, cfg.inputs, info.rank,
                                       info.world_size, args.workers)
    dist.barrier()
    results: dict[str, FoldResult] = {}
    for name, fold in plan.folds.items():
        fold_dir = out / f"fold_{name}"
        train_keys = {k for k in fold.train if label_of.get(k, -1) >= 0}
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
        stage = Finetune(fold_cfg, args, len(class_names),
                         lambda: training_clips(out / CLIPS_DIR, info.world_size, order), train_keys,
                         clips_stamp)
        if info.is_main:
            stage.prepare()
        dist.barrier()
        # Tensor parallelism (parallel.tensor) splits the pretrained blocks as in pretraining; the
        # evaluation below runs the consolidated (merged) classifier whole on every rank.
        train(stage, info, stage.shards())

        # Evaluate what was saved: the final checkpoint, consolidated as for an export.
        weights = fold_dir / "classifier.safetensors"
        if info.is_main:
            state = consolidate(resolve(fold_dir / "checkpoints"))
            save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
        dist.barrier()
        model = build_classifier(args.pretrained, len(class_names), args, cfg.train.seed)
        model.load_state_dict(load_file(str(weights)))
        model.to(info.device).eval()
        test_keys = [k for k in fold.test if label_of.get(k, -1) >= 0]
        preds, skipped = evaluate(model, source, test_keys, cfg.inputs, args.modality, args.batch_size,
                                  info.rank, info.world_size, info.device, views)
        ok = preds >= 0
        kept = [k for k, good in zip(test_keys, ok) if good]
        y = np.array([label_of[k] for k in kept], dtype=np.int64)
        metrics = classification_metrics(y, preds[ok], len(class_names))
        metrics.update(n_train=len(train_keys), steps=fold_cfg.train.steps, skipped_test=int((~ok).sum()))
        results[name] = FoldResult(metrics, kept, y.tolist(), preds[ok].tolist())
        if info.is_main:
            log.info("fold %s: UAR %.2f WAR %.2f (%d test clips)", name, 100 * metrics["uar"],
                     100 * metrics["war"], metrics["n"])
            from vaemo_dist.eval.predict import save_finetune_classifier  # for vaemo-predict

            save_finetune_classifier(fold_dir / "classifier", weights, export=args.pretrained,
                                     config=cfg.to_dict(), class_names=class_names, modality=args.modality,
                                     trained_on={"mode": "finetune", "data": args.data, "fold": name,
                                                 "metrics": metrics})
    if info.is_main:
        info_dict = {"mode": "finetune", "pretrained": args.pretrained, "data": args.data,
                     "modality": args.modality, "layer_decay": args.layer_decay, "mixup": args.mixup,
                     "clips": len(clips.labelled), "test_views": list(views), **plan.info(),
                     "config": cfg.to_dict()}
        write_report(out, results, class_names, info_dict)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`launchers/finetune.py`: --mode probe (one process) or --mode finetune (any launcher)."""
    setup_logging(env_rank())
    args = parse_args(argv)
    from vaemo_dist.export import ExportError, export_or_checkpoint

    try:  # an export as it is; a checkpoint (step, checkpoints/ or run folder) exported once into a cache
        export = export_or_checkpoint(args.pretrained)
    except ExportError as e:
        return fail(f"{args.mode}: --pretrained {args.pretrained}: {e}")
    if str(export) != str(args.pretrained):
        log.info("--pretrained %s is a checkpoint: using its export %s", args.pretrained, export)
        args.pretrained = str(export)
    if args.mode == "probe":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return fail("--mode probe runs in one process: start it with python, not deepspeed")
        try:
            report = run_probe(args)
        except startup_errors() as e:
            return fail(f"probe: {e}")
        print(f"probe: {format_summary(report['summary'])} -> {args.out}/metrics.json", file=sys.stderr)
        return 0
    return run_finetune(args)
