"""One training process for the parallelism tests, started by torchrun (any TP x DP layout).

    torchrun --nproc_per_node N parallel_worker.py OUT_JSON TP ZERO STEPS [save DIR | load DIR]

Every layout sees the same global batches and the same MAE masks for the same samples (drawn per
global sample index, not per rank), so the losses of all layouts must agree with one process.
"""

import json
import os
import sys

import torch

from vaemo_dist.config import load_config
from vaemo_dist.dist import MegatronMpu, init_distributed
from vaemo_dist.model import vaemo as vaemo_module
from vaemo_dist.model.parallelize import parallelize
from vaemo_dist.objectives.stage1 import Stage1Objective
from vaemo_dist.train import checkpoint
from vaemo_dist.train.schedule import build_optimizer, warmup_cosine
from vaemo_dist.train.trainer import deepspeed_config

out_path, tp, zero, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mode, ckpt_dir = (sys.argv[5], checkpoint.Path(sys.argv[6])) if len(sys.argv) > 6 else ("", None)
GLOBAL_BATCH = 8

world = int(os.environ["WORLD_SIZE"])
cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                         "model.depth=2", "model.decoder_depth=1", "model.heads=4", "model.dim=64",
                         "model.decoder_heads=4", "model.decoder_dim=32", f"parallel.tensor={tp}",
                         f"train.zero_stage={zero}", f"data.batch_size={GLOBAL_BATCH * tp // world}",
                         "optim.warmup_steps=1", "optim.lr=1e-3", f"train.steps={steps}"])
info = init_distributed(120, tp)
local = cfg.data.batch_size
rows = slice(info.dp_rank * local, (info.dp_rank + 1) * local)
step_box = [0]


def keep_for_global_samples(batch, n, ratio, device, generator=None):
    g = torch.Generator().manual_seed(1000 * step_box[0] + n)
    k = max(1, round((1.0 - ratio) * n))
    noise = torch.rand(GLOBAL_BATCH, n, generator=g)[rows]
    return noise.argsort(dim=1)[:, :k].sort(dim=1).values.to(device)


vaemo_module.random_keep = keep_for_global_samples
torch.manual_seed(0)
model = parallelize(vaemo_module.VAEmoModel(cfg.model, cfg.inputs), cfg.parallel)
optimizer = build_optimizer(model, cfg.optim)
import deepspeed  # noqa: E402

engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                  lr_scheduler=warmup_cosine(optimizer, steps, cfg.optim),
                                  config=deepspeed_config(cfg, info.dp_size, False),
                                  mpu=MegatronMpu() if tp > 1 else None)
objective = Stage1Objective(cfg.loss, group=info.dp_group)
start = 0
if mode == "load":
    start = checkpoint.load_checkpoint(checkpoint.checkpoint_parts(engine, data={}),
                                       checkpoint.resolve("latest", ckpt_dir), info.rank)["step"]
losses = {}
for step in range(start, steps):
    step_box[0] = step
    g = torch.Generator().manual_seed(step)
    video = torch.randn(GLOBAL_BATCH, 3, 4, 32, 32, generator=g)[rows]
    audio = torch.randn(GLOBAL_BATCH, 1, 32, 128, generator=g)[rows]
    loss, metrics = objective(engine(video, audio))
    engine.backward(loss)
    engine.step()
    mean = torch.tensor([metrics["loss"]], dtype=torch.float64)
    torch.distributed.all_reduce(mean)
    # Every rank's loss is its DP shard's (TP ranks agree); the global grad norm (over TP shards and
    # DP ranks, as DeepSpeed computes it for clipping) is the same number on every rank.
    # (ZeRO-0 does not report one: None.)
    norm = engine.get_global_grad_norm()
    losses[step + 1] = [mean.item() / world, None if norm is None else float(norm)]
    if mode == "save" and step + 1 == steps // 2:
        parts = checkpoint.checkpoint_parts(engine, data={})
        checkpoint.save_checkpoint(parts, ckpt_dir, step + 1, info.rank, cfg.to_dict())
if info.rank == 0:
    with open(out_path, "w") as f:
        json.dump(losses, f)
torch.distributed.barrier()
os._exit(0)
