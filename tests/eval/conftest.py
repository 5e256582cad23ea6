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
