"""What every launcher does: parse, configure, start the process group, find the data, train, exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vaemo_dist.config import Config, ConfigError, DataConfig, load_config, validate_world
from vaemo_dist.secrets import install_log_masking

log = logging.getLogger("vaemo")


def parse_args(argv: list[str] | None, default_config: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=default_config, help="YAML config (may name a `base:` file)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides such as model.depth=8 train.steps=50")
    return p.parse_intermixed_args(argv)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed's ZeRO code (the ZeRO-1/2 step's all_gather_dp_groups, ZeRO-3's parameter all-gather
    # and gradient reduce-scatter) calls torch.distributed.all_gather_into_tensor and
    # reduce_scatter_tensor through deepspeed.comm, aliases torch 2.13 deprecates: a FutureWarning per
    # rank and call site, which only DeepSpeed can act on. Only those two messages are ignored (they are
    # attributed to torch's c10d_logger wrapper, not to DeepSpeed, so the message is what identifies
    # them); every other warning still shows.
    deprecated = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)
    install_log_masking()


def shard_urls(data: DataConfig) -> list[str]:
    from vaemo_dist.data.shards import expand_shards

    return expand_shards(data.synth.dir if data.shards == "synthetic" else data.shards)


def prepare_synthetic(data: DataConfig) -> None:
    """Build the synthetic corpus if the config asks for it and it is not complete yet."""
    if data.shards == "synthetic":
        from vaemo_dist.data.synth import ensure_corpus

        ensure_corpus(data.synth)


def run_stage(name: str, build: Callable[[Config, Any], tuple[torch.nn.Module, Any]], default_config: str,
              argv: list[str] | None = None, prepare: Callable[[Config], None] | None = None) -> None:
    """`prepare(cfg)`, if given, runs once per node (local rank 0) before the shards are listed, e.g. to
    build a stage's derived data on first use; the other ranks wait for it."""
    from vaemo_dist import dist

    args = parse_args(argv, default_config)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:  # a bad config fails here, before any process group exists
        cfg = load_config(args.config, args.overrides)
        if args.resume is not None:
            cfg.train.resume = args.resume
        validate_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.train.resume:  # a tensor-parallel change or a resize DeepSpeed cannot do stops here, not mid-run
        from vaemo_dist.train.checkpoint import CheckpointError, plan_resume

        try:
            plan_resume(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        except CheckpointError as e:
            print(f"resume error: {e}", file=sys.stderr)
            sys.exit(2)

    from vaemo_dist.watchdog import PeerWatch, describe_failure

    exit_code, watch = 0, None
    try:
        info = dist.init_distributed(cfg.train.dist_timeout_s, cfg.parallel.tensor)
        if info.world_size > 1:
            ckpt_root = Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints"
            watch = PeerWatch(info.rank, info.world_size, ckpt_root).start()
        if info.local_rank == 0:  # once per node
            prepare_synthetic(cfg.data)
            if cfg.eval.every:
                from vaemo_dist.eval.online import prepare_online_eval

                prepare_online_eval(cfg)
            if prepare is not None:
                prepare(cfg)
        dist.barrier()  # the corpus is complete on this node before anyone reads it
        from vaemo_dist.data.storage import check_shards_reachable, configure_from
        configure_from(cfg.data)  # endpoint and retries for s3:// shards
        urls = shard_urls(cfg.data)
        check_shards_reachable(urls)  # wrong credentials or endpoint: a clear error now, not mid-run

        from vaemo_dist.model.flops import account
        from vaemo_dist.model.parallelize import parallelize
        from vaemo_dist.train.trainer import Trainer

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model, compute_loss = build(cfg, info)
        model = parallelize(model, cfg.parallel)
        cost = account(cfg.model, cfg.inputs)
        final = Trainer(cfg, model, compute_loss, urls, info, flops_per_sample=cost.train_flops,
                        tokens_per_sample=cost.tokens, watch=watch).fit()
        if info.is_main:
            log.info("%s finished: %s", name, {k: round(v, 5) for k, v in final.items()})
    except Exception as e:  # noqa: BLE001 - report and leave with a non-zero code instead of hanging peers
        log.error("%s failed on rank %d:\n%s", name, rank, traceback.format_exc())
        peer_trouble = describe_failure(watch, e)
        if peer_trouble:
            log.error(peer_trouble)
        exit_code = 1
    if watch is not None:
        watch.stop()  # peers finishing a moment earlier is not a failure
    dist.shutdown(exit_code)
