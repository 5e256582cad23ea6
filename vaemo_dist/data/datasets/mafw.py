"""MAFW: 10,045 in-the-wild clips; single-label setting of 11 classes with the official 5 folds.

Layout (the release; HiCMAE's preprocess/mafw_av.py reads it): the fold lists
`Train & Test Set/single/no_caption/set_<N>/{train,test}.txt`, one clip per line, `<clip>.mp4 <class>`
separated by a space (e.g. `00025.mp4 anger`); the clips as video files anywhere below the root
(the release's `data/clips/<clip>.mp4`), or as frame folders `<...>/<clip>/*.jpg` with a separate
audio file `<clip>.wav` (HiCMAE's `data/frames` + `data/audio_16k`). Verified against HiCMAE's
script; the release's own folder names were not, so small variants are accepted: the lists are
found as `set_<N>/test.txt` in a folder named `single` (a `no_caption` one preferred; option
`split_dir`, relative to the root, names it), separated by spaces, tabs or a comma. `Labels/`
(xlsx) is not read: the fold lists carry the labels.

Classes (label order, HiCMAE's): anger, disgust, fear, happiness, neutral, sadness, surprise,
contempt, anxiety, helplessness, disappointment. Speaker: not given by MAFW (empty).
Folds: the official 5; a clip's fold is the set whose test list names it (the test lists partition
the corpus; checked: overlapping test sets or disagreeing labels raise DatasetError).
Clips without audio (about 21 in MAFW) are found by opening each video (option probe_audio, default
on) and skipped as no_audio; a listed clip not on disk is skipped as missing, a video file named in
no list as unlabelled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vaemo_dist.data.datasets.base import (
    Dataset,
    DatasetError,
    Listing,
    as_bool,
    assign_folds,
    index_media,
    labelled_clip,
    normal_name,
)


def read_set_file(path: Path) -> dict[str, str]:
    """clip name (without extension) -> class name, from one `set_N/{train,test}.txt`."""
    clips: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = [f for f in re.split(r"[\s,]+", line.strip()) if f]
        if not fields:
            continue
        if len(fields) != 2:
            raise DatasetError(f"mafw: {path}:{n}: expected '<clip>.mp4 <class>', got {line!r}")
        clips[Path(fields[0]).stem] = fields[1].lower()
    return clips


def find_split_dir(root: Path, split_dir: str = "") -> Path:
    if split_dir:
        return root / split_dir
    candidates = sorted({p.parent.parent for p in root.rglob("set_*/test.txt")
                         if "single" in p.relative_to(root).parts})
    if not candidates:
        raise DatasetError(f"mafw: no single-label fold lists (.../single/.../set_N/test.txt) under {root}")
    preferred = [c for c in candidates if "no_caption" in c.parts]
    return (preferred or candidates)[0]


class Mafw(Dataset):
    name = "mafw"
    class_names = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt",
                   "anxiety", "helplessness", "disappointment")
    num_folds = 5
    protocol = "the official 5 folds (single-label, Train & Test Set/single/no_caption/set_N)"
    options = ("split_dir", "probe_audio")

    def _list(self, root: Path, split_dir: str = "", probe_audio: Any = True, **_: Any) -> Listing:
        sets = find_split_dir(root, split_dir)
        tests, trains = {}, {}
        for fold_dir in sorted(sets.glob("set_*")):
            fold = fold_dir.name.split("_", 1)[1]
            if (fold_dir / "test.txt").is_file():
                tests[fold] = read_set_file(fold_dir / "test.txt")
            if (fold_dir / "train.txt").is_file():
                trains[fold] = read_set_file(fold_dir / "train.txt")
        if not tests:
            raise DatasetError(f"mafw: no set_N/test.txt in {sets}")
        labels, folds = assign_folds(tests, trains, self.name)
        unknown = sorted({v for v in labels.values() if v not in self.class_names})
        if unknown:
            raise DatasetError(f"mafw: classes {unknown} in {sets} are not MAFW's {list(self.class_names)}")
        index = index_media(root)
        listing = Listing()
        for name in sorted(labels):
            labelled_clip(self, listing, index, name, labels[name], folds[name], sets.name,
                          as_bool(probe_audio))
        listed = {normal_name(n) for n in labels}
        for key, videos in sorted(index.videos.items()):
            if key not in listed:
                listing.skip(videos[0], f"unlabelled: {videos[0].name} is in no fold list", "unlabelled")
        return listing
