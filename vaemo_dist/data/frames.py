"""The frames of a clip, from a video file or from a frame folder, for vaemo-shard's encoder.

A frame folder is a directory of .jpg/.jpeg/.png images (data/media.py `IMAGE_EXTS`), one frame
each, in the order of their file names, at a given frame rate (default 25): the layout MAFW and DFEW
face frames and HiCMAE's data lists give. Its audio comes from a separate file (MediaInput.audio).

`open_frames(path, fps)` opens either kind and yields a `Frames`: an iterator of av.VideoFrame whose
`.time` is the frame's start in seconds (a video's own timestamps; a folder's frame i at i / fps),
the source frame rate, and the first frame's width and height. Images are decoded with PyAV (FFmpeg's
image2 demuxer reads one image file as a one-frame video).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from vaemo_dist.data.media import IMAGE_EXTS

DEFAULT_FPS = 25.0


def frame_files(folder: str | Path) -> list[Path]:
    """The frame images directly in `folder`, sorted by name (natural order for numbered names of
    different widths: 2.jpg before 10.jpg)."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: (len(p.stem), p.stem) if p.stem.isdigit() else (0, p.name))


def is_frame_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding at least one frame image."""
    path = Path(path)
    return path.is_dir() and bool(frame_files(path))


def read_image(path: str | Path) -> av.VideoFrame:
    """One image file as a frame (raises av.FFmpegError / OSError when it cannot be read)."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            return frame
    raise av.InvalidDataError(0, f"no image in {path}")  # type: ignore[call-arg]


@dataclass
class Frames:
    frames: Iterator[av.VideoFrame]  # each with .time (seconds from the source's clock)
    rate: float  # source frames per second
    width: int
    height: int
    count: int | None = None  # frames in a folder; None for a video file (not known before decoding)


@contextmanager
def open_frames(path: str | Path, fps: float = 0.0, fallback: float = DEFAULT_FPS) -> Iterator[Frames]:
    """The frames of a video file or a frame folder (`fps`: the folder's rate, 0 = 25; ignored for a
    video file, whose own rate is read, `fallback` where the file states none). Raises
    FileNotFoundError for a folder without frame images."""
    path = Path(path)
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no frame images ({', '.join(IMAGE_EXTS)})")
        rate = float(fps) if fps and fps > 0 else DEFAULT_FPS
        first = read_image(files[0])
        time_base = Fraction(rate).limit_denominator(1001) ** -1

        def folder_frames() -> Iterator[av.VideoFrame]:
            for i, file in enumerate(files):
                frame = first if i == 0 else read_image(file)
                frame.pts, frame.time_base = i, time_base
                yield frame

        yield Frames(folder_frames(), rate, first.width, first.height, len(files))
        return
    with av.open(str(path)) as src:
        ins = src.streams.video[0]
        rate = float(ins.average_rate or ins.guessed_rate or fallback)
        yield Frames(src.decode(ins), rate, ins.codec_context.width, ins.codec_context.height)
