"""Stage-1 objective: masked reconstruction of both modalities + audio-visual InfoNCE."""

from __future__ import annotations

from typing import Any

import torch

from kernels import dispatch
from vaemo_dist.config import LossConfig
from vaemo_dist.model.vaemo import ModelOutput


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the masked patches only: mean over patch values, then mean over masked patches."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


class Stage1Objective:
    """`group`: the data-parallel process group the contrastive loss gathers over (None: all ranks;
    under tensor parallelism, the ranks of one TP group hold the same samples and must not be counted
    twice)."""

    def __init__(self, cfg: LossConfig, group: Any = None) -> None:
        self.cfg = cfg
        self.group = group

    def __call__(self, out: ModelOutput) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        rec_video = masked_mse(out.video_pred, out.video_target, out.video_mask)
        rec_audio = masked_mse(out.audio_pred, out.audio_target, out.audio_mask)
        a, v = out.audio_emb.float(), out.video_emb.float()
        contrastive = dispatch.contrastive_loss(a, v, out.logit_scale.float(), self.group)
        total = c.video_weight * rec_video + c.audio_weight * rec_audio + c.contrastive_weight * contrastive
        with torch.no_grad():
            acc_a2v = ((a @ v.T).argmax(dim=1) == torch.arange(a.shape[0], device=a.device)).float().mean()
            # One device->host copy for all metrics.
            vals = torch.stack([total, rec_video, rec_audio, contrastive, out.logit_scale.float(), acc_a2v])
            names = ("loss", "rec_video", "rec_audio", "contrastive", "logit_scale", "acc_a2v")
            metrics = dict(zip(names, vals.detach().cpu().tolist()))
        return total, metrics
