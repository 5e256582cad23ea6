"""Batch decoding with NVIDIA DALI: video on the GPU (NVDEC), log-mel on the GPU, one pipeline per process.

The work is split in two, so that DataLoader workers stay cheap and the GPU does the heavy part:

1. `prepare_sample` (in a DataLoader worker, CPU): parse the json, probe both containers with PyAV
   without decoding (streams present, codec decodable by this DALI backend, packets counted against
   the frame count the json promises), and compute everything sample-specific exactly as
   `decode_pyav` does: the frame indices of the centred window (`sample_indices`, edge padding),
   the centre square crop, and where the audio window starts. A bad sample raises `DecodeError`
   (with the same kinds and `DecodeLimits` as the PyAV path: clip length from metadata before
   demuxing, the per-sample time limit) here, where it is counted and named like on the PyAV path.
   DALI itself cannot be trusted to refuse bad input: a truncated VP9 stream decodes to padded
   frames without an error.
2. `DaliDecoder.decode` (main process): one DALI pipeline fed through `external_source` with the
   bytes and the per-sample arguments; video decode (`mixed` on a GPU, `cpu` without one), on a GPU
   the chroma of left-sited clips moved from DALI's centre siting to left siting (`_left_site_chroma`),
   crop,
   antialiased bilinear resize (torch's rule at the border: `_resize_like_torch`), normalisation to
   [3, T, S, S]; audio decode (CPU; DALI has no GPU audio decoder), crop/zero-pad to the window,
   then on the GPU: spectrogram (nfft, window, hop of
   `audio.mel_spec_params`), Slaney mel filter bank, natural log with a floor, normalisation.
   If DALI raises anyway, the pipeline is dead: it is rebuilt and the batch retried one sample at
   a time, so only the culprit is lost (and then decoded by PyAV as a fallback, under the same
   limits; the failure's kind is PyAV's). The DALI run itself has no time limit: it is C++ that a
   signal handler cannot interrupt.

Without a GPU the same graph runs on DALI's CPU backend (`device_id=None`), which decodes VP9,
VP8 and MJPEG only: that is what the tests exercise, against the PyAV path.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import torch

from vaemo_dist.config import InputConfig
from vaemo_dist.data.audio import mel_spec_params
from vaemo_dist.data.decode_pyav import (
    AUDIO_FIELDS,
    MIN_DECODED_FRACTION,
    NO_LIMITS,
    VIDEO_FIELDS,
    _field,
    _optional_int,
    _read_json,
    decode_sample,
    guarded,
    media_seconds,
    open_container,
    sample_indices,
)
from vaemo_dist.data.types import DecodeError, DecodeLimits

log = logging.getLogger(__name__)

# What DALI's fn.decoders.video decodes, by backend (PyAV's canonical codec names).
CPU_VIDEO_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_VIDEO_CODECS = CPU_VIDEO_CODECS | {"h264", "hevc", "av1", "mpeg4"}
# What the PyAV fallback needs of a sample.
FALLBACK_FIELDS = (*VIDEO_FIELDS, *AUDIO_FIELDS, "json", "__key__")
# fn.decoders.audio: WAV (PCM), FLAC, Ogg Vorbis/Opus. No AAC.
AUDIO_CODECS = frozenset({"flac", "vorbis", "opus", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le",
                          "pcm_u8"})


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Prepared:
    """A validated sample on its way from a DataLoader worker to the DALI pipeline (picklable)."""

    key: str
    url: str
    video: bytes
    audio: bytes
    frame_indices: list[int]  # indices into the decoded stream, edge-padded
    crop: tuple[int, int, int]  # top, left, side of the centre square, in source pixels
    audio_start: int  # first sample of the audio window before clamping to the decoded length
    label: int
    meta: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # the sample's fields, for the PyAV fallback
    width: int = 0  # decoded frame width in pixels (the column parity of the chroma fix-up)
    left_sited: bool = False  # 4:2:0 chroma sited left (`chroma_siting`): DALI reads it as centre


def prepare_sample(sample: dict[str, Any], inputs: InputConfig, gpu: bool,
                   limits: DecodeLimits | None = None) -> Prepared:
    """Validate a WebDataset sample and compute its per-sample DALI arguments; raises DecodeError.

    `limits` (default: none) as for `decode_pyav.decode_sample`: clip length and probe time.
    """
    key = str(sample.get("__key__", "<no key>"))
    limits = limits or NO_LIMITS
    return guarded(key, limits, lambda: _prepare(key, sample, inputs, gpu, limits))


def _prepare(key: str, sample: dict[str, Any], inputs: InputConfig, gpu: bool,
             limits: DecodeLimits) -> Prepared:
    meta = _read_json(key, sample.get("json"))
    video = _field(key, sample, VIDEO_FIELDS, "video")
    audio = _field(key, sample, AUDIO_FIELDS, "audio")
    promised = _optional_int(key, meta, "frames")
    label = _optional_int(key, meta, "label")
    v, a = inputs.video, inputs.audio

    codec, width, height, fps, packets = _probe_video(key, video, promised, limits)
    allowed = GPU_VIDEO_CODECS if gpu else CPU_VIDEO_CODECS
    if codec not in allowed:
        where = "GPU" if gpu else "CPU (no GPU here)"
        raise DecodeError(key, f"video codec {codec} is not decodable by DALI on {where}; "
                               f"supported: {sorted(allowed)} (use data.decoder=pyav)", kind="codec")
    # The same frame count decode_pyav works from: json first, else what the stream holds.
    total = promised or packets
    if packets < MIN_DECODED_FRACTION * total:
        raise DecodeError(key, f"video truncated: {packets} frames in the stream but {total} were promised",
                          kind="truncated")
    indices = [min(i, packets - 1) for i in sample_indices(total, v.frames, v.stride)]

    rate, audio_codec, n_audio = _probe_audio(key, audio, limits)
    if rate != a.sample_rate:
        raise DecodeError(key, f"audio: sample rate {rate} Hz, expected {a.sample_rate} Hz "
                               "(resampling is not implemented yet)", kind="sample_rate")
    if audio_codec not in AUDIO_CODECS:
        raise DecodeError(key, f"audio codec {audio_codec} is not decodable by DALI; "
                               f"supported: {sorted(AUDIO_CODECS)}", kind="codec")
    duration = meta.get("duration")
    promised_audio = duration * rate if isinstance(duration, (int, float)) and duration > 0 else 0
    if n_audio < MIN_DECODED_FRACTION * promised_audio:
        raise DecodeError(key, f"audio truncated: {n_audio} samples but {promised_audio:.0f} were promised",
                          kind="truncated")

    side = min(width, height)
    centre_s = (indices[0] + indices[-1] + 1) / 2.0 / fps  # as decode_pyav: frame i spans [i, i+1)/fps
    window = mel_spec_params(a).num_samples
    return Prepared(
        key=key,
        url=str(sample.get("__url__", "?")),
        video=video,
        audio=audio,
        frame_indices=indices,
        crop=((height - side) // 2, (width - side) // 2, side),
        audio_start=int(round(centre_s * a.sample_rate - window / 2)),
        label=-1 if label is None else label,
        meta={"fps": fps, "frames": total, "duration": float(duration or total / fps),
              "frame_indices": indices, "codec": codec},
        raw={name: value for name, value in sample.items() if name in FALLBACK_FIELDS},
        width=width,
        left_sited=chroma_siting(meta, codec) == "left",
    )


def chroma_siting(meta: dict[str, Any], codec: str) -> str:
    """The 4:2:0 chroma siting of a clip: its json's `chroma_siting` (vaemo-shard records it), else
    the codec's default: left for H.264 (the standard's, and what stream-copied sources mostly are),
    centre for VP9 (every VP9 stream vaemo-shard and the synthetic corpus wrote came from swscale,
    which sites chroma at the centre)."""
    siting = meta.get("chroma_siting")
    if isinstance(siting, str) and siting in ("left", "center"):
        return siting
    return "left" if codec == "h264" else "center"


def _probe_video(key: str, data: bytes, promised: int | None,
                 limits: DecodeLimits) -> tuple[str, int, int, float, int]:
    """(codec, width, height, fps, frames in the stream), reading packets but decoding nothing."""
    with open_container(key, data, "video") as container:
        if not container.streams.video:
            raise DecodeError(key, "video: container has no video stream", kind="no_video")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        # Length from the json or the container before reading the packets, as decode_pyav does.
        seconds = media_seconds(container, stream, promised or stream.frames or None, fps)
        if seconds is not None:
            limits.check_length(key, seconds)
        max_packets, packets = limits.max_clip_s * fps, 0
        try:
            for p in container.demux(stream):
                if p.size:
                    packets += 1
                    if packets > max_packets:  # no length metadata: stop reading once too long
                        limits.check_length(key, packets / fps)
        except av.FFmpegError as e:
            raise DecodeError(key, f"video: unreadable stream ({type(e).__name__}: {e})",
                              kind="corrupt") from e
        codec = stream.codec.canonical_name
        width, height = ctx.width, ctx.height
    if packets == 0 or width <= 0 or height <= 0:
        raise DecodeError(key, "video: no decodable frames", kind="corrupt")
    if seconds is None:
        limits.check_length(key, packets / fps)
    return codec, width, height, fps, packets


def _probe_audio(key: str, data: bytes, limits: DecodeLimits) -> tuple[int, str, int]:
    """(sample rate, codec, samples in the stream) from the packets' durations."""
    with open_container(key, data, "audio") as container:
        if not container.streams.audio:
            raise DecodeError(key, "audio: container has no audio stream", kind="no_audio")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        seconds = media_seconds(container, stream, None, 0.0)
        if seconds is not None:  # only the upper bound: short audio is truncation (checked later)
            limits.check_length(key, seconds, "audio", minimum=False)
        try:
            ticks = sum(p.duration or 0 for p in container.demux(stream) if p.size)
        except av.FFmpegError as e:
            raise DecodeError(key, f"audio: unreadable stream ({type(e).__name__}: {e})",
                              kind="corrupt") from e
        codec = stream.codec.canonical_name
        samples = int(ticks * stream.time_base * rate) if stream.time_base else 0
    if samples <= 0:
        raise DecodeError(key, "audio: no decodable samples", kind="corrupt")
    limits.check_length(key, samples / rate, "audio", minimum=False)
    return rate, codec, samples


# --------------------------------------------------------------------------------------------
# The pipeline


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def resize_margin(side: int, size: int) -> int:
    """Zero margin (pixels) around a `side` square so that a resize to `size` never reaches past it:
    the antialiased kernel's radius is side/size source pixels when shrinking, 1 when enlarging."""
    return math.ceil(max(side / size, 1.0)) + 1


def _resize_like_torch(fn: Any, types: Any, frames: Any, crop: tuple[Any, Any], margin: tuple[Any, Any],
                       roi: tuple[Any, Any], size: int) -> Any:
    """[F, H, W, 3] uint8 -> the `crop` (start, shape) square resized to size x size, float.

    The same numbers as the PyAV path's `F.interpolate(bilinear, antialias when shrinking)`, border
    included (issue 18). Inside the image DALI's antialiased linear resize and torch's use the same
    triangle kernel, but at the border they differ: torch drops the kernel taps that fall outside the
    image and renormalises the rest, DALI does not (up to 17/255 apart on the outermost row/column
    of a textured clip, nothing on smooth ones). So the square is given a zero margin as wide as the
    kernel (`margin`, from `resize_margin`), resized as the roi inside it, and divided by the same
    resize of a mask that is 1 on the square and 0 on the margin: sum(w * x) / sum(w) over the taps
    inside the image, which is torch's rule (and, when enlarging, the same clamp to the edge pixel as
    torch's plain bilinear).
    """
    # Float output: no rounding to uint8 between resize and normalisation (as on the PyAV path).
    resize = lambda x: fn.resize(x, size=[size, size], roi_start=roi[0], roi_end=roi[1],  # noqa: E731
                                 roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True,
                                 dtype=types.FLOAT)
    square = fn.slice(frames, *crop, axes=[1, 2])  # cropped first: nothing outside it may leak in
    ones = fn.cast(square[0:1, :, :, 0:1], dtype=types.FLOAT) * 0.0 + 1.0  # [1, side, side, 1]
    padded = fn.slice(square, *margin, axes=[1, 2], out_of_bounds_policy="pad", fill_values=0)
    mask = fn.slice(ones, *margin, axes=[1, 2], out_of_bounds_policy="pad", fill_values=0)
    return resize(padded) / resize(mask)


# BT.601 luma weights: RGB = Y * (1, 1, 1) + (chroma terms), Y = LUMA . RGB.
LUMA_601 = (0.299, 0.587, 0.114)


def even_columns(width: int) -> np.ndarray:
    """[1, 1, width, 1] float: 1 on even columns, 0 on odd ones (input of `_left_site_chroma`)."""
    return (np.arange(width) % 2 == 0).astype(np.float32).reshape(1, 1, width, 1)


def _left_site_chroma(fn: Any, types: Any, dmath: Any, frames: Any, even: Any, amount: Any) -> Any:
    """[F, H, W, 3] uint8 RGB converted with centre-sited 4:2:0 chroma -> the same frames as if the
    chroma had been read left-sited (issue 18), uint8, for the samples whose `amount` is 1 (0: as
    decoded; both [1, 1, 1, 1] float per sample).

    DALI's video decoders (CPU: swscale; GPU: its NV12 kernel) upsample chroma bilinearly from the
    centre-sited position, column x sampling chroma at x/2 - 1/4, and have no option to change it;
    left siting samples at x/2. With c_k the chroma samples and C(x) what DALI interpolated,
    C(2k) - C(2k-1) = (c_k - c_{k-1}) / 2 and the left-sited value differs from C by a quarter of the
    step to the nearest chroma neighbour, so per column
        even x: C_left(x) = C(x) + (C(x) - C(x-1)) / 2,    odd x: C_left(x) = C(x) + (C(x+1) - C(x)) / 2
    (edge columns unchanged, as both sitings clamp there). Rows need nothing (both read chroma
    between rows). Chroma is linear in RGB: its part of a pixel is RGB - Y * (1, 1, 1) with BT.601
    luma weights, so the fix is applied to the horizontal RGB differences with their luma removed.
    Exact (to rounding) where DALI's RGB was not clipped to 0..255; where a saturated colour edge
    was clipped the chroma there is lost, and the result is off by up to a few tens of 1/255 at
    such edges (test_colour.py).
    """
    x = fn.cast(frames, dtype=types.FLOAT)
    step = np.array([[-1.0, 1.0]], dtype=np.float32)  # correlation along W (axis 2 of FHWC)
    back = fn.filter(x, step, anchor=[0, 1], border="clamp")  # C(x) - C(x-1)
    fwd = fn.filter(x, step, anchor=[0, 0], border="clamp")  # C(x+1) - C(x)
    d = fwd + even * (back - fwd)
    # Half the chroma part of d in one 3x3 matrix op: 0.5 * (I - (1, 1, 1)^T LUMA_601).
    chroma_half = 0.5 * (np.eye(3) - np.outer(np.ones(3), LUMA_601))
    out = x + amount * fn.coord_transform(d, M=chroma_half.astype(np.float32).reshape(-1).tolist(),
                                          dtype=types.FLOAT)
    # Round to uint8 as a decoder's RGB is (the PyAV path and the reference round after the conversion).
    return fn.cast(dmath.clamp(out, 0.0, 255.0), dtype=types.UINT8)


def _build_pipeline(inputs: InputConfig, max_batch: int, device_id: int | None, threads: int,
                    siting_fix: bool) -> Any:
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    from nvidia.dali.pipeline import Pipeline

    v, a = inputs.video, inputs.audio
    p = mel_spec_params(a)
    gpu = device_id is not None
    pipe = Pipeline(batch_size=max_batch, num_threads=threads, device_id=device_id,
                    prefetch_queue_depth=1, exec_dynamic=True)
    with pipe:
        video = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
        frames_idx = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        crop_start = fn.external_source(name="crop_start", dtype=types.INT32, ndim=1)  # [top, left]
        crop_shape = fn.external_source(name="crop_shape", dtype=types.INT32, ndim=1)  # [side, side]
        # The square with a zero margin of m pixels around it, and the square inside that (roi).
        margin_start = fn.external_source(name="margin_start", dtype=types.INT32, ndim=1)  # [-m, -m]
        margin_shape = fn.external_source(name="margin_shape", dtype=types.INT32, ndim=1)  # [side + 2m] * 2
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)  # [m, m]
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)  # [m + side] * 2
        if siting_fix:
            even = fn.external_source(name="even", dtype=types.FLOAT, ndim=4)  # even_columns(width)
            amount = fn.external_source(name="left_sited", dtype=types.FLOAT, ndim=4)  # [1, 1, 1, 1]
        audio = fn.external_source(name="audio", dtype=types.UINT8, ndim=1)
        audio_start = fn.external_source(name="audio_start", dtype=types.INT32, ndim=1)

        # Video: [T, H, W, 3] uint8 -> centre square -> S x S -> normalised float [3, T, S, S].
        frames = fn.decoders.video(video, device="mixed" if gpu else "cpu", frames=frames_idx,
                                   pad_mode="edge")
        if siting_fix:
            frames = _left_site_chroma(fn, types, dmath, frames, even.gpu() if gpu else even,
                                       amount.gpu() if gpu else amount)
        frames = _resize_like_torch(fn, types, frames, (crop_start, crop_shape),
                                    (margin_start, margin_shape), (roi_start, roi_end), v.size)
        out_video = fn.crop_mirror_normalize(
            frames, dtype=types.FLOAT, output_layout="CFHW",
            mean=[m * 255.0 for m in v.mean], std=[s * 255.0 for s in v.std])

        # Audio: the window of num_samples starting at audio_start, clamped into the decoded
        # waveform and zero-padded at the end, exactly like decode_pyav.audio_tensor.
        wave, _ = fn.decoders.audio(audio, downmix=True, dtype=types.FLOAT)
        room = dmath.max(wave.shape()[0] - p.num_samples, 0)
        start = fn.cast(dmath.min(dmath.max(audio_start, 0), room), dtype=types.INT32)
        wave = fn.slice(wave, start, np.array([p.num_samples], dtype=np.int32), axes=[0],
                        out_of_bounds_policy="pad")
        if gpu:
            wave = wave.gpu()
        spec = fn.spectrogram(wave, window_length=p.win_length, window_step=p.hop_length, nfft=p.n_fft,
                              center_windows=True, reflect_padding=True, power=2)
        mel = fn.mel_filter_bank(spec, sample_rate=p.sample_rate, nfilter=p.n_mels, freq_low=p.f_min,
                                 freq_high=p.f_max, mel_formula=p.mel_formula, normalize=p.mel_normalize)
        # ln(max(x, floor)) written as decibels with multiplier ln(10) against a fixed reference of 1.
        log_mel = fn.to_decibels(mel, multiplier=math.log(10.0), reference=1.0,
                                 cutoff_db=math.log(p.log_floor))
        log_mel = (log_mel - a.mean) * (1.0 / a.std)
        out_audio = fn.expand_dims(fn.transpose(log_mel, perm=[1, 0]), axes=[0])  # [1, frames, mels]
        pipe.set_outputs(out_video, out_audio)
    pipe.build()
    return pipe


@dataclass
class Decoded:
    """The clips of one batch that decoded, in input order, and the ones that did not."""

    video: torch.Tensor  # [n_ok, 3, T, S, S]
    audio: torch.Tensor  # [n_ok, 1, F, M]
    ok: list[int]  # positions in the input list
    failed: list[DecodeError]
    fallback: list[str] = field(default_factory=list)  # keys that DALI refused but PyAV decoded


class DaliDecoder:
    """Owns the DALI pipeline of this process and turns lists of `Prepared` into tensors."""

    def __init__(self, inputs: InputConfig, max_batch: int, device_id: int | None = None,
                 threads: int = 0, limits: DecodeLimits | None = None,
                 siting_fix: bool | None = None) -> None:
        self.inputs, self.max_batch, self.device_id = inputs, max_batch, device_id
        # Move left-sited clips' chroma to left siting (`_left_site_chroma`): default on a GPU, where
        # stream-copied H.264 is left-sited; the CPU backend decodes VP9 only, which vaemo-shard and the
        # synthetic corpus write centre-sited (what DALI assumes), so it skips the step (~1.85x the
        # decode time on CPU).
        self.siting_fix = device_id is not None if siting_fix is None else siting_fix
        self.limits = limits or NO_LIMITS  # for the PyAV fallback
        self.threads = threads or default_threads()
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.rebuilds = 0
        self._pipe: Any = None

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            self._pipe = _build_pipeline(self.inputs, self.max_batch, self.device_id, self.threads,
                                         self.siting_fix)
        return self._pipe

    def _rebuild(self) -> None:
        # After an error a DALI pipeline is "no longer valid": drop it, build a fresh one lazily.
        self._pipe = None
        self.rebuilds += 1

    def _run(self, items: list[Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipe = self.pipe
        i32 = lambda values: np.asarray(values, dtype=np.int32)  # noqa: E731
        pipe.feed_input("video", [np.frombuffer(it.video, dtype=np.uint8) for it in items])
        pipe.feed_input("frames", [i32(it.frame_indices) for it in items])
        pipe.feed_input("crop_start", [i32(it.crop[:2]) for it in items])
        pipe.feed_input("crop_shape", [i32([it.crop[2], it.crop[2]]) for it in items])
        # The zero margin around the square (see _resize_like_torch) and the square inside it.
        pads = [resize_margin(it.crop[2], self.inputs.video.size) for it in items]
        pipe.feed_input("margin_start", [i32([-m, -m]) for m in pads])
        pipe.feed_input("margin_shape", [i32([it.crop[2] + 2 * m] * 2) for it, m in zip(items, pads)])
        f32 = lambda values: np.asarray(values, dtype=np.float32)  # noqa: E731
        pipe.feed_input("roi_start", [f32([m, m]) for m in pads])
        pipe.feed_input("roi_end", [f32([m + it.crop[2]] * 2) for it, m in zip(items, pads)])
        if self.siting_fix:
            pipe.feed_input("even", [even_columns(it.width) for it in items])
            pipe.feed_input("left_sited", [np.full((1, 1, 1, 1), float(it.left_sited), np.float32)
                                           for it in items])
        pipe.feed_input("audio", [np.frombuffer(it.audio, dtype=np.uint8) for it in items])
        pipe.feed_input("audio_start", [i32([it.audio_start]) for it in items])
        out = []
        for tl in pipe.run():
            dense = tl.as_tensor()  # outputs are dense by construction: fixed frames, size, window
            target = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            feed_ndarray(dense, target, cuda_stream=stream)
            out.append(target)
        return out[0], out[1]

    def decode(self, items: list[Prepared]) -> Decoded:
        if len(items) > self.max_batch:
            raise ValueError(f"{len(items)} samples for a pipeline built for {self.max_batch}")
        if not items:
            return Decoded(self._empty_video(), self._empty_audio(), [], [])
        try:
            video, audio = self._run(items)
            return Decoded(video, audio, list(range(len(items))), [])
        except RuntimeError as e:
            log.warning("DALI failed on a batch of %d (%s); rebuilding the pipeline and retrying one "
                        "sample at a time", len(items), _first_line(e))
            self._rebuild()
        return self._decode_one_by_one(items)

    def _decode_one_by_one(self, items: list[Prepared]) -> Decoded:
        videos, audios, ok, failed, fallback = [], [], [], [], []
        for i, it in enumerate(items):
            try:
                v, a = self._run([it])
            except RuntimeError as e:
                self._rebuild()
                reason = _first_line(e)
                try:  # DALI refused what the probe passed: let the CPU decoder have a go
                    clip = decode_sample(it.raw, self.inputs, self.limits)
                except DecodeError as pe:
                    # PyAV's verdict says what is wrong with the media; DALI's message rarely does.
                    failed.append(DecodeError(it.key, f"DALI: {reason}; PyAV: {pe.reason}", kind=pe.kind))
                    continue
                v, a = clip.video[None].to(self.device), clip.audio[None].to(self.device)
                fallback.append(it.key)
                log.warning("clip %s from %s: DALI failed (%s), decoded with PyAV instead", it.key, it.url,
                            reason)
            videos.append(v)
            audios.append(a)
            ok.append(i)
        if not ok:
            return Decoded(self._empty_video(), self._empty_audio(), [], failed, fallback)
        return Decoded(torch.cat(videos), torch.cat(audios), ok, failed, fallback)

    def _empty_video(self) -> torch.Tensor:
        v = self.inputs.video
        return torch.empty((0, 3, v.frames, v.size, v.size), device=self.device)

    def _empty_audio(self) -> torch.Tensor:
        a = self.inputs.audio
        return torch.empty((0, 1, a.frames, a.n_mels), device=self.device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
