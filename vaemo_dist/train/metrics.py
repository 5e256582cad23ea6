"""Metrics out of the loop: a step's record, a JSONL file, wandb, a rank-0 progress bar, peak memory, a
profiler window."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vaemo_dist.config import ProfileConfig
from vaemo_dist.dist import DistInfo, reduce_over_ranks
from vaemo_dist.fsutil import move_aside, write_atomic

log = logging.getLogger(__name__)

GIB = float(2**30)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        config: dict[str, Any],
        wandb_mode: str = "auto",
        wandb_project: str = "vaemo",
        wandb_entity: str = "",
        run_name: str = "",
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        mininterval=1.0, smoothing=0.1)
        self.wandb = _start_wandb(run_dir, wandb_mode, wandb_project, wandb_entity, run_name, config)

    def _truncate_after(self, step: int) -> None:
        """Drop the lines of steps after `step`, which this run does again (a resume from a checkpoint
        older than the last line, or step 0 when there is no checkpoint), and lines cut short by a kill.
        Nothing is lost: whenever a line goes, the file as it was is first kept beside it as
        `metrics.jsonl.old-<timestamp>` (fsutil.move_aside), and a warning says so."""
        if not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if _step_of(ln) is not None and _step_of(ln) <= step]
        if len(kept) == len(lines):
            return
        old = move_aside(self.path)
        write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        log.warning("%s: this run starts after step %d, so %d of its %d lines (later steps, or cut short) "
                    "were dropped from it; the file as it was is kept as %s", self.path, step,
                    len(lines) - len(kept), len(lines), old)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # NaN and inf become null: strict JSON readers (jq, JavaScript, pandas) reject them.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **finite}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_pictures(self, paths: Sequence[Path], step: int) -> None:
        """Send an evaluation's PNGs to wandb (nothing on other ranks or with wandb off)."""
        log_pictures(self.wandb, paths, step)

    def advance(self, n: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def log_pictures(wandb_run: Any, paths: Sequence[Path], step: int) -> None:
    """Send the reconstruction PNGs to a wandb run (`MetricsLogger.wandb`; None: nothing to do)."""
    if wandb_run is None or not paths:
        return
    import wandb

    wandb_run.log({"eval/reconstruction": [wandb.Image(str(p)) for p in paths]}, step=step)


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line that is not a whole record."""
    try:
        record = json.loads(line)
        return int(record.get("step", 0)) if isinstance(record, dict) else None
    except (ValueError, TypeError):
        return None


def _start_wandb(run_dir: Path, mode: str, project: str, entity: str, name: str, config: dict[str, Any]):
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    import wandb

    id_file = run_dir / "wandb_id"  # a resumed run continues the same wandb run
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=project, entity=entity or None, name=name or None, id=run_id,
                      resume="allow", mode=mode, dir=str(run_dir), config=config)


def applied_updates(optimizer: torch.optim.Optimizer) -> int:
    """How many updates the optimizer really applied (its own per-parameter step counters)."""
    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return int(max(steps)) if steps else 0


class StepRecorder:
    """The metrics.jsonl record of a logged step (`record`): this rank's loss terms averaged over the
    data-parallel ranks, skip counts summed, times and memory the maximum (one collective), with the
    learning rate, throughput, FLOPs and the optimizer's applied updates. Elapsed time counts from
    its creation."""

    def __init__(self, samples_per_step: int, optimizer: torch.optim.Optimizer, scheduler: Any,
                 dist: DistInfo, flops_per_sample: float = 0.0, tokens_per_sample: int = 0,
                 peak_tflops: float = 0.0) -> None:
        self.samples_per_step, self.optimizer, self.scheduler = samples_per_step, optimizer, scheduler
        self.dist, self.flops_per_sample, self.tokens_per_sample = dist, flops_per_sample, tokens_per_sample
        self.peak = peak_tflops
        self.start = time.perf_counter()

    def train_flops(self, step: int) -> float:
        """Training FLOPs up to `step` (all ranks)."""
        return step * self.samples_per_step * self.flops_per_sample

    def record(self, engine: Any, step: int, sums: dict[str, float], step_time: float, data_wait: float,
               skips: dict[str, int], nonfinite: int) -> dict[str, float]:
        """Collective over the data-parallel group. `skips`: this rank's skip counts (DataState.totals)."""
        d = self.dist
        # Skip counts, in all and per kind (decode/no_audio -> skipped/no_audio); every rank has the
        # same keys, so they ride in the same collective and add up over DP ranks.
        counts = {"skipped_decode": skips["decode"], "skipped_shards": skips["shard"]}
        counts.update({"skipped/" + k[len("decode/"):]: v
                       for k, v in skips.items() if k.startswith("decode/")})
        # Maxima: the slowest rank's times (it gates the step), the fullest rank's memory.
        maxes = {"step_time_s": step_time, "data_wait_s": data_wait, **memory_stats(d.device)}
        record = reduce_over_ranks({**sums, **counts, **maxes}, d.device, d.dp_group,
                                   sums=counts, maxes=maxes)  # the rest: means over DP ranks
        for k in counts:
            record[k] = round(record[k])
        record["data_wait_frac"] = record["data_wait_s"] / record["step_time_s"]
        samples_per_s = self.samples_per_step / record["step_time_s"]
        record.update(lr=self.scheduler.get_last_lr()[0], samples_per_s=samples_per_s,
                      tokens_per_s=samples_per_s * self.tokens_per_sample,
                      grad_norm=float(engine.get_global_grad_norm() or 0.0),
                      samples_seen=step * self.samples_per_step, train_flops=self.train_flops(step),
                      nonfinite_steps=nonfinite, optimizer_steps=applied_updates(self.optimizer),
                      elapsed_s=time.perf_counter() - self.start)
        if self.flops_per_sample:
            tflops = self.flops_per_sample * samples_per_s / d.world_size / 1e12
            record["tflops_per_device"] = tflops
            if self.peak:
                record["mfu"] = tflops / self.peak
        return record


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB. CUDA: the caching allocator's peak allocated (`mem_peak_gib`) and reserved
    (`mem_reserved_gib`) bytes since the previous call, whose peaks this call resets. Elsewhere: the
    process's peak resident set size (whole process, DataLoader workers not included; it never goes down)."""
    if device.type == "cuda":
        stats = {"mem_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
                 "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"mem_peak_gib": peak * (1 if sys.platform == "darwin" else 1024) / GIB}


def profile_window(cfg: ProfileConfig, rank: int, run_dir: Path, device: torch.device, first_step: int,
                   total_steps: int) -> contextlib.AbstractContextManager[torch.profiler.profile | None]:
    """A torch.profiler that records optimizer steps cfg.start_step .. cfg.start_step + cfg.steps - 1
    (1-based, as in metrics.jsonl) on the ranks in cfg.ranks and writes one Chrome/TensorBoard trace
    per rank to <run>/profile/; elsewhere (off, another rank, a window already past at resume) a
    nullcontext, which costs nothing. `first_step`: the step the loop starts after (0, or the resumed step).

    The loop calls `prof.step()` at the start of every step, so the profiler's step n is the trainer's
    step first_step + n (ProfilerStep#n in the trace; the same numbers on a fresh run)."""
    if not cfg.start_step or rank not in cfg.ranks or cfg.start_step <= first_step:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    out = run_dir / "profile"
    write = tensorboard_trace_handler(str(out), worker_name=f"rank{rank}")
    cuda = device.type == "cuda"
    last = min(cfg.start_step + cfg.steps - 1, total_steps)

    def ready(prof: profile) -> None:
        write(prof)
        if rank == min(cfg.ranks):  # one table, from the first profiled rank
            table = prof.key_averages().table(
                sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15)
            log.info("profile of steps %d-%d (traces in %s), top ops by self time:\n%s",
                     cfg.start_step, last, out, table)

    # One warm-up step before the window (the profiler's start-up cost stays out of the record).
    first = cfg.start_step - first_step  # the profiler's step of the first recorded step, >= 1
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    return profile(activities=activities, schedule=schedule(wait=first - 1, warmup=1, active=cfg.steps,
                                                            repeat=1),
                   on_trace_ready=ready, record_shapes=cfg.record_shapes, profile_memory=cfg.memory)
