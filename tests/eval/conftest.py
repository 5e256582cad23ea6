"""Fixtures for the downstream tests: a small random export and clips as plain files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vaemo_dist.config import load_config
from vaemo_dist.data.shards import expand_shards, read_shard
from vaemo_dist.export import is_decoder_key, save_pretrained
from vaemo_dist.model.vaemo import VAEmoModel

# 4 frames of 32 px (8 video tokens), 32 x 128 log-mel (16 audio tokens), one block: fast on CPU.
TINY_MODEL = ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32", "model.depth=1",
              "model.decoder_depth=1"]


def make_export(folder: Path, seed: int = 0) -> Path:
    cfg = load_config(None, TINY_MODEL)
    torch.manual_seed(seed)
    model = VAEmoModel(cfg.model, cfg.inputs)
    weights = {k: v for k, v in model.state_dict().items() if not is_decoder_key(k)}
    return save_pretrained(folder, weights, cfg, source={"note": "random test model"})


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"))


def extract_clips(corpus: Path, out: Path) -> list[str]:
    """Write every sample of a shard corpus as <key>.mp4 + <key>.flac + <key>.json files."""
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    for url in expand_shards(str(corpus)):
        for sample in read_shard(url):
            key = sample["__key__"]
            for field in ("mp4", "flac", "json"):
                (out / f"{key}.{field}").write_bytes(sample[field])
            keys.append(key)
    return keys


@pytest.fixture(scope="session")
def clip_files(tiny_corpus, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    extract_clips(tiny_corpus, folder)
    return folder


# 4 speakers x 3 classes x 2 clips: a user's labelled corpus with a speaker column, as files + CSV.
SPEAKERS, CLASSES = ("ann", "bob", "cyd", "dee"), ("angry", "happy", "sad")


@pytest.fixture(scope="session")
def speaker_clips(tmp_path_factory) -> Path:
    """`clips.csv` (path,label,speaker) and its mp4 files (H.264 + AAC), class-dependent content."""
    from media_helpers import mp4_with_aac

    folder = tmp_path_factory.mktemp("speaker-clips")
    rows = ["path,label,speaker"]
    for s, speaker in enumerate(SPEAKERS):
        for c, name in enumerate(CLASSES):
            for take in range(2):
                file = f"{speaker}_{name}_{take}.mp4"
                (folder / file).write_bytes(mp4_with_aac(label=c, frames=40 + 4 * s + take))
                rows.append(f"{file},{name},{speaker}")
    (folder / "clips.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="session")
def speaker_shards(speaker_clips, tmp_path_factory) -> Path:
    """The same corpus through vaemo-shard (stream-copied, 3 shards): json label/class_name/speaker."""
    from vaemo_dist.data.sources import media_inputs
    from vaemo_dist.data.writer import ShardOptions, write_shards

    out = tmp_path_factory.mktemp("speaker-shards") / "shards"
    write_shards(media_inputs(str(speaker_clips / "clips.csv")), str(out),
                 ShardOptions(size=64, clips_per_shard=10), progress=False)
    return out


@pytest.fixture(scope="session")
def unlabelled_shards(speaker_clips, tmp_path_factory) -> Path:
    """Three clips through vaemo-shard from a CSV without labels."""
    from vaemo_dist.data.sources import media_inputs
    from vaemo_dist.data.writer import ShardOptions, write_shards

    csv = speaker_clips / "unlabelled.csv"
    csv.write_text("path,speaker\nann_angry_0.mp4,ann\nbob_happy_0.mp4,bob\ncyd_sad_0.mp4,cyd\n")
    out = tmp_path_factory.mktemp("unlabelled-shards") / "shards"
    write_shards(media_inputs(str(csv)), str(out), ShardOptions(size=64), progress=False)
    return out
