"""Reading metrics.jsonl back and drawing a run's curves (vaemo-plot)."""

import json

import numpy as np
from PIL import Image

from vaemo_dist.train.curves import (
    CURVES_FILE,
    LOSS_TERMS,
    _smooth,
    draw_runs,
    logged,
    main,
    plot_runs,
    read_metrics,
)


def _write_run(folder, stage2=False, steps=30, evals=True, scale=1.0, eval_set=None):
    folder.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": scale * 3.0 / s, "lr": scale * 1e-4, "samples_per_s": 20.0 * scale,
             "grad_norm": scale / s, "data_wait_frac": 0.05, "skipped_decode": s // 10, "skipped_shards": 0,
             "nonfinite_steps": 0}
        if stage2:
            r.update(text_joint=2.0 / s, stage1_loss=1.0)
        else:
            r.update(rec_video=1.0, contrastive=2.0)
        lines.append(json.dumps(r))
        if evals and s % 10 == 0:
            record = {"step": s, "eval/probe_uar": scale * s / 100, "eval/rec_loss": 1.5, "train_flops": s}
            if eval_set:
                record["eval/set"] = eval_set
            lines.append(json.dumps(record))
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


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _curves_by_run(fig):
    """{run name: {metric: set of RGB colours}} over every axes of the figure."""
    from matplotlib.colors import to_rgb

    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                run, key = line.get_gid().split("|")
                out.setdefault(run, {}).setdefault(key, set()).add(to_rgb(line.get_color()))
    return out


def test_several_runs_one_colour_each_everywhere_and_no_legend_on_the_data(tmp_path):
    import matplotlib.pyplot as plt

    runs = [_write_run(tmp_path / f"run{i}", stage2=i % 2 == 1, scale=1 + i / 10) for i in range(12)]
    fig = draw_runs(runs)
    try:
        fig.canvas.draw()
        by_run = _curves_by_run(fig)
        assert sorted(by_run) == sorted(f"run{i}" for i in range(12))
        colours = {}
        for run, keys in by_run.items():
            # loss, evaluation, lr, throughput, waiting for data, gradient norm, skip counts: all drawn
            drawn = {"loss", "eval/probe_uar", "lr", "samples_per_s", "grad_norm", "skipped_decode"}
            assert drawn <= set(keys)
            used = set().union(*keys.values())
            assert len(used) == 1, (run, used)  # the run's one colour in every panel
            colours[run] = used.pop()
        assert len(set(colours.values())) == 12  # 12 runs, 12 colours (tab10 alone would repeat)
        renderer = fig.canvas.get_renderer()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + fig.legends
        assert fig.legends and len(legends) >= 3  # the runs' legend and the panels' style legends
        boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(_overlaps(box, axes_box) for axes_box in boxes), legend
        names = {t.get_text() for t in fig.legends[0].get_texts()}
        assert names == {f"run{i}" for i in range(12)}
    finally:
        plt.close(fig)


def test_a_run_without_evaluation_has_no_empty_panel(tmp_path):
    """A fine-tuning fold logs no online evaluation: its figure has no evaluation panel, and every panel
    drawn holds curves."""
    import matplotlib.pyplot as plt

    fig = draw_runs([_write_run(tmp_path / "fold_1", evals=False)])
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert len(titles) == 5 and not any("evaluation" in t for t in titles), titles
        for ax in fig.axes:
            assert ax.get_lines(), ax.get_title()
            assert not any(t.get_text() == "not logged" for t in ax.texts)
    finally:
        plt.close(fig)
    assert main([str(tmp_path / "fold_1")]) == 0


def test_the_evaluation_panel_names_its_held_out_set(tmp_path):
    import matplotlib.pyplot as plt

    fig = draw_runs([_write_run(tmp_path / "a", eval_set="synthetic (16 classes)")])
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert "online evaluation on synthetic (16 classes)" in titles, titles
    finally:
        plt.close(fig)


def test_runs_of_the_same_name_are_told_apart(tmp_path):
    import matplotlib.pyplot as plt

    fig = draw_runs([_write_run(tmp_path / "a" / "fold_1"), _write_run(tmp_path / "b" / "fold_1", scale=2)])
    try:
        assert {t.get_text() for t in fig.legends[0].get_texts()} == {"a/fold_1", "b/fold_1"}
    finally:
        plt.close(fig)
