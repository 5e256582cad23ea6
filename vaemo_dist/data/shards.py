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
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vaemo_dist.data import storage

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


def expand_shards(spec: str) -> list[str]:
    """Turn a shard spec into a list of URLs.

    Accepts comma-separated items, each a brace pattern (`train-{000000..000099}.tar`), a local
    folder (all `*.tar` in it), a local glob, any fsspec URL (`s3://...`), or the `manifest.json`
    that `vaemo-shard` writes next to its shards (local or remote: its shards, in order). Local
    paths must exist; that is checked here, at start-up, so a typo fails at once and by name.
    """
    from braceexpand import braceexpand  # a webdataset dependency

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
                found = sorted(glob.glob(os.path.join(path, "*.tar")))
                if not found:
                    raise ShardError(f"no *.tar shards in folder {path}")
                urls.extend(found)
            elif any(ch in path for ch in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise ShardError(f"shard pattern matched nothing: {path}")
                urls.extend(found)
            elif os.path.isfile(path):
                urls.append(path)
            else:
                raise ShardError(f"shard not found: {path} (from data.shards={spec!r})")
    if not urls:
        raise ShardError(f"data.shards={spec!r} names no shards")
    return urls


def shards_from_manifest(url: str) -> list[str]:
    """The shard URLs a `vaemo-shard` manifest lists, resolved next to the manifest."""
    try:
        manifest = json.loads(storage.read_bytes(url))
        names = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"cannot read the shard manifest: {storage.describe_error(url, e)}") from e
    base = url[: -len(MANIFEST_NAME)]
    return [base + name for name in names]


def slot_plan(urls: list[str], epoch: int, seed: int, slot: int, n_slots: int,
              resampled: bool = False) -> tuple[list[str], bool]:
    """The shards slot `slot` reads in `epoch`, and whether it must keep only every n-th sample."""
    if resampled:
        # As many draws per epoch as a whole-shard split would give the slot; str seeds are
        # hashed deterministically (not with Python's per-process hash randomisation).
        rng = random.Random(f"resampled:{seed}:{slot}:{epoch}")
        return [rng.choice(urls) for _ in range(max(1, len(urls) // n_slots))], False
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if len(order) >= n_slots:
        return order[slot::n_slots], False
    return order, True


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
) -> Iterator[tuple[dict[str, Any], StreamPosition]]:
    """Yield (sample, position after it) for one slot, forever, starting at `start`.

    A shard that cannot be opened or is cut short (truncated tar) is reported through
    `on_trouble(ShardTrouble)` and the stream moves on to the next shard; the samples before the
    cut are kept. If a whole epoch yields nothing, the shards are unusable and we stop loudly.
    """
    epoch, first_shard, skip = start.epoch, start.shard, start.sample
    while True:
        plan, modulo = slot_plan(urls, epoch, seed, slot, n_slots, resampled)
        whole_epoch = first_shard == 0 and skip == 0
        yielded = 0
        for shard_idx in range(first_shard, len(plan)):
            url = plan[shard_idx]
            n_read = 0
            try:
                for sample in read_shard(url):
                    i, n_read = n_read, n_read + 1
                    if i < skip or (modulo and i % n_slots != slot):
                        continue
                    yielded += 1
                    yield sample, StreamPosition(epoch, shard_idx, i + 1)
            except Exception as e:  # noqa: BLE001 - any read failure of one shard is reported, not fatal
                trouble = ShardTrouble(url, n_read, f"{type(e).__name__}: {e}")
                log.warning("shard %s failed after %d samples: %s", storage.redact(url), n_read,
                            trouble.error)
                if on_trouble is not None:
                    on_trouble(trouble)
            skip = 0
        if whole_epoch and yielded == 0:
            raise ShardError(f"slot {slot}/{n_slots} read no samples in epoch {epoch} "
                             f"from {len(plan)} shards")
        epoch, first_shard = epoch + 1, 0


class ShardSetWriter:
    """Write samples into `shard-000000.tar`, `shard-000001.tar`, ... of a local folder, at most
    `per_shard` samples each. A shard is written under a temporary name and renamed when complete,
    so a shard name only ever points at a whole tar. Fixed mtime and no re-encoding: the same samples
    give byte-identical shards."""

    def __init__(self, out: Path | str, per_shard: int) -> None:
        self.out, self.per_shard = Path(out), per_shard
        self.shards: list[str] = []
        self.counts: list[int] = []
        self._writer: TarWriter | None = None
        self._tmp: Path | None = None

    def write(self, sample: dict[str, Any]) -> None:
        if not self.counts or self.counts[-1] >= self.per_shard:
            self._close_shard()
            self.shards.append(f"shard-{len(self.shards):06d}.tar")
            self.counts.append(0)
            self._tmp = self.out / f".{self.shards[-1]}.tmp-{os.getpid()}"
            self._writer = TarWriter(str(self._tmp), encoder=False, mtime=0.0)
        self._writer.write(sample)
        self.counts[-1] += 1

    def _close_shard(self) -> None:
        if self._writer is not None and self._tmp is not None:
            self._writer.close()
            os.replace(self._tmp, self.out / self.shards[-1])
            self._writer = None

    def close(self) -> None:
        """Publish the last shard and remove shards of an earlier, larger build of this folder."""
        self._close_shard()
        for stale in self.out.glob("shard-*.tar"):
            if stale.name not in self.shards:
                stale.unlink()
