"""Predictions on new clips (vaemo-predict, from_pretrained(<classifier folder>).predict) with the
classifiers the linear probe and fine-tuning save: the labels equal those of the evaluation that
produced the classifier, on the same clips."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vaemo_dist
from vaemo_dist.eval.predict import CLASSIFIER_CONFIG, main, save_finetune_classifier
from vaemo_dist.export import ExportError
from vaemo_dist.stages.finetune import main as downstream_main

FOLDS = 3


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def copy_clip(src: Path, key: str, dst: Path) -> Path:
    """A clip as a user has it: <key>.mp4 with its sibling .flac / .json, in another folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for ext in ("mp4", "flac", "json"):
        shutil.copy(src / f"{key}.{ext}", dst / f"{key}.{ext}")
    return dst / f"{key}.mp4"


@pytest.fixture(scope="module")
def labelled(clip_files, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """A manifest of the 12 clip files (labels as class names) and a key,fold split file."""
    folder = tmp_path_factory.mktemp("labelled")
    keys = sorted(p.stem for p in clip_files.glob("*.mp4"))
    names = {k: json.loads((clip_files / f"{k}.json").read_text())["class_name"] for k in keys}
    with (folder / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *((clip_files / f"{k}.mp4", names[k]) for k in keys)])
    fold_of = {k: str(1 + i % FOLDS) for i, k in enumerate(keys)}
    with (folder / "splits.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("key", "fold"), *fold_of.items()])
    return folder / "manifest.csv", folder / "splits.csv", fold_of


@pytest.fixture(scope="module")
def probe_run(tiny_export, labelled, tmp_path_factory) -> Path:
    manifest, splits, _ = labelled
    out = tmp_path_factory.mktemp("probe") / "run"
    assert downstream_main(["--mode", "probe", "--pretrained", str(tiny_export), "--data", str(manifest),
                            "--splits", str(splits), "--out", str(out)]) == 0
    return out


def test_the_probe_saves_a_classifier_per_fold_and_one_on_all_clips(probe_run, tiny_export):
    report = json.loads((probe_run / "metrics.json").read_text())
    for fold in [str(f) for f in range(1, FOLDS + 1)] + ["all"]:
        folder = probe_run / ("classifier" if fold == "all" else f"fold_{fold}/classifier")
        info = json.loads((folder / CLASSIFIER_CONFIG).read_text())
        assert info["kind"] == "probe" and info["class_names"] == report["class_names"]
        assert info["modality"] == "av" and info["features"] == "concat_pooled"
        assert info["encoder"]["path"] == str(tiny_export.resolve()) and len(info["encoder"]["sha256"]) == 64
        assert info["preprocessing"] == json.loads((tiny_export / "config.json").read_text())["inputs"]
        assert info["trained_on"]["fold"] == fold
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == \
            ["classifier.json", "head.safetensors"]  # safetensors + JSON: nothing to unpickle
        if fold == "all":
            assert info["trained_on"]["n_train"] == 12
            assert info["trained_on"]["metrics"]["uar_mean"] == report["summary"]["uar_mean"]
        else:
            assert info["trained_on"]["n_train"] == 8
            assert info["trained_on"]["metrics"] == report["folds"][fold]


@pytest.mark.parametrize("fold", ["2", "3"])
def test_vaemo_predict_on_new_clips_gives_the_probe_evaluation_labels(probe_run, labelled, clip_files, fold,
                                                                      tmp_path, capsys):
    """The clips of a fold's test set were never seen by that fold's classifier: predicted from a
    folder of their own, they get the labels the probe's evaluation gave them (predictions.csv)."""
    _, _, fold_of = labelled
    report = json.loads((probe_run / "metrics.json").read_text())
    names = report["class_names"]
    expected = {r["key"]: names[int(r["prediction"])] for r in read_csv(probe_run / "predictions.csv")
                if r["fold"] == fold}
    assert sorted(expected) == sorted(k for k, f in fold_of.items() if f == fold)
    new = tmp_path / "new-clips"
    for key in expected:
        copy_clip(clip_files, key, new)

    out = tmp_path / "predictions.csv"
    assert main(["--model", str(probe_run / f"fold_{fold}" / "classifier"), "--input", str(new),
                 "--out", str(out), "--quiet"]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["key", "path", "label", "predicted", *(f"prob_{c}" for c in names), "error"]
    assert {r["key"]: r["predicted"] for r in rows} == expected
    for r in rows:
        probs = np.array([float(r[f"prob_{c}"]) for c in names])
        assert abs(probs.sum() - 1) < 1e-4 and names[int(probs.argmax())] == r["predicted"] and not r["error"]
        assert r["path"] == str(new / f"{r['key']}.mp4")
    assert f"{len(expected)} clips predicted, 0 could not be read" in capsys.readouterr().err

    # The same in Python, on the files; audio comes from the same clips (their sibling .flac).
    predictor = vaemo_dist.from_pretrained(probe_run / f"fold_{fold}" / "classifier")
    assert isinstance(predictor, vaemo_dist.Predictor) and predictor.classes == names
    keys = [r["key"] for r in rows]
    res = predictor.predict(video=[str(new / f"{k}.mp4") for k in keys])
    assert res.predicted == [expected[k] for k in keys] and res.probs.shape == (len(keys), len(names))
    csv_probs = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows])
    assert np.allclose(res.probs.numpy(), csv_probs, atol=1e-5)


def test_the_comparison_above_can_fail(probe_run, clip_files):
    """The probe fitted on every clip (it has seen them all) labels some of them otherwise than the
    per-fold probes did: matching predictions.csv takes the fold's own classifier."""
    report = json.loads((probe_run / "metrics.json").read_text())
    rows = read_csv(probe_run / "predictions.csv")
    res = vaemo_dist.from_pretrained(probe_run / "classifier").predict(
        video=[str(clip_files / f"{r['key']}.mp4") for r in rows])
    assert res.predicted != [report["class_names"][int(r["prediction"])] for r in rows]


def test_the_all_clips_classifier_labels_a_manifest_of_new_clips(probe_run, clip_files, tmp_path):
    keys = sorted(p.stem for p in clip_files.glob("*.mp4"))[:3]
    manifest = tmp_path / "new.csv"
    manifest.write_text("path\n" + "".join(f"{clip_files / k}.mp4\n" for k in keys))
    out = tmp_path / "p.csv"
    assert main(["--model", str(probe_run / "classifier"), "--input", str(manifest), "--out", str(out),
                 "--quiet"]) == 0
    rows = read_csv(out)
    names = json.loads((probe_run / "metrics.json").read_text())["class_names"]
    assert [r["key"] for r in rows] == keys and all(r["predicted"] in names for r in rows)
    assert all(r["label"] == "" for r in rows)  # the manifest gave no labels


def test_bad_inputs_are_listed_and_counted_not_fatal(probe_run, clip_files, tmp_path, capsys):
    good = copy_clip(clip_files, sorted(p.stem for p in clip_files.glob("*.mp4"))[0], tmp_path / "in")
    broken = tmp_path / "in" / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    missing = tmp_path / "in" / "missing.mp4"
    out = tmp_path / "p.csv"
    assert main(["--model", str(probe_run / "fold_1" / "classifier"), "--input", str(broken), str(good),
                 str(missing), "--out", str(out), "--quiet"]) == 0
    rows = read_csv(out)
    assert [r["key"] for r in rows] == [str(broken), str(good), str(missing)]  # input order, keyed by path
    assert [bool(r["error"]) for r in rows] == [True, False, True]
    assert rows[1]["predicted"] and not rows[0]["predicted"] and rows[0]["prob_happy"] == ""
    assert "cannot read" in rows[2]["error"]
    assert "1 clips predicted, 2 could not be read" in capsys.readouterr().err

    # Nothing readable at all: the CSV still lists them, and the exit code says so.
    assert main(["--model", str(probe_run / "fold_1" / "classifier"), "--input", str(broken),
                 "--out", str(tmp_path / "none.csv"), "--quiet"]) == 1
    assert len(read_csv(tmp_path / "none.csv")) == 1


def test_refusals_before_any_work(probe_run, tiny_export, clip_files, tmp_path, capsys):
    out = tmp_path / "p.csv"
    out.write_text("the user's earlier predictions\n")
    model, other = str(probe_run / "fold_1" / "classifier"), str(tmp_path / "q.csv")
    assert main(["--model", model, "--input", str(clip_files), "--out", str(out)]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert out.read_text() == "the user's earlier predictions\n"
    assert main(["--model", str(tiny_export), "--input", str(clip_files), "--out", other]) == 2
    assert "is an exported encoder, not a classifier" in capsys.readouterr().err
    assert main(["--model", model, "--input", str(tmp_path / "nowhere"), "--out", other]) == 2
    assert not (tmp_path / "q.csv").exists()
    # --overwrite moves the old file aside, never deletes it.
    one = sorted(clip_files.glob("*.mp4"))[0]
    assert main(["--model", model, "--input", str(one), "--out", str(out), "--overwrite", "--quiet"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("p.csv.old-")]
    assert len(aside) == 1 and aside[0].read_text() == "the user's earlier predictions\n"
    assert len(read_csv(out)) == 1


def test_a_probe_finds_its_moved_export_and_refuses_another(tiny_export, labelled, clip_files, tmp_path):
    from tests.eval.conftest import make_export

    manifest, splits, _ = labelled
    root = tmp_path / "a"
    shutil.copytree(tiny_export, root / "export")
    assert downstream_main(["--mode", "probe", "--pretrained", str(root / "export"), "--data", str(manifest),
                            "--splits", str(splits), "--folds", "1", "--out", str(root / "probe")]) == 0
    clip = str(sorted(clip_files.glob("*.mp4"))[0])
    before = vaemo_dist.from_pretrained(root / "probe" / "classifier").predict(video=clip).probs

    root.rename(tmp_path / "b")  # the run folder moved as a whole: found relative to the classifier
    moved = vaemo_dist.from_pretrained(tmp_path / "b" / "probe" / "classifier").predict(video=clip).probs
    assert torch.equal(before, moved)

    shutil.move(tmp_path / "b" / "export", tmp_path / "elsewhere")  # the export alone moved: say where
    with pytest.raises(ExportError, match="is not at"):
        vaemo_dist.from_pretrained(tmp_path / "b" / "probe" / "classifier")
    found = vaemo_dist.from_pretrained(tmp_path / "b" / "probe" / "classifier",
                                       encoder=tmp_path / "elsewhere")
    assert torch.equal(found.predict(video=clip).probs, before)

    other = make_export(tmp_path / "other", seed=1)  # another encoder: the head does not fit its features
    with pytest.raises(ExportError, match="not the encoder this classifier was trained on"):
        vaemo_dist.from_pretrained(tmp_path / "b" / "probe" / "classifier", encoder=other)


def test_a_finetuned_classifier_predicts_what_the_finetune_evaluation_predicts(tiny_export, labelled,
                                                                               tmp_path):
    """A fine-tuned classifier folder (model.safetensors: encoder + head) against the fine-tune
    evaluation code (downstream.evaluate) on the same clips, without a DeepSpeed run: a Classifier
    with a trained-looking head (random, seeded) saved as fine-tuning saves it."""
    from safetensors.torch import save_file

    from vaemo_dist.data.sources import open_source
    from vaemo_dist.eval.downstream import evaluate
    from vaemo_dist.objectives.finetune import Classifier
    from vaemo_dist.pretrained import from_pretrained

    manifest, _, _ = labelled
    source = open_source(manifest)
    torch.manual_seed(3)
    model = Classifier(from_pretrained(tiny_export).model, len(source.class_names), "av")
    torch.nn.init.normal_(model.head.weight, std=1.0)  # predictions that differ between clips
    for p in model.backbone.blocks.parameters():
        p.data.add_(0.01 * torch.randn_like(p))  # and a backbone that is not the export's any more
    weights = tmp_path / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    folder = save_finetune_classifier(tmp_path / "fold_A" / "classifier", weights, export=tiny_export,
                                      class_names=source.class_names, modality="av",
                                      trained_on={"mode": "finetune", "fold": "A"})
    assert (folder / "model.safetensors").read_bytes() == weights.read_bytes()

    keys = [r.key for r in source.records()]
    model.eval()
    preds, skipped = evaluate(model, source, keys, from_pretrained(tiny_export).inputs, "av", 4, 0, 1,
                              torch.device("cpu"))
    assert not skipped and len(set(preds.tolist())) > 1, preds
    out = tmp_path / "p.csv"
    assert main(["--model", str(folder), "--input", str(manifest), "--out", str(out), "--quiet"]) == 0
    rows = read_csv(out)
    assert [r["key"] for r in rows] == keys
    assert [r["predicted"] for r in rows] == [source.class_names[p] for p in preds]
    assert [r["label"] for r in rows] == [source.class_names[r.label] for r in source.records()]

    # Self-contained: the export can go; the fine-tuned weights are in the folder.
    shutil.copytree(folder, tmp_path / "copy")
    predictor = vaemo_dist.from_pretrained(tmp_path / "copy")
    res = predictor.predict(video=[r["path"] for r in rows[:4]])
    assert res.predicted == [r["predicted"] for r in rows[:4]]
    with pytest.raises(AttributeError, match="is a classifier folder"):
        predictor.embed_text  # noqa: B018 - an Encoder's attribute, with a message that says why not


def test_vaemo_predict_equals_a_real_finetune_fold_on_its_test_clips(tiny_export, labelled, clip_files,
                                                                     tmp_path):
    """launchers/finetune.py (one process, 4 steps), then vaemo-predict with fold 1's classifier on that
    fold's test clips, from a folder of their own: the labels of the fold's predictions.csv rows."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    manifest, splits, fold_of = labelled
    out = tmp_path / "ft"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "launchers/finetune.py", "--mode", "finetune", "--pretrained",
                           str(tiny_export), "--data", str(manifest), "--splits", str(splits), "--folds", "1",
                           "--out", str(out), "train.steps=4", "data.batch_size=4", "optim.warmup_steps=1",
                           "wandb.mode=disabled"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = json.loads((out / "metrics.json").read_text())["class_names"]
    expected = {r["key"]: names[int(r["prediction"])] for r in read_csv(out / "predictions.csv")}
    assert sorted(expected) == sorted(k for k, f in fold_of.items() if f == "1")
    info = json.loads((out / "fold_1" / "classifier" / CLASSIFIER_CONFIG).read_text())
    assert info["kind"] == "finetune" and info["trained_on"]["fold"] == "1" and info["class_names"] == names

    new = tmp_path / "new-clips"
    for key in expected:
        copy_clip(clip_files, key, new)
    assert main(["--model", str(out / "fold_1" / "classifier"), "--input", str(new),
                 "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    assert {r["key"]: r["predicted"] for r in read_csv(tmp_path / "p.csv")} == expected
