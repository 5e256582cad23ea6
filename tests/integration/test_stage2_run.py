"""Stage 2 through the real launcher path: a stage-1 run (ZeRO-2) leaves a checkpoint, then
`deepspeed --num_gpus 2 launchers/stage2.py --config configs/stage2/tiny.yaml` (ZeRO-1) starts from it,
builds the templated described set (in its own cache folder) and its text embeddings on first use,
trains, and resumes exactly. Finally the key evidence: text-to-VA retrieval on held-out clips rises well
above its stage-1 value. A one-process launch on a user's described set, from an export, leaves every
file of that set unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.files import tree_hashes
from vaemo_dist.dist import free_port
from vaemo_dist.text.encode import EMBEDDINGS, read_metadata

REPO = Path(__file__).resolve().parents[2]
STEPS = 16

# Small inputs and model so that a run takes seconds on 2 cores (as in test_stage1_run.py).
SMALL = ["inputs.video.frames=8", "inputs.video.size=64", "inputs.audio.frames=128", "model.depth=2",
         "model.decoder_depth=1", "data.batch_size=4", "data.num_workers=1", "wandb.mode=offline",
         "eval.every=0", "train.log_every=1", "data.synth.clips=48", "data.synth.clips_per_shard=8",
         "data.synth.classes=4", "data.synth.size=64"]


def launch(script: str, config: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), script, "--config", config, *SMALL, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage2")


@pytest.fixture(scope="module")
def stage1(root) -> Path:
    run = root / "runs" / "stage1"
    launch("launchers/stage1.py", "configs/stage1/tiny.yaml", "train.steps=12", "train.ckpt_every=12",
           "train.zero_stage=2", "optim.lr=1e-3", "optim.warmup_steps=2", f"data.synth.dir={root / 'corpus'}",
           f"train.out_dir={run.parent}", f"train.run_name={run.name}")
    return run


def stage2_args(root: Path, stage1: Path, name: str, *extra: str) -> list[str]:
    return [f"data.synth.dir={root / 'corpus'}", "data.shards=synthetic",
            f"stage2.init_from={stage1 / 'checkpoints' / 'latest'}", f"train.steps={STEPS}",
            "train.ckpt_every=8", "optim.lr=1e-3", "optim.warmup_steps=2",
            f"train.out_dir={root / 'runs'}", f"train.run_name={name}", *extra]


@pytest.fixture(scope="module")
def stage2(root, stage1):
    proc = launch("launchers/stage2.py", "configs/stage2/tiny.yaml", *stage2_args(root, stage1, "stage2"))
    return root / "runs" / "stage2", proc


def test_stage2_starts_from_stage1_and_learns_the_text_alignment(root, stage1, stage2):
    run, proc = stage2
    log = proc.stdout + proc.stderr
    assert "loaded the stage-1 VA model from" in log and "stage 2 starts from" in log
    assert "step_00000012" in log
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("text_joint", "text_audio", "text_video", "stage1_loss", "rec_video", "acc_t2j_class"):
        assert key in records[-1], key
    first = sum(r["text_joint"] for r in records[:3]) / 3
    last = sum(r["text_joint"] for r in records[-3:]) / 3
    assert last < 0.8 * first, [round(r["text_joint"], 3) for r in records]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"

    # The synthetic described set and its embeddings were built on first use, next to each other, in
    # stage 2's own cache folder next to the synthetic corpus; the log says the data is synthetic.
    described = root / "stage2" / "corpus-described"
    assert f"stage 2 data: the synthetic described set {described} (templated, not your data)" in log
    manifest = json.loads((described / "manifest.json").read_text())
    assert manifest["total"] == 48 and manifest["prompt_version"] == "synthetic-template-v1"
    meta = read_metadata(described / EMBEDDINGS)
    assert meta["encoder"] == "all-MiniLM-L6-v2" and meta["count"] == "48" and meta["dim"] == "384"


def test_stage2_resume_is_exact(root, stage1, stage2):
    full, _ = stage2
    args = stage2_args(root, stage1, "stage2-resumed")
    launch("launchers/stage2.py", "configs/stage2/tiny.yaml", *args, "train.stop_at=8")
    proc = launch("launchers/stage2.py", "configs/stage2/tiny.yaml", *args, "--resume", "latest")
    assert "stage 2 starts from" not in proc.stdout + proc.stderr  # weights come from its own checkpoint
    resumed = {r["step"]: r["loss"] for r in metrics(root / "runs" / "stage2-resumed")}
    reference = {r["step"]: r["loss"] for r in metrics(full)}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(9, STEPS + 1)] == [reference[s] for s in range(9, STEPS + 1)]


def test_heldout_text_to_va_retrieval_rises_above_stage1(root, stage1, stage2):
    from vaemo_dist.text.retrieval import build_model, prepare_heldout, retrieval_metrics, stage2_config_of

    run, _ = stage2
    ckpt = run / "checkpoints" / "latest"
    cfg = stage2_config_of(ckpt)
    held = prepare_heldout(cfg, root / "heldout", seed=1, clips=32)
    assert set(held.labels.tolist()) == {0, 1, 2, 3}
    before = retrieval_metrics(build_model(cfg, 384, stage1 / "checkpoints" / "latest"), held)
    after = retrieval_metrics(build_model(cfg, 384, ckpt), held)
    print(f"held-out t2va R@1 (class): stage 1 {before['t2va_r1']:.3f} -> stage 2 {after['t2va_r1']:.3f}")
    assert after["t2va_r1"] >= before["t2va_r1"] + 0.25 and after["t2va_r1"] >= 0.6, (before, after)
    assert after["zero_shot"] > before["zero_shot"]




def test_a_users_described_set_is_only_read_and_an_export_seeds_stage2(root, stage1):
    """`data.shards=<my described set>` with `stage2.describe_synthetic=true` left on, and no text
    embeddings in the set: one process trains on the user's set (nothing of it written: embeddings go to
    stage 2's cache) from a stage-1 export."""
    from vaemo_dist import export
    from vaemo_dist.text import describe

    mine = root / "my-described"
    assert describe.main([str(root / "corpus"), "--out", str(mine), "--synthetic", "--count", "16",
                          "--clips-per-shard", "8", "--no-progress"]) == 0
    exported = root / "exports" / "stage1"
    assert export.main([str(stage1), "--out", str(exported)]) == 0
    before = tree_hashes(mine)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_API_KEY"):
        env.pop(name, None)
    args = [f"data.synth.dir={root / 'corpus'}", f"data.shards={mine}", "stage2.describe_synthetic=true",
            f"stage2.init_from={exported}", "train.steps=2", "train.ckpt_every=2",
            f"train.out_dir={root / 'runs'}", "train.run_name=on-my-set"]
    proc = subprocess.run([sys.executable, "launchers/stage2.py", "--config", "configs/stage2/tiny.yaml",
                           *SMALL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert tree_hashes(mine) == before  # every file of the user's set unchanged, none added
    assert "stage2.describe_synthetic=true is ignored" in log
    assert f"stage 2 data: your described set {mine} (templated descriptions; read only)" in log
    assert f"{mine}/text_emb.safetensors is missing, so stage 2 computed them" in log
    assert f"loaded the stage-1 VA model (an export made by vaemo-export from {stage1}" in log
    assert [r["step"] for r in metrics(root / "runs" / "on-my-set")] == [1, 2]
    cached = list((root / "stage2" / "text-emb").glob("my-described-*/text_emb.safetensors"))
    assert len(cached) == 1 and read_metadata(cached[0])["count"] == "16"
