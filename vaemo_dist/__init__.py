"""vaemo_dist: distributed pretraining of audio-visual emotion representations (VAEmo)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Encoder", "Predictor", "from_pretrained"]


def from_pretrained(folder: Any, device: Any = "cpu", dtype: Any = None, text_encoder: Any = None,
                    encoder: Any = None) -> Any:
    """Load what vaemo_dist saved for use: an export (vaemo-export) as an `Encoder` (embeddings, and for
    stage 2 `embed_text` / `zero_shot`), or a classifier folder (the `classifier/` a linear probe or a
    fine-tuning run saves) as a `Predictor` (`.predict(video=..., audio=...)`: class names and
    probabilities). A probe's classifier refers to its export by path and hash; `encoder` names that
    export where it has moved. `text_encoder` overrides a stage-2 export's frozen text encoder."""
    from pathlib import Path

    from vaemo_dist.checkpoints import CLASSIFIER_CONFIG

    if (Path(folder) / CLASSIFIER_CONFIG).is_file():
        from vaemo_dist.eval.predict import load_classifier

        return load_classifier(Path(folder), device=device, dtype=dtype, encoder=encoder)
    from vaemo_dist import pretrained

    return pretrained.from_pretrained(folder, device=device, dtype=dtype, text_encoder=text_encoder)


def __getattr__(name: str) -> Any:
    # Lazy: `import vaemo_dist` stays light (no torch, no PyAV) until the embedding API is used.
    if name == "Encoder":
        from vaemo_dist import pretrained

        return pretrained.Encoder
    if name == "Predictor":  # what from_pretrained gives for a classifier folder (probe / fine-tuning)
        from vaemo_dist.eval import predict

        return predict.Predictor
    raise AttributeError(f"module 'vaemo_dist' has no attribute {name!r}")
