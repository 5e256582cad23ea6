"""benchmarks/bench_layout.py's frame-rate axis (issue 19, "Shard layout for speed"): a `--fps-div` k variant
stores frames[::k] at exactly 25/k fps, its window (stride 4/k) sits on the full-rate window's instants up to
the storage grid, seeking stays exact on it, and bad values are refused before anything runs. Tiny clips
(32 px, 1 per set); the measured rows are in the task report / BENCHMARKS.md."""

import io
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_layout  # noqa: E402

from vaemo_dist.config import SynthConfig  # noqa: E402
from vaemo_dist.data import synth  # noqa: E402
from vaemo_dist.data.decode_pyav import window_indices  # noqa: E402


@pytest.mark.parametrize("total", [80, 200, 93])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_variants_window_is_the_full_rate_windows_instants_on_its_grid(total, k):
    full = window_indices(total, 16, 4)
    src = bench_layout.source_window(total, 16, 4, k)
    assert len(src) == 16 and all(i % k == 0 for i in src)  # only stored frames
    assert all(b - a == 4 for a, b in zip(src, src[1:]))  # still 4 source frames apart
    assert 0 <= full[0] - src[0] < k  # at most k - 1 source frames earlier
    if k == 1:
        assert src == full


def test_a_quarter_rate_clip_is_stored_at_exactly_six_and_a_quarter_fps_and_seeks_exactly():
    encoded = bench_layout.encode_set([8.0], [0, 12], clips=1, size=32, fps_divs=[1, 4])
    full, quarter = encoded[(8.0, 1, 12)][0], encoded[(8.0, 4, 12)][0]
    with av.open(io.BytesIO(quarter)) as c:
        s = c.streams.video[0]
        assert s.average_rate == Fraction(25, 4) and s.frames == 50
        pts = [f.pts for f in c.decode(s)]
    step = Fraction(4, 25) / s.time_base  # time-base ticks per stored frame: a whole number
    assert step.denominator == 1 and pts == [i * int(step) for i in range(50)]
    # The instants of frames[::4] of the source (lossy at 32 px: the nearest, not equal): of the source
    # frames 2 either side, the decoded frames are closest, on average, to exactly frames 4i.
    cfg = SynthConfig(size=32, duration=8.0, classes=4, clips=1)
    raw = synth.clip_media(cfg, 0, synth.clip_labels(cfg)[0])[0].astype(int)
    with av.open(io.BytesIO(quarter)) as c:
        got = [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(video=0)]
    inner = range(1, len(got) - 1)
    error = {off: np.mean([np.abs(got[i] - raw[4 * i + off]).mean() for i in inner]) for off in range(-2, 3)}
    assert min(error, key=error.get) == 0, error
    with av.open(io.BytesIO(full)) as c:
        assert c.streams.video[0].average_rate == 25 and c.streams.video[0].frames == 200
    # measure() checks seek == sequential frames; with keyint 12 stored frames it must seek (start at 12).
    row = bench_layout.measure(encoded[(8.0, 4, 12)], 16, 1, rounds=1)
    assert (row["window_first"], row["window_last"]) == (17, 32)
    assert row["decoded_per_clip_today"] == 33 and row["decoded_per_clip_seek"] == 21
    row0 = bench_layout.measure(encoded[(8.0, 4, 0)], 16, 1, rounds=1)
    assert row0["decoded_per_clip_seek"] == 33  # one keyframe: nothing to skip
    # The loader way also leaves out unneeded non-reference pictures: before the window (all of the
    # window is needed at stride 1) and, at full rate and stride 4, inside it as well.
    assert row["decoded_per_clip_loader"] <= 21 and row0["decoded_per_clip_loader"] < 33
    full_rate = bench_layout.measure(encoded[(8.0, 1, 0)], 16, 4, rounds=1)
    assert full_rate["decoded_per_clip_loader"] < 0.75 * full_rate["decoded_per_clip_seek"] == 0.75 * 130


def _row(duration, fps_div, keyint, today, seek, loader=None):
    row = {"duration": duration, "fps_div": fps_div, "fps": 25 / fps_div, "keyint": keyint,
           "window_first_source": 9, "window_first": 9, "frames_per_clip": 80, "bytes_per_clip": 1024.0,
           "decoded_per_clip_today": 70, "decoded_per_clip_seek": 70, "ms_per_clip_today": 1e3 / today,
           "ms_per_clip_seek": 1e3 / seek, "clips_per_s_per_core_today": today,
           "clips_per_s_per_core_seek": seek, "speedup": seek / today}
    if loader is not None:  # rows written before the loader way existed have none
        row.update({"decoded_per_clip_loader": 40, "ms_per_clip_loader": 1e3 / loader,
                    "clips_per_s_per_core_loader": loader, "loader_speedup": loader / today})
    return row


def test_vs_today_is_a_rows_rate_over_its_lengths_default_full_rate_rate():
    rows = [_row(3.2, 1, 0, 100.0, 110.0, 125.0), _row(3.2, 4, 12, 300.0, 250.0, 260.0),
            _row(8.0, 4, 0, 50.0, 60.0)]
    lines = bench_layout.table(rows).splitlines()
    assert len({ln.count("|") for ln in lines}) == 1
    header = [c.strip() for c in lines[0].split("|")]
    cells = [[c.strip() for c in ln.split("|")] for ln in lines[2:]]
    column = {name: [c[header.index(name)] for c in cells] for name in ("fps", "vs today", "loader vs today")}
    assert column["fps"] == ["25", "6.25", "6.25"]
    assert column["vs today"] == ["1.10x", "2.50x", "-"]  # no 8 s baseline row: no ratio
    assert column["loader vs today"] == ["1.25x", "2.60x", "-"]


@pytest.mark.parametrize("value", ["3", "0", "1,x", "8"])
def test_bad_fps_divs_are_refused_before_anything_runs(value, capsys):
    with pytest.raises(SystemExit) as e:
        bench_layout.main(["--fps-div", value])
    assert e.value.code == 2 and "--fps-div" in capsys.readouterr().err
