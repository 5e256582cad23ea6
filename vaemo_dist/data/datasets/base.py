"""What every dataset adapter shares: the `Dataset` interface, the `Listing` it returns, keys, and the
helpers that find a corpus's clips on disk and read official fold lists.

An adapter reads a corpus in its distributed layout and lists its clips as `MediaInput`s for
vaemo-shard: `label` the class name (one of the adapter's `class_names`, whose order is the label
order), `speaker`, `extra` holding the dataset's own ids (`clip_id` always), `dataset` (the adapter's
name) and `fold` (the clip's standard test fold, "1".."N", where the protocol has folds whose test sets
partition the corpus). What it does not use is listed in `Listing.skipped` with a reason and a kind
(`SKIP_KINDS`), never dropped silently. Reasons start with a short phrase before a colon ("known
broken: ...", "no audio: ..."), which vaemo-shard counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av

from vaemo_dist.data.media import AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS
from vaemo_dist.data.sources import MediaInput

SKIP_KINDS = (
    "known_broken",  # on the dataset's own list of broken clips
    "no_audio",  # no audio track and no separate audio file
    "missing",  # named by a label/split file but not found on disk
    "unlabelled",  # found on disk but in no label/split file
    "unparsable",  # a file name that does not follow the corpus's naming
    "excluded",  # not selected by the adapter's options (e.g. RAVDESS song or audio-only files)
)


class DatasetError(ValueError):
    """The corpus cannot be read as this dataset (wrong root, inconsistent label or fold files)."""


@dataclass
class Listing:
    inputs: list[MediaInput] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason", "kind"}

    def skip(self, path: str | Path, reason: str, kind: str) -> None:
        assert kind in SKIP_KINDS, kind
        self.skipped.append({"path": str(path), "reason": reason, "kind": kind})

    def folds(self) -> dict[str, str]:
        """Sample key -> test fold, for the clips that have one."""
        return {i.key: i.extra["fold"] for i in self.inputs if i.extra.get("fold")}


class Dataset:
    """One corpus. Subclasses set the class attributes and implement `_list`."""

    name: str = ""
    class_names: tuple[str, ...] = ()  # the label order
    num_folds: int = 0  # standard folds (0: none)
    protocol: str = ""  # how the folds are made, in words
    options: tuple[str, ...] = ()  # the option names `inputs` accepts

    def inputs(self, root: str | Path, **options: Any) -> Listing:
        """The clips of the corpus at `root`, in a stable order (sorted by clip id)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise DatasetError(f"{self.name}: unknown option(s) {unknown}; it takes {list(self.options)}")
        root = Path(root)
        if not root.exists():
            raise DatasetError(f"{self.name}: {root} does not exist")
        listing = self._list(root, **options)
        listing.inputs.sort(key=lambda i: i.key)
        keys = [i.key for i in listing.inputs]
        if len(set(keys)) != len(keys):
            raise DatasetError(f"{self.name}: clip keys are not unique under {root}")
        return listing

    def _list(self, root: Path, **options: Any) -> Listing:
        raise NotImplementedError

    def speaker_of(self, clip_id: str) -> str:
        """The speaker encoded in a clip id, where the naming carries one ("" otherwise)."""
        return ""

    def manifest_entry(self) -> dict[str, Any]:
        """What vaemo-shard records about the dataset in manifest.json."""
        entry: dict[str, Any] = {"name": self.name, "class_names": list(self.class_names)}
        if self.num_folds:
            entry["folds"], entry["protocol"] = self.num_folds, self.protocol
        return entry

    def clip(self, clip_id: str, path: str | Path, *, label: str = "", speaker: str = "", fold: str = "",
             audio: str | Path = "", fps: float = 0.0, **ids: str) -> MediaInput:
        """A MediaInput keyed `<name>-<clip id>` with the dataset's ids in `extra`."""
        extra = {"dataset": self.name, "clip_id": clip_id, **{k: str(v) for k, v in ids.items() if v != ""}}
        if fold:
            extra["fold"] = fold
        return MediaInput(path=str(path), key=clip_key(self.name, clip_id), label=label, speaker=speaker,
                          extra=extra, audio=str(audio) if audio else "", fps=fps)


def clip_key(dataset: str, clip_id: str) -> str:
    """A sample key: unique per clip id, stable, and without dots (WebDataset splits at the first)."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '', dataset)}-{re.sub(r'[^A-Za-z0-9_-]+', '_', clip_id).strip('_')}"


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def has_audio_track(path: str | Path) -> bool | None:
    """Whether a media file has an audio stream (None: it cannot be opened; the converter reports it)."""
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, OSError, ValueError):
        return None


@dataclass
class MediaIndex:
    """The media below a root, by normalised clip name: video files, frame folders, audio files."""

    videos: dict[str, list[Path]] = field(default_factory=dict)
    frames: dict[str, list[Path]] = field(default_factory=dict)
    audios: dict[str, list[Path]] = field(default_factory=dict)


def normal_name(stem: str) -> str:
    """A clip name for matching list entries to files: numbers compare by value ("25" == "00025")."""
    return str(int(stem)) if stem.isdigit() else stem


def index_media(root: Path, skip_dirs: Iterable[str] = ()) -> MediaIndex:
    """Every video file, frame folder and audio file below `root`, by normal_name of its stem (folder
    name), each list sorted."""
    index = MediaIndex()
    skip = set(skip_dirs)
    for path in sorted(root.rglob("*")):
        if skip & set(path.relative_to(root).parts[:-1]):
            continue
        ext = path.suffix.lower()
        if ext in IMAGE_EXTS and path.is_file():
            index.frames.setdefault(normal_name(path.parent.name), [])
            if path.parent not in index.frames[normal_name(path.parent.name)]:
                index.frames[normal_name(path.parent.name)].append(path.parent)
        elif ext in VIDEO_EXTS and path.is_file():
            index.videos.setdefault(normal_name(path.stem), []).append(path)
        elif ext in AUDIO_EXTS and path.is_file():
            index.audios.setdefault(normal_name(path.stem), []).append(path)
    return index


def labelled_clip(ds: Dataset, listing: Listing, index: MediaIndex, name: str, label: str, fold: str,
                  where: str, probe_audio: bool) -> None:
    """Add the clip `name` of a label list to `listing`, found in `index`: its video file (audio from its
    own track, else a separate audio file of the same name), else its frame folder with a separate audio
    file; a clip found nowhere is skipped as missing, one without any audio as no_audio."""
    key = normal_name(name)
    videos, folders, audios = index.videos.get(key, []), index.frames.get(key, []), index.audios.get(key, [])
    ids = {"list": where}
    if videos:
        video = videos[0]
        track = has_audio_track(video) if probe_audio else True
        if track is False and not audios:
            listing.skip(video, f"no audio: the clip has no audio track ({ds.name} {name})", "no_audio")
            return
        audio = audios[0] if track is False else ""
        listing.inputs.append(ds.clip(name, video, label=label, fold=fold, audio=audio, **ids))
    elif folders:
        if not audios:
            listing.skip(folders[0], f"no audio: frame folder without an audio file ({ds.name} {name})",
                         "no_audio")
            return
        listing.inputs.append(ds.clip(name, folders[0], label=label, fold=fold, audio=audios[0], **ids))
    else:
        listing.skip(f"{where}: {name}", f"missing: no video file or frame folder named {name} under the "
                     "root", "missing")


def assign_folds(test_lists: dict[str, dict[str, str]], train_lists: dict[str, dict[str, str]],
                 dataset: str) -> tuple[dict[str, str], dict[str, str]]:
    """From official per-fold test (and train) lists {fold: {clip name: label}}: (clip -> label,
    clip -> test fold). Raises DatasetError when the test sets overlap, a clip's labels disagree, or a
    fold's train and test sets share a clip; clips only in train lists get no fold ("")."""
    labels: dict[str, str] = {}
    folds: dict[str, str] = {}

    def note(name: str, label: str, where: str) -> None:
        if labels.setdefault(name, label) != label:
            raise DatasetError(f"{dataset}: clip {name} has label {labels[name]!r} and {label!r} ({where})")

    for fold, clips in sorted(test_lists.items()):
        for name, label in clips.items():
            if name in folds:
                raise DatasetError(f"{dataset}: clip {name} is in the test sets of folds {folds[name]} and "
                                   f"{fold} (the test sets must partition the corpus)")
            folds[name] = fold
            note(name, label, f"test set {fold}")
    for fold, clips in sorted(train_lists.items()):
        for name, label in clips.items():
            if folds.get(name) == fold:
                raise DatasetError(f"{dataset}: clip {name} is in both the train and test set of fold {fold}")
            note(name, label, f"train set {fold}")
            folds.setdefault(name, "")
    return labels, folds
