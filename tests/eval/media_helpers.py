"""Test media the corpus does not have: a video with its own AAC track, WAV at any sample rate."""

from __future__ import annotations

import io

import av
import numpy as np

from vaemo_dist.data.synth import FPS, SAMPLE_RATE, synth_audio, synth_video


def voice(label: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A synthetic voice (class-dependent pitch) at 16 kHz."""
    wave, _ = synth_audio(label, 4, int(seconds * SAMPLE_RATE), np.random.default_rng(seed))
    return wave


def resample_linear(wave: np.ndarray, rate: int) -> np.ndarray:
    """Plain interpolation to `rate` (upsampling a 16 kHz signal, so nothing aliases)."""
    t = np.arange(int(len(wave) * rate / SAMPLE_RATE)) / rate
    return np.interp(t, np.arange(len(wave)) / SAMPLE_RATE, wave).astype(np.float32)


def wav_bytes(wave: np.ndarray, rate: int) -> bytes:
    pcm = np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)[None]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate)
        stream.layout, stream.format = "mono", "s16"
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def mp4_with_aac(label: int = 1, frames: int = 80, size: int = 64, rate: int = 44100) -> bytes:
    """H.264 video + a stereo AAC track at `rate` in one mp4, as a phone or camera would write."""
    rng = np.random.default_rng(label)
    video = synth_video(label, 4, frames, size, np.zeros(frames), rng)
    audio = resample_linear(voice(label, frames / FPS), rate)
    stereo = np.ascontiguousarray(np.stack([audio, audio]))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        aus = out.add_stream("aac", rate=rate)
        aus.layout = "stereo"
        for rgb in video:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(vs.encode())
        for i in range(0, stereo.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, i:i + 1024]), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts = rate, i
            out.mux(aus.encode(frame))
        out.mux(aus.encode())
    return buf.getvalue()
