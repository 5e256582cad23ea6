"""Re-cutting a universal checkpoint for another tensor-parallel degree (`checkpoints.reshard_universal`),
checked without processes against shards cut by hand here (not by the model's TP code): a fake universal
folder laid out as ds_to_universal lays out one of our TP=2 runs (every parameter's rank pieces joined
along axis 0, replicated ones too), re-cut for TP 1 and TP 4, then cut per rank the way DeepSpeed's
universal loader does (`load_hp_checkpoint_state`: a stored shape equal to the rank's parameter is
taken whole, anything else `chunk(tp, cat_dim)[rank]`)."""

from pathlib import Path

import pytest
import torch

from vaemo_dist.checkpoints import UNIVERSAL_STATES, CheckpointError, reshard_universal, shard, tp_split_axis

D, H = 8, 16  # model width and MLP width of the fake block
PREFIX = "encoder.blocks.0."
SHAPES = {"attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D),
          "attn.proj.bias": (D,), "mlp.0.weight": (H, D), "mlp.0.bias": (H,), "mlp.2.weight": (D, H),
          "mlp.2.bias": (D,), "norm1.weight": (D,)}
TOP = {"patch_embed.weight": (D, 4), "logit_scale": (1,)}


def by_hand(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece as apply_tensor_parallel holds it, written out for each layer."""
    local = name.removeprefix(PREFIX)
    if local in ("attn.qkv.weight", "attn.qkv.bias"):  # q, k and v each split: whole heads per rank
        q, k, v = full.chunk(3, dim=0)
        return torch.cat([t.chunk(tp, dim=0)[rank] for t in (q, k, v)], dim=0)
    if local in ("mlp.0.weight", "mlp.0.bias"):  # column: output rows
        return full.chunk(tp, dim=0)[rank]
    if local in ("attn.proj.weight", "mlp.2.weight"):  # row: input columns
        return full.chunk(tp, dim=1)[rank]
    return full  # replicated: row-parallel biases, norms, everything outside the blocks


def loader_cut(stored: dict, own_shape: torch.Size, tp: int, rank: int) -> torch.Tensor:
    param = stored["param"]
    if param.shape == own_shape:
        return param
    return param.chunk(tp, dim=stored.get("cat_dim", 0))[rank]


@pytest.fixture
def universal(tmp_path) -> tuple[Path, dict]:
    """A universal folder of a TP=2 run as ds_to_universal writes it, and the full tensors behind it."""
    g = torch.Generator().manual_seed(0)
    names = {PREFIX + k: s for k, s in SHAPES.items()} | TOP
    folder, full = tmp_path / "universal", {}
    for name, shape in names.items():
        (folder / "zero" / name).mkdir(parents=True)
        for state in UNIVERSAL_STATES:
            t = torch.randn(shape, generator=g)
            full[name, state] = t
            pieces = [by_hand(name, t, 2, r) for r in range(2)]
            merged = torch.cat(pieces, dim=0)
            torch.save({"param": merged, "cat_dim": 0}, folder / "zero" / name / f"{state}.pt")
        torch.save(torch.tensor(5.0), folder / "zero" / name / "step.pt")
    torch.save({"optimizer_state_dict": {"param_groups": []}}, folder / "zero" / "optimizer_state.pt")
    for r in range(2):
        torch.save({"dp_world_size": 2, "mp_world_size": 2}, folder / f"mp_rank_{r:02d}_model_states.pt")
    return folder, full


@pytest.mark.parametrize("new_tp", [1, 4])
def test_every_rank_gets_its_hand_cut_piece(universal, tmp_path, new_tp):
    folder, full = universal
    before = {f: f.read_bytes() for f in folder.rglob("*.pt")}
    out = tmp_path / f"universal-tp{new_tp}"
    rewritten = reshard_universal(folder, out, old_tp=2, new_tp=new_tp)
    assert rewritten == len(SHAPES) * 3 + len(TOP) * 3
    for (name, state), t in full.items():
        stored = torch.load(out / "zero" / name / f"{state}.pt", weights_only=True)
        for rank in range(new_tp):
            want = by_hand(name, t, new_tp, rank)
            got = loader_cut(stored, want.shape, new_tp, rank)
            assert torch.equal(got.reshape(want.shape), want), (name, state, rank)
    # The source is untouched (the copy's files were hard links: replaced, never written through), and
    # what is not a per-parameter state is carried over as it was.
    assert {f: f.read_bytes() for f in folder.rglob("*.pt")} == before
    states = "mp_rank_01_model_states.pt"
    assert (out / states).read_bytes() == (folder / states).read_bytes()
    assert (out / "zero" / "optimizer_state.pt").is_file() and not list(tmp_path.glob(".tmp-*"))


def test_a_degree_the_widths_do_not_allow_is_an_error(universal, tmp_path):
    folder, _ = universal
    with pytest.raises(CheckpointError, match="cannot be split 3 ways"):
        reshard_universal(folder, tmp_path / "universal-tp3", old_tp=2, new_tp=3)
    assert not (tmp_path / "universal-tp3").exists()


def test_split_axes_follow_the_tp_plan():
    assert tp_split_axis(PREFIX + "attn.qkv.weight") == (0, 3)
    assert tp_split_axis(PREFIX + "attn.proj.weight") == (1, 1)
    assert tp_split_axis(PREFIX + "attn.proj.bias") is None and tp_split_axis("patch_embed.weight") is None
    full = torch.arange(3 * D * 2.0).reshape(3 * D, 2)
    qkv = PREFIX + "attn.qkv.weight"
    assert torch.equal(shard(qkv, full, 2, 1), by_hand(qkv, full, 2, 1))
