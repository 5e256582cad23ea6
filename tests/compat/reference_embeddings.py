"""The embeddings an export gives for fixed random inputs: `python reference_embeddings.py EXPORT OUT`
writes them; the compat test computes the same with today's code and compares."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

import vaemo_dist


def fixed_inputs(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    v, a = inputs["video"], inputs["audio"]
    gen = torch.Generator().manual_seed(7)
    video = torch.randn(2, 3, v["frames"], v["size"], v["size"], generator=gen)
    audio = torch.randn(2, 1, a["frames"], a["n_mels"], generator=gen)
    return video, audio


def embeddings(export: str) -> dict[str, torch.Tensor]:
    enc = vaemo_dist.from_pretrained(export)
    cfg = enc.config
    video, audio = fixed_inputs(cfg["inputs"])
    out = enc.encode(video=video, audio=audio)
    return {k: v.contiguous() for k, v in vars(out).items() if isinstance(v, torch.Tensor)}


if __name__ == "__main__":
    save_file(embeddings(sys.argv[1]), sys.argv[2])
