"""Downstream evaluation of a pretrained export: linear probe or full fine-tuning, per fold.

    python launchers/finetune.py --mode probe --pretrained EXPORT --data manifest.csv --splits folds.csv
    deepspeed --num_gpus 2 launchers/finetune.py --mode finetune --pretrained EXPORT --data manifest.csv \
        --splits folds.csv [--folds 1,2] [--epochs 20] [train.zero_stage=2 optim.lr=5e-4 ...]

See docs/downstream.md, vaemo_dist/stages/finetune.py and vaemo_dist/eval/downstream.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vaemo_dist.stages import run  # noqa: E402

if __name__ == "__main__":
    run("finetune")
