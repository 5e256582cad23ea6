"""Shards -> decoded clips -> batches; the loader owns its data position (`state_dict` / `load_state_dict`).

Each DataLoader worker is one slot of `shards.iter_slot`; it validates, skips and counts bad clips,
and collates micro-batches itself (DataLoader(batch_size=None)). The DataLoader hands batches out
round-robin over workers, so after `n` batches the next one comes from worker `n % W`. On resume,
physical worker p plays logical worker (p + n) % W, which makes the resumed order identical to an
uninterrupted run. Resuming on another number of ranks or workers (`resize_data_states`) gives every
new slot its part of the rest of the begun epoch (`shards.plan_remainder`), carried in the data state
until that epoch is done.

Two decoders (`data.decoder`):
* pyav: workers decode on the CPU and hand out finished `Batch`es.
* dali: workers only probe and prepare samples (`decode_dali.prepare_sample`) and hand out
  `PendingBatch`es of bytes; the main process decodes each with one DALI pipeline (on the GPU when
  there is one). Either way a batch carries the position after its last sample, so resume is exact.

Skipped clips are counted per worker, in total (`decode`) and by kind (`decode/<kind>`, the kinds of
`types.DECODE_KINDS`); the counts travel with every batch and are saved in checkpoints.

Held-out clips (`exclude_keys`: the keys of `eval.holdout`'s split) are passed over where they are read,
before decoding, and not counted as samples. Positions still count them as read samples, so exact and
elastic resume (with the same keys excluded) continue the same streams.

The position: every batch carries the position after its last sample (`Batch.state`); the loader
(`BatchLoader`) applies it to its `DataState` as it hands the batch out, so its `state_dict()` is the
position after the batches the trainer has taken. `load_state_dict()` restores a position of the same
layout (data-parallel size and worker count, checked, as is the version); `load_resized()` continues the
positions of every rank of another layout. Iterating the loader starts at its position.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaemo_dist.config import DataConfig, InputConfig
from vaemo_dist.data import storage
from vaemo_dist.data.buffers import BufferReturns
from vaemo_dist.data.finish import resolve_finish
from vaemo_dist.data.shards import (
    PlanEntry,
    Remainder,
    ShardError,
    ShardTrouble,
    SlotState,
    StreamPosition,
    iter_slot,
    plan_remainder,
)
from vaemo_dist.data.types import DECODE_KINDS, Batch, DecodeError, DecodeLimits, collate

log = logging.getLogger(__name__)

# A slot that reads this many epochs in a row without a clip it may train on (every clip of its shards
# held out) stops with an error instead of spinning forever.
EXCLUDED_EPOCHS_LIMIT = 10

Decoder = Callable[[dict[str, Any], InputConfig], Any]  # sample -> Clip (pyav) or Prepared (dali)
DECODERS = ("auto", "dali", "pyav")
# The version of the loader's state_dict. 1: written before the state recorded one (the same fields).
DATA_STATE_VERSION = 2
PREFETCH = 2  # the DataLoader's prefetch_factor: batches each worker makes ahead


def resolve_decoder(name: str) -> str:
    """`data.decoder` for this machine: auto means DALI on a GPU, PyAV on CPU."""
    from vaemo_dist.data.decode_dali import dali_available

    if name not in DECODERS:
        raise ValueError(f"data.decoder: unknown decoder {name!r}; choose one of {list(DECODERS)}")
    if name == "auto":
        return "dali" if torch.cuda.is_available() and dali_available() else "pyav"
    if name == "dali" and not dali_available():
        raise ValueError("data.decoder=dali but NVIDIA DALI is not installed "
                         "(pip install nvidia-dali-cuda130)")
    return name


def get_decoder(name: str, gpu: bool | None = None, limits: DecodeLimits | None = None,
                repeats: int = 1, raw: bool = False, crop_jitter: float = 0.0) -> Decoder:
    """The per-sample function a DataLoader worker runs for `data.decoder`, bound to `limits`.

    With `repeats` > 1 it returns a list of `repeats` items per sample: PyAV decodes the clip once into
    `repeats` samples with shifted windows (`decode_pyav.decode_repeats`); DALI's prepared sample is
    handed out `repeats` times (the same window; the masks differ). `raw` (PyAV, `data.finish: device`):
    clips carry their decoded planes and waveforms for the trainer's device to finish (`data.finish`)."""
    if name not in ("pyav", "dali"):  # resolved once in the main process; workers get the result
        name = resolve_decoder(name)
    if name == "pyav":
        from vaemo_dist.data.decode_pyav import decode_repeats, decode_sample

        if repeats > 1:
            return functools.partial(decode_repeats, limits=limits, repeats=repeats, raw=raw,
                                     crop_jitter=crop_jitter)
        return functools.partial(decode_sample, limits=limits, raw=raw)
    from vaemo_dist.data.decode_dali import prepare_sample

    prepare = functools.partial(prepare_sample, gpu=torch.cuda.is_available() if gpu is None else gpu,
                                limits=limits)
    if repeats > 1:
        return functools.partial(_repeated, prepare, repeats)
    return prepare


def _repeated(prepare: Decoder, repeats: int, sample: dict[str, Any], inputs: InputConfig) -> list[Any]:
    """DALI with data.repeats: the prepared sample `repeats` times, keys marked as `repeat_key` does."""
    from vaemo_dist.data.decode_pyav import repeat_key

    item = prepare(sample, inputs)
    return [item if r == 0 else dataclasses.replace(item, key=repeat_key(item.key, r))
            for r in range(repeats)]


def new_counts() -> dict[str, int]:
    """A worker's cumulative counts, all zero: samples read, shards failed, clips skipped in total
    and by kind. Every key is always present, so every rank reports the same metrics."""
    return {"decode": 0, "shard": 0, "samples": 0, **{f"decode/{kind}": 0 for kind in DECODE_KINDS}}


def count_skip(counts: dict[str, int], kind: str) -> None:
    """Count one skipped clip of `kind` in a worker's counts."""
    counts["decode"] = counts.get("decode", 0) + 1
    counts[f"decode/{kind}"] = counts.get(f"decode/{kind}", 0) + 1


@dataclass
class PendingBatch:
    """A micro-batch of validated, not yet decoded samples (DALI path), with its data position."""

    items: list[Any]  # decode_dali.Prepared
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataState:
    """Where a rank's data stream stands: saved with every checkpoint."""

    num_workers: int
    world_size: int
    batches: int = 0  # batches handed to the trainer so far (in this layout)
    workers: dict[int, StreamPosition] = field(default_factory=dict)  # logical worker -> position
    # Counted skips, cumulative per logical worker: {"decode": n, "shard": n, "samples": n,
    # "decode/<kind>": n, ...} (see new_counts; checkpoints written before the kinds lack them).
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    recent_bad: list[str] = field(default_factory=list)  # a few "key: reason" lines for messages
    # After a resize: each logical worker's remainder plan (shards.plan_remainder), read before the
    # ordinary plan resumes at epoch `next_epoch` (0: no resize), for a list of `n_shards` shards.
    remainder: dict[int, list[PlanEntry]] = field(default_factory=dict)
    next_epoch: int = 0
    n_shards: int = 0
    # Lines of this rank's data.log_keys file written before this layout's first batch (a resize
    # starts counting `batches` from zero again).
    key_log_base: int = 0
    # data.repeats > 1: a logical worker that stopped inside a group of repeats (handed out `done` of
    # the `of` micro-batches made from one batch of decoded clips) -> {"start": the position before the
    # group's first sample, "counts": its counts there, "done", "of"}. Exact resume reads the group's
    # samples again from "start" and hands out its remaining micro-batches; `workers` holds the
    # position after the group (what an elastic resize continues from: it drops the rest of the group).
    groups: dict[int, dict[str, Any]] = field(default_factory=dict)

    def update(self, batch: Batch) -> None:
        s = batch.state
        w = int(s["worker"])
        self.batches += 1
        self.workers[w] = StreamPosition.from_dict(s["position"])
        self.counts[w] = dict(s["counts"])
        group = s.get("group")
        if group is not None and group["done"] < group["of"]:
            self.groups[w] = dict(group)
        else:
            self.groups.pop(w, None)
        self.recent_bad = (self.recent_bad + list(s.get("bad", [])))[-10:]

    def totals(self) -> dict[str, int]:
        """Counts summed over workers: decode, shard, samples and decode/<kind> for every kind."""
        out = new_counts()
        for c in self.counts.values():
            for k, v in c.items():
                out[k] = out.get(k, 0) + v
        return out

    def remainder_of(self, worker: int) -> Remainder | None:
        """The remainder plan of a logical worker (None without a resize)."""
        if not self.next_epoch:
            return None
        return Remainder(self.next_epoch, tuple(self.remainder.get(worker, ())))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "batches": self.batches,
            "workers": {str(k): v.to_dict() for k, v in self.workers.items()},
            "counts": {str(k): v for k, v in self.counts.items()},
        }
        # Only after a resize, so that checkpoints of runs that never resized stay as they were.
        if self.next_epoch:
            plans = {str(k): [e.to_list() for e in v] for k, v in self.remainder.items()}
            d["remainder"] = {"next_epoch": self.next_epoch, "n_shards": self.n_shards, "workers": plans}
        if self.key_log_base:
            d["key_log_base"] = self.key_log_base
        if self.groups:  # only with data.repeats > 1, mid-group
            d["groups"] = {str(k): v for k, v in self.groups.items()}
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DataState:
        rem = d.get("remainder") or {}
        return DataState(
            num_workers=int(d["num_workers"]),
            world_size=int(d["world_size"]),
            batches=int(d["batches"]),
            workers={int(k): StreamPosition.from_dict(v) for k, v in d["workers"].items()},
            counts={int(k): dict(v) for k, v in d["counts"].items()},
            remainder={int(k): [PlanEntry.from_list(e) for e in v]
                       for k, v in rem.get("workers", {}).items()},
            next_epoch=int(rem.get("next_epoch", 0)),
            n_shards=int(rem.get("n_shards", 0)),
            key_log_base=int(d.get("key_log_base", 0)),
            groups={int(k): {"start": dict(v["start"]), "counts": dict(v["counts"]), "done": int(v["done"]),
                             "of": int(v["of"])} for k, v in (d.get("groups") or {}).items()},
        )


def resize_data_states(old: Sequence[DataState], n_shards: int, seed: int, world_size: int,
                       num_workers: int, resampled: bool = False) -> list[DataState]:
    """The data states of the `world_size` data-parallel ranks of a new layout (`num_workers` each)
    that continue the streams of `old` (one state per old data-parallel rank, in rank order).

    Every sample the old ranks had not trained on in the epochs they had begun is read once by
    the new ranks, from the remainder plans (`shards.plan_remainder`); the samples they had
    trained on are not read again in those epochs. Skip counts are carried: the old ranks' totals
    go to worker 0 of new rank 0, so sums over ranks go on counting. Pure: nothing is read.
    """
    if not old or len(old) != old[0].world_size:
        raise ValueError(f"resize needs the data states of all {old[0].world_size if old else '?'} old "
                         f"data-parallel ranks, got {len(old)}")
    if any((s.num_workers, s.world_size) != (old[0].num_workers, old[0].world_size) for s in old):
        raise ValueError("the old ranks' data states disagree on the layout (num_workers, world size)")
    if any(s.n_shards and s.n_shards != n_shards for s in old):
        raise ValueError(f"the checkpoint's remainder plan is for {old[0].n_shards} shards, data.shards now "
                         f"names {n_shards}: resume with the same shard list")
    old_workers = max(1, old[0].num_workers)
    n_old = len(old) * old_workers
    slots = [SlotState(r * old_workers + w, n_old, s.workers.get(w, StreamPosition()), s.remainder_of(w))
             for r, s in enumerate(old) for w in range(old_workers)]
    workers = max(1, num_workers)
    next_epoch, plans = plan_remainder(n_shards, seed, slots, world_size * workers, resampled)
    carried = new_counts()
    for s in old:
        for k, v in s.totals().items():
            carried[k] = carried.get(k, 0) + v
    return [DataState(num_workers, world_size,
                      counts={0: carried} if r == 0 else {},
                      remainder={w: plans[r * workers + w] for w in range(workers)},
                      next_epoch=next_epoch, n_shards=n_shards,
                      key_log_base=old[r].key_log_base + old[r].batches if r < len(old) else 0)
            for r in range(world_size)]


def cut_key_log(log_dir: str, rank: int, lines: int) -> None:
    """Cut `<log_dir>/keys-rank<rank>.txt` (data.log_keys) to its first `lines` lines, if it exists."""
    path = os.path.join(log_dir, f"keys-rank{rank}.txt")
    if os.path.exists(path):
        with open(path, "r+b") as f:
            _cut_to_lines(f, lines)


def count_key_log(log_dir: str, rank: int) -> int:
    """Lines of `<log_dir>/keys-rank<rank>.txt` (0 if there is none)."""
    path = os.path.join(log_dir, f"keys-rank{rank}.txt")
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _cut_to_lines(f: BinaryIO, lines: int) -> int:
    """Cut an open file to its first `lines` lines; return how many it had up to that many."""
    f.seek(0)
    end = kept = 0
    while kept < lines and (line := f.readline()):
        end += len(line)
        kept += 1
    f.truncate(end)  # in place: a crash here loses nothing that should stay
    return kept


class ClipStream(IterableDataset):
    """An endless stream of collated micro-batches for one rank (`Batch`, or `PendingBatch` for DALI)."""

    def __init__(
        self,
        urls: list[str],
        data: DataConfig,
        inputs: InputConfig,
        rank: int,
        world_size: int,
        resume: DataState | None = None,
        decoder: str = "pyav",
        gpu: bool = False,
        exclude_keys: frozenset[str] = frozenset(),
        finish: str = "loader",
    ) -> None:
        super().__init__()
        self.urls, self.data, self.inputs = urls, data, inputs
        self.rank, self.world_size = rank, world_size
        self.n_workers = max(1, data.num_workers)
        self.resume = resume or DataState(data.num_workers, world_size)
        self.decoder, self.gpu = decoder, gpu
        self.exclude_keys = exclude_keys
        self.finish = finish  # resolved (loader | device) in the main process
        # Where workers' raw batches give their shared-memory blocks back (made before the workers fork).
        self.returns = BufferReturns(data.num_workers) if data.num_workers > 0 and finish == "device" \
            and decoder == "pyav" else None

    def __iter__(self) -> Iterator[Batch | PendingBatch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.resume.batches) % self.n_workers
        if info is not None:
            torch.set_num_threads(1)  # decode workers must not fight the trainer for cores
        storage.configure_from(self.data)  # this process's own filesystem objects (not fork-safe)
        slot = self.rank * self.n_workers + logical
        n_slots = self.world_size * self.n_workers
        start = self.resume.workers.get(logical, StreamPosition())
        # Old checkpoints have no per-kind counts: they start from zero.
        counts = {**new_counts(), **self.resume.counts.get(logical, {})}
        repeats = max(1, self.data.repeats)
        decode = get_decoder(self.decoder, self.gpu, DecodeLimits.from_config(self.data), repeats,
                             raw=self.finish == "device", crop_jitter=self.data.crop_jitter)
        pending = self.decoder == "dali"
        # Stopped inside a group of repeats: read the group again from its start, with the counts it
        # started with, and hand out only the micro-batches not handed out before.
        group = self.resume.groups.get(logical)
        skip = 0
        if group is not None and group["of"] == repeats:
            start, skip = StreamPosition.from_dict(group["start"]), group["done"]
            counts = {**new_counts(), **group["counts"]}
        elif group is not None:
            log.warning("data.repeats changed from %d to %d: worker %d continues after its begun group "
                        "(%d of its micro-batches were not handed out)", group["of"], repeats, logical,
                        group["of"] - group["done"])

        bad: list[str] = []

        def on_trouble(t: ShardTrouble) -> None:
            counts["shard"] += 1
            bad.append(f"{storage.redact(t.url)}: {t.error} (after {t.after_samples} samples)")

        clips: list[Any] = []  # per decoded clip, its `repeats` samples
        # A worker's raw batches stack into blocks the trainer gives back: those of the batches in flight
        # (the DataLoader's prefetch, the one being stacked, the trainer's and the pinned one) and of the
        # group of repeats being handed out.
        pool = self.returns.pool(physical, keep=PREFETCH + 2 + repeats) \
            if self.returns is not None and info is not None else None
        stream = iter_slot(self.urls, self.data.shuffle_seed, slot, n_slots, start, on_trouble,
                           resampled=self.data.resampled, remainder=self.resume.remainder_of(logical))
        exclude, kept_epoch = self.exclude_keys, start.epoch
        # Where the current group of repeats starts, and the counts there (taken before anything of
        # the group is read: a shard failure met on the way to its first sample is re-met on resume).
        group_start, group_counts = start, dict(counts)
        for sample, position in stream:
            if exclude:
                if sample.get("__key__") in exclude:  # held out for evaluation: never trained on
                    if position.epoch - kept_epoch >= EXCLUDED_EPOCHS_LIMIT:
                        raise ShardError(
                            f"slot {slot}/{n_slots} read {EXCLUDED_EPOCHS_LIMIT} epochs in a row with only "
                            "held-out clips (eval.holdout) in its shards: shard the data mixed (vaemo-shard "
                            "shuffles by default) or use fewer ranks/workers")
                    continue
                kept_epoch = position.epoch
            counts["samples"] += 1
            try:
                clips.append(decode(sample, self.inputs))
            except DecodeError as e:
                count_skip(counts, e.kind)
                url = storage.redact(str(sample.get("__url__", "?")))
                bad.append(f"{e.key} ({url}): {e.reason}")
                log.warning("skipped clip %s from %s (%s): %s", e.key, url, e.kind, e.reason)
                continue
            if len(clips) == self.data.batch_size:
                # Repeat r of every clip goes to micro-batch r: no micro-batch (and so no contrastive
                # denominator, which gathers one micro-batch per rank) holds two repeats of a clip.
                for r in range(skip, repeats):
                    state = {"worker": logical, "position": position.to_dict(), "counts": dict(counts),
                             "bad": bad if r == skip else []}
                    if repeats > 1:
                        state["group"] = {"start": group_start.to_dict(), "counts": group_counts,
                                          "done": r + 1, "of": repeats}
                    items = [c[r] for c in clips] if repeats > 1 else clips
                    yield PendingBatch(items, state) if pending else collate(items, state, self.inputs, pool)
                clips, bad, skip = [], [], 0
                group_start, group_counts = position, dict(counts)


class BatchLoader:
    """What `build_loader` returns: iterate it for `Batch`es; it knows where its stream stands.

    It wraps the DataLoader, decodes `PendingBatch`es with this process's DALI pipeline, and keeps
    `state` (a `DataState`), the position after the last batch handed out: `state_dict()` for a
    checkpoint, `load_state_dict()` / `load_resized()` before iterating to resume. Every iteration starts
    at that position (batches prefetched and never handed out are read again).

    With `data.log_keys` it writes the keys of every batch handed to the trainer to
    `<log_keys>/keys-rank<R>.txt` (R: the global rank), one line per batch, keys separated by
    spaces: a debugging aid for checking that no sample is lost or repeated. The file is first cut
    to the batches the iteration starts after (`state.key_log_base + state.batches`; none for a
    fresh start): lines written after the last checkpoint, for batches that were never trained on or
    are read again, go. So across crashes and resumes it lists exactly the batches the model trained on.
    """

    def __init__(self, loader: Iterable[Batch | PendingBatch], data: DataConfig, inputs: InputConfig,
                 rank: int, stream: ClipStream | None = None) -> None:
        """`rank`: the data-parallel rank; `stream`: the dataset behind `loader`, told the position to
        start at on every iteration (None: a fixed iterable, as in tests)."""
        self.loader, self.data, self.inputs, self.rank, self.stream = loader, data, inputs, rank, stream
        self.world_size = stream.world_size if stream is not None else 1
        self.state = DataState(data.num_workers, self.world_size)
        self._dali: Any = None
        # Clips that passed the workers' probe but failed in the main process, per logical worker
        # (counts by key, as in new_counts); added to the worker's cumulative counts so the
        # checkpointed totals include them.
        self._late_failures: dict[int, dict[str, int]] = {}

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches handed out so far, with its version and layout (JSON)."""
        return {"version": DATA_STATE_VERSION, **self.state.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state` (a `state_dict()` of a loader of the same layout: data-parallel size and
        data.num_workers; another layout is `load_resized`'s)."""
        restored = _checked_state(state)
        layout = (self.data.num_workers, self.world_size)
        if (restored.num_workers, restored.world_size) != layout:
            raise ValueError(
                f"exact resume needs the same data layout: the checkpoint has data.num_workers="
                f"{restored.num_workers} and world size {restored.world_size}, this run has "
                f"{layout[0]} and {layout[1]} (load_resized continues the states of another layout)")
        n_urls = len(self.stream.urls) if self.stream is not None else restored.n_shards
        if restored.n_shards and restored.n_shards != n_urls:
            raise ValueError(f"the data state's remainder plan is for {restored.n_shards} shards, "
                             f"data.shards names {n_urls}: resume with the same shard list")
        self.state = restored

    def load_resized(self, old: Sequence[dict[str, Any]], tp_size: int = 1) -> str:
        """Resume from the states of another layout: `old` holds the `state_dict()` of every process of
        the old run in global rank order (`tp_size` consecutive processes share a data-parallel rank).
        This rank gets its part of the rest of the begun epoch (`resize_data_states`); with data.log_keys,
        the key logs are handed over too. Returns what was done, for the log."""
        if self.stream is None:
            raise ValueError("load_resized needs a loader made by build_loader")
        states = [_checked_state(s) for s in old]
        per_dp = states[::tp_size]
        new = resize_data_states(per_dp, len(self.stream.urls), self.data.shuffle_seed, self.world_size,
                                 self.data.num_workers, self.data.resampled)
        mine = new[self.rank]
        if self.data.log_keys:
            rank, world = _global_rank(self.rank, self.world_size)
            if rank >= len(states):  # no old rank of this number: its file, if any, stays whole
                mine.key_log_base = count_key_log(self.data.log_keys, rank)
            if rank == 0:  # old ranks with no new process: their files keep the batches trained on
                for g in range(world, len(states)):
                    cut_key_log(self.data.log_keys, g, states[g].key_log_base + states[g].batches)
        self.state = mine
        pieces = [e for s in new for plan_of in s.remainder.values() for e in plan_of]
        begun = "/".join(map(str, sorted({e.epoch for e in pieces}))) or "-"
        return (f"the rest of epoch {begun} ({len(pieces)} pieces) dealt to "
                f"{self.world_size * max(1, self.data.num_workers)} slots, the ordinary plan from epoch "
                f"{new[0].next_epoch}")

    def __iter__(self) -> Iterator[Batch]:
        if self.stream is not None:  # a copy: `state` goes on with the batches handed out
            self.stream.resume = DataState.from_dict(self.state.to_dict())
        keys_file = self._open_keys_log() if self.data.log_keys else None
        try:
            for item in self.loader:
                batch = self._decode(item) if isinstance(item, PendingBatch) else item
                if batch.lease is not None and self.stream is not None and self.stream.returns is not None:
                    if batch.raw is not None and batch.raw.y.is_pinned():  # a copy: the blocks are free
                        self.stream.returns.give_back(batch.lease)
                    else:  # Batch.to gives them back once it has finished the batch
                        batch.give_back = functools.partial(self.stream.returns.give_back, batch.lease)
                self.state.update(batch)
                if keys_file is not None:
                    keys_file.write((" ".join(batch.keys) + "\n").encode())
                    keys_file.flush()
                yield batch
        finally:
            if keys_file is not None:
                keys_file.close()

    def _open_keys_log(self) -> BinaryIO:
        """This rank's key log, cut to the batches handed out before this iteration, open for appending."""
        os.makedirs(self.data.log_keys, exist_ok=True)
        # One file per process (global rank): under tensor parallelism several processes share
        # a data-parallel rank and log the same keys.
        rank, _ = _global_rank(self.rank, self.world_size)
        path = os.path.join(self.data.log_keys, f"keys-rank{rank}.txt")
        f = open(path, "a+b")  # noqa: SIM115 (closed by __iter__)
        start = self.state.key_log_base + self.state.batches
        lines = _cut_to_lines(f, start)
        if lines < start:
            log.warning("%s has %d lines but the run resumes after %d batches: it does not cover the "
                        "whole run", path, lines, start)
        return f

    def _decoder(self) -> Any:
        if self._dali is None:
            from vaemo_dist.data.decode_dali import DaliDecoder

            device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
            self._dali = DaliDecoder(self.inputs, self.data.batch_size, device_id, self.data.dali_threads,
                                     limits=DecodeLimits.from_config(self.data))
        return self._dali

    def _decode(self, pending: PendingBatch) -> Batch:
        items, state = pending.items, dict(pending.state)
        out = self._decoder().decode(items)
        keys = [items[i].key for i in out.ok]
        labels = [items[i].label for i in out.ok]
        video, audio = out.video, out.audio
        if out.failed:
            late = self._late_failures.setdefault(int(state["worker"]), {})
            urls = {it.key: storage.redact(it.url) for it in items}
            lines = []
            for e in out.failed:
                count_skip(late, e.kind)
                lines.append(f"{e.key} ({urls.get(e.key, '?')}): {e.reason}")
                log.warning("skipped clip %s from %s (%s): %s", e.key, urls.get(e.key, "?"), e.kind, e.reason)
            state["bad"] = list(state.get("bad", [])) + lines
            if not out.ok:
                raise RuntimeError(f"no clip of a batch could be decoded: {state['bad'][-len(out.failed):]}")
            # Batches keep their size (the contrastive loss gathers equal shapes over ranks): the
            # holes are filled with repeats of decoded clips of this batch, marked in their keys.
            fill = [i % len(out.ok) for i in range(len(items) - len(out.ok))]
            video = torch.cat([video, video[fill]])
            audio = torch.cat([audio, audio[fill]])
            keys += [f"{keys[i]}#repeat" for i in fill]
            labels += [labels[i] for i in fill]
        if self._late_failures:
            counts = dict(state["counts"])
            for name, n in self._late_failures.get(int(state["worker"]), {}).items():
                counts[name] = counts.get(name, 0) + n
            state["counts"] = counts
        return Batch(video=video, audio=audio, keys=keys, label=torch.tensor(labels, dtype=torch.long),
                     state=state)


def _checked_state(state: dict[str, Any]) -> DataState:
    """A loader `state_dict()` (or a data state saved before versions) as a DataState, its version checked."""
    version = int(state.get("version", 1))
    if version > DATA_STATE_VERSION:
        raise ValueError(f"the data state has version {version}, this vaemo_dist reads up to "
                         f"{DATA_STATE_VERSION}: resume it with the version that wrote it")
    return DataState.from_dict(state)


def _global_rank(dp_rank: int, dp_size: int) -> tuple[int, int]:
    """(rank, world size) of this process: the process group's, else the data-parallel ones."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return dp_rank, dp_size


def describe_loader(data: DataConfig, n_urls: int) -> str:
    """One line on where batches come from and how they are made, for the run's log."""
    decoder = resolve_decoder(data.decoder)
    finish = resolve_finish(data.finish, decoder, torch.cuda.is_available())
    where = {"device": "the trainer's device", "loader": "the loader workers"}[finish]
    if decoder == "dali":
        where, finish = "DALI's pipeline (GPU if present)", "n/a with DALI"
    jitter = f", crop jitter {data.crop_jitter:g}" if data.crop_jitter > 0 and data.repeats > 1 else ""
    return (f"{storage.redact(data.shards)} ({n_urls} shards), decoder {decoder}, preprocessing on {where} "
            f"(data.finish={finish}), {max(1, data.num_workers)} workers x batch {data.batch_size}, "
            f"repeats {data.repeats}{jitter}")


def build_loader(
    urls: list[str],
    data: DataConfig,
    inputs: InputConfig,
    rank: int,
    world_size: int,
    resume: DataState | None = None,
    exclude_keys: Iterable[str] | None = None,
) -> BatchLoader:
    """Batches of this data-parallel rank's share of `urls`, resumed from `resume` if given (or later
    with `load_state_dict`). `exclude_keys`: clips never to train on (held out for evaluation); keep
    the same set across resumes."""
    decoder = resolve_decoder(data.decoder)
    finish = resolve_finish(data.finish, decoder, torch.cuda.is_available())
    if decoder == "dali" and data.crop_jitter > 0 and data.repeats > 1:
        log.warning("data.crop_jitter=%g has no effect with the DALI decoder: its repeats share one window "
                    "and one crop (masks still differ); use data.decoder=pyav for jittered repeats",
                    data.crop_jitter)
    storage.configure_from(data)
    stream = ClipStream(urls, data, inputs, rank, world_size, None, decoder, gpu=torch.cuda.is_available(),
                        exclude_keys=frozenset(exclude_keys or ()), finish=finish)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=data.num_workers,
        # DALI batches are bytes; its outputs land on the GPU directly.
        pin_memory=torch.cuda.is_available() and decoder == "pyav",
        persistent_workers=False,
        prefetch_factor=PREFETCH if data.num_workers > 0 else None,
        # Its own generator: starting workers must not draw from the global RNG, which the trainer
        # restores on resume (masking depends on it).
        generator=torch.Generator().manual_seed(data.shuffle_seed),
    )
    batches = BatchLoader(loader, data, inputs, rank, stream)
    if resume is not None:
        batches.load_state_dict(resume.to_dict())
    return batches
