"""RAVDESS: 24 actors (01-24), file names of seven two-digit fields.

Layout (as distributed, zenodo.org/record/1188976): `Actor_NN/<modality>-<channel>-<emotion>-
<intensity>-<statement>-<repetition>-<actor>.mp4` (the video zips `Video_Speech_Actor_NN.zip` unpack
to `Actor_NN/`; any folder depth above `Actor_NN` is accepted). Modality 01 full audio-video, 02
video-only, 03 audio-only (the .wav files of `Audio_Speech_Actors_01-24`); channel 01 speech, 02 song.
Default: audio-visual speech (modality 01, channel 01), audio from the file's own track. Option
`modality=02` takes the video-only files with the audio of the matching audio-only `03-...wav` (the
pairing HiCMAE's lists use); `channel=02` the song files. Files of other modalities/channels are
listed as skipped (kind excluded).

Classes (label order = emotion codes 01-08): neutral, calm, happy, sad, angry, fearful, disgust,
surprised. Speaker: the actor ("01".."24").

Folds: 6 subject-independent folds of 4 consecutive actors (fold k tests actors 4(k-1)+1 .. 4k), as in
HiCMAE's published lists (saved/data/ravdess/audio_visual/split01 tests Actor_01-04, split06
Actor_21-24).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vaemo_dist.data.datasets.base import Dataset, DatasetError, Listing

NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
ACTORS_PER_FOLD, FOLDS = 4, 6
MODALITIES = {"01": "audio-video", "02": "video-only", "03": "audio-only"}
CHANNELS = {"01": "speech", "02": "song"}


def actor_fold(actor: int) -> str:
    """The test fold ("1".."6") of a RAVDESS actor (1-24)."""
    if not 1 <= actor <= ACTORS_PER_FOLD * FOLDS:
        raise ValueError(f"RAVDESS actor {actor} outside 1-24")
    return str((actor - 1) // ACTORS_PER_FOLD + 1)


class Ravdess(Dataset):
    name = "ravdess"
    class_names = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
    num_folds = FOLDS
    protocol = "6 subject-independent folds of 4 consecutive actors (fold k tests actors 4k-3 .. 4k)"
    options = ("modality", "channel")

    def speaker_of(self, clip_id: str) -> str:
        match = NAME.match(clip_id)
        return match.group(7) if match else ""

    def _list(self, root: Path, modality: str = "01", channel: str = "01", **_: Any) -> Listing:
        modality, channel = f"{int(modality):02d}", f"{int(channel):02d}"
        if modality not in ("01", "02") or channel not in CHANNELS:
            raise DatasetError(f"ravdess: modality must be 01 or 02 and channel 01 or 02, got {modality}, "
                               f"{channel}")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".mp4", ".wav")
                       and re.fullmatch(r"Actor_\d{2}", p.parent.name))
        if not files:
            raise DatasetError(f"ravdess: no Actor_NN/*.mp4 under {root}")
        wavs = {p.stem: p for p in files if p.suffix.lower() == ".wav"}
        listing = Listing()
        for path in files:
            match = NAME.match(path.stem)
            if not match:
                listing.skip(path, f"unparsable: not seven two-digit fields: {path.name}", "unparsable")
                continue
            mod, chan, emotion, intensity, statement, repetition, actor = match.groups()
            if (mod, path.suffix.lower()) == ("03", ".wav") and modality == "02":
                continue  # the audio of a video-only clip, used below
            if mod != modality or chan != channel:
                listing.skip(path, f"excluded: {MODALITIES.get(mod, mod)} {CHANNELS.get(chan, chan)} "
                             f"(selected modality {modality}, channel {channel})", "excluded")
                continue
            if not (1 <= int(emotion) <= 8 and 1 <= int(actor) <= 24) or path.parent.name != f"Actor_{actor}":
                listing.skip(path, f"unparsable: emotion or actor out of range in {path}", "unparsable")
                continue
            audio = ""
            if modality == "02":
                audio_id = "03" + path.stem[2:]
                if audio_id not in wavs:
                    listing.skip(path, f"no audio: no {audio_id}.wav for this video-only clip", "no_audio")
                    continue
                audio = wavs[audio_id]
            listing.inputs.append(self.clip(
                path.stem, path, label=self.class_names[int(emotion) - 1], speaker=actor,
                fold=actor_fold(int(actor)), audio=audio, actor=actor, modality=mod, vocal_channel=chan,
                emotion=emotion, intensity=intensity, statement=statement, repetition=repetition))
        return listing
