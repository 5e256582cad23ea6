"""Colour fidelity of every decode path (issue 18): YUV -> RGB with the right chroma siting.

A clip with sharp colour edges (bars, stripes) is encoded as H.264 and VP9 and decoded by each path;
the frames are compared with an independent reference: a numpy BT.601 limited-range conversion of the
decoder's own YUV planes, with left-sited 4:2:0 chroma upsampled bilinearly (horizontal sample k at
luma column 2k, vertical samples between rows 2k and 2k + 1). It differs from FFmpeg's only in
rounding. Measured (64x64 bars): before the fix VP9 decoded with mean 4.0/255, max 76/255 (read as
centre-sited); after, every path mean <= 0.01/255, max <= 2/255.
"""

import io
import json

import av
import numpy as np
import pytest
import torch

from vaemo_dist.config import InputConfig
from vaemo_dist.data.decode_pyav import decode_sample
from vaemo_dist.data.synth import encode_audio, encode_video

SIDE = 64
# Stated tolerance against the reference, in 1/255 steps (rounding and the float path only).
MEAN_TOL, MAX_TOL = 0.1, 3.0


def bars(frames: int = 4, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """Saturated colour bars, mirrored in the lower half and in every third 7-row stripe: sharp
    horizontal and vertical colour edges at odd and even positions."""
    cols = np.array([[255, 255, 255], [255, 255, 0], [0, 255, 255], [0, 255, 0],
                     [255, 0, 255], [255, 0, 0], [0, 0, 255], [0, 0, 0]], np.uint8)
    x = np.arange(w) * len(cols) // w
    img = cols[x][None].repeat(h, 0)
    img[h // 2 :] = cols[::-1][x]
    img = np.where((np.arange(h)[:, None, None] // 7) % 3 == 0, img[:, ::-1], img)
    return np.repeat(img[None], frames, 0).copy()


def yuv_planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = frame.to_ndarray(format="yuv420p")  # the decoder's planes as they are (no conversion)
    h, w = frame.height, frame.width
    rest, n = a[h:].reshape(-1), (h // 2) * (w // 2)
    return a[:h], rest[:n].reshape(h // 2, w // 2), rest[n:].reshape(h // 2, w // 2)


def reference_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, siting: str = "left") -> np.ndarray:
    """BT.601 limited range -> RGB in float, 4:2:0 chroma upsampled bilinearly from `siting`."""
    h, w = y.shape

    def lerp(c: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
        k0 = np.clip(np.floor(pos).astype(int), 0, c.shape[axis] - 1)
        k1 = np.clip(k0 + 1, 0, c.shape[axis] - 1)
        f = pos - np.floor(pos)
        a, b = np.take(c, k0, axis), np.take(c, k1, axis)
        f = f[:, None] if axis == 0 else f[None, :]
        return a * (1 - f) + b * f

    def up(c: np.ndarray) -> np.ndarray:
        c = lerp(c.astype(np.float64), (np.arange(h) + 0.5) / 2 - 0.5, 0)
        cols = np.arange(w) / 2 if siting == "left" else (np.arange(w) + 0.5) / 2 - 0.5
        return lerp(c, cols, 1)

    yy = (y - 16.0) * 255 / 219
    cb, cr = (up(u) - 128) * 255 / 224, (up(v) - 128) * 255 / 224
    rgb = np.stack([yy + 1.402 * cr, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.772 * cb], -1)
    return np.clip(np.rint(rgb), 0, 255)


def untagged_vp9(frames: np.ndarray) -> bytes:
    """VP9/WebM as vaemo-shard wrote it before issue 18: no chroma siting, range or matrix."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        s = out.add_stream("libvpx-vp9", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"deadline": "realtime", "cpu-used": "8", "b": "0", "crf": "4"}
        for rgb in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(s.encode())
    return buf.getvalue()


def clip_media(codec: str) -> bytes:
    frames = bars()
    return untagged_vp9(frames) if codec == "vp9-untagged" else encode_video(frames, 25, codec, quality=4)


def sample_of(video: bytes, codec: str) -> dict:
    field = "mp4" if codec == "h264" else "webm"
    info = {"frames": 4, "fps": 25, "duration": 0.16, "label": 0}
    return {"__key__": codec, field: video, "flac": encode_audio(np.zeros(16000 * 1), 16000),
            "json": json.dumps(info).encode()}


def native_inputs() -> InputConfig:
    inputs = InputConfig()
    inputs.video.frames, inputs.video.stride, inputs.video.size = 4, 1, SIDE  # no resize
    inputs.audio.frames = 16
    return inputs


def to_pixels(video: torch.Tensor, inputs: InputConfig) -> np.ndarray:
    """[3, T, H, W] normalised -> [T, H, W, 3] in 0..255 (float)."""
    mean = torch.tensor(inputs.video.mean).view(3, 1, 1, 1)
    std = torch.tensor(inputs.video.std).view(3, 1, 1, 1)
    return ((video.cpu() * std + mean) * 255).permute(1, 2, 3, 0).double().numpy()


def reference_frames(video: bytes) -> np.ndarray:
    with av.open(io.BytesIO(video)) as c:
        return np.stack([reference_rgb(*yuv_planes(f)) for f in c.decode(video=0)][:4])


def errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    e = np.abs(got - want)
    return float(e.mean()), float(e.max())


def test_the_reference_tells_the_sitings_apart():
    # Guards the test itself: on these bars left and centre siting differ by far more than the tolerance.
    with av.open(io.BytesIO(clip_media("h264"))) as c:
        f = next(c.decode(video=0))
    mean, peak = errors(reference_rgb(*yuv_planes(f), "left"), reference_rgb(*yuv_planes(f), "center"))
    assert mean > 10 * MEAN_TOL and peak > 10 * MAX_TOL, (mean, peak)


@pytest.mark.parametrize("codec", ["h264", "vp9", "vp9-untagged"])
def test_pyav_decodes_colour_edges_like_the_reference(codec):
    video = clip_media(codec)
    inputs = native_inputs()
    clip = decode_sample(sample_of(video, codec), inputs)
    mean, peak = errors(to_pixels(clip.video, inputs), reference_frames(video))
    # Measured: h264 0.003 / 2, vp9 0.000 / 1, vp9-untagged 0.000 / 1 (before: vp9 4.0 / 76).
    assert mean < MEAN_TOL and peak < MAX_TOL, (codec, mean, peak)


def test_written_vp9_records_left_chroma_siting_and_tv_range():
    video = clip_media("vp9")
    header = video[: video.find(b"\x1f\x43\xb6\x75")]  # before the first cluster
    assert b"\x55\xb7\x81\x01" in header and b"\x55\xb8\x81\x02" in header  # siting: left, half
    with av.open(io.BytesIO(video)) as c:
        f = next(c.decode(video=0))
        assert f.color_range == av.video.reformatter.ColorRange.MPEG
        assert f.colorspace == av.video.reformatter.Colorspace.ITU601


@pytest.mark.parametrize("codec", ["vp9", "vp9-untagged"])
def test_dali_cpu_reads_chroma_as_centre_sited_a_bounded_known_gap(codec):
    # DALI's CPU video decoder converts YUV -> RGB internally with centre-sited chroma whatever the
    # stream records, and has no option to change it (DALI 2.4). Not fixed: measured and bounded.
    # Measured on these bars: vs the left-sited reference mean 6.0/255, max 76/255; vs centre 0.0006 / 1.
    pytest.importorskip("nvidia.dali")
    from vaemo_dist.data.decode_dali import DaliDecoder, prepare_sample

    video = clip_media(codec)
    inputs = native_inputs()
    out = DaliDecoder(inputs, 1).decode([prepare_sample(sample_of(video, codec), inputs, gpu=False)])
    assert out.ok == [0], out.failed
    got = to_pixels(out.video[0], inputs)
    with av.open(io.BytesIO(video)) as c:
        planes = [yuv_planes(f) for f in c.decode(video=0)][:4]
    centre = np.stack([reference_rgb(*p, "center") for p in planes])
    left = np.stack([reference_rgb(*p, "left") for p in planes])
    mean, peak = errors(got, centre)
    assert mean < MEAN_TOL and peak < MAX_TOL, (codec, mean, peak)  # everything but siting is exact
    mean, peak = errors(got, left)
    assert mean < 8.0 and peak < 90.0, (codec, mean, peak)  # the documented bound of the gap
