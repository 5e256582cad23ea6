"""The "cross" reconstruction decoder (model.decoder: cross, CrossMAE-style): sampling of the decoded
patches, forward and gradients against a plain torch reference written here, the objective on the
decoded subset, FLOPs against torch's flop counter, parts and config validation."""

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vaemo_dist.config import (
    AudioInput,
    ConfigError,
    InputConfig,
    LossConfig,
    ModelConfig,
    VideoInput,
    load_config,
)
from vaemo_dist.model.flops import account
from vaemo_dist.model.vaemo import (
    PARTS,
    CrossBlock,
    VAEmoModel,
    decoded_count,
    is_decoder_key,
    sample_decoded,
    strip_decoder,
)
from vaemo_dist.objectives.stage1 import Stage1Objective, decoded_mse, masked_mse

# Video 4 frames 32x32 (tubelet 2, patch 8) -> 32 tokens; audio 32x64 (patch 8) -> 32 tokens.
INPUTS = InputConfig(
    video=VideoInput(frames=4, size=32, tubelet=2, patch=8),
    audio=AudioInput(frames=32, n_mels=64, patch=8),
)
CROSS = ModelConfig(preset="custom", dim=32, depth=2, heads=2, decoder_dim=16, decoder_depth=2,
                    decoder_heads=2, embed_dim=16, mask_ratio_video=0.75, mask_ratio_audio=0.5,
                    decoder="cross", decode_fraction=0.5)
B = 3


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    return torch.randn(B, 3, 4, 32, 32, **kw), torch.randn(B, 1, 32, 64, **kw)


def _model(**overrides):
    torch.manual_seed(0)
    model = VAEmoModel(dataclasses.replace(CROSS, **overrides), INPUTS).double()
    with torch.no_grad():  # non-zero biases and norm affines, so the reference checks them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------------------------- sampling


def test_decoded_patches_are_a_sorted_sample_of_the_masked_ones():
    keep = torch.stack([torch.randperm(32)[:8].sort().values for _ in range(5)])
    dec = sample_decoded(keep, 32, 0.5, torch.Generator().manual_seed(1))
    assert dec.shape == (5, decoded_count(32, 8, 0.5)) == (5, 12)
    for k, d in zip(keep, dec):
        assert not set(k.tolist()) & set(d.tolist())  # never a visible patch
        assert d.tolist() == sorted(set(d.tolist()))  # sorted, no repeat
    assert not (dec == dec[:1]).all()  # a different subset per sample
    again = sample_decoded(keep, 32, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(dec, again)  # deterministic under the generator
    every = sample_decoded(keep, 32, 1.0, torch.Generator().manual_seed(1))
    for k, d in zip(keep, every):
        assert sorted(k.tolist() + d.tolist()) == list(range(32))  # fraction 1: every masked patch


def test_decoded_count():
    assert decoded_count(32, 8, 0.25) == 6
    assert decoded_count(32, 31, 0.01) == 1  # at least one while any patch is masked
    assert decoded_count(32, 32, 0.5) == 0
    assert decoded_count(32, 8, 1.0) == 24


def test_cross_masks_and_decoded_subsets_follow_the_generator_and_full_masks_are_unchanged():
    video, audio = _batch()
    cross, full = _model(), _model(decoder="full")
    a = cross(video, audio, generator=torch.Generator().manual_seed(5))
    b = cross(video, audio, generator=torch.Generator().manual_seed(5))
    f = full(video, audio, generator=torch.Generator().manual_seed(5))
    for name in ("video_keep", "audio_keep", "video_decoded", "audio_decoded", "video_pred", "audio_pred"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # The decoded subsets are drawn after the masks: the MAE masks are those of the full decoder.
    assert torch.equal(a.video_keep, f.video_keep) and torch.equal(a.audio_keep, f.audio_keep)
    assert a.video_pred.shape == (B, decoded_count(32, 8, 0.5), 3 * 2 * 8 * 8)
    assert a.audio_pred.shape == (B, decoded_count(32, 16, 0.5), 64)
    assert a.video_mask.gather(1, a.video_decoded).all() and a.audio_mask.gather(1, a.audio_decoded).all()
    # The full decoder says it predicts every patch, in order.
    assert torch.equal(f.video_decoded, torch.arange(32).expand(B, -1))
    assert f.video_pred.shape[1] == 32


# ------------------------------------------------------------------------------- reference (plain torch)


def _ref_layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _ref_cross_attention(x, mem, p, heads):
    """Per-head explicit softmax attention of x [B, Lq, d] to mem [B, Lk, d]; p: the block's params."""
    d = x.shape[-1]
    hd = d // heads
    q = x @ p["cross_attn.q.weight"].T + p["cross_attn.q.bias"]
    kv = mem @ p["cross_attn.kv.weight"].T + p["cross_attn.kv.bias"]
    k, v = kv[..., :d], kv[..., d:]
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
        outs.append(weights @ v[..., sl])
    return torch.cat(outs, -1) @ p["cross_attn.proj.weight"].T + p["cross_attn.proj.bias"]


def _ref_decoder(params, v_enc, a_enc, v_keep, a_keep, v_dec, a_dec, pos_v, pos_a, depth, heads):
    """The cross decoder as the issue states it, from the parameters by name."""
    emb = lambda t: t @ params["decoder_embed.weight"].T + params["decoder_embed.bias"]
    gather = lambda pos, idx: torch.stack([pos[i] for i in idx])  # [B, n, d], row by row
    mem = torch.cat([emb(v_enc) + gather(pos_v, v_keep) + params["dec_video_modality"],
                     emb(a_enc) + gather(pos_a, a_keep) + params["dec_audio_modality"]], 1)
    x = torch.cat([params["mask_token"] + gather(pos_v, v_dec) + params["dec_video_modality"],
                   params["mask_token"] + gather(pos_a, a_dec) + params["dec_audio_modality"]], 1)
    for i in range(depth):
        prefix = f"decoder_blocks.{i}."
        p = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        m = _ref_layer_norm(mem, p["norm_memory.weight"], p["norm_memory.bias"])
        x = x + _ref_cross_attention(_ref_layer_norm(x, p["norm1.weight"], p["norm1.bias"]), m, p, heads)
        h = _ref_layer_norm(x, p["norm2.weight"], p["norm2.bias"]) @ p["ffn.0.weight"].T + p["ffn.0.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ p["ffn.2.weight"].T + p["ffn.2.bias"]
    x = _ref_layer_norm(x, params["decoder_norm.weight"], params["decoder_norm.bias"])
    nd = v_dec.shape[1]
    return (x[:, :nd] @ params["video_pred.weight"].T + params["video_pred.bias"],
            x[:, nd:] @ params["audio_pred.weight"].T + params["audio_pred.bias"])


def test_cross_decoder_forward_and_gradients_match_a_plain_reference():
    model = _model()
    g = torch.Generator().manual_seed(2)
    nv, na, d = model.num_video, model.num_audio, CROSS.dim
    v_keep = torch.stack([torch.randperm(nv, generator=g)[:8].sort().values for _ in range(B)])
    a_keep = torch.stack([torch.randperm(na, generator=g)[:16].sort().values for _ in range(B)])
    v_enc = torch.randn(B, 8, d, dtype=torch.float64, generator=g, requires_grad=True)
    a_enc = torch.randn(B, 16, d, dtype=torch.float64, generator=g, requires_grad=True)

    v_dec, a_dec, x = model._decode_cross(v_enc, a_enc, v_keep, a_keep, torch.Generator().manual_seed(9))
    v_pred, a_pred = model.video_pred(x[:, :v_dec.shape[1]]), model.audio_pred(x[:, v_dec.shape[1]:])
    params = {n: p for n, p in model.named_parameters() if is_decoder_key(n)}
    ref_v, ref_a = _ref_decoder(params, v_enc, a_enc, v_keep, a_keep, v_dec, a_dec, model.dec_video_pos,
                                model.dec_audio_pos, CROSS.decoder_depth, CROSS.decoder_heads)
    assert (v_pred - ref_v).abs().max() < 1e-10 and (a_pred - ref_a).abs().max() < 1e-10

    wv, wa = torch.randn_like(v_pred), torch.randn_like(a_pred)
    inputs = [v_enc, a_enc, *params.values()]
    got = torch.autograd.grad((v_pred * wv).sum() + (a_pred * wa).sum(), inputs)
    want = torch.autograd.grad((ref_v * wv).sum() + (ref_a * wa).sum(), inputs)
    names = ["v_enc", "a_enc", *params]
    for name, a, b in zip(names, got, want):
        assert (a - b).abs().max() < 1e-10, name
        assert b.abs().sum() > 0, name  # every decoder parameter and both memories get a gradient


def test_a_query_never_sees_the_other_queries():
    """No self-attention among queries: a patch's prediction is the same whatever else is decoded."""
    model = _model()
    video, audio = _batch()
    half = model(video, audio, generator=torch.Generator().manual_seed(4))
    model.cfg = dataclasses.replace(model.cfg, decode_fraction=1.0)
    every = model(video, audio, generator=torch.Generator().manual_seed(4))
    assert torch.equal(half.video_keep, every.video_keep)
    for b in range(B):
        rows = [every.video_decoded[b].tolist().index(i) for i in half.video_decoded[b].tolist()]
        torch.testing.assert_close(half.video_pred[b], every.video_pred[b, rows])


# -------------------------------------------------------------------------------------------- objective


def test_decoded_mse_is_the_mean_over_the_decoded_patches():
    g = torch.Generator().manual_seed(0)
    target, mask = torch.randn(2, 10, 4, generator=g), torch.rand(2, 10, generator=g) > 0.3
    decoded = torch.stack([m.nonzero()[:2, 0] for m in mask])
    pred = torch.randn(2, 2, 4, generator=g, requires_grad=True)
    loss = decoded_mse(pred, target, mask, decoded)
    want = torch.stack([((pred[b, j] - target[b, decoded[b, j]]) ** 2).mean()
                        for b in range(2) for j in range(2)]).mean()
    torch.testing.assert_close(loss, want)
    full_pred = torch.randn(2, 10, 4, generator=g)
    assert torch.equal(decoded_mse(full_pred, target, mask, torch.arange(10).expand(2, -1)),
                       masked_mse(full_pred, target, mask))
    with pytest.raises(ValueError, match="do not match"):
        decoded_mse(pred, target, mask, decoded[:, :1])


def test_stage1_objective_trains_the_cross_model():
    model = _model().float()
    objective = Stage1Objective(LossConfig(contrastive_weight=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    video, audio = (t.float() for t in _batch())
    losses = []
    for step in range(10):
        out = model(video, audio, generator=torch.Generator().manual_seed(0))
        loss, metrics = objective(out)
        if step == 0:
            want = masked_mse(out.video_pred, out.video_target.gather(
                1, out.video_decoded[..., None].expand(-1, -1, out.video_target.shape[-1])),
                torch.ones_like(out.video_decoded, dtype=torch.bool))
            assert metrics["rec_video"] == pytest.approx(want.item(), rel=1e-5)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
            assert no_grad == {"joint_head.weight", "joint_head.bias"}
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


# ---------------------------------------------------------------------------------- parts, flops, config


def test_cross_weights_are_decoder_parts_and_strip_with_it():
    model = _model()
    names = {n.split(".", 1)[0] for n in [*model.state_dict(), *(b for b, _ in model.named_buffers())]}
    assert names == {n for part in PARTS.values() for n in part}
    assert all(isinstance(b, CrossBlock) for b in model.decoder_blocks)
    full = model.state_dict()
    assert "decoder_blocks.0.cross_attn.kv.weight" in full
    assert is_decoder_key("decoder_blocks.0.norm_memory.bias")
    kept = strip_decoder(model).state_dict()
    assert set(kept) == {k for k in full if not is_decoder_key(k)}


def math_attention(q, k, v, segments=None):
    # The flop counter does not see inside CPU SDPA; plain matmuls it does count.
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_cross_flops_match_torch_flop_counter(fraction, monkeypatch):
    monkeypatch.setattr("vaemo_dist.model.vaemo.attention", math_attention)
    cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=48", "inputs.audio.frames=64",
                             "model.depth=2", "model.decoder_depth=2", "model.decoder=cross",
                             f"model.decode_fraction={fraction}"])
    model = VAEmoModel(cfg.model, cfg.inputs)
    video, audio = torch.randn(2, 3, 4, 48, 48), torch.randn(2, 1, 64, 128)
    with FlopCounterMode(display=False) as counter:
        model(video, audio)
    measured = counter.get_total_flops() / 2  # per sample
    acc = account(cfg.model, cfg.inputs)
    assert acc.params == model.num_params()
    assert acc.forward_flops == pytest.approx(measured, rel=0.02)
    full = account(dataclasses.replace(cfg.model, decoder="full"), cfg.inputs)
    assert acc.forward_flops < full.forward_flops


def test_base_preset_cross_train_flops_are_under_hicmae_base():
    cfg = load_config("configs/stage1/base.yaml", ["model.decoder=cross", "model.decode_fraction=0.25"])
    assert account(cfg.model, cfg.inputs).train_flops / 1e9 <= 90.0


@pytest.mark.parametrize("override, key", [("model.decode_fraction=0", "model.decode_fraction"),
                                           ("model.decode_fraction=1.5", "model.decode_fraction"),
                                           ("model.decoder=sparse", "model.decoder")])
def test_bad_decoder_settings_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_default_decoder_is_full():
    assert ModelConfig().decoder == "full"
    model = VAEmoModel(ModelConfig(preset="custom", dim=32, depth=1, heads=2, decoder_dim=16,
                                   decoder_depth=1, decoder_heads=2, embed_dim=16), INPUTS)
    assert not any(isinstance(b, CrossBlock) for b in model.decoder_blocks)


def test_cross_blocks_are_not_tensor_parallel_and_unshard_keeps_them_whole():
    """Cross blocks are replicated under tensor parallelism: apply_tensor_parallel shards Blocks only, and
    unshard must not join their (identical) replicas as if they were TP_PLAN's split layers."""
    from vaemo_dist.model.parallelize import unshard

    state = _model().state_dict()
    cross_keys = [k for k in state if k.startswith("decoder_blocks.")]
    assert cross_keys
    for key in cross_keys:
        assert unshard(key, [state[key], state[key].clone()]) is state[key], key
    # ... while a Block's split layer is joined (the plan still applies to the encoder).
    w = state["blocks.0.attn.proj.weight"]
    assert unshard("blocks.0.attn.proj.weight", [w, w]).shape == (w.shape[0], 2 * w.shape[1])


# ------------------------------------------------------------------ activation checkpointing, compile


def _grads_after_one_step(checkpointing: bool):
    from vaemo_dist.config import ParallelConfig
    from vaemo_dist.model.parallelize import parallelize

    model = parallelize(_model(), ParallelConfig(activation_checkpointing=checkpointing))
    calls = []  # CrossBlock forwards: with checkpointing, each block runs again in the backward pass
    for blk in model.modules():
        if isinstance(blk, CrossBlock):
            blk.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
    out = model(*_batch(), generator=torch.Generator().manual_seed(3))
    loss, _ = Stage1Objective(LossConfig(contrastive_weight=0.1))(out)
    forwards = len(calls)
    loss.backward()
    # Parameter names through a checkpoint wrapper carry its prefix; the state-dict names do not.
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), grads, forwards, len(calls) - forwards


def test_activation_checkpointing_covers_cross_blocks_and_keeps_the_gradients():
    plain, loss_a, grads_a, fwd_a, re_a = _grads_after_one_step(False)
    wrapped, loss_b, grads_b, fwd_b, re_b = _grads_after_one_step(True)
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.decoder_blocks)
    assert (fwd_a, re_a) == (CROSS.decoder_depth, 0)
    assert (fwd_b, re_b) == (CROSS.decoder_depth, CROSS.decoder_depth)  # recomputed in the backward
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    assert any(k.startswith("decoder_blocks.") and ".cross_attn." in k for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-12, atol=1e-12, msg=name)


def test_compile_covers_cross_blocks_with_and_without_checkpointing():
    from vaemo_dist.config import ParallelConfig
    from vaemo_dist.model.parallelize import parallelize

    for checkpointing in (False, True):
        model = _model()
        keys = list(model.state_dict())
        model = parallelize(model, ParallelConfig(activation_checkpointing=checkpointing, compile=True))
        assert list(model.state_dict()) == keys
        for block in model.decoder_blocks:  # the outermost module is compiled (wrapper included), once
            assert block._compiled_call_impl is not None
            inner = getattr(block, "_checkpoint_wrapped_module", None)
            assert (inner is not None) == checkpointing
            assert inner is None or (isinstance(inner, CrossBlock) and inner._compiled_call_impl is None)
