"""VoxCeleb2: talking-head clips of 6,112 celebrities, for pretraining (no labels, no folds).

Layout (the release, and HiCMAE's preprocess/voxceleb2.py): `<split>/mp4/<speaker id>/<youtube id>/
<nnnnn>.mp4` (split dev or test), with the audio also released as a parallel tree
`<split>/aac/<speaker id>/<youtube id>/<nnnnn>.m4a`. The root may be the folder holding the splits,
one split, or its `mp4` folder. Speaker: the id folder (e.g. id00012).

Option `audio`: `auto` (default: the parallel .m4a where present, else the mp4's own track), `mp4`
(always the mp4's track) or `aac` (always the .m4a; a clip without it is skipped as no_audio).
An mp4 not at `<id>/<youtube id>/<nnnnn>.mp4` below an `mp4` folder is skipped as unparsable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vaemo_dist.data.datasets.base import Dataset, DatasetError, Listing

SPEAKER = re.compile(r"^id\d+$")


class VoxCeleb2(Dataset):
    name = "voxceleb2"
    class_names = ()
    options = ("audio",)

    def _list(self, root: Path, audio: str = "auto", **_: Any) -> Listing:
        if audio not in ("auto", "mp4", "aac"):
            raise DatasetError(f"voxceleb2: audio must be auto, mp4 or aac, got {audio!r}")
        videos = sorted(p for p in root.rglob("*.mp4") if p.is_file())
        if not videos:
            raise DatasetError(f"voxceleb2: no mp4 files under {root}")
        listing = Listing()
        for video in videos:
            parts = video.parts
            if len(parts) < 4 or parts[-4] != "mp4" or not SPEAKER.match(parts[-3]) \
                    or not video.stem.isdigit():
                listing.skip(video, "unparsable: not <split>/mp4/<id>/<youtube id>/<nnnnn>.mp4", "unparsable")
                continue
            speaker, youtube, utterance = parts[-3], parts[-2], video.stem
            split = parts[-5] if len(parts) >= 5 else ""
            m4a = Path(*parts[:-4], "aac", speaker, youtube, f"{utterance}.m4a")
            track = ""
            if audio == "aac" or (audio == "auto" and m4a.is_file()):
                if not m4a.is_file():
                    listing.skip(video, f"no audio: {m4a} not found (audio=aac)", "no_audio")
                    continue
                track = str(m4a)
            clip_id = "/".join(p for p in (split, speaker, youtube, utterance) if p)
            listing.inputs.append(self.clip(clip_id, video, speaker=speaker, audio=track, vox_split=split,
                                            speaker_id=speaker, youtube_id=youtube, utterance=utterance))
        return listing
