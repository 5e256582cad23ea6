"""The optimizer (AdamW that refuses non-finite gradients) and its learning-rate schedule: linear
warmup, then cosine decay to `min_lr`."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from vaemo_dist.config import OptimConfig


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, optim: OptimConfig):
    """A LambdaLR whose factor makes every group's lr equal `lr_at` (groups start at optim.lr)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, total_steps, optim) / optim.lr
    )


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings and the logit scale (1-d or 0-d tensors).

    A model may define `optimizer_param_groups(optim) -> list[dict]` to choose its own groups (e.g.
    layer-wise lr decay in objectives/finetune.py); a group's "lr" scales with the schedule like optim.lr.
    """
    custom = getattr(model, "optimizer_param_groups", None)
    if custom is not None:
        groups = custom(optim)
    else:
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    # torch's AdamW, not DeepSpeed's FusedAdam (which JIT-compiles, ~70 s on CPU). fused=True: one
    # kernel per parameter group on GPU, and on CPU as fast as DeepSpeedCPUAdam for ZeRO-Offload
    # (24 vs 130 ms per step on 20 M parameters, one thread; docs/scaling.md) with nothing to build.
    return SkipNonFiniteAdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True)


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that leaves parameters and moments untouched when a gradient it would apply is not finite.

    DeepSpeed skips such steps itself only in some modes (fp16 loss scaling; ZeRO-1/2 when it computes
    the gradient norm); this covers the rest (ZeRO-0 fp32, no clipping, ZeRO-3). Under ZeRO each rank
    sees only its partition, so the verdict is agreed over all ranks: everyone steps or no one does.
    DeepSpeed calls `step` on every rank at the same accumulation boundary, which keeps the
    all-reduce matched. `skipped_last` tells the trainer what happened; `overflow` (the same flag)
    is what DeepSpeed's engine reads of a client optimizer it holds directly (ZeRO-0): it then counts
    the step as skipped and does not advance the learning-rate schedule, as after its own checks.
    """

    @property
    def overflow(self) -> bool:
        return self.skipped_last

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped_last = False

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        params = [p for g in self.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        device = params[0].device if params else torch.device("cpu")
        bad = torch.zeros((), device=device)
        if grads:
            bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float().to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":  # CUDA tensors only; under ZeRO-Offload the params are on CPU
                bad = bad.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.skipped_last = bool(bad.item())
        if self.skipped_last:
            return None
        return super().step(closure)
