"""Face-centred cropping (vaemo_dist/data/faces.py and `vaemo-shard --face-crop`).

The test face is scikit-image's `astronaut` (shipped in its wheel, nothing fetched), pasted on a
textured background and moved across the frame. Where the face is in the output is found by template
matching against the astronaut image itself, not by the detector under test."""

import json

import av
import cv2
import numpy as np
import pytest
import webdataset as wds
from skimage import data as skdata

from vaemo_dist.data import faces
from vaemo_dist.data.faces import Box, HaarDetector, crop_square, load_boxes, track_faces, track_from_boxes
from vaemo_dist.data.shards import expand_shards

# The face in skimage's 512x512 astronaut: the patch pasted (rows, cols) and the face's centre in it
# (x, y) in the image's pixels. The centre is the middle of the eyes-to-chin region (checked below).
PATCH = (slice(30, 200), slice(150, 330))
FACE_CENTRE = (225.0, 115.0)
W, H, N, PASTE = 320, 240, 30, 0.5  # frame size, frames, scale of the pasted patch


def astronaut() -> np.ndarray:
    return skdata.astronaut()


def background(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 215, (H // 16, W // 16, 3)).astype(np.uint8)
    return cv2.resize(coarse, (W, H), interpolation=cv2.INTER_LINEAR)


def moving_face_frames() -> tuple[np.ndarray, np.ndarray]:
    """N frames with the astronaut's face moving left to right (and a little down); returns the
    frames and the true face centre per frame (x, y) in frame pixels."""
    patch = astronaut()[PATCH]
    ph, pw = int(patch.shape[0] * PASTE), int(patch.shape[1] * PASTE)
    small = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_AREA)
    bg = background()
    frames, centres = [], []
    for i in range(N):
        x0 = int(round(10 + (W - pw - 20) * i / (N - 1)))
        y0 = int(round(40 + 30 * i / (N - 1)))
        frame = bg.copy()
        frame[y0:y0 + ph, x0:x0 + pw] = small
        frames.append(frame)
        centres.append((x0 + (FACE_CENTRE[0] - PATCH[1].start) * PASTE,
                        y0 + (FACE_CENTRE[1] - PATCH[0].start) * PASTE))
    return np.stack(frames), np.array(centres)


def write_clip(path, frames: np.ndarray, fps: int = 25) -> None:
    """An mp4 (H.264 + AAC tone) of the RGB `frames`."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        v.options = {"crf": "12"}
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
        for rgb in frames:
            out.mux(v.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(v.encode())
        n = int(len(frames) / fps * 16000)
        wave = (0.2 * np.sin(2 * np.pi * 220 * np.arange(n) / 16000)).astype(np.float32)[None]
        for s in range(0, n, 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, s:s + 1024]), format="fltp",
                                           layout="mono")
            f.sample_rate, f.pts = 16000, s
            out.mux(a.encode(f))
        out.mux(a.encode())


def decoded(sample: dict) -> np.ndarray:
    import io
    with av.open(io.BytesIO(sample["mp4"])) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def locate_face(frame: np.ndarray, scale: float) -> tuple[float, float]:
    """Centre (x, y) of the astronaut's face in `frame` by normalised cross-correlation with a tight
    patch of the original image around FACE_CENTRE, scaled by `scale` (independent of any detector)."""
    cx, cy = FACE_CENTRE
    half = 40
    tmpl = astronaut()[int(cy) - half:int(cy) + half, int(cx) - half:int(cx) + half]
    side = max(8, int(round(2 * half * scale)))
    tmpl = cv2.resize(tmpl, (side, side), interpolation=cv2.INTER_AREA)
    score = cv2.matchTemplate(frame, tmpl, cv2.TM_CCOEFF_NORMED)
    _, best, _, (x, y) = cv2.minMaxLoc(score)
    assert best > 0.6, f"template not found (best correlation {best:.2f})"
    return x + side / 2, y + side / 2


def test_the_test_face_is_where_the_constants_say():
    img = astronaut()
    assert img.shape == (512, 512, 3)
    # The face centre lies inside the pasted patch, and a face detector agrees on the original image.
    assert PATCH[1].start < FACE_CENTRE[0] < PATCH[1].stop and PATCH[0].start < FACE_CENTRE[1] < PATCH[0].stop
    (box,) = HaarDetector(max_side=512).detect(img)
    assert abs(box.centre[0] - FACE_CENTRE[0]) < 8 and abs(box.centre[1] - FACE_CENTRE[1]) < 8, box
    # The template locator finds it on the frames, where it was put.
    frames, centres = moving_face_frames()
    for i in (0, N // 2, N - 1):
        x, y = locate_face(frames[i], PASTE)
        assert abs(x - centres[i, 0]) <= 1.5 and abs(y - centres[i, 1]) <= 1.5


def test_detector_follows_the_moving_face():
    frames, centres = moving_face_frames()
    track = track_faces(frames, HaarDetector(), stride=3, margin=0.4)
    assert track.found == track.checked == 11
    centre = track.boxes[:, :2] + track.boxes[:, 2:3] / 2
    err = np.abs(centre - centres).max()
    assert err < 4.0, err
    s = track.summary()
    assert s["detector"] == "opencv-haar" and s["frames"] == N and s["frames_with_face"] == 11


def test_smoothing_removes_jitter_and_keeps_a_steady_motion():
    rng = np.random.default_rng(1)
    n = 60
    truth = np.stack([50 + 2.0 * np.arange(n), 80 + 0.5 * np.arange(n)], axis=1)
    noisy = [Box(x - 20 + rng.normal(0, 3), y - 20 + rng.normal(0, 3), 40, 40) for x, y in truth]
    track = track_from_boxes(noisy, 320, 240, margin=0.0, sigma=3.0)
    raw_err = np.abs(np.array([b.centre for b in noisy]) - truth)
    err = np.abs(track.centres - truth)
    assert err.mean() < 0.5 * raw_err.mean()
    # A steady motion stays exactly on its line, the ends too (not pulled back as edge-clamped padding does).
    clean = [Box(x - 20, y - 20, 40, 40) for x, y in truth]
    np.testing.assert_allclose(track_from_boxes(clean, 320, 240, sigma=3.0).centres, truth, atol=1e-9)
    raw_jerk = np.abs(np.diff(np.array([b.centre for b in noisy]), n=2, axis=0)).mean()
    assert np.abs(np.diff(track.centres, n=2, axis=0)).mean() < 0.2 * raw_jerk
    # No smoothing: the track is the boxes.
    exact = track_from_boxes(noisy, 320, 240, margin=0.0, sigma=0.0)
    np.testing.assert_allclose(exact.centres, [b.centre for b in noisy])


def test_gaps_are_interpolated_and_too_few_faces_raise():
    boxes = [Box(0, 0, 10, 10)] + [None] * 9 + [Box(90, 0, 10, 10)]
    track = track_from_boxes(boxes, 200, 100, margin=1.0, sigma=0.0, min_found=0.1)
    np.testing.assert_allclose(track.centres[:, 0], np.linspace(5, 95, 11))
    np.testing.assert_allclose(track.boxes[:, 2], 20.0)  # (1 + margin) * face size
    with pytest.raises(faces.NoFace, match="no face: found on 2 of 11"):
        track_from_boxes(boxes, 200, 100)


def test_crop_square_pads_outside_the_frame():
    img = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = crop_square(img, (-1, -1, 3))
    assert out.shape == (3, 3, 3)
    assert (out[0] == 0).all() and (out[:, 0] == 0).all()
    np.testing.assert_array_equal(out[1:, 1:], img[:2, :2])


def test_load_boxes_formats(tmp_path):
    (tmp_path / "b.csv").write_text("key,frame,x,y,w,h\nclip-a,0,10,20,30,40\nclip-a,2,14,20,30,40\n"
                                    "clip-b,,0.1,0.2,0.3,0.4\n")
    table = load_boxes(tmp_path / "b.csv")
    a = table["clip-a"].per_frame(3, 100, 100)
    assert a[0] == Box(10, 20, 30, 40) and a[1] is None and a[2] == Box(14, 20, 30, 40)
    assert table["clip-b"].per_frame(2, 200, 100) == [Box(20, 20, 60, 40)] * 2  # fractions of the frame
    (tmp_path / "b.json").write_text(json.dumps({"x/clip.mp4": [1, 2, 3, 4]}))
    assert load_boxes(tmp_path / "b.json")["x/clip.mp4"].per_frame(1, 9, 9) == [Box(1, 2, 3, 4)]
    # VoxCeleb's txt tracks: header lines, then FRAME X Y W H in fractions, frames counted from the first.
    vox = tmp_path / "vox" / "id00017" / "_mjZ87sK6cA"
    vox.mkdir(parents=True)
    (vox / "00001.txt").write_text("Identity  : \tid00017\nReference : \t_mjZ87sK6cA\nOffset    : \t2\n"
                                   "FV Conf   : \t16.1\t(1)\nASD Conf  : \t5.1\n\nFRAME \tX \tY \tW \tH \n"
                                   "008809 \t0.100 \t0.200 \t0.400 \t0.500 \n"
                                   "008810 \t0.110 \t0.200 \t0.400 \t0.500 \n")
    table = load_boxes(tmp_path / "vox")
    found = faces.boxes_for(table, "0000005-00001", "/data/vox2/mp4/id00017/_mjZ87sK6cA/00001.mp4")
    assert found is not None and found.frames == [0, 1]
    assert found.per_frame(2, 100, 200)[1] == Box(11, 40, 40, 100)
    with pytest.raises(ValueError, match="no such file"):
        load_boxes(tmp_path / "missing.csv")


def test_unknown_detector_is_refused():
    with pytest.raises(ValueError, match="opencv-haar"):
        faces.get_detector("nope")


# --------------------------------------------------------------------------------------------
# vaemo-shard --face-crop


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    frames, centres = moving_face_frames()
    write_clip(root / "a-face.mp4", frames)
    write_clip(root / "b-noface.mp4", np.stack([background(seed=i % 3) for i in range(N)]))
    return root, centres


def shard_samples(out):
    return {s["__key__"]: s for s in wds.WebDataset(expand_shards(str(out / "manifest.json")),
                                                    shardshuffle=False)}


def test_face_crop_keeps_the_moving_face_centred(clips, tmp_path):
    from vaemo_dist.data.writer import main
    root, _ = clips
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--size", "96", "--face-crop", "--face-stride", "3",
                 "--workers", "1", "--no-progress", "--no-shuffle"]) == 0
    got = shard_samples(out)
    (key,) = got
    meta = json.loads(got[key]["json"])
    assert meta["width"] == meta["height"] == 96 and not meta["stream_copied"]
    track = meta["face_track"]
    assert track["detector"] == "opencv-haar" and track["frames_with_face"] == track["frames_checked"] == 11
    frames = decoded(got[key])
    assert frames.shape == (N, 96, 96, 3)
    scale = PASTE * 96 / track["mean_box"][2]
    errors = [np.hypot(*(np.array(locate_face(f, scale)) - 48)) for f in frames]
    assert max(errors) <= 4.0, errors
    # The clip without a face is skipped, counted and listed.
    report = json.loads((out / "report.json").read_text())
    (skip,) = report["skipped"]
    assert skip["path"].endswith("b-noface.mp4") and skip["kind"] == "no_face"
    assert skip["reason"].startswith("no face: found on 0 of 11")
    assert report["skipped_by_kind"] == {"no_face": 1}


def test_boxes_file_replaces_the_detector(clips, tmp_path, monkeypatch):
    from vaemo_dist.data import writer
    root, centres = clips

    def refuse(name):
        raise AssertionError("the detector must not run with --boxes")

    monkeypatch.setattr(writer.faces, "get_detector", refuse)
    writer._detector.cache_clear()
    # Boxes of side 80 centred 15 px right of the true face: the crop must follow them, not the face.
    rows = ["key,frame,x,y,w,h"] + [f"a-face,{i},{cx + 15 - 40:.1f},{cy - 40:.1f},80,80"
                                    for i, (cx, cy) in enumerate(centres)]
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "inputs.csv").write_text(f"path\n{root / 'a-face.mp4'}\n")
    out = tmp_path / "out"
    assert writer.main([str(tmp_path / "inputs.csv"), "--out", str(out), "--size", "96", "--face-crop",
                        "--face-margin", "0.5", "--boxes", str(tmp_path / "boxes.csv"), "--workers", "1",
                        "--no-progress"]) == 0
    (sample,) = shard_samples(out).values()
    meta = json.loads(sample["json"])
    assert meta["face_track"]["detector"] == "boxes" and meta["face_track"]["mean_box"][2] == 120.0
    scale = PASTE * 96 / 120
    for f in decoded(sample)[::5]:
        x, y = locate_face(f, scale)
        assert abs(x - (48 - 15 * 96 / 120)) <= 3 and abs(y - 48) <= 3, (x, y)
