"""Decoding media files (not shard samples) with the training preprocessing.

`decode_media` gives a clip's model inputs from its files exactly as vaemo_dist/data/decode_pyav.py
does from a shard sample: the centred window of `inputs.video.frames` frames, centre crop + resize +
normalise, and the log-mel window centred on that video window. Audio comes from a sibling
`<stem>.flac` / `<stem>.wav` when there is one (the layout of our shards; data/media.py), else from
the file's own audio track (AAC in an mp4, say). Audio at another sample rate is resampled with
FFmpeg's resampler (libswresample) to `inputs.audio.sample_rate`; the training data path itself never
resamples. Used by the embedding API (vaemo_dist/pretrained.py), the sources of evaluation
(data/sources.py) and fine-tuning's training clips.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vaemo_dist.data.media import audio_source, sidecar_meta

if TYPE_CHECKING:
    import torch

PathLike = str | Path


def decode_audio(key: str, data: bytes, cfg: Any, duration: Any = None) -> np.ndarray:
    """Mono float32 waveform at cfg.sample_rate. At that rate this is exactly the training decoder;
    at any other rate the stream is resampled by libswresample, then channels are averaged."""
    import av

    from vaemo_dist.data.decode_pyav import decode_audio_wave
    from vaemo_dist.data.types import DecodeError

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise DecodeError(key, "audio: no audio stream (and no sibling .flac/.wav)")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            if rate == cfg.sample_rate:
                return decode_audio_wave(key, data, cfg, duration)
            # Keep the channel layout through the resampler; average to mono afterwards, as training does.
            resampler = av.AudioResampler(format="fltp", rate=cfg.sample_rate)
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray() for f in resampler.resample(None)]
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(key, f"audio: decoding failed ({type(e).__name__}: {e})") from e
    if not chunks:
        raise DecodeError(key, "audio: no decodable samples")
    wave = np.concatenate(chunks, axis=1).astype(np.float32).mean(axis=0, dtype=np.float32)
    if wave.size == 0:
        raise DecodeError(key, "audio: no decodable samples")
    return wave


def decode_media(video: PathLike | None, audio: PathLike | None, inputs: Any) -> tuple[torch.Tensor | None,
                                                                                      torch.Tensor | None]:
    """Decode one clip's files into model inputs: video [3, T, H, W] and audio [1, F, M], normalised.

    `audio` may be the video file itself (its sibling .flac/.wav or own track is used). With both, the
    audio window is centred on the sampled video window, as in training; audio alone is centred in
    the recording. Raises DecodeError (vaemo_dist.data.types) for media it cannot use.
    """
    from vaemo_dist.data.decode_pyav import audio_tensor, decode_video_frames, video_tensor
    from vaemo_dist.data.types import DecodeError

    if video is None and audio is None:
        raise ValueError("decode_media needs a video file, an audio file or both")
    video_t = audio_t = None
    centre_s: float | None = None
    if video is not None:
        path = Path(video)
        meta = sidecar_meta(path)
        promised = meta.get("frames") if isinstance(meta.get("frames"), int) else None
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DecodeError(str(path), f"cannot read ({e})") from e
        frames, indices, fps, _ = decode_video_frames(str(path), data, inputs.video, promised)
        video_t = video_tensor(frames, inputs.video)
        centre_s = (indices[0] + indices[-1] + 1) / 2.0 / fps  # as vaemo_dist.data.decode_pyav does
    if audio is not None:
        path = audio_source(audio)
        meta = sidecar_meta(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DecodeError(str(path), f"cannot read ({e})") from e
        wave = decode_audio(str(path), data, inputs.audio, meta.get("duration"))
        if centre_s is None:
            centre_s = wave.size / inputs.audio.sample_rate / 2.0
        audio_t = audio_tensor(wave, inputs.audio, centre_s)
    return video_t, audio_t
