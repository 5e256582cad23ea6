"""Reusable shared-memory blocks of raw batches (data/buffers.py): a block is stacked into again only
after the trainer gave it back, a batch that is held keeps its data, and the batches are the values a
loader without workers (no blocks at all) hands out."""

import os
from dataclasses import replace

import pytest
import torch

from vaemo_dist.config import InputConfig, load_config
from vaemo_dist.data.buffers import BufferReturns, Lease
from vaemo_dist.data.loader import PREFETCH, build_loader
from vaemo_dist.data.shards import expand_shards


def small_inputs() -> InputConfig:
    inputs = InputConfig()
    inputs.video.frames, inputs.video.stride, inputs.video.size = 4, 4, 32
    inputs.audio.frames = 32
    return inputs


def frames(n: int = 3, value: int = 0) -> list[torch.Tensor]:
    return [torch.full((4, 6), value + i, dtype=torch.uint8) for i in range(n)]


def test_a_block_is_stacked_into_again_only_after_it_was_given_back():
    returns = BufferReturns(1)
    pool = returns.pool(0, keep=8)
    a = pool.stack(frames(value=10))
    lease_a = pool.lease()
    assert lease_a == Lease(0, os.getpid(), (0,)) and a.is_shared()
    b = pool.stack(frames(value=20))  # `a` is still out: a new block
    lease_b = pool.lease()
    assert b.data_ptr() != a.data_ptr() and a[0, 0, 0] == 10 and b[0, 0, 0] == 20
    returns.give_back(lease_a)
    c = pool.stack(frames(value=30))
    assert c.data_ptr() == a.data_ptr() and pool.reused == 1  # a's block, given back, serves again
    assert torch.equal(c, torch.stack(frames(value=30))) and b[0, 0, 0] == 20
    pool.lease()
    # Another shape never takes a given-back block of the wrong shape.
    returns.give_back(lease_b)
    d = pool.stack([torch.zeros(2, 2, dtype=torch.uint8)] * 3)
    assert d.shape == (3, 2, 2) and pool.reused == 1
    assert pool.lease() is not None and pool.lease() is None  # nothing taken since the last lease


def test_blocks_given_back_by_an_earlier_worker_process_are_ignored():
    returns = BufferReturns(1)
    pool = returns.pool(0, keep=8)
    pool.stack(frames())
    lease = pool.lease()
    returns.give_back(Lease(0, lease.pid + 1, lease.tokens))  # another process's token 0
    pool.stack(frames())
    assert pool.reused == 0


def test_blocks_never_given_back_are_forgotten_and_stay_with_their_batch():
    returns = BufferReturns(1)
    pool = returns.pool(0, keep=3)
    held = []
    for i in range(6):
        held.append(pool.stack(frames(value=i)))
        pool.lease()
    assert len(pool.blocks) <= 3  # the pool does not grow with batches that never come back
    for i, block in enumerate(held):  # and none was written into by a later stack
        assert torch.equal(block, torch.stack(frames(value=i)))


@pytest.fixture(scope="module")
def loader_parts(tiny_corpus):
    cfg = load_config("configs/stage1/tiny.yaml", [])
    data = replace(cfg.data, shards=str(tiny_corpus), batch_size=2, log_keys="", decoder="pyav",
                   finish="device", resampled=True)
    return expand_shards(str(tiny_corpus)), data, small_inputs()


def test_worker_batches_in_reused_blocks_finish_as_the_in_process_loader_s(loader_parts):
    urls, data, inputs = loader_parts
    reference = iter(build_loader(urls, replace(data, num_workers=0), inputs, 0, 1))
    pooled = iter(build_loader(urls, replace(data, num_workers=1), inputs, 0, 1))
    inodes = []
    for _ in range(8):
        ref, got = next(reference), next(pooled)
        assert ref.lease is None and got.lease is not None and got.keys == ref.keys
        fd, _ = got.raw.y.untyped_storage()._share_fd_cpu_()
        inodes.append(os.fstat(fd).st_ino)
        a, b = got.to("cpu"), ref.to("cpu")  # to() gives the blocks back
        assert got.raw is None  # consumed: nothing can read the blocks the worker reuses
        assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)
        with pytest.raises(RuntimeError, match="already finished"):
            got.to("cpu")
    # Batches came in given-back blocks: no more distinct ones than batches can be out at once (the
    # prefetch, the one being stacked, the trainer's, the pinned one).
    assert len(set(inodes)) <= PREFETCH + 2 < len(inodes)


def test_a_batch_held_by_the_trainer_keeps_its_data_while_the_loader_goes_on(loader_parts):
    urls, data, inputs = loader_parts
    it = iter(build_loader(urls, replace(data, num_workers=1), inputs, 0, 1))
    held = next(it)
    copy = [t.clone() for t in (held.raw.y, held.raw.u, held.raw.v, held.raw.wave)]
    for _ in range(10):
        next(it).to("cpu")  # the others go back and are reused
    now = (held.raw.y, held.raw.u, held.raw.v, held.raw.wave)
    assert all(torch.equal(a, b) for a, b in zip(now, copy, strict=True))


def test_a_pinned_copy_gives_the_blocks_back_at_once(loader_parts, monkeypatch):
    # What the DataLoader's pin-memory thread does on a GPU machine, without a GPU: the copy is marked
    # pinned, so the BatchLoader gives the worker's blocks back as soon as it receives it.
    from vaemo_dist.data import loader as loader_module
    from vaemo_dist.data.buffers import BufferReturns as Real

    given = []

    class Spy(Real):
        def give_back(self, lease):
            given.append(lease)
            super().give_back(lease)

    monkeypatch.setattr(loader_module, "BufferReturns", Spy)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: True)
    urls, data, inputs = loader_parts
    it = iter(build_loader(urls, replace(data, num_workers=1), inputs, 0, 1))
    batch = next(it)
    assert given == [batch.lease] and batch.give_back is None
