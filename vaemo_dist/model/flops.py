"""Model accounting from shapes: parameters, training FLOPs per sample, MFU.

FLOPs count matrix multiplies (2 per multiply-add) as the model runs them: patch embedding of all
tokens, the encoder on the visible tokens only (per modality under `fusion: separate`), the decoder
on all tokens of both modalities ("full") or, "cross", its queries (the decoded share of the masked
patches) attending to the visible tokens, the heads. Training = 3x forward (backward is twice the forward).
Element-wise work (norms, softmax, GELU) is left out, as usual for MFU.

    vaemo-flops [--config configs/stage1/base.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from vaemo_dist.config import MODEL_PRESETS, Config, InputConfig, ModelConfig, load_config
from vaemo_dist.startup import entry_point

# Dense bf16 peak TFLOP/s per device (vendor figures, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(configured: float, device: torch.device) -> float:
    """The configured peak, else a known one for this GPU, else 0 (unknown: MFU is not logged)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return 0.0


def _block(n: int, d: int, hidden: int) -> int:
    """Forward FLOPs of one transformer block over n tokens of width d."""
    projections = n * (3 * d * d + d * d + 2 * d * hidden)
    attention = 2 * n * n * d  # scores and the weighted sum
    return 2 * (projections + attention)


def _cross_block(nq: int, nk: int, d: int, hidden: int) -> int:
    """Forward FLOPs of one cross-decoder block: nq queries of width d attending to nk memory tokens
    (query and output projections and the MLP on the queries, key/value projection on the memory)."""
    projections = nq * (2 * d * d + 2 * d * hidden) + nk * 2 * d * d
    attention = 2 * nq * nk * d  # scores and the weighted sum
    return 2 * (projections + attention)


@dataclass
class Accounting:
    params: int
    video_tokens: int
    audio_tokens: int
    visible_tokens: int
    forward_flops: int  # per sample

    @property
    def train_flops(self) -> int:
        return 3 * self.forward_flops

    @property
    def tokens(self) -> int:
        return self.video_tokens + self.audio_tokens


def count_params(model: ModelConfig, inputs: InputConfig) -> int:
    from vaemo_dist.model.vaemo import VAEmoModel

    with torch.device("meta"):  # shapes only, no memory
        return VAEmoModel(model, inputs).num_params()


def account(model: ModelConfig, inputs: InputConfig) -> Accounting:
    v, a = inputs.video, inputs.audio
    nv, na = math.prod(inputs.video_grid), math.prod(inputs.audio_grid)
    kv = max(1, round((1 - model.mask_ratio_video) * nv))
    ka = max(1, round((1 - model.mask_ratio_audio) * na))
    pv, pa = 3 * v.tubelet * v.patch * v.patch, a.patch * a.patch
    d, dd = model.dim, model.decoder_dim
    hidden, dec_hidden = int(d * model.mlp_ratio), int(dd * model.mlp_ratio)

    flops = 2 * (nv * pv * d + na * pa * d)  # patch embedding (all tokens)
    if model.fusion == "separate":
        flops += model.depth * (_block(kv, d, hidden) + _block(ka, d, hidden))
    else:
        flops += model.depth * _block(kv + ka, d, hidden)
    flops += 2 * 3 * d * model.embed_dim  # projection heads on pooled tokens
    flops += 2 * (kv + ka) * d * dd  # decoder embedding
    if model.decoder == "cross":
        from vaemo_dist.model.vaemo import decoded_count

        qv, qa = decoded_count(nv, kv, model.decode_fraction), decoded_count(na, ka, model.decode_fraction)
        flops += model.decoder_depth * _cross_block(qv + qa, kv + ka, dd, dec_hidden)
        flops += 2 * (qv * dd * pv + qa * dd * pa)  # reconstruction heads on the decoded patches
    else:
        flops += model.decoder_depth * _block(nv + na, dd, dec_hidden)
        flops += 2 * (nv * dd * pv + na * dd * pa)  # reconstruction heads
    return Accounting(count_params(model, inputs), nv, na, kv + ka, flops)


def table(cfg: Config) -> str:
    rows = ["| preset | params (M) | tokens (video+audio) | visible | forward GFLOP/sample | "
            "train GFLOP/sample |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, preset in MODEL_PRESETS.items():
        m = ModelConfig(**{**cfg.model.__dict__, **preset, "preset": name})
        acc = account(m, cfg.inputs)
        rows.append(f"| {name} | {acc.params / 1e6:.1f} | {acc.video_tokens}+{acc.audio_tokens} | "
                    f"{acc.visible_tokens} | {acc.forward_flops / 1e9:.2f} | {acc.train_flops / 1e9:.2f} |")
    return "\n".join(rows)


@entry_point("vaemo-flops")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Parameters and training FLOPs of every model preset.")
    p.add_argument("--config", default=None, help="YAML config whose inputs/model settings to use")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    v, a = cfg.inputs.video, cfg.inputs.audio
    print(f"inputs: video {v.frames}x{v.size}x{v.size} (tubelet {v.tubelet}x{v.patch}x{v.patch}, mask "
          f"{cfg.model.mask_ratio_video}), audio {a.frames}x{a.n_mels} (patch {a.patch}, mask "
          f"{cfg.model.mask_ratio_audio}), fusion {cfg.model.fusion}, decoder {cfg.model.decoder}"
          + (f" (decode_fraction {cfg.model.decode_fraction})" if cfg.model.decoder == "cross" else "")
          + "\n")
    print(table(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
