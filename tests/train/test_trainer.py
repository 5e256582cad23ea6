"""The DeepSpeed config the trainer hands to deepspeed.initialize: generated from the typed config, with
`train.deepspeed` merged in. No process group and no engine here; the real run is in
tests/integration/test_stage1_run.py."""

import re
from pathlib import Path

import pytest
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from vaemo_dist.config import DEEPSPEED_OWNED, Config, ConfigError, load_config
from vaemo_dist.secrets import redact_config
from vaemo_dist.train.trainer import deepspeed_config, merge_deepspeed

REPO = Path(__file__).resolve().parents[2]


def _nested(dotted: str, value: object) -> dict:
    *sections, leaf = dotted.split(".")
    node: dict = {leaf: value}
    for s in reversed(sections):
        node = {s: node}
    return node


def test_nested_extra_keys_pass_through_and_generated_keys_stay():
    cfg = load_config(None, ["train.zero_stage=2", "data.batch_size=4", "train.grad_accum=3"])
    cfg.train.deepspeed = {
        "zero_optimization": {"overlap_comm": True,
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "communication_data_type": "fp32",
        "flops_profiler": {"enabled": True, "profile_step": 5},
        "bf16": {"immediate_grad_update": True},  # a bf16 key we do not own, next to the one we do
    }
    ds = deepspeed_config(cfg, dp_size=2, bf16=True)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_scatter": False, "overlap_comm": True,
                                       "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds["communication_data_type"] == "fp32"
    assert ds["flops_profiler"] == {"enabled": True, "profile_step": 5}
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 3, 24)
    # The merge copies: changing what DeepSpeed got leaves the config (saved with checkpoints) as it was.
    ds["zero_optimization"]["offload_optimizer"]["device"] = "nvme"
    assert cfg.train.deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_merge_goes_section_by_section_and_extra_wins_on_leaves():
    generated = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    merged = merge_deepspeed(generated, {"a": {"c": {"x": 9}, "b": 5}, "e": {"now": "a section"}, "f": [1]})
    assert merged == {"a": {"b": 5, "c": {"d": 2, "x": 9}}, "e": {"now": "a section"}, "f": [1]}
    assert generated == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}


@pytest.mark.parametrize("owned", sorted(DEEPSPEED_OWNED))
def test_every_owned_key_is_refused_naming_the_typed_key(owned):
    expected = f"train.deepspeed.{owned}: set {DEEPSPEED_OWNED[owned]} instead"
    with pytest.raises(ConfigError) as e:  # at load time, which the launcher does before any process group
        load_config(None, [f"train.deepspeed.{owned}=1"])
    assert str(e.value) == expected
    cfg = Config()  # built by hand, never validated: deepspeed_config still refuses
    cfg.train.deepspeed = _nested(owned, 1)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        deepspeed_config(cfg, 1, False)


def test_dotted_overrides_reach_deepspeed_and_extra_wins_over_a_generated_leaf():
    cfg = load_config(None, ["train.deepspeed.zero_optimization.overlap_comm=true",
                             "train.deepspeed.steps_per_print=10", "train.zero_stage=2"])
    ds = deepspeed_config(cfg, 1, False)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_scatter": False, "overlap_comm": True}
    assert ds["steps_per_print"] == 10


def test_offload_fragment_composes_and_deepspeed_accepts_its_zero_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"base: [{REPO}/configs/stage1/tiny.yaml, {REPO}/configs/deepspeed/zero3_offload.yaml]\n")
    cfg = load_config(path, ["train.deepspeed.zero_optimization.overlap_comm=true"])
    ds = deepspeed_config(cfg, 2, False)
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's own schema (pydantic, no extras)
    assert zero.stage == 3 and zero.overlap_comm
    assert zero.offload_optimizer.device == "cpu" and zero.offload_param.device == "cpu"
    # Our optimizer is torch AdamW; without this DeepSpeed refuses a client optimizer under offload.
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_the_saved_and_logged_config_holds_the_extra_keys_with_urls_redacted():
    cfg = load_config(None, ["train.deepspeed.zero_optimization.offload_param.nvme_path=/local/nvme",
                             "train.deepspeed.x.url=s3://AKIAXX:SeCrEt@host/p?X-Amz-Signature=abc"])
    public = redact_config(cfg.to_dict())  # what the trainer writes with checkpoints and sends to wandb
    extra = public["train"]["deepspeed"]
    assert extra["zero_optimization"] == {"offload_param": {"nvme_path": "/local/nvme"}}
    assert extra["x"]["url"] == "s3://host/p"
    logged = redact_config(deepspeed_config(cfg, 1, False))  # what the trainer logs
    assert logged["x"]["url"] == "s3://host/p" and "SeCrEt" not in str(logged)
