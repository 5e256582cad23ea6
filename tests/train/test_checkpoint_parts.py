"""A checkpoint is a dict of parts that save and restore themselves (train/checkpoint.py), in the
on-disk layout checkpoints always had: step and trainer counters at the top of vaemo_rank*.json, the
data position under "data", the RNG in rng_rank*.safetensors. (With a DeepSpeed engine:
tests/faults/test_checkpoint_crash.py, tests/integration/test_stage1_run.py, tests/compat.)"""

import json

import pytest
import torch

from vaemo_dist.train.checkpoint import (
    CheckpointError,
    RNGState,
    load_checkpoint,
    resolve,
    save_checkpoint,
)
from vaemo_dist.train.trainer import TrainState


class FakeEngine:
    """A part with files of its own, as EngineState (DeepSpeed's files)."""

    def __init__(self, value: float = 0.0) -> None:
        self.value, self.order = value, []

    def save(self, folder, rank):
        (folder / f"engine{rank}.txt").write_text(str(self.value))

    def load(self, folder, rank):
        self.value = float((folder / f"engine{rank}.txt").read_text())


class Position:
    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self):
        return {"version": 2, "batches": self.n}

    def load_state_dict(self, state):
        self.n = int(state["batches"])


def test_parts_save_and_restore_themselves_in_the_old_layout(tmp_path):
    root = tmp_path / "checkpoints"
    torch.manual_seed(3)
    parts = {"model": FakeEngine(1.5), "data": Position(7), "train": TrainState(4, 1, 1), "rng": RNGState()}
    folder = save_checkpoint(parts, root, 4, 0, {"train": {"steps": 9}})
    expected_draw = torch.rand(3)
    assert folder == resolve("latest", root) == root / "step_00000004"
    assert json.loads((folder / "vaemo_rank00000.json").read_text()) == {
        "step": 4, "data": {"version": 2, "batches": 7}, "nonfinite_steps": 1}
    assert (folder / "rng_rank00000.safetensors").is_file() and (folder / "config.yaml").is_file()

    torch.manual_seed(99)
    fresh = {"model": FakeEngine(), "data": Position(), "train": TrainState(), "rng": RNGState()}
    state = load_checkpoint(fresh, folder, 0)
    assert state["step"] == 4 and fresh["model"].value == 1.5 and fresh["data"].n == 7
    assert fresh["train"] == TrainState(4, 1, 0)  # steps skipped in a row are counted afresh
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG last: as it was when saved


def test_a_plain_dict_is_a_part_and_a_missing_state_is_named(tmp_path):
    root = tmp_path / "checkpoints"
    folder = save_checkpoint({"data": {"note": "two"}}, root, 2, 0, {})
    back: dict = {"stale": 1}
    load_checkpoint({"data": back}, folder, 0)
    assert back == {"note": "two"}
    with pytest.raises(CheckpointError, match="holds no 'extra' state"):
        load_checkpoint({"extra": Position()}, folder, 0)
    with pytest.raises(CheckpointError, match="another world size"):
        load_checkpoint({"data": {}}, folder, 1)


def test_trainer_counters_of_checkpoints_before_they_were_counted():
    counters = TrainState()
    counters.load_state_dict({"step": 12, "data": {}})  # written before nonfinite_steps existed
    assert counters == TrainState(12, 0, 0)
