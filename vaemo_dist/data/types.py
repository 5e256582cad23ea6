"""The small typed contracts of the data path: one decoded clip, one batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class DecodeError(Exception):
    """A sample whose media cannot be turned into model input; the pipeline skips and counts it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass
class Clip:
    """One decoded sample. video: float [3, T, H, W] normalised; audio: float [1, F, M] log-mel
    normalised (F time frames, M mel bins)."""

    key: str
    video: torch.Tensor
    audio: torch.Tensor
    label: int = -1
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """A collated micro-batch. `state` is the data position after this batch (for exact resume)."""

    video: torch.Tensor  # [B, 3, T, H, W]
    audio: torch.Tensor  # [B, 1, F, M]
    keys: list[str]
    label: torch.Tensor  # [B] long, -1 where unknown
    state: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        return Batch(
            video=self.video.to(device, dtype=dtype, non_blocking=True),
            audio=self.audio.to(device, dtype=dtype, non_blocking=True),
            keys=self.keys,
            label=self.label.to(device, non_blocking=True),
            state=self.state,
        )

    def __len__(self) -> int:
        return len(self.keys)


def collate(clips: list[Clip], state: dict[str, Any] | None = None) -> Batch:
    return Batch(
        video=torch.stack([c.video for c in clips]),
        audio=torch.stack([c.audio for c in clips]),
        keys=[c.key for c in clips],
        label=torch.tensor([c.label for c in clips], dtype=torch.long),
        state=state or {},
    )
