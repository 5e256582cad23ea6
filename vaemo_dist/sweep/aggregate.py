"""Collect the runs of a sweep into one CSV row per point and a scaling plot (PNG).

Training FLOPs of a logged step are the record's `train_flops` when the trainer writes it, else
`samples_seen` (or step x global batch) x the point's training FLOPs per sample. The records are read
by `vaemo_dist.train.curves.read_metrics` (evaluations: `eval/...` keys; training steps: `loss`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaemo_dist.sweep.plan import (
    AXES,
    Point,
    SweepError,
    build_points,
    format_number,
    load_spec,
    point_status,
    read_manifest,
)
from vaemo_dist.train.curves import read_metrics

# Logged as eval/<key>; all but rec_loss are better when higher.
EVAL_KEYS = ("probe_uar", "probe_war", "r1_v2a", "r1_a2v", "rec_loss")
LOWER_IS_BETTER = {"rec_loss"}


@dataclass
class Curves:
    """One point's logged values against training FLOPs."""

    loss: list[tuple[float, float]] = field(default_factory=list)
    uar: list[tuple[float, float]] = field(default_factory=list)


def train_flops(record: dict[str, Any], point: Point) -> float:
    if record.get("train_flops") is not None:
        return float(record["train_flops"])
    seen = record.get("samples_seen", record["step"] * point.global_batch)
    return float(seen) * point.flops_per_sample


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fit_power_law(x: list[float], y: list[float]) -> tuple[float, float] | None:
    """Least squares of log y = log a + b log x: (a, b) of y = a x^b; None with < 2 distinct usable x."""
    pairs = [(math.log(u), math.log(v)) for u, v in zip(x, y)
             if _finite(u) and _finite(v) and u > 0 and v > 0]
    if len({p[0] for p in pairs}) < 2:
        return None
    n = len(pairs)
    mx, my = sum(p[0] for p in pairs) / n, sum(p[1] for p in pairs) / n
    sxx = sum((p[0] - mx) ** 2 for p in pairs)
    b = sum((p[0] - mx) * (p[1] - my) for p in pairs) / sxx
    return math.exp(my - b * mx), b


def summarise(point: Point, folder: Path, last: int = 5) -> tuple[dict[str, Any], Curves]:
    """The CSV row of one point and its curves. final_loss: mean of the last `last` logged losses;
    best_loss: the lowest such running mean over the run (a single step's loss is too noisy)."""
    train, evals = read_metrics(folder / "metrics.jsonl")
    losses = [r["loss"] for r in train if _finite(r.get("loss"))]
    windows = [sum(losses[i - last:i]) / last for i in range(last, len(losses) + 1)] or (
        [sum(losses) / len(losses)] if losses else [])
    row: dict[str, Any] = {
        "name": point.name, "preset": point.preset, "model_preset": point.model_preset,
        "params": point.params, "data_fraction": point.data_fraction, "data_shards": point.data_shards,
        "data_clips": point.data_clips, "seed": point.seed,
        **{k: v for k, v in point.axes.items() if k not in AXES},
        "steps": point.steps, "steps_reached": train[-1]["step"] if train else 0,
        "global_batch": point.global_batch, "flops_per_sample": point.flops_per_sample,
        "flops_budget": point.flops_budget, "flops_planned": point.flops_planned,
        "flops_reached": train_flops(train[-1], point) if train else 0.0,
        "final_loss": windows[-1] if windows else None, "best_loss": min(windows) if windows else None,
        "eval_flops": train_flops(evals[-1], point) if evals else None,
    }
    for key in EVAL_KEYS:
        values = [r[f"eval/{key}"] for r in evals if _finite(r.get(f"eval/{key}"))]
        pick = min if key in LOWER_IS_BETTER else max
        row[f"final_{key}"] = values[-1] if values else None
        row[f"best_{key}"] = pick(values) if values else None
    row["status"] = point_status(folder, point.steps).state
    curves = Curves(
        loss=[(train_flops(r, point), r["loss"]) for r in train if _finite(r.get("loss"))],
        uar=[(train_flops(r, point), r["eval/probe_uar"]) for r in evals if _finite(r.get("eval/probe_uar"))],
    )
    return row, curves


def line_label(point: Point) -> str:
    """Points on one line differ only in budget and seed: the preset plus any other axis of the grid."""
    extra = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.axes.items() if k not in AXES]
    if "data_fraction" in point.axes:
        extra.insert(0, f"data {format_number(point.data_fraction)}")
    return " ".join([point.preset, *extra])


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


@dataclass
class Line:
    """One line of a panel: the per-budget means of a preset's finished points and their power law."""

    xs: list[float]
    ys: list[float]
    fit: tuple[float, float] | None  # (a, b) of y = a C^b


def preset_lines(points: list[Point], rows: list[dict[str, Any]], x_key: str, y_key: str) -> dict[str, Line]:
    """Per line label (see line_label): for each budget, the mean (x, y) over seeds of the finished points
    with a value, sorted by x, and the power law fitted to them where there are >= 2 budgets."""
    buckets: dict[str, dict[Any, list[tuple[float, float]]]] = {}
    for point, row in zip(points, rows):
        x, y = row.get(x_key), row.get(y_key)
        budgets = buckets.setdefault(line_label(point), {})
        if row["status"] == "done" and _finite(x) and _finite(y) and x > 0:
            budget = point.flops_budget if point.flops_budget is not None else point.steps
            budgets.setdefault(budget, []).append((x, y))
    lines = {}
    for label, budgets in buckets.items():
        means = sorted((sum(x for x, _ in v) / len(v), sum(y for _, y in v) / len(v))
                       for v in budgets.values())
        xs, ys = [m[0] for m in means], [m[1] for m in means]
        lines[label] = Line(xs, ys, fit_power_law(xs, ys))
    return lines


def plot(title: str, points: list[Point], rows: list[dict[str, Any]], curves: list[Curves], path: Path,
         last: int = 5) -> None:
    """Loss and probe UAR against training FLOPs, log-log: each point's curve (thin), one line per preset
    through its finished points' final values (markers) and the fitted power law (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    members: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        members.setdefault(line_label(p), []).append(i)
    colors = plt.get_cmap("tab10")
    from matplotlib.ticker import NullFormatter

    # One compute axis for both panels: values line up, and it spans enough for labelled decades.
    fig, (ax_loss, ax_uar) = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    panels = [
        (ax_loss, "loss", "flops_reached", "final_loss", "L",
         f"training loss (mean of the last {last} logged steps)"),
        (ax_uar, "uar", "eval_flops", "final_probe_uar", "UAR",
         "linear-probe UAR (held-out clips, fraction)"),
    ]
    for ax, curve_key, x_key, y_key, symbol, ylabel in panels:
        drawn = False
        for g, (label, line) in enumerate(preset_lines(points, rows, x_key, y_key).items()):
            color = colors(g % 10)
            for i in members[label]:
                xy = [(x, y) for x, y in getattr(curves[i], curve_key) if x > 0 and y > 0]
                if xy:
                    ax.plot(*zip(*xy), color=color, alpha=0.3, linewidth=0.8)
                    drawn = True
            if line.xs:
                ax.plot(line.xs, line.ys, "o-", color=color, linewidth=2, markersize=6, label=label)
            if line.fit:  # drawn a little beyond the data, where it would not hide under the line
                a, b = line.fit
                lo, hi = min(line.xs) / 2, max(line.xs) * 2
                grid = [lo * (hi / lo) ** (k / 50) for k in range(51)]
                ax.plot(grid, [a * c ** b for c in grid], "--", color=color, linewidth=1.2,
                        label=rf"{label} fit: ${symbol} = {a:.3g}\,C^{{{b:.3f}}}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels at 2x, 3x... collide on a short range
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, title="markers: final values per budget\nthin: each run over training",
                      title_fontsize=8)
        else:
            ax.text(0.5, 0.5, "no evaluation records in these runs\n(eval.every = 0, or none logged yet)"
                    if curve_key == "uar" else "no training records yet", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
    ax_loss.set_title("loss vs compute")
    ax_uar.set_title("probe UAR vs compute")
    if not any(c.uar for c in curves):
        ax_uar.set_ylim(0.1, 1.0)  # a fraction; the empty panel keeps sensible axes
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(target: str | Path, out: str | Path | None = None,
           last: int = 5) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write `scaling.csv` and `scaling.png` for a sweep (its YAML file or its folder with sweep.json)
    into `out` (default: the sweep folder). Returns their paths and the rows."""
    target = Path(target)
    if target.is_dir():
        record, points = read_manifest(target)
        name, folder = record["name"], target
    elif target.is_file():
        spec = load_spec(target)
        points, name, folder = build_points(spec), spec.name, Path(spec.out_dir)
    else:
        raise SweepError(f"{target}: neither a sweep file nor a sweep folder")
    if last < 1:
        raise SweepError(f"--last {last}: must be >= 1")
    out_dir = Path(out) if out else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarise(p, folder / p.name, last) for p in points]
    rows = [s[0] for s in summaries]
    csv_path, png_path = out_dir / "scaling.csv", out_dir / "scaling.png"
    write_csv(rows, csv_path)
    done = sum(r["status"] == "done" for r in rows)
    plot(f"sweep {name}: {len(points)} points ({done} done)", points, rows, [s[1] for s in summaries],
         png_path, last)
    return csv_path, png_path, rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A short text table of the CSV for the terminal."""
    def fmt(key: str, v: Any) -> str:
        if v is None or v == "":
            return "-"
        if key == "params":
            return f"{v / 1e6:.1f}M"
        return format_number(v) if key.startswith("flops") else f"{v:.4g}" if isinstance(v, float) else str(v)

    keys = ["name", "params", "steps_reached", "flops_reached", "final_loss", "best_loss", "final_probe_uar",
            "status"]
    table = [keys] + [[fmt(k, r.get(k)) for k in keys] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table) + "\n"
