"""A non-finite loss or gradient is detected, the step skipped on every rank and counted, and the run
stops with a clear error after train.max_nonfinite_steps in a row. Faults come from VAEMO_FAULTS."""

import json
from pathlib import Path

import pytest

from tests.launching import output, run_stage1
from vaemo_dist.config import SynthConfig
from vaemo_dist.data.synth import build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(SynthConfig(clips=32, clips_per_shard=8, classes=4, size=64),
                        tmp_path_factory.mktemp("numerics-corpus"), progress=False)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ZeRO-0 with clipping off: DeepSpeed checks nothing, our optimizer must skip. ZeRO-2 with clipping:
# DeepSpeed's own norm check skips first. Both must give the same visible result.
@pytest.mark.parametrize("zero,clip", [(0, 0.0), (2, 1.0)])
def test_nonfinite_loss_and_gradient_steps_are_skipped_and_counted(corpus, tmp_path, zero, clip):
    run_dir = tmp_path / f"z{zero}"
    proc = run_stage1(run_dir, corpus, 1, "train.steps=6", f"train.zero_stage={zero}",
                      f"optim.clip_grad={clip}", faults="nan_loss:step=3,nan_grad:step=5")
    assert proc.returncode == 0, output(proc)[-4000:]
    recs = {r["step"]: r for r in records(run_dir)}
    assert [recs[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    # The weights took 4 updates, not 6, and stayed finite: the last loss is a number.
    assert recs[6]["optimizer_steps"] == 4
    assert recs[3]["loss"] is None  # NaN is written as null, the file stays strict JSON
    assert recs[6]["loss"] is not None and recs[6]["loss"] < 10
    assert "step 3 skipped: non-finite loss or gradient" in output(proc)
    assert "step 5 skipped" in output(proc)


def test_a_gradient_blowing_up_on_one_rank_is_skipped_by_all(corpus, tmp_path):
    """ZeRO-2 without clipping: each rank's optimizer sees only its partition; they must agree."""
    run_dir = tmp_path / "one-rank"
    proc = run_stage1(run_dir, corpus, 2, "train.steps=4", "train.zero_stage=2", "optim.clip_grad=0",
                      faults="nan_grad:step=2:rank=1")
    assert proc.returncode == 0, output(proc)[-4000:]
    last = records(run_dir)[-1]
    assert last["nonfinite_steps"] == 1 and last["optimizer_steps"] == 3


def test_too_many_in_a_row_stop_the_run_with_a_clear_error(corpus, tmp_path):
    run_dir = tmp_path / "in-a-row"
    proc = run_stage1(run_dir, corpus, 1, "train.steps=10", "train.max_nonfinite_steps=3",
                      faults="nan_loss:step=2-9")
    assert proc.returncode != 0
    text = output(proc)
    assert "3 steps in a row (up to step 4) had a non-finite loss or gradient" in text
    assert "train.max_nonfinite_steps=3" in text and "the weights are those of step 1" in text
