"""The one entry point the model and objectives use for the hot ops.

Today every call goes to the torch reference. `VAEMO_KERNELS` (read once, at import) picks the
backend: "reference" (default) or "triton". The Triton kernels for CUDA tensors plug in below,
in each function, once the Triton kernels issue lands; until then "triton" fails loudly.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kernels import reference

BACKEND = os.environ.get("VAEMO_KERNELS", "reference").strip().lower() or "reference"
if BACKEND not in ("reference", "triton"):
    raise ValueError(f"VAEMO_KERNELS={BACKEND!r}: choose 'reference' or 'triton'")


def _check_backend() -> None:
    # Hook point: when Triton kernels exist, route CUDA tensors to them here instead of raising.
    if BACKEND == "triton":
        raise NotImplementedError(
            "VAEMO_KERNELS=triton: the Triton kernels are not implemented yet (they come with the "
            "Triton kernels issue, #5); unset "
            "VAEMO_KERNELS or set it to 'reference'"
        )


def masked_gather(tokens: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, N, D], [N, D], [B, K] long -> [B, K, D]; see kernels.reference.masked_gather."""
    _check_backend()
    return reference.masked_gather(tokens, pos, keep)


def masked_scatter(
    visible: torch.Tensor, keep: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, n: int
) -> torch.Tensor:
    """[B, K, D] -> [B, n, D]; see kernels.reference.masked_scatter."""
    _check_backend()
    return reference.masked_scatter(visible, keep, mask_token, pos, n)


def contrastive_loss(
    a: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Symmetric (distributed) InfoNCE; see kernels.reference.contrastive_loss."""
    _check_backend()
    return reference.contrastive_loss(a, v, logit_scale, group)
