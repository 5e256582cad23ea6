import json
import math
import pickle
import signal
import time

import numpy as np
import pytest
import torch
import webdataset as wds

from vaemo_dist.config import InputConfig
from vaemo_dist.data.audio import LOG_FLOOR
from vaemo_dist.data.decode_pyav import decode_sample, sample_indices
from vaemo_dist.data.synth import encode_audio, encode_video
from vaemo_dist.data.types import DECODE_KINDS, Clip, DecodeError, DecodeLimits

INPUTS = InputConfig()  # 16 frames, stride 4, 160 px, 256 x 128 log-mel
SR = 16000
FLOOR_NORM = (math.log(LOG_FLOOR) - INPUTS.audio.mean) / INPUTS.audio.std


def corpus_samples(corpus) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in corpus.glob("shard-*.tar")), shardshuffle=False))


def ramp_frames(n: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Grey frames whose level encodes the frame index: level = 10 + 3 * i."""
    levels = 10 + 3 * np.arange(n)
    return np.broadcast_to(levels[:, None, None, None], (n, height, width, 3)).astype(np.uint8)


def frame_numbers(video: torch.Tensor, inputs: InputConfig = INPUTS) -> list[int]:
    """Undo normalisation and read each sampled frame's index back from its grey level."""
    mean = torch.tensor(inputs.video.mean).view(3, 1, 1, 1)
    std = torch.tensor(inputs.video.std).view(3, 1, 1, 1)
    levels = ((video * std + mean) * 255.0).mean(dim=(0, 2, 3))
    return [round((float(v) - 10) / 3) for v in levels]


def make_sample(key: str = "k-000", n_frames: int = 80, frames: np.ndarray | None = None,
                wave: np.ndarray | None = None, codec: str = "h264", meta: dict | None = None,
                audio_fmt: str = "flac", audio_rate: int = SR) -> dict:
    frames = ramp_frames(n_frames) if frames is None else frames
    n_frames = len(frames)
    if wave is None:
        t = np.arange(int(n_frames / 25 * audio_rate)) / audio_rate
        wave = 0.3 * np.sin(2 * np.pi * 440 * t)
    info = {"frames": n_frames, "fps": 25, "duration": n_frames / 25, "sample_rate": audio_rate,
            "label": 2}
    info.update(meta or {})
    quality = 0 if codec == "h264" else 4  # lossless / near-lossless: grey levels survive
    return {
        "__key__": key,
        "__url__": "memory://test.tar",
        "mp4" if codec == "h264" else "webm": encode_video(frames, 25, codec, quality=quality),
        audio_fmt: encode_audio(wave, audio_rate, audio_fmt),
        "json": json.dumps(info).encode(),
    }


@pytest.fixture(scope="module")
def good() -> dict:
    return make_sample()


# --------------------------------------------------------------------------------------------
# Good samples


@pytest.mark.parametrize("corpus_name", ["tiny_corpus", "tiny_corpus_vp9"])
def test_corpus_clips_shapes_and_ranges(corpus_name, request):
    samples = corpus_samples(request.getfixturevalue(corpus_name))
    lo = [(0 - m) / s for m, s in zip(INPUTS.video.mean, INPUTS.video.std)]
    hi = [(1 - m) / s for m, s in zip(INPUTS.video.mean, INPUTS.video.std)]
    for s in samples:
        clip = decode_sample(s, INPUTS)
        assert isinstance(clip, Clip) and clip.key == s["__key__"]
        assert clip.video.shape == (3, 16, 160, 160) and clip.video.dtype == torch.float32
        assert clip.audio.shape == (1, 256, 128) and clip.audio.dtype == torch.float32
        for c in range(3):
            assert lo[c] - 1e-4 <= clip.video[c].min() and clip.video[c].max() <= hi[c] + 1e-4
        assert clip.video.std() > 0.1  # a picture, not a flat field
        assert torch.isfinite(clip.audio).all() and clip.audio.min() >= FLOOR_NORM - 1e-4
        assert clip.audio.std() > 0.1
        assert clip.label == json.loads(s["json"])["label"]
        assert clip.meta["fps"] == 25 and clip.meta["frames"] == 80
        assert clip.meta["duration"] == pytest.approx(3.2)
        assert clip.meta["frame_indices"] == list(range(9, 70, 4))


def test_frame_sampling_picks_the_centred_window(good):
    clip = decode_sample(good, INPUTS)
    # 80 frames, a 61-frame window (16 frames, stride 4) -> start (80 - 61) // 2 = 9.
    assert frame_numbers(clip.video) == list(range(9, 70, 4))
    assert clip.meta["frame_indices"] == list(range(9, 70, 4))
    assert clip.label == 2

    other = InputConfig()
    other.video.frames, other.video.stride, other.video.size = 4, 2, 32
    clip = decode_sample(good, other)
    assert clip.video.shape == (3, 4, 32, 32)
    assert frame_numbers(clip.video, other) == [36, 38, 40, 42]


@pytest.mark.parametrize("with_frame_count", [True, False])
def test_short_clip_repeats_the_last_frame(with_frame_count):
    sample = make_sample(n_frames=30)
    if not with_frame_count:  # no json count: the decoder must count the frames itself
        meta = json.loads(sample["json"])
        del meta["frames"]
        sample["json"] = json.dumps(meta).encode()
    clip = decode_sample(sample, INPUTS)
    assert frame_numbers(clip.video) == [0, 4, 8, 12, 16, 20, 24, 28] + [29] * 8
    assert clip.meta["frames"] == 30


def test_sample_indices():
    assert sample_indices(80, 16, 4) == list(range(9, 70, 4))
    assert sample_indices(61, 16, 4) == list(range(0, 61, 4))
    assert sample_indices(1, 3, 4) == [0, 0, 0]


def test_non_square_frames_are_centre_cropped():
    frames = np.zeros((80, 32, 64, 3), dtype=np.uint8)
    frames[:, :, :16] = (255, 0, 0)  # red and blue bands lie outside the centre square
    frames[:, :, 48:] = (0, 0, 255)
    frames[:, :, 16:48] = (0, 200, 0)
    inputs = InputConfig()
    inputs.video.frames, inputs.video.size = 2, 16
    clip = decode_sample(make_sample(frames=frames), inputs)
    mean = torch.tensor(inputs.video.mean).view(3, 1, 1, 1)
    std = torch.tensor(inputs.video.std).view(3, 1, 1, 1)
    rgb = (clip.video * std + mean) * 255
    assert clip.video.shape == (3, 2, 16, 16)
    # The outermost columns are left out: 4:2:0 chroma, interpolated to full resolution (as DALI
    # does), bleeds one pixel across a colour edge.
    inner = rgb[..., 1:-1]
    assert inner[0].max() < 30 and inner[2].max() < 30 and inner[1].min() > 170


def test_audio_window_is_centred_on_the_video_window():
    # Video window: frames 9..69 -> centre 1.58 s; the 2.55 s audio window then starts at 0.305 s.
    t = np.arange(int(3.2 * SR)) / SR
    burst = ((t > 0.35) & (t < 0.6)) * 0.3 * np.sin(2 * np.pi * 440 * t)
    before = (t < 0.25) * 0.3 * np.sin(2 * np.pi * 440 * t)  # entirely before the window
    loud = decode_sample(make_sample(wave=burst), INPUTS).audio[0]
    assert (loud[8:26].max(dim=1).values > FLOOR_NORM + 3).all()  # burst at ~0.045..0.295 s
    assert torch.allclose(loud[35:], torch.tensor(FLOOR_NORM), atol=1e-4)
    silent = decode_sample(make_sample(wave=before), INPUTS).audio
    assert torch.allclose(silent, torch.tensor(FLOOR_NORM), atol=1e-4)


def test_wav_audio_and_missing_json_are_accepted():
    sample = make_sample(audio_fmt="wav")
    del sample["json"]
    clip = decode_sample(sample, INPUTS)
    assert clip.label == -1 and clip.audio.shape == (1, 256, 128)
    assert clip.meta["frames"] == 80 and clip.meta["fps"] == 25


def test_vp9_sample_frame_sampling():
    clip = decode_sample(make_sample(codec="vp9"), INPUTS)
    assert frame_numbers(clip.video) == list(range(9, 70, 4))


# --------------------------------------------------------------------------------------------
# Bad samples: always DecodeError, naming the key and the problem


def _without(sample: dict, name: str) -> dict:
    return {k: v for k, v in sample.items() if k != name}


BAD_CASES = {  # name: (corruption, words of the reason, kind)
    "no video": (lambda s: _without(s, "mp4"), "no video", "no_video"),
    "no audio": (lambda s: _without(s, "flac"), "no audio", "no_audio"),
    "empty video": (lambda s: {**s, "mp4": b""}, "empty", "empty"),
    "empty audio": (lambda s: {**s, "flac": b""}, "empty", "empty"),
    "garbage video": (lambda s: {**s, "mp4": b"\x00garbage" * 100}, "video", "corrupt"),
    "garbage audio": (lambda s: {**s, "flac": b"fLaC-not-really" * 50}, "audio", "corrupt"),
    # Cut before its index (moov): FFmpeg says "invalid data" as for garbage; the box walk knows better.
    "truncated video bytes": (lambda s: {**s, "mp4": s["mp4"][: len(s["mp4"]) // 2]}, "cut short",
                              "truncated"),
    "garbage after the mp4 header": (lambda s: {**s, "mp4": s["mp4"][:32] + b"\x00garbage" * 100}, "video",
                                     "corrupt"),
    "truncated audio bytes": (lambda s: {**s, "flac": s["flac"][: len(s["flac"]) // 3]}, "audio truncated",
                              "truncated"),
    "video is text": (lambda s: {**s, "mp4": "not bytes"}, "not bytes", "corrupt"),
    "audio holds video": (lambda s: {**s, "flac": s["mp4"]}, "no audio stream", "no_audio"),
    "video holds audio": (lambda s: {**s, "mp4": s["flac"]}, "no video stream", "no_video"),
    "unparsable json": (lambda s: {**s, "json": b"{'frames': 80,"}, "unparsable json", "metadata"),
    "json not an object": (lambda s: {**s, "json": b"[1, 2]"}, "expected an object", "metadata"),
    "json bad label": (lambda s: {**s, "json": b'{"label": "happy"}'}, "label", "metadata"),
    "json bad frames": (lambda s: {**s, "json": b'{"frames": 2.5}'}, "frames", "metadata"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_decode_error_naming_the_key(good, case):
    corrupt, reason, kind = BAD_CASES[case]
    with pytest.raises(DecodeError) as info:
        decode_sample(corrupt({**good, "__key__": "bad-clip-7"}), INPUTS)
    assert info.value.key == "bad-clip-7" and "bad-clip-7" in str(info.value)
    assert reason in info.value.reason, info.value.reason
    assert info.value.kind == kind, (info.value.kind, info.value.reason)


def test_decode_error_kinds_are_fixed_and_survive_pickling():
    e = pickle.loads(pickle.dumps(DecodeError("k", "why", kind="too_long")))
    assert (e.key, e.reason, e.kind, str(e)) == ("k", "why", "too_long", "k: why")
    assert DecodeError("k", "why").kind == "other" and set(DECODE_KINDS) >= {"timeout", "truncated"}
    with pytest.raises(ValueError, match="unknown decode error kind"):
        DecodeError("k", "why", kind="bad")


def test_fewer_frames_than_promised_is_truncation():
    sample = make_sample(key="short-stream", n_frames=20, meta={"frames": 80, "duration": 0.8})
    with pytest.raises(DecodeError, match="short-stream: video truncated: decoded 20 frames but 80") as info:
        decode_sample(sample, INPUTS)
    assert info.value.kind == "truncated"
    # A couple of frames short of the promise is tolerated (edge padding), not an error.
    assert decode_sample(make_sample(n_frames=78, meta={"frames": 80}), INPUTS).video.shape[1] == 16


def test_shorter_audio_than_promised_is_truncation():
    sample = make_sample(key="short-audio", wave=np.zeros(SR))  # 1 s of audio for a 3.2 s clip
    with pytest.raises(DecodeError, match="short-audio: audio truncated"):
        decode_sample(sample, INPUTS)


def test_other_sample_rate_is_refused_for_now():
    sample = make_sample(key="8k", audio_rate=8000, meta={"sample_rate": 8000})
    with pytest.raises(DecodeError, match="8000 Hz.*resampling") as info:
        decode_sample(sample, INPUTS)
    assert info.value.kind == "sample_rate"


# --------------------------------------------------------------------------------------------
# Limits: clip length from metadata, decode time

LIMITS = DecodeLimits(min_clip_s=0.5, max_clip_s=2.0, timeout_s=30.0)


def _no_length_in_json(sample: dict) -> dict:
    meta = json.loads(sample["json"])
    del meta["frames"], meta["duration"]
    return {**sample, "json": json.dumps(meta).encode()}


@pytest.mark.parametrize("codec", ["h264", "vp9"])
@pytest.mark.parametrize("json_length", [True, False], ids=["json", "container"])
def test_clip_length_limits(codec, json_length):
    adjust = (lambda s: s) if json_length else _no_length_in_json  # else mp4 index / Matroska duration
    short = adjust(make_sample("tiny", n_frames=3, codec=codec))  # 0.12 s
    long = adjust(make_sample("long", n_frames=60, codec=codec))  # 2.4 s
    with pytest.raises(DecodeError, match="tiny: clip is 0.12 s long, shorter than data.min_clip_s") as info:
        decode_sample(short, INPUTS, LIMITS)
    assert info.value.kind == "too_short"
    with pytest.raises(DecodeError, match="long: clip is 2.4 s long, longer than data.max_clip_s") as info:
        decode_sample(long, INPUTS, LIMITS)
    assert info.value.kind == "too_long"
    # Between min_clip_s and the 61-frame window: edge padding, as without limits.
    clip = decode_sample(adjust(make_sample(n_frames=30, codec=codec)), INPUTS, LIMITS)
    assert frame_numbers(clip.video) == [0, 4, 8, 12, 16, 20, 24, 28] + [29] * 8
    assert decode_sample(short, INPUTS).video.shape == (3, 16, 160, 160)  # no limits by default


def test_long_audio_is_refused_before_decoding():
    # Short video, an hour of audio would be decoded whole: the FLAC header's length refuses it.
    sample = make_sample("long-audio", n_frames=30, wave=np.zeros(3 * SR))
    with pytest.raises(DecodeError, match="audio is 3 s long, longer than") as info:
        decode_sample(sample, INPUTS, LIMITS)
    assert info.value.kind == "too_long"


def test_a_decode_past_the_time_limit_is_abandoned(monkeypatch, good):
    import vaemo_dist.data.decode_pyav as decode_pyav

    slow = decode_pyav._decode

    def sleepy(key, *args):
        time.sleep(10.0)  # interrupted by the alarm
        return slow(key, *args)

    monkeypatch.setattr(decode_pyav, "_decode", sleepy)
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    with pytest.raises(DecodeError, match="abandoned after 0.2 s") as info:
        decode_sample(good, INPUTS, DecodeLimits(timeout_s=0.2))
    assert info.value.kind == "timeout" and time.monotonic() - t0 < 5.0
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    monkeypatch.setattr(decode_pyav, "_decode", slow)
    assert decode_sample(good, INPUTS, DecodeLimits(timeout_s=30.0)).video.shape == (3, 16, 160, 160)


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_random_corruption_never_escapes_as_another_exception(codec):
    sample = make_sample(key="fuzz", n_frames=30, codec=codec)
    field = "mp4" if codec == "h264" else "webm"
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(12):
        for name in (field, "flac"):
            data = bytearray(sample[name])
            start = int(rng.integers(0, len(data) - 64))
            data[start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
            cut = bytes(data[: int(rng.integers(len(data) // 2, len(data) + 1))])
            try:
                decode_sample({**sample, name: cut}, INPUTS)
                outcomes.add("ok")
            except DecodeError as e:
                assert e.key == "fuzz"
                outcomes.add("error")
    assert "error" in outcomes


# --------------------------------------------------------------------------------------------
# Audio decoded only as far as the windows need


def test_audio_is_decoded_only_as_far_as_the_windows_need_and_cut_as_from_the_whole_stream():
    from vaemo_dist.data import decode_pyav

    rng = np.random.default_rng(2)
    wave = 0.2 * rng.standard_normal(8 * SR)  # 8 s of audio: the windows need much less
    data = encode_audio(wave, SR, "flac")
    full = decode_pyav.decode_audio_wave("k", data, INPUTS.audio, 8.0)
    assert full.size == wave.size
    for centres in ([1.6], [1.0, 1.6, 2.2], [7.9]):  # the last one needs the end of the stream
        enough = decode_pyav.window_ends(INPUTS.audio, centres)
        part = decode_pyav.decode_audio_wave("k", data, INPUTS.audio, 8.0, enough=enough)
        assert part.size >= min(enough, full.size)
        assert np.array_equal(part, full[: part.size])
        if enough < full.size - 8192:  # FLAC frames of 4096 samples: it stopped well before the end
            assert part.size < full.size
        assert torch.equal(decode_pyav.audio_windows(part, INPUTS.audio, centres),
                           decode_pyav.audio_windows(full, INPUTS.audio, centres))


def test_a_stream_cut_before_what_the_windows_need_is_still_truncation():
    from vaemo_dist.data import decode_pyav

    data = encode_audio(np.zeros(SR), SR, "flac")  # 1 s where 3.2 s were promised
    with pytest.raises(DecodeError, match="audio truncated"):
        decode_pyav.decode_audio_wave("k", data, INPUTS.audio, 3.2,
                                      enough=decode_pyav.window_ends(INPUTS.audio, [1.6]))


# --------------------------------------------------------------------------------------------
# The light probe of video opens


@pytest.mark.parametrize("codec,fmt", [("libx264", "mp4"), ("libx264", "matroska"), ("libvpx-vp9", "webm"),
                                       ("libx264", "h264"), ("mpeg4", "avi")])
def test_videos_opened_with_the_light_probe_decode_and_describe_exactly_as_a_plain_open(codec, fmt):
    import io

    import av

    from vaemo_dist.data.decode_pyav import open_container

    rng = np.random.default_rng(4)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(30):
            img = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) // 4 + i * 6
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")))
        out.mux(stream.encode())
    data = buf.getvalue()

    def describe(container):
        s = container.streams.video[0]
        frames = [(f.pts, f.format.name, f.to_ndarray(format="yuv420p").tobytes())
                  for f in container.decode(s)]
        return (s.codec_context.width, s.codec_context.height, s.average_rate, s.frames, s.time_base), frames

    with av.open(io.BytesIO(data)) as plain, open_container("k", data, "video") as light:
        a, b = describe(plain), describe(light)
    assert len(a[1]) == 30 and a == b
