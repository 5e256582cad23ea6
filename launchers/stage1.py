"""Stage-1 pretraining: masked audio-visual reconstruction + audio-visual contrastive learning
(vaemo_dist/stages/stage1.py).

    deepspeed --num_gpus 2 launchers/stage1.py --config configs/stage1/tiny.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage1.py --config configs/stage1/tiny.yaml
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vaemo_dist.stages import run  # noqa: E402

if __name__ == "__main__":
    run("stage1")
