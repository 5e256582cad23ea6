"""Stage-2 knowledge injection: text descriptions aligned with the joint and per-modality VA embeddings,
from a stage-1 checkpoint or export (vaemo_dist/stages/stage2.py, docs/stage2.md).

    deepspeed --num_gpus 2 launchers/stage2.py --config configs/stage2/tiny.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage2.py --config configs/stage2/tiny.yaml data.shards=<set>
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vaemo_dist.stages import run  # noqa: E402

if __name__ == "__main__":
    run("stage2")
