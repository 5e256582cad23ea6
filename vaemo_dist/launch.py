"""What every launch of a training stage does: parse, configure, check, start the process group,
prepare the data, train, exit. The stage (vaemo_dist/stages/) says what is trained; the start-up
shared with every console script (logging with the secret mask, errors as exit 2) is
vaemo_dist/startup.py.

    from vaemo_dist.stages import run
    run("stage1")  # launchers/stage1.py
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from vaemo_dist.config import Config, ConfigError, load_config, validate_world
from vaemo_dist.data.shards import ShardError
from vaemo_dist.fsutil import FolderInUseError, move_aside, refusal
from vaemo_dist.stages.base import SYNTH_OVERWRITE as SYNTH_OVERWRITE  # noqa: F401 - re-exported
from vaemo_dist.stages.base import Stage, run_folder, train
from vaemo_dist.stages.base import prepare_synthetic as prepare_synthetic  # noqa: F401 - re-exported
from vaemo_dist.stages.base import shard_urls as shard_urls  # noqa: F401 - re-exported
from vaemo_dist.startup import refuse, say, setup_logging
from vaemo_dist.train.checkpoint import ResumeError

log = logging.getLogger("vaemo")

__all__ = ["check_local_shards", "check_run_folder", "overwrite_run_folder", "parse_args", "refuse",
           "run_folder", "run_stage"]


def parse_args(argv: list[str] | None, default_config: str,
               description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config, help="YAML config (may name a `base:` file)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides such as model.depth=8 train.steps=50")
    return p.parse_intermixed_args(argv)


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


def check_local_shards(cfg: Config) -> str | None:
    """Why the local items of data.shards (and of eval.shards, when eval.every reads them) give no
    shards, or None: an empty folder, one without *.tar (e.g. vaemo-shard skipped every input), a
    pattern that matches nothing, a missing path. Lists local folders only (the remote items are
    Stage.check_storage's); call it on every rank before any process group, after the stage's checks,
    so the launch ends with one line (exit 2) instead of a traceback per rank once training starts.
    `synthetic` and `auto` are built or chosen later and are not checked here."""
    from vaemo_dist.data import storage
    from vaemo_dist.data.shards import ShardError, expand_shards

    specs = [("data.shards", cfg.data.shards)]
    if cfg.eval.every:
        specs.append(("eval.shards", cfg.eval.shards))
    for key, spec in specs:
        if spec in ("synthetic", "auto"):
            continue
        items = [item.strip() for item in spec.split(",")]
        local = [item for item in items if item and not storage.is_remote(item)]
        if not local:
            continue
        try:
            expand_shards(",".join(local), key)
        except ShardError as e:
            return str(e)
    return None


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


def _resume_hint(cfg: Config) -> str:
    latest = run_folder(cfg) / "checkpoints" / "latest"
    if latest.is_file():
        return (f"Last complete checkpoint: {latest.parent / latest.read_text().strip()}; relaunch the same "
                "command with --resume latest once the store answers")
    return "No complete checkpoint yet"


def _check_corpus(cfg: Config, urls: list[str], rank: int) -> None:
    """Collective: compare the corpus with the resumed checkpoint's (`checkpoint.check_corpus`: another
    one is refused, or with train.resume_data=reset resumed from a copy whose data position is a fresh
    start), then record it in the run folder for the checkpoints to come."""
    from vaemo_dist import dist
    from vaemo_dist.data.shards import shard_manifest
    from vaemo_dist.train.checkpoint import check_corpus, corpus_fingerprint, record_corpus

    spec = cfg.data.synth.dir if cfg.data.shards == "synthetic" else cfg.data.shards
    fingerprint = corpus_fingerprint(urls, shard_manifest(spec))
    if cfg.train.resume:
        reset = check_corpus(cfg, fingerprint, rank)  # the same answer on every rank
        if reset is not None:
            dist.barrier()  # rank 0 has written the copy
            cfg.train.resume = str(reset)
    if rank == 0:
        record_corpus(run_folder(cfg), fingerprint)


def run_stage(stage: type[Stage], argv: list[str] | None = None) -> NoReturn:
    """Launch one run of `stage` (a Stage class) from the command line `argv` (default sys.argv):

    every rank, before any process group: logging (with the secret mask), the config (--config,
    --resume and key=value overrides), the resume plan, the run folder (never written over), the
    stage's own checks and the listing of the local shards (`check_local_shards`: an empty folder, a
    pattern matching nothing); a problem is said once, exit 2. Then the process group; once per node (local
    rank 0) the stage prepares its data while the other ranks wait; the shards are listed and checked;
    the stage's model trains. Ends the process (exit 0, 1 on a failure, 2 on a taken port or folder)."""
    from vaemo_dist import dist

    args = parse_args(argv, stage.default_config, sys.modules[stage.__module__].__doc__)
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
            plan = plan_resume(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        except CheckpointError as e:
            refuse(f"resume error: {e}")
        if plan is not None and rank == 0:  # old and new layout, what is re-cut, what the data does
            log.info("%s (%s)", plan.describe(), plan.folder)
    problem = check_run_folder(cfg)  # an earlier run is never written over: every rank checks, now
    if problem:
        refuse(problem)
    job = stage(cfg)
    from vaemo_dist.data.storage import StorageError, message

    try:  # the stage's own start-up checks (its data, its store and folders), before any work
        job.check()
    except ConfigError as e:
        refuse(f"config error: {e}")
    except FolderInUseError as e:
        refuse(str(e))
    except StorageError as e:  # credentials, bucket, endpoint: one line, once per job
        refuse(message(e))
    problem = check_local_shards(cfg)  # an empty shard folder, a pattern matching nothing: said now
    if problem:
        refuse(f"{stage.name}: {problem}")

    from vaemo_dist.watchdog import PeerWatch, describe_failure

    exit_code, watch, training = 0, None, False
    try:
        info = dist.init_distributed(cfg.train.dist_timeout_s, cfg.parallel.tensor)
        overwrite_run_folder(cfg, info.rank, info.local_rank)  # train.overwrite=true: the old run aside
        if info.world_size > 1:
            watch = PeerWatch(info.rank, info.world_size, run_folder(cfg) / "checkpoints").start()
        if info.local_rank == 0:  # once per node
            job.prepare()
        dist.barrier()  # the data is complete on this node before anyone reads it
        from vaemo_dist.data.storage import check_shards_reachable, configure_from
        configure_from(cfg.data)  # endpoint and retries for s3:// shards
        urls = job.shards()
        check_shards_reachable(urls)  # wrong credentials or endpoint: a clear error now, not mid-run
        _check_corpus(cfg, urls, info.rank)  # another corpus than the checkpoint's: refused, or reset
        training = True
        final = train(job, info, urls, watch=watch)
        if info.is_main:
            log.info("%s finished: %s", stage.name, {k: round(v, 5) for k, v in final.items()})
    except ResumeError as e:  # found once the shards are listed (another corpus): said once, exit 2
        say(f"resume error: {e}")
        exit_code = 2
    except ShardError as e:
        if training:  # mid-run (a slot read no samples): a failure of the run, with its traceback
            log.error("%s failed on rank %d:\n%s", stage.name, rank, traceback.format_exc())
            exit_code = 1
        else:  # the listing after prepare() (e.g. a synthetic corpus folder): one line, once, exit 2
            say(f"{stage.name}: {e}")
            exit_code = 2
    except dist.PortInUseError as e:  # another run on this machine holds the rendezvous port
        say(f"{stage.name}: {e}")
        exit_code = 2
    except FolderInUseError as e:  # a writer refused a folder of the user's
        log.error("%s: %s", stage.name, e)
        exit_code = 2
    except StorageError as e:  # the store: one line, no traceback, no peer-death companions
        if watch is not None:
            watch.stop()
        if training:  # mid-run: the store went away and did not come back within data.io_timeout_s
            log.error("%s: %s. %s", stage.name, message(e), _resume_hint(cfg))
            exit_code = 1
        else:
            say(f"{stage.name}: {message(e)}")
            exit_code = 2
    except Exception as e:  # noqa: BLE001 - report and leave with a non-zero code instead of hanging peers
        log.error("%s failed on rank %d:\n%s", stage.name, rank, traceback.format_exc())
        peer_trouble = describe_failure(watch, e)
        if peer_trouble:
            log.error(peer_trouble)
        exit_code = 1
    if watch is not None:
        watch.stop()  # peers finishing a moment earlier is not a failure
    dist.shutdown(exit_code)
    raise AssertionError("dist.shutdown returned")  # it leaves the process
