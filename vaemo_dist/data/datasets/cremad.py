"""CREMA-D: 7,442 clips of 91 actors (1001-1091) saying 12 sentences in 6 emotions.

Layout (as distributed, github.com/CheyneyComputerScience/CREMA-D): `VideoFlash/<clip>.flv` (or
`VideoMP4/<clip>.mp4`, option `video_dir`) and `AudioWAV/<clip>.wav`, where the clip id is
`<actor>_<sentence>_<emotion>_<level>` (e.g. `1001_DFA_ANG_XX`; level HI, MD, LO or XX). The video's
audio is taken from AudioWAV (as HiCMAE's preprocessing does); a clip without its wav is skipped as
no_audio. Classes (label order): ANG, DIS, FEA, HAP, NEU, SAD. Speaker: the actor id.

Folds: 5 subject-independent folds by actor, the assignment HiCMAE's preprocess/creamd_av.py makes:
actor index a = actor - 1001; fold k (1..5) tests actors 18(k-1) <= a < 18k, and fold 5 also takes the
last actor (1073-1091, 19 actors). Each clip is in exactly one test fold.

Known broken clips (`BROKEN`), skipped as known_broken: the four that HiCMAE's preprocessing
(preprocess/creamd_av.py) leaves out, citing the CREMA-D repository. What is wrong with each was not
verified here (no copy of the corpus); 1076_MTI_SAD_XX is commonly reported to have no usable audio.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vaemo_dist.data.datasets.base import Dataset, DatasetError, Listing

NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
FIRST_ACTOR, ACTORS, ACTORS_PER_FOLD, FOLDS = 1001, 91, 18, 5
BROKEN = {
    "1076_MTI_SAD_XX": "known broken: reported to have no usable audio (listed by HiCMAE from the CREMA-D "
                       "notes)",
    "1076_MTI_NEU_XX": "known broken: listed by HiCMAE from the CREMA-D notes (defect not verified here)",
    "1064_TIE_SAD_XX": "known broken: listed by HiCMAE from the CREMA-D notes (defect not verified here)",
    "1064_IEO_DIS_MD": "known broken: listed by HiCMAE from the CREMA-D notes (defect not verified here)",
}
VIDEO_DIRS = ("VideoFlash", "VideoMP4")


def actor_fold(actor: int) -> str:
    """The test fold ("1".."5") of a CREMA-D actor (1001-1091)."""
    if not FIRST_ACTOR <= actor < FIRST_ACTOR + ACTORS:
        raise ValueError(f"CREMA-D actor {actor} outside {FIRST_ACTOR}-{FIRST_ACTOR + ACTORS - 1}")
    return str(min((actor - FIRST_ACTOR) // ACTORS_PER_FOLD, FOLDS - 1) + 1)


class CremaD(Dataset):
    name = "cremad"
    class_names = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
    num_folds = FOLDS
    protocol = ("5 subject-independent folds by actor (HiCMAE): fold k tests actors 1001+18(k-1) .. "
                "1001+18k-1, fold 5 up to 1091")
    options = ("video_dir",)

    def speaker_of(self, clip_id: str) -> str:
        return clip_id.split("_")[0] if NAME.match(clip_id) else ""

    def _list(self, root: Path, video_dir: str = "", **_: Any) -> Listing:
        dirs = [root / video_dir] if video_dir else [root / d for d in VIDEO_DIRS if (root / d).is_dir()]
        if not dirs or not dirs[0].is_dir():
            raise DatasetError(f"cremad: no {' or '.join(VIDEO_DIRS)} folder under {root}")
        audio_dir = root / "AudioWAV"
        listing = Listing()
        for video in sorted(p for p in dirs[0].iterdir() if p.is_file()):
            clip_id = video.stem
            match = NAME.match(clip_id)
            if not match:
                listing.skip(video, f"unparsable: not <actor>_<sentence>_<emotion>_<level>: {video.name}",
                             "unparsable")
                continue
            actor, sentence, emotion, level = match.groups()
            if emotion not in self.class_names or not FIRST_ACTOR <= int(actor) < FIRST_ACTOR + ACTORS:
                listing.skip(video, f"unparsable: unknown emotion or actor in {video.name}", "unparsable")
                continue
            if clip_id in BROKEN:
                listing.skip(video, BROKEN[clip_id], "known_broken")
                continue
            wav = audio_dir / f"{clip_id}.wav"
            if not wav.is_file():
                listing.skip(video, f"no audio: {wav} not found", "no_audio")
                continue
            listing.inputs.append(self.clip(clip_id, video, label=emotion, speaker=actor,
                                            fold=actor_fold(int(actor)), audio=wav, actor=actor,
                                            sentence=sentence, emotion=emotion, level=level))
        return listing
