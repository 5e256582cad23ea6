"""The small typed contracts of the data path: one decoded clip, one batch, why a sample was skipped
(`DecodeError` and its kinds) and what decoders refuse up front (`DecodeLimits`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import default_collate

from vaemo_dist.data.buffers import BufferPool, Lease
from vaemo_dist.data.finish import RawBatch, RawClip, finish, stackable

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
    normalised (F time frames, M mel bins). With `data.finish: device` the loader's clips carry `raw`
    (decoded planes and waveform, `finish.RawClip`) instead, and video/audio are None until the batch
    is finished on the trainer's device."""

    key: str
    video: torch.Tensor | None
    audio: torch.Tensor | None
    label: int = -1
    meta: dict[str, Any] = field(default_factory=dict)
    raw: RawClip | None = None

    def finished(self, inputs: Any) -> Clip:
        """This clip with video/audio computed on the CPU (itself if it has them already)."""
        if self.raw is None:
            return self
        video, audio = finish(RawBatch.stack([self.raw], inputs))
        return Clip(self.key, video[0], audio[0], self.label, self.meta)


@dataclass
class Batch:
    """A collated micro-batch. `state` is the data position after this batch (for exact resume).

    With `data.finish: device`, video and audio are None and `raw` holds the decoded planes and
    waveforms: `to(device, dtype)` finishes them there (`finish.finish`), so read video/audio after it.
    A raw batch stacked into a worker's reusable shared-memory blocks (`lease`, data/buffers.py) is
    consumed by `to()`: the blocks go back to the worker (`give_back`, set by the BatchLoader) and `raw`
    is dropped, so nothing can read them after the worker has reused them."""

    video: torch.Tensor | None  # [B, 3, T, H, W]
    audio: torch.Tensor | None  # [B, 1, F, M]
    keys: list[str]
    label: torch.Tensor  # [B] long, -1 where unknown
    state: dict[str, Any] = field(default_factory=dict)
    raw: RawBatch | None = None
    lease: Lease | None = None
    give_back: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        if self.raw is not None:
            video, audio = finish(self.raw, device, dtype)
            self.release()  # finished into new tensors: the blocks can be reused
        else:
            if self.video is None or self.audio is None:
                raise RuntimeError("this batch was already finished (Batch.to) and its raw planes went "
                                   "back to the loader worker: use the batch that to() returned")
            video = self.video.to(device, dtype=dtype, non_blocking=True)
            audio = self.audio.to(device, dtype=dtype, non_blocking=True)
        return Batch(video=video, audio=audio, keys=self.keys, label=self.label.to(device, non_blocking=True),
                     state=self.state)

    def release(self) -> None:
        """Give a leased raw batch's blocks back to its worker and drop `raw` (nothing here may read
        them after this); nothing for other batches. `to()` calls it once it has finished the batch."""
        if self.give_back is not None:
            self.give_back()
            self.raw, self.give_back = None, None

    def pin_memory(self) -> Batch:
        """Page-locked copies for fast host -> GPU transfer (the DataLoader's pin_memory calls this).
        The copy keeps the lease: its shared-memory blocks can go back as soon as it exists."""
        return Batch(video=None if self.video is None else self.video.pin_memory(),
                     audio=None if self.audio is None else self.audio.pin_memory(), keys=self.keys,
                     label=self.label.pin_memory(), state=self.state,
                     raw=None if self.raw is None else self.raw.pin_memory(), lease=self.lease)

    def __len__(self) -> int:
        return len(self.keys)


def collate(clips: list[Clip], state: dict[str, Any] | None = None, inputs: Any = None,
            pool: BufferPool | None = None) -> Batch:
    """Stack clips into a Batch. Raw clips (`data.finish: device`) stack into `Batch.raw` when they all
    are raw with equal shapes; otherwise (mixed frame sizes, or some clips finished by the loader because
    their pixels cannot be converted on the device) every raw clip is finished here on the CPU, so the
    batch is always one or the other. `inputs` (the InputConfig) is needed only for raw clips. `pool`
    (a DataLoader worker's, data/buffers.py): raw planes stack into its reusable blocks."""
    keys = [c.key for c in clips]
    label = torch.tensor([c.label for c in clips], dtype=torch.long)
    raws = [c.raw for c in clips if c.raw is not None]
    if raws and len(raws) == len(clips) and stackable(raws):
        raw = RawBatch.stack(raws, inputs, stack if pool is None else pool.stack)
        return Batch(video=None, audio=None, keys=keys, label=label, state=state or {}, raw=raw,
                     lease=None if pool is None else pool.lease())
    if raws:
        clips = [c.finished(inputs) for c in clips]
    return Batch(video=stack([c.video for c in clips]), audio=stack([c.audio for c in clips]),
                 keys=keys, label=label, state=state or {})


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, straight into shared memory inside a DataLoader worker (torch's `default_collate`
    does the stacking): the batch then crosses to the trainer's process without another copy."""
    return default_collate(tensors)
