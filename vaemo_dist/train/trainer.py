"""The one trainer for every stage: a DeepSpeed engine, the loop, logging, checkpoints, resume.

It knows nothing of modalities: the launcher hands it a model and a `compute_loss(engine, batch)`
that returns the loss and named float metrics.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from safetensors.torch import load_file

from vaemo_dist import faults
from vaemo_dist.config import Config, check_deepspeed_extra
from vaemo_dist.data.loader import DataState, build_loader, count_key_log, cut_key_log, resize_data_states
from vaemo_dist.data.types import Batch
from vaemo_dist.dist import DistInfo, MegatronMpu, reduce_over_ranks
from vaemo_dist.model.flops import peak_tflops
from vaemo_dist.secrets import redact_config
from vaemo_dist.train.checkpoint import (
    ResumePlan,
    ensure_universal,
    load_checkpoint,
    load_model_state,
    plan_resume,
    read_rank_states,
    resized_seed,
    save_checkpoint,
    set_rng_state,
)
from vaemo_dist.train.metrics import MetricsLogger, memory_stats, profile_window
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


def deepspeed_config(cfg: Config, dp_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config: what the typed config determines, with `train.deepspeed` deep-merged in
    (the keys derived here, config.DEEPSPEED_OWNED, are refused there)."""
    t = cfg.train
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": t.zero_stage},
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


def applied_updates(optimizer: torch.optim.Optimizer) -> int:
    """How many updates the optimizer really applied (its own per-parameter step counters)."""
    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return int(max(steps)) if steps else 0


class Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module, compute_loss: LossFn, urls: list[str],
                 dist_info: DistInfo, flops_per_sample: float = 0.0, tokens_per_sample: int = 0,
                 watch: PeerWatch | None = None) -> None:
        self.cfg, self.model, self.compute_loss = cfg, model, compute_loss
        self.urls, self.dist, self.watch = urls, dist_info, watch
        self.flops_per_sample, self.tokens_per_sample = flops_per_sample, tokens_per_sample
        self.run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
        self.ckpt_root = self.run_dir / "checkpoints"

    def fit(self) -> dict[str, float]:
        cfg, t, d = self.cfg, self.cfg.train, self.dist
        bf16 = use_bf16(cfg, d.device)
        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = warmup_cosine(optimizer, t.steps, cfg.optim)
        n_params = sum(p.numel() for p in self.model.parameters())  # before ZeRO-3 partitions them
        # Decided before the engine exists: a resize of ZeRO 1-3 loads a universal copy of the
        # checkpoint (converted now by rank 0 if need be), which DeepSpeed must be told at initialize.
        plan = plan_resume(cfg, d.world_size)
        universal, convert_s = None, 0.0
        if plan is not None and plan.universal:
            universal, convert_s = ensure_universal(plan.folder, d.rank, d.world_size)
        ds_config = deepspeed_config(cfg, d.dp_size, bf16)
        if universal is not None:
            ds_config = merge_deepspeed(ds_config, {"checkpoint": {"load_universal": True}})
        if d.is_main:  # what DeepSpeed gets, train.deepspeed merged in
            log.info("DeepSpeed config: %s", json.dumps(redact_config(ds_config), sort_keys=True))
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, mpu=MegatronMpu() if d.tp_size > 1 else None)
        # Masking differs per data-parallel rank, is shared by a tensor-parallel group, same every run.
        torch.manual_seed(t.seed * 7919 + d.dp_rank)
        peak = peak_tflops(cfg.parallel.peak_tflops, d.device)

        step, data_state, nonfinite = self._maybe_resume(engine, plan, universal, convert_s)
        eval_set, holdout = self._eval_set()
        loader = build_loader(self.urls, cfg.data, cfg.inputs, d.dp_rank, d.dp_size, resume=data_state,
                              exclude_keys=holdout.keys if holdout is not None else None)
        data_state = data_state or DataState(cfg.data.num_workers, d.dp_size)
        batches: Iterator[Batch] = iter(loader)
        dtype = torch.bfloat16 if bf16 else torch.float32
        samples_per_step = cfg.data.batch_size * t.grad_accum * d.dp_size
        self._scheduler, self._optimizer, self._peak = scheduler, optimizer, peak  # for _step_record

        public_config = redact_config(cfg.to_dict())  # what is written: no URL credentials
        metrics = MetricsLogger(self.run_dir, d.is_main, t.steps, step, public_config, cfg.wandb.mode,
                                cfg.wandb.project, cfg.wandb.entity, t.run_name)
        if d.is_main:
            log.info("training %s: %d params per TP rank, world %d (TP %d x DP %d) on %s, %s, ZeRO-%d, "
                     "from step %d to %d", t.run_name, n_params,
                     d.world_size, d.tp_size, d.dp_size, d.device, "bf16" if bf16 else "fp32",
                     t.zero_stage, step, t.steps)
            if cfg.parallel.compile and t.zero_stage == 3:
                log.warning("parallel.compile under ZeRO-3: DeepSpeed's parameter hooks break each compiled "
                            "block into per-layer pieces; expect the compile time and no speed-up "
                            "(docs/scaling.md)")
        evaluator = None
        if eval_set is not None and eval_set.kind != "off":
            from vaemo_dist.eval.online import OnlineEvaluator, log_pictures

            evaluator = OnlineEvaluator(cfg, d.device, dtype, self.run_dir, d.is_main, holdout, self.urls)
        last: dict[str, float] = {}
        self._start_time = time.perf_counter()
        stop = t.stop_at or t.steps
        in_a_row = 0
        # The profiler window (train.profile; off: a nullcontext) counts steps through prof.step().
        with profile_window(t.profile, d.rank, self.run_dir, d.device, step, stop) as prof:
            while step < stop:
                if prof is not None:
                    prof.step()  # the profiler's step n: this process's step n (the trainer's on a fresh run)
                t0 = time.perf_counter()
                faults.at_step_start(step + 1, d.rank)
                if self.watch is not None:
                    self.watch.step = step + 1
                sums: dict[str, float] = {}
                data_wait = 0.0  # seconds this rank waited for its batches in this step
                optimizer.skipped_last = False
                for _ in range(t.grad_accum):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    data_wait += time.perf_counter() - t_wait
                    data_state.update(batch)
                    loss, m = self.compute_loss(engine, batch.to(d.device, dtype))
                    injected = faults.poison_loss(loss, step + 1, d.rank)
                    if injected is not loss:
                        loss, m = injected, {**m, "loss": float(injected.detach())}
                    engine.backward(loss)
                    engine.step()
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v / t.grad_accum
                step += 1
                # A non-finite loss or gradient never reaches the weights: DeepSpeed's own overflow check
                # or SkipNonFiniteAdamW skipped the update on every rank alike.
                if engine.was_step_applied() and not optimizer.skipped_last:
                    in_a_row = 0
                else:
                    nonfinite, in_a_row = nonfinite + 1, in_a_row + 1
                    log.warning("step %d skipped: non-finite loss or gradient (%d in a row, %d in all); "
                                "loss %s; keys %s", step, in_a_row, nonfinite, m.get("loss"), batch.keys[:4])
                    if in_a_row >= t.max_nonfinite_steps:
                        raise TrainingError(
                            f"{in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                            f"gradient (train.max_nonfinite_steps={t.max_nonfinite_steps}); the weights are "
                            f"those of step {step - in_a_row}. Lower optim.lr, check the data, or resume "
                            "from an earlier checkpoint.")
                step_time = time.perf_counter() - t0
                train_flops = step * samples_per_step * self.flops_per_sample  # cumulative: logs, evals
                self._check_skips(data_state)

                if step % t.log_every == 0 or step == t.steps:
                    last = self._step_record(engine, step, sums, step_time, data_wait, data_state, nonfinite,
                                             train_flops)
                    metrics.log(step, last)
                # On every rank, so that tensor-parallel collectives inside the model stay matched.
                if evaluator is not None and evaluator.due(step):
                    figures, pictures = evaluator.run(engine.module, step, train_flops=train_flops)
                    metrics.log(step, figures)
                    log_pictures(metrics.wandb, pictures, step)
                metrics.advance(1, {"loss": f"{last.get('loss', float('nan')):.4f}",
                                    "samples/s": f"{samples_per_step / step_time:.1f}",
                                    "data": f"{last.get('data_wait_frac', float('nan')):.0%}"})

                if step % t.ckpt_every == 0 or step == stop:
                    save_checkpoint(engine, self.ckpt_root, step, d.rank,
                                    {"data": data_state.to_dict(), "nonfinite_steps": nonfinite},
                                    public_config, t.keep_last)
        metrics.close()
        if d.is_main:
            self._plot_curves()
        return last

    def _eval_set(self) -> tuple[Any, Any]:
        """(the online evaluation's held-out set or None when eval.every is 0, eval.holdout's split or
        None). Evaluation off for want of held-out clips is said here, once, on the main rank."""
        cfg, d = self.cfg, self.dist
        if not cfg.eval.every:
            if cfg.eval.holdout and d.is_main:
                log.warning("eval.holdout=%g is set but eval.every is 0: no evaluation, nothing held out",
                            cfg.eval.holdout)
            return None, None
        from vaemo_dist.eval.online import ensure_holdout, eval_set

        chosen = eval_set(cfg)
        if chosen.kind == "off" and d.is_main:
            log.info(chosen.why)
        if chosen.kind != "holdout":
            return chosen, None
        # Made by the launcher (prepare_online_eval) before the process group; here it is read (or made
        # alike on every rank, written by the main one, when a caller skipped that).
        return chosen, ensure_holdout(cfg, self.run_dir, urls=self.urls, write=d.is_main)

    def _step_record(self, engine: Any, step: int, sums: dict[str, float], step_time: float,
                     data_wait: float, data_state: DataState, nonfinite: int,
                     train_flops: float) -> dict[str, float]:
        """The metrics.jsonl record of a logged step: this rank's loss terms averaged over the
        data-parallel ranks, skip counts summed, times and memory the maximum (one collective)."""
        cfg, d = self.cfg, self.dist
        samples_per_step = cfg.data.batch_size * cfg.train.grad_accum * d.dp_size
        # Skip counts, in all and per kind (decode/no_audio -> skipped/no_audio); every rank has the
        # same keys, so they ride in the same collective and add up over DP ranks.
        skips = data_state.totals()
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
        samples_per_s = samples_per_step / record["step_time_s"]
        record.update(lr=self._scheduler.get_last_lr()[0], samples_per_s=samples_per_s,
                      tokens_per_s=samples_per_s * self.tokens_per_sample,
                      grad_norm=float(engine.get_global_grad_norm() or 0.0),
                      samples_seen=step * samples_per_step, train_flops=train_flops,
                      nonfinite_steps=nonfinite, optimizer_steps=applied_updates(self._optimizer),
                      elapsed_s=time.perf_counter() - self._start_time)
        if self.flops_per_sample:
            tflops = self.flops_per_sample * samples_per_s / d.world_size / 1e12
            record["tflops_per_device"] = tflops
            if self._peak:
                record["mfu"] = tflops / self._peak
        return record

    def _plot_curves(self) -> None:
        """<run>/curves.png (vaemo-plot) at the end of a run; a plot never fails the run."""
        from vaemo_dist.train.curves import CURVES_FILE, plot_runs

        try:
            plot_runs([self.run_dir], self.run_dir / CURVES_FILE)
        except Exception as e:  # noqa: BLE001 - the run itself is done and saved
            log.warning("could not draw %s: %s", self.run_dir / CURVES_FILE, e)

    def _maybe_resume(self, engine: Any, plan: ResumePlan | None, universal: Path | None = None,
                      convert_s: float = 0.0) -> tuple[int, DataState | None, int]:
        """(step, data position, non-finite steps so far) of the checkpoint to resume from, if any."""
        if plan is None:
            if self.cfg.train.resume:
                log.info("no checkpoint in %s yet: starting from step 0", self.ckpt_root)
            return 0, None, 0
        if plan.resize_model or plan.resize_data:
            return self._resume_resized(engine, plan, universal, convert_s)
        folder = plan.folder
        state = load_checkpoint(engine, folder, self.dist.rank)
        log.info("resumed from %s at step %d", folder, state["step"])
        return int(state["step"]), DataState.from_dict(state["data"]), int(state.get("nonfinite_steps", 0))

    def _resume_resized(self, engine: Any, plan: ResumePlan, universal: Path | None,
                        convert_s: float) -> tuple[int, DataState, int]:
        """Resume onto another data-parallel size or worker count: the model as DeepSpeed can (as is for
        ZeRO-0, from the universal copy for ZeRO 1-3), the data as the rest of the begun epoch dealt to
        the new slots; every rank reads the state of every old rank."""
        started = time.perf_counter()
        cfg, d, old = self.cfg, self.dist, plan.old
        states = read_rank_states(plan.folder)
        step = old.step
        nonfinite = max(int(s.get("nonfinite_steps", 0)) for s in states)  # agreed over ranks: all equal
        load_model_state(engine, plan.folder, universal)
        if plan.resize_model:  # the saved RNG states belong to ranks of another layout
            torch.manual_seed(resized_seed(cfg.train.seed, d.dp_rank, step))
        else:  # only the worker count changed: every rank has its own RNG state
            set_rng_state(load_file(str(plan.folder / f"rng_rank{d.rank:05d}.safetensors")))
        # One state per old data-parallel rank; under TP its ranks are consecutive (megatron's order).
        old_data = [DataState.from_dict(states[r * old.tp_size]["data"]) for r in range(old.dp_size)]
        new_data = resize_data_states(old_data, len(self.urls), cfg.data.shuffle_seed, d.dp_size,
                                      cfg.data.num_workers, cfg.data.resampled)
        data_state = new_data[d.dp_rank]
        if cfg.data.log_keys:
            if d.rank >= old.world_size:  # no old rank of this number: its file, if any, stays whole
                data_state.key_log_base = count_key_log(cfg.data.log_keys, d.rank)
            if d.is_main:  # old ranks with no new process: their files keep the batches trained on
                for g in range(d.world_size, old.world_size):
                    gone = states[g]["data"]
                    cut_key_log(cfg.data.log_keys, g, int(gone.get("key_log_base", 0)) + int(gone["batches"]))
        if d.is_main:
            pieces = [e for s in new_data for plan_of in s.remainder.values() for e in plan_of]
            begun = sorted({e.epoch for e in pieces})
            if old.zero_stage == 0:
                model = "ZeRO-0 model and optimizer states loaded whole"
            elif universal is not None:
                how = f"converted in {convert_s:.1f} s" if convert_s else "converted earlier"
                model = (f"ZeRO-{old.zero_stage} optimizer state re-partitioned from the universal "
                         f"checkpoint {universal} ({how})")
            else:
                model = f"ZeRO-{old.zero_stage} states loaded as saved (same data-parallel size)"
            log.info("resumed from %d ranks x %d workers onto %d x %d: step %d (%s%s); data: the rest of "
                     "epoch %s (%d pieces) dealt to %d slots, the ordinary plan from epoch %d; model: %s; "
                     "RNG: %s; skip counts carried (the old ranks' sum); %.1f s", old.dp_size,
                     old.num_workers, d.dp_size, cfg.data.num_workers, step, plan.folder,
                     f"; data-parallel ranks, tensor parallel {d.tp_size} kept" if d.tp_size > 1 else "",
                     "/".join(map(str, begun)) or "-", len(pieces), d.dp_size * max(1, cfg.data.num_workers),
                     new_data[0].next_epoch, model,
                     "seeded per data-parallel rank from (train.seed, rank, step)" if plan.resize_model
                     else "restored per rank", time.perf_counter() - started + convert_s)
            if cfg.data.resampled:
                log.info("data.resampled: the draws of the nominal epoch not yet read are read once by the "
                         "new slots (draws repeat shards by design: once per draw, not per sample)")
        return step, data_state, nonfinite

    def _check_skips(self, state: DataState) -> None:
        totals = state.totals()
        seen = totals["samples"]
        if seen >= 50 and totals["decode"] > self.cfg.data.max_skip_fraction * seen:
            raise TrainingError(
                f"{totals['decode']} of {seen} samples could not be decoded (more than "
                f"data.max_skip_fraction={self.cfg.data.max_skip_fraction}); recent: {state.recent_bad}"
            )
