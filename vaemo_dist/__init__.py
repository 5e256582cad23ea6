"""vaemo_dist: distributed pretraining of audio-visual emotion representations (VAEmo)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Encoder", "Predictor", "from_pretrained"]


def __getattr__(name: str) -> Any:
    # Lazy: `import vaemo_dist` stays light (no torch, no PyAV) until the embedding API is used.
    if name in ("from_pretrained", "Encoder"):
        from vaemo_dist import pretrained

        return getattr(pretrained, name)
    if name == "Predictor":  # what from_pretrained gives for a classifier folder (probe / fine-tuning)
        from vaemo_dist.eval import predict

        return predict.Predictor
    raise AttributeError(f"module 'vaemo_dist' has no attribute {name!r}")
