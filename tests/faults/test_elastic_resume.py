"""Resuming on another number of processes (a node lost for good, or capacity back), through the real
launcher: over the epoch every sample key is trained on exactly once, the step, the learning-rate
schedule and Adam's moments carry over, and the weights after loading are those saved. A change of
tensor parallelism, or a resize DeepSpeed cannot do, stops the launcher before any process group.

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
from vaemo_dist.checkpoints import _consolidate_data_parallel, consolidate, read_layout
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


def assert_carried(root: Path, step: int, tp: int = 1) -> None:
    """The weights and Adam moments right after the load are those the old run had when it saved
    (rank 0's: under tensor parallelism its shard)."""
    saved = load_file(str(root / "dumps" / f"saved-step{step}.safetensors"))
    loaded = load_file(str(root / "dumps" / f"loaded-step{step}.safetensors"))
    assert saved.keys() == loaded.keys()
    different = [k for k in saved if not torch.equal(saved[k], loaded[k])]
    assert not different, different[:5]
    assert sum(float(loaded[k].abs().sum()) for k in loaded if k.startswith("m/")) > 0  # not reset
    # Each parameter group keeps its own hyperparameters (weight decay 0 for norms and biases), and
    # Adam's step count is the saved one.
    groups = [json.loads((root / "dumps" / f"{when}-step{step}.json").read_text())
              for when in ("saved", "loaded")]
    assert groups[0] == groups[1] and groups[1]["adam_steps"] == [step], groups
    # ... and the weights are the checkpoint's, as vaemo-export reads them.
    folder = root / "run" / "checkpoints" / f"step_{step:08d}"
    full = consolidate(folder) if tp == 1 else _consolidate_data_parallel(folder, read_layout(folder), 0)
    assert {f"w/{k}" for k in full} == {k for k in loaded if k.startswith("w/")}
    assert all(torch.equal(full[k], loaded[f"w/{k}"]) for k in full)


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


def test_one_process_resumes_on_two(corpus, tmp_path):
    """ZeRO-2 from 1 process onto 2: its partitions are cut anew from the universal checkpoint."""
    launch(tmp_path, corpus, 1, *common(tmp_path, 2), "train.grad_accum=2", "train.stop_at=2")
    text = output(launch(tmp_path, corpus, 2, *common(tmp_path, 2), "--resume", "latest"))
    assert "resumed from 1 ranks x 1 workers onto 2 x 1: step 2" in text, text[-3000:]
    assert_carried(tmp_path, 2)
    assert_epoch_once_and_schedule_continued(tmp_path)


def test_tensor_parallel_2_x_data_parallel_2_resumes_on_tensor_parallel_2_x_1(corpus, tmp_path):
    """4 processes (TP 2 x DP 2, ZeRO-2) onto 2 (TP 2 x DP 1): the universal conversion joins the
    tensor-parallel shards and the load cuts them again the same way."""
    tp = ["parallel.tensor=2", "model.heads=4"]
    launch(tmp_path, corpus, 4, *common(tmp_path, 2), *tp, "train.stop_at=3")
    text = output(launch(tmp_path, corpus, 2, *common(tmp_path, 2), *tp, "train.grad_accum=2", "--resume",
                         "latest"))
    assert "resumed from 2 ranks x 1 workers onto 1 x 1: step 3" in text, text[-3000:]
    assert "tensor parallel 2 kept" in text
    assert_carried(tmp_path, 3, tp=2)
    assert_epoch_once_and_schedule_continued(tmp_path, ranks=(0, 2))  # one rank of each old TP group


def test_a_tensor_parallel_change_is_refused_before_start(corpus, zero1_stopped, tmp_path):
    root = stopped_copy(zero1_stopped, tmp_path)
    before = (root / "run" / "metrics.jsonl").read_text()
    proc = launch(root, corpus, 2, *common(root, 1), "parallel.tensor=2", "model.heads=4", "--resume",
                  "latest", ok=False)
    text = output(proc)
    assert proc.returncode != 0
    assert "resume error: cannot resume from" in text and "written with parallel.tensor=1 and this run has " \
        "parallel.tensor=2. Tensor parallelism must stay the same" in text, text[-3000:]
    assert "training stage1" not in text and (root / "run" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("case", ["stage_change", "nvme_offload"])
def test_a_resize_deepspeed_cannot_do_is_refused_before_start(corpus, zero1_stopped, tmp_path, case):
    """Another ZeRO stage together with another data-parallel size; and ZeRO-3 with NVMe optimizer
    offload (its swap files are per rank). The NVMe checkpoint is the ZeRO-1 one with its config.yaml
    saying ZeRO-3 + NVMe: the refusal reads only that, before any DeepSpeed file."""
    root = stopped_copy(zero1_stopped, tmp_path)
    if case == "nvme_offload":
        cfg_file = root / "run" / "checkpoints" / "step_00000003" / "config.yaml"
        raw = yaml.safe_load(cfg_file.read_text())
        raw["train"]["zero_stage"] = 3
        raw["train"]["deepspeed"] = {"zero_optimization": {"offload_optimizer": {"device": "nvme",
                                                                                 "nvme_path": "/local/nvme"}}}
        cfg_file.write_text(yaml.safe_dump(raw))
    proc = launch(root, corpus, 1, *common(root, 1), "train.zero_stage=3", "--resume", "latest", ok=False)
    text = output(proc)
    assert proc.returncode == 2, text[-3000:]
    assert "resume error: cannot resume from" in text and "onto 1 data-parallel ranks" in text
    if case == "stage_change":
        assert "the checkpoint is ZeRO-1 and this run asks for train.zero_stage=3" in text, text[-3000:]
    else:
        assert "ZeRO-3 with NVMe optimizer offload" in text and "cannot re-partition" in text, text[-3000:]
    assert "Resume on 2 data-parallel ranks" in text and "vaemo-export" in text  # the ways out
