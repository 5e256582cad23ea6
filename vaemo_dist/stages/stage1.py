"""Stage 1, pretraining: masked audio-visual reconstruction + audio-visual contrastive learning
(vaemo_dist/objectives/stage1.py) on the synthetic corpus or the user's shards.

    deepspeed --num_gpus 2 launchers/stage1.py --config configs/stage1/tiny.yaml [key=value ...]
"""

from __future__ import annotations

from typing import Any

import torch

from vaemo_dist.stages.base import Stage


class Stage1(Stage):
    name = "stage1"
    default_config = "configs/stage1/tiny.yaml"

    def build_model(self, info: Any) -> torch.nn.Module:
        from vaemo_dist.model.vaemo import VAEmoModel
        from vaemo_dist.objectives.stage1 import Stage1Objective

        cfg = self.cfg
        model = VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                           init_temperature=cfg.loss.init_temperature)
        self.objective = Stage1Objective(cfg.loss, group=info.dp_group)
        return model

    def loss(self, engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(engine(batch.video, batch.audio))
