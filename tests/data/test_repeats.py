"""data.repeats (issue 19): one decoded clip -> R training samples.

* the windows: repeat r moves the centred window by whole strides (0, +1, -1, ...), clamped inside
  the clip; each repeat's video and audio equal an independent decode of that window;
* negatives: no micro-batch of any rank at one step (what the contrastive loss gathers into one
  denominator) holds two repeats of a clip, and every clip's R repeats are all handed out;
* resume: a loader stopped inside a group of repeats and resumed from its state_dict hands out the
  same batches (keys and tensors) and ends with the same counts as one that never stopped.
"""

from __future__ import annotations

from collections import Counter

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from tests.data.batches import take
from vaemo_dist.config import ConfigError, DataConfig, InputConfig, SynthConfig, config_from_dict
from vaemo_dist.data import audio as audio_mod
from vaemo_dist.data.decode_pyav import (
    RGB_CONVERSION,
    audio_tensor,
    clip_of_key,
    decode_audio_wave,
    decode_repeats,
    decode_sample,
    repeat_key,
    window_indices,
)
from vaemo_dist.data.loader import DataState, build_loader
from vaemo_dist.data.synth import build_corpus

INPUTS = InputConfig()
INPUTS.video.frames, INPUTS.video.stride, INPUTS.video.size = 4, 3, 32
INPUTS.audio.frames = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("repeats-corpus")
    build_corpus(SynthConfig(clips=18, clips_per_shard=3, classes=2, size=48, duration=1.0), root,
                 progress=False)
    return sorted(str(p) for p in root.glob("*.tar"))


@pytest.fixture(scope="module")
def shards_with_bad(shards, tmp_path_factory):
    """The corpus plus a shard of two good and two undecodable clips (skipped and counted)."""
    good = next(iter(wds.WebDataset(shards[0], shardshuffle=False)))
    fields = {k: v for k, v in good.items() if not k.startswith("__")}
    path = str(tmp_path_factory.mktemp("bad") / "shard-bad.tar")
    with wds.TarWriter(path) as w:
        w.write({**fields, "__key__": "a-good"})
        w.write({**fields, "__key__": "b-broken", "mp4": b"garbage" * 20})
        w.write({**fields, "__key__": "c-good"})
        w.write({**fields, "__key__": "d-noaudio", "flac": b""})
    return [*shards, path]


def data_cfg(repeats: int, workers: int = 0) -> DataConfig:
    return DataConfig(shards="unused", batch_size=3, num_workers=workers, shuffle_seed=5, repeats=repeats)


def test_windows_move_by_whole_strides_inside_the_clip():
    assert window_indices(80, 16, 4) == list(range(9, 70, 4))  # repeat 0: the centred window
    assert window_indices(80, 16, 4, 1) == list(range(13, 74, 4))
    assert window_indices(80, 16, 4, 2) == list(range(5, 66, 4))
    assert window_indices(80, 16, 4, 5) == list(range(19, 80, 4))  # +3 strides: clamped to the end
    assert window_indices(80, 16, 4, 6) == list(range(0, 61, 4))  # -3 strides: clamped to the start
    # Too short to move: every repeat gets the (edge-padded) centred window.
    padded = [min(i, 39) for i in range(0, 61, 4)]
    assert window_indices(40, 16, 4, 1) == window_indices(40, 16, 4, 0) == padded


def test_repeat_keys_round_trip():
    assert repeat_key("clip-7", 0) == "clip-7" and repeat_key("clip-7", 2) == "clip-7~r2"
    assert clip_of_key("clip-7~r2") == "clip-7" and clip_of_key("clip-7") == "clip-7"
    assert clip_of_key("a~rb") == "a~rb"


def test_batched_log_mel_equals_one_at_a_time():
    cfg = INPUTS.audio
    n = audio_mod.mel_spec_params(cfg).num_samples
    waves = torch.randn(3, n) * 0.1
    batched = audio_mod.log_mels(waves, cfg)
    assert batched.shape == (3, 1, cfg.frames, cfg.n_mels)
    for i in range(3):
        assert torch.allclose(batched[i], audio_mod.log_mel(waves[i], cfg), atol=1e-5)


def reference_video(sample: dict, indices: list[int], inputs: InputConfig) -> torch.Tensor:
    """Every frame decoded with PyAV on its own, the window picked, cropped, resized by torch and
    normalised: the preprocessing written out step by step (as before issue 19)."""
    import io

    with av.open(io.BytesIO(sample["mp4"])) as c:
        frames = [f.to_ndarray(format="rgb24", interpolation=RGB_CONVERSION) for f in c.decode(video=0)]
    x = torch.from_numpy(np.stack([frames[i] for i in indices])).permute(0, 3, 1, 2).float()
    v = inputs.video
    x = F.interpolate(x, size=(v.size, v.size), mode="bilinear", align_corners=False,
                      antialias=x.shape[-1] > v.size)
    mean, std = torch.tensor(v.mean).view(1, 3, 1, 1), torch.tensor(v.std).view(1, 3, 1, 1)
    return ((x / 255.0 - mean) / std).permute(1, 0, 2, 3)


def test_each_repeat_is_its_own_window_decoded_as_a_single_clip_would_be(shards):
    sample = next(iter(wds.WebDataset(shards[0], shardshuffle=False)))
    clips = decode_repeats(sample, INPUTS, repeats=3)
    alone = decode_sample(sample, INPUTS)
    assert [c.key for c in clips] == [alone.key, alone.key + "~r1", alone.key + "~r2"]
    assert torch.equal(clips[0].video, alone.video) and torch.equal(clips[0].audio, alone.audio)
    total = clips[0].meta["frames"]  # 25 frames: a 10-frame window moves by 3
    wave = decode_audio_wave("k", sample["flac"], INPUTS.audio, None)
    for r, clip in enumerate(clips):
        indices = window_indices(total, INPUTS.video.frames, INPUTS.video.stride, r)
        assert clip.meta["frame_indices"] == indices and clip.meta["repeat"] == r
        assert torch.allclose(clip.video, reference_video(sample, indices, INPUTS), atol=1e-4)
        centre = (indices[0] + indices[-1] + 1) / 2 / clip.meta["fps"]
        assert torch.allclose(clip.audio, audio_tensor(wave, INPUTS.audio, centre), atol=1e-5)
    assert len({tuple(c.meta["frame_indices"]) for c in clips}) == 3  # three different windows
    assert not torch.equal(clips[1].video, clips[2].video)


@pytest.mark.parametrize("repeats", [2, 3])
def test_no_contrastive_denominator_holds_two_repeats_of_a_clip(shards, repeats):
    # Two data-parallel ranks: at each step the loss gathers micro-batch s of both ranks.
    per_rank = [take(build_loader(shards, data_cfg(repeats), INPUTS, rank, 2), 3 * repeats)
                for rank in (0, 1)]
    seen: Counter[str] = Counter()
    for step in range(3 * repeats):
        keys = per_rank[0][step].keys + per_rank[1][step].keys
        clips = [clip_of_key(k) for k in keys]
        assert len(clips) == len(set(clips)), (step, keys)
        seen.update(keys)
        # The tensors the loss sees: no two rows of the gathered batch are the same sample.
        video = torch.cat([per_rank[0][step].video, per_rank[1][step].video])
        assert len({tuple(row.flatten()[:64].tolist()) for row in video}) == len(keys)
    # Every clip of the 3 groups per rank was handed out exactly `repeats` times, each repeat once.
    by_clip = Counter(clip_of_key(k) for k in seen)
    assert set(by_clip.values()) == {repeats} and len(by_clip) == 2 * 3 * 3
    assert all(n == 1 for n in seen.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_a_group_of_repeats_is_exact(shards_with_bad, workers):
    shards = shards_with_bad
    cfg = data_cfg(3, workers)
    n = 20
    full_state = DataState(workers, 1)
    full = take(build_loader(shards, cfg, INPUTS, 0, 1), n, full_state)
    for cut in (1, 5, 8):  # inside groups (batch 2 of 3, 2 of 3 of a later one) and after one whole
        state = DataState(workers, 1)
        take(build_loader(shards, cfg, INPUTS, 0, 1), cut, state)
        saved = state.to_dict()
        if cut % 3 and workers == 0:
            assert saved["groups"]["0"]["done"] == cut % 3 and saved["groups"]["0"]["of"] == 3
        state = DataState.from_dict(saved)  # as it travels through a checkpoint
        resumed = take(build_loader(shards, cfg, INPUTS, 0, 1, resume=state), n - cut, state)
        assert [b.keys for b in resumed] == [b.keys for b in full[cut:]], cut
        assert all(torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)
                   for a, b in zip(resumed, full[cut:]))
        # Exactly-once accounting: clips read and skipped counted as in the run that never stopped.
        assert state.to_dict() == full_state.to_dict(), cut
    totals = full_state.totals()
    assert totals["decode/corrupt"] >= 1 and totals["decode/empty"] >= 1  # the bad clips were met


def test_repeats_one_keeps_the_plain_stream(shards):
    default = DataConfig(shards="unused", batch_size=3, shuffle_seed=5)
    plain = take(build_loader(shards, default, INPUTS, 0, 1), 2)
    ones = take(build_loader(shards, data_cfg(1), INPUTS, 0, 1), 2)
    assert [b.keys for b in plain] == [b.keys for b in ones]
    assert "group" not in ones[0].state


def test_repeats_must_be_positive():
    with pytest.raises(ConfigError, match="data.repeats"):
        config_from_dict({"data": {"repeats": 0}})


def test_dali_repeats_hand_out_each_prepared_clip_in_separate_micro_batches(tmp_path):
    pytest.importorskip("nvidia.dali")
    build_corpus(SynthConfig(clips=6, clips_per_shard=3, classes=2, size=48, duration=1.0, codec="vp9"),
                 tmp_path, progress=False)
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    cfg = DataConfig(shards="unused", decoder="dali", batch_size=3, shuffle_seed=5, repeats=2)
    batches = take(build_loader(urls, cfg, INPUTS, 0, 1), 4)
    for first, second in (batches[:2], batches[2:]):  # one group: repeat 0, then repeat 1
        assert [repeat_key(k, 1) for k in first.keys] == second.keys
        assert len({clip_of_key(k) for k in first.keys}) == 3
        # DALI repeats the window: the same tensors (the masks, drawn per sample, differ).
        assert torch.equal(first.video, second.video)
