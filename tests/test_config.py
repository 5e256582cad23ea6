import re
from pathlib import Path

import pytest

from vaemo_dist.config import MODEL_PRESETS, ConfigError, config_from_dict, load_config, validate_world


def test_defaults_validate_and_tiny_preset_applies():
    cfg = load_config(None, [])
    assert cfg.model.preset == "tiny" and cfg.model.dim == MODEL_PRESETS["tiny"]["dim"]
    assert cfg.inputs.video_grid == (8, 10, 10) and cfg.inputs.audio_grid == (16, 8)


def test_preset_fills_in_and_explicit_values_win():
    cfg = load_config(None, ["model.preset=base", "model.depth=3"])
    assert cfg.model.dim == 768 and cfg.model.depth == 3


def test_yaml_base_and_dotted_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {depth: 6}\ntrain: {steps: 7}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\ntrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=0.001", "optim.betas=[0.8, 0.9]"])
    assert (cfg.model.depth, cfg.train.steps, cfg.optim.lr, cfg.optim.betas) == (6, 9, 0.001, [0.8, 0.9])


def test_unknown_key_is_named_with_suggestion_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.dpth=8"])
    msg = str(e.value)
    assert "model.dpth" in msg and "Did you mean 'depth'" in msg and "decoder_dim" in msg


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        config_from_dict({"modle": {}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.depth=eight", "model.depth: expected an integer"),
        ("model.fusion=sideways", "choose one of ['separate', 'joint']"),
        ("model.mask_ratio_video=1.2", "model.mask_ratio_video"),
        ("model.heads=5", "model.heads"),
        ("inputs.video.size=100", "inputs.video.size"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.precision=fp16", "train.precision"),
        ("model.norm_pix_loss=1", "expected true or false"),
    ],
)
def test_bad_values_fail_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.depth"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    for path in ("configs/stage1/tiny.yaml", "configs/stage1/base.yaml"):
        load_config(path)


def test_exponent_floats_without_a_dot_are_numbers():
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_several_bases_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {steps: 5, zero_stage: 1}\n")
    (tmp_path / "b.yaml").write_text("train: {zero_stage: 3}\n")
    (tmp_path / "run.yaml").write_text("base: [a.yaml, b.yaml]\nmodel: {depth: 2}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.train.steps, cfg.train.zero_stage, cfg.model.depth) == (5, 3, 2)


def test_shipped_zero_configs_compose_with_a_stage_config(tmp_path):
    path = tmp_path / "run.yaml"
    repo = Path(__file__).resolve().parents[1]
    path.write_text(f"base: [{repo}/configs/stage1/tiny.yaml, {repo}/configs/deepspeed/zero3.yaml]\n")
    cfg = load_config(path)
    assert cfg.train.zero_stage == 3 and cfg.parallel.activation_checkpointing and cfg.inputs.video.size == 96
    path.write_text(f"base: [{repo}/configs/stage1/tiny.yaml, {repo}/configs/deepspeed/zero3_offload.yaml]\n")
    cfg = load_config(path, ["train.deepspeed.zero_optimization.offload_param.device=nvme"])
    assert cfg.train.zero_stage == 3 and cfg.train.deepspeed["zero_optimization"] == {
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "nvme", "pin_memory": True}}


@pytest.mark.parametrize("override, message", [
    ("train.deepspeed.zero_optimization.stage=3",
     "train.deepspeed.zero_optimization.stage: set train.zero_stage instead"),
    ("train.deepspeed.gradient_accumulation_steps=4", "set train.grad_accum instead"),
    ("train.deepspeed.train_micro_batch_size_per_gpu=4", "set data.batch_size instead"),
    ("train.deepspeed.gradient_clipping=0.5", "set optim.clip_grad instead"),
    ("train.deepspeed.bf16.enabled=true", "train.deepspeed.bf16.enabled: set train.precision instead"),
    ("train.deepspeed.fp16.enabled=true", "train.deepspeed.fp16.enabled: set train.precision"),
    ("train.deepspeed.optimizer={type: Adam}", "train.deepspeed.optimizer: set optim.*"),
    ("train.deepspeed.scheduler={type: WarmupLR}", "train.deepspeed.scheduler: set optim.lr"),
    # DeepSpeed's old forms: a bare stage flag for ZeRO, a bool for bf16.
    ("train.deepspeed.zero_optimization=true", "train.deepspeed.zero_optimization: expected a mapping"),
    ("train.deepspeed.bf16=true", "its 'enabled' comes from train.precision"),
])
def test_deepspeed_keys_derived_from_typed_config_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_deepspeed_dotted_overrides_reach_nested_dicts_and_merge_with_the_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "train:\n  deepspeed:\n    zero_optimization: {offload_optimizer: {device: cpu}}\n"
        "    steps_per_print: 10\n")
    cfg = load_config(tmp_path / "run.yaml", [
        "train.deepspeed.zero_optimization.overlap_comm=true",
        "train.deepspeed.zero_optimization.offload_optimizer.pin_memory=true",
        "train.deepspeed.zero_optimization.reduce_bucket_size=5e8",  # YAML 1.1 reads this as a string
        "train.deepspeed.comms_logger={enabled: true, verbose: false}",
    ])
    zero = cfg.train.deepspeed["zero_optimization"]
    assert zero == {"offload_optimizer": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                    "reduce_bucket_size": 500_000_000}
    assert isinstance(zero["reduce_bucket_size"], int)
    assert cfg.train.deepspeed["comms_logger"] == {"enabled": True, "verbose": False}


def test_deepspeed_free_form_values_read_as_json_would_and_bad_shapes_are_named():
    cfg = load_config(None, ["train.deepspeed.x={a: 1e-3, b: '1e5', c: [2e3, on], d: 1.5e3}"])
    # Quoted or not, a YAML exponent without a dot is the number JSON would give; other values as given.
    assert cfg.train.deepspeed["x"] == {"a": 0.001, "b": 100000, "c": [2000, True], "d": 1500.0}
    with pytest.raises(ConfigError, match="train.deepspeed: expected a mapping of keys, got 3"):
        load_config(None, ["train.deepspeed=3"])
    with pytest.raises(ConfigError, match=r"train.deepspeed.x: key 1 must be a string"):
        load_config(None, ["train.deepspeed.x={1: 2}"])
    with pytest.raises(ConfigError, match="Did you mean 'deepspeed'"):
        load_config(None, ["train.deepspeeed.overlap_comm=true"])


def test_world_size_checks():
    validate_world(load_config(None, ["data.global_batch_size=16", "data.batch_size=4",
                                      "train.grad_accum=2"]), 2)
    with pytest.raises(ConfigError, match="parallel.tensor: 2 must divide the world size"):
        validate_world(load_config(None, ["parallel.tensor=2", "model.heads=4", "model.dim=256"]), 3)
    with pytest.raises(ConfigError, match="set data.batch_size=3"):
        validate_world(load_config(None, ["data.global_batch_size=12", "data.batch_size=4"]), 4)
    # Under tensor parallelism the data-parallel size is world / tensor.
    validate_world(load_config(None, ["data.global_batch_size=8", "data.batch_size=4", "parallel.tensor=3",
                                      "model.decoder_heads=3", "model.decoder_dim=96"]), 6)


def test_profile_section_names_unknown_keys_and_checks_its_values():
    cfg = load_config(None, ["train.profile.start_step=2", "train.profile.steps=2",
                             "train.profile.ranks=[0, 1]", "train.profile.memory=true"])
    p = cfg.train.profile
    assert (p.start_step, p.steps, p.ranks, p.memory, p.record_shapes) == (2, 2, [0, 1], True, False)
    assert load_config(None, []).train.profile.start_step == 0  # off by default
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.profile.start=2"])
    msg = str(e.value)
    assert "unknown config key 'train.profile.start'" in msg and "Did you mean 'start_step'" in msg
    assert "Valid keys in 'train.profile': memory, ranks, record_shapes, start_step, steps" in msg
    for override, fragment in [("train.profile.steps=0", "train.profile.steps: must be >= 1"),
                               ("train.profile.start_step=500", "train.profile.start_step: 500 must be in"),
                               ("train.profile.ranks=[]", "train.profile.ranks"),
                               ("train.profile.ranks=0", "train.profile.ranks: expected a list")]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"train.profile.ranks: \[0, 2\]: every rank must be below"):
        validate_world(load_config(None, ["train.profile.start_step=1", "train.profile.ranks=[0, 2]"]), 2)
    validate_world(load_config(None, ["train.profile.ranks=[0, 2]"]), 2)  # off: the ranks do not matter


def test_compile_is_off_by_default_and_a_bool():
    assert load_config(None, []).parallel.compile is False
    assert load_config(None, ["parallel.compile=true"]).parallel.compile is True
    with pytest.raises(ConfigError, match="parallel.compile: expected true or false"):
        load_config(None, ["parallel.compile=yes please"])


def test_deepspeed_values_json_cannot_hold_are_refused_at_load():
    # A YAML date would reach DeepSpeed's JSON only on rank 0 (the logged config) and fail there alone.
    with pytest.raises(ConfigError, match=r"train.deepspeed.x.when: .* is not a JSON value"):
        load_config(None, ["train.deepspeed.x.when=2024-01-01"])


def test_eval_class_names_are_two_or_more_distinct_names():
    assert load_config(None, ["eval.class_names=[calm, tense]"]).eval.class_names == ["calm", "tense"]
    for bad in ("[calm]", "[calm, calm]"):
        with pytest.raises(ConfigError, match="eval.class_names: .*two or more distinct names"):
            load_config(None, [f"eval.class_names={bad}"])
