"""Face-centred cropping for `vaemo-shard --face-crop`: detect, track, smooth, crop square.

* A detector is anything with `name` and `detect(rgb) -> list[Box]` (`FaceDetector`); `DETECTORS`
  maps names (`--face-detector`) to factories. The one shipped, `opencv-haar`, is OpenCV's frontal
  face Haar cascade, whose model file ships inside the `opencv-python-headless` wheel (4.x; the 5.x
  wheels no longer carry `cv2.data` cascades): nothing is downloaded at run time. Install it with
  `pip install "vaemo_dist[faces]"`.
* `track_faces` runs a detector on every `stride`-th frame, follows one face (the speaker: the
  largest, most central face where the track starts, then the detection nearest to the previous one),
  interpolates between detections, smooths centre and size over time with a 1-D Gaussian (edges padded
  by odd reflection, so a steady motion is not pulled back at the clip's ends), and gives every frame a
  square box of side `(1 + margin) * face size` (face size: the larger of the face box's width and
  height) centred on the face. A box may reach past the frame: `crop_square` pads it with black, so
  the face stays centred (a clamped box would push it off centre near the frame's edges).
* `load_boxes` reads user-supplied boxes (`--boxes`), which replace the detector; see its docstring
  for the formats (a CSV, a JSON, or VoxCeleb's own per-clip txt tracks).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class NoFace(Exception):
    """Too few of the checked frames hold a face: the caller skips the clip (kind `no_face`)."""


@dataclass(frozen=True)
class Box:
    """A face box in pixels of the frame it was found in: top-left corner, width, height, score."""

    x: float
    y: float
    w: float
    h: float
    score: float = 1.0

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    @property
    def size(self) -> float:
        return max(self.w, self.h)


class FaceDetector(Protocol):
    """What `track_faces` needs: a name (recorded in the json) and faces in one RGB frame."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Faces in an (H, W, 3) uint8 RGB frame, in its pixels; any order."""
        ...


class HaarDetector:
    """OpenCV's Haar cascade (`haarcascade_frontalface_default.xml`, shipped in the cv2 wheel).

    Frames whose long side exceeds `max_side` are scaled down before detection (speed; boxes are
    given back in the frame's pixels). Faces smaller than `min_face` of the frame's short side are not
    searched for. The score is the cascade's neighbour count (how many overlapping windows agreed)."""

    name = "opencv-haar"

    def __init__(self, max_side: int = 640, min_face: float = 0.1, neighbours: int = 5,
                 cascade: str = "haarcascade_frontalface_default.xml") -> None:
        try:
            import cv2
        except ImportError as e:
            raise ImportError("face detection needs OpenCV: pip install 'vaemo_dist[faces]' "
                              "(opencv-python-headless 4.x)") from e
        folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
        path = Path(folder or "") / cascade
        if not folder or not path.is_file():
            raise ImportError(f"this OpenCV ({cv2.__version__}) ships no {cascade}; install "
                              "opencv-python-headless 4.x (pip install 'vaemo_dist[faces]')")
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise ImportError(f"OpenCV could not load {path}")
        self.max_side, self.min_face, self.neighbours = max_side, min_face, neighbours

    def detect(self, rgb: np.ndarray) -> list[Box]:
        cv2 = self._cv2
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                             interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        smallest = max(20, int(self.min_face * min(grey.shape)))
        found, counts = self._cascade.detectMultiScale2(grey, scaleFactor=1.1, minNeighbors=self.neighbours,
                                                        minSize=(smallest, smallest))
        found, counts = np.asarray(found).reshape(-1, 4), np.asarray(counts).reshape(-1)
        return [Box(x / scale, y / scale, bw / scale, bh / scale, float(n))
                for (x, y, bw, bh), n in zip(found, counts)]


DETECTORS: dict[str, Callable[[], FaceDetector]] = {"opencv-haar": HaarDetector}
DEFAULT_DETECTOR = "opencv-haar"


def get_detector(name: str = DEFAULT_DETECTOR) -> FaceDetector:
    """The registered detector `name`; ValueError naming the choices for an unknown one."""
    if name not in DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[name]()


# --------------------------------------------------------------------------------------------
# Tracking


@dataclass
class Track:
    """Per frame: the square crop box (x0, y0, side) centred on the face, in source pixels, plus what
    the detector saw. `found` and `checked` count the frames a face was found on / searched."""

    boxes: np.ndarray  # (T, 3) float: x0, y0, side
    centres: np.ndarray  # (T, 2) float: the smoothed face centre
    detector: str
    stride: int
    margin: float
    checked: int
    found: int
    residual_px: float  # RMS distance of the found faces' centres from the smoothed track

    def summary(self) -> dict[str, Any]:
        """For the clip's json (`face_track`): detector, stride, margin, frames found/checked, the mean
        crop box [x0, y0, side] and its jitter (RMS second difference of the crop centre, px/frame^2,
        after smoothing) and the detections' RMS residual from the smoothed track (px)."""
        steps = np.diff(self.centres, n=2, axis=0)
        jitter = float(np.sqrt((steps ** 2).sum(1).mean())) if len(steps) else 0.0
        return {
            "detector": self.detector, "stride": self.stride, "margin": self.margin,
            "frames": len(self.boxes), "frames_checked": self.checked, "frames_with_face": self.found,
            "mean_box": [round(float(v), 1) for v in self.boxes.mean(0)],
            "jitter": round(jitter, 3), "residual_px": round(self.residual_px, 2),
        }


def _gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """1-D Gaussian over axis 0; edges padded by odd reflection (2 * edge - mirror), which keeps a
    straight-line motion straight up to the ends."""
    if sigma <= 0 or len(values) < 2:
        return values.astype(float)
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, len(values) - 1)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    v = values.astype(float)
    head = 2 * v[0] - v[radius:0:-1]
    tail = 2 * v[-1] - v[-2:-radius - 2:-1]
    padded = np.concatenate([head, v, tail])
    return np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(v.shape[1])], axis=1)


def _pick(candidates: list[Box], previous: Box | None, width: int, height: int) -> Box | None:
    """The speaker's face: with no previous face, the largest and most central; else the candidate
    nearest the previous face (within one face size), or none if all are elsewhere."""
    if not candidates:
        return None
    if previous is None:
        def rank(b: Box) -> float:
            cx, cy = b.centre
            off = math.hypot((cx - width / 2) / width, (cy - height / 2) / height)
            return b.size * (1.0 - off)
        return max(candidates, key=rank)
    px, py = previous.centre
    near = min(candidates, key=lambda b: math.hypot(b.centre[0] - px, b.centre[1] - py))
    moved = math.hypot(near.centre[0] - px, near.centre[1] - py)
    return near if moved <= max(previous.size, near.size) else None


def _checked(n: int, stride: int) -> list[int]:
    """The frames searched: every `stride`-th, and the last (so the track's end is seen, not held)."""
    return sorted(set(range(0, n, stride)) | ({n - 1} if n else set()))


def track_from_boxes(frame_boxes: Sequence[Box | None], width: int, height: int, *, margin: float = 0.4,
                     sigma: float = 2.0, detector: str = "boxes", stride: int = 1,
                     min_found: float = 0.5) -> Track:
    """The track through per-frame face boxes (None: no face on that frame, or not checked; `checked`
    counts the frames a box was looked for: every `stride`-th and the last). Raises NoFace when fewer than
    `min_found` of the checked frames hold a face."""
    n = len(frame_boxes)
    checked_idx = _checked(n, stride)
    have = [i for i in range(n) if frame_boxes[i] is not None]
    found = sum(frame_boxes[i] is not None for i in checked_idx)
    if not have or found < min_found * len(checked_idx):
        raise NoFace(f"no face: found on {found} of {len(checked_idx)} checked frames "
                     f"(need {min_found:.0%})")
    raw = np.array([[*frame_boxes[i].centre, frame_boxes[i].size] for i in have])  # type: ignore[union-attr]
    t = np.arange(n)
    dense = np.stack([np.interp(t, have, raw[:, j]) for j in range(3)], axis=1)
    smooth = _gaussian_smooth(dense, sigma)
    residual = float(np.sqrt(((smooth[have, :2] - raw[:, :2]) ** 2).sum(1).mean()))
    side = np.maximum(2.0, (1.0 + margin) * smooth[:, 2])
    boxes = np.stack([smooth[:, 0] - side / 2, smooth[:, 1] - side / 2, side], axis=1)
    return Track(boxes=boxes, centres=smooth[:, :2], detector=detector, stride=stride, margin=margin,
                 checked=len(checked_idx), found=found, residual_px=residual)


def track_faces(frames_rgb: Sequence[np.ndarray], detector: FaceDetector, stride: int = 5, *,
                margin: float = 0.4, sigma: float | None = None, min_found: float = 0.5) -> Track:
    """Detect on every `stride`-th frame of `frames_rgb` ((H, W, 3) uint8) and on its last, follow the
    speaker's face, interpolate, smooth (Gaussian, `sigma` frames; default `stride`), box it square with
    `margin`.

    Raises NoFace if a face is found on fewer than `min_found` of the checked frames."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not len(frames_rgb):
        raise NoFace("no face: the clip has no frames")
    height, width = frames_rgb[0].shape[:2]
    picked: list[Box | None] = [None] * len(frames_rgb)
    previous: Box | None = None
    for i in _checked(len(frames_rgb), stride):
        box = _pick(detector.detect(frames_rgb[i]), previous, width, height)
        if box is not None:
            picked[i] = previous = box
    sigma = float(stride if sigma is None else sigma)
    return track_from_boxes(picked, width, height, margin=margin, sigma=sigma, detector=detector.name,
                            stride=stride, min_found=min_found)


def crop_square(rgb: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The square (x0, y0, side) of `rgb`, rounded to whole pixels; parts outside the frame are black."""
    h, w = rgb.shape[:2]
    x0, y0 = int(round(box[0])), int(round(box[1]))
    side = max(1, int(round(box[2])))
    out = np.zeros((side, side, rgb.shape[2]), dtype=rgb.dtype)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


# --------------------------------------------------------------------------------------------
# User-supplied boxes (--boxes)


@dataclass
class UserBoxes:
    """One clip's boxes: per frame (`frames` given: frame index -> box, missing frames interpolated) or
    one box for the whole clip (`frames` None). `relative`: x, w in fractions of the frame width and
    y, h of its height; else pixels."""

    boxes: list[tuple[float, float, float, float]]
    frames: list[int] | None
    relative: bool

    def per_frame(self, n: int, width: int, height: int) -> list[Box | None]:
        """`n` frames' boxes in pixels (frames after the last given box keep it; before the first, too)."""
        sx, sy = (width, height) if self.relative else (1, 1)
        px = [Box(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in self.boxes]
        if self.frames is None:
            return [px[0]] * n
        at = dict(zip(self.frames, px))
        if len(at) == n and all(i in at for i in range(n)):
            return [at[i] for i in range(n)]
        return [at.get(i) for i in range(n)]  # gaps are interpolated by track_from_boxes


def _relative(rows: list[tuple[float, float, float, float]]) -> bool:
    # A pixel box has a width of at least a few pixels: all four values within [0, 1] means fractions.
    return all(0.0 <= v <= 1.0 for r in rows for v in r)


def _read_voxceleb_txt(path: Path) -> UserBoxes:
    frames, rows = [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            try:
                f, *xywh = int(parts[0]), *map(float, parts[1:])
            except ValueError:
                continue  # the "FRAME X Y W H" header
            frames.append(f)
            rows.append(tuple(xywh))
    if not rows:
        raise ValueError(f"{path}: no 'FRAME X Y W H' rows")
    first = frames[0]
    return UserBoxes(rows, [f - first for f in frames], _relative(rows))  # type: ignore[arg-type]


def load_boxes(path: str | Path) -> dict[str, UserBoxes]:
    """User boxes by clip: keys are an input's key (`0000003-name`), its source path, or its file name
    without extension (tried in that order by `boxes_for`).

    Formats (coordinates are fractions of the frame if every value in a clip is within [0, 1], else
    pixels of the source frame; x, y the top-left corner):
    * CSV with header `key,x,y,w,h` and optionally `frame` (0-based output frame; rows without a frame
      give the whole clip one box).
    * JSON object: key -> [x, y, w, h] (whole clip) or key -> [[x, y, w, h], ...] (one per frame), or
      key -> {"frames": [...], "boxes": [[x, y, w, h], ...]}.
    * A VoxCeleb txt track (header lines, then `FRAME X Y W H` rows in fractions of the frame; frame
      numbers are counted from the first row), or a folder of them: each is keyed by its path inside
      the folder without extension (`id00017/_mjZ87sK6cA/00001`) and each shorter tail of it
      (`_mjZ87sK6cA/00001`, `00001`), matched against the tail of the source's path.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--boxes {path}: no such file or folder")
    out: dict[str, UserBoxes] = {}
    if path.is_dir():
        for txt in sorted(path.rglob("*.txt")):
            parts = txt.relative_to(path).with_suffix("").parts
            track = _read_voxceleb_txt(txt)
            for k in range(len(parts)):
                out.setdefault("/".join(parts[k:]), track)
        if not out:
            raise ValueError(f"--boxes {path}: no .txt tracks in the folder")
        return out
    if path.suffix.lower() == ".txt":
        return {path.stem: _read_voxceleb_txt(path)}
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"--boxes {path}: expected an object of key -> box(es)")
        for key, val in data.items():
            frames = None
            if isinstance(val, dict):
                frames, val = [int(f) for f in val["frames"]], val["boxes"]
            rows = [tuple(map(float, val))] if val and not isinstance(val[0], list) \
                else [tuple(map(float, r)) for r in val]
            if frames is None and len(rows) > 1:
                frames = list(range(len(rows)))
            if not rows or any(len(r) != 4 for r in rows):
                raise ValueError(f"--boxes {path}: {key}: boxes are [x, y, w, h]")
            out[key] = UserBoxes(rows, frames, _relative(rows))  # type: ignore[arg-type]
        return out
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"key", "x", "y", "w", "h"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"--boxes {path}: CSV lacks columns {sorted(missing)}")
        grouped: dict[str, list[tuple[int | None, tuple[float, ...]]]] = {}
        for row in reader:
            frame = row.get("frame") or None
            grouped.setdefault(row["key"], []).append(
                (int(frame) if frame is not None else None, tuple(float(row[c]) for c in "xywh")))
    for key, items in grouped.items():
        rows = [r for _, r in items]
        frames = None if all(f is None for f, _ in items) else [int(f or 0) for f, _ in items]
        out[key] = UserBoxes(rows, frames, _relative(rows))  # type: ignore[arg-type]
    return out


def boxes_for(table: dict[str, UserBoxes], key: str, source_path: str) -> UserBoxes | None:
    """The boxes for one input: by key, by source path, then by the longest matching path tail."""
    if key in table:
        return table[key]
    if source_path in table:
        return table[source_path]
    parts = Path(source_path).with_suffix("").parts
    for k in range(max(0, len(parts) - 3), len(parts)):
        tail = "/".join(parts[k:])
        if tail in table:
            return table[tail]
    return None
