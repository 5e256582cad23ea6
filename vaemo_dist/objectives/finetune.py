"""Downstream fine-tuning: a classification head on the pretrained encoder's pooled tokens.

The encoder runs without masking (`VAEmoModel.encode`); the head sees the mean-pooled tokens of
each modality used ("av": video and audio side by side), through a LayerNorm and dropout. The
contrastive projection heads and the logit scale are frozen (the head does not use them) and the
reconstruction decoder is removed. Layer-wise learning-rate decay: the head and final norm train at
the base lr, block i at lr * decay^(depth - i), the patch embeddings at lr * decay^(depth + 1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaemo_dist.config import OptimConfig
from vaemo_dist.model.vaemo import ENCODER_BLOCKS, TOKEN_EMBEDS, VAEmoModel, in_part, strip_decoder

FROZEN_PARTS = ("heads",)  # of VAEmoModel's PARTS: the contrastive heads and logit scale, unused here


class Classifier(nn.Module):
    def __init__(self, backbone: VAEmoModel, num_classes: int, modality: str = "av", *,
                 layer_decay: float = 0.75, dropout: float = 0.0) -> None:
        super().__init__()
        if modality not in ("av", "video", "audio"):
            raise ValueError(f"modality {modality!r}: choose av, video or audio")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone = strip_decoder(backbone)
        self.modality, self.layer_decay, self.num_classes = modality, layer_decay, num_classes
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not any(in_part(name, part) for part in FROZEN_PARTS))
        in_dim = backbone.cfg.dim * (2 if modality == "av" else 1)
        self.fc_norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def features(self, video: torch.Tensor | None, audio: torch.Tensor | None) -> torch.Tensor:
        """The head's input: pooled tokens of the modalities used, [B, D] or [B, 2D]."""
        out = self.backbone.encode(video if self.modality != "audio" else None,
                                   audio if self.modality != "video" else None)
        parts = [p for p in (out.video_pooled, out.audio_pooled) if p is not None]
        return torch.cat(parts, dim=-1)

    def forward(self, video: torch.Tensor | None, audio: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.dropout(self.fc_norm(self.features(video, audio))))

    def layer_id(self, name: str) -> int:
        """0 for the patch embeddings, i + 1 for encoder block i, depth + 1 for the rest."""
        depth = len(self.backbone.blocks)
        top, _, inner = name.partition(".")
        if top != "backbone":
            return depth + 1
        if inner.split(".", 1)[0] in TOKEN_EMBEDS:
            return 0
        if inner.split(".", 1)[0] == ENCODER_BLOCKS:
            return int(inner.split(".")[1]) + 1
        return depth + 1

    def optimizer_param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """Param groups with layer-wise lr decay, for vaemo_dist.train.schedule.build_optimizer.
        No weight decay on biases, norms and embeddings (1-d tensors), as in pretraining."""
        top = len(self.backbone.blocks) + 1
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            layer, decay = self.layer_id(name), p.ndim >= 2
            group = groups.setdefault((layer, decay), {
                "params": [], "weight_decay": optim.weight_decay if decay else 0.0,
                "lr": optim.lr * self.layer_decay ** (top - layer),
            })
            group["params"].append(p)
        # Top layer first: the trainer logs the first group's lr, which is then the base lr.
        return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


class FinetuneObjective:
    """Cross-entropy on the classifier's logits, with optional mixup (both modalities mixed with the
    same weight and partner) and label smoothing. Draws from torch's global RNG, which the trainer
    seeds per rank and restores on resume."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, label_smoothing: float = 0.0) -> None:
        self.num_classes, self.mixup_alpha, self.label_smoothing = num_classes, mixup_alpha, label_smoothing

    def __call__(self, model: Any, video: torch.Tensor, audio: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if (labels < 0).any() or (labels >= self.num_classes).any():
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got {labels.tolist()}")
        if self.mixup_alpha > 0:
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            perm = torch.randperm(labels.shape[0], device=labels.device)
            video = lam * video + (1 - lam) * video[perm]
            audio = lam * audio + (1 - lam) * audio[perm]
            logits = model(video, audio).float()
            loss = (lam * F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
                    + (1 - lam) * F.cross_entropy(logits, labels[perm], label_smoothing=self.label_smoothing))
        else:
            logits = model(video, audio).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == labels).float().mean()
            values = torch.stack([loss.detach(), acc]).cpu().tolist()
        return loss, {"loss": values[0], "acc": values[1]}
