"""CPU decoding of one WebDataset sample (video + audio + json) into a `Clip`, with PyAV.

Video: `inputs.video.frames` frames `inputs.video.stride` apart, the window centred in the clip
(deterministic); frames past the end repeat the last frame. Decoding starts at the keyframe at or
before the window's first frame where the stream allows it (`seek.frames_from`: short GOPs, e.g.
`vaemo-shard --keyint 25`), stops after the window's last frame, and only the window's frames are
converted to RGB (with `data.finish: device`, copied as YUV planes for the trainer's device instead).
Each frame is centre-cropped to a square and resized with torch's bilinear interpolation (antialias on,
which matters when shrinking), then scaled to [0, 1] and normalised with `inputs.video.mean/std`
(`video_tensor`).

Repeats (`data.repeats`, `decode_repeats`): one decode gives R samples whose windows are the centred
one moved by whole strides (`window_indices`), sharing decoded, converted and resized frames; their
audio windows go through one batched log-mel (`audio.log_mels`).

Audio: decoded to float32, channels averaged to mono, and the `log_mel` window (the number of
samples that gives `inputs.audio.frames` frames) is centred on the sampled video window so the
two modalities cover the same moment.

Every failure comes out as `DecodeError(key, reason, kind)`, so the loader can skip and count it
by kind. `DecodeLimits` (from `data.min_clip_s`, `data.max_clip_s`, `data.decode_timeout_s`) bounds
the work: clip length is checked against the container's metadata before decoding, and a sample
that takes longer than the time limit is abandoned (`timeout.deadline`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import av
import numpy as np
import torch
import torch.nn.functional as F

from vaemo_dist.config import AudioInput, InputConfig, VideoInput
from vaemo_dist.data.audio import fit_length, log_mels, mel_spec_params, normalise_log_mel
from vaemo_dist.data.finish import MATRICES, RAW_PIXEL_FORMATS, SITINGS, RawClip, normalisation, yuv_to_rgb
from vaemo_dist.data.media import AUDIO_FIELDS, VIDEO_FIELDS
from vaemo_dist.data.seek import frames_from, h264_nal_length
from vaemo_dist.data.timeout import DeadlineExceeded, deadline
from vaemo_dist.data.types import Clip, DecodeError, DecodeLimits

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
# 4:2:0 chroma siting for streams that do not record one (issue 18): left, the MPEG-2/H.264 default
# and where the pixels of our shards and of camera H.264 sit. FFmpeg's conversion reads "unspecified"
# as centre-sited: on VP9 WebMs without the tag, fringes of mean ~4/255, max ~76/255 at colour edges.
# An AVCodecContext option, applied when the decoder opens; decoders that read siting from the
# bitstream (H.264, HEVC, AV1) overwrite it with the stream's own, and a Matroska header's siting
# is honoured (_records_siting), so only streams that say nothing get the default.
DEFAULT_CHROMA_SITING = {"chroma_sample_location": "left"}
_EBML_MAGIC, _MKV_CLUSTER = b"\x1a\x45\xdf\xa3", b"\x1f\x43\xb6\x75"
_MKV_CHROMA_SITING = (b"\x55\xb7", b"\x55\xb8")  # ChromaSitingHorz, ChromaSitingVert element ids
# Windows starting less than this many seconds into a clip are decoded from its start: seeking could save
# at most a second of frames (~3 ms at 224 px and 25 fps), and proving a seek first reads every packet of
# the stream (~0.3 ms for 80 frames), so it pays only further in (long clips, vaemo-shard --keyint).
SEEK_FROM_S = 1.0
# Top-level box types of ISO BMFF files (mp4, mov, m4a): used to tell a cut-short mp4 from garbage.
_BMFF_TOP_BOXES = frozenset({b"ftyp", b"styp", b"moov", b"mdat", b"moof", b"mfra", b"free", b"skip", b"wide",
                             b"pnot", b"uuid", b"sidx", b"meta", b"pdin", b"prft", b"emsg"})

T = TypeVar("T")
log = logging.getLogger(__name__)


NO_LIMITS = DecodeLimits()  # for callers outside the data loader (pretrained.py)

def decode_sample(sample: dict[str, Any], inputs: InputConfig, limits: DecodeLimits | None = None,
                  raw: bool = False) -> Clip:
    """Decode a WebDataset sample dict into a Clip; raises only DecodeError on bad input.

    `limits` (default: none) bounds clip length and decode time; the loader passes the data config's.
    `raw`: as in `decode_repeats`.
    """
    return decode_repeats(sample, inputs, limits, 1, raw)[0]


def decode_repeats(sample: dict[str, Any], inputs: InputConfig, limits: DecodeLimits | None = None,
                   repeats: int = 1, raw: bool = False, crop_jitter: float = 0.0) -> list[Clip]:
    """`repeats` training samples of one decoded clip (`data.repeats`); raises only DecodeError.

    Repeat 0 is `decode_sample`'s clip (the centred window); repeat r samples the window shifted by
    whole strides (`window_indices`) where the clip is long enough, else the same window again (its
    masks still differ: they are drawn per sample). The video is decoded once up to the last frame
    any window needs, and each distinct frame is converted and resized once; the audio of every
    window goes through one batched log-mel. Repeat r > 0 has the key `<key>~r<r>` (`repeat_key`).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    key = str(sample.get("__key__", "<no key>"))
    limits = limits or NO_LIMITS
    return guarded(key, limits, lambda: _decode(key, sample, inputs, limits, repeats, raw, crop_jitter))


def repeat_key(key: str, repeat: int) -> str:
    """The key of repeat `repeat` of clip `key` in batches and key logs (repeat 0: the key itself)."""
    return key if repeat == 0 else f"{key}~r{repeat}"


def clip_of_key(key: str) -> str:
    """The clip a batch key belongs to (`repeat_key` undone)."""
    head, sep, tail = key.rpartition("~r")
    return head if sep and tail.isdigit() else key


def guarded(key: str, limits: DecodeLimits, work: Callable[[], T]) -> T:
    """Run one sample's decode (or probe) under `limits.timeout_s`, turning every failure into a
    DecodeError with a kind: the single wrapper both decoders use."""
    try:
        with deadline(limits.timeout_s):
            return work()
    except DecodeError:
        raise
    except DeadlineExceeded as e:
        raise DecodeError(key, f"abandoned after {limits.timeout_s:g} s (data.decode_timeout_s): "
                               "decoding hung or was too slow", kind="timeout") from e
    except Exception as e:  # anything FFmpeg, numpy or torch raise means "this sample is bad"
        raise DecodeError(key, f"undecodable sample ({type(e).__name__}: {e})") from e


def sample_indices(total: int, frames: int, stride: int) -> list[int]:
    """Frame indices of a window of `frames` frames `stride` apart, centred in `total` frames.

    Indices past the end are clamped to the last frame (edge padding for short clips).
    """
    return window_indices(total, frames, stride, 0)


def window_shift(repeat: int) -> int:
    """Strides by which repeat `repeat`'s window moves from the centred one: 0, +1, -1, +2, -2, ..."""
    return (repeat + 1) // 2 * (1 if repeat % 2 else -1)


def window_indices(total: int, frames: int, stride: int, repeat: int = 0) -> list[int]:
    """Frame indices of repeat `repeat`'s window: the centred window (`sample_indices`) moved by
    `window_shift(repeat)` strides, clamped to lie inside the clip (so in a clip too short to move it,
    every repeat gets the centred window). Shifts by whole strides let repeats share decoded frames."""
    span = (frames - 1) * stride + 1
    centre = max(0, (total - span) // 2)
    start = min(max(centre + window_shift(repeat) * stride, 0), max(0, total - span))
    return [min(start + i * stride, total - 1) for i in range(frames)]


def crop_box(key: str, repeat: int, height: int, width: int, jitter: float) -> tuple[int, int, int]:
    """(top, left, side) of the square repeat `repeat` of clip `key` crops from its frames: the centre
    square of side min(height, width) for repeat 0 or without jitter; else a square whose side is drawn
    from [(1 - jitter) x, x] (x = min(height, width)) and whose place is drawn uniformly inside the
    frame, from a generator seeded by the key and the repeat, so every pass and every resume draws the
    same box."""
    side = min(height, width)
    if repeat == 0 or jitter <= 0:
        return (height - side) // 2, (width - side) // 2, side
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng([seed, repeat])
    side = max(1, int(round(side * (1.0 - jitter * rng.random()))))
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side


def _decode(key: str, sample: dict[str, Any], inputs: InputConfig, limits: DecodeLimits,
            repeats: int = 1, raw: bool = False, crop_jitter: float = 0.0) -> list[Clip]:
    meta = _read_json(key, sample.get("json"))
    video_data = _field(key, sample, VIDEO_FIELDS, "video")
    audio_data = _field(key, sample, AUDIO_FIELDS, "audio")
    promised = _optional_int(key, meta, "frames")
    label = _optional_int(key, meta, "label")

    colour = None
    if raw and meta.get("chroma_siting") not in SITINGS:
        _say_once("clips without a chroma_siting in their json (shards written before it was recorded, or "
                  "by another tool) are finished in the loader, not on the device: re-shard them or add it")
    elif raw:
        planes = _PlaneCopier(meta["chroma_siting"])
        try:  # frames are copied while the decoder holds them (never after its context is closed)
            frames, windows, fps, total = _decode_av_frames(key, video_data, inputs.video, promised, limits,
                                                            repeats, planes)
            colour = planes.colour
        except _NotRaw as e:  # a frame finish.yuv_to_rgb cannot convert: this clip is finished here
            _say_once(f"clips with {e} are finished in the loader, not on the device")
            colour = None
    if colour is None:
        frames, windows, fps, total = _decode_av_frames(key, video_data, inputs.video, promised, limits,
                                                        repeats, _to_rgb)
    order = sorted(frames)  # every distinct frame once, converted (and resized) once
    where = {i: n for n, i in enumerate(order)}
    if colour is None:
        rgb = [frames[i] for i in order]
        video = video_tensor(rgb, inputs.video)
    else:  # per frame, so that collating copies each plane once, straight into the batch
        y = [torch.from_numpy(frames[i][0]) for i in order]
        u = [torch.from_numpy(frames[i][1]) for i in order]
        v = [torch.from_numpy(frames[i][2]) for i in order]
    del frames

    duration = float(meta.get("duration") or total / fps)
    # Centre of each sampled video window, in seconds (frame i spans [i, i + 1) / fps).
    centres = [(w[0] + w[-1] + 1) / 2.0 / fps for w in windows]
    wave = decode_audio_wave(key, audio_data, inputs.audio, meta.get("duration"), limits,
                             enough=window_ends(inputs.audio, centres))
    pieces = audio_windows(wave, inputs.audio, centres)
    audio = normalise_log_mel(log_mels(pieces, inputs.audio), inputs.audio) if colour is None else None

    clips = []
    for r, indices in enumerate(windows):
        pick = [where[i] for i in indices]
        info = {"fps": fps, "frames": total, "duration": duration, "frame_indices": indices, "repeat": r,
                "clip": key}
        if colour is None:
            if crop_jitter > 0 and r > 0:  # its own square: its own crop and resize
                v_r = video_tensor([rgb[n] for n in pick], inputs.video, crop_box(key, r, *rgb[0].shape[:2],
                                                                                   crop_jitter))
            elif pick == list(range(pick[0], pick[0] + len(pick))):  # windows on one stride lattice: a view
                v_r = video[:, pick[0] : pick[0] + len(pick)]
            else:
                v_r = video[:, pick]
            clips.append(Clip(key=repeat_key(key, r), video=v_r, audio=audio[r],
                              label=-1 if label is None else label, meta=info))
        else:
            rc = RawClip(y=[y[n] for n in pick], u=[u[n] for n in pick], v=[v[n] for n in pick],
                         colour=colour, crop=crop_box(key, r, *y[0].shape, crop_jitter), wave=pieces[r])
            clips.append(Clip(key=repeat_key(key, r), video=None, audio=None,
                              label=-1 if label is None else label, meta=info, raw=rc))
    return clips


class _NotRaw(Exception):
    """A frame `finish.yuv_to_rgb` cannot convert exactly as swscale would (the message says why)."""


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """Log a data.finish=device fallback once per process (a worker's first such clip)."""
    if message not in _SAID:
        _SAID.add(message)
        log.warning("data.finish=device: %s (said once per worker)", message)


class _PlaneCopier:
    """Copies each kept frame's Y, U, V planes (uint8 [H, W], [H/2, W/2] x 2) while decoding, and learns
    the colour `finish.yuv_to_rgb` needs: (Kr, Kb, full range, left-sited). Raises _NotRaw on a frame it
    cannot convert as swscale would: not 8-bit 4:2:0, odd sides, a matrix outside `finish.MATRICES`, or
    a format, size, matrix or range other than the first frame's. The siting is the clip json's
    `chroma_siting` (written by vaemo-shard): PyAV cannot read the decoder's."""

    def __init__(self, siting: str) -> None:
        self.left = float(siting == "left")
        self.first: tuple[Any, ...] | None = None
        self.colour: tuple[float, float, float, float] | None = None

    def __call__(self, frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fmt, w, h = frame.format.name, frame.width, frame.height
        ident = (fmt, w, h, int(frame.colorspace), int(frame.color_range))
        if self.first is None:
            full = RAW_PIXEL_FORMATS.get(fmt)
            if full is None or w % 2 or h % 2 or ident[3] not in MATRICES:
                raise _NotRaw(f"pixel format {fmt} at {w}x{h}, colour matrix code {ident[3]} (the device "
                              "converts 8-bit 4:2:0 of even sides, BT.601/BT.709)")
            self.first = ident
            kr, kb = MATRICES[ident[3]]
            self.colour = (kr, kb, float(full or ident[4] == 2), self.left)  # 2: AVCOL_RANGE_JPEG
        elif ident != self.first:
            raise _NotRaw("frames whose format, size, matrix or range change mid-stream")
        out = []
        shapes = ((h, w), (h // 2, w // 2), (h // 2, w // 2))
        for plane, (rows, cols) in zip(frame.planes, shapes, strict=True):
            a = np.frombuffer(plane, np.uint8)
            out.append(a.reshape(-1, plane.line_size)[:rows, :cols].copy())
        return out[0], out[1], out[2]


def probe_siting(data: bytes, frames: int = 8) -> str:
    """The 4:2:0 chroma siting ("left" or "center") the decoder gives this video's frames, for the json of
    a stream-copied clip (PyAV cannot read it): the first `frames` frames are converted both ways by
    `finish.yuv_to_rgb` and compared with swscale's conversion (which reads the decoder's siting). "left"
    (the MPEG-2/H.264 default) when the two cannot be told apart or the frames are not 8-bit 4:2:0."""
    error = {"left": 0.0, "center": 0.0}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if not _records_siting(data):
            stream.codec_context.options = dict(DEFAULT_CHROMA_SITING)
        for n, frame in enumerate(container.decode(stream)):
            copier = _PlaneCopier("left")
            try:
                y, u, v = copier(frame)
            except _NotRaw:
                return "left"
            ref = torch.from_numpy(_to_rgb(frame)).float().permute(2, 0, 1)
            planes = [torch.from_numpy(p)[None, None] for p in (y, u, v)]
            for siting in error:
                colour = torch.tensor([[*copier.colour[:3], float(siting == "left")]])
                error[siting] += float((yuv_to_rgb(*planes, colour)[0, :, 0] - ref).abs().sum())
            if n + 1 >= frames:
                break
    return "center" if error["center"] < error["left"] else "left"


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24", interpolation=RGB_CONVERSION)


# --------------------------------------------------------------------------------------------
# Fields and json


def _field(key: str, sample: dict[str, Any], names: tuple[str, ...], what: str) -> bytes:
    for name in names:
        if name in sample and sample[name] is not None:
            data = sample[name]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise DecodeError(key, f"{what} field '{name}' holds {type(data).__name__}, not bytes",
                                  kind="corrupt")
            if len(data) == 0:
                raise DecodeError(key, f"{what} field '{name}' is empty (zero-length)", kind="empty")
            return bytes(data)
    raise DecodeError(key, f"no {what} (expected one of the fields {', '.join(names)})", kind=f"no_{what}")


def _read_json(key: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):  # already decoded upstream
        return raw
    try:
        meta = json.loads(bytes(raw).decode("utf-8") if not isinstance(raw, str) else raw)
    except (ValueError, TypeError) as e:
        raise DecodeError(key, f"unparsable json ({e})", kind="metadata") from e
    if not isinstance(meta, dict):
        raise DecodeError(key, f"json is a {type(meta).__name__}, expected an object", kind="metadata")
    return meta


def _optional_int(key: str, meta: dict[str, Any], name: str) -> int | None:
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DecodeError(key, f"json '{name}' should be an integer, got {value!r}", kind="metadata")
    return int(value)


# --------------------------------------------------------------------------------------------
# Containers


# What opening a video asks of the decoders FFmpeg runs to learn the streams' parameters
# (avformat_find_stream_info): key frames only. Opening then costs ~0.3 ms instead of ~1 ms for a 224-px
# H.264 clip (it used to decode the first pictures, which the real decode then decodes again); the size
# still comes from the container or a key frame. The decoders that decode the clip are separate codec
# contexts made from the stream's parameters, untouched by this (tests/data/test_decode_pyav.py).
VIDEO_PROBE = {"skip_frame": "nonkey"}


def open_container(key: str, data: bytes, what: str) -> av.container.InputContainer:
    """Open in-memory media for reading; DecodeError `truncated` or `corrupt` if FFmpeg cannot.
    `what`: "video" (probed with VIDEO_PROBE) or "audio"."""
    try:
        return av.open(io.BytesIO(data), mode="r", options=VIDEO_PROBE if what == "video" else None)
    except (av.FFmpegError, ValueError, OSError) as e:
        cut = isinstance(e, av.EOFError) or _bmff_cut_short(data)
        raise DecodeError(key, f"{what}: cannot open container{' (cut short)' if cut else ''} "
                               f"({type(e).__name__}: {e})", kind="truncated" if cut else "corrupt") from e


def _bmff_cut_short(data: bytes) -> bool:
    """Whether `data` is a well-formed run of mp4 boxes whose last box runs past the end.

    FFmpeg reports an mp4 cut before its index (moov) exactly like garbage ("Invalid data"); the box
    structure tells them apart: truncation keeps every box header intact up to the cut.
    """
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] not in _BMFF_TOP_BOXES:
            return False  # not a top-level box: the bytes are broken (or not mp4), not missing
        if size == 1:  # 64-bit size after the type
            if pos + 16 > len(data):
                return True
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:  # the box runs to the end of the file: nothing can be missing
            return False
        if size < 8:
            return False
        pos += size
    return pos != len(data) and pos > 0


def _records_siting(data: bytes) -> bool:
    """Whether a Matroska/WebM header (the bytes before the first cluster) records chroma siting."""
    if not data.startswith(_EBML_MAGIC):
        return False
    end = data.find(_MKV_CLUSTER)
    header = data[: end if end > 0 else 1 << 16]
    return any(element in header for element in _MKV_CHROMA_SITING)


def media_seconds(container: av.container.InputContainer, stream: av.stream.Stream, frames: int | None,
                  fps: float) -> float | None:
    """A stream's length in seconds from what is known without decoding: a frame count (the json's
    or the container's), else the stream's duration, else the container's; None if nothing says."""
    if frames and fps > 0:
        return frames / fps
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


# --------------------------------------------------------------------------------------------
# Video


def decode_video_frames(key: str, data: bytes, cfg: VideoInput, promised: int | None,
                  limits: DecodeLimits = NO_LIMITS) -> tuple[list[np.ndarray], list[int], float, int]:
    """Decode just the frames the window needs. Returns (rgb frames, indices, fps, total frames)."""
    kept, windows, fps, total = decode_video_windows(key, data, cfg, promised, limits, 1)
    return [kept[i] for i in windows[0]], windows[0], fps, total


def decode_video_windows(key: str, data: bytes, cfg: VideoInput, promised: int | None,
                         limits: DecodeLimits = NO_LIMITS, repeats: int = 1
                         ) -> tuple[dict[int, np.ndarray], list[list[int]], float, int]:
    """Decode the frames of `repeats` windows (`window_indices`) and no further than the last one
    needs. Returns ({frame index: rgb frame} for every index of any window, the windows' indices,
    fps, total frames). Only the frames in a window are converted to RGB (one swscale pass each)."""
    return _decode_av_frames(key, data, cfg, promised, limits, repeats, _to_rgb)


def _decode_av_frames(key: str, data: bytes, cfg: VideoInput, promised: int | None,
                      limits: DecodeLimits, repeats: int, convert: Callable[[av.VideoFrame], Any]
                      ) -> tuple[dict[int, Any], list[list[int]], float, int]:
    """`decode_video_windows` with `convert` applied to each kept frame as it is decoded."""
    with open_container(key, data, "video") as container:
        if not container.streams.video:
            raise DecodeError(key, "video: container has no video stream", kind="no_video")
        stream = container.streams.video[0]
        if not _records_siting(data):
            stream.codec_context.options = dict(DEFAULT_CHROMA_SITING)
        if stream.codec_context.width * stream.codec_context.height >= THREADED_DECODE_PIXELS:
            stream.thread_type = "AUTO"  # frame + slice threads where the codec supports them
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        # Frame count: json first (cheap and the contract), then the container's index.
        total = promised or stream.frames or None
        seconds = media_seconds(container, stream, total, fps)
        if seconds is not None:  # before decoding anything: never decode hours of video to skip them
            limits.check_length(key, seconds)
        # Without any length metadata the whole stream is decoded: stop once it is too long.
        max_frames = limits.max_clip_s * fps

        def windows_of(n: int) -> list[list[int]]:
            return [window_indices(n, cfg.frames, cfg.stride, r) for r in range(repeats)]

        windows = windows_of(total) if total else None
        wanted = {i for w in windows for i in w} if windows else None
        last_needed = max(wanted) if wanted else None

        kept: dict[int, Any] = {}
        last_frame: av.VideoFrame | None = None
        decoded = 0
        try:
            # From the keyframe at or before the first wanted frame where the stream's GOPs and
            # timestamps allow it (seek.frames_from; shards written with vaemo-shard --keyint), else from
            # the start; `index` is always the frame's place in a decode from the start.
            # Where every packet can be read first anyway, H.264 pictures that no wanted frame needs are
            # not decoded at all (seek.frames_from's `wanted`).
            first = min(wanted) if wanted else 0
            if wanted is not None and (first >= SEEK_FROM_S * fps or h264_nal_length(stream) is not None):
                frames = frames_from(container, stream, first, fps, wanted)
            else:
                frames = enumerate(container.decode(stream))
            for index, frame in frames:
                if wanted is None or index in wanted:
                    kept[index] = convert(frame)
                last_frame = frame
                decoded = index + 1
                if last_needed is not None and decoded > last_needed:
                    break  # nothing after the windows is needed
                if decoded > max_frames:
                    limits.check_length(key, decoded / fps)
        except av.FFmpegError as e:
            if decoded == 0:
                raise DecodeError(key, f"video: decoding failed ({type(e).__name__}: {e})",
                                  kind="corrupt") from e
            # A broken packet mid-stream: keep what decoded, the truncation check below decides.
        # A stream that ends before the windows do lends its last frame to the missing ones: converted
        # here, while the decoder holds it (a frame's planes are not to be read after the container closes).
        tail = None
        short = wanted is not None and decoded <= max(wanted)
        if short and last_frame is not None and decoded - 1 not in kept:
            tail = convert(last_frame)

    if decoded == 0 or last_frame is None:
        raise DecodeError(key, "video: no decodable frames", kind="corrupt")
    if windows is None:  # no frame count anywhere: the whole stream was decoded
        total = decoded
        limits.check_length(key, total / fps)
        windows = windows_of(total)
        needed = {i for w in windows for i in w}
        kept = {i: f for i, f in kept.items() if i in needed}
    elif decoded <= max(wanted):
        # The stream ended before the windows did: fine if roughly as long as promised.
        if decoded < MIN_DECODED_FRACTION * total:
            raise DecodeError(
                key, f"video truncated: decoded {decoded} frames but {total} were promised", kind="truncated"
            )
        if tail is not None:
            kept[decoded - 1] = tail
        windows = [[min(i, decoded - 1) for i in w] for w in windows]
    assert total is not None
    return kept, windows, fps, total


def video_tensor(frames: list[np.ndarray] | np.ndarray, cfg: VideoInput,
                 crop: tuple[int, int, int] | None = None) -> torch.Tensor:
    """uint8 RGB frames ([H, W, 3] each) -> float32 [3, T, size, size], centre square crop (or `crop`:
    top, left, side), resized (torch's bilinear interpolation, antialiased when shrinking), normalised.

    The work is laid out for one core: the crop is a view, the only full-resolution copy is the
    uint8 -> float conversion straight into channel-first order [3, T, side, side] (which is then
    also the output layout: no permute after the resize), and normalisation is one in-place
    multiply-add on the output.
    """
    arr = np.stack(frames) if isinstance(frames, list) else np.asarray(frames)  # [T, H, W, 3]
    h, w = arr.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    if crop is not None:
        top, left, side = crop
    # Cropping the square first then resizing equals "short side to size, then centre crop",
    # and resizes fewer pixels.
    x = torch.from_numpy(arr[:, top : top + side, left : left + side]).permute(3, 0, 1, 2)
    x = x.to(torch.float32, memory_format=torch.contiguous_format)  # [3, T, side, side]
    if side != cfg.size:
        # Antialiasing only changes the result when shrinking, and costs ~3x when enlarging.
        x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False,
                          antialias=side > cfg.size)
    scale, shift = normalisation(cfg, x.device)
    return x.mul_(scale).add_(shift)


# --------------------------------------------------------------------------------------------
# Audio


def decode_audio_wave(key: str, data: bytes, cfg: AudioInput, duration: Any,
                  limits: DecodeLimits = NO_LIMITS, enough: int | None = None) -> np.ndarray:
    """The audio stream as float32 mono at cfg.sample_rate: all of it, or with `enough`, the frames up to
    the first that reaches `enough` samples (`window_ends`: what the windows need; every window then
    cuts the same samples as from the whole stream). Truncation is judged only on a stream decoded to
    its end."""
    chunks: list[np.ndarray] = []
    with open_container(key, data, "audio") as container:
        if not container.streams.audio:
            raise DecodeError(key, "audio: container has no audio stream", kind="no_audio")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        if rate != cfg.sample_rate:
            raise DecodeError(
                key, f"audio: sample rate {rate} Hz, expected {cfg.sample_rate} Hz "
                "(resampling is not implemented yet)", kind="sample_rate"
            )
        # Only the upper bound: audio shorter than its clip is caught as truncation below.
        seconds = media_seconds(container, stream, None, 0.0)
        if seconds is not None:
            limits.check_length(key, seconds, "audio", minimum=False)
        max_samples, n = limits.max_clip_s * rate, 0  # for streams without length metadata
        to_float: av.AudioResampler | None = None  # for sample formats _SAMPLE_SCALE does not list
        runs: list[tuple[tuple[str, bool, int], list[np.ndarray]]] = []  # frames as decoded, by format
        try:
            for frame in container.decode(stream):
                if frame.format.name.rstrip("p") in _SAMPLE_SCALE:
                    fmt = (frame.format.name, frame.format.is_planar, len(frame.layout.channels))
                    if not runs or runs[-1][0] != fmt:
                        runs.append((fmt, []))
                    runs[-1][1].append(frame.to_ndarray())  # planar: [channels, n]; packed: [1, n * ch]
                else:
                    to_float = to_float or av.AudioResampler(format="fltp")  # same layout and rate
                    runs.append((("fltp", True, len(frame.layout.channels)),
                                 [f.to_ndarray() for f in to_float.resample(frame)]))
                n += frame.samples
                if enough is not None and n >= enough:
                    break  # the windows need nothing after this frame
                if n > max_samples:
                    limits.check_length(key, n / rate, "audio", minimum=False)
            if to_float is not None:
                runs.append((("fltp", True, 1), [f.to_ndarray() for f in to_float.resample(None)]))
        except av.FFmpegError as e:
            if not runs:
                raise DecodeError(key, f"audio: decoding failed ({type(e).__name__}: {e})",
                                  kind="corrupt") from e
    chunks = [_to_float(fmt, arrays) for fmt, arrays in runs if arrays]
    if not chunks:
        raise DecodeError(key, "audio: no decodable samples", kind="corrupt")
    if len({c.shape[0] for c in chunks}) > 1:  # the channel count changed mid-stream: mono per chunk
        chunks = [c.mean(axis=0, keepdims=True, dtype=np.float32) for c in chunks]
    joined = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=1)
    # [channels, n] -> mono (a mono stream's only channel as it is)
    wave = joined[0] if joined.shape[0] == 1 else joined.mean(axis=0, dtype=np.float32)
    if wave.size == 0:
        raise DecodeError(key, "audio: no decodable samples", kind="corrupt")
    if isinstance(duration, (int, float)) and duration > 0 and (enough is None or wave.size < enough):
        expected = duration * cfg.sample_rate
        if wave.size < MIN_DECODED_FRACTION * expected:
            raise DecodeError(
                key, f"audio truncated: decoded {wave.size} samples but {expected:.0f} were promised",
                kind="truncated"
            )
    return wave


# Float scale of the sample formats converted without a resampler (integers to [-1, 1)).
_SAMPLE_SCALE = {"s16": 1.0 / 32768.0, "s32": 1.0 / 2147483648.0, "flt": 1.0, "dbl": 1.0}


def _to_float(fmt: tuple[str, bool, int], arrays: list[np.ndarray]) -> np.ndarray:
    """Consecutive frames of one sample format as float32 [channels, n], converted in one pass (cheaper
    than a resampler or than converting frame by frame)."""
    name, planar, channels = fmt
    data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)
    if not planar:
        data = data.reshape(-1, channels).T
    scale = _SAMPLE_SCALE.get(name.rstrip("p"), 1.0)
    out = data.astype(np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def audio_tensor(wave: np.ndarray, cfg: AudioInput, centre_s: float) -> torch.Tensor:
    """Normalised log-mel [1, frames, n_mels] of the window centred at `centre_s` seconds."""
    return audio_tensors(wave, cfg, [centre_s])[0]


def audio_tensors(wave: np.ndarray, cfg: AudioInput, centres_s: list[float]) -> torch.Tensor:
    """`audio_tensor` of each window centre, [len(centres_s), 1, frames, n_mels], one batched log-mel."""
    return normalise_log_mel(log_mels(audio_windows(wave, cfg, centres_s), cfg), cfg)


def _window_offset(centre_s: float, cfg: AudioInput, n: int) -> int:
    return max(int(round(centre_s * cfg.sample_rate - n / 2)), 0)


def window_ends(cfg: AudioInput, centres_s: list[float]) -> int:
    """How many samples from the start the windows around `centres_s` need: a waveform at least this
    long gives every window (`audio_windows`) the samples the whole stream would."""
    n = mel_spec_params(cfg).num_samples
    return max(_window_offset(c, cfg, n) for c in centres_s) + n


def audio_windows(wave: np.ndarray, cfg: AudioInput, centres_s: list[float]) -> torch.Tensor:
    """The waveform window the log-mel needs around each centre, [len(centres_s), n] float32: clamped
    into the clip, zero-padded at the end where the clip is shorter."""
    n = mel_spec_params(cfg).num_samples
    full = torch.from_numpy(wave)
    pieces = []
    for centre_s in centres_s:
        offset = min(_window_offset(centre_s, cfg, n), max(wave.size - n, 0))
        pieces.append(fit_length(full, n, offset))
    return torch.stack(pieces)
