"""`vaemo-shard`: turn ordinary videos into the WebDataset shards that training reads.

Input: a folder of video files (searched recursively) or a CSV manifest with a `path` column and
optional `label`, `speaker` (or `id`), `description` columns; relative paths are relative to the
CSV. An `audio` column names a separate audio file (relative to the CSV too), an `fps` column the
rate of a frame-folder `path` (a folder of .jpg/.png frames, data/frames.py; default 25). Any other
non-empty column is copied into the clip's json. Which files are videos: vaemo_dist/data/media.py;
the listing: vaemo_dist/data/datasets (`csv`, over sources.py `media_inputs`).

`--dataset NAME ROOT` reads a corpus in its distributed layout instead (vaemo_dist/data/datasets:
voxceleb2, cremad, ravdess, mafw, dfew, hicmae-csv; `--dataset-option KEY=VALUE` for its options):
the clips' json carries label, class_name, speaker, fold and the dataset's ids; the clips the adapter
refuses (known broken, no audio, missing, unlabelled, ...) are listed in report.json with the
converter's skips and counted by reason on stderr; manifest.json records `dataset` (name, class
names, folds, protocol) and keeps the adapter's label order in `class_names` (all its classes, so
indices are the dataset's own); `<out>/folds.csv` (key,fold) lists the accepted clips' test folds.

Each usable clip becomes three tar members under one key:
* `<key>.mp4`: H.264, video only, `--fps` frames per second (a whole number, a fraction such as 25/4, or
  a decimal such as 6.25 or 29.97: parse_fps), short side `--size` (yuv420p). An H.264
  source that already conforms is stream-copied (no quality loss, no encode time); anything else is
  re-encoded, with frame-rate conversion by repeating/dropping frames on the source timestamps.
  `--codec vp9` writes `<key>.webm` (VP9) instead: what DALI can decode without a GPU. `--keyint N`
  bounds a re-encoded clip's GOP to N frames (recorded as `keyint` in its json), so the decoder can
  start a window at the keyframe before it (data/seek.py); stream-copied clips keep the source's GOP.
* `<key>.flac`: the first audio track resampled to 16 kHz mono (PyAV's AudioResampler), aligned to
  the first video frame.
* `<key>.json`: frames, fps, duration, sample_rate, width, height, codec, source, stream_copied,
  chroma_siting, keyint (re-encoded with --keyint), and label / class_name / speaker / description
  where known.

Colour: a re-encoded clip is BT.601, limited range, with centre-sited 4:2:0 chroma, and its stream
records all three (vaemo_dist/data/synth.py `tag_colour`, `to_yuv420`); a stream-copied one keeps the
source's (`chroma_siting` in its json says left, the H.264 default).

Output goes to a local folder or any fsspec URL (`s3://bucket/prefix`): `shard-000000.tar ...`,
then `manifest.json` (shard names, samples per shard, total, format, shuffle seed, class names) and
`report.json` (every accepted input with its key and shard; every skipped input with its reason and
kind). Inputs without a video track, without an audio track, cut short (truncated), unreadable
(corrupt), or shorter than `--min-duration` are skipped, counted and listed; never silently dropped.
A skip's `kind` is the decoders' name for it (vaemo_dist/data/types.py DECODE_KINDS).

Labels: integer labels are kept as they are; names are numbered 0, 1, ... in sorted order of the
names of the *accepted* clips, and `manifest.json`'s `class_names` lists them: a name carried only by
skipped inputs gets no index (clips are numbered over all inputs while converting; if a name lost all
its clips, the shards' json labels are renumbered before the manifest is written), so every index
names a class with clips, `class_names[label] == class_name`, and the numbering is the one
`open_source` gives a CSV of the same clips.

Shards are filled in a shuffled order (`--shuffle-seed`, default 0), so a class- or speaker-sorted
CSV still gives shards, and first batches, that mix classes and speakers; `--no-shuffle` keeps the
input order. A clip's key (`<input row>-<file stem>`) comes from its input row either way, and the
same inputs and options give the same shards whatever `--workers` is.

`--out` must be a new or empty folder, or one vaemo-shard created and left without shards (an
interrupted start); anything else is refused before work starts (`--overwrite` moves it aside to
`<out>.old-<timestamp>`, never deletes). A remote prefix that already holds a manifest is refused, and
one that cannot be written (credentials, bucket, endpoint) is found by a probe write (and delete) before
any clip is converted.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import mmap
import multiprocessing as mp
import os
import re
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from vaemo_dist.data import faces, storage
from vaemo_dist.data.datasets import dataset_names, get_dataset
from vaemo_dist.data.decode_pyav import _bmff_cut_short, probe_siting
from vaemo_dist.data.frames import frame_files, open_frames
from vaemo_dist.data.shards import MANIFEST_NAME, ShardWriter
from vaemo_dist.data.sources import MediaInput
from vaemo_dist.data.synth import BITEXACT, CHROMA_SITING, tag_colour, to_yuv420
from vaemo_dist.fsutil import FolderInUseError, claim_output_dir, folder_owner, move_aside, refusal
from vaemo_dist.startup import entry_point, fail

REPORT_NAME = "report.json"
FOLDS_NAME = "folds.csv"  # key,fold of a dataset's clips (the clip's standard test fold)
FORMAT_VERSION = 1
CODECS = {"h264": ("libx264", "mp4", "h264"), "vp9": ("libvpx-vp9", "webm", "vp9")}  # encoder, ext, name
WRITER = "vaemo-shard"  # the owner name of its output folders (vaemo_dist.fsutil.claim_output_dir)


class Skip(Exception):
    """An input that cannot become a clip; the message is the reason shown in the report, `kind` the
    decoders' name for it (one of vaemo_dist.data.types.DECODE_KINDS)."""

    def __init__(self, reason: str, kind: str = "other") -> None:
        super().__init__(reason)
        self.kind = kind


def _cut_short(path: str) -> bool:
    """Whether the file at `path` is an mp4 whose box structure runs past its end (a truncated file,
    not garbage): the decoders' test (decode_pyav._bmff_cut_short), on a memory map of the file."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _bmff_cut_short(data)  # type: ignore[arg-type]  # slices and len() as bytes do
    except (OSError, ValueError):  # missing, unreadable or empty
        return False


MAX_FPS = 1000  # a rate above this is refused (a typo, not a video rate; the encoders' rationals are 32-bit)


def parse_fps(value: str | float | Fraction) -> Fraction:
    """A frame rate as an exact fraction: `25`, `25/4`, `6.25` (-> 25/4), `Fraction(25, 4)`.

    A decimal is read as the fraction it writes, except one that names a 1000/1001 rate to the digits
    given (29.97 -> 30000/1001, 23.976 -> 24000/1001, 59.94 -> 60000/1001), the rates such sources
    carry; the denominator is limited to 1001. Raises ValueError for anything unparsable, <= 0 or above
    MAX_FPS."""
    text = str(value).strip()
    try:
        rate = Fraction(value) if isinstance(value, (int, Fraction)) else Fraction(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"frame rate {text!r} is not a number or a fraction such as 25/4") from None
    if rate.denominator != 1 and "/" not in text and "." in text and "e" not in text.lower():
        places = len(text.partition(".")[2])
        ntsc = Fraction(round(rate * Fraction(1001, 1000)) * 1000, 1001)
        if ntsc.denominator != 1 and abs(ntsc - rate) < Fraction(1, 2 * 10 ** places):
            rate = ntsc
    rate = rate.limit_denominator(1001)
    if not 0 < rate <= MAX_FPS:
        raise ValueError(f"frame rate {text!r} must be > 0 and <= {MAX_FPS}")
    return rate


def fps_json(fps: Fraction | int) -> int | float:
    """A rate as the json says it: a whole number as an int (25, as always), else a float (6.25)."""
    return int(fps) if Fraction(fps).denominator == 1 else float(fps)


@dataclass(frozen=True)
class ShardOptions:
    size: int = 224  # short side in pixels; 0 keeps the source size (rounded down to even)
    # Frames per second of the shards' video, exact (25/4: every 4th frame of a 25 fps source). An int,
    # float or str given here is read by parse_fps.
    fps: Fraction = Fraction(25)
    codec: str = "h264"
    crf: int = 23  # encoder quality (lower is better)
    preset: str = "veryfast"  # x264 preset
    # Longest GOP in frames of re-encoded clips (the encoders' `g`; 1: all intra), so a window decodes
    # from the keyframe before it (data/seek.py). 0: the encoder's default (x264: 250). Stream-copied
    # clips keep the source's GOP.
    keyint: int = 0
    sample_rate: int = 16000
    min_duration: float = 1.0  # seconds; shorter clips are skipped
    clips_per_shard: int = 256
    prefix: str = "shard"
    shuffle_seed: int | None = 0  # the order clips are shuffled into before sharding; None keeps input order
    # Face-centred crop (vaemo_dist/data/faces.py): square `size` x `size` output around the speaker's face.
    face_crop: bool = False
    face_margin: float = 0.4  # crop side = (1 + margin) * face size
    face_stride: int = 5  # detect on every n-th output frame; interpolated and smoothed between
    face_detector: str = "opencv-haar"  # a name in faces.DETECTORS
    boxes: str = ""  # user boxes (faces.load_boxes) instead of the detector

    def __post_init__(self) -> None:
        if not isinstance(self.fps, Fraction) or self.fps.denominator > 1001 or not 0 < self.fps <= MAX_FPS:
            object.__setattr__(self, "fps", parse_fps(self.fps))

    def to_json(self) -> dict[str, Any]:
        """The options as manifest.json records them (`fps` as fps_json says)."""
        return {**asdict(self), "fps": fps_json(self.fps)}


# --------------------------------------------------------------------------------------------
# Labels of the inputs (a folder or a CSV manifest, listed by vaemo_dist/data/sources.py: media_inputs)


def label_table(sources: list[MediaInput],
                class_names: list[str] | tuple[str, ...] | None = None) -> tuple[dict[str, int], list[str]]:
    """Label text -> integer. Integer labels stay as they are; names get indices in sorted order, or in
    the order of `class_names` where given (a dataset adapter's label order; every label must be one)."""
    if class_names:
        unknown = sorted({s.label for s in sources if s.label} - set(class_names))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the class names {list(class_names)}")
        return {n: i for i, n in enumerate(class_names)}, list(class_names)
    names = sorted({s.label for s in sources if s.label})
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return {n: int(n) for n in names}, []
    return {n: i for i, n in enumerate(names)}, names


def renumber_labels(urls: list[str], mapping: dict[int, int]) -> None:
    """Rewrite the `label` of every clip json in the shards at `urls` through `mapping` (old index ->
    new), each shard replaced whole (local: atomically; remote: re-uploaded). Used when names carried
    only by skipped inputs leave gaps in the indices given before conversion; the manifest, written
    after this, is what says the set is complete."""
    for url in urls:
        folder = None if storage.is_remote(url) else os.path.dirname(storage.local_path(url))
        fd, tmp = tempfile.mkstemp(prefix=".vaemo-relabel-", suffix=".tar", dir=folder)
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as src, os.fdopen(fd, "wb") as f, \
                tarfile.open(fileobj=f, mode="w", format=src.format) as dst:
            for info in src:
                data = src.extractfile(info).read() if info.isfile() else None  # type: ignore[union-attr]
                if data is not None and info.name.endswith(".json"):
                    meta = json.loads(data)
                    if isinstance(meta.get("label"), int) and meta["label"] in mapping:
                        meta["label"] = mapping[meta["label"]]
                        data = json.dumps(meta, sort_keys=True).encode()
                        info.size = len(data)
                dst.addfile(info, io.BytesIO(data) if data is not None else None)
            dst.close()
            f.flush()
            os.fsync(f.fileno())
        storage.put_file(tmp, url)


# --------------------------------------------------------------------------------------------
# One clip


def _target_size(width: int, height: int, size: int) -> tuple[int, int]:
    if size <= 0:
        return width - width % 2, height - height % 2
    short, long = min(width, height), max(width, height)
    other = max(2, int(round(long * size / short / 2)) * 2)
    return (other, size) if width >= height else (size, other)


def _conforms(stream: av.video.stream.VideoStream, opts: ShardOptions) -> bool:
    """Can the source video be stream-copied as it is?"""
    ctx = stream.codec_context
    rate = stream.average_rate
    return (
        not opts.face_crop  # a face crop is always re-encoded
        # VP9 shards are what DALI decodes on CPU, which reads chroma centre-sited; a VP9 source's siting
        # cannot be read here, so it is re-encoded (centre-sited, tagged) rather than copied.
        and opts.codec == "h264"
        and stream.codec.canonical_name == CODECS[opts.codec][2]
        and ctx.pix_fmt == "yuv420p"
        and rate is not None and Fraction(rate) == opts.fps
        and (ctx.width, ctx.height) == _target_size(ctx.width, ctx.height, opts.size)
    )


def copy_video(path: str, opts: ShardOptions) -> tuple[bytes, int, float, int, int]:
    """Remux the video stream alone. Returns (bytes, frames, start seconds, width, height)."""
    buf = io.BytesIO()
    frames, start = 0, None
    with av.open(path) as src, av.open(buf, "w", format=CODECS[opts.codec][1], options=BITEXACT) as dst:
        ins = src.streams.video[0]
        outs = dst.add_stream_from_template(ins)
        for packet in src.demux(ins):
            if packet.dts is None or not packet.size:  # the demuxer's flush packet
                continue
            if packet.pts is not None:
                t = float(packet.pts * ins.time_base)
                start = t if start is None else min(start, t)
            packet.stream = outs
            dst.mux(packet)
            frames += 1
        width, height = ins.codec_context.width, ins.codec_context.height
    return buf.getvalue(), frames, start or 0.0, width, height


def encode_video(path: str, opts: ShardOptions, fps: float = 0.0, *, key: str = "",
                 info: dict[str, Any] | None = None) -> tuple[bytes, int, float, int, int]:
    """Decode, convert to `opts.fps` on the source timestamps, scale, encode. Same returns as copy_video.
    `path` is a video file or a frame folder (data/frames.py; `fps` its rate, 0 = 25).

    With `opts.face_crop` every output frame is the square around the speaker's face (`_face_track`:
    the detector, or `opts.boxes` looked up by `key` / `path`), scaled to `opts.size` x `opts.size`; the
    track's summary goes into `info["face_track"]`. The output frames are held in memory (as decoded)
    until the track is known. Raises Skip (kind no_face) when no face is found on most frames."""
    encoder, fmt, _ = CODECS[opts.codec]
    buf = io.BytesIO()
    written, start = 0, None
    with open_frames(path, fps, fallback=float(opts.fps)) as src, \
            av.open(buf, "w", format=fmt, options=BITEXACT) as dst:
        src_rate = src.rate
        width, height = _target_size(src.width, src.height, opts.size)
        if opts.face_crop:
            width = height = opts.size
        outs = dst.add_stream(encoder, rate=opts.fps)
        outs.width, outs.height, outs.pix_fmt = width, height, "yuv420p"
        outs.codec_context.thread_count = 1  # parallelism comes from worker processes
        if opts.codec == "h264":
            outs.options = {"preset": opts.preset, "crf": str(opts.crf)}
        else:
            outs.options = {"deadline": "good", "cpu-used": "4", "b": "0", "crf": str(opts.crf)}
        if opts.keyint:  # unset at 0: the encoder's default GOP, and today's bytes
            outs.options = {**dict(outs.options), "g": str(opts.keyint)}
        tag_colour(outs)  # BT.601, tv range, centre-sited chroma: what to_yuv420 makes below

        shown: list[av.VideoFrame] = []  # face crop: output frame n shows shown[n], cropped once tracked

        def emit(frame: av.VideoFrame) -> None:
            nonlocal written
            if opts.face_crop:  # cropped after the loop, once the whole track is known
                shown.append(frame)
                written += 1
                return
            # Into the tagged matrix, range and siting whatever the source's (a BT.709 or full-range source).
            out = to_yuv420(frame, width, height)
            out.pts, out.time_base = written, 1 / opts.fps  # our own clock, not the source's
            dst.mux(outs.encode(out))
            written += 1

        # Output frame n shows the newest source frame that started at or before n / fps.
        rate = float(opts.fps)  # the comparisons below in floats, as they always were
        held: av.VideoFrame | None = None
        last_t = 0.0
        for i, frame in enumerate(src.frames):
            t = frame.time if frame.time is not None else i / src_rate
            start = t if start is None else start
            t -= start
            while held is not None and written / rate < t - 1e-6:
                emit(held)
            held, last_t = frame, t
        if held is not None:
            # The clip lasts until the last source frame's period ends; the nearest whole number of
            # output frames covers it (29.97 fps for 2.002 s -> 50 frames at 25 fps, not 51).
            end = last_t + 1.0 / src_rate
            while written < round(end * rate):
                emit(held)
        if opts.face_crop and shown:
            track = _face_track(shown, opts, key, path)
            if info is not None:
                info["face_track"] = track.summary()
            for n, frame in enumerate(shown):
                crop = faces.crop_square(frame.to_ndarray(format="rgb24"), track.boxes[n])
                out = to_yuv420(av.VideoFrame.from_ndarray(crop, format="rgb24"), width, height)
                out.pts, out.time_base = n, 1 / opts.fps
                dst.mux(outs.encode(out))
        dst.mux(outs.encode())
    return buf.getvalue(), written, start or 0.0, width, height


@functools.lru_cache(maxsize=4)
def _detector(name: str) -> faces.FaceDetector:
    return faces.get_detector(name)  # one per process (a worker converts many clips)


@functools.lru_cache(maxsize=4)
def _user_boxes(path: str) -> dict[str, faces.UserBoxes]:
    return faces.load_boxes(path)


def _face_track(shown: list[av.VideoFrame], opts: ShardOptions, key: str, path: str) -> faces.Track:
    """The face track over the output frames `shown`: from `opts.boxes` when given (no detector; a
    clip the file has no boxes for is skipped as no_face), else from `opts.face_detector`."""
    w, h = shown[0].width, shown[0].height
    try:
        if opts.boxes:
            boxes = faces.boxes_for(_user_boxes(opts.boxes), key, path)
            if boxes is None:
                raise faces.NoFace(f"no face: --boxes {opts.boxes} has no boxes for {key or path}")
            return faces.track_from_boxes(boxes.per_frame(len(shown), w, h), w, h, margin=opts.face_margin,
                                    sigma=1.0, detector="boxes")
        # Detection runs on every `stride`-th frame only: convert just those to RGB.
        rgb = _LazyRGB(shown)
        return faces.track_faces(rgb, _detector(opts.face_detector), opts.face_stride,
                                 margin=opts.face_margin)
    except faces.NoFace as e:
        raise Skip(str(e), "no_face") from None


class _LazyRGB:
    """A sequence of frames as RGB arrays, converted when read."""

    def __init__(self, frames: list[av.VideoFrame]) -> None:
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.frames[i].to_ndarray(format="rgb24")


def _encode_audio(path: str, video_start: float, opts: ShardOptions) -> tuple[bytes, int]:
    """First audio track of `path` (the video file, or a separate audio file: wav, m4a, flac, ...) ->
    16-bit mono FLAC at opts.sample_rate, starting with the first video frame (`video_start`, seconds
    on the audio file's clock: 0 for a separate file, which is taken to start with the video)."""
    chunks: list[np.ndarray] = []
    start: float | None = None
    resampler = av.AudioResampler(format="s16", layout="mono", rate=opts.sample_rate)
    with av.open(path) as src:
        if not src.streams.audio:
            raise Skip(f"no audio track in {path}", "no_audio")
        ins = src.streams.audio[0]
        for frame in src.decode(ins):
            if start is None and frame.time is not None:
                start = frame.time
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    # Keep audio and video in step: drop audio before the first frame, pad silence if it starts later.
    shift = int(round(((start or 0.0) - video_start) * opts.sample_rate))
    pcm = np.concatenate([np.zeros(shift, dtype=np.int16), pcm]) if shift > 0 else pcm[-shift:]
    if pcm.size == 0:
        raise Skip("no audio samples (empty or undecodable audio track)")
    return encode_flac(pcm, opts.sample_rate), int(pcm.size)


def encode_flac(pcm: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono PCM -> FLAC bytes."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac", options=BITEXACT) as out:
        stream = out.add_stream("flac", rate=sample_rate)
        stream.layout, stream.format = "mono", "s16"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16)[None], format="s16",
                                           layout="mono")
        frame.sample_rate = sample_rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def convert_clip(source: MediaInput, opts: ShardOptions,
                 labels: dict[str, int] | None = None) -> dict[str, Any]:
    """One WebDataset sample (bytes values) for `source`; raises Skip with the reason.

    `source.path` is a video file or a frame folder (data/frames.py, at `source.fps`, 0 = 25); the audio
    comes from `source.audio` when set (checked before any encoding), else from the video file's own
    track (a frame folder without `audio` is skipped as no_audio)."""
    if os.path.isdir(source.path):
        n_frames = len(frame_files(source.path))
        if not n_frames:
            raise Skip("no frame images in the folder", "no_video")
        folder_s = n_frames / (source.fps or 25.0)
        if folder_s < opts.min_duration:
            raise Skip(f"too short: {folder_s:.2f}s < {opts.min_duration}s", "too_short")
        copy = False
    else:
        try:
            container = av.open(source.path)
        except (av.FFmpegError, OSError, ValueError) as e:
            if isinstance(e, av.EOFError) or _cut_short(source.path):
                raise Skip(f"truncated: the file is cut short ({type(e).__name__}: {e})", "truncated") from e
            raise Skip(f"unreadable: {type(e).__name__}: {e}", "corrupt") from e
        with container:
            if not container.streams.video:
                raise Skip("no video track", "no_video")
            if not container.streams.audio and not source.audio:
                raise Skip("no audio track", "no_audio")
            if container.duration is not None and container.duration / 1e6 < opts.min_duration:
                raise Skip(f"too short: {container.duration / 1e6:.2f}s < {opts.min_duration}s", "too_short")
            copy = _conforms(container.streams.video[0], opts)
    if source.audio:
        if not os.path.isfile(source.audio):
            raise Skip(f"no audio: the audio file is missing ({source.audio})", "no_audio")
        if os.path.getsize(source.audio) == 0:
            raise Skip(f"no audio: the audio file is empty ({source.audio})", "empty")
    elif os.path.isdir(source.path):
        raise Skip("no audio: a frame folder needs a separate audio file", "no_audio")
    extra: dict[str, Any] = {}  # what encode_video adds to the json (face_track)
    try:
        if copy:
            video, frames, v_start, width, height = copy_video(source.path, opts)
        else:
            video, frames, v_start, width, height = encode_video(source.path, opts, source.fps,
                                                                 key=source.key, info=extra)
        if frames == 0:
            raise Skip("video track has no decodable frames", "corrupt")
        duration = frames / float(opts.fps)
        if duration < opts.min_duration:
            raise Skip(f"too short: {duration:.2f}s < {opts.min_duration}s", "too_short")
        audio, n_audio = _encode_audio(source.audio or source.path, 0.0 if source.audio else v_start, opts)
    except av.FFmpegError as e:
        cut = isinstance(e, av.EOFError) or _cut_short(source.path)
        raise Skip(f"undecodable: {type(e).__name__}: {e}", "truncated" if cut else "corrupt") from e
    # The decoders refuse audio shorter than 90% of the clip (kind truncated): say so here.
    if n_audio < 0.9 * duration * opts.sample_rate:
        raise Skip(f"audio track too short: {n_audio / opts.sample_rate:.2f}s for {duration:.2f}s of video",
                   "truncated")

    meta: dict[str, Any] = {
        "frames": frames, "fps": fps_json(opts.fps), "duration": duration, "sample_rate": opts.sample_rate,
        "audio_samples": n_audio, "width": width, "height": height, "codec": opts.codec,
        "source": source.path, "stream_copied": copy,
        # Re-encoded: what to_yuv420 makes (and the stream's tag says); stream-copied: the source's own,
        # which PyAV cannot read, so found by converting its first frames both ways (probe_siting).
        "chroma_siting": probe_siting(video) if copy else CHROMA_SITING,
    }
    if opts.keyint and not copy:  # the GOP bound this clip was encoded with (absent: encoder default)
        meta["keyint"] = opts.keyint
    if source.audio:
        meta["audio_source"] = source.audio
    if source.label:
        meta["label"] = (labels or {}).get(source.label, source.label)
        if not re.fullmatch(r"-?\d+", source.label):
            meta["class_name"] = source.label
    for name in ("speaker", "description"):
        if getattr(source, name):
            meta[name] = getattr(source, name)
    meta.update(source.extra)
    meta.update(extra)
    return {
        "__key__": source.key,
        CODECS[opts.codec][1]: video,
        "flac": audio,
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _job(args: tuple[MediaInput, ShardOptions, dict[str, int]]) -> dict[str, Any] | tuple[str, str]:
    """Worker entry: the sample, or the skip as (kind, reason) (exceptions pickle poorly)."""
    source, opts, labels = args
    try:
        return convert_clip(source, opts, labels)
    except Skip as e:
        return e.kind, str(e)
    except Exception as e:  # noqa: BLE001 - one odd file must not end a long run; it is reported
        return "other", f"failed: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------
# Shards


@dataclass
class Report:
    out: str
    inputs: int = 0
    written: int = 0
    shards: list[str] = field(default_factory=list)
    samples_per_shard: list[int] = field(default_factory=list)
    accepted: list[dict[str, str]] = field(default_factory=list)  # {"path", "key", "shard"}
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "key", "kind", "reason"}
    stream_copied: int = 0
    seconds: float = 0.0

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(s["reason"].split(":")[0] for s in self.skipped))

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(s["kind"] for s in self.skipped))


def one_torch_thread() -> None:
    """A forked worker's start: torch on one thread. The parallelism comes from the worker processes,
    and a child forked after its parent ran multi-threaded torch hangs if it enters the OpenMP pool it
    inherited (measured: vaemo-shard's probe of stream-copied clips, run from a process that had used
    torch, e.g. a test or a notebook)."""
    import torch

    torch.set_num_threads(1)


def _results(jobs: list[tuple[MediaInput, ShardOptions, dict[str, int]]],
             workers: int) -> Iterator[dict[str, Any] | tuple[str, str]]:
    if workers <= 1:
        yield from map(_job, jobs)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=one_torch_thread) as pool:
        yield from pool.map(_job, jobs)  # in input order: shards do not depend on `workers`


def sources_accepted(sources: list[MediaInput], report: Report) -> list[MediaInput]:
    keys = {a["key"] for a in report.accepted}
    return [s for s in sources if s.key in keys]


def shuffled(sources: list[MediaInput], seed: int | None) -> list[MediaInput]:
    """`sources` in the order they are sharded: a permutation fixed by `seed` (None: as given)."""
    if seed is None:
        return list(sources)
    order = np.random.default_rng(seed).permutation(len(sources))
    return [sources[i] for i in order]


def claim_out(out: str, overwrite: bool = False) -> None:
    """Make `out` vaemo-shard's output folder, or raise FolderInUseError before any work.

    Local: a new or empty folder, or one vaemo-shard created that holds no shards yet, is used; a
    folder holding shards (vaemo-shard's own earlier ones included: there is no resume) or anything
    else is refused unless `overwrite`, which moves it aside. Remote: a prefix that already holds a
    manifest is refused (an object-store prefix cannot be moved aside)."""
    if storage.is_remote(out):
        fs, path = storage.split(f"{out}/{MANIFEST_NAME}")
        if fs.exists(path):
            raise FolderInUseError(
                f"refusing to write into {storage.redact(out)}: it already holds shards ({MANIFEST_NAME}). "
                "Nothing was changed. Name a new prefix (an object-store prefix cannot be moved aside)")
        return
    path = Path(storage.local_path(out))
    ours_with_shards = path.is_dir() and folder_owner(path) == WRITER and (
        (path / MANIFEST_NAME).exists() or any(path.glob("*.tar")))
    if ours_with_shards:
        if not overwrite:
            raise FolderInUseError(refusal(path, "it holds the shards of an earlier vaemo-shard run",
                                           "--overwrite"))
        move_aside(path)
    claim_output_dir(path, WRITER, overwrite=overwrite)


PROBE_NAME = ".vaemo-shard-write-probe"


def check_writable(out: str) -> None:
    """Raise a one-line StorageError unless a remote `out` can be written: a small probe object is
    written and deleted, so refused credentials, a missing bucket or a dead endpoint are found before
    any clip is converted (not at the first shard's upload). Local folders: nothing to do here."""
    if not storage.is_remote(out):
        return
    url = f"{out}/{PROBE_NAME}-{os.getpid()}"
    what = f"cannot write to {storage.redact(out)}"
    try:
        storage.write_bytes(url, b"vaemo-shard write probe\n")
        fs, path = storage.split(url)
        storage.within_budget(url, lambda: fs.rm_file(path), "deleting the write probe")
    except storage.StoreUnavailable as e:
        raise storage.StoreUnavailable(f"{what}: {storage.message(e)}") from None
    except storage.StorageError as e:
        if "not found" in str(e):
            storage.check_bucket(url, what)
        raise storage.StorageError(f"{what}: {storage.message(e)}") from None
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, network: all fatal before any work
        raise storage.StorageError(f"{what}: {storage.describe_error(url, e)}") from None


def write_shards(sources: list[MediaInput], out: str, opts: ShardOptions = ShardOptions(), *,
                 workers: int = 1, progress: bool = True, overwrite: bool = False,
                 class_names: list[str] | tuple[str, ...] | None = None,
                 skipped: list[dict[str, str]] | None = None,
                 dataset: dict[str, Any] | None = None) -> Report:
    """Convert `sources` into shards at `out` (folder or fsspec URL); returns what happened.

    Clips are sharded in the order `shuffled(sources, opts.shuffle_seed)`. `out` is claimed first
    (claim_out): a folder that is not vaemo-shard's to fill raises FolderInUseError, unless
    `overwrite` (moved aside, never deleted).

    From a dataset adapter (vaemo_dist/data/datasets): `class_names` fixes the label order (kept whole
    in the manifest, classes without accepted clips included, so indices are the dataset's own);
    `skipped` (dicts with path, reason, kind) are the inputs the adapter refused, listed in the report
    with the converter's skips (key ""); `dataset` (name, class_names, protocol, ...) goes into
    manifest.json as "dataset", and the accepted clips' `fold` values into `<out>/folds.csv` (key,fold)."""
    if opts.codec not in CODECS:
        raise ValueError(f"codec {opts.codec!r} not supported; choose one of {sorted(CODECS)}")
    if opts.keyint < 0:
        raise ValueError(f"keyint must be >= 0 (0: the encoder's default), got {opts.keyint}")
    out = out.rstrip("/")
    labels, fixed_names = label_table(sources, class_names)  # before any work: unknown labels are refused
    check_writable(out)
    claim_out(out, overwrite)
    pre_skipped = [{"path": s["path"], "key": "", "kind": s["kind"], "reason": s["reason"]}
                   for s in skipped or []]
    report = Report(out=storage.redact(out), inputs=len(sources) + len(pre_skipped), skipped=pre_skipped)
    start = time.perf_counter()
    class_names = fixed_names  # over all inputs; narrowed to the accepted below (unless fixed)
    sources = shuffled(sources, opts.shuffle_seed)
    # Each shard is written under a temporary name and renamed (uploaded) when whole; the manifest last.
    shard_set = ShardWriter(out, opts.clips_per_shard, prefix=opts.prefix)
    with shard_set, tqdm(total=len(sources), desc="vaemo-shard", unit="clip", disable=not progress) as bar:
        jobs = [(s, opts, labels) for s in sources]
        for source, result in zip(sources, _results(jobs, workers)):
            bar.update(1)
            if isinstance(result, tuple):
                kind, reason = result
                report.skipped.append({"path": source.path, "key": source.key, "kind": kind,
                                       "reason": reason})
                bar.set_postfix(skipped=len(report.skipped))
                continue
            shard_set.write(result)
            report.accepted.append({"path": source.path, "key": source.key, "shard": shard_set.shards[-1]})
            report.written += 1
            report.stream_copied += json.loads(result["json"])["stream_copied"]
    report.shards, report.samples_per_shard = list(shard_set.shards), list(shard_set.counts)
    # Class names (and indices) come only from the accepted clips: a name that only skipped inputs
    # carried is dropped, and the clips' indices above it move down (their shards are rewritten).
    used = sorted({s.label for s in sources_accepted(sources, report)} & set(class_names))
    if used != class_names and not dataset:
        mapping = {labels[n]: i for i, n in enumerate(used)}
        renumber_labels([shard_set.url(n) for n in report.shards], mapping)
        class_names = used

    report.seconds = time.perf_counter() - start
    video_ext = CODECS[opts.codec][1]
    manifest = {
        "format_version": FORMAT_VERSION,
        "shards": report.shards,
        "samples_per_shard": report.samples_per_shard,
        "total": report.written,
        "skipped": len(report.skipped),
        "video_ext": video_ext,
        "audio_ext": "flac",
        "codec": opts.codec,
        "shuffle_seed": opts.shuffle_seed,  # None: shards in input order
        "options": opts.to_json(),
    }
    if class_names:
        manifest["class_names"] = class_names  # the accepted clips' names, label i = class_names[i]
    if dataset:
        manifest["dataset"] = dataset
        folds = [(s.key, s.extra["fold"]) for s in sources_accepted(sources, report) if s.extra.get("fold")]
        if folds:
            text = "key,fold\n" + "".join(f"{k},{f}\n" for k, f in sorted(folds))
            storage.write_bytes(f"{out}/{FOLDS_NAME}", text.encode())
            manifest["dataset"] = {**dataset, "folds_file": FOLDS_NAME}
    record = {**asdict(report), "skipped_by_reason": report.by_reason(), "skipped_by_kind": report.by_kind()}
    storage.write_bytes(f"{out}/{REPORT_NAME}", json.dumps(record, indent=2).encode())
    shard_set.write_manifest(manifest, sort_keys=False)  # last: it says the set is complete
    return report


# --------------------------------------------------------------------------------------------
# Command line (registered as `vaemo-shard`)


def fps_arg(text: str) -> Fraction:
    """`--fps`: parse_fps, its refusal said through argparse (usage, the message, exit 2)."""
    try:
        return parse_fps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                or action.default == "":
            return action.help
        return super()._get_help_string(action)


@entry_point("vaemo-shard")
def main(argv: list[str] | None = None) -> int:
    d = ShardOptions()
    p = argparse.ArgumentParser(prog="vaemo-shard", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("input", help="a folder of videos, or a CSV with columns path[,label,speaker,description,"
                                 "audio,fps]; with --dataset: the corpus root")
    p.add_argument("--dataset", default="", choices=[""] + dataset_names(), metavar="NAME",
                   help=f"read INPUT as this corpus in its distributed layout: {', '.join(dataset_names())}")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the dataset adapter (e.g. audio=aac for voxceleb2); repeatable")
    p.add_argument("--out", required=True,
                   help="output folder or fsspec URL (s3://bucket/prefix); a new or empty folder")
    p.add_argument("--overwrite", action="store_true",
                   help="if --out holds anything, move it aside to <out>.old-<timestamp> (never deleted)")
    p.add_argument("--size", type=int, default=d.size, help="short side in pixels, 0 keeps it")
    p.add_argument("--fps", type=fps_arg, default=d.fps,
                   help="frames per second of the shards' video: a whole number, a fraction (25/4: every 4th "
                        "frame of a 25 fps source) or a decimal (6.25; 29.97 is read as 30000/1001)")
    p.add_argument("--codec", choices=sorted(CODECS), default=d.codec, help="video codec of the shards")
    p.add_argument("--crf", type=int, default=d.crf, help="encoder quality, lower is better")
    p.add_argument("--keyint", type=int, default=d.keyint,
                   help="longest GOP in frames of re-encoded clips (a keyframe at least this often; 1: all "
                        "intra), so a window decodes from the keyframe before it instead of from the clip's "
                        "start; 0: the encoder's default (x264: 250). Stream-copied clips keep the source's "
                        "GOP")
    p.add_argument("--min-duration", type=float, default=d.min_duration, help="seconds; shorter is skipped")
    p.add_argument("--clips-per-shard", type=int, default=d.clips_per_shard, help="clips per tar shard")
    p.add_argument("--prefix", default=d.prefix, help="shard names: PREFIX-000000.tar ...")
    p.add_argument("--shuffle-seed", type=int, default=d.shuffle_seed,
                   help="seed of the order clips are sharded in (recorded in manifest.json), so shards "
                        "mix classes and speakers")
    p.add_argument("--no-shuffle", action="store_true", help="shard the clips in input order")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--s3-endpoint", default="", help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--face-crop", action="store_true",
                   help="crop every frame to a square around the speaker's face, --size x --size; clips with "
                        "no face on most checked frames are skipped (no_face)")
    p.add_argument("--face-margin", type=float, default=d.face_margin,
                   help="face crop side = (1 + margin) * face size")
    p.add_argument("--face-stride", type=int, default=d.face_stride,
                   help="detect faces on every n-th output frame (interpolated and smoothed between)")
    p.add_argument("--face-detector", default=d.face_detector, choices=sorted(faces.DETECTORS),
                   help="face detector of --face-crop")
    p.add_argument("--boxes", default="",
                   help="face boxes per clip instead of the detector: CSV key,[frame,]x,y,w,h, JSON, or "
                        "VoxCeleb txt tracks (a file or folder; see vaemo_dist/data/faces.py load_boxes); "
                        "needs --face-crop")
    args = p.parse_args(argv)
    if args.clips_per_shard < 1 or args.size < 0 or args.keyint < 0:  # --fps: checked by fps_arg
        p.error("--clips-per-shard must be >= 1, --size and --keyint >= 0")
    if args.face_crop and (args.size < 2 or args.face_stride < 1 or args.face_margin < 0):
        p.error("--face-crop needs --size >= 2, --face-stride >= 1 and --face-margin >= 0")
    if args.boxes and not args.face_crop:
        p.error("--boxes needs --face-crop")
    if args.face_crop:  # a missing detector or an unreadable boxes file is said before any work
        try:
            _user_boxes(args.boxes) if args.boxes else _detector(args.face_detector)
        except (ImportError, ValueError, OSError, KeyError) as e:
            return fail(f"vaemo-shard: {e}")
    opts = ShardOptions(size=args.size, fps=args.fps, codec=args.codec, crf=args.crf, keyint=args.keyint,
                        min_duration=args.min_duration, clips_per_shard=args.clips_per_shard,
                        prefix=args.prefix, shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
                        face_crop=args.face_crop, face_margin=args.face_margin, face_stride=args.face_stride,
                        face_detector=args.face_detector, boxes=args.boxes)
    storage.configure(endpoint=args.s3_endpoint)
    options = {}
    for item in args.dataset_option:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            p.error(f"--dataset-option takes KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    if options and not args.dataset:
        p.error("--dataset-option needs --dataset")
    try:
        adapter = get_dataset(args.dataset or "csv")
        listing = adapter.inputs(args.input, **options)
        info = adapter.manifest_entry() if args.dataset else None
        if listing.skipped:
            counts = Counter(s["reason"].split(":")[0] for s in listing.skipped)
            print(f"{adapter.name}: {len(listing.inputs)} clips listed, {len(listing.skipped)} refused: "
                  f"{dict(counts)}", file=sys.stderr)
        report = write_shards(listing.inputs, args.out, opts, workers=args.workers,
                              progress=not args.no_progress, overwrite=args.overwrite,
                              class_names=adapter.class_names or None, skipped=listing.skipped, dataset=info)
    except (ValueError, OSError, FolderInUseError) as e:
        return fail(f"vaemo-shard: {e}")
    out = report.out
    print(f"wrote {report.written} of {report.inputs} clips ({report.stream_copied} stream-copied) in "
          f"{len(report.shards)} shards to {out} in {report.seconds:.1f}s", file=sys.stderr)
    if report.skipped:
        print(f"skipped {len(report.skipped)}: {report.by_reason()} (all listed in {out}/{REPORT_NAME})",
              file=sys.stderr)
        for s in report.skipped[:20]:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
        if len(report.skipped) > 20:
            print(f"  ... {len(report.skipped) - 20} more", file=sys.stderr)
    if report.written:
        print(f"train on them with: data.shards={out}/{MANIFEST_NAME}", file=sys.stderr)
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
