"""Bad media through the real loader, both decoders (GitHub issue #9, "Reliability under faults").

A shard set of good clips plus one clip of every kind of bad media: each bad clip is skipped (never
handed to the trainer), counted under its kind in the data state, named with its key and shard, and
the stream goes on. A clip whose decode hangs is abandoned after `data.decode_timeout_s`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

import numpy as np
import pytest
import webdataset as wds

from tests.data.batches import take
from tests.launching import output, run_stage1
from vaemo_dist.config import DataConfig, InputConfig, SynthConfig
from vaemo_dist.data.loader import DataState, build_loader
from vaemo_dist.data.synth import build_corpus, encode_audio, encode_video
from vaemo_dist.data.timeout import DeadlineExceeded, deadline
from vaemo_dist.data.types import DECODE_KINDS

INPUTS = InputConfig()
INPUTS.video.frames, INPUTS.video.size = 4, 32
INPUTS.audio.frames = 64
GOOD_CLIPS = 8
BATCH = 5  # the 10 good clips of an epoch fill exactly 2 batches


def clip(key: str, codec: str, n_frames: int = 25, size: int = 32, rate: int = 16000,
         length_in_json: bool = True) -> dict:
    """A small clip: noise frames, a tone, json with the frame count and duration."""
    rng = np.random.default_rng(len(key))
    frames = rng.integers(0, 256, (n_frames, size, size, 3), dtype=np.uint8)
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(n_frames / 25 * rate)) / rate)
    meta = {"fps": 25, "sample_rate": rate, "label": 0}
    if length_in_json:
        meta.update(frames=n_frames, duration=n_frames / 25)
    return {"__key__": key, "mp4" if codec == "h264" else "webm": encode_video(frames, 25, codec),
            "flac": encode_audio(wave, rate), "json": json.dumps(meta).encode()}


def bad_clips(codec: str) -> dict[str, tuple[dict, str]]:
    """key -> (sample, the kind it must be counted as)."""
    video = "mp4" if codec == "h264" else "webm"
    good = clip("model", codec)
    garbage = np.random.default_rng(9).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    cases = {
        "truncated": {**good, video: good[video][: len(good[video]) // 2]},
        "corrupt": {**good, video: garbage},
        "empty": {**good, video: b""},
        "no_audio": {k: v for k, v in good.items() if k != "flac"},
        "no_video": {k: v for k, v in good.items() if k != video},
        "sample_rate": clip("rate", codec, rate=44100),
        "too_short": clip("short", codec, n_frames=3),  # 0.12 s
        "too_long": clip("long", codec, n_frames=300, size=16),  # 12 s > data.max_clip_s
        "metadata": {**good, "json": b"{'frames': 25"},
    }
    out = {f"bad-{kind}": (sample, kind) for kind, sample in cases.items()}
    # Too long by the container's own metadata (mp4 index, Matroska duration): nothing in the json.
    long_unlabelled = clip("long", codec, n_frames=300, size=16, length_in_json=False)
    out["bad-too_long-nojson"] = (long_unlabelled, "too_long")
    return out


@pytest.fixture(scope="module")
def media_sets(tmp_path_factory):
    """codec -> (shard urls, good keys, bad key -> kind), each built once."""
    built: dict[str, tuple[list[str], list[str], dict[str, str]]] = {}

    def build(codec: str) -> tuple[list[str], list[str], dict[str, str]]:
        if codec not in built:
            root = tmp_path_factory.mktemp(f"bad-media-{codec}")
            build_corpus(SynthConfig(clips=GOOD_CLIPS, clips_per_shard=4, classes=2, size=32, duration=1.0,
                                     codec=codec), root, progress=False)
            bad = bad_clips(codec)
            with wds.TarWriter(str(root / "shard-000002.tar")) as w:
                # A good clip last: every epoch then ends with one, so 2 batches cover an epoch exactly.
                w.write(clip("g-first", codec))
                for key, (sample, _) in bad.items():
                    w.write({**sample, "__key__": key})
                w.write(clip("g-last", codec))
            urls = sorted(str(p) for p in root.glob("shard-*.tar"))
            good = [f"clip-{i:06d}" for i in range(GOOD_CLIPS)] + ["g-first", "g-last"]
            built[codec] = urls, good, {key: kind for key, (_, kind) in bad.items()}
        return built[codec]

    return build


def data_cfg(decoder: str, workers: int, **kw) -> DataConfig:
    return DataConfig(shards="unused", decoder=decoder, batch_size=BATCH, num_workers=workers, shuffle_seed=3,
                      max_clip_s=10.0, **kw)


# --------------------------------------------------------------------------------------------
# Every kind of bad media, both decoders


@pytest.mark.parametrize(("decoder", "codec", "workers"), [
    ("pyav", "h264", 1),  # a real DataLoader worker process
    ("pyav", "vp9", 0),
    pytest.param("dali", "vp9", 0, id="dali-vp9-0"),  # DALI's CPU backend decodes VP9, not H.264
])
def test_bad_media_is_skipped_counted_and_named(media_sets, decoder, codec, workers, caplog):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    urls, good, bad = media_sets(codec)
    state = DataState(workers, 1)
    batches = iter(build_loader(urls, data_cfg(decoder, workers), INPUTS, 0, 1))
    with caplog.at_level(logging.WARNING, logger="vaemo_dist.data.loader"):
        for epoch in (0, 1):  # the stream goes on past the bad clips, into the next epoch
            taken = take(batches, 2, state)
            keys = [k for b in taken for k in b.keys]
            assert sorted(keys) == sorted(good), epoch  # every good clip once, no bad one, no repeat
            assert all(b.video.shape == (BATCH, 3, 4, 32, 32) for b in taken)
            totals = state.totals()
            expected = {kind: list(bad.values()).count(kind) * (epoch + 1) for kind in DECODE_KINDS}
            assert {kind: totals[f"decode/{kind}"] for kind in DECODE_KINDS} == expected, epoch
            assert totals["decode"] == len(bad) * (epoch + 1) and totals["shard"] == 0
            assert totals["samples"] == (len(good) + len(bad)) * (epoch + 1)
            lines = [line for b in taken for line in b.state["bad"]]
            assert len(lines) == len(bad)
            for key in bad:  # "key (url): reason", the url being the shard it came from
                assert any(line.startswith(f"{key} ({urls[-1]}): ") for line in lines), (key, lines)
    if workers == 0:  # a worker process logs where caplog cannot see it
        logged = " ".join(r.getMessage() for r in caplog.records)
        for key, kind in bad.items():
            assert f"skipped clip {key} from {urls[-1]} ({kind})" in logged


def test_a_training_run_goes_on_and_logs_the_counts_per_kind(media_sets, tmp_path):
    """The same shard set through the launcher and trainer: the run finishes, and metrics.jsonl carries
    the skips per kind (`skipped/<kind>`), adding up to `skipped_decode`."""
    urls, good, bad = media_sets("h264")
    run_dir = tmp_path / "bad-media-run"
    proc = run_stage1(run_dir, ",".join(urls), 1, "train.steps=5", "inputs.video.size=32",
                      "data.max_clip_s=10", "data.max_skip_fraction=0.6")
    assert proc.returncode == 0, output(proc)[-3000:]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    per_kind = {kind: last[f"skipped/{kind}"] for kind in DECODE_KINDS}
    epochs = last["skipped_decode"] // len(bad)  # 5 steps x 4 clips = 20 good clips: 1 or 2 epochs met
    assert epochs in (1, 2) and last["skipped_decode"] == epochs * len(bad)
    assert per_kind == {kind: list(bad.values()).count(kind) * epochs for kind in DECODE_KINDS}
    assert all(f"skipped clip {key}" in output(proc) for key in bad)


# --------------------------------------------------------------------------------------------
# A decode that hangs


def _slow_on(key: str, work, seconds: float = 30.0):
    def slow(*args):
        if args[0] == key:  # both decoders' inner functions take the key first
            time.sleep(seconds)  # the alarm interrupts this
        return work(*args)

    return slow


@pytest.mark.parametrize(("decoder", "workers"), [("pyav", 0), ("pyav", 1), ("dali", 0)])
def test_a_hanging_decode_is_abandoned_and_the_stream_goes_on(media_sets, monkeypatch, decoder, workers):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
        import vaemo_dist.data.decode_dali as module

        name = "_prepare"
    else:
        import vaemo_dist.data.decode_pyav as module

        name = "_decode"
    urls, _, _ = media_sets("vp9")
    urls = urls[:1]  # four good clips: clip-... in shard order
    order = [s["__key__"] for s in wds.WebDataset(urls[0], shardshuffle=False)]
    # A forked DataLoader worker inherits the patch: the alarm then fires in the worker process.
    monkeypatch.setattr(module, name, _slow_on(order[1], getattr(module, name)))
    cfg = DataConfig(shards="unused", decoder=decoder, batch_size=3, num_workers=workers,
                     decode_timeout_s=1.0)
    state = DataState(workers, 1)
    t0 = time.monotonic()
    (batch,) = take(iter(build_loader(urls, cfg, INPUTS, 0, 1)), 1, state)
    assert batch.keys == [order[0], order[2], order[3]]  # the clip after the hung one decoded
    assert state.totals()["decode/timeout"] == 1 and state.totals()["decode"] == 1
    assert any(line.startswith(f"{order[1]} (") and "abandoned after 1 s" in line
               for line in batch.state["bad"])
    assert time.monotonic() - t0 < 20.0  # well before the 30 s sleep would have ended


def test_deadline_restores_the_previous_handler_and_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)  # someone else's timer, due after ours
        with pytest.raises(DeadlineExceeded), deadline(0.1):
            time.sleep(10.0)
        assert not fired and 0.0 < signal.getitimer(signal.ITIMER_REAL)[0] < 1.45
        end = time.monotonic() + 5.0
        while not fired and time.monotonic() < end:
            time.sleep(0.05)
        assert fired == [True]  # the outer timer still fired, through its own handler
        with deadline(0.2):  # a block that finishes in time: its timer is gone afterwards
            pass
        time.sleep(0.4)
        assert fired == [True] and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_deadline_is_a_no_op_outside_the_main_thread():
    outcome = []

    def work():
        with deadline(0.05):
            time.sleep(0.2)
        outcome.append(signal.getitimer(signal.ITIMER_REAL))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert outcome == [(0.0, 0.0)]
