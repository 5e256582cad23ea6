"""Reading metrics.jsonl back and drawing a run's curves (vaemo-plot)."""

import json

import numpy as np
from PIL import Image

from vaemo_dist.train.curves import CURVES_FILE, LOSS_TERMS, _smooth, logged, main, plot_runs, read_metrics


def _write_run(folder, stage2=False, steps=30):
    folder.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 3.0 / s, "lr": 1e-4, "samples_per_s": 20.0, "grad_norm": 1.0 / s,
             "data_wait_frac": 0.05, "skipped_decode": s // 10, "skipped_shards": 0, "nonfinite_steps": 0}
        if stage2:
            r.update(text_joint=2.0 / s, stage1_loss=1.0)
        else:
            r.update(rec_video=1.0, contrastive=2.0)
        lines.append(json.dumps(r))
        if s % 10 == 0:
            lines.append(json.dumps({"step": s, "eval/probe_uar": s / 100, "eval/rec_loss": 1.5,
                                     "train_flops": s}))
    lines.append('{"step": 31, "loss": 0.1')  # cut short by a kill
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_records_split_into_training_and_evaluation_and_a_torn_line_is_passed_over(tmp_path):
    train, evals = read_metrics(_write_run(tmp_path / "run") / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 31))
    assert [r["step"] for r in evals] == [10, 20, 30] and all("loss" not in r for r in evals)
    assert read_metrics(tmp_path / "absent.jsonl") == ([], [])


def test_only_the_terms_a_run_logged_are_drawn(tmp_path):
    train1, _ = read_metrics(_write_run(tmp_path / "s1") / "metrics.jsonl")
    train2, _ = read_metrics(_write_run(tmp_path / "s2", stage2=True) / "metrics.jsonl")
    assert logged(train1, LOSS_TERMS) == ["loss", "rec_video", "contrastive"]
    assert logged(train2, LOSS_TERMS) == ["loss", "text_joint", "stage1_loss"]
    assert logged([{"loss": None}, {"loss": float("nan")}], ["loss"]) == []


def test_running_mean_is_trailing():
    np.testing.assert_allclose(_smooth([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
    assert _smooth([2.0], 10) == [2.0]


def test_one_and_several_runs_make_a_png(tmp_path):
    a, b = _write_run(tmp_path / "a"), _write_run(tmp_path / "b", stage2=True)
    assert main([str(a)]) == 0
    one = Image.open(a / CURVES_FILE)
    assert one.size[0] > 1000 and one.size[1] > 500
    both = plot_runs([a, b], tmp_path / "both.png", terms=["loss", "text_joint"])
    pixels = np.asarray(Image.open(both).convert("L"))
    assert pixels.std() > 10  # something was drawn, not a blank canvas


def test_a_folder_without_records_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no training or evaluation records" in capsys.readouterr().err
