"""Where clips come from: the one reader of every input the commands take.

    folder         every video file below it (data/media.py's table; or, if it has none, every audio
                   file); for vaemo-shard every video file
    manifest.csv   header row; columns `path` (required; relative to the CSV's folder), `label`, `key`,
                   `audio`, `fold`, `split`, `speaker`, and any others (kept per clip, e.g. for
                   `--group-by`)
    shards         a .tar, a folder of *.tar, the manifest.json vaemo-shard writes, a brace pattern, a
                   comma list or fsspec URLs (as data.shards); `<key>.json` may hold "label" (int),
                   "class_name", "speaker", "fold", "split"

Two views of the same listing. `media_inputs(spec)`: vaemo-shard's input (a folder or a CSV: the
files to convert, with the CSV's columns as text). `open_source(spec)`: a `Source` of `Record`s, the
clips that vaemo-embed, vaemo-predict, the linear probe and fine-tuning read (media files or shard
samples), with class indices.

Shards given any of these ways are the same records with the same class names: the class names
(and clip count) come from the manifest.json next to the shards (each shard's folder), else from the
clips' json "class_name". `Source.metadata()` lists the records without their media bytes (local
shards: only the json members are read), for start-up checks before anything is decoded.

Keys. `open_source`: a CSV row's key is its `key` column, else the file name without extension (keys
must be unique; split files name clips by key); in a folder, the path below the folder without
extension. `media_inputs`: `<row number>-<file stem>` (vaemo-shard's keys: unique whatever the names).
Labels (`open_source`) are class indices (0, 1, ...) or class names; names are numbered in sorted
order unless `class_names` fixes the order. An empty label means "unknown" (-1).

Audio of a video file comes from a sibling `<stem>.flac`/`.wav` if present, else its own track, or
from the manifest's `audio` column.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaemo_dist.data import storage
from vaemo_dist.data.media import AUDIO_EXTS, VIDEO_EXTS, is_audio
from vaemo_dist.data.shards import MANIFEST_NAME, expand_shards, read_clip_meta, read_shard

log = logging.getLogger(__name__)

MODALITIES = ("av", "video", "audio")
# Manifest columns (and json keys) with a field of their own in Record; the rest go to Record.fields.
RECORD_COLUMNS = ("path", "key", "label", "audio", "fold", "split", "speaker", "class_name")
# Manifest columns with a field of their own in MediaInput; the rest go to MediaInput.extra.
INPUT_COLUMNS = ("path", "label", "speaker", "id", "description")


class SourceError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Reading folders and CSV manifests (both views)


def media_files(folder: str | Path, exts: tuple[str, ...] = VIDEO_EXTS) -> list[Path]:
    """The files below `folder` (searched recursively) whose extension is one of `exts`, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in exts and p.is_file())


def manifest_rows(csv_path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV manifest, column names and values stripped, empty cells as "", and `path`
    made relative to the CSV's folder (an empty path stays empty). Raises SourceError without a
    `path` column."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SourceError(f"manifest not found: {csv_path}")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise SourceError(f"{csv_path}: a CSV manifest needs a header row with a 'path' column (has "
                              f"{reader.fieldnames}; and 'label' for training)")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    for row in rows:
        if row.get("path") and not os.path.isabs(row["path"]):
            row["path"] = str(csv_path.parent / row["path"])
    return rows


# --------------------------------------------------------------------------------------------
# vaemo-shard's view: the files to convert


@dataclass
class MediaInput:
    """One file vaemo-shard converts, with its CSV row's text (label as written, not an index)."""

    path: str
    key: str
    label: str = ""
    speaker: str = ""
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # every other non-empty column
    # A separate audio file (wav, m4a, flac, ...) to take the clip's audio from; "" = the video's own track.
    audio: str = ""
    # Frame rate of a frame-folder input (`path` a folder of .jpg/.jpeg/.png frames, sorted by name);
    # 0 = 25. Unused for video files (their own rate is read).
    fps: float = 0.0


def _slug(text: str, limit: int = 48) -> str:
    # Keys must not contain dots (WebDataset splits key and extension at the first one).
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:limit] or "clip"


def media_inputs(spec: str | Path) -> list[MediaInput]:
    """vaemo-shard's input named by a folder (every video file below it) or a CSV manifest (every
    row, an empty or missing path included: the converter reports it), in a stable order, keyed
    `<row number>-<file stem>`."""
    path = Path(spec)
    if path.is_dir():
        rows: list[dict[str, str]] = [{"path": str(p)} for p in media_files(path, VIDEO_EXTS)]
    elif path.is_file() and path.suffix.lower() == ".csv":
        rows = manifest_rows(path)
    else:
        raise SourceError(f"{spec}: expected a folder of videos or a .csv manifest")
    return [MediaInput(path=row["path"], key=f"{i:07d}-{_slug(Path(row['path']).stem)}",
                       label=row.get("label", ""), speaker=row.get("speaker") or row.get("id", ""),
                       description=row.get("description", ""),
                       extra={k: v for k, v in row.items() if k not in INPUT_COLUMNS and v})
            for i, row in enumerate(rows)]


# --------------------------------------------------------------------------------------------
# The clips' view: records


@dataclass
class Record:
    """One clip: a media file (`path`, optional `audio_path`) or a WebDataset sample of bytes."""

    key: str
    label: int = -1  # class index; -1 = unknown
    path: str | None = None
    audio_path: str | None = None
    sample: dict[str, Any] | None = None
    fold: str | None = None  # from a manifest / json: the test fold this clip belongs to
    split: str | None = None  # from a manifest / json: train, val or test
    speaker: str | None = None  # from a manifest's `speaker` column / a json's "speaker"
    fields: dict[str, str] = field(default_factory=dict)  # every other manifest column / json value
    class_name: str | None = None  # a shard json's "class_name"

    def group(self, column: str) -> str | None:
        """This clip's value of `column` ("speaker" or any manifest column / json key), or None."""
        if column == "speaker":
            return self.speaker
        value = self.fields.get(column)
        return value if value not in (None, "") else None


@dataclass
class Source:
    """A re-iterable collection of records and what is known about it."""

    kind: str  # "manifest", "shards" or "folder" ("files": vaemo-predict's files named one by one)
    spec: str
    records: Callable[[], Iterator[Record]]
    size: int | None = None  # number of records, when known without reading everything
    class_names: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # shards only
    # The records without media bytes (Record.sample left out), for checks before any decoding;
    # None: `records` is already that cheap.
    metadata_records: Callable[[], Iterator[Record]] | None = None

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def metadata(self) -> Iterator[Record]:
        """Every record's key, label, speaker, fold, ... in order, without reading media."""
        return (self.metadata_records or self.records)()


def open_source(spec: str | Path, class_names: list[str] | None = None) -> Source:
    """The clips named by `spec`: a CSV manifest, a folder of media files (without *.tar), or shards."""
    spec = str(spec)
    path = Path(spec)
    if path.suffix.lower() == ".csv":
        return _manifest_source(path, class_names)
    if path.is_dir() and not any(path.glob("*.tar")):
        return _folder_source(path)
    return _shard_source(spec, class_names)


def _label_mapping(raw: list[str], class_names: list[str] | None) -> tuple[list[int], list[str]]:
    given = [r.strip() for r in raw]
    present = sorted({g for g in given if g})
    if class_names:
        index = {name: i for i, name in enumerate(class_names)}
        numeric = all(g.lstrip("-").isdigit() for g in present)
        out = []
        for g in given:
            if not g:
                out.append(-1)
            elif g in index:
                out.append(index[g])
            elif numeric and 0 <= int(g) < len(class_names):
                out.append(int(g))
            else:
                raise SourceError(f"label {g!r} is not one of the classes {class_names}")
        return out, list(class_names)
    if all(g.isdigit() for g in present):
        top = max((int(g) for g in present), default=-1)
        return [int(g) if g else -1 for g in given], [str(i) for i in range(top + 1)]
    index = {name: i for i, name in enumerate(present)}
    return [index[g] if g else -1 for g in given], present


def _manifest_source(csv_path: Path, class_names: list[str] | None) -> Source:
    rows = manifest_rows(csv_path)
    if not rows:
        raise SourceError(f"{csv_path}: a header row and no clips (one row per clip, with its 'path')")
    base = csv_path.parent
    labels, names = _label_mapping([r.get("label", "") for r in rows], class_names)
    records: list[Record] = []
    seen: dict[str, int] = {}
    for i, (row, label) in enumerate(zip(rows, labels)):
        path = row["path"]
        if not path:
            raise SourceError(f"{csv_path}, row {i + 2}: empty path")
        key = row.get("key") or Path(path).stem
        if key in seen:
            raise SourceError(f"{csv_path}: key {key!r} on rows {seen[key] + 2} and {i + 2}; keys must be "
                              "unique (add a 'key' column)")
        seen[key] = i
        audio = row.get("audio", "")
        fields = {k: v for k, v in row.items() if k not in RECORD_COLUMNS and v}
        records.append(Record(key=key, label=label, path=path,
                              audio_path=str(base / audio) if audio else None,
                              fold=row.get("fold") or None, split=row.get("split", "").lower() or None,
                              speaker=row.get("speaker") or None, fields=fields))
    return Source("manifest", str(csv_path), lambda: iter(records), len(records), names)


def _folder_source(folder: Path) -> Source:
    files = media_files(folder, VIDEO_EXTS) or media_files(folder, AUDIO_EXTS)  # else audio-only
    if not files:
        raise SourceError(f"no video ({', '.join(VIDEO_EXTS)}) or audio files below {folder}")
    records = [Record(key=str(p.relative_to(folder).with_suffix("")), path=str(p)) for p in files]
    return Source("folder", str(folder), lambda: iter(records), len(records))


# --------------------------------------------------------------------------------------------
# WebDataset shards


def _shard_source(spec: str, class_names: list[str] | None) -> Source:
    try:
        urls = expand_shards(spec)
    except Exception as e:  # noqa: BLE001 - ShardError and anything braceexpand raises
        raise SourceError(f"{spec}: not a manifest (.csv), a media folder or shards ({e})") from e
    names, size = shard_manifest_info(urls)

    def records() -> Iterator[Record]:
        for url in urls:
            try:
                for sample in read_shard(url):
                    yield _shard_record(sample)
            except Exception as e:  # noqa: BLE001 - one broken shard is reported, not fatal
                log.warning("shard %s could not be read to the end: %s: %s", url, type(e).__name__, e)

    def metadata() -> Iterator[Record]:  # samples without a json member have no label: left out
        for url in urls:
            try:
                for key, meta in read_clip_meta(url):
                    record = _shard_record({"__key__": key}, meta)
                    record.sample = None
                    yield record
            except Exception as e:  # noqa: BLE001 - as in records()
                log.warning("shard %s could not be read to the end: %s: %s", url, type(e).__name__, e)

    return Source("shards", spec, records, size, list(class_names or names), urls, metadata)


def shard_manifest_info(urls: list[str]) -> tuple[list[str], int | None]:
    """(class names, clip count) of shards from the vaemo-shard / synthetic-corpus manifest.json in
    their folder(s): the same whether the shards were named by folder, manifest, pattern or URL.
    The count is None unless the manifests list every one of `urls` with its sample count."""
    names: list[str] = []
    counts: dict[str, int] = {}
    folders = list(dict.fromkeys(url.rsplit("/", 1)[0] if "/" in url else "." for url in urls))
    for folder in folders:
        where = f"{folder}/{MANIFEST_NAME}"
        if not storage.is_remote(where) and not Path(storage.local_path(where)).is_file():
            continue
        try:
            manifest = json.loads(storage.read_bytes(where))
        except Exception:  # noqa: BLE001 - no (readable) manifest: the clips' json may still say
            continue
        if not isinstance(manifest, dict):
            continue
        found = [str(n) for n in manifest.get("class_names") or []]
        if found and names and found != names:
            log.warning("%s names the classes %s, another shard folder %s; using the first", where, found,
                        names)
        names = names or found
        shards, per = manifest.get("shards") or [], manifest.get("samples_per_shard") or []
        if len(shards) == len(per):
            counts.update({f"{folder}/{s}": int(n) for s, n in zip(shards, per)})
    size = sum(counts[u] for u in urls) if all(u in counts for u in urls) else None
    return names, size


def _shard_record(sample: dict[str, Any], meta: Any = None) -> Record:
    """The record of one shard sample; `meta`: its json already parsed (else read from the sample)."""
    raw = sample.get("json")
    if meta is None and raw is not None:
        try:
            meta = json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))
        except (ValueError, TypeError):
            meta = {}  # the decoder reports it when the clip is decoded
    if not isinstance(meta, dict):
        meta = {}
    label, fold, split = meta.get("label"), meta.get("fold"), meta.get("split")
    speaker, name = meta.get("speaker"), meta.get("class_name")
    fields = {k: str(v) for k, v in meta.items()
              if k not in RECORD_COLUMNS and isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    return Record(key=str(sample.get("__key__")),
                  label=label if isinstance(label, int) and not isinstance(label, bool) else -1,
                  sample=sample, fold=None if fold is None else str(fold),
                  split=None if split is None else str(split).lower(),
                  speaker=None if speaker in (None, "") else str(speaker), fields=fields,
                  class_name=None if name in (None, "") else str(name))


# --------------------------------------------------------------------------------------------
# Decoding


def decode_record(record: Record, inputs: Any, modality: str = "av") -> tuple[torch.Tensor | None,
                                                                            torch.Tensor | None]:
    """Model inputs of one record for `modality` ("av", "video" or "audio"); raises DecodeError."""
    from vaemo_dist.data.decode_files import decode_media
    from vaemo_dist.data.decode_pyav import decode_sample
    from vaemo_dist.data.types import DecodeError

    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}: choose one of {MODALITIES}")
    want_video, want_audio = modality in ("av", "video"), modality in ("av", "audio")
    if record.sample is not None:  # exactly the training decoder
        clip = decode_sample(record.sample, inputs)
        return (clip.video if want_video else None), (clip.audio if want_audio else None)
    assert record.path is not None
    path = Path(record.path)
    if want_video and is_audio(path):
        raise DecodeError(record.key, f"{path.name} is an audio file: use modality 'audio'")
    audio = (record.audio_path or path) if want_audio else None
    return decode_media(path if want_video else None, audio, inputs)


@dataclass
class Decoded:
    key: str
    label: int
    video: torch.Tensor | None
    audio: torch.Tensor | None
    error: str | None = None
    fold: str | None = None
    split: str | None = None


class DecodedStream(IterableDataset):
    """Records -> Decoded items, split over DataLoader workers by index (worker w decodes records
    w, w + W, ...), so the DataLoader's round-robin hands them back in the source's order. A clip
    that cannot be decoded comes back with `error` set, not dropped."""

    def __init__(self, source: Source, inputs: Any, modality: str,
                 keep: Callable[[Record], bool] | None = None) -> None:
        super().__init__()
        self.source, self.inputs, self.modality, self.keep = source, inputs, modality, keep

    def __iter__(self) -> Iterator[Decoded]:
        from vaemo_dist.data.types import DecodeError

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # workers decode; the main process computes
        chosen = (r for r in self.source.records() if self.keep is None or self.keep(r))
        for i, record in enumerate(chosen):
            if i % workers != worker:
                continue
            try:
                video, audio = decode_record(record, self.inputs, self.modality)
            except DecodeError as e:
                yield Decoded(record.key, record.label, None, None, e.reason, record.fold, record.split)
                continue
            yield Decoded(record.key, record.label, video, audio, None, record.fold, record.split)


def decoded_loader(source: Source, inputs: Any, modality: str = "av", workers: int = 0,
                   keep: Callable[[Record], bool] | None = None) -> DataLoader:
    """Decoded items one at a time (batch them yourself), decoding in `workers` processes."""
    return DataLoader(DecodedStream(source, inputs, modality, keep), batch_size=None, num_workers=workers,
                      collate_fn=lambda x: x, prefetch_factor=4 if workers > 0 else None)
