"""What a stage is: the few things that differ between stage 1, stage 2 and fine-tuning.

A `Stage` holds its run's config and says
* `build_model(info)`: the model it trains (before `parallelize`), and whatever its loss needs;
* `loss(engine, batch)`: the training forward, `(loss, named float metrics)`;
* `check()`: start-up checks on every rank before any process group (ConfigError, FolderInUseError);
* `prepare()`: what is built once per node before training (the synthetic corpus, held-out clips, ...);
* `shards()`: the training shards;
* `evaluator(info, urls)`: the online evaluator the trainer runs every `eval.every` steps, or None;
* `init_from()`: where its weights start from (None: random initialisation);
* `cost()`: its analytic training FLOPs and tokens per sample (throughput and MFU figures).

`train(stage, info, urls)` builds the model, parallelizes it and runs the one Trainer with it; how a
launch gets there (arguments, config, checks, process group) is `vaemo_dist.launch.run_stage`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from vaemo_dist.config import Config, ConfigError, DataConfig
from vaemo_dist.fsutil import FolderInUseError

log = logging.getLogger("vaemo")

# How a launcher user moves a folder that is not a synthetic corpus out of data.synth.dir's way.
SYNTH_OVERWRITE = "`vaemo-synth --out {dir} --overwrite` (once)"


def shard_urls(data: DataConfig) -> list[str]:
    """data.shards expanded to shard URLs (`synthetic`: the synthetic corpus's)."""
    from vaemo_dist.data.shards import expand_shards

    return expand_shards(data.synth.dir if data.shards == "synthetic" else data.shards)


def prepare_synthetic(data: DataConfig) -> None:
    """Build the synthetic corpus if the config asks for it and it is not complete yet."""
    if data.shards == "synthetic":
        from vaemo_dist.data.synth import ensure_corpus

        ensure_corpus(data.synth, flag=SYNTH_OVERWRITE.format(dir=data.synth.dir))


def run_folder(cfg: Config) -> Path:
    """`<train.out_dir>/<train.run_name>`: where a run writes its metrics, checkpoints and curves."""
    return Path(cfg.train.out_dir) / cfg.train.run_name


class Stage:
    """One stage of training; subclasses set `name`, `default_config` and the model and loss."""

    name: ClassVar[str] = ""
    default_config: ClassVar[str] = ""  # the launcher's --config default, relative to the checkout
    # A stage with a command line of its own (fine-tuning: probe or folds) sets it; the others are
    # launched by vaemo_dist.launch.run_stage.
    command: ClassVar[Callable[[list[str] | None], int] | None] = None

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # -- start-up, before any process group (every rank) --------------------------------------

    def check(self) -> None:
        """Start-up checks on every rank, before any process group: a ConfigError or FolderInUseError
        ends the launch with exit 2. Here: data.shards and eval.shards name shards (a CSV or a folder of
        videos is vaemo-shard's input, said now with its command), and the synthetic corpus's folder is
        the builder's own."""
        from vaemo_dist.data.shards import ShardError, check_shard_spec

        data = self.cfg.data
        for key, spec in (("data.shards", data.shards), ("eval.shards", self.cfg.eval.shards)):
            if spec not in ("synthetic", "auto"):
                try:
                    check_shard_spec(spec, key)
                except ShardError as err:
                    raise ConfigError(str(err)) from err
        if data.shards == "synthetic":
            from vaemo_dist.data.synth import claim_corpus_dir

            try:
                claim_corpus_dir(data.synth.dir, flag=SYNTH_OVERWRITE.format(dir=data.synth.dir))
            except FolderInUseError as e:
                raise FolderInUseError(f"data.synth.dir: {e}") from None
        self.check_storage()

    def check_storage(self) -> None:
        """The object store, before anything else reads it: the remote items of data.shards and
        eval.shards are listed (a `manifest.json` is read) and one shard per bucket is looked up, each
        within data.io_timeout_s. Wrong credentials, a missing bucket or manifest, an endpoint that does
        not answer: a StorageError (one line naming the URL and the endpoint; the launch exits 2)."""
        from vaemo_dist.data import storage
        from vaemo_dist.data.shards import ShardError, expand_shards

        storage.configure_from(self.cfg.data)
        for key, spec in (("data.shards", self.cfg.data.shards), ("eval.shards", self.cfg.eval.shards)):
            if spec in ("synthetic", "auto"):
                continue
            remote = [item.strip() for item in spec.split(",") if storage.is_remote(item.strip())]
            if not remote:
                continue
            try:
                urls = expand_shards(",".join(remote), key)
            except ShardError as err:
                raise ConfigError(str(err)) from None
            storage.check_shards_reachable(urls)

    # -- once per node (local rank 0), the other ranks waiting ----------------------------------

    def prepare(self) -> None:
        """What is built once per node before the shards are listed: the synthetic corpus (when
        data.shards is `synthetic`) and the online evaluation's held-out clips."""
        prepare_synthetic(self.cfg.data)
        if self.cfg.eval.every:
            from vaemo_dist.eval.online import prepare_online_eval

            prepare_online_eval(self.cfg)

    def shards(self) -> list[str]:
        """The training shards."""
        return shard_urls(self.cfg.data)

    # -- the model and its loss -----------------------------------------------------------------

    def init_from(self) -> str | None:
        """Where the weights start from: a checkpoint or export, or None for random initialisation."""
        return None

    def build_model(self, info: Any) -> torch.nn.Module:
        """The model to train (before parallelize); `info` is the process group's DistInfo."""
        raise NotImplementedError

    def loss(self, engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The training forward of one micro-batch: the loss and named float metrics."""
        raise NotImplementedError

    def cost(self) -> tuple[float, int]:
        """(training FLOPs, tokens) per sample of the model: throughput, TFLOP/s and MFU figures."""
        from vaemo_dist.model.flops import account

        cost = account(self.cfg.model, self.cfg.inputs)
        return cost.train_flops, cost.tokens

    def evaluator(self, info: Any, urls: list[str]) -> Any | None:
        """The online evaluator (vaemo_dist.eval.online) on the held-out clips the config names, or
        None: eval.every is 0, or there are no held-out clips (said once, on the main rank)."""
        cfg = self.cfg
        if not cfg.eval.every:
            return None
        from vaemo_dist.eval.online import OnlineEvaluator, eval_set
        from vaemo_dist.train.trainer import compute_dtype

        chosen = eval_set(cfg)
        if chosen.kind == "off":
            if info.is_main:
                log.info(chosen.why)
            return None
        dtype = compute_dtype(cfg, info.device)
        return OnlineEvaluator(cfg, info.device, dtype, run_folder(cfg), info.is_main, urls=urls)


def train(stage: Stage, info: Any, urls: list[str], watch: Any = None) -> dict[str, float]:
    """Build `stage`'s model (seeded: identical initial weights on every rank), parallelize it and
    train it on `urls` with the one Trainer; returns the last logged metrics."""
    from vaemo_dist.model.parallelize import parallelize
    from vaemo_dist.train.trainer import Trainer

    cfg = stage.cfg
    torch.manual_seed(cfg.train.seed)
    model = parallelize(stage.build_model(info), cfg.parallel)
    flops, tokens = stage.cost()
    return Trainer(cfg, model, stage.loss, urls, info, flops_per_sample=flops, tokens_per_sample=tokens,
                   watch=watch, evaluator=stage.evaluator(info, urls)).fit()
