"""Stage-1 objective: masked reconstruction of both modalities + audio-visual InfoNCE. With the cross
decoder (`model.decoder: cross`) the reconstruction terms are over the decoded subset of the masked
patches only (`decoded_mse`)."""

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


def decoded_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, decoded: torch.Tensor | None = None
) -> torch.Tensor:
    """masked_mse for a decoder that predicts some patches only: pred [B, D, P] holds the predictions of
    patches `decoded` [B, D] (ModelOutput.video_decoded / audio_decoded); the MSE is over those of them
    that are masked (the cross decoder samples masked ones only). When pred covers every patch
    (pred [B, N, P], the full decoder, or `decoded` None) it is masked_mse itself."""
    if decoded is None or pred.shape[1] == target.shape[1]:
        return masked_mse(pred, target, mask)
    if decoded.shape != pred.shape[:2]:
        raise ValueError(f"decoded indices {tuple(decoded.shape)} do not match the predictions "
                         f"{tuple(pred.shape)}")
    idx = decoded.unsqueeze(-1).expand(-1, -1, target.shape[-1])
    return masked_mse(pred, target.gather(1, idx), mask.gather(1, decoded))


class Stage1Objective:
    """`group`: the data-parallel process group the contrastive loss gathers over (None: all ranks;
    under tensor parallelism, the ranks of one TP group hold the same samples and must not be counted
    twice)."""

    def __init__(self, cfg: LossConfig, group: Any = None) -> None:
        self.cfg = cfg
        self.group = group

    def __call__(self, out: ModelOutput) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg
        rec_video = decoded_mse(out.video_pred, out.video_target, out.video_mask, out.video_decoded)
        rec_audio = decoded_mse(out.audio_pred, out.audio_target, out.audio_mask, out.audio_decoded)
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
