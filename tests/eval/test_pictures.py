"""Reconstruction pictures: the arrays drawn are the inputs, masks and predictions they claim to be."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vaemo_dist.config import load_config
from vaemo_dist.eval.pictures import (
    MASK_GREY,
    picture_note,
    reconstruction_panels,
    save_reconstruction_grid,
    unnormalise_patches,
)
from vaemo_dist.model.embed import patchify_audio, patchify_video, unpatchify_audio, unpatchify_video
from vaemo_dist.model.vaemo import ModelOutput, keep_to_mask, patch_targets, random_keep

SMALL = ["inputs.video.frames=8", "inputs.video.size=64", "inputs.audio.frames=128"]
INPUTS = load_config(None, SMALL).inputs


def clips(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised inputs with structure (a moving gradient, a rising tone) plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    v, a = INPUTS.video, INPUTS.audio
    ramp = torch.linspace(-1.5, 1.5, v.size)
    video = (ramp[None, None, None, None, :] + torch.linspace(0, 1, v.frames)[None, None, :, None, None]
             + torch.tensor([0.0, 0.5, -0.5])[None, :, None, None, None])
    video = video.expand(n, 3, v.frames, v.size, v.size)
    video = video + 0.1 * torch.randn(n, 3, v.frames, v.size, v.size, generator=g)
    audio = torch.linspace(-1, 1, a.n_mels)[None, None, None, :] * torch.linspace(0.5, 1.5, a.frames)[:, None]
    audio = audio.expand(n, 1, a.frames, a.n_mels) + 0.1 * torch.randn(n, 1, a.frames, a.n_mels, generator=g)
    return video.contiguous(), audio.contiguous()


def fake_output(video: torch.Tensor, audio: torch.Tensor, norm_pix: bool, seed: int = 0,
                norm_pix_audio: bool | None = None) -> ModelOutput:
    """A ModelOutput whose prediction is exactly the target, with MAE masks at the default ratios
    (`norm_pix`: the video target per-patch normalised; `norm_pix_audio`: the audio one, None: as video)."""
    v, a = INPUTS.video, INPUTS.audio
    g = torch.Generator().manual_seed(seed)
    b = video.shape[0]
    v_target = patch_targets(patchify_video(video, v.tubelet, v.patch), norm_pix)
    audio_norm = norm_pix if norm_pix_audio is None else norm_pix_audio
    a_target = patch_targets(patchify_audio(audio, a.patch), audio_norm)
    v_keep = random_keep(b, v_target.shape[1], 0.9, video.device, g)
    a_keep = random_keep(b, a_target.shape[1], 0.8, audio.device, g)
    emb = torch.zeros(b, 4)
    v_mask, a_mask = keep_to_mask(v_keep, v_target.shape[1]), keep_to_mask(a_keep, a_target.shape[1])
    return ModelOutput(video_pred=v_target.clone(), video_target=v_target, video_mask=v_mask,
                       audio_pred=a_target.clone(), audio_target=a_target, audio_mask=a_mask,
                       video_emb=emb, audio_emb=emb, joint_emb=emb, logit_scale=torch.tensor(1.0),
                       video_keep=v_keep, audio_keep=a_keep)


def test_unpatchify_inverts_patchify_at_eval_shapes():
    video, audio = clips(2)
    v, a = INPUTS.video, INPUTS.audio
    tokens = patchify_video(video, v.tubelet, v.patch)
    assert tokens.shape == (2, 4 * 4 * 4, 3 * 2 * 16 * 16)
    assert torch.equal(unpatchify_video(tokens, INPUTS.video_grid, v.tubelet, v.patch), video)
    tokens = patchify_audio(audio, a.patch)
    assert tokens.shape == (2, 8 * 8, 16 * 16)
    assert torch.equal(unpatchify_audio(tokens, INPUTS.audio_grid, a.patch), audio)


def test_unnormalise_patches_inverts_patch_targets():
    patches = 3.0 * torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(1)) + 2.0
    back = unnormalise_patches(patch_targets(patches, True), patches, True)
    torch.testing.assert_close(back, patches, atol=1e-5, rtol=1e-5)
    assert unnormalise_patches(patches, patches, False) is patches


@pytest.mark.parametrize("norm_pix", [True, False])
def test_prediction_equal_to_target_reproduces_the_input(norm_pix):
    video, audio = clips(3)
    out = fake_output(video, audio, norm_pix)
    p = reconstruction_panels(video, audio, out, INPUTS, norm_pix=norm_pix, max_clips=2)
    assert p.frames == [0, 2, 5, 7]
    assert p.video_input.shape == (2, 4, 64, 64, 3) and p.audio_input.shape == (2, 128, 128)
    np.testing.assert_allclose(p.video_recon, p.video_input, atol=1e-5)
    np.testing.assert_allclose(p.audio_recon, p.audio_input, atol=1e-4)
    # The input panels are the de-normalised inputs: RGB in [0, 1], log-mel in its natural units.
    v, a = INPUTS.video, INPUTS.audio
    rgb = video[:2, :, p.frames].permute(0, 2, 3, 4, 1) * torch.tensor(v.std) + torch.tensor(v.mean)
    np.testing.assert_allclose(p.video_input, rgb.clamp(0, 1).numpy(), atol=1e-6)
    logmel = (audio[:2, 0] * a.std + a.mean).transpose(1, 2)
    np.testing.assert_allclose(p.audio_input, logmel.numpy(), atol=1e-5)
    # Masked panels: grey (video) / NaN (audio) exactly on the masked tokens' pixels.
    np.testing.assert_allclose(p.video_mask_ratio, out.video_mask[:2].float().mean(1).numpy())
    hidden = np.isnan(p.audio_masked)
    assert hidden.mean() == pytest.approx(0.8, abs=0.02)
    np.testing.assert_array_equal(p.audio_masked[~hidden], p.audio_input[~hidden])
    grey = (p.video_masked == MASK_GREY).all(axis=-1)
    assert 0.85 < grey.mean() < 0.95  # 90% of the tubelets (an input pixel may be grey by chance: rare)
    np.testing.assert_array_equal(p.video_masked[~grey], p.video_input[~grey])


@pytest.mark.parametrize("norm_pix,norm_pix_audio", [(True, False), (False, True)])
def test_each_modality_is_unnormalised_by_its_own_setting(norm_pix, norm_pix_audio):
    """model.norm_pix_loss_audio apart from norm_pix_loss: each prediction back with its own rule."""
    video, audio = clips(3)
    out = fake_output(video, audio, norm_pix, norm_pix_audio=norm_pix_audio)
    p = reconstruction_panels(video, audio, out, INPUTS, norm_pix=norm_pix, norm_pix_audio=norm_pix_audio,
                              max_clips=2)
    np.testing.assert_allclose(p.video_recon, p.video_input, atol=1e-5)
    np.testing.assert_allclose(p.audio_recon, p.audio_input, atol=1e-4)
    # One flag for both (the old call) gets the audio wrong and leaves the video as it was.
    wrong = reconstruction_panels(video, audio, out, INPUTS, norm_pix=norm_pix, max_clips=2)
    np.testing.assert_array_equal(wrong.video_recon, p.video_recon)
    hidden = np.isnan(p.audio_masked)
    assert np.abs(wrong.audio_recon[hidden] - p.audio_input[hidden]).mean() > 0.1  # nat; the right rule: 1e-4
    np.testing.assert_array_equal(wrong.audio_recon[~hidden], p.audio_input[~hidden])


def test_the_title_says_which_modalities_take_the_input_patch_statistics():
    assert picture_note(True, True) == "masked patches: prediction scaled by the input patch's mean/std"
    assert picture_note(True, False) == ("masked video patches: prediction scaled by the input patch's "
                                         "mean/std")
    assert picture_note(False, True).startswith("masked audio patches:")
    assert picture_note(False, False) == ""


def test_masked_patches_come_from_the_prediction_and_visible_ones_from_the_input():
    video, audio = clips(2)
    out = fake_output(video, audio, norm_pix=False)
    shifted = dataclasses.replace(out, video_pred=out.video_pred + 0.2, audio_pred=out.audio_pred + 1.0)
    p = reconstruction_panels(video, audio, shifted, INPUTS, norm_pix=False, max_clips=2)
    hidden = np.isnan(p.audio_masked)
    np.testing.assert_allclose(p.audio_recon[hidden], p.audio_input[hidden] + INPUTS.audio.std, atol=1e-4)
    np.testing.assert_array_equal(p.audio_recon[~hidden], p.audio_input[~hidden])
    changed = np.abs(p.video_recon - p.video_input).max(axis=-1) > 1e-6
    grey = (p.video_masked == MASK_GREY).all(axis=-1)
    assert not changed[~grey].any() and changed[grey].mean() > 0.9  # clamping at 0/1 may hide a shift


def test_grid_png_is_written_and_decodes(tmp_path):
    video, audio = clips(3)
    out = fake_output(video, audio, norm_pix=True)
    path = save_reconstruction_grid(video, audio, out, INPUTS, tmp_path / "pics" / "grid.png", max_clips=2,
                                    keys=["clip-a", "clip-b"], labels=[0, 1], title="step 7")
    assert path == tmp_path / "pics" / "grid.png" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    # Two clips of three rows each, about 150 px per panel: a readable picture, not a thumbnail or a poster.
    assert 600 <= width <= 1400 and 800 <= height <= 1600, im.size
    assert pixels.std() > 20  # something is drawn


def cross_output(video: torch.Tensor, audio: torch.Tensor, fraction: float = 0.3) -> ModelOutput:
    """fake_output as the cross decoder gives it: predictions (exactly the targets) of a sample of the
    masked patches only, with their indices."""
    from vaemo_dist.model.vaemo import sample_decoded

    out = fake_output(video, audio, norm_pix=True)
    g = torch.Generator().manual_seed(5)
    v_dec = sample_decoded(out.video_keep, out.video_mask.shape[1], fraction, g)
    a_dec = sample_decoded(out.audio_keep, out.audio_mask.shape[1], fraction, g)

    def pick(t, idx):
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    return dataclasses.replace(out, video_pred=pick(out.video_target, v_dec), video_decoded=v_dec,
                               audio_pred=pick(out.audio_target, a_dec), audio_decoded=a_dec)


def test_cross_decoder_pictures_draw_the_decoded_patches_and_leave_the_rest_grey():
    video, audio = clips(3)
    out = cross_output(video, audio)
    p = reconstruction_panels(video, audio, out, INPUTS, norm_pix=True, max_clips=2)
    v, a = INPUTS.video, INPUTS.audio
    # Per-pixel flags of the decoded patches, laid out as the panels are.
    v_flags = torch.zeros(2, out.video_mask.shape[1]).scatter_(1, out.video_decoded[:2], 1.0)
    v_flags = v_flags[..., None].expand(-1, -1, 3 * v.tubelet * v.patch ** 2)
    decoded_px = unpatchify_video(v_flags, INPUTS.video_grid, v.tubelet, v.patch)[:, 0, p.frames] > 0.5
    decoded_px = decoded_px.numpy()
    a_flags = torch.zeros(2, out.audio_mask.shape[1]).scatter_(1, out.audio_decoded[:2], 1.0)
    a_flags = a_flags[..., None].expand(-1, -1, a.patch ** 2)
    decoded_mel = (unpatchify_audio(a_flags, INPUTS.audio_grid, a.patch)[:, 0] > 0.5).transpose(1, 2).numpy()

    grey = (p.video_masked == MASK_GREY).all(axis=-1)
    assert decoded_px.any() and not (decoded_px & ~grey).any()  # only masked patches are decoded
    np.testing.assert_allclose(p.video_recon[decoded_px], p.video_input[decoded_px], atol=1e-5)
    np.testing.assert_array_equal(p.video_recon[~grey], p.video_input[~grey])
    blank = grey & ~decoded_px
    assert blank.mean() > 0.4 and (p.video_recon[blank] == MASK_GREY).all()

    hidden = np.isnan(p.audio_masked)
    np.testing.assert_allclose(p.audio_recon[decoded_mel], p.audio_input[decoded_mel], atol=1e-4)
    np.testing.assert_array_equal(p.audio_recon[~hidden], p.audio_input[~hidden])
    assert np.isnan(p.audio_recon[hidden & ~decoded_mel]).all()
    assert not np.isnan(p.audio_recon[decoded_mel]).any()

    # The decoded shares: decode_fraction of the masked tokens, and the caption says so.
    dv, da = out.video_decoded.shape[1], out.audio_decoded.shape[1]
    np.testing.assert_allclose(p.video_decoded_ratio, dv / out.video_mask.shape[1])
    np.testing.assert_allclose(p.audio_decoded_ratio, da / out.audio_mask.shape[1])
    from vaemo_dist.eval.pictures import clip_caption

    mv, ma = out.video_mask[0].float().mean().item(), out.audio_mask[0].float().mean().item()  # 58/64, 51/64
    rest = "decoded, the rest grey"
    assert clip_caption(p, 0) == (f"video {100 * mv:.0f}% masked ({100 * dv / 64:.0f}% {rest}), "
                                  f"audio {100 * ma:.0f}% masked ({100 * da / 64:.0f}% {rest})")
    full = reconstruction_panels(video, audio, fake_output(video, audio, True), INPUTS, max_clips=2)
    assert clip_caption(full, 0) == f"video {100 * mv:.0f}% masked, audio {100 * ma:.0f}% masked"


def test_a_partial_prediction_without_its_indices_is_refused():
    video, audio = clips(2)
    out = dataclasses.replace(cross_output(video, audio), video_decoded=None)
    with pytest.raises(ValueError, match="decoded indices"):
        reconstruction_panels(video, audio, out, INPUTS)


def test_a_cross_model_output_renders(tmp_path):
    from vaemo_dist.config import load_config as load
    from vaemo_dist.model.vaemo import VAEmoModel

    cfg = load(None, [*SMALL, "model.depth=1", "model.decoder_depth=1", "model.decoder=cross",
                      "model.decode_fraction=0.25"])
    torch.manual_seed(0)
    video, audio = clips(2)
    with torch.no_grad():
        model = VAEmoModel(cfg.model, cfg.inputs).eval()
        out = model(video, audio, generator=torch.Generator().manual_seed(0))
    assert out.video_pred.shape[1] < out.video_mask.shape[1]
    path = save_reconstruction_grid(video, audio, out, cfg.inputs, tmp_path / "cross.png", max_clips=2,
                                    title="cross")
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 300
