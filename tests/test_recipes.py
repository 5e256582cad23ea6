"""The recipes in configs/recipes/: each loads and validates, the stage-1 ones at HiCMAE's input shapes,
and their step counts are the arithmetic their headers state (epochs x clips // global batch)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from vaemo_dist.config import ConfigError, config_from_dict, load_config, read_config_dict, validate_world

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"
STAGE1 = {  # recipe -> (assumed clips, epochs, warmup epochs, GPUs of the source script)
    "stage1_vox2_hicmae_base.yaml": (1_092_009, 100, 5, 2),
    "stage1_avfmae_scale.yaml": (1_090_000, 100, 5, 8),
}
FINETUNE = ("cremad", "ravdess", "mafw", "dfew")


def all_recipes() -> list[Path]:
    return sorted(RECIPES.glob("*.yaml"))


def test_the_recipes_exist():
    names = {p.name for p in all_recipes()}
    assert set(STAGE1) <= names
    assert {f"finetune_{b}.yaml" for b in FINETUNE} <= names


@pytest.mark.parametrize("path", all_recipes(), ids=lambda p: p.name)
def test_recipe_loads_and_validates_with_the_users_shards(path: Path):
    cfg = load_config(path, ["data.shards=/data/shards/x"])
    assert cfg.data.shards == "/data/shards/x"
    if cfg.data.global_batch_size:  # the header's GPU count fits the global batch
        gb, micro = cfg.data.global_batch_size, cfg.data.batch_size
        assert gb % (micro * cfg.train.grad_accum) == 0
        validate_world(cfg, gb // (micro * cfg.train.grad_accum))


@pytest.mark.parametrize("name", sorted(STAGE1))
def test_stage1_recipe_has_hicmae_shapes_and_schedule(name: str):
    clips, epochs, warmup_epochs, gpus = STAGE1[name]
    cfg = load_config(RECIPES / name, ["data.shards=/data/shards/x"])
    v, a, m = cfg.inputs.video, cfg.inputs.audio, cfg.model
    assert (v.frames, v.stride, v.size, v.size) == (16, 4, 160, 160)
    assert (a.frames, a.n_mels) == (256, 128)
    assert m.mask_ratio_video == 0.9
    assert m.mask_ratio_audio == (0.8 if "hicmae" in name else 0.8125)
    per_epoch = clips // cfg.data.global_batch_size  # HiCMAE's loaders drop the last partial batch
    assert cfg.train.steps == epochs * per_epoch
    assert cfg.optim.warmup_steps == warmup_epochs * per_epoch
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.train.zero_stage == 2
    assert cfg.optim.lr == pytest.approx(3e-4 * cfg.data.global_batch_size / 256)  # HiCMAE's lr scaling
    validate_world(cfg, gpus)
    # The header states the same numbers it sets.
    header = (RECIPES / name).read_text()
    assert f"{cfg.train.steps:,}" in header and f"{cfg.optim.warmup_steps:,}" in header
    assert f"{clips:,}" in header
    assert "vaemo-shard --dataset voxceleb2" in header and "--face-crop" in header


def test_stage1_recipes_leave_the_shards_to_the_user():
    for name in STAGE1:
        assert read_config_dict(RECIPES / name)["data"]["shards"] == ""


def test_a_wrong_gpu_count_is_refused_with_the_fix():
    cfg = load_config(RECIPES / "stage1_vox2_hicmae_base.yaml", ["data.shards=/x"])
    with pytest.raises(ConfigError, match="data.batch_size=19"):
        validate_world(cfg, 4)


@pytest.mark.parametrize("bench", FINETUNE)
def test_finetune_recipe_with_an_exports_model(bench: str):
    path = RECIPES / f"finetune_{bench}.yaml"
    raw = read_config_dict(path, [])
    raw["model"] = {"preset": "base"}  # as launchers/finetune.py puts the export's model in
    cfg = config_from_dict(raw)
    assert cfg.data.global_batch_size == 56 == cfg.data.batch_size * 4  # HiCMAE: 14 per GPU x 4 GPUs
    assert cfg.optim.lr == pytest.approx(1e-3 * 56 / 256)
    assert cfg.optim.betas == [0.9, 0.999]
    text = path.read_text()
    epochs = int(re.search(r"--epochs (\d+)", text).group(1))
    assert epochs == {"cremad": 50, "mafw": 100, "dfew": 100, "ravdess": 50}[bench]
    assert "--protocol official --test-views 2,2" in text
    # warmup = 5 epochs of the stated training clips per fold
    per_fold = int(re.search(r"about (\d+) training clips per fold", text).group(1))
    assert cfg.optim.warmup_steps == 5 * -(-per_fold // 56)


def _recipe_costs():
    import importlib.util

    path = RECIPES.parents[1] / "benchmarks" / "recipe_costs.py"
    spec = importlib.util.spec_from_file_location("recipe_costs", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("recipe_costs", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_finetune_flops_match_a_hand_count():
    """FlopCounterMode's count of the classifier (meta device) against a count by hand of the base
    preset: every matmul of the encoder over all 800 video + 128 audio tokens. Attention runs over the
    joined sequence with a segment mask, so its score/weighted-sum FLOPs lie between the per-modality
    count and the joint one."""
    costs = _recipe_costs()
    cfg = load_config(RECIPES / "stage1_vox2_hicmae_base.yaml", ["data.shards=/x"])
    counted = costs.classifier_forward_flops(cfg, num_classes=6)
    d, depth, nv, na = 768, 12, 8 * 10 * 10, 16 * 8
    linear = 2 * (nv + na) * (4 * d * d + 2 * d * 4 * d) * depth  # qkv, out, MLP
    embed = 2 * (nv * 3 * 2 * 16 * 16 * d + na * 16 * 16 * d)
    heads = 2 * (3 * d * 512 + 2 * d * 6)  # three projection heads, the classifier head
    attn_lo = 4 * (nv * nv + na * na) * d * depth
    attn_hi = 4 * (nv + na) ** 2 * d * depth
    assert linear + embed + heads + attn_lo <= counted <= linear + embed + heads + attn_hi


def test_recipe_costs_table_arithmetic():
    costs = _recipe_costs()
    c = costs.Cost("x", samples=1_000_000, train_gflop=100.0)
    text = costs.table([c], [0.5], peak_tflops=1000.0)
    # 1e6 x 100 GFLOP = 100 PFLOP; at 500 TFLOP/s: 200 s = 0.1 h; 5,000 samples/s
    assert "| x | 1.00 | 100.0 | 100 | 0.1 | 5,000 |" in text
