"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr`."""

from __future__ import annotations

import math

import torch

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
    # torch's AdamW, not DeepSpeed's FusedAdam: the latter JIT-compiles (~70 s) on CPU.
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
