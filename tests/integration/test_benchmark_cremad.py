"""A benchmark from its distributed layout to the peer table, the way a user runs it (issue 16):
`vaemo-shard --dataset cremad <CREMA-D folder>` on a miniature replica (tests/data/replicas.py: the
corpus's folders and file names, one actor per HiCMAE fold, the odd cases), then
`launchers/finetune.py --protocol official`, probe and fine-tuning, which must take the five actor folds
the shards carry and write results.md beside HiCMAE's and AVF-MAE++'s published CREMA-D numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.data.replicas import CREMAD_ACTORS, CREMAD_EMOTIONS, make_cremad
from vaemo_dist.config import load_config
from vaemo_dist.data.writer import main as vaemo_shard
from vaemo_dist.export import is_decoder_key, save_pretrained
from vaemo_dist.model.vaemo import VAEmoModel

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32", "model.depth=1",
              "model.decoder_depth=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = make_cremad(tmp_path_factory.mktemp("CREMA-D"))
    out = tmp_path_factory.mktemp("shards") / "cremad"
    assert vaemo_shard(["--dataset", "cremad", str(root), "--out", str(out), "--size", "32", "--workers", "1",
                        "--clips-per-shard", "8", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    cfg = load_config(None, TINY_MODEL)
    torch.manual_seed(0)
    state = VAEmoModel(cfg.model, cfg.inputs).state_dict()
    weights = {k: v for k, v in state.items() if not is_decoder_key(k)}
    return save_pretrained(tmp_path_factory.mktemp("export"), weights, cfg)


def test_the_replica_lands_with_its_labels_speakers_folds_and_skips(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["class_names"] == list(CREMAD_EMOTIONS)
    assert manifest["total"] == len(CREMAD_ACTORS) * len(CREMAD_EMOTIONS)
    folds = dict(line.split(",") for line in (shards / "folds.csv").read_text().split()[1:])
    # HiCMAE's rule: fold k tests actors 1001 + 18(k-1) .. 1001 + 18k - 1, fold 5 up to 1091.
    want = {"1001": "1", "1019": "2", "1037": "3", "1055": "4", "1091": "5"}
    assert len(folds) == manifest["total"]
    assert all(fold == want[key.split("_")[0][-4:]] for key, fold in folds.items()), folds
    report = json.loads((shards / "report.json").read_text())
    kinds = {Path(s["path"]).name: s["kind"] for s in report["skipped"]}
    assert kinds == {"1076_MTI_SAD_XX.flv": "known_broken", "1002_IEO_HAP_HI.flv": "no_audio",
                     "notes_copy.flv": "unparsable"}, kinds


def run_finetune(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "launchers/finetune.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def check_folds_by_actor(out: Path) -> None:
    rows = (out / "folds.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:2] == ["key", "fold"], header
    by_fold: dict[str, set[str]] = {}
    for row in rows[1:]:
        key, fold, *rest = row.split(",")
        by_fold.setdefault(fold, set()).add(rest[0] if rest else key)
    # One actor per fold in this replica: five folds, five different actors, none in two folds.
    assert len(by_fold) == 5 and all(len(actors) == 1 for actors in by_fold.values()), by_fold
    assert set.union(*by_fold.values()) == {str(a) for a in CREMAD_ACTORS}


def test_probe_with_the_official_protocol_writes_the_peer_table(shards, export, tmp_path):
    out = tmp_path / "probe"
    proc = run_finetune("--mode", "probe", "--pretrained", str(export),
                        "--data", str(shards / "manifest.json"),
                        "--protocol", "official", "--l2", "1.0", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"] == "official" and report["dataset"] == "cremad"
    assert report["group_independent"] is True and sorted(report["folds"]) == ["1", "2", "3", "4", "5"]
    assert all(report["folds"][f]["n"] == len(CREMAD_EMOTIONS) for f in report["folds"])  # one actor each
    check_folds_by_actor(out)
    text = (out / "results.md").read_text()
    assert "| HiCMAE | base | 84.91 | 84.89 |" in text and "AVF-MAE++" in text and "not reproduced" in text
    assert "5 fold(s)" in text


def test_finetune_with_the_official_protocol_and_test_views(shards, export, tmp_path):
    out = tmp_path / "ft"
    proc = run_finetune("--mode", "finetune", "--pretrained", str(export),
                        "--data", str(shards / "manifest.json"),
                        "--protocol", "official", "--folds", "5", "--test-views", "2,2", "--out", str(out),
                        "train.steps=2", "data.batch_size=4", "optim.warmup_steps=1", "wandb.mode=disabled")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"] == "official" and report["test_views"] == [2, 2]
    assert report["folds"]["5"]["n"] == len(CREMAD_EMOTIONS) and report["folds"]["5"]["skipped_test"] == 0
    assert "| HiCMAE | base | 84.91 | 84.89 |" in (out / "results.md").read_text()
