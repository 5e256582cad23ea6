"""Shared data fixtures: tiny synthetic corpora built once per test session.

The Triton kernels run on CPU tensors through the Triton interpreter (tests/kernels). TRITON_INTERPRET
must be set before `triton.language` is first imported, because its own @jit helpers (tl.zeros,
tl.full, ...) are built interpreted or compiled at that moment; torch._dynamo, sentence-transformers
and megatron-core all import it, and test modules that import those are collected before
tests/kernels. So it is set here, in the first conftest pytest loads, ahead of every import (spawned
workers inherit it). Only the Triton kernels read it.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vaemo_dist.config import SynthConfig  # noqa: E402
from vaemo_dist.data.synth import build_corpus  # noqa: E402

# 12 clips of 3 classes (4 each) in shards of 5, 5 and 2; small frames keep the build ~0.5 s.
TINY_CORPUS = SynthConfig(clips=12, clips_per_shard=5, classes=3, size=64, duration=3.2, seed=7)
TINY_CORPUS_VP9 = SynthConfig(clips=2, clips_per_shard=2, classes=2, size=64, duration=3.2, seed=3,
                              codec="vp9")


@pytest.fixture(scope="session")
def tiny_corpus_config() -> SynthConfig:
    return TINY_CORPUS


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(TINY_CORPUS, tmp_path_factory.mktemp("tiny-corpus"), progress=False)


@pytest.fixture(scope="session")
def tiny_corpus_vp9(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(TINY_CORPUS_VP9, tmp_path_factory.mktemp("tiny-corpus-vp9"), progress=False)
