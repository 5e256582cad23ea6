"""Clip media -> what a multimodal chat model takes: a few JPEG/PNG frames and a WAV/FLAC audio clip."""

from __future__ import annotations

import base64
import io
from fractions import Fraction
from typing import Any

import av
import numpy as np

from vaemo_dist.data.media import ANY_AUDIO_FIELDS, VIDEO_FIELDS

VIDEO_EXTS = VIDEO_FIELDS  # the sample fields a clip's video or audio is read from (data/media.py)
AUDIO_EXTS = ANY_AUDIO_FIELDS
IMAGE_CODECS = {"jpeg": ("mjpeg", "yuvj420p", "image/jpeg"), "png": ("png", "rgb24", "image/png")}
FF_QP2LAMBDA = 118  # FFmpeg's quantiser -> lambda factor (what `-q:v N` sets)


class MediaError(ValueError):
    """A sample whose media cannot be turned into request content (recorded as failed)."""


def find_field(sample: dict[str, Any], exts: tuple[str, ...]) -> tuple[str, bytes] | None:
    for ext in exts:
        data = sample.get(ext)
        if isinstance(data, (bytes, bytearray)) and data:
            return ext, bytes(data)
    return None


def _even_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def encode_image(frame: av.VideoFrame, fmt: str = "jpeg") -> bytes:
    """One decoded frame as a JPEG or PNG file (PyAV's encoders: no imaging library needed)."""
    codec, pix_fmt, _ = IMAGE_CODECS[fmt]
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = frame.width, frame.height, pix_fmt
    ctx.time_base = Fraction(1, 25)
    if fmt == "jpeg":  # fixed quality (like -q:v 4) rather than the encoder's low default bitrate
        ctx.qscale = True
        ctx.global_quality = 4 * FF_QP2LAMBDA
    packets = ctx.encode(frame.reformat(format=pix_fmt)) + ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


def sample_frames(video: bytes, n: int, max_side: int = 448, fmt: str = "jpeg") -> tuple[list[bytes], float]:
    """`n` frames at the centres of n equal time segments, scaled to at most `max_side` pixels.

    Returns (encoded images, clip duration in seconds)."""
    try:
        with av.open(io.BytesIO(video)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            rate = float(stream.average_rate or 25)
            frames: list[av.VideoFrame] = []
            for frame in container.decode(stream):
                w, h = _even_size(frame.width, frame.height, max_side)
                frames.append(frame.reformat(width=w, height=h, format="rgb24"))  # small copies only
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise MediaError(f"video cannot be decoded: {e}") from e
    if not frames:
        raise MediaError("video has no frames")
    picks = ((np.arange(n) + 0.5) * len(frames) / n).astype(int)
    return [encode_image(frames[i], fmt) for i in picks], len(frames) / rate


def audio_clip(audio: bytes, fmt: str = "wav", max_seconds: float = 30.0) -> bytes:
    """The audio as mono 16 kHz 16-bit WAV (what OpenAI-style `input_audio` expects), or FLAC."""
    try:
        with av.open(io.BytesIO(audio)) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise MediaError(f"audio cannot be decoded: {e}") from e
    if not chunks:
        raise MediaError("audio has no samples")
    pcm = np.concatenate(chunks)[: int(max_seconds * 16000)]
    return _encode_pcm(pcm, fmt)


def _encode_pcm(pcm: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream("flac" if fmt == "flac" else "pcm_s16le", rate=16000)
        stream.layout, stream.format = "mono", "s16"
        frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def image_part(data: bytes, fmt: str) -> dict[str, Any]:
    mime = IMAGE_CODECS[fmt][2]
    return {"type": "image_url",
            "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def audio_part(data: bytes, fmt: str) -> dict[str, Any]:
    # OpenAI's chat API (and vLLM's) takes raw base64 plus a format name, not a data URL.
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}
