"""The small typed contracts of the data path: one decoded clip, one batch, why a sample was skipped
(`DecodeError` and its kinds) and what decoders refuse up front (`DecodeLimits`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vaemo_dist.config import DataConfig

# Why a sample was skipped, machine-readable: counted per kind (`decode/<kind>` in the loader's
# counts, `skipped/<kind>` in the metrics).
DECODE_KINDS = (
    "corrupt",  # not a readable container / stream (garbage, broken packets, not bytes)
    "truncated",  # fewer frames or samples than promised, or a container cut short
    "empty",  # a zero-length video or audio member
    "no_audio",  # no audio member, or a container without an audio stream
    "no_video",  # no video member, or a container without a video stream
    "sample_rate",  # audio at another rate than inputs.audio.sample_rate
    "codec",  # a codec this decoder cannot decode (DALI's backends)
    "metadata",  # an unusable json (unparsable, wrong types)
    "too_short",  # shorter than data.min_clip_s
    "too_long",  # longer than data.max_clip_s
    "timeout",  # decoding took longer than data.decode_timeout_s
    "no_face",  # vaemo-shard --face-crop found no face on most checked frames (or --boxes has none)
    "other",  # anything else
)


class DecodeError(Exception):
    """A sample whose media cannot be turned into model input; the pipeline skips and counts it.

    `reason` is for people, `kind` (one of DECODE_KINDS) for counting.
    """

    def __init__(self, key: str, reason: str, kind: str = "other") -> None:
        if kind not in DECODE_KINDS:
            raise ValueError(f"unknown decode error kind {kind!r}; one of {DECODE_KINDS}")
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their args only; keep key, reason and kind across processes.
        return (DecodeError, (self.key, self.reason, self.kind))


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder refuses before (or instead of) decoding: clip length bounds in seconds and a
    per-sample time limit. The defaults limit nothing (for callers outside training)."""

    min_clip_s: float = 0.0
    max_clip_s: float = math.inf
    timeout_s: float = 0.0  # <= 0: no time limit

    @staticmethod
    def from_config(data: DataConfig) -> DecodeLimits:
        return DecodeLimits(min_clip_s=data.min_clip_s, max_clip_s=data.max_clip_s,
                            timeout_s=data.decode_timeout_s)

    def check_length(self, key: str, seconds: float, what: str = "clip", minimum: bool = True) -> None:
        """Raise DecodeError (too_short / too_long) if `seconds` is outside the bounds (only above
        the upper one with minimum=False)."""
        if minimum and seconds < self.min_clip_s:
            raise DecodeError(key, f"{what} is {seconds:.6g} s long, shorter than data.min_clip_s="
                                   f"{self.min_clip_s:g} s", kind="too_short")
        if seconds > self.max_clip_s:
            raise DecodeError(key, f"{what} is {seconds:.6g} s long, longer than data.max_clip_s="
                                   f"{self.max_clip_s:g} s", kind="too_long")


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
