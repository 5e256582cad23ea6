"""The last steps of preprocessing, run on the trainer's device (`data.finish: device`, issue 19).

With `data.finish: device` the PyAV loader does no pixel or spectral work after decoding: a clip leaves
the DataLoader worker as its decoded 4:2:0 planes (uint8 Y [T, H, W], U and V [T, H/2, W/2], only the
window's frames) and its raw waveform window (float32), and `Batch.to(device, dtype)` finishes the batch
where the model runs:

1. YUV -> RGB (`yuv_to_rgb`): chroma upsampled bilinearly at the clip's siting (centre or left,
   `chroma_siting` in the clip's json), the BT.601/BT.709 matrix and limited/full range the decoder
   reports, rounded to 8 bits. This is what swscale's accurate conversion computes (the loader path,
   `decode_pyav.RGB_CONVERSION`): measured identical on grey and within 1/255 on 0.1-0.4 % of the
   pixels of coloured frames (tests/data/test_finish.py holds it to that).
2. The square crop, the antialiased bilinear resize and the normalisation of `decode_pyav.video_tensor`,
   the same torch calls on the same values.
3. The log-mel of each waveform window (`audio.log_mels`, the function the loader path uses).

On a GPU this is a few elementwise kernels and one FFT per batch; the CPU cores then only decode
(BENCHMARKS.md "Data rate"). On a CPU-only trainer it moves the same work from the loader workers to the
trainer's process, so `auto` keeps it in the loader there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from vaemo_dist.config import AudioInput, InputConfig, VideoInput
from vaemo_dist.data.audio import log_mels, normalise_log_mel

FINISH_MODES = ("auto", "loader", "device")
SITINGS = ("left", "center")
# (Kr, Kb) of the YUV -> RGB matrix by FFmpeg's AVColorSpace code (what `VideoFrame.colorspace` reads).
# Unspecified (2) and the 601 variants convert as BT.601, as swscale does; other matrices (BT.2020,
# SMPTE 240M, YCgCo...) are not converted here: such clips are finished by swscale in the loader.
MATRICES = {1: (0.2126, 0.0722), 2: (0.299, 0.114), 5: (0.299, 0.114), 6: (0.299, 0.114)}
RAW_PIXEL_FORMATS = {"yuv420p": False, "yuvj420p": True}  # format -> always full range


def resolve_finish(mode: str, decoder: str, cuda: bool) -> str:
    """`data.finish` for this run: auto means the device when it is a GPU fed by the PyAV decoder (DALI
    finishes on its own), else the loader."""
    if mode not in FINISH_MODES:
        raise ValueError(f"data.finish: unknown mode {mode!r}; choose one of {list(FINISH_MODES)}")
    if decoder != "pyav":  # DALI decodes and finishes in its own pipeline (on the GPU when there is one)
        return "loader"
    if mode == "auto":
        return "device" if cuda else "loader"
    return mode


@dataclass
class RawClip:
    """One sample as the loader hands it out with `data.finish: device`: decoded, not yet preprocessed.

    y: the window's T frames' luma planes, uint8 [H, W] each; u, v: their chroma planes, [H/2, W/2] each
    (per frame, so that frames shared by repeats are not copied before collating); colour: (Kr, Kb, full
    range 0/1, left-sited 0/1); crop: (top, left, side) of the square taken from the frame; wave:
    float32 [n] mono waveform window (the exact length the log-mel needs)."""

    y: list[torch.Tensor]
    u: list[torch.Tensor]
    v: list[torch.Tensor]
    colour: tuple[float, float, float, float]
    crop: tuple[int, int, int]
    wave: torch.Tensor

    def shape_key(self) -> tuple[int, ...]:
        """Clips with equal keys stack into one RawBatch."""
        return (len(self.y), *self.y[0].shape, self.wave.numel())


@dataclass
class RawBatch:
    """RawClips stacked: y [N, T, H, W], u/v [N, T, H/2, W/2], colour [N, 4], crops [N, 3] (long),
    wave [N, n]; `inputs` says what to make of them."""

    y: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    colour: torch.Tensor
    crops: torch.Tensor
    wave: torch.Tensor
    inputs: InputConfig

    @staticmethod
    def stack(clips: list[RawClip], inputs: InputConfig,
              stack: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack) -> RawBatch:
        n, t = len(clips), len(clips[0].y)

        def planes(name: str) -> torch.Tensor:  # every frame's plane copied once, into [N, T, h, w]
            frames = [p for c in clips for p in getattr(c, name)]
            return stack(frames).view(n, t, *frames[0].shape)

        return RawBatch(
            y=planes("y"), u=planes("u"), v=planes("v"),
            colour=torch.tensor([c.colour for c in clips], dtype=torch.float32),
            crops=torch.tensor([c.crop for c in clips], dtype=torch.long),
            wave=stack([c.wave for c in clips]), inputs=inputs)

    def __len__(self) -> int:
        return self.y.shape[0]

    def pin_memory(self) -> RawBatch:
        return RawBatch(self.y.pin_memory(), self.u.pin_memory(), self.v.pin_memory(), self.colour,
                        self.crops, self.wave.pin_memory(), self.inputs)


def stackable(clips: list[RawClip]) -> bool:
    """Whether these clips can share one RawBatch (equal frame, crop and waveform shapes)."""
    return len({c.shape_key() for c in clips}) == 1


def upsample_chroma(c: torch.Tensor, left: list[int]) -> torch.Tensor:
    """4:2:0 chroma [N, T, h, w] (float) -> [N, T, 2h, 2w], bilinear: rows always centre-sited (between
    two luma rows), columns centre-sited or, for the samples listed in `left`, co-sited with the even
    luma columns (the MPEG-2/H.264 default)."""
    n, t, h, w = c.shape
    out = F.interpolate(c, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)
    if left:
        idx = torch.tensor(left, device=c.device)
        rows = F.interpolate(c[idx], size=(2 * h, w), mode="bilinear", align_corners=False)
        cols = torch.empty(rows.shape[:-1] + (2 * w,), dtype=rows.dtype, device=rows.device)
        cols[..., 0::2] = rows
        nxt = torch.cat([rows[..., 1:], rows[..., -1:]], dim=-1)  # the edge column repeats
        cols[..., 1::2] = (rows + nxt) * 0.5
        out[idx] = cols
    return out


def yuv_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """uint8 planes y [N, T, H, W], u/v [N, T, H/2, W/2] and per-sample colour [N, 4] (Kr, Kb, full range,
    left-sited; on the CPU: it decides which samples take which path without a device sync) -> float32
    RGB [N, 3, T, H, W] holding whole numbers 0..255 (8-bit rounding, as the loader's swscale conversion
    gives)."""
    n = y.shape[0]
    left = [i for i, flag in enumerate(colour[:, 3].tolist()) if flag > 0.5]
    colour = colour.to(y.device, torch.float32)
    kr, kb, full, _ = (colour[:, i].view(n, 1, 1, 1) for i in range(4))
    kg = 1.0 - kr - kb
    luma = y.float()
    luma = torch.where(full > 0.5, luma, (luma - 16.0) * (255.0 / 219.0))
    kc = torch.where(full > 0.5, torch.ones_like(kr), torch.full_like(kr, 255.0 / 224.0))
    cb = upsample_chroma(u.float(), left) - 128.0
    cr = upsample_chroma(v.float(), left) - 128.0
    r = luma + (kc * 2.0 * (1.0 - kr)) * cr
    b = luma + (kc * 2.0 * (1.0 - kb)) * cb
    g = luma - (kc * 2.0 * kb * (1.0 - kb) / kg) * cb - (kc * 2.0 * kr * (1.0 - kr) / kg) * cr
    return torch.stack([r, g, b], dim=1).round_().clamp_(0.0, 255.0)


@lru_cache(maxsize=16)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(3, 1, 1, 1)
    return (1.0 / (255.0 * s)).float(), (-m / s).float()


def normalisation(cfg: VideoInput, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [3, 1, 1, 1] on `device` with (x / 255 - mean) / std == x * scale + shift: the one
    normalisation of both finish paths (`decode_pyav.video_tensor` and `crop_resize_normalise`)."""
    scale, shift = _normalisation(tuple(cfg.mean), tuple(cfg.std))
    return scale.to(device), shift.to(device)


def crop_resize_normalise(rgb: torch.Tensor, crops: torch.Tensor, cfg: VideoInput) -> torch.Tensor:
    """float RGB [N, 3, T, H, W] (0..255) -> the square `crops` [N, 3] (top, left, side) of each sample,
    resized to cfg.size (bilinear, antialiased when shrinking) and normalised: [N, 3, T, size, size].
    The operations of `decode_pyav.video_tensor`, batched over the samples whose squares share a side
    (every plane is resized on its own, so batching changes no value)."""
    n, _, t = rgb.shape[:3]
    boxes = crops.tolist()
    scale, shift = (t[None] for t in normalisation(cfg, rgb.device))
    out = torch.empty(n, 3, t, cfg.size, cfg.size, dtype=torch.float32, device=rgb.device)
    for side in sorted({b[2] for b in boxes}):  # one resize per crop size (one without crop jitter)
        idx = [i for i, b in enumerate(boxes) if b[2] == side]
        x = torch.stack([rgb[i, :, :, boxes[i][0] : boxes[i][0] + side, boxes[i][1] : boxes[i][1] + side]
                         for i in idx]).reshape(len(idx) * 3, t, side, side)
        if side != cfg.size:
            x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False,
                              antialias=side > cfg.size)
        x = x.reshape(len(idx), 3, t, cfg.size, cfg.size).mul_(scale).add_(shift)
        if len(idx) == n:
            return x
        out[idx] = x
    return out


def finish_audio(wave: torch.Tensor, cfg: AudioInput) -> torch.Tensor:
    """Waveform windows [N, n] -> normalised log-mel [N, 1, frames, n_mels] (`audio.log_mels`)."""
    return normalise_log_mel(log_mels(wave, cfg), cfg)


def finish(raw: RawBatch, device: torch.device | str = "cpu",
           dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(video [N, 3, T, S, S], audio [N, 1, F, M]) of a RawBatch, computed on `device` in float32 and
    cast to `dtype` (default float32) at the end."""
    y = raw.y.to(device, non_blocking=True)
    u = raw.u.to(device, non_blocking=True)
    v = raw.v.to(device, non_blocking=True)
    video = crop_resize_normalise(yuv_to_rgb(y, u, v, raw.colour), raw.crops, raw.inputs.video)
    audio = finish_audio(raw.wave.to(device, non_blocking=True), raw.inputs.audio)
    if dtype is not None:
        video, audio = video.to(dtype), audio.to(dtype)
    return video, audio
