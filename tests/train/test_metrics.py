"""MetricsLogger on a resumed run: lines of steps done again are dropped, never lost."""

import json

from vaemo_dist.train.metrics import MetricsLogger


def _lines(steps: range, torn: bool = False) -> str:
    text = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)
    return text + ('{"step": 99, "lo' if torn else "")


def _logger(run_dir, start_step):
    return MetricsLogger(run_dir, True, total_steps=10, start_step=start_step, config={},
                         wandb_mode="disabled")


def test_resume_without_a_checkpoint_keeps_the_earlier_lines_beside(tmp_path):
    """--resume latest on a run whose checkpoints are gone: the run starts at step 0, and the 52 lines it
    had are kept as metrics.jsonl.old-<timestamp>, byte for byte."""
    before = _lines(range(1, 53))
    (tmp_path / "metrics.jsonl").write_text(before)
    logger = _logger(tmp_path, 0)
    logger.log(1, {"loss": 0.5})
    logger.close()
    (aside,) = tmp_path.glob("metrics.jsonl.old-*")
    assert aside.read_text() == before
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_from_a_checkpoint_drops_only_later_and_torn_lines(tmp_path):
    before = _lines(range(1, 8), torn=True)
    (tmp_path / "metrics.jsonl").write_text(before)
    _logger(tmp_path, 4).close()
    assert (tmp_path / "metrics.jsonl").read_text() == _lines(range(1, 5))
    (aside,) = tmp_path.glob("metrics.jsonl.old-*")
    assert aside.read_text() == before


def test_an_exact_resume_appends_and_writes_nothing_beside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_lines(range(1, 5)))
    logger = _logger(tmp_path, 4)
    logger.log(5, {"loss": 0.2})
    logger.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5] and not list(tmp_path.glob("*.old-*"))
