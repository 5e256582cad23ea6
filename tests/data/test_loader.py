
import json

import pytest
import webdataset as wds

from tests.data.batches import take
from vaemo_dist.config import DataConfig, InputConfig, SynthConfig
from vaemo_dist.data.loader import DATA_STATE_VERSION, DataState, build_loader, resize_data_states
from vaemo_dist.data.synth import build_corpus
from vaemo_dist.data.types import DECODE_KINDS

INPUTS = InputConfig()
INPUTS.video.frames, INPUTS.video.size = 4, 32
INPUTS.audio.frames = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader-corpus")
    build_corpus(SynthConfig(clips=24, clips_per_shard=4, classes=2, size=48, duration=1.0), root,
                 progress=False)
    good = next(iter(wds.WebDataset(str(root / "shard-000000.tar"), shardshuffle=False)))
    fields = {k: v for k, v in good.items() if not k.startswith("__")}
    with wds.TarWriter(str(root / "shard-000006.tar")) as w:  # one corrupt clip among good ones
        w.write({**fields, "__key__": "a-good"})
        w.write({**fields, "__key__": "b-broken", "mp4": b"garbage" * 20})
        w.write({**fields, "__key__": "c-good"})
        w.write({**fields, "__key__": "d-noaudio", "flac": b""})
    return sorted(str(p) for p in root.glob("*.tar"))


def data_cfg(workers: int) -> DataConfig:
    return DataConfig(shards="unused", batch_size=3, num_workers=workers, shuffle_seed=5)


def test_batches_have_contract_shapes(shards):
    batch = take(build_loader(shards, data_cfg(0), INPUTS, 0, 1), 1)[0]
    assert batch.video.shape == (3, 3, 4, 32, 32) and batch.audio.shape == (3, 1, 64, 128)
    assert len(batch.keys) == 3 and batch.label.shape == (3,)


def test_ranks_see_disjoint_samples_covering_an_epoch(shards):
    seen = []
    for rank in (0, 1):
        for batch in take(build_loader(shards, data_cfg(0), INPUTS, rank, 2), 4):
            if batch.state["position"]["epoch"] == 0:
                seen += batch.keys
    assert len(seen) == len(set(seen))
    assert len(seen) >= 20


def test_bad_clips_are_skipped_counted_and_named(shards):
    state = DataState(0, 1)
    batches = take(build_loader(shards, data_cfg(0), INPUTS, 0, 1), 10, state)  # 30 > 26 good clips
    keys = [k for b in batches for k in b.keys]
    assert "b-broken" not in keys and "d-noaudio" not in keys and "a-good" in keys
    totals = state.totals()
    # Once or twice each (the 10 batches reach into the second epoch).
    assert totals["decode/corrupt"] == totals["decode/empty"] >= 1
    assert totals["decode"] == totals["decode/corrupt"] + totals["decode/empty"]
    assert {f"decode/{kind}" for kind in DECODE_KINDS} <= set(totals)  # zeros too: same keys on every rank
    assert any(line.startswith("b-broken (") and "shard-000006.tar" in line for line in state.recent_bad)


def test_checkpoints_without_per_kind_counts_still_resume(shards):
    cfg = data_cfg(0)
    state = DataState(0, 1)
    take(build_loader(shards, cfg, INPUTS, 0, 1), 4, state)
    old = state.to_dict()
    old["counts"] = {w: {k: v for k, v in c.items() if "/" not in k} for w, c in old["counts"].items()}
    resumed = DataState.from_dict(old)
    assert resumed.totals()["decode/corrupt"] == 0 and resumed.totals()["decode"] == state.totals()["decode"]
    take(build_loader(shards, cfg, INPUTS, 0, 1, resume=resumed), 6, resumed)
    totals = resumed.totals()  # skips before the resume have no kind, later ones do
    by_kind = sum(totals[f"decode/{kind}"] for kind in DECODE_KINDS)
    assert totals["decode"] == by_kind + state.totals()["decode"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_batch_sequence(shards, workers):
    cfg = data_cfg(workers)
    full = [b.keys for b in take(build_loader(shards, cfg, INPUTS, 0, 1), 12)]
    for cut in (3, 7):
        state = DataState(workers, 1)
        take(build_loader(shards, cfg, INPUTS, 0, 1), cut, state)
        state = DataState.from_dict(state.to_dict())  # as it travels through a checkpoint
        resumed = [b.keys for b in take(build_loader(shards, cfg, INPUTS, 0, 1, resume=state), 12 - cut)]
        assert resumed == full[cut:]


def test_resume_with_another_layout_is_refused(shards):
    with pytest.raises(ValueError, match="same data layout"):
        build_loader(shards, data_cfg(2), INPUTS, 0, 1, resume=DataState(1, 1))


def log_cfg(tmp_path) -> DataConfig:
    return DataConfig(shards="unused", batch_size=3, num_workers=2, shuffle_seed=5,
                      log_keys=str(tmp_path / "k"))


def test_log_keys_records_what_the_trainer_got_across_a_resume(shards, tmp_path):
    cfg = log_cfg(tmp_path)
    state = DataState(2, 1)
    first = take(build_loader(shards, cfg, INPUTS, 0, 1), 3, state)
    resumed = take(build_loader(shards, cfg, INPUTS, 0, 1, resume=DataState.from_dict(state.to_dict())), 5)
    text = (tmp_path / "k" / "keys-rank0.txt").read_text()
    assert [line.split(" ") for line in text.splitlines()] == [b.keys for b in first + resumed]  # per batch
    logged = text.split()
    # 8 batches x 3 = 24 samples of an epoch of 26 good clips: nothing repeated, nothing skipped.
    assert len(logged) == len(set(logged)) == 24


def test_log_keys_drops_batches_after_the_checkpoint_on_resume(shards, tmp_path):
    cfg = log_cfg(tmp_path)
    path = tmp_path / "k" / "keys-rank0.txt"
    state = DataState(2, 1)
    crashed = iter(build_loader(shards, cfg, INPUTS, 0, 1))
    first = take(crashed, 3, state)
    checkpoint = DataState.from_dict(state.to_dict())  # saved after 3 batches...
    take(crashed, 2, state)  # ...then 2 more handed out (prefetched, or trained) before a crash
    assert len(path.read_text().splitlines()) == 5
    resumed = take(build_loader(shards, cfg, INPUTS, 0, 1, resume=checkpoint), 4)
    assert [line.split() for line in path.read_text().splitlines()] == [b.keys for b in first + resumed]
    # A fresh start (no resume) starts a fresh file.
    again = take(build_loader(shards, cfg, INPUTS, 0, 1), 1)
    assert path.read_text().split() == again[0].keys


def test_auto_decoder_is_pyav_without_a_gpu(shards):
    from vaemo_dist.data.loader import resolve_decoder

    assert resolve_decoder("auto") == "pyav"  # CI has no GPU
    with pytest.raises(ValueError, match="unknown decoder"):
        resolve_decoder("ffmpeg")


def test_resume_on_other_ranks_and_workers_reads_the_rest_of_the_epoch_once(shards):
    """1 rank x 2 DataLoader workers stop mid-epoch; 2 ranks x 1 worker take over from the resized
    data states: the rest of the epoch, each clip once, then the next epoch."""
    urls = shards[:4]  # 4 good shards of 4 clips: 16 clips an epoch
    cfg = DataConfig(shards="unused", batch_size=2, num_workers=2, shuffle_seed=5)
    state = DataState(2, 1)
    before = [k for b in take(build_loader(urls, cfg, INPUTS, 0, 1), 3, state) for k in b.keys]
    saved = DataState.from_dict(state.to_dict())
    new = resize_data_states([saved], len(urls), cfg.shuffle_seed, world_size=2, num_workers=1)
    one = DataConfig(shards="unused", batch_size=2, num_workers=1, shuffle_seed=5)
    after, next_epoch = [], []
    for rank in (0, 1):
        resumed = DataState.from_dict(new[rank].to_dict())  # as it travels through a checkpoint
        for batch in take(build_loader(urls, one, INPUTS, rank, 2, resume=resumed), 5):
            begun = batch.state["position"]["epoch"] < resumed.next_epoch
            (after if begun else next_epoch).append(batch.keys)
    seen = before + [k for keys in after for k in keys]
    assert len(seen) == len(set(seen)) == 16
    assert next_epoch and all(k in seen for keys in next_epoch for k in keys)


# --------------------------------------------------------------------------------------------
# Held-out keys (eval.holdout) are never trained on; resume, exact or elastic, still holds


def _all_keys(urls):
    from vaemo_dist.data.shards import read_clip_meta

    return [k for u in urls for k, _ in read_clip_meta(u)]


@pytest.mark.parametrize("workers", [0, 2])
def test_excluded_keys_are_never_handed_out_and_resume_stays_exact(shards, workers):
    cfg = data_cfg(workers)
    good = [k for k in _all_keys(shards) if k not in ("b-broken", "d-noaudio")]
    held = set(good[::4])  # 7 of the 26 good clips
    state = DataState(workers, 1)
    full = take(build_loader(shards, cfg, INPUTS, 0, 1, exclude_keys=held), 14, state)
    keys = [k for b in full for k in b.keys]
    assert not held & set(keys)
    first_epoch = [k for b in full if b.state["position"]["epoch"] == 0 for k in b.keys]
    assert len(first_epoch) == len(set(first_epoch)) and set(first_epoch) <= set(good) - held
    assert len(set(keys)) == len(good) - len(held)  # 14 x 3 samples reach every kept clip
    totals = state.totals()  # read = handed out + skipped as bad: held-out clips are not counted
    assert totals["samples"] == 14 * 3 + totals["decode"]
    for cut in (4, 9):
        part = DataState(workers, 1)
        take(build_loader(shards, cfg, INPUTS, 0, 1, exclude_keys=held), cut, part)
        part = DataState.from_dict(part.to_dict())
        resumed = take(build_loader(shards, cfg, INPUTS, 0, 1, resume=part, exclude_keys=held), 14 - cut)
        assert [b.keys for b in resumed] == [b.keys for b in full[cut:]]


def test_elastic_resume_with_excluded_keys_reads_the_rest_of_the_epoch_once(shards):
    urls = shards[:4]  # 16 good clips an epoch
    held = set(_all_keys(urls)[1::5])  # 4 of them
    cfg = DataConfig(shards="unused", batch_size=2, num_workers=2, shuffle_seed=5)
    state = DataState(2, 1)
    before = [k for b in take(build_loader(urls, cfg, INPUTS, 0, 1, exclude_keys=held), 2, state)
              for k in b.keys]
    new = resize_data_states([DataState.from_dict(state.to_dict())], len(urls), cfg.shuffle_seed,
                             world_size=2, num_workers=1)
    one = DataConfig(shards="unused", batch_size=2, num_workers=1, shuffle_seed=5)
    after = []
    for rank in (0, 1):
        resumed = DataState.from_dict(new[rank].to_dict())
        for batch in take(build_loader(urls, one, INPUTS, rank, 2, resume=resumed, exclude_keys=held), 4):
            if batch.state["position"]["epoch"] < resumed.next_epoch:
                after += batch.keys
    seen = before + after
    assert len(seen) == len(set(seen)) == 12 and not held & set(seen)


def test_a_slot_with_only_held_out_clips_stops_loudly(shards):
    from vaemo_dist.data.shards import ShardError

    with pytest.raises(ShardError, match="only held-out clips"):
        take(build_loader(shards[:2], data_cfg(0), INPUTS, 0, 1, exclude_keys=_all_keys(shards[:2])), 1)


# --------------------------------------------------------------------------------------------
# The loader owns its position: state_dict / load_state_dict / load_resized


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_state_is_the_position_after_the_batches_handed_out(shards, workers):
    cfg = data_cfg(workers)
    full = [b.keys for b in take(build_loader(shards, cfg, INPUTS, 0, 1), 9)]
    loader, tracked = build_loader(shards, cfg, INPUTS, 0, 1), DataState(workers, 1)
    take(loader, 4, tracked)
    saved = loader.state_dict()
    assert saved["version"] == DATA_STATE_VERSION and saved["batches"] == 4
    assert loader.state == tracked and saved == {**tracked.to_dict(), "version": DATA_STATE_VERSION}
    resumed = build_loader(shards, cfg, INPUTS, 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(saved)))  # as it travels through a checkpoint
    assert [b.keys for b in take(resumed, 5)] == full[4:]
    assert [b.keys for b in take(loader, 5)] == full[4:]  # iterating again starts at the position


def test_the_loader_refuses_a_newer_state_or_another_layout(shards):
    loader = build_loader(shards, data_cfg(2), INPUTS, 0, 1)
    state = {**DataState(2, 1).to_dict(), "version": DATA_STATE_VERSION + 1}
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict(state)
    with pytest.raises(ValueError, match="same data layout.*load_resized"):
        loader.load_state_dict(DataState(2, 2).to_dict())
    with pytest.raises(ValueError, match="same shard list"):
        loader.load_state_dict(DataState(2, 1, next_epoch=1, n_shards=len(shards) + 1).to_dict())
    loader.load_state_dict(DataState(2, 1).to_dict())  # a state saved before versions: version 1


def test_load_resized_is_the_resize_of_every_old_rank(shards):
    urls = shards[:4]
    cfg = DataConfig(shards="unused", batch_size=2, num_workers=2, shuffle_seed=5)
    old = build_loader(urls, cfg, INPUTS, 0, 1)
    take(old, 3)
    saved = old.state_dict()
    one = DataConfig(shards="unused", batch_size=2, num_workers=1, shuffle_seed=5)
    expected = resize_data_states([DataState.from_dict(saved)], len(urls), cfg.shuffle_seed, 2, 1)
    for rank in (0, 1):
        loader = build_loader(urls, one, INPUTS, rank, 2)
        said = loader.load_resized([saved])
        assert loader.state == expected[rank] and "dealt to 2 slots" in said
        with pytest.raises(ValueError, match="same data layout"):  # not an exact resume
            loader.load_state_dict(saved)
