import itertools

import pytest
import webdataset as wds

from vaemo_dist.config import DataConfig, InputConfig, SynthConfig
from vaemo_dist.data.loader import DataState, build_loader
from vaemo_dist.data.synth import build_corpus

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


def take(loader, n, state=None):
    out = []
    for batch in itertools.islice(loader, n):
        if state is not None:
            state.update(batch)
        out.append(batch)
    return out


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
    assert state.totals()["decode"] >= 2
    assert any("b-broken" in line for line in state.recent_bad)


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


def test_log_keys_records_what_the_trainer_got_across_a_resume(shards, tmp_path):
    cfg = DataConfig(shards="unused", batch_size=3, num_workers=2, shuffle_seed=5,
                     log_keys=str(tmp_path / "k"))
    state = DataState(2, 1)
    first = take(build_loader(shards, cfg, INPUTS, 0, 1), 3, state)
    resumed = take(build_loader(shards, cfg, INPUTS, 0, 1, resume=DataState.from_dict(state.to_dict())), 5)
    logged = (tmp_path / "k" / "keys-rank0.txt").read_text().split()
    assert logged == [k for b in first + resumed for k in b.keys]
    # 8 batches x 3 = 24 samples of an epoch of 26 good clips: nothing repeated, nothing skipped.
    assert len(logged) == len(set(logged)) == 24


def test_auto_decoder_is_pyav_without_a_gpu(shards):
    from vaemo_dist.data.loader import resolve_decoder

    assert resolve_decoder("auto") == "pyav"  # CI has no GPU
    with pytest.raises(ValueError, match="unknown decoder"):
        resolve_decoder("ffmpeg")
