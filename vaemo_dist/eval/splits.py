"""Evaluation protocols: which clips train and which test, per fold.

A split file is a CSV with a header row, in one of two forms (clips are named by key, see
vaemo_dist/data/sources.py):

1. Fold assignment, `key,fold`: every clip belongs to one test fold. Fold f tests on its clips and
   trains on the clips of every other fold. Fits protocols whose test folds partition the data:
   CREMA-D 5-fold (speaker-independent), RAVDESS 6-fold (by actor group), DFEW / MAFW 5-fold.

       key,fold
       1001_DFA_ANG_XX,1
       1002_DFA_ANG_XX,2

2. Explicit lists, `fold,split,key` with split in train / val / test: for official per-fold lists
   (DFEW's and MAFW's set_1 ... set_5 train/test files) and protocols with a validation set.

       fold,split,key
       1,train,00001
       1,test,00002

Without a split file, a manifest's (or shard json's) `fold` column gives form 1 and a `split` column
gives one fold named "1" in form 2. Otherwise seeded k folds are made: `grouped_folds` when the clips
are grouped (by speaker: no group is ever in a fold's train and test; sklearn's StratifiedGroupKFold
keeps the class balance as close as the groups allow), `stratified_folds` for clip-level folds.
`write_fold_file` records the folds used, with each clip's group, in a form `read_split_file` reads.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


class SplitError(ValueError):
    pass


@dataclass
class Fold:
    name: str
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)


def _split_name(value: str, where: str) -> str:
    name = SPLIT_NAMES.get(value.strip().lower())
    if name is None:
        raise SplitError(f"{where}: split {value!r} is not one of train, val, test")
    return name


def _fold_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def folds_from_assignment(pairs: Iterable[tuple[str, str]]) -> dict[str, Fold]:
    """(key, test fold) pairs -> folds: fold f tests on its keys, trains on all the others."""
    by_fold: dict[str, list[str]] = {}
    for key, fold in pairs:
        by_fold.setdefault(str(fold), []).append(key)
    if len(by_fold) < 2:
        raise SplitError(f"a fold assignment needs at least 2 folds, got {sorted(by_fold)}")
    folds = {}
    for name in sorted(by_fold, key=_fold_order):
        train = [k for other, keys in by_fold.items() if other != name for k in keys]
        folds[name] = Fold(name, train=train, test=list(by_fold[name]))
    return folds


def read_split_file(path: str | Path) -> dict[str, Fold]:
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    if {"fold", "split", "key"} <= columns:
        folds: dict[str, Fold] = {}
        for i, row in enumerate(rows):
            name = row["fold"].strip()
            fold = folds.setdefault(name, Fold(name))
            getattr(fold, _split_name(row["split"], f"{path}, row {i + 2}")).append(row["key"].strip())
        return {k: folds[k] for k in sorted(folds, key=_fold_order)}
    if {"key", "fold"} <= columns:
        return folds_from_assignment((row["key"].strip(), row["fold"].strip()) for row in rows)
    raise SplitError(f"{path}: header must be 'key,fold' or 'fold,split,key', got {sorted(columns)}")


def folds_from_columns(keys: Sequence[str], folds: Sequence[str | None],
                       splits: Sequence[str | None]) -> dict[str, Fold] | None:
    """Folds from per-clip `fold` or `split` values (a manifest's columns); None if there are none."""
    if any(f is not None for f in folds):
        return folds_from_assignment((k, f) for k, f in zip(keys, folds) if f is not None)
    if any(s is not None for s in splits):
        fold = Fold("1")
        for k, s in zip(keys, splits):
            if s is not None:
                getattr(fold, _split_name(s, f"clip {k}")).append(k)
        return {"1": fold}
    return None


def stratified_folds(keys: Sequence[str], labels: Sequence[int], k: int = 5,
                     seed: int = 0) -> dict[str, Fold]:
    """Seeded stratified k-fold: each class's clips shuffled and dealt round-robin to the folds."""
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    labels_arr = np.asarray(labels)
    offset = 0
    for c in sorted(set(labels_arr.tolist())):
        idx = np.flatnonzero(labels_arr == c)
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            assignment[keys[i]] = str((offset + j) % k + 1)
        offset += len(idx)  # continue dealing where the last class stopped: folds stay even in size
    return folds_from_assignment((key, assignment[key]) for key in keys if key in assignment)


def grouped_folds(keys: Sequence[str], labels: Sequence[int], groups: Sequence[str], k: int = 5,
                  seed: int = 0, what: str = "group") -> dict[str, Fold]:
    """Seeded k folds stratified by class within the grouping: every group's clips in one test fold
    (sklearn's StratifiedGroupKFold, shuffled with `seed`). `what` names the groups in errors."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    if not (len(keys) == len(labels) == len(groups)):
        raise ValueError("keys, labels and groups must be as long as each other")
    n_groups = len(set(groups))
    if n_groups < k:
        fix = f"use --kfold {n_groups}" if n_groups >= 2 else "there is nothing to hold out by"
        raise SplitError(f"{k} folds grouped by {what} need at least {k} different {what} values; the "
                         f"labelled clips have {n_groups} ({fix}, or clip-level folds: --group-by none)")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    assignment: dict[str, str] = {}
    with warnings.catch_warnings():  # "least populated class has only n members": expected when small
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, test) in enumerate(splitter.split(np.zeros(len(keys)), np.asarray(labels), list(groups))):
            for i in test:
                assignment[keys[i]] = str(f + 1)
    return folds_from_assignment((key, assignment[key]) for key in keys)


def group_overlap(folds: dict[str, Fold], group_of: dict[str, str]) -> dict[str, list[str]]:
    """Per fold, the groups (speakers) that have clips in both its train and its test split."""
    overlap = {}
    for name, fold in folds.items():
        test = {group_of[k] for k in fold.test if k in group_of}
        train = {group_of[k] for k in fold.train if k in group_of}
        if test & train:
            overlap[name] = sorted(test & train)
    return overlap


def is_assignment(folds: dict[str, Fold]) -> bool:
    """Whether `folds` is a fold assignment (form 1): disjoint test sets, each fold training on the
    test clips of all the others, no validation clips."""
    tests = [k for f in folds.values() for k in f.test]
    if len(tests) != len(set(tests)) or any(f.val for f in folds.values()):
        return False
    everything = set(tests)
    return all(sorted(f.train) == sorted(everything - set(f.test)) for f in folds.values())


def write_fold_file(path: str | Path, folds: dict[str, Fold], group_of: dict[str, str] | None = None) -> Path:
    """The folds as a split file (`key,fold,group` for an assignment, else `fold,split,key,group`),
    which `read_split_file` reads back (it ignores the group column). Written atomically."""
    from vaemo_dist.fsutil import write_atomic

    group_of = group_of or {}
    rows: list[list[str]]
    if is_assignment(folds):
        rows = [["key", "fold", "group"]] + [[k, name, group_of.get(k, "")]
                                             for name, f in folds.items() for k in f.test]
    else:
        rows = [["fold", "split", "key", "group"]] + [
            [name, split, k, group_of.get(k, "")]
            for name, f in folds.items() for split in ("train", "val", "test") for k in getattr(f, split)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    path = Path(path)
    write_atomic(path, buf.getvalue())
    return path


def select_folds(folds: dict[str, Fold], wanted: str | Sequence[str] | None) -> dict[str, Fold]:
    """`wanted`: None/"all", or fold names ("1,3" or a list)."""
    if wanted is None or wanted == "all":
        return folds
    names = [w.strip() for w in (wanted.split(",") if isinstance(wanted, str) else wanted) if w.strip()]
    missing = [n for n in names if n not in folds]
    if missing:
        raise SplitError(f"folds {missing} not in the split (have {list(folds)})")
    return {n: folds[n] for n in names}


def check_keys(folds: dict[str, Fold], available: Iterable[str]) -> dict[str, int]:
    """Fail if a fold names no available clip; return how many keys of the split are unavailable."""
    have = set(available)
    missing = {}
    for fold in folds.values():
        for split in ("train", "test"):
            keys = getattr(fold, split)
            found = [k for k in keys if k in have]
            if keys and not found:
                raise SplitError(f"fold {fold.name}: none of its {len(keys)} {split} keys is in the data "
                                 f"(e.g. {keys[:3]}; the data has e.g. {sorted(have)[:3]})")
            if not keys:
                raise SplitError(f"fold {fold.name} has no {split} clips")
            missing[f"{fold.name}/{split}"] = len(keys) - len(found)
    return missing
