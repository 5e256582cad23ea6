"""Patchify / unpatchify, fixed sin-cos positional embeddings, and token embedding per modality.

Video [B, 3, T, H, W] -> [B, Nv, 3*tubelet*p*p], tokens ordered (t, h, w).
Audio [B, 1, F, M] -> [B, Na, p*p], tokens ordered (f, m): F (time) outer, M (mel) inner.
Inside a token the values are ordered (channel, t, y, x), the layout of a Conv3d/Conv2d weight, so
the Linear patch embedding equals a strided conv with weight.reshape(dim, -1).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def patchify_video(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, T', H', W', C, tubelet, p, p]
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), c * tubelet * patch * patch)


def unpatchify_video(
    tokens: torch.Tensor, grid: tuple[int, int, int], tubelet: int, patch: int, channels: int = 3
) -> torch.Tensor:
    b = tokens.shape[0]
    gt, gh, gw = grid
    x = tokens.reshape(b, gt, gh, gw, channels, tubelet, patch, patch)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, T', tubelet, H', p, W', p]
    return x.reshape(b, channels, gt * tubelet, gh * patch, gw * patch)


def patchify_audio(audio: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, f, m = audio.shape
    x = audio.reshape(b, c, f // patch, patch, m // patch, patch)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, F', M', C, p, p]
    return x.reshape(b, (f // patch) * (m // patch), c * patch * patch)


def unpatchify_audio(tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    b = tokens.shape[0]
    gf, gm = grid
    x = tokens.reshape(b, gf, gm, 1, patch, patch).permute(0, 3, 1, 4, 2, 5)  # [B, 1, F', p, M', p]
    return x.reshape(b, 1, gf * patch, gm * patch)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[L] positions -> [L, dim] (dim even): sin of dim/2 frequencies, then cos of the same."""
    assert dim % 2 == 0, f"sin-cos embedding needs an even size, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed n-D sin-cos embedding [prod(grid), dim], rows in row-major (token) order.

    Each axis gets an even share of `dim`; the first axis (time) takes the remainder, so sizes not
    divisible by 2 * len(grid) (e.g. 128 over 3 axes: 44 + 42 + 42) still work.
    """
    assert dim % 2 == 0, f"sin-cos embedding needs an even size, got {dim}"
    share = (dim // (2 * len(grid))) * 2
    sizes = [dim - share * (len(grid) - 1)] + [share] * (len(grid) - 1)
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    parts = [sincos_1d(s, c.reshape(-1)) for s, c in zip(sizes, coords)]
    return torch.cat(parts, dim=1).float()


class TokenEmbed(nn.Module):
    """Linear patch embedding + learned modality embedding; owns the fixed positional table `pos`,
    which is added by masked_gather only for the kept tokens."""

    def __init__(self, patch_dim: int, dim: int, grid: tuple[int, ...]) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)
        self.modality = nn.Parameter(torch.zeros(dim))
        # Not persistent: recomputed from the config, so checkpoints don't carry it.
        self.register_buffer("pos", sincos_pos_embed(grid, dim), persistent=False)
        self.num_tokens = math.prod(grid)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches) + self.modality
