import pytest

from vaemo_dist.eval.splits import (
    SplitError,
    check_keys,
    folds_from_columns,
    read_split_file,
    select_folds,
    stratified_folds,
)


def test_fold_assignment_file(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("key,fold\na,1\nb,1\nc,2\nd,2\ne,3\n")
    folds = read_split_file(path)
    assert list(folds) == ["1", "2", "3"]
    assert folds["1"].test == ["a", "b"] and sorted(folds["1"].train) == ["c", "d", "e"]
    assert folds["3"].test == ["e"] and folds["3"].val == []


def test_explicit_list_file(tmp_path):
    path = tmp_path / "sets.csv"
    path.write_text("fold,split,key\n1,train,a\n1,Train,b\n1,test,c\n2,train,c\n2,validation,a\n2,test,b\n")
    folds = read_split_file(path)
    assert folds["1"].train == ["a", "b"] and folds["1"].test == ["c"]
    assert folds["2"].val == ["a"] and folds["2"].test == ["b"]
    bad = tmp_path / "bad.csv"
    bad.write_text("fold,split,key\n1,holdout,a\n")
    with pytest.raises(SplitError, match="holdout"):
        read_split_file(bad)
    (tmp_path / "what.csv").write_text("name,group\na,1\n")
    with pytest.raises(SplitError, match="header"):
        read_split_file(tmp_path / "what.csv")


def test_folds_from_manifest_columns():
    folds = folds_from_columns(["a", "b", "c"], ["1", "2", "2"], [None, None, None])
    assert folds["2"].test == ["b", "c"] and folds["2"].train == ["a"]
    single = folds_from_columns(["a", "b", "c"], [None] * 3, ["train", "train", "test"])
    assert list(single) == ["1"] and single["1"].test == ["c"]
    assert folds_from_columns(["a"], [None], [None]) is None


def test_stratified_folds_partition_and_balance():
    keys = [f"k{i}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    folds = stratified_folds(keys, labels, k=5, seed=1)
    tests = [k for f in folds.values() for k in f.test]
    assert sorted(tests) == sorted(keys)  # every clip tested exactly once
    for f in folds.values():
        assert len(f.test) == 6 and sorted(labels[keys.index(k)] for k in f.test) == [0, 0, 1, 1, 2, 2]
        assert not set(f.test) & set(f.train)
    assert stratified_folds(keys, labels, k=5, seed=1)["1"].test == folds["1"].test  # seeded
    assert stratified_folds(keys, labels, k=5, seed=2)["1"].test != folds["1"].test


def test_selecting_and_checking_folds():
    folds = stratified_folds([f"k{i}" for i in range(10)], [i % 2 for i in range(10)], k=2)
    assert list(select_folds(folds, "2")) == ["2"]
    assert list(select_folds(folds, None)) == ["1", "2"]
    with pytest.raises(SplitError, match="not in the split"):
        select_folds(folds, "1,7")
    missing = check_keys(folds, [f"k{i}" for i in range(9)])  # k9 is gone: tested once, trained once
    assert sum(missing.values()) == 2 and set(missing) == {"1/train", "1/test", "2/train", "2/test"}
    with pytest.raises(SplitError, match="none of its"):
        check_keys(folds, ["other"])


def _speaker_data(speakers=6, classes=3, per=4, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    keys, labels, groups = [], [], []
    for s in range(speakers):
        for c in range(classes):
            for i in range(per + int(rng.integers(0, 3))):  # uneven counts, as real corpora have
                keys.append(f"s{s}_c{c}_{i}")
                labels.append(c)
                groups.append(f"spk{s}")
    return keys, labels, groups


def test_grouped_folds_never_put_a_speaker_in_train_and_test():
    from vaemo_dist.eval.splits import group_overlap, grouped_folds

    keys, labels, groups = _speaker_data()
    group_of = dict(zip(keys, groups))
    folds = grouped_folds(keys, labels, groups, k=3, seed=0, what="speaker")
    assert sorted(k for f in folds.values() for k in f.test) == sorted(keys)  # each clip tested once
    for f in folds.values():
        assert not {group_of[k] for k in f.train} & {group_of[k] for k in f.test}
        assert {labels[keys.index(k)] for k in f.test} == {0, 1, 2}  # stratified: every class tested
    assert group_overlap(folds, group_of) == {}
    assert grouped_folds(keys, labels, groups, k=3, seed=0)["1"].test == folds["1"].test  # seeded
    # Clip-level folds of the same data do mix speakers (what --group-by none asks for).
    assert group_overlap(stratified_folds(keys, labels, k=3, seed=0), group_of)


def test_grouped_folds_need_as_many_groups_as_folds():
    from vaemo_dist.eval.splits import grouped_folds

    keys, labels, groups = _speaker_data(speakers=3)
    with pytest.raises(SplitError, match=r"at least 5 different speaker values.*have 3.*--kfold 3"):
        grouped_folds(keys, labels, groups, k=5, what="speaker")


def test_fold_file_records_the_folds_and_reads_back(tmp_path):
    from vaemo_dist.eval.splits import grouped_folds, write_fold_file

    keys, labels, groups = _speaker_data(speakers=4)
    folds = grouped_folds(keys, labels, groups, k=4)
    path = write_fold_file(tmp_path / "folds.csv", folds, dict(zip(keys, groups)))
    lines = path.read_text().splitlines()
    assert lines[0] == "key,fold,group" and len(lines) == len(keys) + 1
    again = read_split_file(path)
    assert {n: sorted(f.test) for n, f in again.items()} == {n: sorted(f.test) for n, f in folds.items()}
    # Explicit lists (a validation split, or tests that overlap) keep the fold,split,key form.
    listed = read_split_file(_write(tmp_path / "sets.csv", "fold,split,key\n1,train,a\n1,val,b\n1,test,c\n"))
    write_fold_file(tmp_path / "out.csv", listed)
    assert (tmp_path / "out.csv").read_text().splitlines()[:2] == ["fold,split,key,group", "1,train,a,"]
    assert read_split_file(tmp_path / "out.csv")["1"].val == ["b"]


def _write(path, text):
    path.write_text(text)
    return path
