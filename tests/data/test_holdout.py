"""eval.holdout's split of the training shards (vaemo_dist/data/holdout.py): which keys training never
reads. The split itself (by speaker, written once, reused) is also exercised through online evaluation
in tests/eval/test_online.py."""

import json

import webdataset as wds

from vaemo_dist.config import load_config
from vaemo_dist.data.holdout import HOLDOUT_FILE, splits_training, training_holdout


def _shards(root, n=12):
    """One shard of `n` clips (json only: the split reads nothing else), 4 speakers."""
    root.mkdir()
    with wds.TarWriter(str(root / "shard-000000.tar")) as w:
        for i in range(n):
            w.write({"__key__": f"clip{i:03d}", "json": json.dumps({"speaker": f"spk{i % 4}"}).encode()})
    return [str(root / "shard-000000.tar")]


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"data.shards={tmp_path / 'shards'}", f"train.out_dir={tmp_path}",
                              "train.run_name=run", *overrides])


def test_the_split_applies_only_with_evaluation_on_the_training_shards(tmp_path, caplog):
    urls = _shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING"):
        off = _cfg(tmp_path, "eval.holdout=0.25", "eval.every=0")
        assert not splits_training(off) and training_holdout(off, run_dir, urls, write=True) is None
    assert "eval.every is 0: no evaluation, nothing held out" in caplog.text
    other = _cfg(tmp_path, "eval.every=5", f"eval.shards={tmp_path / 'shards'}")
    assert training_holdout(other, run_dir, urls, write=True) is None  # held-out shards of their own
    assert not (run_dir / HOLDOUT_FILE).exists()

    on = _cfg(tmp_path, "eval.holdout=0.25", "eval.every=5")
    held = training_holdout(on, run_dir, urls, write=True)
    assert held is not None and len(held.keys) == 3 and held.by == "speaker" and len(held.speakers) == 1
    assert json.loads((run_dir / HOLDOUT_FILE).read_text())["keys"] == held.keys
    assert training_holdout(on, run_dir, urls, write=False).keys == held.keys  # read back, as on resume


def test_eval_online_names_are_the_data_ones():
    from vaemo_dist.data import holdout
    from vaemo_dist.eval import online

    for name in ("Holdout", "HoldoutError", "ensure_holdout", "split_holdout", "HOLDOUT_FILE",
                 "training_urls"):
        assert getattr(online, name) is getattr(holdout, name)
