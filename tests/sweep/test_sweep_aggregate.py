"""Aggregation: scaling.csv and scaling.png from fake run folders with known power laws."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from vaemo_dist.sweep.aggregate import fit_power_law, preset_lines, report, summarise
from vaemo_dist.sweep.plan import build_points, load_spec, write_manifest
from vaemo_dist.train.curves import read_metrics

# Final loss L = A C^B per preset; probe UAR = U C^0.05 for tiny only.
LAW = {"tiny": (40.0, -0.12), "small": (90.0, -0.15)}
UAR_LAW = (0.05, 0.05)


def _write_run(folder: Path, point, law, with_train_flops: bool, with_eval: bool,
               upto: int | None = None) -> None:
    """Records every step: loss on the power law of its FLOPs; the checkpoint names the last step."""
    a, b = law
    steps = upto or point.steps
    lines = []
    for step in range(1, steps + 1):
        seen = step * point.global_batch
        c = seen * point.flops_per_sample
        record = {"step": step, "loss": a * c ** b, "samples_seen": seen, "lr": 1e-3}
        if with_train_flops:
            record["train_flops"] = c
        lines.append(record)
        if with_eval and step % 5 == 0 or with_eval and step == steps:
            lines.append({"step": step, "train_flops": c, "eval/probe_uar": UAR_LAW[0] * c ** UAR_LAW[1],
                          "eval/probe_war": 0.5, "eval/r1_v2a": 0.1 * step, "eval/r1_a2v": 0.2,
                          "eval/rec_loss": 2.0 / step})
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9')
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "latest").write_text(f"step_{steps:08d}")


@pytest.fixture
def fake_sweep(write_sweep):
    """tiny (with eval and train_flops) and small (neither) at three budgets; one more small point stopped."""
    spec = load_spec(write_sweep(grid={"preset": ["tiny", "small"], "flops": [2e11, 8e11, 3.2e12]}))
    points = build_points(spec)
    write_manifest(spec, points)
    for p in points:
        tiny = p.preset == "tiny"
        upto = p.steps // 2 if p.name == "small-f3.2e12-s0" else None  # interrupted halfway
        _write_run(Path(spec.out_dir) / p.name, p, LAW[p.preset], with_train_flops=tiny, with_eval=tiny,
                   upto=upto)
    return spec, points


def test_csv_has_one_row_per_point_with_costs_and_metrics(fake_sweep):
    spec, points = fake_sweep
    csv_path, png_path, _ = report(Path(spec.out_dir), last=1)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["name"] for r in rows] == [p.name for p in points]
    columns = [
        "name", "preset", "model_preset", "params", "data_fraction", "data_shards", "data_clips", "seed",
        "steps", "steps_reached", "global_batch", "flops_per_sample", "flops_budget", "flops_planned",
        "flops_reached", "final_loss", "best_loss", "final_probe_uar", "best_probe_uar", "final_probe_war",
        "final_r1_v2a", "best_r1_v2a", "final_r1_a2v", "final_rec_loss", "best_rec_loss", "status",
    ]
    for col in columns:
        assert col in rows[0], col
    by_name = {r["name"]: r for r in rows}
    for p in points:
        r = by_name[p.name]
        assert int(r["params"]) == p.params and int(r["data_clips"]) == 256 and r["preset"] == p.preset
        reached = int(r["steps_reached"])
        # train_flops from the records (tiny) or from samples_seen x FLOPs per sample (small): the same
        assert float(r["flops_reached"]) == pytest.approx(reached * p.global_batch * p.flops_per_sample)
        c = float(r["flops_reached"])
        assert float(r["final_loss"]) == pytest.approx(LAW[p.preset][0] * c ** LAW[p.preset][1])
    assert by_name["small-f3.2e12-s0"]["status"] == "interrupted"
    assert {by_name[p.name]["status"] for p in points if p.name != "small-f3.2e12-s0"} == {"done"}
    tiny = by_name["tiny-f8e11-s0"]
    steps = int(tiny["steps"])
    assert float(tiny["final_r1_v2a"]) == pytest.approx(0.1 * steps) == float(tiny["best_r1_v2a"])
    assert float(tiny["best_rec_loss"]) == pytest.approx(2.0 / steps)  # lower is better
    assert by_name["small-f2e11-s0"]["final_probe_uar"] == ""  # no eval records
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_final_and_best_loss_are_running_means(fake_sweep):
    spec, points = fake_sweep
    p = points[0]
    row, curves = summarise(p, Path(spec.out_dir) / p.name, last=5)
    train, _ = read_metrics(Path(spec.out_dir) / p.name / "metrics.jsonl")
    losses = [r["loss"] for r in train]
    assert row["final_loss"] == pytest.approx(sum(losses[-5:]) / 5)
    assert row["best_loss"] == pytest.approx(min(sum(losses[i - 5:i]) / 5 for i in range(5, len(losses) + 1)))
    assert len(curves.loss) == p.steps and curves.uar


def test_fitted_exponents_recover_the_power_laws(fake_sweep):
    spec, points = fake_sweep
    _, _, rows = report(Path(spec.out_dir), last=1)
    lines = preset_lines(points, rows, "flops_reached", "final_loss")  # what the plot draws
    assert list(lines) == ["tiny", "small"]
    assert len(lines["tiny"].xs) == 3 and len(lines["small"].xs) == 2  # the interrupted point is left out
    for preset, (a, b) in LAW.items():
        fit_a, fit_b = lines[preset].fit
        assert fit_b == pytest.approx(b, rel=0.01) and fit_a == pytest.approx(a, rel=0.01)
    uar = preset_lines(points, rows, "eval_flops", "final_probe_uar")
    assert uar["tiny"].fit[1] == pytest.approx(UAR_LAW[1], rel=0.01)
    assert uar["small"].fit is None and uar["small"].xs == []


def test_fit_power_law_needs_two_distinct_budgets():
    a, b = fit_power_law([1e10, 1e11, 1e12], [3 * c ** -0.2 for c in (1e10, 1e11, 1e12)])
    assert (a, b) == (pytest.approx(3, rel=1e-9), pytest.approx(-0.2, rel=1e-9))
    assert fit_power_law([1e10, 1e10], [1.0, 2.0]) is None
    assert fit_power_law([1e10, 1e11], [1.0, math.nan]) is None
    assert fit_power_law([], []) is None


def test_png_is_an_image_with_both_panels_from_the_yaml(fake_sweep, tmp_path):
    import matplotlib.image

    spec, _ = fake_sweep
    csv_path, png_path, _ = report(spec.path, out=tmp_path / "out")
    assert csv_path.parent == png_path.parent == tmp_path / "out"
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 300  # two panels side by side


def test_a_sweep_without_runs_or_eval_still_reports(write_sweep):
    spec = load_spec(write_sweep(grid={"preset": ["tiny"], "steps": [3, 6]}))
    points = build_points(spec)
    write_manifest(spec, points)
    csv_path, png_path, rows = report(Path(spec.out_dir))
    assert [r["status"] for r in rows] == ["new", "new"] and rows[0]["final_loss"] is None
    assert png_path.stat().st_size > 0
