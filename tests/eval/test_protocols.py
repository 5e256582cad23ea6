"""--protocol (official folds from the clips' fold fields, checked subject-independent; speaker-grouped
k folds; auto), and results.md beside the peers' published numbers."""

import argparse
import json

import pytest

from vaemo_dist.data.sources import Record
from vaemo_dist.eval import downstream
from vaemo_dist.eval.downstream import Clips, StartupError, plan_folds, results_markdown
from vaemo_dist.eval.peers import PEERS, benchmark, peers_of
from vaemo_dist.stages.finetune import main


def args(**kw):
    base = dict(splits=None, folds="all", kfold=2, seed=0, group_by="auto", protocol="auto", dataset=None)
    return argparse.Namespace(**{**base, **kw})


def clips(fold_of_speaker=None, dataset="cremad", speakers=("s1", "s2", "s3", "s4"), leak=False):
    """2 classes x 2 takes per speaker; fold = fold_of_speaker[speaker] (or per take when `leak`)."""
    records = []
    for s, speaker in enumerate(speakers):
        for label in (0, 1):
            for take in (0, 1):
                fold = None
                if fold_of_speaker is not None:
                    fold = str(take + 1) if leak and s == 0 else fold_of_speaker[speaker]
                fields = {"dataset": dataset} if dataset else {}
                records.append(Record(f"{speaker}_{label}_{take}", label=label, fold=fold, speaker=speaker,
                                      fields=fields))
    return Clips(records, ["a", "b"])


FOLDS = {"s1": "1", "s2": "1", "s3": "2", "s4": "2"}


def test_auto_uses_the_official_folds_when_the_clips_carry_a_datasets_folds():
    plan = plan_folds(args(), clips(FOLDS))
    assert plan.protocol == "official" and plan.dataset == "cremad"
    assert {n: sorted(f.test) for n, f in plan.folds.items()} == {
        "1": sorted(k for k in (r.key for r in clips(FOLDS).records) if k[:2] in ("s1", "s2")),
        "2": sorted(k for k in (r.key for r in clips(FOLDS).records) if k[:2] in ("s3", "s4"))}
    info = plan.info()
    assert info["protocol"] == "official" and "carry cremad's folds" in info["protocol_why"]
    assert "5 subject-independent folds by actor" in info["folds_from"] and info["group_independent"] is True


def test_auto_without_a_dataset_name_keeps_todays_behaviour_and_dataset_names_it():
    plan = plan_folds(args(), clips(FOLDS, dataset=None))
    assert plan.protocol == "given" and plan.origin == "the data's fold / split fields"
    plan = plan_folds(args(dataset="RAVDESS"), clips(FOLDS, dataset=None))
    assert plan.protocol == "official" and plan.dataset == "RAVDESS" and "4 actors" in plan.origin
    no_folds = plan_folds(args(), clips(None))
    assert no_folds.protocol == "kfold" and "2 folds by speaker" in no_folds.origin


def test_kfold_ignores_the_fold_fields():
    plan = plan_folds(args(protocol="kfold"), clips(FOLDS))
    assert plan.protocol == "kfold" and plan.origin.startswith("2 folds by speaker")
    assert plan.info()["protocol_why"] == "--protocol kfold" and not plan.overlap


def test_official_refusals_name_the_problem():
    with pytest.raises(StartupError, match="no labelled clip of cremad has a 'fold' field"):
        plan_folds(args(protocol="official"), clips(None))
    mixed = clips(FOLDS)
    mixed.records[0].fields["dataset"] = "ravdess"
    with pytest.raises(StartupError, match="several datasets"):
        plan_folds(args(protocol="official"), mixed)
    with pytest.raises(StartupError, match="not subject-independent.*fold 1: s1"):
        plan_folds(args(protocol="official"), clips(FOLDS, leak=True))
    with pytest.raises(StartupError, match="--dataset mafw, but the clips say they are 'cremad'"):
        plan_folds(args(protocol="official", dataset="mafw"), clips(FOLDS))
    with pytest.raises(StartupError, match="give one"):
        plan_folds(args(protocol="official", splits="x.csv"), clips(FOLDS))
    holes = clips(FOLDS)
    holes.records[3].fold = None
    with pytest.raises(StartupError, match="1 of 16 labelled clips have no 'fold'"):
        plan_folds(args(protocol="official"), holes)


def test_official_without_speakers_runs_unchecked():
    no_speakers = clips(FOLDS)
    for r in no_speakers.records:
        r.speaker = None
    plan = plan_folds(args(protocol="official"), no_speakers)
    assert plan.group_by is None and plan.info()["group_independent"] is None


def test_peers_are_quoted_with_sources():
    assert benchmark("CREMA-D") == benchmark("crema_d") == "cremad" and benchmark("my corpus") is None
    assert [(p.method, p.uar, p.war) for p in peers_of("cremad")] == [("HiCMAE", 84.91, 84.89),
                                                                      ("AVF-MAE++", 86.02, 85.95)]
    assert [p.method for p in peers_of("ravdess")] == ["HiCMAE"]  # AVF-MAE++'s not verifiable as text
    assert all(p.source and p.url.startswith("https://") for rows in PEERS.values() for p in rows)


def report(dataset):
    return {"mode": "finetune", "data": "/d", "dataset": dataset, "clips": 16, "protocol": "official",
            "protocol_why": "--protocol official", "folds_from": "f", "modality": "av", "pretrained": "e",
            "test_views": [2, 2], "skipped": [],
            "summary": {"folds": 2, "uar_mean": 0.5, "uar_std": 0.1, "war_mean": 0.625, "war_std": 0.125},
            "folds": {"1": {"n": 8, "uar": 0.4, "war": 0.5}, "2": {"n": 8, "uar": 0.6, "war": 0.75}}}


def test_results_markdown_puts_the_run_beside_the_peers():
    text = results_markdown(report("cremad"))
    assert "| this run (VAEmo, finetune) | 2 fold(s) | 50.00 ± 10.00 | 62.50 ± 12.50 |" in text
    assert "| HiCMAE | base | 84.91 | 84.89 | [Sun et al." in text and "| AVF-MAE++ | huge | 86.02 |" in text
    assert "quoted from their papers" in text and "not reproduced" in text
    assert "2 temporal x 2 spatial" in text and "16 labelled, 16 tested over 2 fold(s)" in text
    assert "| 2 | 8 | 60.00 | 75.00 |" in text
    plain = results_markdown(report("my corpus"))
    assert "HiCMAE" not in plain and "no known benchmark" in plain and "| this run" in plain


def test_probe_with_the_official_protocol_writes_results_md(tiny_export, speaker_clips, tmp_path, capsys):
    rows = (speaker_clips / "clips.csv").read_text().splitlines()
    fold = {"ann": "1", "bob": "1", "cyd": "2", "dee": "2"}
    table = ["path,label,speaker,fold,dataset"] + [f"{r},{fold[r.rsplit(',', 1)[1]]},crema-d"
                                                   for r in rows[1:]]
    (speaker_clips / "official.csv").write_text("\n".join(table) + "\n")
    out = tmp_path / "probe"
    assert main(["--mode", "probe", "--pretrained", str(tiny_export), "--data",
                 str(speaker_clips / "official.csv"), "--out", str(out), "--l2", "0.01"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "official" and metrics["dataset"] == "crema-d"
    assert metrics["test_views"] == [1, 1] and list(metrics["folds"]) == ["1", "2"]
    text = (out / downstream.RESULTS_FILE).read_text()
    assert "| this run (VAEmo, probe) |" in text and "| HiCMAE | base | 84.91 | 84.89 |" in text
    assert "protocol: official" in capsys.readouterr().err
    # A leak: ann's clips split over both folds; said before anything is embedded, exit 2.
    leaky = [table[0]] + [r if not r.startswith("ann_angry_0") else r.replace(",1,crema-d", ",2,crema-d")
                          for r in table[1:]]
    (speaker_clips / "leaky.csv").write_text("\n".join(leaky) + "\n")
    assert main(["--mode", "probe", "--pretrained", str(tiny_export), "--data",
                 str(speaker_clips / "leaky.csv"), "--out", str(tmp_path / "leak")]) == 2
    assert "not subject-independent" in capsys.readouterr().err and not (tmp_path / "leak").exists()
    # The probe embeds one view: other --test-views are refused.
    assert main(["--mode", "probe", "--pretrained", str(tiny_export), "--data",
                 str(speaker_clips / "official.csv"), "--out", str(tmp_path / "v"),
                 "--test-views", "2,2"]) == 2
    assert "test views are for --mode finetune" in capsys.readouterr().err
