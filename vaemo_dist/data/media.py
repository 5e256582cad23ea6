"""The one table of media files: which file extensions are video and which audio, and which WebDataset
field holds a clip's video or audio.

Every question "is this a video (audio) file?" and "which field holds the video?" is answered here:
vaemo-shard's input listing and the probe's, embed's and predict's (vaemo_dist/data/sources.py), the
shard-spec check that points raw media at vaemo-shard (data/shards.py), the training decoders
(data/decode_pyav.py, data/decode_dali.py), fine-tuning's training clips and vaemo-describe. A folder
one of them sees as media is seen the same by all.

Files: `VIDEO_EXTS`, `AUDIO_EXTS`, `IMAGE_EXTS` (frame images of a frame-folder clip) (lower case, with
the dot). Shard fields: the decoders read a clip's
video from the first of `VIDEO_FIELDS` present and its audio from the first of `AUDIO_FIELDS`; a video
file of another extension is stored under "mp4" (FFmpeg finds the container from the bytes, so the name
only has to be one the decoders read), audio of another format is re-encoded to FLAC.

A clip laid out as our shards are, as files: `<stem>.mp4` (or any video), its audio beside it as
`<stem>.flac` / `<stem>.wav` (`audio_source`), its json as `<stem>.json` (`sidecar_meta`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VIDEO_EXTS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
AUDIO_EXTS = (".flac", ".wav", ".mp3", ".m4a", ".aac", ".ogg", ".opus")
MEDIA_EXTS = VIDEO_EXTS + AUDIO_EXTS
SIBLING_AUDIO_EXTS = (".flac", ".wav")  # a video file's audio beside it, in the order looked for
IMAGE_EXTS = (".jpg", ".jpeg", ".png")  # frames of a frame-folder clip (data/frames.py), sorted by name

# WebDataset fields, in the order the decoders look for them.
VIDEO_FIELDS = ("mp4", "webm", "mkv", "mov", "avi")
AUDIO_FIELDS = ("flac", "wav")  # what the training decoders read; other audio is re-encoded to FLAC
ANY_AUDIO_FIELDS = tuple(ext[1:] for ext in AUDIO_EXTS)  # audio of any format (sent on as it is)
DEFAULT_VIDEO_FIELD = "mp4"


def suffix(path: str | Path) -> str:
    """The extension of `path`, lower case, with the dot ("" for none)."""
    return Path(path).suffix.lower()


def is_video(path: str | Path) -> bool:
    return suffix(path) in VIDEO_EXTS


def is_audio(path: str | Path) -> bool:
    return suffix(path) in AUDIO_EXTS


def is_image(path: str | Path) -> bool:
    return suffix(path) in IMAGE_EXTS


def is_media(path: str | Path) -> bool:
    return suffix(path) in MEDIA_EXTS


def video_field(path: str | Path) -> str:
    """The WebDataset field a video file's bytes are stored under: its extension where the decoders
    read that field, else "mp4"."""
    field = suffix(path)[1:]
    return field if field in VIDEO_FIELDS else DEFAULT_VIDEO_FIELD


def audio_field(path: str | Path) -> str | None:
    """The WebDataset field an audio file's bytes are stored under as they are, or None when the
    decoders do not read that format (decode and re-encode it as FLAC)."""
    field = suffix(path)[1:]
    return field if field in AUDIO_FIELDS else None


def audio_source(path: str | Path) -> Path:
    """Where the audio of media file `path` comes from: a sibling .flac/.wav, else the file itself."""
    path = Path(path)
    if is_video(path):
        for ext in SIBLING_AUDIO_EXTS:
            sibling = path.with_suffix(ext)
            if sibling.is_file():
                return sibling
    return path


def sidecar_meta(path: str | Path) -> dict[str, Any]:
    """A sibling `<stem>.json` (frames, duration), as our shards carry; {} when there is none."""
    meta_file = Path(path).with_suffix(".json")
    if not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
