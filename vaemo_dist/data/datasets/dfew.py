"""DFEW: 16,372 in-the-wild clips; 11,697 single-labelled into 7 classes, with the official 5 folds.

Layout (the release; HiCMAE's DFEW preprocessing reads it): `EmoLabel_DataSplit/{train,test}
(single-labeled)/set_<N>.csv`, a header row `video_name,label`, video_name the clip number (1, 2,
...) and label 1..7; clips as video files below the root named by the number (`00001.mp4` or
`1.mp4`: numbers compare by value), or frame folders `Clip/clip_224x224/<00001>/*.jpg` with a
separate audio file of the same number. Verified against HiCMAE's script and other users' loaders
(column names, the `(single-labeled)` folder names, label - 1 = index); the clip folder names of the
release were not, hence the search by number below the root.

Classes (label order = label 1..7): happy, sad, neutral, angry, surprise, disgust, fear. Speaker:
not given (empty). Folds: the official 5; a clip's fold is the set whose test list names it (checked
to partition). Clips without audio are skipped as no_audio (option probe_audio, default on), listed
clips not on disk as missing, video files in no list (DFEW's multi-label clips) as unlabelled.
"""

from __future__ import annotations

import csv
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

CLASSES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")


def read_set_csv(path: Path) -> dict[str, str]:
    """clip number (as text, no leading zeros) -> class name, from one `set_N.csv`."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if "video_name" not in fields or "label" not in fields:
            raise DatasetError(f"dfew: {path}: expected a header 'video_name,label', got {reader.fieldnames}")
        clips = {}
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            name, label = row["video_name"], row["label"]
            if not label.isdigit() or not 1 <= int(label) <= len(CLASSES):
                raise DatasetError(f"dfew: {path}: label {label!r} of clip {name} is not 1..{len(CLASSES)}")
            clips[normal_name(Path(name).stem)] = CLASSES[int(label) - 1]
    return clips


def find_split_dir(root: Path, split_dir: str = "") -> Path:
    if split_dir:
        return root / split_dir
    found = sorted(p.parent.parent for p in root.rglob("set_*.csv")
                   if p.parent.name == "test(single-labeled)")
    if not found:
        raise DatasetError(f"dfew: no EmoLabel_DataSplit/test(single-labeled)/set_N.csv under {root}")
    return found[0]


class Dfew(Dataset):
    name = "dfew"
    class_names = CLASSES
    num_folds = 5
    protocol = "the official 5 folds (EmoLabel_DataSplit/{train,test}(single-labeled)/set_N.csv)"
    options = ("split_dir", "probe_audio")

    def _list(self, root: Path, split_dir: str = "", probe_audio: Any = True, **_: Any) -> Listing:
        sets = find_split_dir(root, split_dir)
        tests = {p.stem.split("_", 1)[1]: read_set_csv(p)
                 for p in sorted((sets / "test(single-labeled)").glob("set_*.csv"))}
        trains = {p.stem.split("_", 1)[1]: read_set_csv(p)
                  for p in sorted((sets / "train(single-labeled)").glob("set_*.csv"))}
        labels, folds = assign_folds(tests, trains, self.name)
        index = index_media(root)
        listing = Listing()
        for name in sorted(labels, key=lambda n: (len(n), n)):
            clip_id = f"{int(name):05d}" if name.isdigit() else name  # the release's 5-digit id
            labelled_clip(self, listing, index, clip_id, labels[name], folds[name], sets.name,
                          as_bool(probe_audio))
        for key, videos in sorted(index.videos.items()):
            if key not in labels:
                listing.skip(videos[0], f"unlabelled: {videos[0].name} is in no single-labelled fold list",
                             "unlabelled")
        return listing
