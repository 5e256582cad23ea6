"""What a resume will do, decided from our small checkpoint files before any process group starts
(`checkpoint.plan_resume`): as is, a data-only resize, a resize through DeepSpeed's universal
checkpoint, or a refusal naming the reason and the way out. The runs themselves are in
tests/faults/test_resize.py."""

import json

import pytest
import yaml

from vaemo_dist.config import load_config
from vaemo_dist.train.checkpoint import CheckpointError, ResumeError, plan_resume, resized_seed


def write_checkpoint(root, *, world=2, tp=1, stage=1, workers=1, nvme=False, steps=None):
    folder = root / "run" / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    train = {"zero_stage": stage}
    if nvme:
        train["deepspeed"] = {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}
    (folder / "config.yaml").write_text(yaml.safe_dump({"train": train, "parallel": {"tensor": tp}}))
    for rank in range(world):
        data = {"num_workers": workers, "world_size": world // tp, "batches": 4, "workers": {}, "counts": {}}
        step = (steps or [4] * world)[rank]
        (folder / f"vaemo_rank{rank:05d}.json").write_text(json.dumps({"step": step, "data": data}))
    (root / "run" / "checkpoints" / "latest").write_text(folder.name)
    return folder


def cfg_for(root, *overrides):
    return load_config(None, [f"train.out_dir={root}", "train.run_name=run", "train.resume=latest",
                              *overrides])


def test_no_checkpoint_or_no_resume_is_a_fresh_start(tmp_path):
    assert plan_resume(cfg_for(tmp_path), 2) is None
    write_checkpoint(tmp_path)
    assert plan_resume(load_config(None, [f"train.out_dir={tmp_path}", "train.run_name=run"]), 2) is None


@pytest.mark.parametrize(("world", "overrides", "stage", "expect"), [
    (2, [], 1, (False, False, False)),                       # the same layout: loaded as saved
    (2, ["data.num_workers=3"], 1, (False, True, False)),    # workers only: the data is dealt anew
    (1, ["train.zero_stage=0"], 0, (True, True, False)),     # ZeRO-0: its states are whole
    (3, ["train.zero_stage=2"], 2, (True, True, True)),      # ZeRO 1-3: through a universal checkpoint
    (1, ["train.zero_stage=3"], 3, (True, True, True)),
])
def test_what_a_resume_does(tmp_path, world, overrides, stage, expect):
    write_checkpoint(tmp_path, stage=stage)
    plan = plan_resume(cfg_for(tmp_path, *overrides), world)
    assert (plan.resize_model, plan.resize_data, plan.universal) == expect
    assert (plan.old.dp_size, plan.old.step, plan.old.zero_stage) == (2, 4, stage)


def test_tensor_parallel_size_must_stay(tmp_path):
    write_checkpoint(tmp_path, world=4, tp=2)
    with pytest.raises(ResumeError, match=r"written with parallel.tensor=2 and this run has "
                                          r"parallel.tensor=1\. Tensor parallelism must stay the same .* "
                                          r"set parallel.tensor=2"):
        plan_resume(cfg_for(tmp_path), 2)
    assert plan_resume(cfg_for(tmp_path, "parallel.tensor=2", "model.heads=4"), 2).universal  # DP 2 -> 1


@pytest.mark.parametrize(("kind", "checkpoint", "overrides", "message"), [
    ("stage", {"stage": 1}, ["train.zero_stage=2"], "the checkpoint is ZeRO-1 and this run asks for "
                                                    "train.zero_stage=2"),
    ("zero3_tp", {"world": 4, "tp": 2, "stage": 3},
     ["train.zero_stage=3", "parallel.tensor=2", "model.heads=4"],
     "ZeRO-3 under parallel.tensor=2 keeps its data-parallel size"),
    ("nvme", {"stage": 3, "nvme": True}, ["train.zero_stage=3"], "ZeRO-3 with NVMe optimizer offload"),
])
def test_resizes_deepspeed_cannot_do_are_refused_with_the_way_out(tmp_path, kind, checkpoint, overrides,
                                                                   message):
    folder = write_checkpoint(tmp_path, **checkpoint)
    world = 2 if kind == "zero3_tp" else 1  # half the data-parallel ranks
    with pytest.raises(ResumeError) as e:
        plan_resume(cfg_for(tmp_path, *overrides), world)
    assert message in str(e.value)
    assert "Resume on 2 data-parallel ranks" in str(e.value)
    assert f"vaemo-export {folder} --out DIR" in str(e.value)
    if kind != "zero3_tp":  # the same size is no resize: nothing to refuse
        assert not plan_resume(cfg_for(tmp_path, *overrides), 2).resize_model


def test_ranks_disagreeing_on_the_step_is_an_error(tmp_path):
    write_checkpoint(tmp_path, steps=[4, 3])
    with pytest.raises(CheckpointError, match="disagree on the step"):
        plan_resume(cfg_for(tmp_path), 1)


def test_resized_seeds_are_fixed_and_differ_by_rank_and_step():
    seeds = {resized_seed(7, rank, step) for rank in range(4) for step in (10, 11)}
    assert len(seeds) == 8 and resized_seed(7, 1, 10) == resized_seed(7, 1, 10)
    assert all(0 <= s < 2**63 for s in seeds)
