"""launchers/finetune.py start-up and folds, on the real probe / fine-tune paths: speaker-independent
folds by default, clip-level on request; no labels, or an --out that is not ours, said before any
work (exit 2)."""

import csv
import json

import pytest

from vaemo_dist.eval import downstream
from vaemo_dist.stages.finetune import main


def probe(export, data, out, *extra):
    return main(["--mode", "probe", "--pretrained", str(export), "--data", str(data), "--out", str(out),
                 "--l2", "0.01", *extra])


def read_folds(out):
    with (out / "folds.csv").open() as f:
        return list(csv.DictReader(f))


def assert_speaker_independent(rows):
    test_fold = {}
    for row in rows:
        test_fold.setdefault(row["group"], set()).add(row["fold"])
    # A speaker's clips are all tested in one fold, so no fold trains on a speaker it tests.
    assert all(len(folds) == 1 for folds in test_fold.values()), test_fold


@pytest.mark.parametrize("data", ["csv", "shards"])
def test_probe_folds_are_speaker_independent_by_default(tiny_export, speaker_clips, speaker_shards, tmp_path,
                                                        data, capsys):
    spec = speaker_clips / "clips.csv" if data == "csv" else speaker_shards / "manifest.json"
    out = tmp_path / "probe"
    assert probe(tiny_export, spec, out, "--kfold", "4") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["group_by"] == "speaker" and report["groups"] == 4 and report["group_independent"] is True
    assert report["class_names"] == ["angry", "happy", "sad"]  # from the CSV / vaemo-shard's manifest.json
    rows = read_folds(out)
    assert len(rows) == 24 and {r["group"] for r in rows} == {"ann", "bob", "cyd", "dee"}
    assert_speaker_independent(rows)
    with (out / "predictions.csv").open() as f:
        tested = {r["key"]: r["fold"] for r in csv.DictReader(f)}
    assert tested == {r["key"]: r["fold"] for r in rows}  # the folds written are the folds run
    log = capsys.readouterr().err  # main() logs to stderr
    assert "speaker-independent" in log and "--group-by none for clip-level folds" in log


def test_group_by_none_gives_clip_level_folds(tiny_export, speaker_clips, tmp_path):
    out = tmp_path / "probe"
    assert probe(tiny_export, speaker_clips / "clips.csv", out, "--kfold", "4", "--group-by", "none") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["group_by"] is None and "clip-level" in report["folds_from"]
    rows = read_folds(out)
    assert rows[0].keys() == {"key", "fold", "group"} and all(r["group"] == "" for r in rows)
    fold_of = {r["key"]: r["fold"] for r in rows}
    speakers_per_fold = {}
    for key, fold in fold_of.items():
        speakers_per_fold.setdefault(fold, set()).add(key.split("_")[0])
    assert any(len(s) > 1 for s in speakers_per_fold.values())  # speakers are split across folds


def test_group_by_another_column_and_missing_values(tiny_export, speaker_clips, tmp_path, capsys):
    rows = (speaker_clips / "clips.csv").read_text().splitlines()
    table = ["path,label,speaker,session"] + [f"{r},{'ab'[i % 2]}" for i, r in enumerate(rows[1:])]
    (speaker_clips / "sessions.csv").write_text("\n".join(table) + "\n")
    out = tmp_path / "by-session"
    assert probe(tiny_export, speaker_clips / "sessions.csv", out, "--kfold", "2", "--group-by",
                 "session") == 0
    assert json.loads((out / "metrics.json").read_text())["group_by"] == "session"
    assert {frozenset(r["group"] for r in read_folds(out) if r["fold"] == f) for f in "12"} == \
        {frozenset("a"), frozenset("b")}
    # A field no clip has, or one some clips lack: said at once, exit 2, nothing written.
    assert probe(tiny_export, speaker_clips / "clips.csv", tmp_path / "x", "--group-by", "actor") == 2
    assert "no labelled clip has a 'actor' field" in capsys.readouterr().err
    (speaker_clips / "holes.csv").write_text("\n".join(rows[:3] + [rows[3].rsplit(",", 1)[0] + ","]) + "\n")
    assert probe(tiny_export, speaker_clips / "holes.csv", tmp_path / "y", "--kfold", "2") == 2
    assert "1 of 3 labelled clips have no 'speaker'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # Fewer speakers than folds.
    assert probe(tiny_export, speaker_clips / "clips.csv", tmp_path / "z", "--kfold", "5") == 2
    assert "need at least 5 different speaker values" in capsys.readouterr().err


def test_unlabelled_data_is_refused_before_anything_is_embedded_or_trained(tiny_export, unlabelled_shards,
                                                                          tmp_path, capsys, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("a clip was decoded")

    monkeypatch.setattr("vaemo_dist.data.sources.decode_record", no_decoding)
    monkeypatch.setattr("vaemo_dist.data.decode_pyav.decode_sample", no_decoding)
    assert probe(tiny_export, unlabelled_shards, tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "probe: no labelled clips in" in err and "3 clips, none with a label" in err
    # Fine-tuning: the same message before any process group, training or fold shard.
    assert main(["--mode", "finetune", "--pretrained", str(tiny_export), "--data", str(unlabelled_shards),
                 "--out", str(tmp_path / "ft")]) == 2
    assert "finetune: no labelled clips in" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "ft").exists()


def test_an_out_folder_that_is_not_ours_is_refused_and_overwrite_moves_it_aside(tiny_export, speaker_clips,
                                                                               tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert probe(tiny_export, speaker_clips / "clips.csv", mine, "--kfold", "2") == 2
    err = capsys.readouterr().err
    assert f"refusing to write into {mine}" in err and "--overwrite" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert probe(tiny_export, speaker_clips / "clips.csv", mine, "--kfold", "2", "--overwrite") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "the user's"
    assert (mine / "metrics.json").is_file()
    # The probe's own folder is reused (its feature cache); a fine-tuning run may not write there.
    assert probe(tiny_export, speaker_clips / "clips.csv", mine, "--kfold", "2") == 0
    assert main(["--mode", "finetune", "--pretrained", str(tiny_export), "--data",
                 str(speaker_clips / "clips.csv"), "--kfold", "2", "--out", str(mine)]) == 2
    assert "it holds the output of probe, not of finetune" in capsys.readouterr().err


def test_a_finished_finetune_is_not_rerun_without_resume(tiny_export, speaker_clips, tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    (out / ".vaemo-owner.json").write_text('{"writer": "finetune"}\n')
    (out / "metrics.json").write_text('{"mode": "finetune"}')
    args = ["--mode", "finetune", "--pretrained", str(tiny_export), "--data",
            str(speaker_clips / "clips.csv"), "--kfold", "2", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "finished fine-tuning result" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == '{"mode": "finetune"}'
    # An unfinished run (fold checkpoints, no metrics.json) is not restarted over either.
    (out / "metrics.json").unlink()
    (out / "fold_1" / "checkpoints").mkdir(parents=True)
    assert main(args) == 2 and "--resume continues it" in capsys.readouterr().err
    for flag in ("--resume", "--overwrite"):
        assert downstream.out_folder_problem(out, "finetune", downstream.parse_args([*args, flag])) is None


def test_training_clips_are_stored_at_the_training_size(tmp_path):
    """A clip larger than inputs.video.size is re-encoded once (short side = size, its own frame rate
    kept exactly: 30000/1001 stays 29.97, not 30); one at or below it keeps its bytes; the decoder reads
    both."""
    from vaemo_dist.config import load_config
    from vaemo_dist.data.decode_pyav import decode_sample
    from vaemo_dist.data.shards import read_shard
    from vaemo_dist.data.sources import open_source
    from vaemo_dist.data.synth import write_media_file
    from vaemo_dist.eval.downstream import at_training_size, write_tars

    inputs = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32"]).inputs
    write_media_file(tmp_path / "wide.mp4", seconds=1.2, fps=30000 / 1001, width=320, height=180)
    write_media_file(tmp_path / "small.mp4", seconds=1.2, width=48, height=32)
    (tmp_path / "clips.csv").write_text("path,label\nwide.mp4,a\nsmall.mp4,b\n")
    wide, small = [downstream.record_sample(r, inputs) for r in open_source(tmp_path / "clips.csv").records()]
    resized = at_training_size(wide, 32)
    meta = json.loads(resized["json"])
    assert (meta["width"], meta["height"], meta["resized_from"]) == (56, 32, [320, 180])
    assert meta["fps"] == pytest.approx(30000 / 1001)
    assert meta["duration"] == pytest.approx(meta["frames"] / meta["fps"])
    assert abs(meta["frames"] - 36) <= 1 and meta["label"] == 0 and resized["flac"] == wide["flac"]
    assert len(resized["mp4"]) < len(wide["mp4"])
    assert at_training_size(small, 32) is small  # nothing to gain: the bytes as they are
    clip = decode_sample(resized, inputs)
    assert tuple(clip.video.shape) == (3, 4, 32, 32) and clip.label == 0
    # Tars are written under a temporary name and renamed when whole.
    assert write_tars(iter([resized, small]), tmp_path, "t", per_shard=1) == 2
    names = sorted(p.name for p in tmp_path.glob("*.tar*"))
    assert names == ["t-000000.tar", "t-000001.tar"]
    assert [s["__key__"] for s in read_shard(str(tmp_path / "t-000001.tar"))] == ["small"]


def test_a_checkpoint_is_taken_as_pretrained_through_its_cached_export(speaker_clips, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from vaemo_dist.export import is_export

    run = tmp_path / "runs" / "mine"  # a run folder, as a user would name it
    shutil.copytree(Path(__file__).parents[1] / "compat" / "pre_refactor" / "checkpoint",
                    run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    monkeypatch.setenv("VAEMO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "probe"
    assert probe(run, speaker_clips / "clips.csv", out, "--kfold", "2") == 0
    report = json.loads((out / "metrics.json").read_text())
    exports = list((tmp_path / "cache" / "exports").iterdir())
    assert len(exports) == 1 and is_export(exports[0])
    assert report["pretrained"] == str(exports[0])


def test_a_folder_that_is_neither_export_nor_checkpoint_is_refused(speaker_clips, tmp_path, capsys):
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("hello")
    assert probe(stray, speaker_clips / "clips.csv", tmp_path / "probe") == 2
    assert "--pretrained" in capsys.readouterr().err
    assert not (tmp_path / "probe").exists()
