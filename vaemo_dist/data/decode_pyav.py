"""CPU decoding of one WebDataset sample (video + audio + json) into a `Clip`, with PyAV.

Video: `inputs.video.frames` frames `inputs.video.stride` apart, the window centred in the clip
(deterministic); frames past the end repeat the last frame. Each frame is centre-cropped to a
square and resized with torch's bilinear interpolation (antialias on, which matters when
shrinking), then scaled to [0, 1] and normalised with `inputs.video.mean/std`.

Audio: decoded to float32, channels averaged to mono, and the `log_mel` window (the number of
samples that gives `inputs.audio.frames` frames) is centred on the sampled video window so the
two modalities cover the same moment.

Every failure comes out as `DecodeError(key, reason)`, so the loader can skip and count it.
"""

from __future__ import annotations

import io
import json
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F

from vaemo_dist.config import AudioInput, InputConfig, VideoInput
from vaemo_dist.data.audio import fit_length, log_mel, mel_spec_params, normalise_log_mel
from vaemo_dist.data.types import Clip, DecodeError

VIDEO_FIELDS = ("mp4", "webm", "mkv", "mov", "avi")
AUDIO_FIELDS = ("flac", "wav")
# A clip that decodes to fewer than this fraction of the frames (or audio samples) its json
# promises is treated as truncated rather than edge-padded.
MIN_DECODED_FRACTION = 0.9
# Decoder threads pay off only for larger frames: at 128x128 "AUTO" measured ~25% slower than one
# thread (and DataLoader workers already use the cores).
THREADED_DECODE_PIXELS = 320 * 240
# YUV -> RGB with chroma interpolated to full resolution and exact rounding: swscale's default
# skips the chroma interpolation (~2/255 mean error at colour edges). With these flags PyAV gives
# the same pixels as DALI's decoder (measured: identical on VP9 test clips) for ~5% more decode time.
_SWS = av.video.reformatter.Interpolation
RGB_CONVERSION = _SWS.BILINEAR | _SWS.FULL_CHR_H_INT | _SWS.ACCURATE_RND


def decode_sample(sample: dict[str, Any], inputs: InputConfig) -> Clip:
    """Decode a WebDataset sample dict into a Clip; raises only DecodeError on bad input."""
    key = str(sample.get("__key__", "<no key>"))
    try:
        return _decode(key, sample, inputs)
    except DecodeError:
        raise
    except Exception as e:  # anything FFmpeg, numpy or torch raise means "this sample is bad"
        raise DecodeError(key, f"undecodable sample ({type(e).__name__}: {e})") from e


def sample_indices(total: int, frames: int, stride: int) -> list[int]:
    """Frame indices of a window of `frames` frames `stride` apart, centred in `total` frames.

    Indices past the end are clamped to the last frame (edge padding for short clips).
    """
    span = (frames - 1) * stride + 1
    start = max(0, (total - span) // 2)
    return [min(start + i * stride, total - 1) for i in range(frames)]


def _decode(key: str, sample: dict[str, Any], inputs: InputConfig) -> Clip:
    meta = _read_json(key, sample.get("json"))
    video_data = _field(key, sample, VIDEO_FIELDS, "video")
    audio_data = _field(key, sample, AUDIO_FIELDS, "audio")
    promised = _optional_int(key, meta, "frames")
    label = _optional_int(key, meta, "label")

    frames, indices, fps, total = _decode_video(key, video_data, inputs.video, promised)
    video = _video_tensor(frames, inputs.video)

    duration = float(meta.get("duration") or total / fps)
    # Centre of the sampled video window, in seconds (frame i spans [i, i + 1) / fps).
    centre_s = (indices[0] + indices[-1] + 1) / 2.0 / fps
    wave = _decode_audio(key, audio_data, inputs.audio, meta.get("duration"))
    audio = _audio_tensor(wave, inputs.audio, centre_s)

    return Clip(
        key=key,
        video=video,
        audio=audio,
        label=-1 if label is None else label,
        meta={"fps": fps, "frames": total, "duration": duration, "frame_indices": indices},
    )


# --------------------------------------------------------------------------------------------
# Fields and json


def _field(key: str, sample: dict[str, Any], names: tuple[str, ...], what: str) -> bytes:
    for name in names:
        if name in sample and sample[name] is not None:
            data = sample[name]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise DecodeError(key, f"{what} field '{name}' holds {type(data).__name__}, not bytes")
            if len(data) == 0:
                raise DecodeError(key, f"{what} field '{name}' is empty (zero-length)")
            return bytes(data)
    raise DecodeError(key, f"no {what} (expected one of the fields {', '.join(names)})")


def _read_json(key: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):  # already decoded upstream
        return raw
    try:
        meta = json.loads(bytes(raw).decode("utf-8") if not isinstance(raw, str) else raw)
    except (ValueError, TypeError) as e:
        raise DecodeError(key, f"unparsable json ({e})") from e
    if not isinstance(meta, dict):
        raise DecodeError(key, f"json is a {type(meta).__name__}, expected an object")
    return meta


def _optional_int(key: str, meta: dict[str, Any], name: str) -> int | None:
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DecodeError(key, f"json '{name}' should be an integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Video


def _decode_video(key: str, data: bytes, cfg: VideoInput,
                  promised: int | None) -> tuple[list[np.ndarray], list[int], float, int]:
    """Decode just the frames the window needs. Returns (rgb frames, indices, fps, total frames)."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(key, f"video: cannot open container ({type(e).__name__}: {e})") from e
    with container:
        if not container.streams.video:
            raise DecodeError(key, "video: container has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height >= THREADED_DECODE_PIXELS:
            stream.thread_type = "AUTO"  # frame + slice threads where the codec supports them
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        # Frame count: json first (cheap and the contract), then the container's index.
        total = promised or stream.frames or None
        indices = sample_indices(total, cfg.frames, cfg.stride) if total else None
        wanted = set(indices) if indices else None
        last_needed = max(indices) if indices else None

        kept: dict[int, np.ndarray] = {}
        last_frame: av.VideoFrame | None = None
        decoded = 0
        try:
            for frame in container.decode(stream):
                if wanted is None or decoded in wanted:
                    kept[decoded] = frame.to_ndarray(format="rgb24", interpolation=RGB_CONVERSION)
                last_frame = frame
                decoded += 1
                if last_needed is not None and decoded > last_needed:
                    break  # nothing after the window is needed
        except av.FFmpegError as e:
            if decoded == 0:
                raise DecodeError(key, f"video: decoding failed ({type(e).__name__}: {e})") from e
            # A broken packet mid-stream: keep what decoded, the truncation check below decides.

    if decoded == 0 or last_frame is None:
        raise DecodeError(key, "video: no decodable frames")
    if indices is None:  # no frame count anywhere: the whole stream was decoded
        total = decoded
        indices = sample_indices(total, cfg.frames, cfg.stride)
    elif decoded <= max(indices):
        # The stream ended before the window did: fine if roughly as long as promised.
        if decoded < MIN_DECODED_FRACTION * total:
            raise DecodeError(
                key, f"video truncated: decoded {decoded} frames but {total} were promised"
            )
        kept.setdefault(decoded - 1, last_frame.to_ndarray(format="rgb24", interpolation=RGB_CONVERSION))
        indices = [min(i, decoded - 1) for i in indices]
    assert total is not None
    return [kept[i] for i in indices], indices, fps, total


def _video_tensor(frames: list[np.ndarray], cfg: VideoInput) -> torch.Tensor:
    """uint8 RGB frames -> float32 [3, T, size, size], centre square crop, resized, normalised."""
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    # Cropping the square first then resizing equals "short side to size, then centre crop",
    # and resizes fewer pixels.
    x = x[:, :, top : top + side, left : left + side]
    if side != cfg.size:
        # Antialiasing only changes the result when shrinking, and costs ~3x when enlarging.
        x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False,
                          antialias=side > cfg.size)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    return x.permute(1, 0, 2, 3).contiguous()


# --------------------------------------------------------------------------------------------
# Audio


def _decode_audio(key: str, data: bytes, cfg: AudioInput, duration: Any) -> np.ndarray:
    """Whole audio stream as float32 mono at cfg.sample_rate."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(key, f"audio: cannot open container ({type(e).__name__}: {e})") from e
    chunks: list[np.ndarray] = []
    with container:
        if not container.streams.audio:
            raise DecodeError(key, "audio: container has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        if rate != cfg.sample_rate:
            raise DecodeError(
                key, f"audio: sample rate {rate} Hz, expected {cfg.sample_rate} Hz "
                "(resampling is not implemented yet)"
            )
        to_float: av.AudioResampler | None = None  # for sample formats _float_planes does not know
        try:
            for frame in container.decode(stream):
                planes = _float_planes(frame)
                if planes is not None:
                    chunks.append(planes)
                    continue
                to_float = to_float or av.AudioResampler(format="fltp")  # same layout and rate
                chunks.extend(f.to_ndarray() for f in to_float.resample(frame))
            if to_float is not None:
                chunks.extend(f.to_ndarray() for f in to_float.resample(None))
        except av.FFmpegError as e:
            if not chunks:
                raise DecodeError(key, f"audio: decoding failed ({type(e).__name__}: {e})") from e
    if not chunks:
        raise DecodeError(key, "audio: no decodable samples")
    wave = np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32)  # [channels, n] -> mono
    if wave.size == 0:
        raise DecodeError(key, "audio: no decodable samples")
    if isinstance(duration, (int, float)) and duration > 0:
        expected = duration * cfg.sample_rate
        if wave.size < MIN_DECODED_FRACTION * expected:
            raise DecodeError(
                key, f"audio truncated: decoded {wave.size} samples but {expected:.0f} were promised"
            )
    return wave


_INT_SCALE = {"s16": 1.0 / 32768.0, "s32": 1.0 / 2147483648.0}


def _float_planes(frame: av.AudioFrame) -> np.ndarray | None:
    """Samples as float32 [channels, n] for the common formats (faster than a resampler)."""
    fmt = frame.format.name
    base = fmt.rstrip("p")
    if base not in ("s16", "s32", "flt", "dbl"):
        return None
    data = frame.to_ndarray()  # planar: [channels, n]; packed: [1, n * channels]
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    data = data.astype(np.float32)
    if base in _INT_SCALE:
        data *= _INT_SCALE[base]
    return data


def _audio_tensor(wave: np.ndarray, cfg: AudioInput, centre_s: float) -> torch.Tensor:
    """Normalised log-mel [1, frames, n_mels] of the window centred at `centre_s` seconds."""
    n = mel_spec_params(cfg).num_samples
    offset = int(round(centre_s * cfg.sample_rate - n / 2))
    offset = min(max(offset, 0), max(wave.size - n, 0))
    piece = fit_length(torch.from_numpy(wave), n, offset)
    return normalise_log_mel(log_mel(piece, cfg), cfg)
