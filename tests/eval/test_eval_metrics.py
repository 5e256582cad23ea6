import json
import math

import numpy as np
import pytest

from vaemo_dist.eval.metrics import (
    classification_metrics,
    confusion_matrix,
    save_confusion_png,
    summarise,
    uar,
    war,
    write_json,
)


def test_uar_and_war_against_a_hand_computed_example():
    # class 0: 3 of 4 right, class 1: 1 of 2, class 2: 1 of 2 -> UAR (0.75 + 0.5 + 0.5) / 3, WAR 5 / 8
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 1]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert uar(cm) == pytest.approx(0.5833333333)
    assert war(cm) == pytest.approx(0.625)
    m = classification_metrics(y_true, y_pred, 3)
    assert m["per_class_recall"] == [0.75, 0.5, 0.5] and m["support"] == [4, 2, 2] and m["n"] == 8


def test_uar_differs_from_war_under_imbalance_and_skips_absent_classes():
    # Always predicting the majority class: WAR 0.9, UAR 0.5.
    y_true = [0] * 9 + [1]
    m = classification_metrics(y_true, [0] * 10, 3)
    assert m["war"] == pytest.approx(0.9) and m["uar"] == pytest.approx(0.5)
    assert m["per_class_recall"][2] is None  # class 2 has no test clip: not in the mean


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 0], 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix([0, 1], [0], 3)


def test_summary_over_folds():
    s = summarise({"1": {"uar": 0.5, "war": 0.6}, "2": {"uar": 0.7, "war": 0.8}})
    assert s["folds"] == 2
    assert s["uar_mean"] == pytest.approx(0.6) and s["uar_std"] == pytest.approx(0.1)  # ddof=0
    assert s["war_mean"] == pytest.approx(0.7) and s["war_std"] == pytest.approx(0.1)


def test_confusion_png_and_json(tmp_path):
    cm = np.array([[3, 1], [0, 2]])
    png = save_confusion_png(cm, ["calm", "angry"], tmp_path / "cm.png", "test")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    out = write_json(tmp_path / "m.json", {"uar": math.nan, "list": [1.0, math.nan]})
    assert json.loads(out.read_text()) == {"uar": None, "list": [1.0, None]}
