"""The one trainer for every stage: a DeepSpeed engine, the loop, logging, checkpoints, resume.

It knows nothing of modalities: the launcher hands it a model and a `compute_loss(engine, batch)`
that returns the loss and named float metrics, and, when the run evaluates online, an evaluator
(`Evaluator`: built by the caller, e.g. the stage's `vaemo_dist.eval.online.OnlineEvaluator`; train
never imports eval). The checkpoint is a dict of parts (`checkpoint.checkpoint_parts`): the engine, the
data loader (which owns its position), the trainer's counters (`TrainState`) and the RNG.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import deepspeed
import torch

from vaemo_dist import faults
from vaemo_dist.checkpoints import read_rank_states
from vaemo_dist.config import Config, check_deepspeed_extra
from vaemo_dist.data.holdout import training_holdout
from vaemo_dist.data.loader import BatchLoader, DataState, build_loader, describe_loader
from vaemo_dist.data.types import Batch
from vaemo_dist.dist import DistInfo, MegatronMpu
from vaemo_dist.model.flops import peak_tflops
from vaemo_dist.secrets import redact_config
from vaemo_dist.train.checkpoint import (
    Part,
    ResumePlan,
    checkpoint_parts,
    ensure_universal,
    load_checkpoint,
    plan_resume,
    resized_seed,
    save_checkpoint,
)
from vaemo_dist.train.metrics import MetricsLogger, StepRecorder, profile_window
from vaemo_dist.train.schedule import build_optimizer, warmup_cosine
from vaemo_dist.watchdog import PeerWatch

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Batch], tuple[torch.Tensor, dict[str, float]]]


class TrainingError(RuntimeError):
    pass


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype batches are cast to (and an evaluator runs in): bf16 per `use_bf16`, else fp32."""
    return torch.bfloat16 if use_bf16(cfg, device) else torch.float32


# DeepSpeed's default reduce_bucket_size (elements): what ZeRO-1/2 allocate per backward for their
# contiguous gradient bucket, whatever the model's size.
DS_REDUCE_BUCKET_DEFAULT = 500_000_000


def zero_tuning(zero_stage: int, n_params: int | None) -> dict[str, Any]:
    """`zero_optimization` keys chosen for ZeRO-1/2 (issue 19; `train.deepspeed` may override each).

    - reduce_scatter=false: DeepSpeed all-reduces its buckets either way (`use_multi_rank_bucket_allreduce`
      is on by default), but the reduce-scatter path divides the bucket, flattens its per-rank slices
      into a new tensor (a real copy with more than one rank) and copies the result back; off, it
      all-reduces the contiguous bucket in place. Same collective and bytes on the wire, fewer passes
      over the gradients (one rank: the division and a self-copy go; BENCHMARKS.md, issue 19).
    - reduce_bucket_size = the parameters this rank's optimizer holds (at most DeepSpeed's 5e8): the
      bucket is allocated afresh at its full size every backward (2 GB in fp32 by default); one that
      fits the model holds the same gradients in one bucket, so the same reductions happen.
    ZeRO-0 and ZeRO-3 are left to DeepSpeed (other code paths).
    """
    if zero_stage not in (1, 2):
        return {}
    tuned: dict[str, Any] = {"reduce_scatter": False}
    if n_params:
        tuned["reduce_bucket_size"] = int(min(DS_REDUCE_BUCKET_DEFAULT, max(n_params, 1)))
    return tuned


def deepspeed_config(cfg: Config, dp_size: int, bf16: bool, n_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config: what the typed config determines, with `train.deepspeed` deep-merged in
    (the keys derived here, config.DEEPSPEED_OWNED, are refused there). `n_params`: the trainable
    parameters of this rank's model (sizes ZeRO-1/2's gradient bucket, `zero_tuning`); None leaves
    DeepSpeed's bucket size."""
    t = cfg.train
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": t.zero_stage, **zero_tuning(t.zero_stage, n_params)},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO is fine and avoids a JIT build
        # ... also under ZeRO-Offload, where DeepSpeed would otherwise insist on DeepSpeedCPUAdam (a JIT
        # build; docs/scaling.md). The optimizer is always ours, so this only matters with offload.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    check_deepspeed_extra(t.deepspeed)  # also for a Config built by hand, without load_config
    return merge_deepspeed(generated, t.deepspeed)


def merge_deepspeed(generated: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `generated` with `extra` merged in, section by section (extra wins on a leaf)."""
    merged = copy.deepcopy(generated)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = merge_deepspeed(merged[k], v)
        else:
            merged[k] = copy.deepcopy(v)
    return merged


class Evaluator(Protocol):
    """What the trainer calls on the evaluator it is given (eval.online.OnlineEvaluator is one), on every
    rank at the same steps (collectives inside the model stay matched)."""

    def due(self, step: int) -> bool: ...

    def run(self, model: torch.nn.Module, step: int,
            train_flops: float | None = None) -> tuple[dict[str, Any], list[Path]]: ...


@dataclass
class TrainState:
    """The trainer's counters: checkpoint part "train" (the top of vaemo_rank*.json). Steps skipped in a
    row are not saved: a resumed run counts them afresh."""

    step: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.nonfinite_steps = int(state["step"]), int(state.get("nonfinite_steps", 0))


class Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module, compute_loss: LossFn, urls: list[str],
                 dist_info: DistInfo, flops_per_sample: float = 0.0, tokens_per_sample: int = 0,
                 watch: PeerWatch | None = None, evaluator: Evaluator | None = None) -> None:
        """`evaluator`: run on every rank whenever its `due(step)` says (None: no online evaluation)."""
        self.cfg, self.model, self.compute_loss = cfg, model, compute_loss
        self.urls, self.dist, self.watch, self.evaluator = urls, dist_info, watch, evaluator
        self.flops_per_sample, self.tokens_per_sample = flops_per_sample, tokens_per_sample
        self.n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self.run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
        self.ckpt_root = self.run_dir / "checkpoints"
        self.public_config = redact_config(cfg.to_dict())  # what is written: no URL credentials

    def fit(self) -> dict[str, float]:
        cfg, t, d = self.cfg, self.cfg.train, self.dist
        # Decided before the engine exists: a resize of ZeRO 1-3 loads a universal copy of the
        # checkpoint (converted now by rank 0 if need be), which DeepSpeed must be told at initialize.
        plan = plan_resume(cfg, d.world_size)
        universal, convert_s = None, 0.0
        if plan is not None and plan.universal:
            universal, convert_s = ensure_universal(plan.folder, d.rank, d.world_size)
        engine, optimizer, scheduler = self._engine(load_universal=universal is not None)
        loader, counters = self._loader(), TrainState()
        parts = checkpoint_parts(engine, universal, data=loader, train=counters)
        self._resume(parts, plan, convert_s)
        metrics = self._open_metrics(counters.step)
        recorder = StepRecorder(cfg.data.batch_size * t.grad_accum * d.dp_size, optimizer, scheduler, d,
                                self.flops_per_sample, self.tokens_per_sample,
                                peak_tflops(cfg.parallel.peak_tflops, d.device))
        batches, dtype, stop, last = iter(loader), compute_dtype(cfg, d.device), t.stop_at or t.steps, {}
        # The profiler window (train.profile; off: a nullcontext) counts steps through prof.step().
        with profile_window(t.profile, d.rank, self.run_dir, d.device, counters.step, stop) as prof:
            while counters.step < stop:
                if prof is not None:
                    prof.step()  # the profiler's step n: this process's step n (the trainer's on a fresh run)
                t0 = time.perf_counter()
                faults.at_step_start(counters.step + 1, d.rank)
                if self.watch is not None:
                    self.watch.step = counters.step + 1
                sums, data_wait = self._train_step(engine, optimizer, batches, dtype, counters)
                step, step_time = counters.step, time.perf_counter() - t0
                train_flops = recorder.train_flops(step)  # cumulative: logs, evals
                self._check_skips(loader.state)
                if step % t.log_every == 0 or step == t.steps:
                    last = recorder.record(engine, step, sums, step_time, data_wait, loader.state.totals(),
                                           counters.nonfinite_steps)
                    metrics.log(step, last)
                # On every rank, so that tensor-parallel collectives inside the model stay matched.
                if self.evaluator is not None and self.evaluator.due(step):
                    figures, pictures = self.evaluator.run(engine.module, step, train_flops=train_flops)
                    metrics.log(step, figures)
                    metrics.log_pictures(pictures, step)
                metrics.advance(1, {"loss": f"{last.get('loss', float('nan')):.4f}",
                                    "samples/s": f"{recorder.samples_per_step / step_time:.1f}",
                                    "data": f"{last.get('data_wait_frac', float('nan')):.0%}"})
                if step % t.ckpt_every == 0 or step == stop:
                    save_checkpoint(parts, self.ckpt_root, step, d.rank, self.public_config, t.keep_last)
        metrics.close()
        if d.is_main:
            self._plot_curves()
        return last

    def _engine(self, load_universal: bool) -> tuple[Any, torch.optim.Optimizer, Any]:
        """(DeepSpeed engine, optimizer, LR scheduler) of the model, and the global RNG seeded for
        training. `load_universal`: the engine is to load a universal checkpoint (a resize)."""
        cfg, d = self.cfg, self.dist
        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = warmup_cosine(optimizer, cfg.train.steps, cfg.optim)
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        ds_config = deepspeed_config(cfg, d.dp_size, use_bf16(cfg, d.device), n_params)
        if load_universal:
            ds_config = merge_deepspeed(ds_config, {"checkpoint": {"load_universal": True}})
        if d.is_main:  # what DeepSpeed gets, train.deepspeed merged in
            log.info("DeepSpeed config: %s", json.dumps(redact_config(ds_config), sort_keys=True))
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, mpu=MegatronMpu() if d.tp_size > 1 else None)
        # Masking differs per data-parallel rank, is shared by a tensor-parallel group, same every run.
        torch.manual_seed(cfg.train.seed * 7919 + d.dp_rank)
        return engine, optimizer, scheduler

    def _loader(self) -> BatchLoader:
        """This data-parallel rank's batches, passing over the clips eval.holdout keeps out of training."""
        cfg, d = self.cfg, self.dist
        holdout = training_holdout(cfg, self.run_dir, self.urls, write=d.is_main)
        if d.is_main:
            log.info("data: %s", describe_loader(cfg.data, len(self.urls)))
        return build_loader(self.urls, cfg.data, cfg.inputs, d.dp_rank, d.dp_size,
                            exclude_keys=holdout.keys if holdout is not None else None)

    def _open_metrics(self, step: int) -> MetricsLogger:
        """metrics.jsonl (cut after `step`), wandb and the progress bar; the run's start, said once."""
        cfg, t, d = self.cfg, self.cfg.train, self.dist
        metrics = MetricsLogger(self.run_dir, d.is_main, t.steps, step, self.public_config, cfg.wandb.mode,
                                cfg.wandb.project, cfg.wandb.entity, t.run_name)
        if d.is_main:
            log.info("training %s: %d params per TP rank, world %d (TP %d x DP %d) on %s, %s, ZeRO-%d, "
                     "from step %d to %d", t.run_name, self.n_params, d.world_size, d.tp_size, d.dp_size,
                     d.device, "bf16" if use_bf16(cfg, d.device) else "fp32", t.zero_stage, step, t.steps)
            if cfg.parallel.compile and t.zero_stage == 3:
                log.warning("parallel.compile under ZeRO-3: DeepSpeed's parameter hooks break each compiled "
                            "block into per-layer pieces; expect the compile time and no speed-up "
                            "(docs/scaling.md)")
        return metrics

    def _train_step(self, engine: Any, optimizer: torch.optim.Optimizer, batches: Iterator[Batch],
                    dtype: torch.dtype, counters: TrainState) -> tuple[dict[str, float], float]:
        """One optimizer step over train.grad_accum micro-batches; `counters` advanced. Returns this
        rank's metrics averaged over the micro-batches and the seconds it waited for them."""
        accum, step = self.cfg.train.grad_accum, counters.step + 1
        sums: dict[str, float] = {}
        data_wait = 0.0  # seconds this rank waited for its batches in this step
        optimizer.skipped_last = False
        for _ in range(accum):
            t_wait = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t_wait
            loss, m = self.compute_loss(engine, batch.to(self.dist.device, dtype))
            injected = faults.poison_loss(loss, step, self.dist.rank)
            if injected is not loss:
                loss, m = injected, {**m, "loss": float(injected.detach())}
            engine.backward(loss)
            engine.step()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        counters.step = step
        # A non-finite loss or gradient never reaches the weights: DeepSpeed's own overflow check
        # or SkipNonFiniteAdamW skipped the update on every rank alike.
        if engine.was_step_applied() and not optimizer.skipped_last:
            counters.nonfinite_in_a_row = 0
        else:
            self._skipped(counters, m.get("loss"), batch.keys[:4])
        return sums, data_wait

    def _skipped(self, counters: TrainState, loss: float | None, keys: list[str]) -> None:
        """Count a step whose update was skipped; too many in a row stop the run."""
        counters.nonfinite_steps += 1
        counters.nonfinite_in_a_row += 1
        step, in_a_row, limit = counters.step, counters.nonfinite_in_a_row, self.cfg.train.max_nonfinite_steps
        log.warning("step %d skipped: non-finite loss or gradient (%d in a row, %d in all); loss %s; keys %s",
                    step, in_a_row, counters.nonfinite_steps, loss, keys)
        if in_a_row >= limit:
            raise TrainingError(
                f"{in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={limit}); the weights are those of step {step - in_a_row}. "
                "Lower optim.lr, check the data, or resume from an earlier checkpoint.")

    def _plot_curves(self) -> None:
        """<run>/curves.png (vaemo-plot) at the end of a run; a plot never fails the run."""
        from vaemo_dist.train.curves import CURVES_FILE, plot_runs

        try:
            plot_runs([self.run_dir], self.run_dir / CURVES_FILE)
        except Exception as e:  # noqa: BLE001 - the run itself is done and saved
            log.warning("could not draw %s: %s", self.run_dir / CURVES_FILE, e)

    def _resume(self, parts: dict[str, Part], plan: ResumePlan | None, convert_s: float) -> None:
        """Restore `parts` from the checkpoint `plan` names, if any (as saved, or onto another layout)."""
        if plan is None:
            if self.cfg.train.resume:
                log.info("no checkpoint in %s yet: starting from step 0", self.ckpt_root)
            return
        if plan.resize_model or plan.resize_data:
            self._resume_resized(parts, plan, convert_s)
            return
        state = load_checkpoint(parts, plan.folder, self.dist.rank)
        log.info("resumed from %s at step %d", plan.folder, state["step"])

    def _resume_resized(self, parts: dict[str, Any], plan: ResumePlan, convert_s: float) -> None:
        """Resume onto another data-parallel size or worker count: the model as DeepSpeed can (as is for
        ZeRO-0, from the universal copy for ZeRO 1-3), the data as the rest of the begun epoch dealt to
        the new slots; every rank reads the state of every old rank."""
        started = time.perf_counter()
        cfg, d, old = self.cfg, self.dist, plan.old
        states = read_rank_states(plan.folder)
        parts["model"].load(plan.folder, d.rank)
        if plan.resize_model:  # the saved RNG states belong to ranks of another layout
            torch.manual_seed(resized_seed(cfg.train.seed, d.dp_rank, old.step))
        else:  # only the worker count changed: every rank has its own RNG state
            parts["rng"].load(plan.folder, d.rank)
        data = parts["data"].load_resized([s["data"] for s in states], old.tp_size)
        # Skip counts ride in the data states (the old ranks' sum); the non-finite count is agreed.
        parts["train"].load_state_dict({"step": old.step, "nonfinite_steps": max(
            int(s.get("nonfinite_steps", 0)) for s in states)})
        if d.is_main:
            universal = parts["model"].universal
            if old.zero_stage == 0:
                model = "ZeRO-0 model and optimizer states loaded whole"
            elif universal is not None:
                how = f"converted in {convert_s:.1f} s" if convert_s else "converted earlier"
                model = (f"ZeRO-{old.zero_stage} optimizer state re-partitioned from the universal "
                         f"checkpoint {universal} ({how})")
            else:
                model = f"ZeRO-{old.zero_stage} states loaded as saved (same data-parallel size)"
            tp_note = "" if max(d.tp_size, old.tp_size) == 1 else (
                f"; data-parallel ranks, tensor parallel {d.tp_size} kept" if old.tp_size == d.tp_size
                else f"; tensor parallel {old.tp_size} -> {d.tp_size}")
            log.info("resumed from %d ranks x %d workers onto %d x %d: step %d (%s%s); data: %s; model: %s; "
                     "RNG: %s; skip counts carried (the old ranks' sum); %.1f s", old.dp_size,
                     old.num_workers, d.dp_size, cfg.data.num_workers, old.step, plan.folder,
                     tp_note,
                     data, model,
                     "seeded per data-parallel rank from (train.seed, rank, step)" if plan.resize_model
                     else "restored per rank", time.perf_counter() - started + convert_s)
            if cfg.data.resampled:
                log.info("data.resampled: the draws of the nominal epoch not yet read are read once by the "
                         "new slots (draws repeat shards by design: once per draw, not per sample)")

    def _check_skips(self, state: DataState) -> None:
        totals = state.totals()
        seen = totals["samples"]
        if seen >= 50 and totals["decode"] > self.cfg.data.max_skip_fraction * seen:
            raise TrainingError(
                f"{totals['decode']} of {seen} samples could not be decoded (more than "
                f"data.max_skip_fraction={self.cfg.data.max_skip_fraction}); recent: {state.recent_bad}"
            )
