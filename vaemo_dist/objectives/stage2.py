"""Stage 2, knowledge injection: dual-path contrastive alignment of text descriptions with the VA model.

Path 1 aligns each clip's (frozen, precomputed) description embedding, through a trainable text
projection head, with the joint audio-visual embedding; path 2 aligns it with each modality's own
embedding (audio, visual). Every path is a symmetric InfoNCE over the global batch
(`kernels.dispatch.contrastive_loss` over the data-parallel group). The stage-1 objective (masked
reconstruction + audio-visual InfoNCE) can be kept with a weight so the representation does not drift.

    loss = joint_weight * L(text, joint) + audio_weight * L(text, audio) + video_weight * L(text, video)
           + stage1_weight * stage1_loss

The text head lives in `Stage2Model` next to the VAEmo model (vaemo_dist/model/text_head.py), so
DeepSpeed trains, shards and checkpoints both as one module (state-dict names `vaemo.*` and
`text_head.*`); starting it from a stage-1 checkpoint or export (`stage2.init_from`) is `load_init` in
vaemo_dist/checkpoints.py.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dispatch
from vaemo_dist.config import LossConfig, Stage2Config
from vaemo_dist.model.text_head import Stage2Output
from vaemo_dist.objectives.stage1 import Stage1Objective


class Stage2Objective:
    """`group`: the data-parallel process group the InfoNCE terms gather over (see Stage1Objective)."""

    def __init__(self, s2: Stage2Config, loss: LossConfig, group: Any = None) -> None:
        self.s2, self.group = s2, group
        self.stage1 = Stage1Objective(loss, group) if s2.stage1_weight > 0 else None

    def __call__(self, out: Stage2Output,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        s2 = self.s2
        t, scale = out.text_emb.float(), out.text_logit_scale.float()
        total = t.new_zeros(())
        names, values = [], []
        paths = (("text_joint", s2.joint_weight, out.joint_emb),
                 ("text_audio", s2.audio_weight, out.audio_emb),
                 ("text_video", s2.video_weight, out.video_emb))
        for name, weight, emb in paths:
            if weight > 0:  # a path switched off costs nothing
                term = dispatch.contrastive_loss(t, emb.float(), scale, self.group)
                total = total + weight * term
                names.append(name)
                values.append(term)
        stage1_metrics: dict[str, float] = {}
        if self.stage1 is not None:
            if out.va is None:
                raise ValueError("stage2.stage1_weight > 0 needs the masked forward pass (Stage2Model.va)")
            s1_total, stage1_metrics = self.stage1(out.va)
            total = total + self.s2.stage1_weight * s1_total
        with torch.no_grad():
            j = out.joint_emb.float()
            hit = (t @ j.T).argmax(dim=1)  # text -> clip within this rank's batch
            acc = (hit == torch.arange(t.shape[0], device=t.device)).float().mean()
            acc_class = torch.tensor(-1.0, device=t.device)  # -1: the labels are unknown
            if labels is not None:
                known = labels >= 0
                if known.any():
                    acc_class = (labels[hit] == labels)[known].float().mean()
            vals = torch.stack([total, *values, scale, acc, acc_class]).detach().cpu().tolist()
            metrics = dict(zip(["loss", *names, "text_logit_scale", "acc_t2j", "acc_t2j_class"], vals))
        for k, v in stage1_metrics.items():
            metrics["stage1_loss" if k == "loss" else k] = v
        return total, metrics
