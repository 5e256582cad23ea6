"""Training on the user's own shards (made by vaemo-shard from a CSV with speakers), through the launcher:
online evaluation never falls back to synthetic clips; eval.holdout holds whole speakers out of training;
a CSV or a folder of videos given as shards stops at start-up naming vaemo-shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import REPO, free_port, output, run_env, run_stage1
from vaemo_dist.data.synth import write_media_file
from vaemo_dist.data.writer import main as vaemo_shard

SPEAKERS = ("ana", "ben", "cy", "dee")
LABELS = ("calm", "tense")


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """16 ordinary mp4s (4 speakers x 4 clips, 2 classes), the CSV naming them, and their shards."""
    root = tmp_path_factory.mktemp("own")
    videos = root / "videos"
    videos.mkdir()
    rows = ["path,label,speaker"]
    for i in range(16):
        name = f"clip{i:02d}.mp4"
        write_media_file(videos / name, seconds=1.6, width=64, height=48, seed=i)
        rows.append(f"videos/{name},{LABELS[i % 2]},{SPEAKERS[i // 4]}")
    csv = root / "clips.csv"
    csv.write_text("\n".join(rows) + "\n")
    shards = root / "shards"
    assert vaemo_shard([str(csv), "--out", str(shards), "--size", "48", "--clips-per-shard", "4",
                        "--workers", "1", "--no-progress"]) == 0
    speaker_of = {}
    for url in sorted(shards.glob("*.tar")):
        from vaemo_dist.data.shards import read_clip_meta

        speaker_of.update({k: m["speaker"] for k, m in read_clip_meta(str(url))})
    assert len(speaker_of) == 16
    return root, csv, videos, shards, speaker_of


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_own_shards_without_heldout_clips_evaluate_nothing_synthetic(user_data, tmp_path):
    root, _, _, shards, _ = user_data
    run_dir = tmp_path / "runs" / "no-eval"
    proc = run_stage1(run_dir, shards / "manifest.json", 1, "train.steps=2", "eval.every=1",
                      f"data.synth.dir={tmp_path / 'synthetic'}", timeout=300)
    assert proc.returncode == 0, output(proc)[-6000:]
    text = output(proc)
    assert text.count("online evaluation is off") == 1 and "eval.holdout=0.1" in text
    assert not list(tmp_path.glob("synthetic*"))  # neither the corpus nor its held-out part was built
    assert not any(k.startswith("eval/") for r in metrics(run_dir) for k in r)


def test_holdout_by_speaker_is_never_trained_on_across_a_resume(user_data, tmp_path):
    _, _, _, shards, speaker_of = user_data
    run_dir = tmp_path / "runs" / "held"
    common = ["eval.every=2", "eval.holdout=0.25", "eval.clips=4", "eval.pictures=0", "data.batch_size=2",
              f"data.log_keys={run_dir / 'keys'}", f"data.synth.dir={tmp_path / 'synthetic'}"]
    proc = run_stage1(run_dir, shards, 2, "train.steps=4", "train.ckpt_every=2", *common, timeout=400)
    assert proc.returncode == 0, output(proc)[-6000:]
    record = json.loads((run_dir / "holdout.json").read_text())
    held, saved = set(record["keys"]), (run_dir / "holdout.json").read_bytes()
    assert record["by"] == "speaker" and len(record["speakers"]) == 1 and len(held) == 4
    assert {speaker_of[k] for k in held} == set(record["speakers"])

    proc2 = run_stage1(run_dir, shards, 2, "--resume", "latest", "train.steps=8", "train.ckpt_every=2",
                       *common, timeout=400)
    assert proc2.returncode == 0, output(proc2)[-6000:]
    assert (run_dir / "holdout.json").read_bytes() == saved  # the split is kept on resume
    trained = [k for rank in (0, 1) for k in (run_dir / "keys" / f"keys-rank{rank}.txt").read_text().split()]
    assert len(trained) == 8 * 2 * 2  # 8 steps x 2 ranks x 2 clips
    assert not held & set(trained)  # no held-out clip was ever trained on
    assert not set(record["speakers"]) & {speaker_of[k] for k in trained}  # nor any clip of their speakers

    name = f"held-out 25% of {shards} by speaker (4 clips, 1 speaker)"
    evals = [r for r in metrics(run_dir) if "eval/probe_uar" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8] and {r["eval/set"] for r in evals} == {name}
    for text in (output(proc), output(proc2)):
        assert f"online evaluation every 2 steps on {name}" in text
        assert f"evaluation on {name}: probe_uar" in text
    assert not list(tmp_path.glob("synthetic*"))


@pytest.mark.parametrize("which", ["csv", "videos"])
def test_a_csv_or_a_folder_of_videos_as_shards_stops_before_the_process_group(user_data, tmp_path, which):
    """Rank 0 of a claimed 2-process world whose other rank never comes: it would hang in the process
    group had it got there, instead of exiting 2."""
    root, csv, videos, _, _ = user_data
    given = csv if which == "csv" else videos
    env = run_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "launchers/stage1.py", f"data.shards={given}",
                           f"train.out_dir={tmp_path}", "eval.every=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    out = str(given).removesuffix(".csv") + "-shards"
    assert f"vaemo-shard {given} --out {out}" in proc.stderr and f"data.shards={out}" in proc.stderr
    assert "Traceback" not in proc.stderr and "relaunching" not in proc.stderr
    assert not any(tmp_path.iterdir())
