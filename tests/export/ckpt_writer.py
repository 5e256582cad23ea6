"""Write DeepSpeed checkpoints of known weights through our trainer's checkpoint code, for the export
tests (run as a subprocess: DeepSpeed keeps global state that must not leak into pytest).

    python ckpt_writer.py STAGE ROOT WEIGHTS [bf16] [stage2]

Loads WEIGHTS (safetensors, the full model state) into the tiny model, freezes its joint head,
saves checkpoint step 0
under ROOT, trains 2 steps, saves step 2, and writes the weights the engine holds at step 2
(gathered under ZeRO-3) to ROOT/step2_weights.safetensors.

With `stage2` the model is the stage-2 `Stage2Model` (VAEmo + text head, names `vaemo.*` and
`text_head.*`, WEIGHTS its full state) trained by the stage-2 objective on fixed random "text
embeddings" of TEXT_DIM; the metrics of step 2 go to ROOT/../metrics.jsonl, as the trainer logs them.
"""

import json
import os
import sys

import deepspeed
import torch
from safetensors.torch import load_file, save_file

from vaemo_dist.config import load_config
from vaemo_dist.dist import init_distributed
from vaemo_dist.model.vaemo import VAEmoModel
from vaemo_dist.objectives.stage1 import Stage1Objective
from vaemo_dist.train import checkpoint
from vaemo_dist.train.trainer import deepspeed_config

# Keep in step with tests/export/test_export.py (TINY_OVERRIDES).
OVERRIDES = ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
             "model.depth=1", "model.decoder_depth=1", "data.batch_size=2"]
# Stage 2 (keep in step with tests/export/test_export_stage2.py): an MLP text head, all tokens visible.
STAGE2_OVERRIDES = ["stage2.text_head_hidden=32", "stage2.masked=false", "train.run_name=stage2-tiny-test"]
TEXT_DIM = 384  # all-MiniLM-L6-v2

stage, root, weights = int(sys.argv[1]), checkpoint.Path(sys.argv[2]), sys.argv[3]
flags = set(sys.argv[4:])
bf16, stage2 = "bf16" in flags, "stage2" in flags
precision = "bf16" if bf16 else "fp32"
cfg = load_config(None, [*OVERRIDES, *(STAGE2_OVERRIDES if stage2 else []), f"train.zero_stage={stage}",
                         f"train.precision={precision}"])
init_distributed()
gen = torch.Generator().manual_seed(1)
video, audio = torch.randn(2, 3, 4, 32, 32, generator=gen), torch.randn(2, 1, 32, 128, generator=gen)
dtype = torch.bfloat16 if bf16 else torch.float32
if stage2:
    from vaemo_dist.model.text_head import Stage2Model
    from vaemo_dist.objectives.stage2 import Stage2Objective

    model = Stage2Model(VAEmoModel(cfg.model, cfg.inputs), TEXT_DIM, cfg.stage2, cfg.loss)
    vaemo = model.vaemo
    text = torch.nn.functional.normalize(torch.randn(2, TEXT_DIM, generator=gen), dim=-1)
    objective = Stage2Objective(cfg.stage2, cfg.loss)
    step_loss = lambda: objective(engine(video.to(dtype), audio.to(dtype), text.to(dtype)))  # noqa: E731
else:
    model = vaemo = VAEmoModel(cfg.model, cfg.inputs)
    objective = Stage1Objective(cfg.loss)
    step_loss = lambda: objective(engine(video.to(dtype), audio.to(dtype)))  # noqa: E731
model.load_state_dict(load_file(weights))
# A frozen part, as fine-tuning has: DeepSpeed's consolidation misses frozen weights under ZeRO-1.
vaemo.joint_head.requires_grad_(False)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 1, bf16))

checkpoint.save_checkpoint(checkpoint.checkpoint_parts(engine, data={}), root, 0, 0, cfg.to_dict())
torch.manual_seed(0)
for _ in range(2):
    loss, metrics = step_loss()
    engine.backward(loss)
    engine.step()
checkpoint.save_checkpoint(checkpoint.checkpoint_parts(engine, data={}), root, 2, 0, cfg.to_dict())
if stage2:
    (root.parent / "metrics.jsonl").write_text(json.dumps({"step": 2, **metrics}) + "\n")

params = list(engine.module.parameters())
with deepspeed.zero.GatheredParameters(params) if stage == 3 else torch.no_grad():
    held = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
save_file(held, str(root / "step2_weights.safetensors"))
print("done", flush=True)
os._exit(0)
