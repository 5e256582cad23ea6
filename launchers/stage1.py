"""Stage-1 pretraining: masked audio-visual reconstruction + audio-visual contrastive learning.

    deepspeed --num_gpus 2 launchers/stage1.py --config configs/stage1/tiny.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage1.py --config configs/stage1/tiny.yaml
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vaemo_dist.launch import run_stage  # noqa: E402


def build(cfg, info):
    from vaemo_dist.model.vaemo import VAEmoModel
    from vaemo_dist.objectives.stage1 import Stage1Objective

    model = VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                       init_temperature=cfg.loss.init_temperature)
    objective = Stage1Objective(cfg.loss, group=info.dp_group)

    def compute_loss(engine, batch):
        return objective(engine(batch.video, batch.audio))

    return model, compute_loss


if __name__ == "__main__":
    run_stage("stage1", build, default_config="configs/stage1/tiny.yaml")
