"""Classification metrics of the emotion-recognition literature, a fold summary, and pictures.

* WAR (weighted average recall) = accuracy: correct / all test samples.
* UAR (unweighted average recall) = the mean over classes of each class's recall, so every class
  counts the same however rare. Classes with no test sample are left out of the mean (their recall
  is undefined) and reported as NaN in `per_class_recall`.
* Over folds: mean and population standard deviation (numpy's default, ddof=0) of each metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] int64 counts; rows are true classes, columns predictions."""
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape}, y_pred {p.shape}")
    for name, y in (("y_true", t), ("y_pred", p)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes})")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def uar(cm: np.ndarray) -> float:
    """Unweighted average recall over the classes present in the test set."""
    recall = per_class_recall(cm)
    present = ~np.isnan(recall)
    return float(recall[present].mean()) if present.any() else float("nan")


def war(cm: np.ndarray) -> float:
    """Weighted average recall, i.e. accuracy."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           num_classes: int) -> dict[str, Any]:
    """UAR, WAR, per-class recall and support, and the confusion matrix (as lists, for JSON)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    recall = per_class_recall(cm)
    return {
        "uar": uar(cm),
        "war": war(cm),
        "n": int(cm.sum()),
        "per_class_recall": [None if math.isnan(r) else float(r) for r in recall],
        "support": cm.sum(axis=1).tolist(),
        "confusion": cm.tolist(),
    }


def summarise(folds: dict[str, dict[str, Any]], keys: Sequence[str] = ("uar", "war")) -> dict[str, Any]:
    """Mean and standard deviation (ddof=0) over folds of each metric in `keys`."""
    out: dict[str, Any] = {"folds": len(folds)}
    for k in keys:
        values = np.array([f[k] for f in folds.values()], dtype=np.float64)
        out[f"{k}_mean"] = float(values.mean()) if values.size else float("nan")
        out[f"{k}_std"] = float(values.std()) if values.size else float("nan")
    return out


def format_summary(summary: dict[str, Any]) -> str:
    return (f"UAR {100 * summary['uar_mean']:.2f} ± {100 * summary['uar_std']:.2f}  "
            f"WAR {100 * summary['war_mean']:.2f} ± {100 * summary['war_std']:.2f}  "
            f"({summary['folds']} fold{'s' if summary['folds'] != 1 else ''})")


def save_confusion_png(cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A confusion-matrix picture: cells shaded by row-normalised recall, annotated with counts."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = max(3.5, 0.6 * n + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="recall (row-normalised)")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}\n{100 * norm[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    summary = f"UAR {100 * uar(cm):.1f}  WAR {100 * war(cm):.1f}  n={int(cm.sum())}"
    ax.set_title(f"{title}\n{summary}" if title else summary)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """JSON with NaN written as null (strict JSON readers reject NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(data), indent=2) + "\n")
    return path


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x
