"""A rank dies (kill -9) or hangs: the job ends promptly with a non-zero exit and a message naming the
rank; relaunching with --resume latest continues from the last complete checkpoint and, over the
epoch, every sample key is trained on exactly once."""

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.launching import REPO, free_port, output, run_env, run_stage1
from vaemo_dist.config import SynthConfig
from vaemo_dist.data.synth import build_corpus
from vaemo_dist.watchdog import EXIT_PEER_LOST

WORKER = Path(__file__).with_name("peer_worker.py")


def test_killed_rank_ends_the_job_and_resume_sees_every_key_once(tmp_path):
    # 48 clips in 6 shards: 2 ranks x 3 shards x 8 clips = 6 steps of 4 clips per rank = one epoch.
    corpus = build_corpus(SynthConfig(clips=48, clips_per_shard=8, classes=4, size=64), tmp_path / "corpus",
                          progress=False)
    run_dir = tmp_path / "run"
    common = ["train.steps=6", "train.ckpt_every=2", f"data.log_keys={run_dir / 'keys'}"]
    started = time.monotonic()
    crashed = run_stage1(run_dir, corpus, 2, *common, faults="kill:rank=1:step=5")
    took = time.monotonic() - started
    assert crashed.returncode != 0, output(crashed)[-3000:]
    assert took < 150, f"the job took {took:.0f} s to notice a dead rank"
    text = output(crashed)
    # Our watchdog on rank 0 names it, unless DeepSpeed's launcher (polling each second) killed rank 0
    # first: then the launcher's own line names the failed process by its --local_rank.
    ours = re.search(r"rank 1 \(pid \d+ on \S+\) is no longer running", text)
    launchers = re.search(r"--local_rank=1.*exits with return code = -9", text)
    assert ours or launchers, text[-3000:]
    if ours:
        assert "step_00000004" in text and "--resume latest" in text  # where to go on from
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"

    resumed = run_stage1(run_dir, corpus, 2, *common, "--resume", "latest")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    keys = Counter()
    for rank in (0, 1):
        keys.update((run_dir / "keys" / f"keys-rank{rank}.txt").read_text().split())
    assert len(keys) == 48 and set(keys.values()) == {1}, keys


def start_pair(mode: str) -> list[subprocess.Popen]:
    port = str(free_port())
    return [subprocess.Popen([sys.executable, str(WORKER), mode, str(rank), port], cwd=REPO, env=run_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]


def test_watchdog_names_a_dead_peer_while_this_rank_is_busy():
    rank0, rank1 = start_pair("die")
    started = time.monotonic()
    out = rank0.communicate(timeout=60)[0]
    took = time.monotonic() - started
    rank1.wait(timeout=10)
    assert rank1.returncode == -9
    assert rank0.returncode == EXIT_PEER_LOST, out
    assert took < 20, took  # rank 0 was asleep for 60 s: only the watchdog can have ended it
    assert re.search(r"rank 0 on \S+, step 7: a peer process died\. rank 1 \(pid \d+ on \S+\) is no longer "
                     r"running", out), out
    assert "No complete checkpoint yet" in out


def test_a_hung_peer_times_the_collective_out_with_a_report():
    rank0, rank1 = start_pair("hang")
    try:
        started = time.monotonic()
        out = rank0.communicate(timeout=60)[0]
        took = time.monotonic() - started
    finally:
        rank1.kill()
        rank1.wait()
    assert rank0.returncode == 1, out
    assert took < 30, took  # the group's 4 s timeout, not forever
    assert "step 7: a collective failed" in out and "all ranks on this host are running" in out, out


def test_a_dead_peer_on_another_host_is_named_by_its_stopped_heartbeat():
    rank0, rank1 = start_pair("die-remote")
    out = rank0.communicate(timeout=60)[0]
    rank1.wait(timeout=10)
    assert rank0.returncode == 1, out
    assert "all ranks on this host are running" in out
    assert re.search(r"rank 1 on node-b stopped its heartbeat \d+ s ago", out), out


def test_losing_the_node_that_keeps_the_store_is_reported_as_such():
    rank0, rank1 = start_pair("store-lost")
    out = rank1.communicate(timeout=60)[0]
    rank0.wait(timeout=10)
    assert rank1.returncode == 1, out
    assert re.search(r"the job's store at 127\.0\.0\.1:\d+ .* does not answer: that node is probably lost",
                     out), out
