"""`vaemo-shard`: turn ordinary videos into the WebDataset shards that training reads.

Input: a folder of video files (searched recursively) or a CSV manifest with a `path` column and
optional `label`, `speaker` (or `id`), `description` columns; relative paths are relative to the
CSV. Any other non-empty column is copied into the clip's json. Which files are videos:
vaemo_dist/data/media.py; the listing: vaemo_dist/data/sources.py (`media_inputs`).

Each usable clip becomes three tar members under one key:
* `<key>.mp4`: H.264, video only, `--fps` frames per second, short side `--size` (yuv420p). A source
  that already conforms is stream-copied (no quality loss, no encode time); anything else is
  re-encoded, with frame-rate conversion by repeating/dropping frames on the source timestamps.
  `--codec vp9` writes `<key>.webm` (VP9) instead: what DALI can decode without a GPU.
* `<key>.flac`: the first audio track resampled to 16 kHz mono (PyAV's AudioResampler), aligned to
  the first video frame.
* `<key>.json`: frames, fps, duration, sample_rate, width, height, codec, source, stream_copied, and
  label / class_name / speaker / description where known.

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

from vaemo_dist.data import storage
from vaemo_dist.data.decode_pyav import _bmff_cut_short
from vaemo_dist.data.shards import MANIFEST_NAME, ShardWriter
from vaemo_dist.data.sources import MediaInput, media_inputs
from vaemo_dist.data.synth import BITEXACT, COLOUR_TAGS, tag_colour
from vaemo_dist.fsutil import FolderInUseError, claim_output_dir, folder_owner, move_aside, refusal
from vaemo_dist.startup import entry_point, fail

REPORT_NAME = "report.json"
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


@dataclass(frozen=True)
class ShardOptions:
    size: int = 224  # short side in pixels; 0 keeps the source size (rounded down to even)
    fps: int = 25
    codec: str = "h264"
    crf: int = 23  # encoder quality (lower is better)
    preset: str = "veryfast"  # x264 preset
    sample_rate: int = 16000
    min_duration: float = 1.0  # seconds; shorter clips are skipped
    clips_per_shard: int = 256
    prefix: str = "shard"
    shuffle_seed: int | None = 0  # the order clips are shuffled into before sharding; None keeps input order


# --------------------------------------------------------------------------------------------
# Labels of the inputs (a folder or a CSV manifest, listed by vaemo_dist/data/sources.py: media_inputs)


def label_table(sources: list[MediaInput]) -> tuple[dict[str, int], list[str]]:
    """Label text -> integer. Integer labels stay as they are; names get indices in sorted order."""
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
        stream.codec.canonical_name == CODECS[opts.codec][2]
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


def encode_video(path: str, opts: ShardOptions) -> tuple[bytes, int, float, int, int]:
    """Decode, convert to `opts.fps` on the source timestamps, scale, encode. Same returns as copy_video."""
    encoder, fmt, _ = CODECS[opts.codec]
    buf = io.BytesIO()
    written, start = 0, None
    with av.open(path) as src, av.open(buf, "w", format=fmt, options=BITEXACT) as dst:
        ins = src.streams.video[0]
        src_rate = float(ins.average_rate or ins.guessed_rate or opts.fps)
        width, height = _target_size(ins.codec_context.width, ins.codec_context.height, opts.size)
        outs = dst.add_stream(encoder, rate=opts.fps)
        outs.width, outs.height, outs.pix_fmt = width, height, "yuv420p"
        outs.codec_context.thread_count = 1  # parallelism comes from worker processes
        if opts.codec == "h264":
            outs.options = {"preset": opts.preset, "crf": str(opts.crf)}
        else:
            outs.options = {"deadline": "good", "cpu-used": "4", "b": "0", "crf": str(opts.crf)}
        tag_colour(outs)  # BT.601, tv range, left-sited chroma: what the yuv420p frames below hold

        def emit(frame: av.VideoFrame) -> None:
            nonlocal written
            # Into the tagged matrix and range whatever the source's (a BT.709 or full-range source).
            out = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA",
                                 dst_colorspace=COLOUR_TAGS["colorspace"],
                                 dst_color_range=COLOUR_TAGS["color_range"])
            out.pts, out.time_base = written, Fraction(1, opts.fps)  # our own clock, not the source's
            dst.mux(outs.encode(out))
            written += 1

        # Output frame n shows the newest source frame that started at or before n / fps.
        held: av.VideoFrame | None = None
        last_t = 0.0
        for i, frame in enumerate(src.decode(ins)):
            t = frame.time if frame.time is not None else i / src_rate
            start = t if start is None else start
            t -= start
            while held is not None and written / opts.fps < t - 1e-6:
                emit(held)
            held, last_t = frame, t
        if held is not None:
            # The clip lasts until the last source frame's period ends; the nearest whole number of
            # output frames covers it (29.97 fps for 2.002 s -> 50 frames at 25 fps, not 51).
            end = last_t + 1.0 / src_rate
            while written < round(end * opts.fps):
                emit(held)
        dst.mux(outs.encode())
    return buf.getvalue(), written, start or 0.0, width, height


def _encode_audio(path: str, video_start: float, opts: ShardOptions) -> tuple[bytes, int]:
    """First audio track -> 16-bit mono FLAC at opts.sample_rate, starting with the first video frame."""
    chunks: list[np.ndarray] = []
    start: float | None = None
    resampler = av.AudioResampler(format="s16", layout="mono", rate=opts.sample_rate)
    with av.open(path) as src:
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
    """One WebDataset sample (bytes values) for `source`; raises Skip with the reason."""
    try:
        container = av.open(source.path)
    except (av.FFmpegError, OSError, ValueError) as e:
        if isinstance(e, av.EOFError) or _cut_short(source.path):
            raise Skip(f"truncated: the file is cut short ({type(e).__name__}: {e})", "truncated") from e
        raise Skip(f"unreadable: {type(e).__name__}: {e}", "corrupt") from e
    with container:
        if not container.streams.video:
            raise Skip("no video track", "no_video")
        if not container.streams.audio:
            raise Skip("no audio track", "no_audio")
        if container.duration is not None and container.duration / 1e6 < opts.min_duration:
            raise Skip(f"too short: {container.duration / 1e6:.2f}s < {opts.min_duration}s", "too_short")
        copy = _conforms(container.streams.video[0], opts)
    try:
        video, frames, v_start, width, height = (copy_video if copy else encode_video)(source.path, opts)
        if frames == 0:
            raise Skip("video track has no decodable frames", "corrupt")
        duration = frames / opts.fps
        if duration < opts.min_duration:
            raise Skip(f"too short: {duration:.2f}s < {opts.min_duration}s", "too_short")
        audio, n_audio = _encode_audio(source.path, v_start, opts)
    except av.FFmpegError as e:
        cut = isinstance(e, av.EOFError) or _cut_short(source.path)
        raise Skip(f"undecodable: {type(e).__name__}: {e}", "truncated" if cut else "corrupt") from e
    # The decoders refuse audio shorter than 90% of the clip (kind truncated): say so here.
    if n_audio < 0.9 * duration * opts.sample_rate:
        raise Skip(f"audio track too short: {n_audio / opts.sample_rate:.2f}s for {duration:.2f}s of video",
                   "truncated")

    meta: dict[str, Any] = {
        "frames": frames, "fps": opts.fps, "duration": duration, "sample_rate": opts.sample_rate,
        "audio_samples": n_audio, "width": width, "height": height, "codec": opts.codec,
        "source": source.path, "stream_copied": copy,
    }
    if source.label:
        meta["label"] = (labels or {}).get(source.label, source.label)
        if not re.fullmatch(r"-?\d+", source.label):
            meta["class_name"] = source.label
    for name in ("speaker", "description"):
        if getattr(source, name):
            meta[name] = getattr(source, name)
    meta.update(source.extra)
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


def _results(jobs: list[tuple[MediaInput, ShardOptions, dict[str, int]]],
             workers: int) -> Iterator[dict[str, Any] | tuple[str, str]]:
    if workers <= 1:
        yield from map(_job, jobs)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
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
                 workers: int = 1, progress: bool = True, overwrite: bool = False) -> Report:
    """Convert `sources` into shards at `out` (folder or fsspec URL); returns what happened.

    Clips are sharded in the order `shuffled(sources, opts.shuffle_seed)`. `out` is claimed first
    (claim_out): a folder that is not vaemo-shard's to fill raises FolderInUseError, unless
    `overwrite` (moved aside, never deleted)."""
    if opts.codec not in CODECS:
        raise ValueError(f"codec {opts.codec!r} not supported; choose one of {sorted(CODECS)}")
    out = out.rstrip("/")
    check_writable(out)
    claim_out(out, overwrite)
    report = Report(out=storage.redact(out), inputs=len(sources))
    start = time.perf_counter()
    labels, class_names = label_table(sources)  # over all inputs; narrowed to the accepted below
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
    if used != class_names:
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
        "options": asdict(opts),
    }
    if class_names:
        manifest["class_names"] = class_names  # the accepted clips' names, label i = class_names[i]
    record = {**asdict(report), "skipped_by_reason": report.by_reason(), "skipped_by_kind": report.by_kind()}
    storage.write_bytes(f"{out}/{REPORT_NAME}", json.dumps(record, indent=2).encode())
    shard_set.write_manifest(manifest, sort_keys=False)  # last: it says the set is complete
    return report


# --------------------------------------------------------------------------------------------
# Command line (registered as `vaemo-shard`)


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
    p.add_argument("input", help="a folder of videos, or a CSV with columns path[,label,speaker,description]")
    p.add_argument("--out", required=True,
                   help="output folder or fsspec URL (s3://bucket/prefix); a new or empty folder")
    p.add_argument("--overwrite", action="store_true",
                   help="if --out holds anything, move it aside to <out>.old-<timestamp> (never deleted)")
    p.add_argument("--size", type=int, default=d.size, help="short side in pixels, 0 keeps it")
    p.add_argument("--fps", type=int, default=d.fps, help="frames per second of the shards' video")
    p.add_argument("--codec", choices=sorted(CODECS), default=d.codec, help="video codec of the shards")
    p.add_argument("--crf", type=int, default=d.crf, help="encoder quality, lower is better")
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
    args = p.parse_args(argv)
    if args.clips_per_shard < 1 or args.fps < 1 or args.size < 0:
        p.error("--clips-per-shard and --fps must be >= 1, --size >= 0")
    opts = ShardOptions(size=args.size, fps=args.fps, codec=args.codec, crf=args.crf,
                        min_duration=args.min_duration, clips_per_shard=args.clips_per_shard,
                        prefix=args.prefix, shuffle_seed=None if args.no_shuffle else args.shuffle_seed)
    storage.configure(endpoint=args.s3_endpoint)
    try:
        sources = media_inputs(args.input)
        report = write_shards(sources, args.out, opts, workers=args.workers, progress=not args.no_progress,
                              overwrite=args.overwrite)
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
