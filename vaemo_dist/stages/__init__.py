"""The stages of training as library objects (vaemo_dist/stages/base.py says what a stage is), by name.

    from vaemo_dist.stages import run
    run("stage1")  # launchers/stage1.py: parse, configure, check, prepare, train, exit

    stage = get("stage1")(cfg)  # a stage of a config: its model, loss, data, evaluator
    model, loss = stage.build_model(info), stage.loss

A new stage is one module here (a Stage subclass) and one line in STAGES.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from vaemo_dist.stages.base import Stage, train
from vaemo_dist.stages.finetune import Finetune
from vaemo_dist.stages.stage1 import Stage1
from vaemo_dist.stages.stage2 import Stage2

__all__ = ["STAGES", "Finetune", "Stage", "Stage1", "Stage2", "get", "main", "run", "train"]

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (Stage1, Stage2, Finetune)}


def get(name: str) -> type[Stage]:
    """The stage registered as `name`."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGES)}") from None


def main(name: str, argv: list[str] | None = None) -> int:
    """The command line of stage `name` (`launchers/<name>.py`): its own (fine-tuning's probe or
    folds), or the launch of one run (vaemo_dist.launch.run_stage)."""
    stage = get(name)
    if stage.command is not None:
        return stage.command(argv)
    from vaemo_dist.launch import run_stage

    return run_stage(stage, argv)


def run(name: str, argv: list[str] | None = None) -> NoReturn:
    """`main(name, argv)`, then exit with its code (a launcher's whole body)."""
    sys.exit(main(name, argv))
