import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vaemo_dist.config import load_config
from vaemo_dist.model.flops import account, peak_tflops, table
from vaemo_dist.model.vaemo import VAEmoModel


def math_attention(q, k, v, segments=None):
    # The flop counter does not see inside CPU SDPA; plain matmuls it does count. (The analytic count,
    # like everyone's, charges full attention even where the block-diagonal mask skips work.)
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("fusion", ["separate", "joint"])
def test_analytic_flops_match_torch_flop_counter(fusion, monkeypatch):
    monkeypatch.setattr("vaemo_dist.model.vaemo.attention", math_attention)
    cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=48", "inputs.audio.frames=64",
                             "model.depth=2", "model.decoder_depth=1", f"model.fusion={fusion}"])
    model = VAEmoModel(cfg.model, cfg.inputs)
    video, audio = torch.randn(2, 3, 4, 48, 48), torch.randn(2, 1, 64, 128)
    with FlopCounterMode(display=False) as counter:
        model(video, audio)
    measured = counter.get_total_flops() / 2  # per sample
    acc = account(cfg.model, cfg.inputs)
    assert acc.params == model.num_params()
    # The analytic count leaves out element-wise work and the tiny pooled-token heads' extras.
    assert acc.forward_flops == pytest.approx(measured, rel=0.02)


def test_table_lists_every_preset_in_growing_size():
    text = table(load_config("configs/stage1/base.yaml"))
    names = [line.split("|")[1].strip() for line in text.splitlines()[2:]]
    assert names == ["tiny", "small", "base", "large", "huge"]
    params = [float(line.split("|")[2]) for line in text.splitlines()[2:]]
    assert params == sorted(params)


def test_peak_lookup():
    assert peak_tflops(123.0, torch.device("cpu")) == 123.0
    assert peak_tflops(0.0, torch.device("cpu")) == 0.0
