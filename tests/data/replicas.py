"""Miniature replicas of the emotion corpora, in their distributed layouts, from media made here.

Each `make_<corpus>(root, ...) -> root` writes tiny clips (32x32, about 1.2 s, H.264 + AAC made with
PyAV; wavs at 16 kHz), named and laid out as the corpus is, with its label and fold files in their
official formats, plus the odd cases its adapter must report (vaemo_dist/data/datasets). No real data.
Used by tests/data/test_datasets.py, and by downstream tests that need a labelled corpus with folds
(e.g. `make_cremad(tmp) ` then `vaemo-shard --dataset cremad tmp --out shards`).

    make_cremad       VideoFlash/*.flv + AudioWAV/*.wav; actors 1001, 1019, 1037, 1055, 1091 (one per
                      fold) x 6 emotions; plus 1076_MTI_SAD_XX (on the broken list, empty wav), a clip
                      without its wav, a file with an unparsable name
    make_ravdess      Video_Speech_Actor_NN/Actor_NN/01-01-EE-01-01-01-NN.mp4 for one actor per fold x 8
                      emotions; a song file, two video-only (02) files of actor 01 and the audio-only
                      (03) wav of one of them
    make_mafw         data/clips/NNNNN.mp4, 2 per class (22), Train & Test Set/single/no_caption/set_N/
                      {train,test}.txt; a clip without audio, one frame folder + wav (data/frames,
                      data/audio_16k), a listed clip not on disk, a clip in no list
    make_dfew         Clip/original/NNNNN.mp4, 2 per class (14), EmoLabel_DataSplit/{train,test}
                      (single-labeled)/set_N.csv; a clip without audio, a clip in no list
    make_voxceleb2    dev/mp4/<id>/<yt>/NNNNN.mp4 for 3 speakers; dev/aac/... .m4a for some; a stray mp4
    make_hicmae_lists CREMA-D-named face-frame folders + wavs and HiCMAE's split0N/{train,test}.csv lists

`FOLD_OF` helpers are not exported on purpose: tests read the fold files back themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vaemo_dist.data.synth import write_media_file

SIZE, SECONDS, RATE = 32, 1.2, 16000

CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
CREMAD_ACTORS = (1001, 1019, 1037, 1055, 1091)  # one per fold (HiCMAE's rule), 1091 the 19th of fold 5
RAVDESS_ACTORS = (1, 6, 10, 14, 18, 23)  # one per fold of 4 actors
MAFW_CLASSES = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt",
                "anxiety", "helplessness", "disappointment")


def clip(path: Path, *, audio: bool = True, seed: int = 0, container: str | None = None) -> Path:
    """A tiny H.264 (+ AAC) clip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_media_file(path, seconds=SECONDS, fps=25, width=SIZE, height=SIZE,
                            audio="aac" if audio else None, audio_rate=RATE, channels=1, container=container,
                            seed=seed)


def wav(path: Path, seconds: float = SECONDS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_media_file(path, seconds=seconds, video=None, audio="pcm_s16le", audio_rate=RATE, channels=1,
                            container="wav")


def m4a(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_media_file(path, seconds=SECONDS, video=None, audio="aac", audio_rate=RATE, channels=1,
                            container="mp4")


def frame_folder(path: Path, frames: int = 12, seed: int = 0) -> Path:
    """`frames` numbered JPEG frames (000001.jpg ...), a moving bar on a flat colour."""
    path.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(seed).integers(0, 255, size=3)
    for i in range(frames):
        img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
        img[:] = (base + 5 * i) % 255
        img[:, (2 * i) % SIZE:, 1] = 200
        Image.fromarray(img).save(path / f"{i + 1:06d}.jpg", quality=90)
    return path


def make_cremad(root: str | Path, actors: tuple[int, ...] = CREMAD_ACTORS,
                emotions: tuple[str, ...] = CREMAD_EMOTIONS) -> Path:
    """CREMA-D: `<actor>_DFA_<emotion>_XX` clips (.flv) with their wavs, plus the odd cases."""
    root = Path(root)
    for i, actor in enumerate(actors):
        for j, emotion in enumerate(emotions):
            name = f"{actor}_DFA_{emotion}_XX"
            clip(root / "VideoFlash" / f"{name}.flv", container="flv", seed=i * 10 + j)
            wav(root / "AudioWAV" / f"{name}.wav")
    clip(root / "VideoFlash" / "1076_MTI_SAD_XX.flv", container="flv")  # on the broken list
    (root / "AudioWAV" / "1076_MTI_SAD_XX.wav").write_bytes(b"")
    clip(root / "VideoFlash" / "1002_IEO_HAP_HI.flv", container="flv")  # its wav is missing
    clip(root / "VideoFlash" / "notes_copy.flv", container="flv")  # not a CREMA-D name
    return root


def make_ravdess(root: str | Path, actors: tuple[int, ...] = RAVDESS_ACTORS) -> Path:
    """RAVDESS: audio-visual speech files (modality 01), 8 emotions per actor, plus the odd cases."""
    root = Path(root)
    for actor in actors:
        folder = root / f"Video_Speech_Actor_{actor:02d}" / f"Actor_{actor:02d}"
        for emotion in range(1, 9):
            clip(folder / f"01-01-{emotion:02d}-01-01-01-{actor:02d}.mp4", seed=actor * 10 + emotion)
    first = root / f"Video_Speech_Actor_{actors[0]:02d}" / f"Actor_{actors[0]:02d}"
    clip(first / f"01-02-03-01-01-01-{actors[0]:02d}.mp4")  # song: excluded by default
    clip(first / f"02-01-03-01-01-01-{actors[0]:02d}.mp4", audio=False)  # video-only ...
    audio_only = root / "Audio_Speech_Actors_01-24" / f"Actor_{actors[0]:02d}"
    wav(audio_only / f"03-01-03-01-01-01-{actors[0]:02d}.wav")
    clip(first / f"02-01-04-01-01-01-{actors[0]:02d}.mp4", audio=False)  # ... this one without its 03 wav
    return root


def _folds(n: int, folds: int = 5) -> list[str]:
    return [str(i % folds + 1) for i in range(n)]


def make_mafw(root: str | Path, per_class: int = 2) -> Path:
    """MAFW: clips 00001.. (2 per class) with the official single-label fold lists, plus odd cases.

    Clip 00003 has no audio track; 00005 is a frame folder + wav; 00099 is listed but not on disk;
    00100 is on disk but in no list."""
    root = Path(root)
    names = [f"{i + 1:05d}" for i in range(per_class * len(MAFW_CLASSES))] + ["00099"]
    labels = {n: MAFW_CLASSES[i % len(MAFW_CLASSES)] for i, n in enumerate(names)}
    folds = dict(zip(names, _folds(len(names)), strict=True))
    for i, name in enumerate(names):
        if name == "00099":
            continue
        if name == "00005":
            frame_folder(root / "data" / "frames" / name, seed=i)
            wav(root / "data" / "audio_16k" / f"{name}.wav")
        else:
            clip(root / "data" / "clips" / f"{name}.mp4", audio=name != "00003", seed=i)
    clip(root / "data" / "clips" / "00100.mp4")
    sets = root / "Train & Test Set" / "single" / "no_caption"
    for fold in sorted(set(folds.values())):
        (sets / f"set_{fold}").mkdir(parents=True, exist_ok=True)
        for part, keep in (("test", True), ("train", False)):
            lines = [f"{n}.mp4 {labels[n]}\n" for n in names if (folds[n] == fold) == keep]
            (sets / f"set_{fold}" / f"{part}.txt").write_text("".join(lines))
    return root


DFEW_CLASSES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")


def make_dfew(root: str | Path, per_class: int = 2) -> Path:
    """DFEW: clips 00001.. (2 per class) with the official single-labelled fold CSVs, plus odd cases.

    Clip 00004 has no audio track; 00050 is on disk but in no list (a multi-label clip)."""
    root = Path(root)
    numbers = list(range(1, per_class * len(DFEW_CLASSES) + 1))
    labels = {n: (n - 1) % len(DFEW_CLASSES) + 1 for n in numbers}  # 1..7
    folds = dict(zip(numbers, _folds(len(numbers)), strict=True))
    for n in numbers + [50]:
        clip(root / "Clip" / "original" / f"{n:05d}.mp4", audio=n != 4, seed=n)
    split = root / "EmoLabel_DataSplit"
    for fold in sorted(set(folds.values())):
        for part, keep in (("test", True), ("train", False)):
            folder = split / f"{part}(single-labeled)"
            folder.mkdir(parents=True, exist_ok=True)
            rows = [f"{n},{labels[n]}\n" for n in numbers if (folds[n] == fold) == keep]
            (folder / f"set_{fold}.csv").write_text("video_name,label\n" + "".join(rows))
    return root


def make_voxceleb2(root: str | Path) -> Path:
    """VoxCeleb2 dev: 3 speakers x 2 clips; the .m4a tree for speaker id00012 only; a stray mp4."""
    root = Path(root)
    for s, (speaker, youtube) in enumerate((("id00012", "21Uxsk56VDQ"), ("id00015", "0fijmz4vTVU"),
                                            ("id01000", "_joJsjFkmdo"))):
        for u in (1, 2):
            clip(root / "dev" / "mp4" / speaker / youtube / f"{u:05d}.mp4", seed=s * 10 + u)
            if speaker == "id00012":
                m4a(root / "dev" / "aac" / speaker / youtube / f"{u:05d}.m4a")
    clip(root / "dev" / "mp4" / "stray.mp4")
    return root


def make_hicmae_lists(root: str | Path, actors: tuple[int, ...] = CREMAD_ACTORS[:3],
                      emotions: tuple[str, ...] = CREMAD_EMOTIONS[:3], fps: int = 10) -> Path:
    """HiCMAE's CREMA-D lists over face-frame folders (`face_aligned/<clip>/*.jpg`, 12 frames: 1.2 s at
    `fps`) and wavs, written as its preprocess/creamd_av.py does: `lists/split0N/{train,test}.csv`,
    lines `<frames folder> <wav> <label index>`, fold N testing actor index 18(N-1) .. 18N-1. Returns
    the folder of the split folders (`root/lists`)."""
    root = Path(root)
    rows = []
    for i, actor in enumerate(actors):
        for j, emotion in enumerate(emotions):
            name = f"{actor}_DFA_{emotion}_XX"
            frames = frame_folder(root / "face_aligned" / name, seed=i * 10 + j)
            audio = wav(root / "AudioWAV" / f"{name}.wav")
            fold = min((actor - 1001) // 18, 4) + 1
            rows.append((frames, audio, CREMAD_EMOTIONS.index(emotion), fold))
    for fold in range(1, 6):
        folder = root / "lists" / f"split{fold:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for part, keep in (("test", True), ("train", False)):
            lines = [f"{v} {a} {label}\n" for v, a, label, f in rows if (f == fold) == keep]
            (folder / f"{part}.csv").write_text("".join(lines))
    return root / "lists"
