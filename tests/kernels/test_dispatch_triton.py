"""The dispatch rule: CPU -> reference unless forced; forced -> the Triton kernels really run."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from kernels import dispatch, reference
from kernels import masked_gather as mg
from vaemo_dist.config import AudioInput, InputConfig, LossConfig, ModelConfig, VideoInput
from vaemo_dist.model.vaemo import VAEmoModel
from vaemo_dist.objectives.stage1 import Stage1Objective


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, pos = torch.randn(2, 9, 6, generator=g), torch.randn(9, 6, generator=g)
    keep = torch.tensor([[0, 2, 7], [8, 1, 2]])
    a = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    return tokens, pos, keep, a, v, torch.tensor(10.0)


def _run_all(tokens, pos, keep, a, v, scale):
    return (dispatch.masked_gather(tokens, pos, keep),
            dispatch.masked_scatter(tokens[:, :3], keep, pos[0], pos, 9),
            dispatch.contrastive_loss(a, v, scale))


def _expected(tokens, pos, keep, a, v, scale):
    return (reference.masked_gather(tokens, pos, keep),
            reference.masked_scatter(tokens[:, :3], keep, pos[0], pos, 9),
            reference.contrastive_loss(a, v, scale))


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv("VAEMO_KERNELS", raising=False)
    dispatch.set_backend(None)
    yield
    dispatch.set_backend(None)


@pytest.mark.parametrize("env", [None, "", "auto", "reference", "REFERENCE "])
def test_cpu_uses_reference_unless_forced(monkeypatch, env):
    if env is not None:
        monkeypatch.setenv("VAEMO_KERNELS", env)
    before = dict(dispatch.TRITON_CALLS)
    args = _inputs()
    for got, want in zip(_run_all(*args), _expected(*args)):
        assert torch.equal(got, want)
    assert dict(dispatch.TRITON_CALLS) == before


def test_env_forces_triton_per_call(monkeypatch):
    args = _inputs()
    monkeypatch.setenv("VAEMO_KERNELS", "triton")  # read on every call: no reload needed
    before = dispatch.TRITON_CALLS.copy()
    for got, want in zip(_run_all(*args), _expected(*args)):
        torch.testing.assert_close(got, want)
    for op in ("masked_gather", "masked_scatter", "contrastive_loss"):
        assert dispatch.TRITON_CALLS[op] == before[op] + 1
    monkeypatch.setenv("VAEMO_KERNELS", "reference")
    _run_all(*args)
    assert dispatch.TRITON_CALLS["masked_gather"] == before["masked_gather"] + 1


def test_override_beats_env_and_restores(monkeypatch):
    monkeypatch.setenv("VAEMO_KERNELS", "triton")
    with dispatch.use_backend("reference"):
        assert dispatch.backend() == "reference"
        with dispatch.use_backend("triton"):
            assert dispatch.backend() == "triton"
        assert dispatch.backend() == "reference"
    assert dispatch.backend() == "triton"
    dispatch.set_backend("auto")
    assert dispatch.backend() == "auto"


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("VAEMO_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VAEMO_KERNELS='cuda'"):
        dispatch.masked_gather(*_inputs()[:3])
    with pytest.raises(ValueError):
        dispatch.set_backend("fast")


def test_rule_by_device(monkeypatch):
    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert dispatch._use_triton(cuda) and not dispatch._use_triton(cpu)  # auto
    with dispatch.use_backend("reference"):
        assert not dispatch._use_triton(cuda)
    with dispatch.use_backend("triton"):
        assert dispatch._use_triton(cpu)
        # Kernels built without the interpreter cannot take CPU tensors: say so instead of crashing.
        monkeypatch.setattr(mg, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch._use_triton(cpu)


def test_reference_path_chunks_large_batches(monkeypatch):
    calls = []
    chunked = reference.contrastive_loss_chunked
    monkeypatch.setattr(reference, "contrastive_loss_chunked",
                        lambda *a, **k: calls.append(k["chunk"]) or chunked(*a, **k))
    monkeypatch.setattr(dispatch, "CHUNK_THRESHOLD", 16)
    monkeypatch.setattr(dispatch, "CHUNK_ROWS", 2)
    *_, a, v, scale = _inputs()
    want = reference.contrastive_loss(a, v, scale)
    torch.testing.assert_close(dispatch.contrastive_loss(a, v, scale), want)
    assert calls == [2]
    dispatch.contrastive_loss(a[:4], v[:4], scale)  # 4 * 4 logits: not above the threshold
    assert calls == [2]


def test_model_and_objective_match_under_triton():
    # The whole stage-1 step through the dispatch, reference vs forced Triton: same masks (same
    # generator seed), same loss and parameter gradients.
    inputs = InputConfig(video=VideoInput(frames=4, size=32, tubelet=2, patch=8),
                         audio=AudioInput(frames=32, n_mels=64, patch=8))
    cfg = ModelConfig(preset="custom", dim=32, depth=1, heads=2, decoder_dim=16, decoder_depth=1,
                      decoder_heads=2, embed_dim=16, mask_ratio_video=0.75, mask_ratio_audio=0.6)
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(3, 3, 4, 32, 32, generator=g), torch.randn(3, 1, 32, 64, generator=g)
    results = {}
    before = dispatch.TRITON_CALLS.copy()
    for name in ("reference", "triton"):
        torch.manual_seed(0)
        model = VAEmoModel(dataclasses.replace(cfg), inputs)
        with dispatch.use_backend(name):
            out = model(video, audio, generator=torch.Generator().manual_seed(1))
            loss, _ = Stage1Objective(LossConfig())(out)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), grads)
    ran = {op: dispatch.TRITON_CALLS[op] - before[op] for op in before | dispatch.TRITON_CALLS}
    assert ran == dict(masked_gather=2, masked_scatter=2, contrastive_loss=1)  # video + audio; one loss
    torch.testing.assert_close(results["triton"][0], results["reference"][0])
    assert results["triton"][1].keys() == results["reference"][1].keys()
    for n, grad in results["reference"][1].items():
        torch.testing.assert_close(results["triton"][1][n], grad, rtol=1e-4, atol=1e-6, msg=n)
