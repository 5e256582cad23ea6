import torch
import torch.nn.functional as F

from vaemo_dist.model.embed import (
    TokenEmbed,
    patchify_audio,
    patchify_video,
    sincos_pos_embed,
    unpatchify_audio,
    unpatchify_video,
)


def test_video_round_trip_and_token_order():
    torch.manual_seed(0)
    tub, p = 2, 8
    video = torch.randn(2, 3, 4, 16, 24)
    tokens = patchify_video(video, tub, p)
    grid = (2, 2, 3)
    assert tokens.shape == (2, 12, 3 * tub * p * p)
    assert torch.equal(unpatchify_video(tokens, grid, tub, p), video)
    # Tokens run over (t, h, w) row-major; values inside a token over (c, t, y, x).
    for t in range(2):
        for h in range(2):
            for w in range(3):
                block = video[:, :, t * tub:(t + 1) * tub, h * p:(h + 1) * p, w * p:(w + 1) * p]
                assert torch.equal(tokens[:, (t * 2 + h) * 3 + w], block.reshape(2, -1))


def test_audio_round_trip_and_token_order():
    torch.manual_seed(0)
    p = 8
    audio = torch.randn(2, 1, 32, 16)  # F = 32 time frames, M = 16 mel bins
    tokens = patchify_audio(audio, p)
    assert tokens.shape == (2, 8, p * p)
    assert torch.equal(unpatchify_audio(tokens, (4, 2), p), audio)
    for f in range(4):
        for m in range(2):
            block = audio[:, :, f * p:(f + 1) * p, m * p:(m + 1) * p]
            assert torch.equal(tokens[:, f * 2 + m], block.reshape(2, -1))


def test_linear_patch_embed_equals_strided_conv():
    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, 16, 16)
    embed = TokenEmbed(3 * 2 * 8 * 8, 12, (2, 2, 2))
    conv = F.conv3d(video, embed.proj.weight.reshape(12, 3, 2, 8, 8), embed.proj.bias, stride=(2, 8, 8))
    tokens = embed(patchify_video(video, 2, 8)) - embed.modality
    torch.testing.assert_close(tokens, conv.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_sincos_pos_embed_shapes_and_determinism():
    for grid, dim in [((8, 6, 6), 192), ((8, 6, 6), 128), ((16, 8), 192), ((16, 8), 128), ((2, 3, 5), 30)]:
        pos = sincos_pos_embed(grid, dim)
        n = torch.Size(grid).numel()
        assert pos.shape == (n, dim) and pos.dtype == torch.float32
        assert torch.equal(pos, sincos_pos_embed(grid, dim))
        assert pos.abs().max() <= 1.0
        # Every position gets its own code.
        dists = torch.cdist(pos, pos) + torch.eye(n) * 10
        assert dists.min() > 1e-3
    # 128 over 3 axes: time gets the first 44 dims, h and w 42 each; each share depends on its axis only.
    pos = sincos_pos_embed((3, 4, 5), 128).reshape(3, 4, 5, 128)
    assert torch.equal(pos[:, :1, :1, :44].expand(3, 4, 5, 44), pos[..., :44])
    assert torch.equal(pos[:1, :, :1, 44:86].expand(3, 4, 5, 42), pos[..., 44:86])
    assert torch.equal(pos[:1, :1, :, 86:].expand(3, 4, 5, 42), pos[..., 86:])


def test_token_embed_pos_is_a_fixed_buffer():
    embed = TokenEmbed(64, 16, (4, 2))
    assert "pos" not in dict(embed.named_parameters())
    assert "pos" not in embed.state_dict()  # recomputed from the config, not checkpointed
    assert torch.equal(embed.pos, sincos_pos_embed((4, 2), 16))
