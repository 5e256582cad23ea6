"""launchers/finetune.py end to end on a tiny synthetic corpus: linear probe in-process, full
fine-tuning through the DeepSpeed trainer (one process, and two over gloo)."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaemo_dist.config import load_config
from vaemo_dist.data.shards import expand_shards, read_shard
from vaemo_dist.export import is_decoder_key, save_pretrained
from vaemo_dist.model.vaemo import VAEmoModel
from vaemo_dist.stages.finetune import main

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32", "model.depth=1",
              "model.decoder_depth=1"]
TRAIN = ["train.steps=6", "data.batch_size=4", "optim.warmup_steps=2", "wandb.mode=disabled",
         "train.log_every=1"]


def _export(folder: Path, overrides: list[str]) -> Path:
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    state = VAEmoModel(cfg.model, cfg.inputs).state_dict()
    weights = {k: v for k, v in state.items() if not is_decoder_key(k)}
    return save_pretrained(folder, weights, cfg)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("export"), TINY_MODEL)


@pytest.fixture(scope="module")
def manifest(tiny_corpus, tmp_path_factory) -> Path:
    """The tiny corpus as files + manifest.csv (labels as class names) + an explicit split file."""
    folder = tmp_path_factory.mktemp("files")
    rows = []
    for url in expand_shards(str(tiny_corpus)):
        for sample in read_shard(url):
            key = sample["__key__"]
            for field in ("mp4", "flac", "json"):
                (folder / f"{key}.{field}").write_bytes(sample[field])
            rows.append((f"{key}.mp4", json.loads(sample["json"])["class_name"]))
    with (folder / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    keys = [Path(p).stem for p, _ in rows]
    with (folder / "splits.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("fold", "split", "key")] + [("A", "test" if i % 3 == 0 else "train", k)
                                                              for i, k in enumerate(keys)])
    return folder


def test_linear_probe_writes_metrics_predictions_and_pictures(export, tiny_corpus, tmp_path):
    out = tmp_path / "probe"
    assert main(["--mode", "probe", "--pretrained", str(export), "--data", str(tiny_corpus), "--kfold", "3",
                 "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["class_names"] == ["neutral", "happy", "sad"] and list(report["folds"]) == ["1", "2", "3"]
    assert sum(f["n"] for f in report["folds"].values()) == 12  # every clip tested once
    s = report["summary"]
    assert 0 <= s["uar_mean"] <= 1 and s["uar_std"] >= 0 and report["features"] == "concat_pooled"
    with (out / "predictions.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 12
    for png in ("confusion.png", "confusion_fold_1.png", "confusion_fold_3.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # The second run reuses the cached features (not rewritten) and gives the same numbers.
    cached = (out / "features.npz").stat().st_mtime_ns
    assert main(["--mode", "probe", "--pretrained", str(export), "--data", str(tiny_corpus), "--kfold", "3",
                 "--out", str(out)]) == 0
    assert (out / "features.npz").stat().st_mtime_ns == cached
    assert json.loads((out / "metrics.json").read_text())["summary"] == s


def run_finetune(export: Path, manifest: Path, out: Path, *extra: str, processes: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["launchers/finetune.py", "--mode", "finetune", "--pretrained", str(export), "--data",
            str(manifest / "manifest.csv"), "--splits", str(manifest / "splits.csv"), "--out", str(out),
            *TRAIN, *extra]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes),
               "--master_port", str(port), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_finetune_one_process_zero1(export, manifest, tmp_path):
    # ZeRO-1, the config's default: its checkpoints hold the frozen contrastive heads only in the
    # module state, which the evaluation's consolidation must pick up.
    report = run_finetune(export, manifest, tmp_path / "ft", "train.zero_stage=1", "--mixup", "0.2")
    fold = report["folds"]["A"]
    assert fold["n"] == 4 and fold["n_train"] == 8 and fold["steps"] == 6 and fold["skipped_test"] == 0
    assert report["class_names"] == ["happy", "neutral", "sad"]  # names, numbered in sorted order
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ft" / "fold_A" / "metrics.jsonl").open()]
    assert len(losses) == 6 and all(loss == loss for loss in losses)
    assert (tmp_path / "ft" / "fold_A" / "classifier.safetensors").is_file()
    assert (tmp_path / "ft" / "confusion.png").is_file()


def test_finetune_two_processes_zero2_splits_the_evaluation(export, manifest, tmp_path):
    report = run_finetune(export, manifest, tmp_path / "ft2", "train.zero_stage=2", "--epochs", "2",
                          processes=2)
    fold = report["folds"]["A"]
    assert fold["n"] == 4 and fold["skipped_test"] == 0  # predictions of both ranks came together
    assert fold["steps"] == 2  # 2 epochs of 8 clips at 4 per rank x 2 ranks
    with (tmp_path / "ft2" / "predictions.csv").open() as f:
        assert sorted(r["key"] for r in csv.DictReader(f)) == ["clip-000000", "clip-000003", "clip-000006",
                                                               "clip-000009"]


def test_finetune_under_tensor_parallelism_trains_the_same_classifier(export, manifest, tmp_path):
    # TP 2 x DP 1 on two processes sees the same batches as one process: the merged classifier it
    # saves must be the one-process run's, up to the order of float sums.
    from safetensors.torch import load_file

    # Heads split 2 ways. Training size = the sources' 64 px, so the training clips keep their bytes: an
    # x264 re-encode was seen to differ between processes for 1 clip in 12 (cause open), which would
    # give the two runs different data and test nothing about tensor parallelism.
    export = _export(tmp_path / "export", [*TINY_MODEL, "model.heads=4", "inputs.video.size=64"])
    one = run_finetune(export, manifest, tmp_path / "tp1", "train.zero_stage=1")
    two = run_finetune(export, manifest, tmp_path / "tp2", "train.zero_stage=1", "parallel.tensor=2",
                       processes=2)
    a = load_file(str(tmp_path / "tp1" / "fold_A" / "classifier.safetensors"))
    b = load_file(str(tmp_path / "tp2" / "fold_A" / "classifier.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    moved = max((a[k] - load_file(str(export / "model.safetensors")).get(k.removeprefix("backbone."), a[k]))
                .abs().max().item() for k in a if k.startswith("backbone."))
    assert moved > 1e-3  # the backbone did train, so the match above says something
    assert two["folds"]["A"]["n"] == one["folds"]["A"]["n"] == 4


def test_finetune_speaker_folds_clips_at_training_size_and_no_silent_rerun(export, manifest, tmp_path):
    """Default folds by the CSV's speaker column; training clips stored once at the export's
    inputs.video.size (64 px sources re-encoded to 32), fold shards copied from them atomically; a
    second launch into the finished run is refused (exit 2) and changes nothing."""
    from vaemo_dist.data.shards import read_shard
    from vaemo_dist.fsutil import folder_owner

    with (manifest / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    with (manifest / "speakers.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "speaker")] +
                                [(r["path"], r["label"], f"spk{i % 4}") for i, r in enumerate(rows)])
    out = tmp_path / "ft"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "launchers/finetune.py", "--mode", "finetune", "--pretrained", str(export),
           "--data", str(manifest / "speakers.csv"), "--kfold", "2", "--folds", "1", "--out", str(out),
           *TRAIN, "train.steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["group_by"] == "speaker" and report["group_independent"] is True
    assert "speaker-independent" in proc.stderr
    with (out / "folds.csv").open() as f:
        folds = list(csv.DictReader(f))
    assert len(folds) == 12
    test_speakers = {r["group"] for r in folds if r["fold"] == "1"}
    train_keys = {r["key"] for r in folds if r["fold"] != "1"}
    assert test_speakers and not test_speakers & {r["group"] for r in folds if r["fold"] != "1"}

    stored = [s for url in sorted((out / "train_clips").glob("clips-*.tar")) for s in read_shard(str(url))]
    assert {s["__key__"] for s in stored} == train_keys  # only the folds' training clips, once
    for s in stored:
        meta = json.loads(s["json"])
        assert (meta["width"], meta["height"], meta["resized_from"]) == (32, 32, [64, 64])
        assert meta["frames"] == 80 and meta["fps"] == 25 and "label" in meta
    fold_shards = sorted((out / "fold_1" / "train_shards").glob("train-*.tar"))
    assert {s["__key__"] for url in fold_shards for s in read_shard(str(url))} == train_keys
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert folder_owner(out) == folder_owner(out / "train_clips") == "finetune"

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "finished fine-tuning result" in again.stderr and "--overwrite" in again.stderr
    assert again.stderr.count("refusing to write into") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_finetune_official_protocol_with_test_views_writes_the_peer_table(export, tiny_corpus, tmp_path):
    """Shards whose clips say their dataset, speaker and official fold (as vaemo-shard --dataset writes
    them): --protocol official takes those folds, each test clip is evaluated as 2 x 2 views (the
    fine-tuning default), and results.md puts the run beside the peers' published CREMA-D numbers."""
    from vaemo_dist.data.shards import ShardWriter

    shards = tmp_path / "shards"
    with ShardWriter(shards, 6, prefix="cremad") as writer:
        for url in expand_shards(str(tiny_corpus)):
            for sample in read_shard(url):
                meta = json.loads(sample["json"])
                speaker = f"10{int(sample['__key__'][-2:]) % 4:02d}"
                fold = "1" if speaker in ("1000", "1001") else "2"
                meta.update(speaker=speaker, dataset="cremad", fold=fold)
                writer.write({**{k: v for k, v in sample.items() if k != "__url__"},
                              "json": json.dumps(meta).encode()})
    out = tmp_path / "ft"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "launchers/finetune.py", "--mode", "finetune", "--pretrained", str(export),
           "--data", str(shards), "--protocol", "official", "--folds", "1", "--out", str(out), *TRAIN,
           "train.steps=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"] == "official" and report["dataset"] == "cremad"
    assert report["test_views"] == [2, 2] and report["group_independent"] is True
    assert report["folds"]["1"]["n"] == 6 and report["folds"]["1"]["skipped_test"] == 0
    assert "protocol: official" in proc.stderr and "2 temporal window(s) x 2 spatial crop(s)" in proc.stderr
    text = (out / "results.md").read_text()
    assert "| this run (VAEmo, finetune) | 1 fold(s) |" in text
    assert "| HiCMAE | base | 84.91 | 84.89 |" in text
    assert "2 temporal x 2 spatial" in text and "not reproduced" in text
