import dataclasses
import json

import pytest
import torch

from vaemo_dist.config import (
    AudioInput,
    ConfigError,
    InputConfig,
    LossConfig,
    ModelConfig,
    VideoInput,
    load_config,
)
from vaemo_dist.export import model_config_from, save_pretrained
from vaemo_dist.model.embed import patchify_audio, patchify_video
from vaemo_dist.model.vaemo import VAEmoModel, patch_targets
from vaemo_dist.objectives.stage1 import Stage1Objective
from vaemo_dist.pretrained import from_pretrained

# Video 4 frames 32x32 (tubelet 2, patch 8) -> 2x4x4 = 32 tokens; audio 32x64 (patch 8) -> 4x8 = 32.
INPUTS = InputConfig(
    video=VideoInput(frames=4, size=32, tubelet=2, patch=8),
    audio=AudioInput(frames=32, n_mels=64, patch=8),
)
TINY = ModelConfig(preset="custom", dim=32, depth=2, heads=2, decoder_dim=16, decoder_depth=1,
                   decoder_heads=2, embed_dim=16, mask_ratio_video=0.75, mask_ratio_audio=0.6)
B = 4


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 4, 32, 32, generator=g), torch.randn(B, 1, 32, 64, generator=g)


def _model(**overrides):
    torch.manual_seed(0)
    return VAEmoModel(dataclasses.replace(TINY, **overrides), INPUTS)


def test_output_shapes_and_norms():
    model = _model()
    out = model(*_batch())
    assert out.video_pred.shape == out.video_target.shape == (B, 32, 3 * 2 * 8 * 8)
    assert out.audio_pred.shape == out.audio_target.shape == (B, 32, 64)
    assert out.video_mask.shape == (B, 32) and out.video_mask.dtype == torch.bool
    assert out.audio_mask.shape == (B, 32) and out.audio_mask.dtype == torch.bool
    for emb in (out.video_emb, out.audio_emb, out.joint_emb):
        assert emb.shape == (B, 16)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B))
    assert out.logit_scale.ndim == 0
    torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))
    # norm_pix_loss: every target patch has zero mean and unit variance.
    torch.testing.assert_close(out.video_target.mean(-1), torch.zeros(B, 32), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.audio_target.var(-1, unbiased=False), torch.ones(B, 32), atol=1e-3, rtol=0)


def test_masking_counts_and_coverage():
    model = _model()
    out = model(*_batch())
    for keep, mask, ratio in [(out.video_keep, out.video_mask, 0.75), (out.audio_keep, out.audio_mask, 0.6)]:
        k = round((1 - ratio) * 32)
        assert keep.shape == (B, k)
        assert ((~mask).sum(dim=1) == k).all()
        assert not mask.gather(1, keep).any()  # kept tokens are never marked as masked
        covered = mask.clone().scatter_(1, keep, True)
        assert covered.all()  # kept + masked = every token
        assert not (keep == keep[:1]).all()  # a different mask per sample


def test_masking_follows_the_torch_rng():
    model = _model()
    video, audio = _batch()
    torch.manual_seed(7)
    first = model(video, audio)
    torch.manual_seed(7)
    again = model(video, audio)
    assert torch.equal(first.video_keep, again.video_keep) and torch.equal(first.audio_keep, again.audio_keep)
    torch.testing.assert_close(first.video_pred, again.video_pred)
    other = model(video, audio)
    assert not torch.equal(first.video_keep, other.video_keep)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    keep1, keep2 = model(video, audio, generator=g1).audio_keep, model(video, audio, generator=g2).audio_keep
    assert torch.equal(keep1, keep2)


def test_separate_fusion_keeps_modalities_apart_and_joint_mixes_them():
    video, audio = _batch()
    audio2 = torch.randn_like(audio)
    for fusion, leaks in [("separate", False), ("joint", True)]:
        model = _model(fusion=fusion)
        a = model(video, audio, generator=torch.Generator().manual_seed(1))
        b = model(video, audio2, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.video_keep, b.video_keep)
        assert not torch.allclose(a.audio_emb, b.audio_emb)
        assert torch.allclose(a.video_emb, b.video_emb, atol=1e-6) is not leaks, fusion
        assert not torch.allclose(a.joint_emb, b.joint_emb)


def test_gradients_reach_all_parameters():
    model = _model()
    loss, _ = Stage1Objective(LossConfig())(model(*_batch()))
    loss.backward()
    # joint_head only feeds joint_emb, which stage 1 does not train (stage 2 does).
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert no_grad == {"joint_head.weight", "joint_head.bias"}
    model.zero_grad()
    model(*_batch()).joint_emb.sum().backward()
    assert model.joint_head.weight.grad.abs().sum() > 0


def test_logit_scale_is_clamped():
    torch.manual_seed(0)
    model = VAEmoModel(TINY, INPUTS, max_logit_scale=20.0, init_temperature=0.01)
    assert model(*_batch()).logit_scale.item() == 20.0


def test_adam_steps_reduce_the_loss_on_a_fixed_batch():
    model = _model()
    objective = Stage1Objective(LossConfig(contrastive_weight=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    video, audio = _batch()
    losses = []
    for _ in range(10):
        out = model(video, audio, generator=torch.Generator().manual_seed(0))  # same masks each step
        loss, _ = objective(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_num_params_counts_every_parameter():
    model = _model()
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0
    assert not any(k.endswith("pos") for k in model.state_dict())


def test_norm_pix_loss_audio_changes_the_audio_target_and_only_it():
    video, audio = _batch()
    v, a = INPUTS.video, INPUTS.audio
    v_raw, a_raw = patchify_video(video, v.tubelet, v.patch), patchify_audio(audio, a.patch)
    v_norm, a_norm = patch_targets(v_raw, True), patch_targets(a_raw, True)
    outs = {}
    for video_norm, audio_norm in [(True, None), (True, True), (True, False), (False, None), (False, True)]:
        model = _model(norm_pix_loss=video_norm, norm_pix_loss_audio=audio_norm)
        outs[video_norm, audio_norm] = model(video, audio, generator=torch.Generator().manual_seed(5))
    expected = {(True, None): (v_norm, a_norm), (True, True): (v_norm, a_norm),
                (True, False): (v_norm, a_raw), (False, None): (v_raw, a_raw), (False, True): (v_raw, a_norm)}
    base = outs[True, None]
    for key, out in outs.items():
        v_target, a_target = expected[key]
        torch.testing.assert_close(out.video_target, v_target, msg=str(key))
        torch.testing.assert_close(out.audio_target, a_target, msg=str(key))
        # The target is all the option changes: same weights, masks and predictions.
        assert torch.equal(out.video_mask, base.video_mask) and torch.equal(out.audio_mask, base.audio_mask)
        torch.testing.assert_close(out.video_pred, base.video_pred)
        torch.testing.assert_close(out.audio_pred, base.audio_pred)


def test_norm_pix_audio_follows_norm_pix_loss_unless_set():
    assert (ModelConfig().norm_pix_video, ModelConfig().norm_pix_audio) == (True, True)
    for video_norm in (True, False):
        m = ModelConfig(norm_pix_loss=video_norm)
        assert m.norm_pix_loss_audio is None and m.norm_pix_video is m.norm_pix_audio is video_norm
        for audio_norm in (True, False):
            m = ModelConfig(norm_pix_loss=video_norm, norm_pix_loss_audio=audio_norm)
            assert (m.norm_pix_video, m.norm_pix_audio) == (video_norm, audio_norm)
    cfg = load_config(None, ["model.norm_pix_loss_audio=false"])
    assert (cfg.model.norm_pix_video, cfg.model.norm_pix_audio) == (True, False)
    assert load_config(None, ["model.norm_pix_loss_audio=null"]).model.norm_pix_loss_audio is None
    with pytest.raises(ConfigError, match="norm_pix_loss_audio"):
        load_config(None, ["model.norm_pix_loss_audio=0"])


@pytest.mark.parametrize("video_norm", [True, False])
def test_an_old_config_without_norm_pix_loss_audio_loads(tmp_path, video_norm):
    """Run configs and exports written before the field existed: the audio target follows norm_pix_loss."""
    old_model = {k: v for k, v in dataclasses.asdict(TINY).items() if k != "norm_pix_loss_audio"}
    old_model["norm_pix_loss"] = video_norm
    raw = {"model": old_model, "inputs": dataclasses.asdict(INPUTS)}
    cfg = model_config_from(raw)
    assert cfg.model.norm_pix_loss_audio is None and cfg.model.norm_pix_audio is video_norm
    # An export whose config.json lacks the field (as vaemo-export wrote it before) loads and encodes.
    model = VAEmoModel(cfg.model, cfg.inputs)
    folder = save_pretrained(tmp_path / "export", model.state_dict(), cfg)
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["norm_pix_loss_audio"] is None  # what a new export writes
    del config["model"]["norm_pix_loss_audio"]
    (folder / "config.json").write_text(json.dumps(config))
    encoder = from_pretrained(folder)
    video, audio = _batch()
    model.eval()
    torch.testing.assert_close(encoder.model.encode(video, audio).joint_emb,
                               model.encode(video, audio).joint_emb)
    assert encoder.model.cfg.norm_pix_audio is video_norm


def test_every_weight_and_buffer_belongs_to_exactly_one_declared_part():
    """PARTS is the one statement of the model's structure (export, strip_decoder, fine-tuning read it):
    a layer added or renamed without its entry fails here."""
    from vaemo_dist.model.vaemo import PARTS

    model = _model()
    names = {n.split(".", 1)[0] for n in [*model.state_dict(), *(b for b, _ in model.named_buffers())]}
    declared = [n for part in PARTS.values() for n in part]
    assert len(declared) == len(set(declared))  # no name in two parts
    assert names == set(declared)
    assert set(PARTS) == {"encoder", "heads", "decoder"}


def test_strip_decoder_removes_exactly_the_decoder():
    from vaemo_dist.model.vaemo import is_decoder_key, strip_decoder

    model = _model()
    full = model.state_dict()
    kept = strip_decoder(model).state_dict()
    assert set(kept) == {k for k in full if not is_decoder_key(k)}
    assert {k for k in full if is_decoder_key(k)} >= {"mask_token", "decoder_embed.weight", "video_pred.bias",
                                                       "decoder_blocks.0.attn.qkv.weight"}
    assert not hasattr(model, "dec_video_pos") and not is_decoder_key("norm.weight")
    video, audio = _batch()
    assert model.encode(video, audio).joint_emb.shape == (B, TINY.embed_dim)


def test_the_stage2_model_is_the_declared_parts():
    from vaemo_dist.config import Stage2Config
    from vaemo_dist.model.text_head import TEXT_HEAD, TEXT_HEAD_PREFIX, VAEMO, VAEMO_PREFIX, Stage2Model

    model = Stage2Model(_model(), 24, Stage2Config(), LossConfig())
    assert [name for name, _ in model.named_children()] == [VAEMO, TEXT_HEAD]
    assert all(k.startswith((VAEMO_PREFIX, TEXT_HEAD_PREFIX)) for k in model.state_dict())
