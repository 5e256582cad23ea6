"""Shared-memory batch buffers that a DataLoader worker reuses once the trainer has finished a batch.

With `data.finish: device` a worker hands out a micro-batch as uint8 planes (`finish.RawBatch`), stacked
in shared memory so that they reach the trainer's process without a copy. A new shared-memory block per
batch costs more than the copy into it: its pages are mapped and zeroed first (BENCHMARKS.md "Data
rate": about 1 ms a sample at 224 px). So each worker keeps the blocks of its recent batches and stacks
the next batch into one the trainer has given back.

A block goes back only when the trainer is done with it, never on a guess:
- `Batch.to(device)` gives a batch's blocks back once it has finished the batch (the finished tensors
  are new ones; the raw batch is consumed: its `raw` is dropped);
- on a GPU machine the DataLoader's pin-memory thread copies each batch into page-locked memory first,
  and `BatchLoader` gives the blocks back as soon as the pinned copy exists.
A batch that is never finished keeps its blocks: the worker forgets blocks that are out for long (the
batch still owns them) and makes new ones, so no batch ever sees another's data.

One `BufferReturns` is made in the trainer's process before the workers start (one return queue per
worker, inherited by the workers); each worker makes its `BufferPool` from it. Tokens carry the worker
process's id, so blocks given back after the workers were replaced (a new epoch's iterator, a resume)
are ignored by the new ones.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Lease:
    """The blocks one batch was stacked into: which worker (its index and process id) and their tokens."""

    worker: int
    pid: int
    tokens: tuple[int, ...]


class BufferReturns:
    """The trainer's side: one queue per worker on which finished batches' blocks go back."""

    def __init__(self, workers: int) -> None:
        ctx = multiprocessing.get_context()
        self.queues = [ctx.SimpleQueue() for _ in range(workers)]

    def give_back(self, lease: Lease) -> None:
        if 0 <= lease.worker < len(self.queues):
            self.queues[lease.worker].put((lease.pid, lease.tokens))

    def pool(self, worker: int, keep: int) -> BufferPool:
        """The pool of worker `worker` (called inside that worker), holding the blocks of up to `keep`
        batches."""
        return BufferPool(self.queues[worker], worker, keep)


class BufferPool:
    """A worker's blocks: `stack` into a given-back block of the right shape, else a new one; `lease()`
    names the blocks taken since the last lease (one batch's). The blocks of at most `keep` batches are
    held (a batch's count: the most any lease named); beyond that the longest-leased ones are forgotten
    (left to the batches that hold them)."""

    def __init__(self, queue: multiprocessing.queues.SimpleQueue, worker: int, keep: int) -> None:
        self.queue, self.worker, self.keep = queue, worker, max(1, keep)
        self.pid = os.getpid()
        self.blocks: dict[int, torch.Tensor] = {}
        self.free: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = {}
        self.out: OrderedDict[int, None] = OrderedDict()  # leased, oldest first
        self.taken: list[int] = []
        self.next_token = 0
        self.per_batch = 1  # blocks per lease, the most seen
        self.reused = 0  # blocks stacked into again (for tests)

    def _collect(self) -> None:
        while not self.queue.empty():
            pid, tokens = self.queue.get()
            if pid != self.pid:
                continue  # an earlier worker process's blocks
            for token in tokens:
                if token in self.out:
                    del self.out[token]
                    block = self.blocks[token]
                    self.free.setdefault((tuple(block.shape), block.dtype), []).append(token)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised shared-memory tensor of `shape` and `dtype`, leased to the next batch."""
        self._collect()
        free = self.free.get((tuple(shape), dtype))
        if free:
            token = free.pop()
            self.reused += 1
        else:
            token, self.next_token = self.next_token, self.next_token + 1
            storage = torch.UntypedStorage._new_shared(int(torch.Size(shape).numel()) * dtype.itemsize)
            self.blocks[token] = torch.empty(0, dtype=dtype).set_(storage).view(*shape)
        self.out[token] = None
        self.taken.append(token)
        self._bound()
        return self.blocks[token]

    def _bound(self) -> None:
        while len(self.blocks) > self.keep * self.per_batch:
            spare = next((ts for ts in self.free.values() if ts), None)
            if spare:  # a free block of another shape goes first
                del self.blocks[spare.pop()]
            else:  # the longest-leased block: its batch keeps it, this pool forgets it
                token, _ = self.out.popitem(last=False)
                del self.blocks[token]

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """torch.stack of equal-shaped tensors into a leased block."""
        out = self.take((len(tensors), *tensors[0].shape), tensors[0].dtype)
        return torch.stack(tensors, out=out)

    def lease(self) -> Lease | None:
        """The blocks taken since the last lease (None if none), for the batch stacked into them."""
        if not self.taken:
            return None
        tokens, self.taken = tuple(self.taken), []
        self.per_batch = max(self.per_batch, len(tokens))
        return Lease(self.worker, self.pid, tokens)
