"""Which shard, which sample, and where we are.

The sample stream of one *slot* (a rank's DataLoader worker) is a pure function of the shard list,
the seed, the slot and a `StreamPosition`, so a run resumes exactly where it stopped without
re-reading earlier shards. Epochs chain forever; training length is counted in steps.

Shards are assigned whole to slots when there are at least as many shards as slots; otherwise every
slot reads every shard and keeps every n-th sample (slower, but small datasets still work).

With `resampled=True` each slot instead draws its shards with replacement (webdataset's
"resampled" mode, for corpora mixed from many sources): epoch e of slot s is a list of draws from a
random generator seeded by (seed, slot, e), so a position (epoch, draw, sample) still says exactly
where the stream stands and where a resumed run continues.

Resuming on another number of slots (elastic resume): `plan_remainder` turns the positions of every
slot of the old layout into a *remainder plan* per new slot, the pieces (`PlanEntry`: shard, first
sample, and for the fewer-shards-than-slots split a stride) of every begun epoch that no old slot
has read; each new slot reads its pieces, then the ordinary plan for the new slot count from the
next epoch on (`Remainder.next_epoch`). A position (epoch, shard, sample) with an epoch below
`next_epoch` indexes the remainder plan instead of an epoch's plan.

Writing: `ShardWriter`, the one writer of shard sets (atomic: temporary name, fsync, rename; the
manifest last). Which files are media (the `vaemo-shard` hints below): data/media.py.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vaemo_dist.data import storage
from vaemo_dist.data.media import MEDIA_EXTS
from vaemo_dist.fsutil import write_atomic

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"  # written by vaemo-shard next to its shards


class ShardError(RuntimeError):
    """A shard list that cannot be used at all (nothing found, a path that does not exist)."""


@dataclass
class StreamPosition:
    epoch: int = 0
    shard: int = 0  # index into this slot's shard plan for `epoch`
    sample: int = 0  # raw samples already read from that shard

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> StreamPosition:
        return StreamPosition(int(d["epoch"]), int(d["shard"]), int(d["sample"]))


# Inputs that are not shards but are easily taken for them: the raw material of `vaemo-shard`.
CSV_SUFFIXES = (".csv", ".tsv")
_MEDIA_SCAN_LIMIT = 5000  # directory entries looked at when asking whether a folder holds media files


def _vaemo_shard_hint(item: str, what: str, source: str, key: str) -> str:
    """The message for an input that is `vaemo-shard`'s raw material, not shards: what it is, and the
    command that makes shards of `source` (the CSV or the folder)."""
    import shlex

    base = source.rstrip("/")
    out = (base[: -len(Path(base).suffix)] if Path(base).suffix.lower() in CSV_SUFFIXES else base) + "-shards"
    return (f"{key}={item!r} is {what}, not shards: training and evaluation read WebDataset shards "
            f"(*.tar). Make them once with vaemo-shard (a CSV with a `path` column, or a folder of videos), "
            f"then point {key} at its output:\n"
            f"    vaemo-shard {shlex.quote(source)} --out {shlex.quote(out)}\n"
            f"    ... {key}={shlex.quote(out)}")


def _holds_media(folder: str) -> bool:
    """Whether a folder (searched recursively, at most _MEDIA_SCAN_LIMIT entries) holds media files."""
    seen = 0
    for _, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(MEDIA_EXTS):
                return True
            seen += 1
        if seen > _MEDIA_SCAN_LIMIT:
            return False
    return False


_LISTED_NAMES = 3  # file names quoted when a folder holds files but no shards


def _shards_way_out(key: str, out: str, overwrite: bool = False) -> str:
    """What to do about a local spec item that yields no shards: point `key` elsewhere, or make shards
    into `out` with vaemo-shard (`overwrite`: `out` already holds a vaemo-shard set, moved aside)."""
    import shlex

    flag = " --overwrite" if overwrite else ""
    return (f"point {key} at a folder of WebDataset *.tar shards (vaemo-shard's --out, or its "
            f"manifest.json), or make them: vaemo-shard <your videos or CSV> --out {shlex.quote(out)}{flag}")


def _no_shards_in_folder(path: str, spec: str, key: str) -> str:
    """The one-line message for a local folder that holds no `*.tar`: what it holds instead (nothing;
    a vaemo-shard manifest of zero shards, i.e. every input skipped; subfolders with shards; other
    files) and what to do."""
    head = f"no *.tar shards in folder {path} (from {key}={spec!r})"
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        return f"{head}: cannot list it ({e.strerror or e})"
    if not entries:
        return f"{head}: the folder is empty; {_shards_way_out(key, path)}"
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("shards") == []:
            skipped = manifest.get("skipped")
            what = (f"it skipped all {skipped} inputs" if isinstance(skipped, int)
                    else "every input was skipped")
            report = os.path.join(path, "report.json")
            where = f" (each with its reason in {report})" if os.path.isfile(report) else ""
            return (f"{head}: vaemo-shard wrote no shards there, {what}{where}; fix or replace those inputs "
                    f"and {_shards_way_out(key, path, overwrite=True)}")
    with_shards = [name for name in entries if os.path.isdir(os.path.join(path, name))
                   and glob.glob(os.path.join(glob.escape(os.path.join(path, name)), "*.tar"))]
    if with_shards:
        sub = os.path.join(path, with_shards[0])
        more = f" (and {len(with_shards) - 1} more subfolders)" if len(with_shards) > 1 else ""
        return (f"{head}: shards are one level down, in {sub}{more}; set {key}={sub} (a comma list names "
                f"several folders)")
    files = [name for name in entries if not os.path.isdir(os.path.join(path, name))]
    shown = ", ".join(files[:_LISTED_NAMES]) + (", ..." if len(files) > _LISTED_NAMES else "")
    held = (f"it holds {len(files)} files, none *.tar ({shown})" if files
            else f"it holds only {len(entries)} subfolders, none with *.tar")
    return f"{head}: {held}; {_shards_way_out(key, path)}"


def _pattern_matched_nothing(path: str, spec: str, key: str) -> str:
    """The one-line message for a local glob that matches no file: whether its folder exists and
    what to do."""
    head = f"shard pattern matched nothing: {path} (from {key}={spec!r})"
    folder = os.path.dirname(path) or "."
    if any(ch in folder for ch in "*?["):
        return f"{head}; check the pattern, or {_shards_way_out(key, folder)}"
    if not os.path.isdir(folder):
        return (f"{head}: its folder {folder} does not exist; check the path, or "
                f"{_shards_way_out(key, folder)}")
    tars = len(glob.glob(os.path.join(glob.escape(folder), "*.tar")))
    if tars:
        return f"{head}: its folder {folder} holds {tars} *.tar shards; set {key}={folder} to read them all"
    return f"{head}: its folder {folder} holds no *.tar shards; {_shards_way_out(key, folder)}"


def check_shard_spec(spec: str, key: str = "data.shards") -> None:
    """Refuse, naming `vaemo-shard` and its command, a spec item that is a CSV manifest, a media file
    or a local folder of media files without *.tar shards: what vaemo-shard turns into shards. Cheap
    (no listing of brace patterns, no remote access), so config validation runs it before any work."""
    for item in (s.strip() for s in spec.split(",")):
        if not item or "{" in item:
            continue
        lower = item.lower().split("?", 1)[0]
        if lower.endswith(CSV_SUFFIXES):
            raise ShardError(_vaemo_shard_hint(item, "a CSV manifest", item, key))
        if lower.endswith(MEDIA_EXTS):
            folder = item.rstrip("/").rsplit("/", 1)[0] if "/" in item.rstrip("/") else "."
            raise ShardError(_vaemo_shard_hint(item, "a media file", folder, key))
        path = item.removeprefix("file://")
        if storage.is_remote(item) or not os.path.isdir(path):
            continue
        if not glob.glob(os.path.join(glob.escape(path), "*.tar")) and _holds_media(path):
            raise ShardError(_vaemo_shard_hint(item, "a folder of media files with no *.tar shards", item,
                                               key))


def expand_shards(spec: str, key: str = "data.shards") -> list[str]:
    """Turn a shard spec into a list of URLs.

    Accepts comma-separated items, each a brace pattern (`train-{000000..000099}.tar`), a local
    folder (all `*.tar` in it), a local glob, any fsspec URL (`s3://...`), or the `manifest.json`
    that `vaemo-shard` writes next to its shards (local or remote: its shards, in order; the same
    list as its folder). Local paths must exist; that is checked here, at start-up, so a typo fails
    at once and by name. A CSV or a folder of videos is refused with the vaemo-shard command that
    makes shards of it (`check_shard_spec`). `key`: the config key named in messages.
    """
    from braceexpand import braceexpand  # a webdataset dependency

    check_shard_spec(spec, key)
    urls: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        for url in braceexpand(item):
            if url.endswith(MANIFEST_NAME):
                urls.extend(shards_from_manifest(url))
                continue
            if storage.is_remote(url):
                urls.append(url)
                continue
            path = url.removeprefix("file://")
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not found:
                    raise ShardError(_no_shards_in_folder(path, spec, key))
                urls.extend(found)
            elif any(ch in path for ch in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise ShardError(_pattern_matched_nothing(path, spec, key))
                urls.extend(found)
            elif os.path.isfile(path):
                urls.append(path)
            else:
                raise ShardError(f"shard not found: {path} (from {key}={spec!r})")
    if not urls:
        raise ShardError(f"{key}={spec!r} names no shards: a vaemo-shard manifest that lists none (every "
                         f"input was skipped; the report.json beside it gives each reason); fix or replace "
                         f"those inputs and run vaemo-shard again with --overwrite, or point {key} at a "
                         f"folder of WebDataset *.tar shards")
    return urls


def shards_from_manifest(url: str) -> list[str]:
    """The shard URLs a `vaemo-shard` manifest lists, resolved next to the manifest (for `<dir>/manifest.json`
    the same strings as listing `<dir>` gives)."""
    prefix = f"cannot read the shard manifest {storage.redact(url)}"
    try:
        raw = storage.read_bytes(url)
    except storage.StoreUnavailable as e:  # already one line naming the URL and the endpoint
        raise storage.StoreUnavailable(f"cannot read the shard manifest: {e}") from None
    except FileNotFoundError:
        if storage.is_remote(url):
            storage.check_bucket(url, "cannot read the shard manifest")  # a missing bucket says so
        raise ShardError(f"{prefix}: not found") from None
    except OSError as e:
        # RetryingReader's errors already name the URL and give the hint; others get them here.
        text = str(e) if storage.redact(url) in str(e) else storage.describe_error(url, e)
        text = text.removeprefix(f"{storage.redact(url)}: ")
        error = storage.StorageError if storage.is_remote(url) else ShardError
        raise error(f"{prefix}: {text}") from None
    try:
        manifest = json.loads(raw)
        names = manifest["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{prefix}: not a vaemo-shard manifest ({type(e).__name__}: {e})") from None
    base = url[: -len(MANIFEST_NAME)]
    return [base + name for name in names]


def shard_manifest(spec: str) -> dict[str, Any] | None:
    """The `manifest.json` of a one-item shard spec that names a vaemo-shard (or synthetic, or described)
    set: its folder or the manifest itself, local or remote; None for anything else or when unreadable."""
    spec = spec.strip()
    if not spec or "," in spec or "{" in spec or any(ch in spec for ch in "*?["):
        return None
    if spec.endswith(MANIFEST_NAME):
        url = spec
    elif storage.is_remote(spec):
        url = spec.rstrip("/") + "/" + MANIFEST_NAME
    elif os.path.isdir(spec.removeprefix("file://")):
        url = os.path.join(spec.removeprefix("file://"), MANIFEST_NAME)
    else:
        return None
    try:
        manifest = json.loads(storage.read_bytes(url))
    except Exception:  # noqa: BLE001 - no manifest, or not one of ours: nothing known
        return None
    return manifest if isinstance(manifest, dict) else None


def read_clip_meta(url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, the clip's json as a dict) of each sample of one shard that has a `.json` member, in order,
    keys as `read_shard` gives them. A local shard is read by seeking past the media members (only
    the tar headers and the json are read); a remote one is streamed."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    def parse(raw: bytes) -> dict[str, Any]:
        try:
            meta = json.loads(raw)
        except ValueError:
            return {}
        return meta if isinstance(meta, dict) else {}

    if storage.is_remote(url):
        for sample in read_shard(url):
            if "json" in sample:
                yield str(sample["__key__"]), parse(sample["json"])
        return
    with tarfile.open(url.removeprefix("file://"), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None or ext != "json":
                continue
            f = tar.extractfile(member)
            if f is not None:
                yield key, parse(f.read())


def _plan_indices(n_shards: int, epoch: int, seed: int, slot: int, n_slots: int,
                  resampled: bool) -> tuple[list[int], bool]:
    """`slot_plan` on shard indices: the same shuffle and the same draws (both depend on the list's
    length only), so plans can be stored and compared without their URLs."""
    if resampled:
        # As many draws per epoch as a whole-shard split would give the slot; str seeds are
        # hashed deterministically (not with Python's per-process hash randomisation).
        rng = random.Random(f"resampled:{seed}:{slot}:{epoch}")
        indices = range(n_shards)
        return [rng.choice(indices) for _ in range(max(1, n_shards // n_slots))], False
    order = list(range(n_shards))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if n_shards >= n_slots:
        return order[slot::n_slots], False
    return order, True


def slot_plan(urls: list[str], epoch: int, seed: int, slot: int, n_slots: int,
              resampled: bool = False) -> tuple[list[str], bool]:
    """The shards slot `slot` reads in `epoch`, and whether it must keep only every n-th sample."""
    indices, modulo = _plan_indices(len(urls), epoch, seed, slot, n_slots, resampled)
    return [urls[i] for i in indices], modulo


@dataclass(frozen=True)
class PlanEntry:
    """One piece of a remainder plan: of shard `shard` (an index into the shard list: checkpoints
    hold no URLs, which may carry credentials), the samples from number `first` on whose number is
    `offset` modulo `stride` (stride 1: all of them; more under the fewer-shards-than-slots split),
    belonging to `epoch`."""

    epoch: int
    shard: int
    first: int = 0
    stride: int = 1
    offset: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.shard, self.first, self.stride, self.offset]

    @staticmethod
    def from_list(v: Sequence[int]) -> PlanEntry:
        return PlanEntry(*(int(x) for x in v))


@dataclass(frozen=True)
class Remainder:
    """What a slot reads after a resize before its ordinary plan resumes at epoch `next_epoch`."""

    next_epoch: int
    entries: tuple[PlanEntry, ...] = ()


@dataclass(frozen=True)
class SlotState:
    """Where one slot of a layout stands: its number among `n_slots`, the position after its last
    sample the trainer took, and the remainder plan it was given by an earlier resize, if any."""

    slot: int
    n_slots: int
    position: StreamPosition
    remainder: Remainder | None = None


def epoch_entries(n_shards: int, epoch: int, seed: int, slot: int, n_slots: int,
                  resampled: bool = False) -> list[PlanEntry]:
    """A slot's ordinary plan of `epoch` as plan entries."""
    indices, modulo = _plan_indices(n_shards, epoch, seed, slot, n_slots, resampled)
    stride, offset = (n_slots, slot) if modulo else (1, 0)
    return [PlanEntry(epoch, i, 0, stride, offset) for i in indices]


def _in_remainder(s: SlotState) -> bool:
    return s.remainder is not None and s.position.epoch < s.remainder.next_epoch


def _current_epoch(s: SlotState) -> int:
    """The epoch the piece a slot is reading belongs to."""
    if _in_remainder(s):
        entries = s.remainder.entries
        return entries[s.position.shard].epoch if s.position.shard < len(entries) else s.remainder.next_epoch
    return s.position.epoch


def _unread(n_shards: int, seed: int, s: SlotState, resampled: bool, until: int) -> list[PlanEntry]:
    """The pieces of slot `s`'s stream after its position, up to (not including) epoch `until`."""
    p, out = s.position, []
    if _in_remainder(s):
        entries = s.remainder.entries
        if p.shard < len(entries):
            out.append(replace(entries[p.shard], first=max(entries[p.shard].first, p.sample)))
            out.extend(entries[p.shard + 1:])
        epoch, shard, sample = s.remainder.next_epoch, 0, 0
    else:
        epoch, shard, sample = p.epoch, p.shard, p.sample
    for e in range(epoch, until):
        plan = epoch_entries(n_shards, e, seed, s.slot, s.n_slots, resampled)
        if shard < len(plan):
            out.append(replace(plan[shard], first=max(plan[shard].first, sample)))
            out.extend(plan[shard + 1:])
        shard, sample = 0, 0
    return out


def plan_remainder(n_shards: int, seed: int, old: Sequence[SlotState], n_slots: int,
                   resampled: bool = False) -> tuple[int, list[list[PlanEntry]]]:
    """(next epoch, the remainder plan of each of `n_slots` new slots) after the old slots `old`
    (all slots of the old layout) stopped where their positions say.

    Every sample of every epoch an old slot has begun that no old slot has read is in exactly one
    new plan, once; what the old slots read is in none. The next epoch is the first that no old
    slot has begun (slots drift apart when shards differ in size); from there on the new slots
    follow their ordinary plan. With fewer pieces than new slots the largest pieces are split by
    sample parity until each slot has one. Pieces are dealt largest first to the least loaded slot,
    shards assumed equal in size (as the ordinary split assumes), their size estimated by the furthest
    sample position seen; each slot reads its pieces in the old streams' order.
    """
    if n_slots < 1 or not old:
        raise ValueError(f"plan_remainder needs old slots and n_slots >= 1 (got {len(old)}, {n_slots})")
    until = max(max(_current_epoch(s) + 1 for s in old),
                max((s.remainder.next_epoch for s in old if s.remainder is not None), default=0))
    pieces = [(entry.epoch, k, n, entry) for k, s in enumerate(old)
              for n, entry in enumerate(_unread(n_shards, seed, s, resampled, until))]
    size = max([1] + [s.position.sample for s in old]
               + [e.first for s in old if s.remainder is not None for e in s.remainder.entries])

    def load(e: PlanEntry) -> float:  # the expected share of a shard still to read
        return max(0.0, 1.0 - e.first / size) / e.stride

    # Fewer pieces with samples left than new slots (2 shards left, 4 new workers): split the largest
    # piece by sample parity (stride doubled, the second half offset by the old stride) until every
    # slot has one, as long as a piece still holds two samples or more. Otherwise the idle slots would
    # start the next epoch while the others still read this one. (Pieces a slot stopped at the end of
    # are expected empty and do not count; they are still dealt, in case a shard is longer.)
    while sum(load(p[3]) > 0 for p in pieces) < n_slots:
        largest = max(range(len(pieces)), key=lambda i: (load(pieces[i][3]), -i))
        epoch, k, n, e = pieces[largest]
        if load(e) * size < 2:
            break
        halves = [replace(e, stride=2 * e.stride, offset=(e.offset + h * e.stride) % (2 * e.stride))
                  for h in (0, 1)]
        pieces[largest:largest + 1] = [(epoch, k, n, half) for half in halves]

    def order(p: tuple[int, int, int, PlanEntry]) -> tuple[int, int, int, int, int]:
        return (*p[:3], p[3].stride, p[3].offset)

    plans: list[list[tuple[int, int, int, PlanEntry]]] = [[] for _ in range(n_slots)]
    loads = [0.0] * n_slots
    for piece in sorted(pieces, key=lambda p: (-load(p[3]), order(p))):
        target = min(range(n_slots), key=lambda i: (loads[i], len(plans[i]), i))
        plans[target].append(piece)
        loads[target] += load(piece[3])
    return until, [[p[3] for p in sorted(plan, key=order)] for plan in plans]


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples ({"__key__", "__url__", ext: bytes}) of one tar shard, in order."""
    with storage.open_stream(url) as stream:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)


@dataclass
class ShardTrouble:
    url: str
    after_samples: int
    error: str


def iter_slot(
    urls: list[str],
    seed: int,
    slot: int,
    n_slots: int,
    start: StreamPosition,
    on_trouble: Any = None,
    resampled: bool = False,
    remainder: Remainder | None = None,
) -> Iterator[tuple[dict[str, Any], StreamPosition]]:
    """Yield (sample, position after it) for one slot, forever, starting at `start`.

    With a `remainder` (after a resize), a start before `remainder.next_epoch` lies in the remainder
    plan: its pieces are read first, then the ordinary plan from `next_epoch` on.

    A shard that cannot be opened or is cut short (truncated tar) is reported through
    `on_trouble(ShardTrouble)` and the stream moves on to the next shard; the samples before the
    cut are kept. If a whole epoch yields nothing, the shards are unusable and we stop loudly.
    """
    epoch, first_shard, skip = start.epoch, start.shard, start.sample
    if remainder is not None and epoch < remainder.next_epoch:
        for idx in range(first_shard, len(remainder.entries)):
            e = remainder.entries[idx]
            for i, sample in _read(urls[e.shard], max(e.first, skip), e.stride, e.offset, on_trouble):
                yield sample, StreamPosition(e.epoch, idx, i + 1)
            skip = 0
        epoch, first_shard, skip = remainder.next_epoch, 0, 0
    while True:
        plan, modulo = slot_plan(urls, epoch, seed, slot, n_slots, resampled)
        stride, offset = (n_slots, slot) if modulo else (1, 0)
        whole_epoch = first_shard == 0 and skip == 0
        yielded = 0
        for shard_idx in range(first_shard, len(plan)):
            for i, sample in _read(plan[shard_idx], skip, stride, offset, on_trouble):
                yielded += 1
                yield sample, StreamPosition(epoch, shard_idx, i + 1)
            skip = 0
        if whole_epoch and yielded == 0:
            raise ShardError(f"slot {slot}/{n_slots} read no samples in epoch {epoch} "
                             f"from {len(plan)} shards")
        epoch, first_shard = epoch + 1, 0


def _read(url: str, skip: int, stride: int, offset: int,
          on_trouble: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(number, sample) of the samples of one shard from number `skip` on that are `offset` modulo
    `stride`; a read failure is reported (`on_trouble`) and ends the shard."""
    n_read = 0
    try:
        for sample in read_shard(url):
            i, n_read = n_read, n_read + 1
            if i < skip or i % stride != offset:
                continue
            yield i, sample
    except storage.StoreUnavailable:
        raise  # the store itself is gone: every other shard lives there too, so the run ends
    except Exception as e:  # noqa: BLE001 - any read failure of one shard is reported, not fatal
        trouble = ShardTrouble(url, n_read, f"{type(e).__name__}: {e}")
        log.warning("shard %s failed after %d samples: %s", storage.redact(url), n_read, trouble.error)
        if on_trouble is not None:
            on_trouble(trouble)


class ShardWriter:
    """Samples -> `<prefix>-000000.tar`, `<prefix>-000001.tar`, ... at `out` (a local folder or an
    fsspec URL), at most `per_shard` samples each: the one shard writer of the project (vaemo-shard,
    the synthetic corpus, the described set, fine-tuning's training clips and fold shards).

    Atomic: a shard is written under a temporary name (`.<name>.tmp-<pid>` beside it; for a remote
    `out`, in a local scratch folder), flushed to disk (fsync) and renamed into place (uploaded) when
    complete, so a shard name only ever points at a whole tar; `write_manifest` comes last, after every
    shard. Fixed mtime, no re-encoding: the same samples give byte-identical shards.

    `close()` publishes the last shard and, in a local folder, removes this prefix's shards of an
    earlier, larger build and the temporary files a killed writer left: the folder is the caller's own
    (claim it first, fsutil.claim_output_dir). As a context manager it closes on success; on an
    exception the shard being written is dropped, the finished ones stay."""

    def __init__(self, out: str | Path, per_shard: int, prefix: str = "shard") -> None:
        if per_shard < 1:
            raise ValueError(f"per_shard must be >= 1, got {per_shard}")
        self.out, self.per_shard, self.prefix = str(out).rstrip("/"), per_shard, prefix
        self.remote = storage.is_remote(self.out)
        self.shards: list[str] = []  # names of the shards begun, in order
        self.counts: list[int] = []  # samples in each
        self._scratch = tempfile.mkdtemp(prefix="vaemo-shards-") if self.remote else ""
        self._folder = Path(self._scratch if self.remote else storage.local_path(self.out))
        self._file: Any = None
        self._tar: TarWriter | None = None
        self._tmp: Path | None = None
        self.closed = False

    @property
    def total(self) -> int:
        return sum(self.counts)

    def url(self, name: str) -> str:
        """Where shard (or manifest) `name` of this set lives."""
        return f"{self.out}/{name}"

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample ({"__key__": ..., field: bytes}); a new shard is begun when one is full."""
        if self.closed:
            raise ValueError("write on a closed ShardWriter")
        if self._tar is None or self.counts[-1] >= self.per_shard:
            self._finish_shard()
            self.shards.append(f"{self.prefix}-{len(self.shards):06d}.tar")
            self.counts.append(0)
            self._folder.mkdir(parents=True, exist_ok=True)
            self._tmp = self._folder / f".{self.shards[-1]}.tmp-{os.getpid()}"
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish_shard / abort
            self._tar = TarWriter(self._file, encoder=False, mtime=0.0)
        self._tar.write(sample)
        self.counts[-1] += 1

    def _finish_shard(self) -> None:
        """Close the shard being written, flush it to disk and publish it under its name."""
        if self._tar is None or self._tmp is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        if self.remote:
            storage.put_file(str(self._tmp), self.url(self.shards[-1]))
        else:
            os.replace(self._tmp, self._folder / self.shards[-1])
            _fsync_dir(self._folder)
        self._tmp = None

    def close(self) -> None:
        """Publish the last shard; in a local folder, remove this prefix's stale shards and temporary
        files (see the class). Closing twice is harmless."""
        if self.closed:
            return
        self._finish_shard()
        self.closed = True
        if self.remote:
            shutil.rmtree(self._scratch, ignore_errors=True)
            return
        for stale in [*self._folder.glob(f"{glob.escape(self.prefix)}-*.tar"),
                      *self._folder.glob(f".{glob.escape(self.prefix)}-*.tar.tmp-*")]:
            if stale.name not in self.shards:
                stale.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); the published ones stay."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        if self.remote:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write_manifest(self, manifest: dict[str, Any], *, sort_keys: bool = True,
                       name: str = MANIFEST_NAME) -> str:
        """Write `manifest` (JSON, indent 2) beside the shards, after closing them: the last file of
        the set, replaced atomically (local: fsync, rename). Returns its URL."""
        self.close()
        text = json.dumps(manifest, indent=2, sort_keys=sort_keys)
        url = self.url(name)
        if self.remote:
            storage.write_bytes(url, text.encode())
        else:
            write_atomic(self._folder / name, text)
            _fsync_dir(self._folder)
        return url


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
