"""What every launcher does: parse, configure, start the process group, find the data, train, exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from vaemo_dist.config import Config, ConfigError, DataConfig, load_config, validate_world
from vaemo_dist.fsutil import FolderInUseError, move_aside, refusal
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


# How a launcher user moves a folder that is not a synthetic corpus out of data.synth.dir's way.
SYNTH_OVERWRITE = "`vaemo-synth --out {dir} --overwrite` (once)"


def prepare_synthetic(data: DataConfig) -> None:
    """Build the synthetic corpus if the config asks for it and it is not complete yet."""
    if data.shards == "synthetic":
        from vaemo_dist.data.synth import ensure_corpus

        ensure_corpus(data.synth, flag=SYNTH_OVERWRITE.format(dir=data.synth.dir))


def run_folder(cfg: Config) -> Path:
    """`<train.out_dir>/<train.run_name>`: where a run writes its metrics, checkpoints and curves."""
    return Path(cfg.train.out_dir) / cfg.train.run_name


def _describe_run(run: Path) -> str:
    found = []
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        with metrics.open() as f:
            found.append(f"metrics.jsonl with {sum(1 for line in f if line.strip())} lines")
    latest = run / "checkpoints" / "latest"
    if latest.is_file():
        found.append(f"checkpoints/latest -> {latest.read_text().strip()}")
    return f"it holds an earlier run ({', '.join(found)})" if found else "it is not empty"


def check_run_folder(cfg: Config) -> str | None:
    """Why this run may not start in its run folder, or None. Reads only; call it on every rank before
    any process group exists. A run may start in a missing or empty folder, or resume (`train.resume`)
    in its own; a non-empty folder is someone's earlier run and is refused unless `train.overwrite`
    (which `overwrite_run_folder` then carries out once the process group exists)."""
    run = run_folder(cfg)
    if cfg.train.resume and cfg.train.overwrite:
        return (f"--resume {cfg.train.resume} and train.overwrite=true contradict each other: resume "
                f"continues the run in {run}, overwrite moves it aside and starts afresh; give one of them")
    if cfg.train.resume or not run.exists():
        return None
    if not run.is_dir():
        return refusal(run, "it is a file, not a run folder", "train.overwrite=true")
    if cfg.train.overwrite or not any(run.iterdir()):
        return None
    return (refusal(run, _describe_run(run), "train.overwrite=true")
            + f". To continue that run instead, add --resume latest; to keep it and start another, set "
              f"train.run_name=<a new name> (now train.run_name={cfg.train.run_name})")


def overwrite_run_folder(cfg: Config, rank: int, local_rank: int) -> Path | None:
    """train.overwrite=true: move the earlier run folder aside to `<run>.old-<timestamp>` (never
    deleted) and return its new name (None where this rank moved nothing). Collective: call it on every
    rank once the process group exists, after every rank passed check_run_folder, so no rank still
    checks the folder while it moves. Global rank 0 moves it; then, for nodes that do not share the
    file system, each node's local rank 0 moves a folder still there."""
    from vaemo_dist import dist

    if not cfg.train.overwrite:  # the same on every rank
        return None
    run, moved = run_folder(cfg), None
    if rank == 0 and run.is_dir() and any(run.iterdir()):
        moved = move_aside(run)
    dist.barrier()
    if rank != 0 and local_rank == 0 and run.is_dir() and any(run.iterdir()):
        moved = move_aside(run)
    dist.barrier()
    if moved is not None:
        log.warning("train.overwrite=true: moved the earlier run %s aside to %s (nothing deleted)", run,
                    moved)
    return moved


def refuse(message: str) -> NoReturn:
    """Leave with exit code 2, `message` on stderr from global rank 0 only (RANK "0" or unset): every
    rank of a launch finds the same config or folder problem before any process group, one says so.
    The other ranks wait a moment first: launchers end every process once one fails, and rank 0
    should have said why by then."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    sys.exit(2)


def run_stage(name: str, build: Callable[[Config, Any], tuple[torch.nn.Module, Any]], default_config: str,
              argv: list[str] | None = None, prepare: Callable[[Config], None] | None = None,
              check: Callable[[Config], None] | None = None,
              shards: Callable[[Config], list[str]] | None = None) -> None:
    """`prepare(cfg)`, if given, runs once per node (local rank 0) before the shards are listed, e.g. to
    build a stage's derived data on first use; the other ranks wait for it. `check(cfg)`, if given,
    runs on every rank before any process group: a ConfigError or FolderInUseError it raises ends the
    launch with exit 2. `shards(cfg)`, if given, lists the training shards instead of data.shards."""
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
        refuse(f"config error: {e}")
    if cfg.train.resume:  # a tensor-parallel change or a resize DeepSpeed cannot do stops here, not mid-run
        from vaemo_dist.train.checkpoint import CheckpointError, plan_resume

        try:
            plan_resume(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        except CheckpointError as e:
            refuse(f"resume error: {e}")
    problem = check_run_folder(cfg)  # an earlier run is never written over: every rank checks, now
    if problem:
        refuse(problem)
    if cfg.data.shards == "synthetic":  # the corpus folder is the builder's own or refused, before any work
        from vaemo_dist.data.synth import claim_corpus_dir

        try:
            claim_corpus_dir(cfg.data.synth.dir, flag=SYNTH_OVERWRITE.format(dir=cfg.data.synth.dir))
        except FolderInUseError as e:
            refuse(f"data.synth.dir: {e}")
    if check is not None:  # the stage's own start-up checks (its data and folders), before any work
        try:
            check(cfg)
        except ConfigError as e:
            refuse(f"config error: {e}")
        except FolderInUseError as e:
            refuse(str(e))

    from vaemo_dist.watchdog import PeerWatch, describe_failure

    exit_code, watch = 0, None
    try:
        info = dist.init_distributed(cfg.train.dist_timeout_s, cfg.parallel.tensor)
        overwrite_run_folder(cfg, info.rank, info.local_rank)  # train.overwrite=true: the old run aside
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
        urls = shards(cfg) if shards is not None else shard_urls(cfg.data)
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
    except dist.PortInUseError as e:  # another run on this machine holds the rendezvous port
        if rank == 0:
            print(f"{name}: {e}", file=sys.stderr, flush=True)
        exit_code = 2
    except FolderInUseError as e:  # a writer refused a folder of the user's
        log.error("%s: %s", name, e)
        exit_code = 2
    except Exception as e:  # noqa: BLE001 - report and leave with a non-zero code instead of hanging peers
        log.error("%s failed on rank %d:\n%s", name, rank, traceback.format_exc())
        peer_trouble = describe_failure(watch, e)
        if peer_trouble:
            log.error(peer_trouble)
        exit_code = 1
    if watch is not None:
        watch.stop()  # peers finishing a moment earlier is not a failure
    dist.shutdown(exit_code)
