import itertools
import os

import pytest
import webdataset as wds

from vaemo_dist.data.shards import ShardError, StreamPosition, expand_shards, iter_slot, slot_plan


def make_shards(folder, n_shards, per_shard):
    urls = []
    for s in range(n_shards):
        path = str(folder / f"shard-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(per_shard):
                w.write({"__key__": f"s{s}-{i}", "txt": f"{s}/{i}"})
        urls.append(path)
    return urls


def keys(stream, n):
    return [sample["__key__"] for sample, _ in itertools.islice(stream, n)]


def test_expand_shards_forms(tmp_path):
    urls = make_shards(tmp_path, 3, 2)
    assert expand_shards(str(tmp_path)) == urls
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == urls
    assert expand_shards(f"{urls[0]},{urls[2]}") == [urls[0], urls[2]]
    assert expand_shards("s3://bucket/a-{0..1}.tar") == ["s3://bucket/a-0.tar", "s3://bucket/a-1.tar"]


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(ShardError, match="shard not found: .*missing-000000.tar"):
        expand_shards(str(tmp_path / "missing-{000000..000001}.tar"))
    with pytest.raises(ShardError, match="no \\*.tar shards"):
        expand_shards(str(tmp_path))


@pytest.mark.parametrize("n_shards", [8, 3])  # whole-shard split, and fewer shards than slots
def test_slots_partition_each_epoch_exactly(tmp_path, n_shards):
    urls = make_shards(tmp_path, n_shards, 5)
    n_slots = 4
    seen = []
    for slot in range(n_slots):
        plan, modulo = slot_plan(urls, 0, seed=1, slot=slot, n_slots=n_slots)
        per_epoch = sum(1 for _ in plan for i in range(5) if not modulo or i % n_slots == slot)
        seen += keys(iter_slot(urls, 1, slot, n_slots, StreamPosition()), per_epoch)
    assert sorted(seen) == sorted(f"s{s}-{i}" for s in range(n_shards) for i in range(5))


def test_epochs_reshuffle_and_repeat(tmp_path):
    urls = make_shards(tmp_path, 4, 3)
    stream = keys(iter_slot(urls, 0, 0, 1, StreamPosition()), 24)
    assert sorted(stream[:12]) == sorted(stream[12:])
    assert stream[:12] != stream[12:]  # a new shard order in epoch 1 (seeded)


def test_resume_from_any_position_continues_identically(tmp_path):
    urls = make_shards(tmp_path, 4, 3)
    full = list(itertools.islice(iter_slot(urls, 0, 1, 2, StreamPosition()), 20))
    for cut in (1, 3, 5, 11):
        position = full[cut - 1][1]
        resumed = keys(iter_slot(urls, 0, 1, 2, position), 20 - cut)
        assert resumed == [s["__key__"] for s, _ in full[cut:]]


def test_truncated_shard_is_reported_and_stream_goes_on(tmp_path):
    urls = make_shards(tmp_path, 2, 40)
    size = os.path.getsize(urls[0])
    with open(urls[0], "r+b") as f:
        f.truncate(size // 2)
    troubles = []
    got = keys(iter_slot(urls, 0, 0, 1, StreamPosition(), troubles.append), 70)
    assert len(troubles) >= 1 and troubles[0].url == urls[0] and "Error" in troubles[0].error
    assert 0 < troubles[0].after_samples < 40
    n_before_cut = troubles[0].after_samples
    assert sum(k.startswith("s1-") for k in got[: 40 + n_before_cut]) == 40
    assert sum(k.startswith("s0-") for k in got[: 40 + n_before_cut]) == n_before_cut


def test_unreadable_everything_stops_loudly(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 10)
    with pytest.raises(ShardError, match="read no samples"):
        keys(iter_slot([str(bad)], 0, 0, 1, StreamPosition(), lambda t: None), 1)


def test_resampled_draws_with_replacement_seeded_per_slot(tmp_path):
    urls = make_shards(tmp_path, 4, 3)
    plans = [slot_plan(urls, epoch, seed=3, slot=slot, n_slots=2, resampled=True)[0]
             for epoch in range(6) for slot in (0, 1)]
    assert all(len(p) == 2 for p in plans)
    drawn = [u for p in plans for u in p]
    assert set(drawn) == set(urls) and len(drawn) > len(set(drawn))  # with replacement, all reached
    assert plans == [slot_plan(urls, epoch, seed=3, slot=slot, n_slots=2, resampled=True)[0]
                     for epoch in range(6) for slot in (0, 1)]  # a pure function of (seed, slot, epoch)
    assert plans != [slot_plan(urls, epoch, seed=4, slot=slot, n_slots=2, resampled=True)[0]
                     for epoch in range(6) for slot in (0, 1)]


def test_resampled_resume_from_any_position_continues_identically(tmp_path):
    urls = make_shards(tmp_path, 5, 3)
    full = list(itertools.islice(iter_slot(urls, 7, 1, 2, StreamPosition(), resampled=True), 30))
    for cut in (2, 6, 13, 29):
        resumed = keys(iter_slot(urls, 7, 1, 2, full[cut - 1][1], resampled=True), 30 - cut)
        assert resumed == [s["__key__"] for s, _ in full[cut:]]
