"""A run's metrics.jsonl read back, and drawn as one PNG of training curves.

    vaemo-plot runs/stage1-tiny                 # -> runs/stage1-tiny/curves.png
    vaemo-plot runs/a runs/b --out compare.png  # several runs on the same axes

Panels: the loss and its terms, the online-evaluation figures (probe, retrieval, validation
reconstruction), the learning rate, throughput with the share of each step spent waiting for data,
the gradient norm, and what was skipped (bad clips, unreadable shards, non-finite steps), all against
the step. Whatever a run did not log is left out: a stage-2 run shows its text-path terms instead of
stage 1's, a run without online evaluation has no evaluation panel content.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, smooth: int = 10,
              terms: Sequence[str] | None = None) -> Path:
    """Draw the curves of one or more runs (folders holding metrics.jsonl) into the PNG `out`. `terms`:
    the loss terms to draw (default: every one logged for a single run, only the total for several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        train, evals = read_metrics(Path(d) / METRICS_FILE)
        if not train and not evals:
            raise FileNotFoundError(f"no training or evaluation records in {Path(d) / METRICS_FILE}")
        runs.append((Path(d).name, train, evals))
    several = len(runs) > 1
    if terms is None:
        terms = ("loss",) if several else LOSS_TERMS
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    (ax_loss, ax_eval, ax_lr), (ax_speed, ax_grad, ax_skip) = axes
    colors = plt.get_cmap("tab10")
    ax_rec = ax_wait = None  # right-hand axes, made when something is drawn on them

    for r, (name, train, evals) in enumerate(runs):
        prefix = f"{name}: " if several else ""
        for t, key in enumerate(logged(train, terms)):
            steps, ys = _series(train, key)
            color = colors((r if several else t) % 10)
            style = ("-", "--", ":", "-.")[t % 4] if several else "-"
            ax_loss.plot(steps, ys, color=color, alpha=0.2, linewidth=0.7)
            ax_loss.plot(steps, _smooth(ys, smooth), style, color=color,
                         linewidth=1.6 if key == "loss" else 1.1, label=prefix + key)
        for e, key in enumerate(logged(evals, EVAL_SCORES)):
            steps, ys = _series(evals, key)
            ax_eval.plot(steps, ys, "o-", color=colors((r * 4 + e) % 10), markersize=4,
                         label=prefix + key.removeprefix("eval/"))
        rec = logged(evals, EVAL_LOSSES)
        if rec:
            ax_rec = ax_rec or ax_eval.twinx()
            for e, key in enumerate(rec):
                steps, ys = _series(evals, key)
                ax_rec.plot(steps, ys, "s--", color="grey", alpha=0.4 + 0.2 * e, markersize=3,
                            label=prefix + key.removeprefix("eval/"))
        color = colors(r % 10)
        steps, ys = _series(train, "lr")
        ax_lr.plot(steps, ys, color=color, label=name)
        steps, ys = _series(train, "samples_per_s")
        ax_speed.plot(steps, ys, color=color, alpha=0.25, linewidth=0.7)
        ax_speed.plot(steps, _smooth(ys, smooth), color=color, label=prefix + "samples/s")
        steps, ys = _series(train, "data_wait_frac")
        if ys:
            ax_wait = ax_wait or ax_speed.twinx()
            ax_wait.plot(steps, [100 * y for y in _smooth(ys, smooth)], "--", color=color, alpha=0.7,
                         label=prefix + "waiting for data (%)")
            ax_wait.set_ylabel("waiting for data (% of the step)")
            ax_wait.set_ylim(0, 100)
        steps, ys = _series(train, "grad_norm")
        if ys:
            ax_grad.plot(steps, ys, color=color, alpha=0.25, linewidth=0.7)
            ax_grad.plot(steps, _smooth(ys, smooth), color=color, label=name)
        for s, key in enumerate(SKIP_COUNTS):
            steps, ys = _series(train, key)
            if ys:
                ax_skip.step(steps, ys, where="post", color=colors((r * 3 + s) % 10), label=prefix + key)

    ax_loss.set_title(f"loss terms (faint: per step; solid: mean of {smooth})")
    ax_loss.set_ylabel("loss")
    ax_eval.set_title("online evaluation (held-out clips)")
    ax_eval.set_ylabel("probe UAR / WAR, recall@1 (fraction)")
    ax_lr.set_title("learning rate")
    ax_lr.set_ylabel("lr")
    ax_speed.set_title("throughput")
    ax_speed.set_ylabel("samples/s (global)")
    ax_grad.set_title("gradient norm (before clipping)")
    ax_grad.set_ylabel("global L2 norm")
    ax_skip.set_title("skipped so far")
    ax_skip.set_ylabel("count (cumulative)")
    if any(ax_grad.lines):
        ax_grad.set_yscale("log")
    skipped = max((max(line.get_ydata(), default=0) for line in ax_skip.lines), default=0)
    ax_skip.set_ylim(0, max(1, 1.1 * skipped))
    ax_skip.yaxis.get_major_locator().set_params(integer=True)
    if ax_skip.lines and not skipped:
        ax_skip.text(0.5, 0.6, "nothing skipped", transform=ax_skip.transAxes, ha="center", color="grey")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if ax is ax_eval and ax_rec is not None:
            more = ax_rec.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
            ax_rec.set_ylabel("validation reconstruction loss (grey)")
        if ax is ax_speed and ax_wait is not None:
            more = ax_wait.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            ax.legend(handles, labels, fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
    fig.suptitle(", ".join(name for name, _, _ in runs))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
        print(f"vaemo-plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
