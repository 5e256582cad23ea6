"""A one-process DeepSpeed run for the checkpoint tests (run as a subprocess: DeepSpeed keeps global
state that must not leak into the pytest process).

    python ckpt_worker.py save STAGE DIR   # 2 steps, checkpoint, 1 step, then die in the middle of saving
    python ckpt_worker.py load STAGE DIR   # restore `latest`, print what was restored
"""

import json
import os
import sys

import torch

from vaemo_dist.config import load_config
from vaemo_dist.dist import init_distributed
from vaemo_dist.model.vaemo import VAEmoModel
from vaemo_dist.objectives.stage1 import Stage1Objective
from vaemo_dist.train import checkpoint
from vaemo_dist.train.trainer import deepspeed_config

mode, stage, root = sys.argv[1], int(sys.argv[2]), checkpoint.Path(sys.argv[3])
cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                         "model.depth=1", "model.decoder_depth=1", "data.batch_size=2",
                         f"train.zero_stage={stage}"])
info = init_distributed()
torch.manual_seed(0)
model = VAEmoModel(cfg.model, cfg.inputs)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
import deepspeed  # noqa: E402

engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 1, False))
objective = Stage1Objective(cfg.loss)
video, audio = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 32, 128)


def train_step() -> float:
    loss, _ = objective(engine(video, audio))
    engine.backward(loss)
    engine.step()
    return loss.item()


def checksum() -> float:
    params = engine.module.parameters()
    if stage == 3:  # ZeRO-3 partitions parameters; gather them to read them
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return float(sum(p.double().sum() for p in engine.module.parameters()))
    return float(sum(p.double().sum() for p in params))


if mode == "save":
    train_step(), train_step()
    checkpoint.save_checkpoint(checkpoint.checkpoint_parts(engine, data={"note": "two"}), root, 2, 0,
                               cfg.to_dict())
    print(json.dumps({"checksum": checksum(), "next_loss": train_step()}), flush=True)
    real_save = engine.save_checkpoint

    def save_then_die(*args, **kwargs):  # the files are written, the publish never happens
        real_save(*args, **kwargs)
        os._exit(9)

    engine.save_checkpoint = save_then_die
    checkpoint.save_checkpoint(checkpoint.checkpoint_parts(engine, data={"note": "three"}), root, 3, 0,
                               cfg.to_dict())
else:
    folder = checkpoint.resolve("latest", root)
    data: dict = {}
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_parts(engine, data=data), folder, 0)
    assert data == state["data"]  # the part was given its state back
    print(json.dumps({"folder": folder.name, "state": state, "checksum": checksum(),
                      "next_loss": train_step()}), flush=True)
os._exit(0)
