"""The stage-2 model: VAEmoModel plus a trainable text projection head (knowledge injection).

The text head maps a frozen text encoder's description embedding into the space of the VA model's
joint and per-modality embeddings. `Stage2Model` holds both, so DeepSpeed trains, shards and
checkpoints them as one module; its state-dict names are `vaemo.*` (a VAEmoModel's names behind the
prefix) and `text_head.*`. The objective is vaemo_dist/objectives/stage2.py; reading these weights from
checkpoints and exports is vaemo_dist/checkpoints.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaemo_dist.config import LossConfig, Stage2Config
from vaemo_dist.model.vaemo import ModelOutput, VAEmoModel

# The parts of Stage2Model: its two submodules (attribute names), hence the prefixes of its state-dict
# names; a checkpoint whose names carry them is a stage-2 one.
VAEMO, TEXT_HEAD = "vaemo", "text_head"
VAEMO_PREFIX, TEXT_HEAD_PREFIX = VAEMO + ".", TEXT_HEAD + "."


class TextHead(nn.Module):
    """Frozen text embedding [B, T] -> [B, E] L2-normalised, with its own learnable temperature.

    hidden > 0: an MLP (state-dict names proj.0.*, proj.2.*); hidden == 0: one Linear (proj.*)."""

    def __init__(self, text_dim: int, embed_dim: int, hidden: int = 0, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        if hidden > 0:
            self.proj: nn.Module = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(),
                                                 nn.Linear(hidden, embed_dim))
        else:
            self.proj = nn.Linear(text_dim, embed_dim)
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.max_logit_scale = max_logit_scale
        # Shape [1], as in VAEmoModel: DeepSpeed broadcasts parameters as byte views (not 0-d).
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = F.normalize(self.proj(text), dim=-1)
        return emb, self.log_logit_scale.exp().clamp(max=self.max_logit_scale).squeeze(0)

    @staticmethod
    def sizes(state: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(text embedding dim, hidden width; 0 = linear head) of a TextHead state dict, read off its
        first layer. ValueError when it has none."""
        if "proj.0.weight" in state:  # the MLP head: Linear(text_dim, hidden), GELU, Linear(hidden, E)
            hidden, text_dim = state["proj.0.weight"].shape
            return int(text_dim), int(hidden)
        if "proj.weight" in state:
            return int(state["proj.weight"].shape[1]), 0
        raise ValueError(f"the text head has no first layer (proj.weight / proj.0.weight): "
                         f"{sorted(state)[:5]}")


@dataclass
class Stage2Output:
    text_emb: torch.Tensor  # [B, E] L2-normalised
    text_logit_scale: torch.Tensor  # scalar
    joint_emb: torch.Tensor  # [B, E] L2-normalised, as are the two below
    audio_emb: torch.Tensor
    video_emb: torch.Tensor
    va: ModelOutput | None  # the masked forward pass (reconstruction etc.) when it ran


class Stage2Model(nn.Module):
    """VAEmoModel + text projection head, trained together by DeepSpeed.

    masked=True aligns the embeddings of the MAE-masked forward pass (the stage-1 cost per step, and
    it also yields what the stage-1 objective needs); masked=False encodes every token (`encode`)."""

    def __init__(self, vaemo: VAEmoModel, text_dim: int, s2: Stage2Config, loss: LossConfig) -> None:
        super().__init__()
        self.vaemo = vaemo
        self.text_head = TextHead(text_dim, vaemo.cfg.embed_dim, s2.text_head_hidden, loss.init_temperature,
                                  loss.max_logit_scale)
        self.masked = s2.masked
        self.needs_forward = s2.masked or s2.stage1_weight > 0
        if s2.freeze_encoder:
            vaemo.requires_grad_(False)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor) -> Stage2Output:
        va = self.vaemo(video, audio) if self.needs_forward else None
        if self.masked:
            assert va is not None
            joint, a, v = va.joint_emb, va.audio_emb, va.video_emb
        else:
            enc = self.vaemo.encode(video, audio)
            joint, a, v = enc.joint_emb, enc.audio_emb, enc.video_emb
        text_emb, scale = self.text_head(text.to(self.text_head.log_logit_scale.dtype))
        return Stage2Output(text_emb=text_emb, text_logit_scale=scale, joint_emb=joint, audio_emb=a,
                            video_emb=v, va=va)

    @torch.no_grad()
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_head(text)[0]

