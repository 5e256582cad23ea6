import numpy as np

from vaemo_dist.eval.probe import L2_GRID, choose_l2, fit_logistic, probe_folds
from vaemo_dist.eval.splits import stratified_folds


def blobs(n_per_class=40, classes=3, dim=16, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim)) + 100.0  # an offset the standardisation removes
    return x.astype(np.float32), y


def test_probe_separates_separable_classes_and_is_deterministic():
    x, y = blobs()
    a = fit_logistic(x[::2], y[::2], 3, l2=1e-2)
    b = fit_logistic(x[::2], y[::2], 3, l2=1e-2)
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    assert (a.predict(x[1::2]) == y[1::2]).mean() > 0.95


def test_probe_on_noise_is_at_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 16)), rng.integers(0, 3, 300)
    probe = fit_logistic(x[:200], y[:200], 3, l2=1.0)
    assert abs((probe.predict(x[200:]) == y[200:]).mean() - 1 / 3) < 0.15


def test_a_larger_penalty_shrinks_the_weights_and_auto_picks_from_the_grid():
    x, y = blobs(spread=3.0)
    small, large = fit_logistic(x, y, 3, l2=1e-3), fit_logistic(x, y, 3, l2=1.0)
    assert np.abs(large.weight).sum() < 0.5 * np.abs(small.weight).sum()
    assert choose_l2(x, y, 3) in L2_GRID


def test_probe_folds_reports_per_fold_metrics():
    x, y = blobs(n_per_class=20)
    keys = [f"c{i}" for i in range(len(y))]
    y_with_unknown = y.copy()
    y_with_unknown[0] = -1  # unlabelled clips are left out
    folds = stratified_folds(keys[1:], y[1:].tolist(), k=4)
    results = probe_folds(x, y_with_unknown, keys, folds, 3, l2=0.01)
    assert list(results) == ["1", "2", "3", "4"]
    assert sum(r["n"] for r in results.values()) == len(y) - 1
    assert all(r["uar"] > 0.9 and r["l2"] == 0.01 for r in results.values())
    assert "c0" not in [k for r in results.values() for k in r["keys"]]
