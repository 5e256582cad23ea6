import itertools
import os

import pytest
import webdataset as wds

from vaemo_dist.data.shards import (
    ShardError,
    ShardWriter,
    StreamPosition,
    expand_shards,
    iter_slot,
    read_shard,
    slot_plan,
)


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


# --------------------------------------------------------------------------------------------
# Inputs accepted the same way everywhere; vaemo-shard's inputs refused with its command


def test_a_manifest_means_its_folder(tiny_corpus):
    from vaemo_dist.data.shards import shard_manifest

    folder = expand_shards(str(tiny_corpus))
    assert expand_shards(str(tiny_corpus / "manifest.json")) == folder
    assert expand_shards(f"{tiny_corpus}/") == folder
    assert expand_shards(f"file://{tiny_corpus / 'manifest.json'}") == [f"file://{u}" for u in folder]
    assert shard_manifest(str(tiny_corpus)) == shard_manifest(str(tiny_corpus / "manifest.json"))
    assert shard_manifest(str(tiny_corpus))["shards"] == [u.rsplit("/", 1)[1] for u in folder]
    assert shard_manifest(f"{tiny_corpus}/shard-{{000000..000001}}.tar") is None


def test_read_clip_meta_gives_the_json_of_every_clip_by_its_key(tiny_corpus):
    import json

    from vaemo_dist.data.shards import read_clip_meta, read_shard

    for url in expand_shards(str(tiny_corpus)):
        expected = [(s["__key__"], json.loads(s["json"])) for s in read_shard(url)]
        assert list(read_clip_meta(url)) == expected and expected


@pytest.fixture(scope="module")
def raw_media(tmp_path_factory):
    """What vaemo-shard takes: a folder of videos (one in a subfolder) and a CSV naming them."""
    from vaemo_dist.data.synth import write_media_file

    root = tmp_path_factory.mktemp("raw")
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    write_media_file(videos / "a.mp4", seconds=0.5)
    write_media_file(videos / "sub" / "b.mov", seconds=0.5, container="mov")
    csv = root / "clips.csv"
    csv.write_text("path,label,speaker\nvideos/a.mp4,happy,s1\nvideos/sub/b.mov,sad,s2\n")
    return root, videos, csv


@pytest.mark.parametrize("which, what, source", [
    ("csv", "a CSV manifest", "csv"), ("videos", "a folder of media files", "videos"),
    ("file", "a media file", "videos"), ("sub", "a folder of media files", "sub")])
def test_vaemo_shard_inputs_are_refused_with_its_command(raw_media, which, what, source):
    from vaemo_dist.data.shards import check_shard_spec

    root, videos, csv = raw_media
    paths = {"csv": csv, "videos": videos, "file": videos / "a.mp4", "sub": videos / "sub"}
    spec, src = str(paths[which]), str(paths[source])
    for call in (lambda: check_shard_spec(spec, "eval.shards"), lambda: expand_shards(spec, "eval.shards")):
        with pytest.raises(ShardError) as e:
            call()
        msg = str(e.value)
        assert f"eval.shards={spec!r} is {what}" in msg and "not shards" in msg
        out = src.removesuffix(".csv") + "-shards"
        assert f"vaemo-shard {src} --out {out}" in msg and f"eval.shards={out}" in msg


def test_shard_specs_pass_the_check(tiny_corpus, raw_media, tmp_path):
    from vaemo_dist.data.shards import check_shard_spec

    for spec in (str(tiny_corpus), str(tiny_corpus / "manifest.json"), f"{tiny_corpus}/shard-{{0..9}}.tar",
                 "s3://bucket/train-{000000..000009}.tar", "s3://bucket/train", str(tmp_path / "not-yet")):
        check_shard_spec(spec)
    with pytest.raises(ShardError, match="a CSV manifest"):
        check_shard_spec("s3://bucket/clips.csv")
    with pytest.raises(ShardError, match="clips.csv"):  # any item of a comma list
        check_shard_spec(f"{tiny_corpus},{raw_media[2]}")
    mixed = tmp_path / "mixed"  # shards next to a video: shards
    mixed.mkdir()
    make_shards(mixed, 1, 2)
    (mixed / "extra.mp4").write_bytes(b"")
    check_shard_spec(str(mixed))


# --------------------------------------------------------------------------------------------
# ShardWriter: the one writer of shard sets


def _samples(n, tag="clip"):
    return [{"__key__": f"{tag}-{i}", "txt": f"{tag}/{i}".encode(), "json": b"{}"} for i in range(n)]


def test_shard_writer_publishes_whole_shards_only_and_the_manifest_last(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    writer = ShardWriter(tmp_path, per_shard=2, prefix="train")
    during = []
    for sample in _samples(5):
        writer.write(sample)
        during.append(sorted(p.name for p in tmp_path.iterdir()))
    tmp = f".train-000000.tar.tmp-{os.getpid()}"
    assert during[0] == during[1] == [tmp]  # the shard being written has no shard name yet
    assert during[2] == [f".train-000001.tar.tmp-{os.getpid()}", "train-000000.tar"]
    assert len(synced) == 4  # every published shard was flushed to disk first, then its folder
    url = writer.write_manifest({"shards": writer.shards, "samples_per_shard": writer.counts})
    assert url == f"{tmp_path}/manifest.json" and len(synced) == 8  # the last shard, then the manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "train-000000.tar",
                                                          "train-000001.tar", "train-000002.tar"]
    assert (writer.shards, writer.counts, writer.total) == (
        ["train-000000.tar", "train-000001.tar", "train-000002.tar"], [2, 2, 1], 5)
    assert [s["__key__"] for u in expand_shards(str(tmp_path / "manifest.json")) for s in read_shard(u)] == \
           [f"clip-{i}" for i in range(5)]


def test_shard_writer_gives_the_same_bytes_for_the_same_samples(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, per_shard=3) as writer:
            for sample in _samples(4):
                writer.write(sample)
    for shard in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_shard_writer_drops_the_unfinished_shard_on_an_error(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, per_shard=2) as writer:
        for sample in _samples(3):
            writer.write(sample)
        raise RuntimeError("the source failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_shard_writer_replaces_an_earlier_larger_build_of_its_prefix_only(tmp_path):
    make_shards(tmp_path, 4, 3)  # shard-000000 ... shard-000003.tar
    (tmp_path / ".shard-000001.tar.tmp-99999").write_bytes(b"left by a killed writer")
    (tmp_path / "other-000000.tar").write_bytes(b"another prefix")
    (tmp_path / "notes.txt").write_text("kept")
    with ShardWriter(tmp_path, per_shard=2) as writer:
        for sample in _samples(3):
            writer.write(sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other-000000.tar", "shard-000000.tar",
                                                          "shard-000001.tar"]
    assert [s["__key__"] for s in read_shard(str(tmp_path / "shard-000001.tar"))] == ["clip-2"]


def test_shard_writer_uploads_to_a_url(tmp_path):
    import fsspec

    store = fsspec.filesystem("memory")
    writer = ShardWriter("memory://shard-writer/set/", per_shard=2)
    for sample in _samples(3):
        writer.write(sample)
    writer.write_manifest({"shards": writer.shards}, sort_keys=False)
    assert sorted(p.rsplit("/", 1)[-1] for p in store.ls("/shard-writer/set", detail=False)) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar"]
    assert not os.path.exists(writer._scratch)  # the local copies are gone
    assert [s["__key__"] for u in expand_shards("memory://shard-writer/set/manifest.json")
            for s in read_shard(u)] == ["clip-0", "clip-1", "clip-2"]
    store.rm("/shard-writer", recursive=True)
