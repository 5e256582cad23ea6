"""Decoding from the keyframe before a window (data/seek.py) against a sequential decode, and the
keyframe-interval option of the writers (`vaemo-shard --keyint`, `SynthConfig.keyint`)."""

import io
import json
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from vaemo_dist.config import Config, SynthConfig, validate
from vaemo_dist.data import seek
from vaemo_dist.data.seek import frames_from, start_packet
from vaemo_dist.data.shards import expand_shards
from vaemo_dist.data.synth import build_corpus, write_media_file
from vaemo_dist.data.writer import main

N_FRAMES = 64


def moving_frames(n: int = N_FRAMES, size: int = 32) -> np.ndarray:
    """Frames that all differ (a drifting gradient and a moving bar), so a wrong index shows."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 160, (1, size, size, 3))
    frames = (base + 2 * np.arange(n)[:, None, None, None]) % 256
    for i in range(n):
        frames[i, :, (3 * i) % size, :] = 250
    return frames.astype(np.uint8)


def encode(frames: np.ndarray, codec: str, fmt: str, keyint: int = 0, pts: list[int] | None = None,
           fps: int = 25) -> bytes:
    """H.264 (x264's default B-frames) or VP9 in the container `fmt`; `pts` (in 1/fps) overrides the
    frames' times (to make a variable-rate stream)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream("libx264" if codec == "h264" else "libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        options = {"preset": "veryfast"} if codec == "h264" else {"deadline": "realtime", "cpu-used": "8"}
        if keyint:
            options["g"] = str(keyint)
        stream.options = options
        stream.codec_context.thread_count = 1
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def sequential(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray() for f in container.decode(container.streams.video[0])]


def from_first(data: bytes, first: int) -> list[tuple[int, np.ndarray]]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25)
        return [(i, f.to_ndarray()) for i, f in frames_from(container, stream, first, fps)]


def keyframes(data: bytes) -> list[int]:
    """Display indices of the keyframe packets (pts order)."""
    with av.open(io.BytesIO(data)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    order = sorted(p.pts for p in packets)
    return sorted(order.index(p.pts) for p in packets if p.is_keyframe)


def gop_bounded(keys: list[int], keyint: int, frames: int) -> bool:
    """Keyframes at 0 and at least every `keyint` frames (encoders may add more, e.g. at scene cuts)."""
    return keys[0] == 0 and all(b - a <= keyint for a, b in zip(keys, keys[1:] + [frames]))


CLIPS = [("h264", "mp4"), ("h264", "matroska"), ("vp9", "webm")]


@pytest.fixture(scope="module")
def clips() -> dict[tuple[str, str, int], bytes]:
    frames = moving_frames()
    return {(codec, fmt, keyint): encode(frames, codec, fmt, keyint)
            for codec, fmt in CLIPS for keyint in (0, 12, 25)}


def test_h264_clips_have_b_frames(clips):
    # Reordering is what makes the index-from-pts and the keyframe choice non-trivial: check it is there.
    for fmt in ("mp4", "matroska"):
        with av.open(io.BytesIO(clips[("h264", fmt, 12)])) as container:
            pts = [p.pts for p in container.demux(container.streams.video[0]) if p.size]
        assert pts != sorted(pts)


@pytest.mark.parametrize("codec,fmt", CLIPS)
@pytest.mark.parametrize("keyint", [0, 12, 25])
def test_frames_from_matches_a_sequential_decode(clips, codec, fmt, keyint):
    data = clips[(codec, fmt, keyint)]
    reference = sequential(data)
    assert len(reference) == N_FRAMES
    keys = keyframes(data)
    if keyint:
        assert gop_bounded(keys, keyint, N_FRAMES)  # the option took effect
    else:
        assert keys == [0]  # the encoders' default GOP is longer than the clip
    for first in (0, 5, 11, 12, 13, 25, 30, 49, N_FRAMES - 1):
        out = from_first(data, first)
        indices = [i for i, _ in out]
        start = max(k for k in keys if k <= first)  # the keyframe at or before `first`
        assert indices == list(range(start, N_FRAMES)), (first, indices[:3])
        for i, frame in out:
            assert np.array_equal(frame, reference[i]), (first, i)


def test_no_keyframe_but_frame_0_before_first_decodes_from_0(clips):
    for codec, fmt in CLIPS:
        data = clips[(codec, fmt, 25)]
        keys = keyframes(data)
        assert len(keys) > 1
        out = from_first(data, keys[1] - 1)  # just before the first keyframe after frame 0
        assert [i for i, _ in out] == list(range(N_FRAMES))


def test_seek_skips_the_frames_before_the_keyframe(clips):
    # Not only the indices: frames before the keyframe are never decoded.
    data = clips[("h264", "mp4", 12)]
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        packets = list(container.demux(stream))
        position, index, _ = start_packet(packets, stream, 40, 25.0)
    assert index == max(k for k in keyframes(data) if k <= 40) > 0
    assert sum(1 for p in packets[:position] if p.size) == index  # closed GOP: the earlier packets show 0..35


def test_variable_frame_rate_falls_back_to_decoding_from_the_start():
    frames = moving_frames(40)
    pts = list(range(20)) + list(range(21, 41))  # one frame missing at 20: indices from pts would be off
    data = encode(frames, "h264", "matroska", keyint=10, pts=pts)
    reference = sequential(data)
    assert len(reference) == 40 and gop_bounded(keyframes(data), 10, 40)
    out = from_first(data, 30)
    assert [i for i, _ in out] == list(range(40))
    assert all(np.array_equal(f, reference[i]) for i, f in out)


def test_stream_without_pts_is_decoded_from_the_start():
    frames = moving_frames(30)
    data = encode(frames, "h264", "h264", keyint=5)  # a raw elementary stream: no timestamps
    reference = sequential(data)
    out = from_first(data, 20)
    assert [i for i, _ in out] == list(range(len(reference)))
    assert all(np.array_equal(f, reference[i]) for i, f in out)


def misplace_decoded_frame(monkeypatch, n: int) -> None:
    """Make the n-th decoded frame's pts read as off the grid (the packet scan's N_FRAMES reads first)."""
    calls = {"n": 0}
    true_index = seek.grid_index

    def flaky(pts, grid):
        calls["n"] += 1
        return -1 if calls["n"] == N_FRAMES + n else true_index(pts, grid)

    monkeypatch.setattr(seek, "grid_index", flaky)


def test_a_frame_off_its_promised_index_restarts_from_the_start(clips, monkeypatch):
    # After the seek, a decoded frame whose pts is not the index expected makes the rest come from a
    # sequential decode: nothing yielded twice, nothing skipped, every frame still right.
    data = clips[("vp9", "webm", 12)]
    reference = sequential(data)
    misplace_decoded_frame(monkeypatch, 3)
    restarts = []
    true_sequential = seek._sequential

    def spy(packets, skip_below):
        restarts.append(skip_below)
        return true_sequential(packets, skip_below)

    monkeypatch.setattr(seek, "_sequential", spy)
    out = from_first(data, 30)
    assert restarts == [26]  # 24 and 25 came from the seek, the rest from the restart
    assert [i for i, _ in out] == list(range(24, N_FRAMES))
    assert all(np.array_equal(f, reference[i]) for i, f in out)


def test_negative_first_is_refused(clips):
    with pytest.raises(ValueError, match="first"):
        from_first(clips[("vp9", "webm", 12)], -1)


# --------------------------------------------------------------------------------------------
# The writers' keyframe interval


def test_vaemo_shard_keyint_sets_the_gop_and_records_it(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    write_media_file(root / "a-30fps.mp4", fps=30, width=64, height=48, seconds=2.0)  # re-encoded
    write_media_file(root / "b-conforming.mp4", width=64, height=48, seconds=2.0)  # stream-copied
    out = tmp_path / "shards"
    assert main([str(root), "--out", str(out), "--size", "48", "--keyint", "10", "--workers", "1",
                 "--no-progress", "--no-shuffle"]) == 0
    samples = list(wds.WebDataset(expand_shards(str(out / "manifest.json")), shardshuffle=False))
    by_key = {s["__key__"]: s for s in samples}
    encoded, copied = by_key["0000000-a-30fps"], by_key["0000001-b-conforming"]
    meta = json.loads(encoded["json"])
    assert meta["keyint"] == 10 and not meta["stream_copied"] and meta["frames"] == 50
    assert gop_bounded(keyframes(encoded["mp4"]), 10, 50)
    copied_meta = json.loads(copied["json"])
    assert copied_meta["stream_copied"] and "keyint" not in copied_meta  # the source's GOP is kept
    assert json.loads((out / "manifest.json").read_text())["options"]["keyint"] == 10


def test_vaemo_shard_refuses_a_negative_keyint(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--out", str(tmp_path / "o"), "--keyint", "-1"])


def test_synthetic_corpus_keyint(tmp_path):
    cfg = SynthConfig(clips=2, clips_per_shard=2, classes=2, size=32, duration=1.2, keyint=6)
    out = build_corpus(cfg, tmp_path / "c", progress=False, workers=1)
    sample = next(iter(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)))
    assert json.loads(sample["json"])["keyint"] == 6
    assert gop_bounded(keyframes(sample["mp4"]), 6, 30)
    record = json.loads((out / "_SUCCESS").read_text())
    assert record["keyint"] == 6  # another corpus than the default one (which leaves keyint out)
    bad = Config()
    bad.data.synth.keyint = -1
    with pytest.raises(ValueError, match="keyint"):
        validate(bad)


def loader_sample(key: str, frames: np.ndarray, keyint: int, window: tuple[int, int], seed: int):
    """(a shard sample of `frames` as H.264 in mp4 with FLAC audio, inputs of `window` = (frames, stride)
    at 32 px)."""
    from vaemo_dist.config import InputConfig
    from vaemo_dist.data.synth import encode_audio, synth_audio

    n = len(frames)
    wave, _ = synth_audio(1, 4, int(n / 25 * 16000), np.random.default_rng(seed))
    meta = {"frames": n, "fps": 25, "duration": n / 25, "label": 1, "chroma_siting": "center"}
    sample = {"__key__": key, "mp4": encode(frames, "h264", "mp4", keyint=keyint),
              "flac": encode_audio(wave, 16000), "json": json.dumps(meta).encode()}
    inputs = InputConfig()
    inputs.video.frames, inputs.video.stride, inputs.video.size = *window, 32
    inputs.audio.frames = 32
    return sample, inputs


def recording(seen: list[int]):
    """seek.frames_from, noting every index it yields in `seen`."""
    def spy(container, stream, first, fps, wanted=None):
        for index, frame in frames_from(container, stream, first, fps, wanted):
            seen.append(index)
            yield index, frame
    return spy


def from_frame_0(container, stream, first, fps, wanted=None):
    """The reference: every frame decoded from the first, whatever the caller wants."""
    yield from enumerate(container.decode(stream))


def assert_same_clips(got, reference, raw: bool) -> None:
    for a, b in zip(got, reference, strict=True):
        assert a.meta == b.meta
        if raw:
            assert all(torch.equal(x, y) for x, y in zip(a.raw.y + a.raw.u + a.raw.v,
                                                          b.raw.y + b.raw.u + b.raw.v, strict=True))
            assert torch.equal(a.raw.wave, b.raw.wave)
        else:
            assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)


@pytest.mark.parametrize("raw", [False, True])
def test_the_loader_decode_seeks_into_long_clips_and_gives_what_a_full_decode_gives(monkeypatch, raw):
    # A 4.8 s clip with a keyframe every 12 frames: the centred window starts past 1 s, so decode_pyav
    # starts at the keyframe before it; the clip it makes must equal one decoded from frame 0.
    from vaemo_dist.data import decode_pyav

    sample, inputs = loader_sample("long", moving_frames(120, 48), 12, (4, 3), 5)
    starts: list[int] = []
    monkeypatch.setattr(decode_pyav, "frames_from", recording(starts))
    seeked = decode_pyav.decode_repeats(sample, inputs, None, 2, raw=raw)
    assert starts and 25 <= starts[0] <= seeked[0].meta["frame_indices"][0]  # began at a later keyframe
    monkeypatch.setattr(decode_pyav, "frames_from", from_frame_0)
    assert_same_clips(seeked, decode_pyav.decode_repeats(sample, inputs, None, 2, raw=raw), raw)


# --------------------------------------------------------------------------------------------
# Leaving out the pictures no wanted frame needs (frames_from's `wanted`)


def decoded_with(data: bytes, first: int, wanted: set[int]) -> list[tuple[int, np.ndarray]]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25)
        return [(i, f.to_ndarray()) for i, f in frames_from(container, stream, first, fps, wanted)]


def non_reference(data: bytes) -> set[int]:
    """Display indices of the H.264 pictures whose slices all have nal_ref_idc 0, parsed here from the
    packets' NAL headers (4-byte lengths, as x264 writes in mp4 and Matroska)."""
    out = set()
    with av.open(io.BytesIO(data)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    order = sorted(p.pts for p in packets)
    for p in packets:
        b, pos, refs = bytes(p), 0, []
        while pos < len(b):
            size = int.from_bytes(b[pos : pos + 4], "big")
            if b[pos + 4] & 0x1F in (1, 5):
                refs.append(b[pos + 4] >> 5 & 3)
            pos += 4 + size
        if refs and not any(refs):
            out.add(order.index(p.pts))
    return out


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
@pytest.mark.parametrize("keyint", [0, 12])
def test_wanted_frames_come_out_as_a_full_decode_gives_them_and_unwanted_b_frames_are_not_decoded(
        clips, fmt, keyint):
    data = clips[("h264", fmt, keyint)]
    reference = sequential(data)
    disposable = non_reference(data)
    assert len(disposable) > N_FRAMES // 4  # x264's default B-frames: many pictures nobody references
    for first, stride in ((0, 4), (13, 4), (30, 3), (2, 2)):
        wanted = set(range(first, N_FRAMES, stride))
        start = max(k for k in keyframes(data) if k <= first)
        out = decoded_with(data, first, wanted)
        indices = [i for i, _ in out]
        assert indices == sorted(set(indices)) and indices[0] == start  # ascending, once each
        assert wanted <= set(indices)  # every wanted frame, and the last one
        assert indices[-1] == N_FRAMES - 1
        left_out = set(range(start, N_FRAMES)) - set(indices)
        assert left_out and left_out <= disposable - wanted  # only unwanted non-reference pictures
        if stride == 4:  # on x264's mini-GOPs of 4, every unwanted non-reference picture is left out
            assert left_out == {k for k in disposable - wanted if k >= start and k != N_FRAMES - 1}
        for i, frame in out:
            assert np.array_equal(frame, reference[i]), (first, i)


def test_other_codecs_and_annex_b_streams_decode_every_frame(clips):
    annex_b = encode(moving_frames(30), "h264", "h264", keyint=5)  # no avcC: lengths are start codes
    for data, n in ((clips[("vp9", "webm", 12)], N_FRAMES), (annex_b, 30)):
        reference = sequential(data)
        out = decoded_with(data, 2, set(range(2, n, 4)))
        assert [i for i, _ in out] == list(range(len(reference)))
        assert all(np.array_equal(f, reference[i]) for i, f in out)


def test_a_frame_off_its_promised_index_while_skipping_restarts_and_still_gives_every_wanted_frame(
        clips, monkeypatch):
    data = clips[("h264", "mp4", 0)]
    reference = sequential(data)
    misplace_decoded_frame(monkeypatch, 4)
    wanted = set(range(0, N_FRAMES, 4))
    out = decoded_with(data, 0, wanted)
    indices = [i for i, _ in out]
    assert indices == sorted(set(indices)) and wanted <= set(indices)
    assert all(np.array_equal(f, reference[i]) for i, f in out)


@pytest.mark.parametrize("payload,expected", [
    (b"\x00\x00\x00\x02\x01\x9a", True),  # one non-IDR slice, nal_ref_idc 0
    (b"\x00\x00\x00\x02\x41\x9a", False),  # nal_ref_idc 2: referenced
    (b"\x00\x00\x00\x02\x65\x88", False),  # an IDR slice
    (b"\x00\x00\x00\x02\x06\x05\x00\x00\x00\x02\x01\x9a", True),  # SEI then a non-reference slice
    (b"\x00\x00\x00\x02\x06\x05", False),  # no slice at all
    (b"\x00\x00\x00\x09\x01\x9a", False),  # a length past the end: not parsed, so not left out
    (b"\x00\x00\x00\x00", False),  # a zero length
])
def test_disposable_reads_the_nal_headers(payload, expected):
    assert seek.disposable(av.Packet(payload), 4) is expected


def test_the_loader_leaves_out_unwanted_b_frames_and_gives_what_a_full_decode_gives(monkeypatch):
    # decode_pyav asks frames_from to leave out what its windows do not need; the clip it makes equals
    # the one a decode of every frame from the first makes.
    from vaemo_dist.data import decode_pyav

    sample, inputs = loader_sample("b", moving_frames(), 0, (8, 4), 3)
    for raw in (False, True):
        seen: list[int] = []
        monkeypatch.setattr(decode_pyav, "frames_from", recording(seen))
        skipped = decode_pyav.decode_repeats(sample, inputs, None, 2, raw=raw)
        last = max(max(c.meta["frame_indices"]) for c in skipped)
        assert len(seen) < last + 1  # some frames before the windows' end were never decoded
        monkeypatch.setattr(decode_pyav, "frames_from", from_frame_0)
        assert_same_clips(skipped, decode_pyav.decode_repeats(sample, inputs, None, 2, raw=raw), raw)
