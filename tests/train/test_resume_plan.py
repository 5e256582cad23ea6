"""What a resume will do, decided from our small checkpoint files before any process group starts
(`checkpoint.plan_resume`): as is, a data-only resize, a resize, tensor-parallel re-cut or ZeRO-stage
change through DeepSpeed's universal checkpoint, or a refusal naming the reason (or the field) and the
way out. The runs themselves are in tests/faults/test_elastic_resume.py."""

import json

import pytest
import yaml

from vaemo_dist.config import ConfigError, load_config
from vaemo_dist.train.checkpoint import (
    CORPUS_FILE,
    CheckpointError,
    ResumeError,
    check_corpus,
    corpus_fingerprint,
    plan_resume,
    resized_seed,
)


def write_checkpoint(root, *, world=2, tp=1, stage=1, workers=1, nvme=False, steps=None, model=None,
                     inputs=None):
    folder = root / "run" / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    train = {"zero_stage": stage}
    if nvme:
        train["deepspeed"] = {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}
    raw = {"train": train, "parallel": {"tensor": tp}, "model": model or {}, "inputs": inputs or {}}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
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


@pytest.mark.parametrize(("checkpoint", "world", "overrides", "expect"), [
    # (resize_model, resize_data, universal, reshard_tp, change_stage)
    ({"world": 4, "tp": 2}, 2, [], (True, False, True, True, False)),                    # TP 2x2 -> 1x2
    ({"world": 4, "tp": 2}, 2, ["parallel.tensor=2", "model.heads=4"], (True, True, True, False, False)),
    ({"world": 2, "tp": 1}, 2, ["parallel.tensor=2", "model.heads=4"], (True, True, True, True, False)),
    ({"stage": 1}, 2, ["train.zero_stage=3"], (False, False, True, False, True)),       # stage only
    ({"stage": 1}, 1, ["train.zero_stage=3"], (True, True, True, False, True)),        # stage and size
    ({"stage": 2}, 2, ["train.zero_stage=1"], (False, False, True, False, True)),
])
def test_tensor_parallel_and_stage_changes_go_through_the_universal_checkpoint(tmp_path, checkpoint, world,
                                                                               overrides, expect):
    model = {"heads": 4} if checkpoint.get("tp", 1) > 1 or "model.heads=4" in overrides else None
    write_checkpoint(tmp_path, model=model, **checkpoint)
    if model and "model.heads=4" not in overrides:
        overrides = [*overrides, "model.heads=4"]
    plan = plan_resume(cfg_for(tmp_path, *overrides), world)
    assert (plan.resize_model, plan.resize_data, plan.universal, plan.reshard_tp, plan.change_stage) == expect
    line = plan.describe()
    assert line.startswith(f"resume plan: DP {plan.old.dp_size} x TP {plan.old.tp_size} x "
                           f"ZeRO-{plan.old.zero_stage} x 1 workers -> DP {plan.dp_size} x TP {plan.new_tp}")
    assert ("re-cut from TP" in line) == plan.reshard_tp
    assert ("batch composition differs" in line) == plan.resize_data
    assert ("RNG reseeded" in line) == plan.resize_model


def test_the_same_layout_says_so(tmp_path):
    write_checkpoint(tmp_path)
    assert plan_resume(cfg_for(tmp_path), 2).describe() == ("resume plan: DP 2 x TP 1 x ZeRO-1 x 1 workers, "
                                                            "the same layout: everything loaded as saved")


def test_a_tensor_parallel_degree_that_does_not_divide_the_heads_is_a_config_error():
    # Refused when the config is read (exit 2 in the launcher), before the resume plan or any process.
    with pytest.raises(ConfigError, match=r"parallel.tensor: 2 must divide model.heads \(3\)"):
        load_config(None, ["parallel.tensor=2", "model.heads=3"])


@pytest.mark.parametrize(("model", "inputs", "field"), [
    ({"dim": 256}, None, "model.dim: 256 in the checkpoint, 192 here"),
    ({"depth": 6}, None, "model.depth: 6 in the checkpoint, 4 here"),
    (None, {"video": {"patch": 8}}, "inputs.video.patch: 8 in the checkpoint, 16 here"),
    (None, {"audio": {"n_mels": 64}}, "inputs.audio.n_mels: 64 in the checkpoint, 128 here"),
])
def test_another_architecture_is_refused_naming_the_field(tmp_path, model, inputs, field):
    write_checkpoint(tmp_path, model=model, inputs=inputs)
    with pytest.raises(ResumeError, match="the model's architecture differs") as e:
        plan_resume(cfg_for(tmp_path), 2)
    assert field in str(e.value)


@pytest.mark.parametrize(("kind", "checkpoint", "overrides", "world", "message"), [
    ("stage0", {"stage": 1}, ["train.zero_stage=0"], 1,
     "the checkpoint is ZeRO-1 and this run asks for train.zero_stage=0"),
    ("stage0_same_size", {"stage": 0}, ["train.zero_stage=2"], 2,
     "the checkpoint is ZeRO-0 and this run asks for train.zero_stage=2"),
    ("tp_zero0", {"stage": 0}, ["train.zero_stage=0", "parallel.tensor=2", "model.heads=4"], 2,
     "a parallel.tensor change (1 -> 2) goes through DeepSpeed's universal checkpoint"),
    ("zero3_tp", {"world": 4, "tp": 2, "stage": 3},
     ["train.zero_stage=3", "parallel.tensor=2", "model.heads=4"], 2,
     "ZeRO-3 under parallel.tensor>1 keeps its data-parallel size"),
    ("tp_to_zero3", {"world": 4, "tp": 2, "stage": 1}, ["train.zero_stage=3", "model.heads=4"], 2,
     "ZeRO-3 universal-checkpoint loader does not cut tensor-parallel shards"),
    ("zero3_to_2", {"stage": 3}, ["train.zero_stage=2"], 2, "a ZeRO-3 checkpoint resumes as ZeRO-3"),
    ("nvme", {"stage": 3, "nvme": True}, ["train.zero_stage=3"], 1, "ZeRO-3 with NVMe optimizer offload"),
])
def test_resizes_deepspeed_cannot_do_are_refused_with_the_way_out(tmp_path, kind, checkpoint, overrides,
                                                                   world, message):
    model = {"heads": 4} if "model.heads=4" in overrides else None
    folder = write_checkpoint(tmp_path, model=model, **checkpoint)
    with pytest.raises(ResumeError) as e:
        plan_resume(cfg_for(tmp_path, *overrides), world)
    assert message in str(e.value)
    old_dp = checkpoint.get("world", 2) // checkpoint.get("tp", 1)
    assert f"Resume on {old_dp} data-parallel ranks" in str(e.value)
    assert f"vaemo-export {folder} --out DIR" in str(e.value)
    if kind == "nvme":  # the same size is no resize: nothing to refuse
        assert not plan_resume(cfg_for(tmp_path, *overrides), 2).resize_model


def test_ranks_disagreeing_on_the_step_is_an_error(tmp_path):
    write_checkpoint(tmp_path, steps=[4, 3])
    with pytest.raises(CheckpointError, match="disagree on the step"):
        plan_resume(cfg_for(tmp_path), 1)


def test_resized_seeds_are_fixed_and_differ_by_rank_and_step():
    seeds = {resized_seed(7, rank, step) for rank in range(4) for step in (10, 11)}
    assert len(seeds) == 8 and resized_seed(7, 1, 10) == resized_seed(7, 1, 10)
    assert all(0 <= s < 2**63 for s in seeds)


URLS = [f"/data/corpus/shard-{i:06d}.tar" for i in range(4)]


def test_the_corpus_fingerprint_is_the_shard_names_and_the_manifest():
    same = corpus_fingerprint(URLS, {"seed": 1})
    assert same == corpus_fingerprint([u.replace("/data/", "s3://bucket/") for u in URLS], {"seed": 1})
    assert same["shards"] == 4
    others = [corpus_fingerprint(URLS[:3], {"seed": 1}), corpus_fingerprint(URLS[::-1], {"seed": 1}),
              corpus_fingerprint(URLS, {"seed": 2}), corpus_fingerprint(URLS)]
    assert len({f["sha256"] for f in others} | {same["sha256"]}) == 5


def test_the_same_corpus_or_none_recorded_resumes_as_is(tmp_path):
    folder = write_checkpoint(tmp_path)
    assert check_corpus(cfg_for(tmp_path), corpus_fingerprint(URLS), 0) is None  # none recorded
    (folder / CORPUS_FILE).write_text(json.dumps(corpus_fingerprint(URLS)))
    assert check_corpus(cfg_for(tmp_path), corpus_fingerprint(URLS), 0) is None


def test_another_corpus_is_refused_naming_the_fields(tmp_path):
    folder = write_checkpoint(tmp_path)
    (folder / CORPUS_FILE).write_text(json.dumps(corpus_fingerprint(URLS)))
    with pytest.raises(ResumeError) as e:
        check_corpus(cfg_for(tmp_path, "data.shards=/new"), corpus_fingerprint(URLS[:3]), 0)
    text = str(e.value)
    assert "data.shards=/new is another corpus than the checkpoint's (3 shards" in text
    assert "the checkpoint's: 4 shards" in text and "train.resume_data=reset" in text


def test_resume_data_reset_resumes_from_a_copy_at_a_fresh_data_position(tmp_path):
    folder = write_checkpoint(tmp_path)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (folder / CORPUS_FILE).write_text(json.dumps(corpus_fingerprint(URLS)))
    new = corpus_fingerprint(URLS[:3])
    out = check_corpus(cfg_for(tmp_path, "train.resume_data=reset"), new, 0)
    assert out == tmp_path / "run" / "data-reset" / folder.name
    states = "mp_rank_00_model_states.pt"
    assert (out / states).stat().st_ino == (folder / states).stat().st_ino  # linked, not copied
    assert json.loads((out / CORPUS_FILE).read_text()) == new
    for rank in range(2):
        old = json.loads((folder / f"vaemo_rank{rank:05d}.json").read_text())
        state = json.loads((out / f"vaemo_rank{rank:05d}.json").read_text())
        assert state["step"] == old["step"] == 4  # the step (and everything but the data) carried
        assert state["data"]["batches"] == 0 and state["data"]["workers"] == {}
        assert state["data"]["key_log_base"] == 4  # the key log's lines so far are kept
        assert (state["data"]["num_workers"], state["data"]["world_size"]) == (1, 2)
    # The copy is a checkpoint that resumes as is; the original is untouched.
    plan = plan_resume(cfg_for(tmp_path, f"train.resume={out}"), 2)
    assert plan.folder == out and plan.old.step == 4 and not plan.resize_data
    assert json.loads((folder / "vaemo_rank00000.json").read_text())["data"]["batches"] == 4
