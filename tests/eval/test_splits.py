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
