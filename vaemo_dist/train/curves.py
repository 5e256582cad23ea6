"""A run's metrics.jsonl read back, and drawn as one PNG of training curves.

    vaemo-plot runs/stage1-tiny                 # -> runs/stage1-tiny/curves.png
    vaemo-plot runs/a runs/b --out compare.png  # several runs on the same axes

Panels: the loss and its terms, the online-evaluation figures (probe, retrieval, validation
reconstruction), the learning rate, throughput with the share of each step spent waiting for data,
the gradient norm, and what was skipped (bad clips, unreadable shards, non-finite steps), all against
the step. Whatever a run did not log is left out: a stage-2 run shows its text-path terms instead of
stage 1's, and a panel nothing was logged for (evaluation in a run without it, e.g. a fine-tuning
fold) is not drawn. The evaluation panel's title names the held-out set the records say they used
(`eval/set`). Several runs: one colour per run in every panel, named in a legend below the figure.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaemo_dist.startup import entry_point, fail

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# Loss terms by stage, drawn when logged (the first is the total).
LOSS_TERMS = ("loss", "rec_video", "rec_audio", "contrastive", "text_joint", "text_audio", "text_video",
              "stage1_loss", "ce")
EVAL_SCORES = ("eval/probe_uar", "eval/probe_war", "eval/r1_v2a", "eval/r1_a2v", "eval/zero_shot_uar",
               "eval/zero_shot_war", "eval/zero_shot_uar_audio", "eval/zero_shot_uar_video")
EVAL_LOSSES = ("eval/rec_loss", "eval/rec_video", "eval/rec_audio")
SKIP_COUNTS = ("skipped_decode", "skipped_shards", "nonfinite_steps")


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of a metrics.jsonl, each sorted by step; [] if absent.
    Records with `eval/...` keys are evaluations, records with `loss` training steps; a line cut short
    by a kill is passed over."""
    train, evals = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if any(k.startswith("eval/") for k in record):
            evals.append(record)
        elif "loss" in record:
            train.append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if _finite(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def logged(records: list[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """The keys, in order, that have a finite value in at least one record."""
    return [k for k in keys if any(_finite(r.get(k)) for r in records)]


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (steps are noisy; the raw curve is drawn faintly beside it)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass
class _Series:
    run: int  # index of the run
    key: str  # metric name
    steps: list[int]
    ys: list[float]
    slot: int  # index of the key among the panel's keys: its line style (several runs) or colour (one)
    right: bool = False  # drawn on the panel's right-hand axis


@dataclass
class _Panel:
    title: str
    ylabel: str
    kind: str  # "smooth" (faint per step, solid running mean), "points" (evaluations), "line", "count"
    series: list[_Series] = field(default_factory=list)
    right_label: str = ""
    log_y: bool = False
    note: str = ""  # text drawn in the panel (e.g. "nothing skipped")


STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def run_colors(n: int) -> list[tuple[float, ...]]:
    """`n` distinct colours, one per run: tab10 up to 10 runs, tab20 up to 20, then spread over turbo."""
    import matplotlib.pyplot as plt

    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]


def eval_sets(evals: list[dict[str, Any]]) -> list[str]:
    """The names of the held-out sets a run's evaluation records say they used (`eval/set`), in order."""
    names: list[str] = []
    for r in evals:
        name = r.get("eval/set")
        if isinstance(name, str) and name not in names:
            names.append(name)
    return names


def _panels(runs: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]], terms: Sequence[str],
            smooth: int) -> list[_Panel]:
    """The panels, each with every run's series; a panel no run logged anything for has none."""
    sets = [s for _, _, evals in runs for s in eval_sets(evals)]
    on = f" on {', '.join(dict.fromkeys(sets))}" if sets else " (held-out clips)"
    loss = _Panel(f"loss terms (faint: per step; solid: mean of {smooth})", "loss", "smooth")
    evaluation = _Panel("online evaluation" + on, "probe UAR / WAR, recall@1 (fraction)", "points",
                        right_label="validation reconstruction loss")
    lr = _Panel("learning rate", "lr", "line")
    speed = _Panel(f"throughput (faint: per step; solid: mean of {smooth})", "samples/s (global)", "smooth",
                   right_label="waiting for data (% of the step)")
    grad = _Panel("gradient norm (before clipping)", "global L2 norm", "smooth", log_y=True)
    skip = _Panel("skipped so far", "count (cumulative)", "count")
    loss_keys = [k for k in terms if any(k in logged(train, terms) for _, train, _ in runs)]
    score_keys = [k for k in EVAL_SCORES if any(logged(evals, [k]) for _, _, evals in runs)]
    rec_keys = [k for k in EVAL_LOSSES if any(logged(evals, [k]) for _, _, evals in runs)]
    skip_keys = [k for k in SKIP_COUNTS if any(logged(train, [k]) for _, train, _ in runs)]

    def add(panel: _Panel, r: int, records: list[dict[str, Any]], keys: list[str], offset: int = 0,
            right: bool = False) -> None:
        for i, key in enumerate(keys):
            steps, ys = _series(records, key)
            if ys:
                panel.series.append(_Series(r, key, steps, ys, offset + i, right))

    for r, (_, train, evals) in enumerate(runs):
        add(loss, r, train, loss_keys)
        add(evaluation, r, evals, score_keys)
        add(evaluation, r, evals, rec_keys, offset=len(score_keys), right=True)
        add(lr, r, train, ["lr"])
        add(speed, r, train, ["samples_per_s"])
        add(speed, r, train, ["data_wait_frac"], offset=1, right=True)
        add(grad, r, train, ["grad_norm"])
        add(skip, r, train, skip_keys)
    if skip.series and not any(max(s.ys) for s in skip.series):
        skip.note = "nothing skipped"
    return [p for p in (loss, evaluation, lr, speed, grad, skip) if p.series]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, smooth: int = 10,
              terms: Sequence[str] | None = None) -> Path:
    """Draw the curves of one or more runs (folders holding metrics.jsonl) into the PNG `out`. `terms`:
    the loss terms to draw (default: every one logged for a single run, only the total for several)."""
    import matplotlib.pyplot as plt

    fig = draw_runs(run_dirs, smooth, terms)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_runs(run_dirs: Sequence[str | Path], smooth: int = 10,
              terms: Sequence[str] | None = None) -> Figure:
    """The figure of plot_runs. Only panels with data are drawn. One run: a colour per curve, each
    panel's legend below it. Several runs: a colour per run, the same in every panel (named in the
    legend below the figure); the curves of one panel are told apart by line style (its legend below
    it). No legend sits on the data. Each curve's gid is `<run name>|<metric>`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = []
    for d in run_dirs:
        train, evals = read_metrics(Path(d) / METRICS_FILE)
        if not train and not evals:
            raise FileNotFoundError(f"no training or evaluation records in {Path(d) / METRICS_FILE}")
        runs.append((Path(d).name, train, evals))
    names = [name for name, _, _ in runs]
    if len(set(names)) < len(names):  # e.g. fold_1 of two fine-tunings: name them by their parent too
        runs = [(f"{Path(d).parent.name}/{Path(d).name}", t, e) for d, (_, t, e) in zip(run_dirs, runs)]
    several = len(runs) > 1
    if terms is None:
        terms = ("loss",) if several else LOSS_TERMS
    panels = _panels(runs, terms, smooth)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.8 * cols, 4.6 * rows + (0.5 if several else 0)),
                             squeeze=False, layout="constrained")
    palette = run_colors(len(runs)) if several else plt.get_cmap("tab10").colors
    for ax in axes.flat[len(panels):]:
        ax.remove()  # a grid slot with no panel stays blank, not an empty frame

    for panel, ax in zip(panels, axes.flat):
        right = ax.twinx() if any(s.right for s in panel.series) else None
        entries: dict[str, Line2D] = {}  # legend: one entry per curve (one run) or per key (several)
        for s in panel.series:
            target = right if s.right else ax
            color = palette[s.run] if several else palette[s.slot % 10]
            style = STYLES[s.slot % len(STYLES)] if several else ("--" if s.right else "-")
            ys = [100 * y for y in s.ys] if s.key == "data_wait_frac" else s.ys
            label = s.key.removeprefix("eval/")
            if s.key == "data_wait_frac":
                label = "waiting for data (%)"
            marker = MARKERS[s.slot % len(MARKERS)] if panel.kind == "points" else None
            if panel.kind == "smooth":
                drawn = target.plot(s.steps, ys, color=color, alpha=0.2, linewidth=0.7)
                drawn += target.plot(s.steps, _smooth(ys, smooth), style, color=color,
                                     linewidth=1.6 if s.key == "loss" else 1.1)
            elif panel.kind == "points":
                drawn = target.plot(s.steps, ys, style, marker=marker, color=color, markersize=4,
                                    alpha=0.7 if s.right else 1.0)
            elif panel.kind == "count":
                drawn = target.step(s.steps, ys, style, where="post", color=color)
            else:
                drawn = target.plot(s.steps, ys, style, color=color)
            for line in drawn:
                line.set_gid(f"{runs[s.run][0]}|{s.key}")
            entries.setdefault(label, Line2D([], [], color="black" if several else color, linestyle=style,
                                             marker=marker, markersize=4))
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if right is not None:
            right.set_ylabel(panel.right_label)
            if panel.right_label.startswith("waiting"):
                right.set_ylim(0, 100)
        if panel.log_y:
            ax.set_yscale("log")
        if panel.kind == "count":
            top = max(max(s.ys) for s in panel.series)
            ax.set_ylim(0, max(1, 1.1 * top))
            ax.yaxis.get_major_locator().set_params(integer=True)
        if panel.note:
            ax.text(0.5, 0.6, panel.note, transform=ax.transAxes, ha="center", color="grey")
        if len(entries) > 1:
            ax.legend(list(entries.values()), list(entries), loc="upper center", bbox_to_anchor=(0.5, -0.16),
                      ncol=min(3, len(entries)), fontsize=7, frameon=False)
    if several:
        handles = [Line2D([], [], color=palette[r], linewidth=2.5) for r in range(len(runs))]
        fig.legend(handles, [name for name, _, _ in runs], loc="outside lower center",
                   ncol=min(len(runs), 6), fontsize=8, frameon=False)
    fig.suptitle(", ".join(name for name, _, _ in runs))
    return fig


@entry_point("vaemo-plot")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Training curves of one or more runs as a PNG.")
    p.add_argument("runs", nargs="+", help="run folders (runs/<train.run_name>) holding metrics.jsonl")
    p.add_argument("--out", default=None, help=f"the PNG (default: <run>/{CURVES_FILE} for one run, "
                   f"{CURVES_FILE} here for several)")
    p.add_argument("--smooth", type=int, default=10, help="steps in the running mean (default 10)")
    p.add_argument("--terms", default=None, help="comma-separated loss terms to draw (default: all that "
                   "were logged for one run, `loss` for several), e.g. loss,rec_video,contrastive")
    args = p.parse_args(argv)
    out = args.out or (Path(args.runs[0]) / CURVES_FILE if len(args.runs) == 1 else Path(CURVES_FILE))
    try:
        terms = args.terms.split(",") if args.terms else None
        path = plot_runs(args.runs, out, max(1, args.smooth), terms)
    except FileNotFoundError as e:
        return fail(f"vaemo-plot: {e}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
