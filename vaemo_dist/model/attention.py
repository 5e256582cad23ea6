"""Multi-head attention core: FlashAttention where it can run, PyTorch SDPA everywhere else.

`segments` splits every sequence of the batch into consecutive parts that attend only within
themselves (e.g. the visible video tokens and the visible audio tokens of one clip, which the
shared encoder must keep apart under `fusion: separate`). FlashAttention runs that as one varlen
call over packed sequences, without padding; SDPA uses an equivalent block-diagonal mask.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@functools.cache
def flash_functions() -> tuple[Callable, Callable] | None:
    """flash-attn's (dense, varlen) functions, or None where it is not installed (imported once)."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_func, flash_attn_varlen_func


def backend_for(q: torch.Tensor) -> str:
    """"flash" for CUDA fp16/bf16 tensors when flash-attn is installed, else "sdpa"."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_functions() is not None:
        return "flash"
    return "sdpa"


@functools.cache
def _announce(backend: str) -> None:
    log.info("attention backend: %s", "flash-attn" if backend == "flash" else "torch SDPA")


def segment_bounds(segments: Sequence[int], batch: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens for `batch` sequences each made of `segments`: int32 [batch * len(segments) + 1]."""
    lengths = torch.tensor(list(segments) * batch, dtype=torch.int32, device=device)
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def block_diagonal_mask(segments: Sequence[int], device: torch.device) -> torch.Tensor:
    """[L, L] bool, True where query and key are in the same segment (SDPA's allowed positions)."""
    # Built from Python ints (not repeat_interleave of a tensor of lengths), so torch.compile traces it
    # without a graph break.
    ids = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(segments)])
    return ids[:, None] == ids[None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              segments: Sequence[int] | None = None) -> torch.Tensor:
    """Softmax attention. q, k, v: [B, heads, L, head_dim] -> [B, heads, L, head_dim]."""
    backend = backend_for(q)
    if not torch.compiler.is_compiling():  # a logging call would split a compiled block's graph in two
        _announce(backend)
    if backend == "flash":
        return _flash_attention(q, k, v, segments)
    mask = None if segments is None or len(segments) == 1 else block_diagonal_mask(segments, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# Eager inside compiled blocks (parallel.compile), one graph break per block: flash-attn before 2.7 has
# no torch custom ops for dynamo to trace, and the varlen call's cu_seqlens are built from the Python
# segment lengths and the batch size. Not yet run compiled on a GPU.
@torch.compiler.disable
def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     segments: Sequence[int] | None) -> torch.Tensor:
    dense, varlen = flash_functions()
    b, h, length, d = q.shape
    # flash-attn wants [B, L, heads, head_dim]; packed varlen wants [total, heads, head_dim].
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if segments is None or len(segments) == 1:
        return dense(q, k, v).transpose(1, 2)
    cu = segment_bounds(segments, b, q.device)
    out = varlen(*(t.reshape(b * length, h, d) for t in (q, k, v)), cu, cu, max(segments), max(segments))
    return out.reshape(b, length, h, d).transpose(1, 2)
