"""Plain torch reference implementations of the hot ops. These are the ground truth that any
faster kernel (Triton, later) is tested against; keep them simple and obviously correct."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def masked_gather(tokens: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Visible tokens plus their positional embedding.

    tokens [B, N, D], pos [N, D], keep [B, K] long -> [B, K, D] with
    out[b, k] = tokens[b, keep[b, k]] + pos[keep[b, k]].
    """
    idx = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, idx) + pos[keep].to(tokens.dtype)


def masked_scatter(
    visible: torch.Tensor, keep: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, n: int
) -> torch.Tensor:
    """Inverse of masked_gather on the decoder side.

    visible [B, K, D], keep [B, K] long, mask_token [D], pos [N, D] -> [B, N, D]: visible tokens at
    their positions, the mask token everywhere else, plus pos everywhere. `keep` must not repeat an
    index within a row (MAE masking never does).
    """
    b, _, d = visible.shape
    full = mask_token.to(visible.dtype).expand(b, n, d)
    idx = keep.unsqueeze(-1).expand(-1, -1, d)
    # Out-of-place scatter: the mask token's gradient flows only from the positions not overwritten.
    full = full.scatter(1, idx, visible)
    return full + pos.to(visible.dtype)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and keeps this rank's rows.

    Our own rather than torch.distributed.nn.functional.all_gather: that one is deprecated, and its
    gloo backward addresses subgroup members by group rank where global ranks are needed (it fails
    under tensor x data parallelism)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # a reduce-scatter that gloo also supports
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[n_local, ...] on every rank of `group` -> [world * n_local, ...], differentiable."""
    return _GatherWithGrad.apply(x, group)


def gather_global(a: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both embeddings over the global batch (with gradient), and where this rank's rows start in it
    (the label of local row i is i + offset)."""
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world > 1:
        a_all, v_all = gather_with_grad(a, group), gather_with_grad(v, group)
    else:
        a_all, v_all = a, v
    return a_all, v_all, rank * a.shape[0]


def contrastive_loss(
    a: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised embeddings a, v [n_local, E].

    Distributed (OpenCLIP local_loss=True, gather_with_grad=True): both embeddings are all-gathered
    with gradient; this rank scores its own rows against every column of the global batch, labels
    offset by rank * n_local. The mean of this loss over ranks equals the single-process loss over
    the global batch. Assumes the same n_local on every rank.
    """
    all_a, all_v, offset = gather_global(a, v, group)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_a2v = logit_scale * a @ all_v.T
    logits_v2a = logit_scale * v @ all_a.T
    return (F.cross_entropy(logits_a2v, labels) + F.cross_entropy(logits_v2a, labels)) / 2


def _cross_entropy_sum(q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logit_scale * q @ k.T, labels, reduction="sum")


def contrastive_loss_chunked(
    a: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """contrastive_loss computed `chunk` rows at a time: peak memory O(chunk * n_global), not
    O(n_local * n_global).

    Each row block's logits are built, reduced to a summed cross-entropy and dropped; activation
    checkpointing recomputes them one block at a time in the backward. Same value and gradients as
    contrastive_loss (up to summation order), distributed semantics included; it costs one extra
    logits matmul per block in the backward.
    """
    n = a.shape[0]
    all_a, all_v, offset = gather_global(a, v, group)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    total = a.new_zeros(())
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        for q, k in ((a, all_v), (v, all_a)):
            # No randomness inside, so no RNG state to stash and restore for the recomputation.
            total = total + checkpoint(_cross_entropy_sum, q[rows], k, logit_scale, labels[rows],
                                       use_reentrant=False, preserve_rng_state=False)
    return total / (2 * n)
