"""A synthetic audio-visual corpus of real encoded media, written as WebDataset tar shards.

Each clip shows a cartoon face (ellipse head, two eyes, a mouth) on a tinted background while a
voiced tone "speaks" in syllables. A hidden class drives both modalities:

* video: face and background colour tint, head motion speed and amplitude;
* audio: pitch (fundamental frequency) and syllable rate;
* both: the mouth opening follows the audio's amplitude envelope frame by frame, so the two
  streams are synchronised.

With `cues="dynamics"` the class drives only the temporal part (syllable rate, which the mouth
follows, and head-motion speed); tint, pitch and motion amplitude become per-clip draws over the
same ranges, independent of the class and of each other, so colour and spectrum averages no longer
give the class away.

Per-clip nuisance randomness (head position, motion and rhythm phase, colour jitter, gradient
direction, pitch and rate jitter, pixel and audio noise) keeps clips of one class different.
Everything is drawn from `numpy.random.SeedSequence([cfg.seed, clip_index])`, so a clip depends
only on the corpus seed and its index (not on sharding or worker count).

Layout of `out_dir`: `shard-000000.tar ...`, `manifest.json`, and `_SUCCESS`, written last; a
corpus without `_SUCCESS` (or built from a different config) is never used by `ensure_corpus`.
The folder is claimed first (`.vaemo-owner.json`, fsutil.claim_output_dir): the builder never writes
into a non-empty folder that is not a synthetic corpus (`vaemo-synth --overwrite` moves one aside).
Each sample: `<key>.mp4` (H.264, yuv420p) or `<key>.webm` (VP9), `<key>.flac` (16 kHz mono),
`<key>.json` (frames, fps, duration, sample_rate, label, class_name, seed; keyint where set).
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from vaemo_dist.config import SynthConfig
from vaemo_dist.data.shards import ShardWriter
from vaemo_dist.fsutil import FolderInUseError, claim_output_dir, folder_lock, write_atomic
from vaemo_dist.startup import entry_point, fail

FPS = 25
SAMPLE_RATE = 16000
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
FORMAT_VERSION = 1
# SynthConfig fields added after FORMAT_VERSION 1, with the value that reproduces the older corpora.
# At that value a field is left out of the config record, so corpora built before it existed stay
# complete (not rebuilt), and their manifests stay byte-identical.
_LATER_FIELDS = {"cues": "all", "keyint": 0}
CUES = ("all", "dynamics")
BITEXACT = {"fflags": "+bitexact"}
# Colour tags every video stream we write carries (issue 18): BT.601 matrix, limited ("tv") range and
# centre-sited 4:2:0 chroma. Centre is what swscale makes when it converts to yuv420p (PyAV's reformat,
# FFmpeg's scale filter; tests/data/test_colour.py measures it against the source pixels), and what
# DALI's decoders assume (they have no siting option and read no tag), so the tag states the truth and
# every decode path reads our streams alike. Without a tag a WebM records no siting, an H.264 stream
# means left (the MPEG-2/H.264 default), and decoders guess: a half-pixel chroma shift, fringes at colour
# edges (mean ~4/255, max ~76/255 on colour bars).
COLOUR_TAGS = {"color_range": av.video.reformatter.ColorRange.MPEG,
               "colorspace": av.video.reformatter.Colorspace.ITU601}
CHROMA_SITING = "center"  # recorded in the container: H.264 VUI chroma_loc_type 1, Matroska ChromaSiting


def tag_colour(stream: av.video.stream.VideoStream) -> None:
    """Record colour range, matrix and chroma siting on an output video stream (before encoding)."""
    ctx = stream.codec_context
    for name, value in COLOUR_TAGS.items():
        setattr(ctx, name, value)
    # An AVCodecContext option: PyAV has no attribute for it.
    stream.options = {**dict(stream.options or {}), "chroma_sample_location": CHROMA_SITING}


def to_yuv420(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """A frame of any format and size -> what every writer here encodes: yuv420p at `width` x `height`
    (area resampling), BT.601 limited range, chroma centre-sited (swscale's conversion; tag_colour
    records it). The one conversion point of the synthetic corpus and vaemo-shard."""
    return frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA",
                          dst_colorspace=COLOUR_TAGS["colorspace"],
                          dst_color_range=COLOUR_TAGS["color_range"])


WRITER = "synthetic corpus"  # the owner recorded in the folder (fsutil.claim_output_dir)
CLASS_NAMES = ["neutral", "happy", "sad", "angry", "fearful", "surprised", "disgusted", "calm"]


def class_name(label: int) -> str:
    return CLASS_NAMES[label] if label < len(CLASS_NAMES) else f"class-{label}"


def clip_key(index: int) -> str:
    return f"clip-{index:06d}"


def video_extension(codec: str) -> str:
    if codec not in ("h264", "vp9"):
        raise ValueError(f"codec {codec!r} not supported; choose 'h264' or 'vp9'")
    return "mp4" if codec == "h264" else "webm"


# --------------------------------------------------------------------------------------------
# Encoding helpers (also used by tests to build hand-made samples)


def encode_video(frames: np.ndarray, fps: int = FPS, codec: str = "h264",
                 quality: int | None = None, keyint: int = 0) -> bytes:
    """Encode uint8 RGB frames [T, H, W, 3] (H, W even) as H.264/mp4 or VP9/webm, yuv420p.

    `quality` is the codec's CRF (lower is better); the defaults favour speed and small files.
    `keyint` > 0 is the longest GOP in frames (the encoders' `g`: a keyframe at least every `keyint`
    frames, 1 = all intra); 0 keeps the encoder's default (x264: 250) and gives the same bytes as before.
    """
    if keyint < 0:
        raise ValueError(f"keyint must be >= 0 (0: the encoder's default), got {keyint}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sides, got {height}x{width}")
    ext = video_extension(codec)
    buf = io.BytesIO()
    # bitexact: no random container ids (Matroska) or version strings, so bytes are reproducible.
    with av.open(buf, mode="w", format=ext, options=BITEXACT) as out:
        if codec == "h264":
            stream = out.add_stream("libx264", rate=fps)
            # mbtree off: with it, x264 (veryfast) gave different bytes for identical input from
            # run to run on small frames; without it the output is reproducible.
            stream.options = {"preset": "veryfast", "crf": str(23 if quality is None else quality),
                              "x264-params": "mbtree=0"}
        else:
            stream = out.add_stream("libvpx-vp9", rate=fps)
            # Real-time mode: ~10x faster than the default "good" deadline at this size.
            stream.options = {"deadline": "realtime", "cpu-used": "8", "b": "0",
                              "crf": str(32 if quality is None else quality)}
        if keyint:
            stream.options = {**dict(stream.options), "g": str(keyint)}
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        tag_colour(stream)
        # One encoder thread: clips are tiny, parallelism comes from worker processes, and a
        # single thread keeps the bitstream reproducible.
        stream.codec_context.thread_count = 1
        for rgb in frames:
            out.mux(stream.encode(to_yuv420(av.VideoFrame.from_ndarray(rgb, format="rgb24"), width, height)))
        out.mux(stream.encode())
    return buf.getvalue()


def encode_audio(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, fmt: str = "flac") -> bytes:
    """Encode a mono float waveform in [-1, 1] as 16-bit FLAC or WAV."""
    if fmt not in ("flac", "wav"):
        raise ValueError(f"audio format {fmt!r} not supported; choose 'flac' or 'wav'")
    pcm = np.round(np.clip(waveform, -1.0, 1.0) * 32767.0).astype(np.int16)[None]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt, options=BITEXACT) as out:
        stream = out.add_stream("flac" if fmt == "flac" else "pcm_s16le", rate=sample_rate)
        stream.layout = "mono"
        stream.format = "s16"
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = sample_rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def write_media_file(path: str | Path, *, seconds: float = 2.0, fps: float = 25, width: int = 64,
                     height: int = 48, video: str | None = "libx264", audio: str | None = "aac",
                     audio_rate: int = 44100, channels: int = 2, container: str | None = None,
                     seed: int = 0) -> Path:
    """An ordinary media file as a camera or editor writes it (default: H.264 + stereo AAC in mp4):
    drifting colours with a moving bar, and a tone. `video` or `audio` None leaves that track out.
    For the shard writer's tests and trials."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    with av.open(str(path), "w", format=container) as out:
        vstream = astream = None
        if video:
            vstream = out.add_stream(video, rate=Fraction(fps).limit_denominator(1001))
            vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
            vstream.codec_context.thread_count = 1
            if video == "libvpx-vp9":
                vstream.options = {"deadline": "realtime", "cpu-used": "8"}
        if audio:
            astream = out.add_stream(audio, rate=audio_rate)
            astream.layout = "stereo" if channels == 2 else "mono"
        if vstream is not None:
            for i in range(int(round(seconds * fps))):
                img = np.empty((height, width, 3), dtype=np.uint8)
                img[:] = (base + 3 * i) % 255
                img[:, (2 * i) % width :, 1] = 200
                out.mux(vstream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            out.mux(vstream.encode())
        if astream is not None:
            n = int(seconds * audio_rate)
            wave = (0.3 * np.sin(2 * np.pi * 330 * np.arange(n) / audio_rate)).astype(np.float32)
            planes = np.repeat(wave[None], channels, axis=0)
            for start in range(0, n, 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, start : start + 1024]),
                                                   format="fltp", layout=astream.layout.name)
                frame.sample_rate, frame.pts = audio_rate, start
                out.mux(astream.encode(frame))
            out.mux(astream.encode())
    return Path(path)


# --------------------------------------------------------------------------------------------
# Clip content


def _class_position(label: int, classes: int) -> float:
    """The class as a number in [0, 1], the knob every class-driven factor turns."""
    return label / max(classes - 1, 1)


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255.0


def synth_audio(label: int, classes: int, n_samples: int, rng: np.random.Generator,
                cues: str = "all") -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """A voiced tone in syllables. Returns (waveform float32 [n], envelope function of time).
    `cues`: as `SynthConfig.cues` ("dynamics": the pitch is a per-clip draw, not the class's)."""
    k = _class_position(label, classes)
    if cues == "all":
        f0 = 110.0 * 2.0**k * (1.0 + rng.uniform(-0.04, 0.04))  # 110..220 Hz
    else:  # the same 110..220 Hz range, log-uniform per clip: a nuisance, not a cue
        f0 = 110.0 * 2.0 ** rng.uniform(0.0, 1.0)
    rate = (1.5 + 3.0 * k) * (1.0 + rng.uniform(-0.08, 0.08))  # syllables per second
    rhythm_phase = rng.uniform(0.0, 2.0 * np.pi)
    vibrato_hz, vibrato_phase = rng.uniform(4.0, 6.0), rng.uniform(0.0, 2.0 * np.pi)

    def envelope(t: np.ndarray) -> np.ndarray:
        # Positive half of a sine: a syllable, then an equally long pause.
        return np.maximum(np.sin(2.0 * np.pi * rate * t + rhythm_phase), 0.0) ** 1.5

    t = np.arange(n_samples) / SAMPLE_RATE
    inst_f0 = f0 * (1.0 + 0.02 * np.sin(2.0 * np.pi * vibrato_hz * t + vibrato_phase))
    phase = 2.0 * np.pi * np.cumsum(inst_f0) / SAMPLE_RATE
    harmonics = np.arange(1, 7)
    voice = (np.sin(phase[:, None] * harmonics) / harmonics).sum(axis=1)
    voice /= np.abs(voice).max() + 1e-9
    wave = 0.6 * envelope(t) * voice + rng.normal(0.0, 0.004, n_samples)
    return wave.astype(np.float32), envelope


def synth_video(label: int, classes: int, n_frames: int, size: int, mouth: np.ndarray,
                rng: np.random.Generator, cues: str = "all") -> np.ndarray:
    """Cartoon face frames, uint8 [T, size, size, 3]; `mouth` in [0, 1] is the opening per frame.
    `cues`: as `SynthConfig.cues` ("dynamics": tint and motion amplitude are not the class's)."""
    k = _class_position(label, classes)
    # "dynamics": the tint (any hue) and the motion amplitude (the same range as over the classes)
    # are drawn per clip; only the head-motion speed below still follows the class.
    hue = (label / classes + rng.uniform(-0.03, 0.03)) if cues == "all" else rng.uniform(0.0, 1.0)
    k_amplitude = k if cues == "all" else rng.uniform(0.0, 1.0)
    face = _rgb(hue, 0.45, 0.95).astype(np.uint8)
    background = _rgb(hue + 0.5, 0.4, 0.5)
    dark = np.array([30, 20, 25], dtype=np.uint8)
    lips = np.array([120, 20, 30], dtype=np.uint8)

    t = np.arange(n_frames) / FPS
    speed = (0.25 + 0.75 * k) * (1.0 + rng.uniform(-0.1, 0.1))  # head sway, Hz
    amplitude = size * (0.03 + 0.07 * k_amplitude)
    centre = size / 2 + rng.uniform(-0.06, 0.06, size=2) * size
    cx = centre[0] + amplitude * np.sin(2 * np.pi * speed * t + rng.uniform(0, 2 * np.pi))
    cy = centre[1] + 0.5 * amplitude * np.sin(2 * np.pi * 0.7 * speed * t + rng.uniform(0, 2 * np.pi))
    rx, ry = size * 0.27 * rng.uniform(0.95, 1.05), size * 0.34 * rng.uniform(0.95, 1.05)
    eye_r = size * 0.035
    mouth_h = (0.02 + 0.16 * np.asarray(mouth, dtype=np.float64)) * ry

    # Background: the class tint times a gentle gradient in a random direction, plus a fixed
    # per-clip noise texture (drawing fresh noise per frame would dominate the build time).
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2)) / size  # mean 0
    base = background * (1.0 + 0.5 * ramp[..., None]) + rng.normal(0.0, 3.0, (size, size, 3))
    base = np.clip(base, 0, 255).astype(np.uint8)

    video = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    for i in range(n_frames):
        img = video[i]
        img[:] = base
        _fill_ellipse(img, cx[i], cy[i], rx, ry, face)
        for side in (-1.0, 1.0):
            _fill_ellipse(img, cx[i] + side * 0.38 * rx, cy[i] - 0.25 * ry, eye_r, eye_r, dark)
        _fill_ellipse(img, cx[i], cy[i] + 0.5 * ry, 0.35 * rx, mouth_h[i], lips)
    return video


def _fill_ellipse(img: np.ndarray, x0: float, y0: float, ax: float, ay: float, colour: np.ndarray) -> None:
    """Paint an axis-aligned ellipse into img [H, W, 3], touching only its bounding box."""
    h, w = img.shape[:2]
    top, bottom = max(int(y0 - ay), 0), min(int(y0 + ay) + 2, h)
    left, right = max(int(x0 - ax), 0), min(int(x0 + ax) + 2, w)
    if top >= bottom or left >= right:
        return
    ys = (np.arange(top, bottom, dtype=np.float32)[:, None] - y0) / ay
    xs = (np.arange(left, right, dtype=np.float32)[None, :] - x0) / ax
    img[top:bottom, left:right][ys * ys + xs * xs <= 1.0] = colour


def clip_seed(corpus_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([corpus_seed, index]).generate_state(1)[0])


def clip_media(cfg: SynthConfig, index: int, label: int) -> tuple[np.ndarray, np.ndarray]:
    """The raw media of clip `index` of class `label`, before encoding: (uint8 frames [T, H, W, 3],
    float32 waveform [n]). Depends only on numpy, so tests can pin the generator apart from the codecs."""
    rng = np.random.default_rng(clip_seed(cfg.seed, index))
    n_frames = max(1, int(round(cfg.duration * FPS)))
    n_samples = int(round(n_frames / FPS * SAMPLE_RATE))
    wave, envelope = synth_audio(label, cfg.classes, n_samples, rng, cfg.cues)
    # Mouth opening: the audio envelope averaged over each frame's time span (sub-sampled).
    sub = (np.arange(n_frames)[:, None] + (np.arange(4)[None] + 0.5) / 4) / FPS
    mouth = envelope(sub).mean(axis=1)
    frames = synth_video(label, cfg.classes, n_frames, cfg.size, mouth, rng, cfg.cues)
    return frames, wave


def make_clip(cfg: SynthConfig, index: int, label: int) -> dict[str, Any]:
    """One WebDataset sample dict (bytes values) for clip `index` of class `label`."""
    seed = clip_seed(cfg.seed, index)
    frames, wave = clip_media(cfg, index, label)
    n_frames = len(frames)
    meta = {
        "frames": n_frames,
        "fps": FPS,
        "duration": n_frames / FPS,
        "sample_rate": SAMPLE_RATE,
        "label": label,
        "class_name": class_name(label),
        "seed": seed,
        # What tag_colour records in the stream, for data.finish: device (PyAV cannot read the decoder's).
        "chroma_siting": CHROMA_SITING,
    }
    if cfg.keyint:  # left out at the encoder's default, so older corpora keep their bytes
        meta["keyint"] = cfg.keyint
    return {
        "__key__": clip_key(index),
        video_extension(cfg.codec): encode_video(frames, FPS, cfg.codec, keyint=cfg.keyint),
        "flac": encode_audio(wave, SAMPLE_RATE, "flac"),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def clip_labels(cfg: SynthConfig) -> list[int]:
    """Balanced labels (counts differ by at most one) in a seeded order."""
    labels = np.arange(cfg.clips) % cfg.classes
    return np.random.default_rng([cfg.seed, 2**31 - 1]).permutation(labels).tolist()


# --------------------------------------------------------------------------------------------
# Corpus


def _config_record(cfg: SynthConfig) -> dict[str, Any]:
    record = dataclasses.asdict(cfg)
    record.pop("dir", None)  # where it lives does not change what it is
    for name, old_value in _LATER_FIELDS.items():
        if record.get(name) == old_value:
            del record[name]
    record["format_version"] = FORMAT_VERSION
    return record


def _make_clip_job(args: tuple[SynthConfig, int, int]) -> dict[str, Any]:
    return make_clip(*args)


def _clips(cfg: SynthConfig, workers: int) -> Iterator[dict[str, Any]]:
    jobs = [(cfg, i, label) for i, label in enumerate(clip_labels(cfg))]
    if workers <= 1:
        yield from map(_make_clip_job, jobs)
        return
    # Fork where available: the workers need only numpy and PyAV, and start instantly.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(_make_clip_job, jobs, chunksize=4)


def holds_synthetic_corpus(out_dir: str | Path) -> bool:
    """True if `out_dir` holds a complete synthetic corpus (of any settings): its `_SUCCESS` is the
    config record only `build_corpus` writes. Such a folder, written before folders were marked with
    their owner, is adopted as the synthetic corpus's own; anything else is the user's."""
    try:
        built = json.loads((Path(out_dir) / SUCCESS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(built, dict) and "format_version" in built and "clips" in built \
        and (Path(out_dir) / MANIFEST).is_file()


def claim_corpus_dir(out_dir: str | Path, *, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Make `out_dir` the synthetic corpus's folder, or raise fsutil.FolderInUseError (nothing changed)
    if it is a non-empty folder the corpus builder did not create; `overwrite` moves such a folder aside
    to `<out_dir>.old-<timestamp>` (never deleted). A folder holding a synthetic corpus is reused."""
    out = Path(out_dir)
    return claim_output_dir(out, WRITER, overwrite=overwrite, flag=flag, adopt=holds_synthetic_corpus(out))


def check_settings(cfg: SynthConfig) -> None:
    """ValueError for settings the builder cannot honour (before anything is written)."""
    if cfg.clips < 1 or cfg.clips_per_shard < 1 or cfg.classes < 2:
        raise ValueError("synth corpus needs clips >= 1, clips_per_shard >= 1 and classes >= 2")
    video_extension(cfg.codec)
    if cfg.cues not in CUES:
        raise ValueError(f"synth cues {cfg.cues!r} not supported; choose one of {', '.join(CUES)}")
    if cfg.keyint < 0:
        raise ValueError(f"synth keyint must be >= 0 (0: the encoder's default), got {cfg.keyint}")


def build_corpus(cfg: SynthConfig, out_dir: str | Path, *, progress: bool = True,
                 workers: int | None = None, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Write the corpus described by `cfg` into `out_dir` (replacing an earlier synthetic corpus there).

    `out_dir` must be new, empty or the synthetic corpus's own (claim_corpus_dir): a folder of anyone
    else's raises fsutil.FolderInUseError naming `flag`, unless `overwrite` (moved aside, never deleted).
    `workers` processes encode clips in parallel (default: all CPUs for 32+ clips, else 1); the
    output does not depend on it.
    """
    check_settings(cfg)
    out = claim_corpus_dir(out_dir, overwrite=overwrite, flag=flag)
    (out / SUCCESS).unlink(missing_ok=True)  # from here on the folder is "under construction"
    if workers is None:
        workers = (os.cpu_count() or 1) if cfg.clips >= 32 else 1

    shard_set = ShardWriter(out, cfg.clips_per_shard)
    with shard_set, tqdm(total=cfg.clips, desc=f"synth {out.name}", unit="clip", disable=not progress) as bar:
        for sample in _clips(cfg, workers):
            shard_set.write(sample)
            bar.update(1)
    shards, counts = shard_set.shards, shard_set.counts
    labels = clip_labels(cfg)
    manifest = {
        "shards": shards,
        "samples_per_shard": counts,
        "total": sum(counts),
        "classes": cfg.classes,
        "class_names": [class_name(c) for c in range(cfg.classes)],
        "class_counts": [labels.count(c) for c in range(cfg.classes)],
        "codec": cfg.codec,
        "video_ext": video_extension(cfg.codec),
        "audio_ext": "flac",
        "size": cfg.size,
        "fps": FPS,
        "frames": max(1, int(round(cfg.duration * FPS))),
        "sample_rate": SAMPLE_RATE,
        "seed": cfg.seed,
        "config": _config_record(cfg),
    }
    shard_set.write_manifest(manifest, name=MANIFEST)
    write_atomic(out / SUCCESS, json.dumps(_config_record(cfg), sort_keys=True))
    return out


def corpus_is_complete(cfg: SynthConfig, out_dir: str | Path) -> bool:
    """True if `out_dir` holds a finished corpus built from the same settings as `cfg`."""
    out = Path(out_dir)
    try:
        built = json.loads((out / SUCCESS).read_text())
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return built == _config_record(cfg) and all((out / s).is_file() for s in manifest.get("shards", []))


def ensure_corpus(cfg: SynthConfig, out_dir: str | Path | None = None, *, progress: bool = True,
                  flag: str = "--overwrite") -> Path:
    """Return the corpus folder (default `cfg.dir`), building it first unless already complete.

    The folder is claimed first (claim_corpus_dir): a non-empty folder that is not a synthetic corpus
    raises fsutil.FolderInUseError (naming `flag`) before anything, lock file included, is written.
    Builders on one machine take turns through a lock file, so several ranks may call this at once.
    """
    out = Path(out_dir if out_dir is not None else cfg.dir)
    if corpus_is_complete(cfg, out):  # nothing to write (the folder may be read-only)
        return out
    check_settings(cfg)
    claim_corpus_dir(out, flag=flag)
    with folder_lock(out):
        if not corpus_is_complete(cfg, out):  # another process may have finished meanwhile
            build_corpus(cfg, out, progress=progress, flag=flag)
    return out


# --------------------------------------------------------------------------------------------
# Command line (registered as `vaemo-synth`)


@entry_point("vaemo-synth")
def main(argv: list[str] | None = None) -> int:
    d = SynthConfig()
    p = argparse.ArgumentParser(prog="vaemo-synth", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=d.dir, help=f"output folder (default {d.dir})")
    p.add_argument("--clips", type=int, default=d.clips)
    p.add_argument("--clips-per-shard", type=int, default=d.clips_per_shard)
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument("--size", type=int, default=d.size, help="frame side in pixels (even)")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds per clip")
    p.add_argument("--codec", choices=["h264", "vp9"], default=d.codec)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cues", choices=CUES, default=d.cues,
                   help="what the class drives: all cues, or only rhythm and motion speed")
    p.add_argument("--keyint", type=int, default=d.keyint,
                   help="longest GOP in frames (a keyframe at least this often; 1: all intra), so a window "
                        "decodes from the keyframe before it (data/seek.py); 0: the encoder's default")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all CPUs)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out is a non-empty folder that is not a synthetic corpus: move it aside to "
                        "<out>.old-<timestamp> (never deleted) and build there")
    args = p.parse_args(argv)
    cfg = SynthConfig(dir=args.out, clips=args.clips, clips_per_shard=args.clips_per_shard,
                      classes=args.classes, size=args.size, duration=args.duration,
                      codec=args.codec, seed=args.seed, cues=args.cues, keyint=args.keyint)
    start = time.perf_counter()
    try:
        out = build_corpus(cfg, args.out, progress=True, workers=args.workers, overwrite=args.overwrite)
    except FolderInUseError as e:
        return fail(f"vaemo-synth: {e}")
    except ValueError as e:
        p.error(str(e))
    manifest = json.loads((out / MANIFEST).read_text())
    print(f"wrote {manifest['total']} clips in {len(manifest['shards'])} shards to {out} "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
