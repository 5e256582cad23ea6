"""Stage-1 pretraining through the real launcher path: `deepspeed --num_gpus 2 launchers/stage1.py`,
2 CPU processes over gloo, on a small synthetic corpus with one corrupt clip in it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from tests.launching import REPO, SMALL, free_port, output, run_env, run_stage1
from vaemo_dist.config import SynthConfig
from vaemo_dist.data.synth import build_corpus

STEPS = 20

# Small inputs and model so that 20 steps take seconds, not minutes, on 2 cores. The DeepSpeed key is
# its default (5e8), so the run is unchanged; it takes a dotted train.deepspeed override end to end.
OVERRIDES = [f"train.steps={STEPS}", "train.ckpt_every=10", "optim.warmup_steps=3", "wandb.mode=offline",
             "train.deepspeed.zero_optimization.reduce_bucket_size=5e8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 good clips in 5 shards, plus a sixth shard holding one clip whose video is garbage."""
    root = tmp_path_factory.mktemp("corpus")
    build_corpus(SynthConfig(clips=40, clips_per_shard=8, classes=4, size=64), root, progress=False)
    good = next(iter(wds.WebDataset(str(root / "shard-000000.tar"), shardshuffle=False)))
    with wds.TarWriter(str(root / "shard-000005.tar")) as w:
        w.write({"__key__": "corrupt-0", "mp4": b"\x00not a video" * 50, "flac": good["flac"],
                 "json": good["json"]})
        for i in range(3):
            w.write({**{k: v for k, v in good.items() if not k.startswith("__")}, "__key__": f"copy-{i}"})
    return root


def launch(run_dir: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run_stage1(run_dir, corpus, 2, *OVERRIDES, *extra, timeout=600)
    assert proc.returncode == 0, output(proc)[-8000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    proc = launch(run_dir, corpus)
    return run_dir, proc


def test_two_process_run_learns_and_leaves_its_artefacts(uninterrupted):
    run_dir, proc = uninterrupted
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (18, 19, 20)) / 3
    assert last < 0.9 * first, loss
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000020"
    for rank in (0, 1):
        assert (ckpts / "step_00000020" / f"vaemo_rank{rank:05d}.json").exists()
    assert not list(ckpts.glob(".tmp-*"))
    from PIL import Image

    assert Image.open(run_dir / "curves.png").size[0] > 1000  # drawn by rank 0 at the end
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    record = records[-1]
    assert record["tflops_per_device"] > 0 and record["tokens_per_s"] > 0
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run written"
    # Waiting for data: the slowest rank's wait within the slowest rank's step; the first batch is waited for.
    for r in records:
        assert 0 <= r["data_wait_s"] <= r["step_time_s"], r
        assert r["data_wait_frac"] == pytest.approx(r["data_wait_s"] / r["step_time_s"])
    assert max(r["data_wait_s"] for r in records) > 0
    # Peak memory, the fullest rank's: on CPU the peak resident size of a rank's process, which never falls.
    peaks = [r["mem_peak_gib"] for r in records]
    assert 0.1 < peaks[0] < 16 and peaks == sorted(peaks) and "mem_reserved_gib" not in record
    # train.deepspeed reached DeepSpeed (logged once, merged) and is saved with the checkpoint's config.
    out = output(proc)
    logged = [line for line in out.splitlines() if "DeepSpeed config: " in line]
    assert len(logged) == 1, logged
    ds = json.loads(logged[0].split("DeepSpeed config: ", 1)[1])
    # (reduce_scatter: trainer.zero_tuning; the extra key wins over its fitted reduce_bucket_size)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_scatter": False, "reduce_bucket_size": 500_000_000}
    saved = yaml.safe_load((ckpts / "step_00000020" / "config.yaml").read_text())
    assert saved["train"]["deepspeed"] == {"zero_optimization": {"reduce_bucket_size": 500_000_000}}
    # DeepSpeed's ZeRO step calls torch's deprecated all_gather_into_tensor; the launcher quiets just that.
    assert "all_gather_into_tensor` is deprecated" not in out


def test_corrupt_clip_is_skipped_counted_and_named(uninterrupted):
    run_dir, proc = uninterrupted
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    # 20 steps x 8 samples over 44 samples: the corrupt clip comes round several times, each counted.
    assert record["skipped_decode"] >= 2 and record["skipped_shards"] == 0
    assert record["skipped/corrupt"] == record["skipped_decode"]  # the count per kind reaches the log
    assert "corrupt-0" in proc.stdout + proc.stderr


def test_resume_is_exact(uninterrupted, corpus, tmp_path):
    full_dir, _ = uninterrupted
    run_dir = tmp_path / "resumed"
    launch(run_dir, corpus, "train.stop_at=10")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000010"
    launch(run_dir, corpus, "--resume", "latest")
    full, resumed = losses(full_dir), losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(11, STEPS + 1)] == [full[s] for s in range(11, STEPS + 1)]


def test_unknown_key_fails_before_start(corpus, tmp_path):
    proc = subprocess.run([sys.executable, "launchers/stage1.py", "model.dpth=3"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'model.dpth'" in proc.stderr and "Did you mean 'depth'" in proc.stderr


def test_two_nodes_over_torchrun_rendezvous(corpus, tmp_path):
    """Two 'nodes' on this machine: two torchrun agents, --nnodes 2, meeting over loopback; both ranks
    profile steps 2-3 (train.profile)."""
    port, run_dir = free_port(), tmp_path / "two-nodes"
    env = run_env()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "launchers/stage1.py", "--config", "configs/stage1/tiny.yaml", *SMALL, *OVERRIDES,
             "train.steps=4", "parallel.peak_tflops=0.5", f"data.shards={corpus}",
             "train.profile.start_step=2", "train.profile.steps=2", "train.profile.ranks=[0, 1]",
             f"train.out_dir={tmp_path}",
             f"train.run_name={run_dir.name}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["samples_per_s"] > 0 and 0 < records[-1]["mfu"] < 1
    assert "world 2 (TP 1 x DP 2)" in outputs[0]
    # One Chrome trace per rank holding steps 2 and 3 only (ProfilerStep#N is step N on a fresh run),
    # the model's ops in them; rank 0 logs the top ops by self time.
    for rank in (0, 1):
        (trace,) = (run_dir / "profile").glob(f"rank{rank}.*.pt.trace.json")
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
        assert steps == ["ProfilerStep#2", "ProfilerStep#3"], (rank, steps)
        assert {"aten::linear", "aten::scaled_dot_product_attention"} <= names
    assert "profile of steps 2-3" in outputs[0] and "Self CPU" in outputs[0]
