"""Resuming on another number of processes (a node lost for good, or capacity back), through the real
launcher: over the epoch every sample key is trained on exactly once, the step, the learning-rate
schedule and Adam's moments carry over, and the weights after loading are those saved; also across a
ZeRO-stage change (1 -> 3) and tensor-parallel degree changes (2 x 2 -> 1 x 2 -> 2 x 1), where the loss of
a fixed probe batch matches the saving layout's. A resize DeepSpeed cannot do stops the launcher before
any process group; another corpus stops it once the shards are listed, unless train.resume_data=reset.

The runs go through tests/faults/resize_worker.py, which is launchers/stage1.py plus a probe: it dumps
the engine's full weights and moments after each save and each load, and fails any torch.load that
is not weights-only."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.launching import SMALL, output, run_stage1
from vaemo_dist.checkpoints import consolidate
from vaemo_dist.config import SynthConfig, load_config
from vaemo_dist.data.synth import build_corpus
from vaemo_dist.train.schedule import lr_at

WORKER = "tests/faults/resize_worker.py"
STEPS = 6  # 48 clips in 6 shards of 8, 8 clips a step (4 per rank x 2 ranks, or 4 x 2 micro-steps): one epoch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(SynthConfig(clips=48, clips_per_shard=8, classes=4, size=64),
                        tmp_path_factory.mktemp("corpus"), progress=False)


def common(root: Path, stage: int) -> list[str]:
    return [f"train.steps={STEPS}", "train.ckpt_every=2", "train.keep_last=0", f"train.zero_stage={stage}",
            f"data.log_keys={root / 'run' / 'keys'}"]


def launch(root: Path, corpus: Path, nproc: int, *extra: str, ok: bool = True):
    proc = run_stage1(root / "run", corpus, nproc, *extra, script=WORKER,
                      env={"VAEMO_TEST_DUMP": str(root / "dumps")})
    if ok:
        assert proc.returncode == 0, output(proc)[-6000:]
    return proc


@pytest.fixture(scope="module")
def zero1_stopped(corpus, tmp_path_factory) -> Path:
    """2 processes, ZeRO-1, stopped after step 3 of the 6-step epoch: each rank's slot stopped in the
    middle of its second shard."""
    root = tmp_path_factory.mktemp("zero1")
    launch(root, corpus, 2, *common(root, 1), "train.stop_at=3")
    return root


TP2 = ["parallel.tensor=2", "model.heads=4"]


@pytest.fixture(scope="module")
def tp2_stopped(corpus, tmp_path_factory) -> Path:
    """4 processes, tensor parallel 2 x data parallel 2, ZeRO-2, stopped after step 3 of the 6-step epoch
    (checkpoints at steps 2 and 3): the first run of both tensor-parallel resume tests."""
    root = tmp_path_factory.mktemp("tp2")
    launch(root, corpus, 4, *common(root, 2), *TP2, "train.stop_at=3")
    return root


def stopped_copy(zero1_stopped: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(zero1_stopped, root)
    # The key log path is in the command line, not in the copied files: nothing else points back.
    return root


def keys_trained(root: Path, ranks: tuple[int, ...] | None = None) -> Counter:
    """Keys of the batches trained on, from the key logs of `ranks` (default: all; under tensor
    parallelism one rank per tensor-parallel group, whose ranks log the same batches)."""
    keys = Counter()
    for f in (root / "run" / "keys").glob("keys-rank*.txt"):
        if ranks is None or int(f.stem.removeprefix("keys-rank")) in ranks:
            keys.update(f.read_text().split())
    return keys


def records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]


def assert_carried(root: Path, step: int) -> tuple[float, float]:
    """The weights and Adam moments right after the load are those the old run had when it saved (full
    tensors: the dumps join tensor-parallel pieces), bit for bit. Returns (|probe loss after load -
    probe loss at save|, max abs difference of the Adam moments): the loss on the worker's fixed probe
    batch, which a change of tensor parallelism may move by rounding only."""
    saved = load_file(str(root / "dumps" / f"saved-step{step}.safetensors"))
    loaded = load_file(str(root / "dumps" / f"loaded-step{step}.safetensors"))
    assert saved.keys() == loaded.keys()
    different = [k for k in saved if not torch.equal(saved[k], loaded[k])]
    assert not different, different[:5]
    adam = max(float((saved[k] - loaded[k]).abs().max()) for k in saved if k[:2] in ("m/", "v/"))
    assert sum(float(loaded[k].abs().sum()) for k in loaded if k.startswith("m/")) > 0  # not reset
    # Each parameter group keeps its own hyperparameters (weight decay 0 for norms and biases), and
    # Adam's step count is the saved one.
    groups = [json.loads((root / "dumps" / f"{when}-step{step}.json").read_text())
              for when in ("saved", "loaded")]
    probe = [g.pop("probe_loss") for g in groups]
    assert groups[0] == groups[1] and groups[1]["adam_steps"] == [step], groups
    # ... and the weights are the checkpoint's, as vaemo-export reads them.
    full = consolidate(root / "run" / "checkpoints" / f"step_{step:08d}")
    assert {f"w/{k}" for k in full} == {k for k in loaded if k.startswith("w/")}
    assert all(torch.equal(full[k], loaded[f"w/{k}"]) for k in full)
    return abs(probe[0] - probe[1]), adam


def assert_epoch_once_and_schedule_continued(root: Path, ranks: tuple[int, ...] | None = None) -> None:
    keys = keys_trained(root, ranks)
    assert len(keys) == 48 and set(keys.values()) == {1}, keys
    recs = records(root)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert recs[-1]["optimizer_steps"] == STEPS  # Adam's step counter went on, not from zero
    optim = load_config("configs/stage1/tiny.yaml", SMALL).optim
    assert [r["lr"] for r in recs] == pytest.approx([lr_at(s, STEPS, optim) for s in range(1, STEPS + 1)])


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_two_processes_stopped_mid_epoch_resume_on_one(corpus, zero1_stopped, tmp_path, stage):
    """ZeRO-0 loads its whole states as saved; ZeRO-1 and -3 through a universal checkpoint. The ZeRO-1
    run also stops again inside the remainder and resumes as is (the remainder is in its checkpoint)."""
    if stage == 1:
        root = stopped_copy(zero1_stopped, tmp_path)
    else:
        root = tmp_path
        launch(root, corpus, 2, *common(root, stage), "train.stop_at=3")
    # One process with 2 micro-steps keeps the global batch of 8, and so the steps of the epoch.
    again = [*common(root, stage), "train.grad_accum=2", "--resume", "latest"]
    resumed = launch(root, corpus, 1, *again, *(["train.stop_at=4"] if stage == 1 else []))
    text = output(resumed)
    assert "resumed from 2 ranks x 1 workers onto 1 x 1: step 3" in text, text[-3000:]
    assert "universal checkpoint" in text if stage else "loaded whole" in text
    assert_carried(root, 3)
    if stage == 1:
        last = output(launch(root, corpus, 1, *again))
        assert "at step 4" in last and "resumed from 1 ranks" not in last  # the same-size path
        assert_carried(root, 4)
    assert_epoch_once_and_schedule_continued(root)


def test_two_one_two_holding_the_global_batch_by_batch_size_and_another_worker_count(corpus, tmp_path):
    """The issue's chain, ZeRO-1: 2 ranks x batch 4 -> 1 rank x batch 8 -> 2 ranks x batch 4 with 2
    DataLoader workers each (the global batch of 8 held by `data.batch_size` on the command line): over
    the epoch every key is trained once, and the schedule and Adam's step go on."""
    launch(tmp_path, corpus, 2, *common(tmp_path, 1), "data.batch_size=4", "train.stop_at=2")
    one = output(launch(tmp_path, corpus, 1, *common(tmp_path, 1), "data.batch_size=8", "train.stop_at=4",
                        "--resume", "latest"))
    assert "resumed from 2 ranks x 1 workers onto 1 x 1: step 2" in one, one[-3000:]
    two = output(launch(tmp_path, corpus, 2, *common(tmp_path, 1), "data.batch_size=4", "data.num_workers=2",
                        "--resume", "latest"))
    assert "resumed from 1 ranks x 1 workers onto 2 x 2: step 4" in two, two[-3000:]
    assert "batch composition differs from an un-resized run" in two
    assert_carried(tmp_path, 2)
    assert_carried(tmp_path, 4)
    assert_epoch_once_and_schedule_continued(tmp_path)


def test_one_process_resumes_on_two(corpus, tmp_path):
    """ZeRO-2 from 1 process onto 2: its partitions are cut anew from the universal checkpoint."""
    launch(tmp_path, corpus, 1, *common(tmp_path, 2), "train.grad_accum=2", "train.stop_at=2")
    text = output(launch(tmp_path, corpus, 2, *common(tmp_path, 2), "--resume", "latest"))
    assert "resumed from 1 ranks x 1 workers onto 2 x 1: step 2" in text, text[-3000:]
    assert_carried(tmp_path, 2)
    assert_epoch_once_and_schedule_continued(tmp_path)


def test_tensor_parallel_2_x_data_parallel_2_resumes_on_tensor_parallel_2_x_1(corpus, tp2_stopped, tmp_path):
    """4 processes (TP 2 x DP 2, ZeRO-2) onto 2 (TP 2 x DP 1): the universal conversion joins the
    tensor-parallel shards and the load cuts them again the same way."""
    root = stopped_copy(tp2_stopped, tmp_path)
    text = output(launch(root, corpus, 2, *common(root, 2), *TP2, "train.grad_accum=2", "--resume",
                         "latest"))
    assert "resumed from 2 ranks x 1 workers onto 1 x 1: step 3" in text, text[-3000:]
    assert "tensor parallel 2 kept" in text
    assert_carried(root, 3)
    assert_epoch_once_and_schedule_continued(root, ranks=(0, 2))  # one rank of each old TP group


@pytest.mark.parametrize("nproc", [1, 2])
def test_zero1_resumes_as_zero3(corpus, zero1_stopped, tmp_path, nproc):
    """ZeRO-1 on 2 processes stopped mid-epoch, resumed as ZeRO-3 on 1 (2 micro-steps) or on 2 (the same
    data-parallel size: only the stage changes), through the universal checkpoint."""
    root = stopped_copy(zero1_stopped, tmp_path)
    accum = ["train.grad_accum=2"] if nproc == 1 else []
    text = output(launch(root, corpus, nproc, *common(root, 3), *accum, "--resume", "latest"))
    assert (f"resume plan: DP 2 x TP 1 x ZeRO-1 x 1 workers -> DP {nproc} x TP 1 x ZeRO-3 x 1 workers: "
            "optimizer state re-partitioned from the universal checkpoint") in text, text[-3000:]
    assert "ZeRO-1 -> ZeRO-3" in text
    assert_carried(root, 3)
    assert_epoch_once_and_schedule_continued(root)


def keys_of(folder: Path, ranks: tuple[int, ...]) -> Counter:
    keys = Counter()
    for r in ranks:
        keys.update((folder / f"keys-rank{r}.txt").read_text().split())
    return keys


def test_tensor_parallel_degree_changes(corpus, tp2_stopped, tmp_path):
    """TP 2 x DP 2 (4 processes, ZeRO-2, to step 3: tp2_stopped) -> TP 1 x DP 2 (step 4) -> TP 2 x DP 1
    (2 micro-steps): the weights and Adam moments after each load are those saved (full tensors, bit for
    bit); the fixed probe batch's loss under the new layout equals the saving layout's within 1e-5; over
    the epoch every key is trained once (each launch logs its keys to a folder of its own; one rank per
    TP group counted) and the schedule and Adam's step go on."""
    root = stopped_copy(tp2_stopped, tmp_path)
    heads, tp2, logs = "model.heads=4", "parallel.tensor=2", root / "keys"
    base = [f"train.steps={STEPS}", "train.ckpt_every=2", "train.keep_last=0", "train.zero_stage=2", heads]
    first = output(launch(root, corpus, 2, *base, "train.stop_at=4", f"data.log_keys={logs / 'b'}",
                          "--resume", "latest"))
    assert ("resume plan: DP 2 x TP 2 x ZeRO-2 x 1 workers -> DP 2 x TP 1 x ZeRO-2 x 1 workers: optimizer "
            "state re-partitioned from the universal checkpoint; tensor-parallel shards and their Adam "
            "moments re-cut from TP 2 to TP 1; data slots unchanged") in first, first[-3000:]
    assert "re-cut the universal checkpoint from tensor parallel 2 to 1" in first
    assert "tensor parallel 2 -> 1" in first and "tensor parallel 1 kept" not in first
    second = output(launch(root, corpus, 2, *base, tp2, "train.grad_accum=2",
                           f"data.log_keys={logs / 'c'}", "--resume", "latest"))
    assert ("DP 2 x TP 1 x ZeRO-2 x 1 workers -> DP 1 x TP 2 x ZeRO-2 x 1 workers" in second
            and "batch composition differs from an un-resized run" in second), second[-3000:]
    figures = {step: assert_carried(root, step) for step in (3, 4)}
    print("probe loss |diff|, Adam max abs diff:", figures)
    assert all(loss <= 1e-5 and adam == 0.0 for loss, adam in figures.values()), figures
    keys = keys_of(root / "run" / "keys", (0, 2)) + keys_of(logs / "b", (0, 1)) + keys_of(logs / "c", (0,))
    assert len(keys) == 48 and set(keys.values()) == {1}, keys
    recs = records(root)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)) and recs[-1]["optimizer_steps"] == STEPS


@pytest.mark.parametrize("case", ["stage_change", "nvme_offload"])
def test_a_resize_deepspeed_cannot_do_is_refused_before_start(corpus, zero1_stopped, tmp_path, case):
    """ZeRO-1 onto ZeRO-0 (no universal checkpoint for ZeRO-0); and ZeRO-3 with NVMe optimizer offload
    (its swap files are per rank). The NVMe checkpoint is the ZeRO-1 one with its config.yaml saying
    ZeRO-3 + NVMe: the refusal reads only that, before any DeepSpeed file."""
    root = stopped_copy(zero1_stopped, tmp_path)
    stage = 0
    if case == "nvme_offload":
        stage = 3
        cfg_file = root / "run" / "checkpoints" / "step_00000003" / "config.yaml"
        raw = yaml.safe_load(cfg_file.read_text())
        raw["train"]["zero_stage"] = 3
        raw["train"]["deepspeed"] = {"zero_optimization": {"offload_optimizer": {"device": "nvme",
                                                                                 "nvme_path": "/local/nvme"}}}
        cfg_file.write_text(yaml.safe_dump(raw))
    proc = launch(root, corpus, 1, *common(root, 1), f"train.zero_stage={stage}", "--resume", "latest",
                  ok=False)
    text = output(proc)
    assert proc.returncode == 2, text[-3000:]
    assert "resume error: cannot resume from" in text and "(1 data-parallel ranks)" in text, text[-3000:]
    if case == "stage_change":
        assert "the checkpoint is ZeRO-1 and this run asks for train.zero_stage=0" in text, text[-3000:]
    else:
        assert "ZeRO-3 with NVMe optimizer offload" in text and "cannot re-partition" in text, text[-3000:]
    assert "Resume on 2 data-parallel ranks" in text and "vaemo-export" in text  # the ways out
    assert "training stage1" not in text


def test_another_corpus_is_refused_unless_the_data_is_reset(corpus, zero1_stopped, tmp_path):
    """The checkpoint records its corpus's fingerprint; a resume on another corpus (same shard names,
    another seed: the manifest tells them apart) exits 2 naming data.shards and train.resume_data, and
    with train.resume_data=reset carries step, weights and moments over and reads the new corpus from its
    start (the key log of the reset part: 3 steps x 8 keys, each once)."""
    root = stopped_copy(zero1_stopped, tmp_path)
    assert (root / "run" / "checkpoints" / "step_00000003" / "corpus.json").is_file()
    other = build_corpus(SynthConfig(clips=48, clips_per_shard=8, classes=4, size=64, seed=5),
                         tmp_path / "other", progress=False)
    refused = launch(root, other, 2, *common(root, 1), "--resume", "latest", ok=False)
    text = output(refused)
    assert refused.returncode == 2, text[-3000:]
    assert f"resume error: cannot resume from {root / 'run' / 'checkpoints' / 'step_00000003'}: " \
        f"data.shards={other} is another corpus than the checkpoint's" in text, text[-3000:]
    assert "train.resume_data=reset" in text and "training stage1" not in text
    logs = root / "reset-keys"
    text = output(launch(root, other, 2, *common(root, 1)[:-1], f"data.log_keys={logs}",
                         "train.resume_data=reset", "--resume", "latest"))
    assert "train.resume_data=reset: weights, optimizer state and step 3 carried" in text, text[-3000:]
    assert_carried(root, 3)
    keys = keys_of(logs, (0, 1))
    assert sum(keys.values()) == 24 and set(keys.values()) == {1}, keys
    recs = records(root)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)) and recs[-1]["optimizer_steps"] == STEPS
