"""Shards -> decoded clips -> batches, with the data position carried on every batch.

Each DataLoader worker is one slot of `shards.iter_slot`; it decodes, skips and counts bad clips,
and collates micro-batches itself (DataLoader(batch_size=None)). The DataLoader hands batches out
round-robin over workers, so after `n` batches the next one comes from worker `n % W`. On resume,
physical worker p plays logical worker (p + n) % W, which makes the resumed order identical to an
uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaemo_dist.config import DataConfig, InputConfig
from vaemo_dist.data.shards import ShardTrouble, StreamPosition, iter_slot
from vaemo_dist.data.types import Batch, Clip, DecodeError, collate

log = logging.getLogger(__name__)

Decoder = Callable[[dict[str, Any], InputConfig], Clip]


def get_decoder(name: str) -> Decoder:
    """The one place that maps `data.decoder` to a decode function."""
    if name == "pyav":
        from vaemo_dist.data.decode_pyav import decode_sample

        return decode_sample
    raise ValueError(f"data.decoder: unknown decoder {name!r}; choose one of ['pyav']")


@dataclass
class DataState:
    """Where a rank's data stream stands: saved with every checkpoint."""

    num_workers: int
    world_size: int
    batches: int = 0  # batches handed to the trainer so far
    workers: dict[int, StreamPosition] = field(default_factory=dict)  # logical worker -> position
    # Counted skips, cumulative per logical worker: {"decode": n, "shard": n, "samples": n}
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    recent_bad: list[str] = field(default_factory=list)  # a few "key: reason" lines for messages

    def update(self, batch: Batch) -> None:
        s = batch.state
        w = int(s["worker"])
        self.batches += 1
        self.workers[w] = StreamPosition.from_dict(s["position"])
        self.counts[w] = dict(s["counts"])
        self.recent_bad = (self.recent_bad + list(s.get("bad", [])))[-10:]

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {"decode": 0, "shard": 0, "samples": 0}
        for c in self.counts.values():
            for k, v in c.items():
                out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "batches": self.batches,
            "workers": {str(k): v.to_dict() for k, v in self.workers.items()},
            "counts": {str(k): v for k, v in self.counts.items()},
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DataState:
        return DataState(
            num_workers=int(d["num_workers"]),
            world_size=int(d["world_size"]),
            batches=int(d["batches"]),
            workers={int(k): StreamPosition.from_dict(v) for k, v in d["workers"].items()},
            counts={int(k): dict(v) for k, v in d["counts"].items()},
        )


class ClipStream(IterableDataset):
    """An endless stream of collated micro-batches for one rank."""

    def __init__(
        self,
        urls: list[str],
        data: DataConfig,
        inputs: InputConfig,
        rank: int,
        world_size: int,
        resume: DataState | None = None,
    ) -> None:
        super().__init__()
        self.urls, self.data, self.inputs = urls, data, inputs
        self.rank, self.world_size = rank, world_size
        self.n_workers = max(1, data.num_workers)
        self.resume = resume or DataState(data.num_workers, world_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.resume.batches) % self.n_workers
        if info is not None:
            torch.set_num_threads(1)  # decode workers must not fight the trainer for cores
        slot = self.rank * self.n_workers + logical
        n_slots = self.world_size * self.n_workers
        start = self.resume.workers.get(logical, StreamPosition())
        counts = dict(self.resume.counts.get(logical, {"decode": 0, "shard": 0, "samples": 0}))
        decode = get_decoder(self.data.decoder)

        bad: list[str] = []

        def on_trouble(t: ShardTrouble) -> None:
            counts["shard"] += 1
            bad.append(f"{t.url}: {t.error} (after {t.after_samples} samples)")

        clips: list[Clip] = []
        stream = iter_slot(self.urls, self.data.shuffle_seed, slot, n_slots, start, on_trouble)
        for sample, position in stream:
            counts["samples"] += 1
            try:
                clips.append(decode(sample, self.inputs))
            except DecodeError as e:
                counts["decode"] += 1
                bad.append(f"{e.key} ({sample.get('__url__', '?')}): {e.reason}")
                log.warning("skipped clip %s from %s: %s", e.key, sample.get("__url__"), e.reason)
                continue
            if len(clips) == self.data.batch_size:
                state = {"worker": logical, "position": position.to_dict(), "counts": dict(counts),
                         "bad": bad}
                yield collate(clips, state)
                clips, bad = [], []


def build_loader(
    urls: list[str],
    data: DataConfig,
    inputs: InputConfig,
    rank: int,
    world_size: int,
    resume: DataState | None = None,
) -> DataLoader:
    if resume is not None and (resume.num_workers, resume.world_size) != (data.num_workers, world_size):
        raise ValueError(
            f"exact resume needs the same data layout: the checkpoint has data.num_workers="
            f"{resume.num_workers} and world size {resume.world_size}, this run has "
            f"{data.num_workers} and {world_size}"
        )
    stream = ClipStream(urls, data, inputs, rank, world_size, resume)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=data.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=2 if data.num_workers > 0 else None,
        # Its own generator: starting workers must not draw from the global RNG, which the trainer
        # restores on resume (masking depends on it).
        generator=torch.Generator().manual_seed(data.shuffle_seed),
    )
