import logging

import torch

from vaemo_dist.model import attention as attn_mod
from vaemo_dist.model.attention import attention, backend_for, block_diagonal_mask, segment_bounds


def math_attention(q, k, v, allowed=None):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def qkv(b=2, h=3, length=11, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g) for _ in range(3)]


def test_sdpa_path_matches_plain_math():
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v), math_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_segments_equal_separate_attention_per_segment():
    q, k, v = qkv(length=11)
    out = attention(q, k, v, segments=[4, 7])
    first = math_attention(q[..., :4, :], k[..., :4, :], v[..., :4, :])
    second = math_attention(q[..., 4:, :], k[..., 4:, :], v[..., 4:, :])
    torch.testing.assert_close(out, torch.cat([first, second], dim=2), atol=1e-6, rtol=1e-5)


def test_bounds_and_mask():
    assert segment_bounds([4, 7], 2, torch.device("cpu")).tolist() == [0, 4, 11, 15, 22]
    mask = block_diagonal_mask([2, 1], torch.device("cpu"))
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_flash_packing_matches_padded_attention(monkeypatch):
    """The flash path's transposes and varlen packing, run with CPU stand-ins for flash-attn."""

    def dense(q, k, v):  # flash layout [B, L, H, D]
        return math_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):  # packed [total, H, D]
        outs = []
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]
            outs.append(math_attention(*seg).transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(attn_mod, "flash_functions", lambda: (dense, varlen))
    q, k, v = qkv(length=9)
    torch.testing.assert_close(attn_mod._flash_attention(q, k, v, None), math_attention(q, k, v))
    segmented = attn_mod._flash_attention(q, k, v, [5, 4])
    torch.testing.assert_close(segmented, attention(q, k, v, segments=[5, 4]), atol=1e-6, rtol=1e-5)


def test_backend_choice_is_logged(caplog):
    attn_mod._announce.cache_clear()
    q, k, v = qkv()
    with caplog.at_level(logging.INFO, logger="vaemo_dist.model.attention"):
        attention(q, k, v)
    assert backend_for(q) == "sdpa"  # CPU fp32: never flash
    assert "attention backend: torch SDPA" in caplog.text
