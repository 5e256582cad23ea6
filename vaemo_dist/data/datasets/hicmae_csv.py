"""HiCMAE's data lists, so existing HiCMAE lists work unchanged.

A list (what HiCMAE's preprocess/*.py write with pandas `to_csv(header=None, sep=' ')`) has one clip
per line: `<video> <audio> <label index>`, separated by a space, no header; `<video>` a face-frame
folder (HiCMAE's `face_aligned/<clip>`, `data/frames/<clip>`) or a video file, `<audio>` a wav.
Relative paths are relative to the list's folder. The root is one list file, or a folder of HiCMAE's
split folders `split<NN>/{train,val,test}.csv` (e.g. `saved/data/crema-d/audio_visual`): every clip
of every list, once, with fold = the NN of the split whose test.csv names it (HiCMAE's folds).

Options: `classes` = a dataset name (cremad, ravdess, mafw, dfew: its class names in HiCMAE's label
order, which the adapters share, and its speaker from the clip name where the naming has one) or a
comma list of class names; without it labels stay the integer indices as text. `fps` = the frame
folders' rate (default 25).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vaemo_dist.data.datasets.base import Dataset, DatasetError, Listing
from vaemo_dist.data.frames import is_frame_folder

SPLIT_DIR = re.compile(r"^split0*(\d+)$")


def read_list(path: Path) -> list[tuple[str, str, str]]:
    """(video, audio, label index) per line of a HiCMAE list, paths made absolute."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3 or not fields[2].lstrip("-").isdigit():
            raise DatasetError(f"hicmae-csv: {path}:{n}: expected '<frames folder> <wav> <label index>', "
                               f"got {line!r}")
        video, audio = (str(f if Path(f).is_absolute() else path.parent / f) for f in fields[:2])
        rows.append((video, audio, fields[2]))
    return rows


class HicmaeCsv(Dataset):
    name = "hicmae-csv"
    class_names: tuple[str, ...] = ()
    options = ("classes", "fps")

    def __init__(self, class_names: tuple[str, ...] = (), base: Dataset | None = None) -> None:
        self.class_names, self.base = class_names, base

    def _list(self, root: Path, classes: str = "", fps: Any = 0.0, **_: Any) -> Listing:
        from vaemo_dist.data.datasets import DATASETS  # the registry imports this module

        base = DATASETS.get(classes) if classes else None
        names: tuple[str, ...] = ()
        if base is not None:
            names = base.class_names
        elif classes:
            names = tuple(c.strip() for c in classes.split(",") if c.strip())
        self.class_names, self.base = names, base  # what manifest_entry and vaemo-shard record
        lists: list[tuple[str, Path]] = []
        if root.is_file():
            lists = [("", root)]
        else:
            for path in sorted(root.glob("*/*.csv")):
                match = SPLIT_DIR.match(path.parent.name)
                if match:
                    lists.append((str(int(match.group(1))) if path.stem == "test" else "", path))
            if not lists:
                raise DatasetError(f"hicmae-csv: {root} is neither a list file nor a folder of "
                                   "split<NN>/*.csv")
        clips: dict[tuple[str, str], dict[str, str]] = {}
        for fold, path in lists:
            for video, audio, label in read_list(path):
                clip = clips.setdefault((video, audio), {"label": label, "fold": ""})
                if clip["label"] != label:
                    raise DatasetError(f"hicmae-csv: {video} has labels {clip['label']} and {label} ({path})")
                if fold:
                    if clip["fold"] and clip["fold"] != fold:
                        raise DatasetError(f"hicmae-csv: {video} is in the test sets of splits "
                                           f"{clip['fold']} and {fold}")
                    clip["fold"] = fold
        listing = Listing()
        rate = float(fps or 0.0)
        for (video, audio), clip in sorted(clips.items()):
            index = int(clip["label"])
            if names and not 0 <= index < len(names):
                raise DatasetError(f"hicmae-csv: label {index} of {video} is outside the {len(names)} "
                                   "classes")
            if not (is_frame_folder(video) or Path(video).is_file()):
                listing.skip(video, "missing: no frame folder or video file at this path", "missing")
                continue
            if not Path(audio).is_file():
                listing.skip(video, f"no audio: {audio} not found", "no_audio")
                continue
            clip_id = "/".join(Path(video).parts[-2:])
            label = names[index] if names else clip["label"]
            speaker = base.speaker_of(Path(video).name) if base is not None else ""
            listing.inputs.append(self.clip(clip_id, video, label=label, speaker=speaker, fold=clip["fold"],
                                            audio=audio, fps=rate if Path(video).is_dir() else 0.0,
                                            label_index=clip["label"]))
        return listing
