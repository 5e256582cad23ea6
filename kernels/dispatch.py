"""The one entry point the model and objectives use for the hot ops.

Dispatch rule, decided per call from the backend and the tensors' device:

- "auto" (default): CUDA tensors -> the Triton kernels (kernels.masked_gather, kernels.contrastive);
  anything else -> the torch reference (kernels.reference). If Triton cannot be imported, CUDA
  tensors fall back to the reference with a one-time warning.
- "reference": the torch reference everywhere.
- "triton": the Triton kernels everywhere. On CPU tensors this needs the Triton interpreter, i.e.
  TRITON_INTERPRET=1 in the environment before the kernel modules are first imported (the tests do
  this in tests/kernels/conftest.py); otherwise it raises.

The backend is the `VAEMO_KERNELS` environment variable, read on every call (a dict lookup, so a
test or a launcher can change it at any time), unless overridden in-process with set_backend() or
the use_backend() context manager. On the reference path the contrastive loss switches to the
row-chunked variant once one direction's logits would exceed CHUNK_THRESHOLD elements, so large
CPU batches stay O(n * chunk) in memory.

The kernel modules are imported lazily, on the first Triton call: importing this module never
imports Triton, and the interpreter setting is taken when the kernels are first needed.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.distributed as dist

from kernels import reference

BACKENDS = ("auto", "reference", "triton")
# Reference path: above this many logits per direction (n_local * n_global), use the chunked loss.
CHUNK_THRESHOLD = 4096 * 4096
CHUNK_ROWS = 1024

# How many calls went to the Triton kernels, by op; the tests use it to see the path really ran.
TRITON_CALLS: Counter[str] = Counter()

_override: str | None = None
_warned_no_triton = False


def _validate(name: str) -> str:
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"VAEMO_KERNELS={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def backend() -> str:
    """The backend in force now: the set_backend() override, else $VAEMO_KERNELS, else 'auto'."""
    if _override is not None:
        return _override
    return _validate(os.environ.get("VAEMO_KERNELS", "auto"))


def set_backend(name: str | None) -> None:
    """Override $VAEMO_KERNELS in this process ('auto', 'reference', 'triton'); None clears it."""
    global _override
    _override = None if name is None else _validate(name)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with use_backend("triton"): ...` runs the block under that backend, then restores."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def _triton_modules() -> tuple[ModuleType, ModuleType]:
    from kernels import contrastive, masked_gather

    return masked_gather, contrastive


def _use_triton(x: torch.Tensor) -> bool:
    global _warned_no_triton
    name = backend()
    if name == "reference":
        return False
    if name == "auto" and not x.is_cuda:
        return False
    try:
        gather_mod, _ = _triton_modules()
    except ImportError as err:
        if name == "triton":
            raise
        if not _warned_no_triton:
            warnings.warn(f"Triton unavailable ({err}); using the torch reference kernels", stacklevel=3)
            _warned_no_triton = True
        return False
    if not x.is_cuda and not gather_mod.INTERPRETED:
        raise RuntimeError(
            "VAEMO_KERNELS=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before the kernels are first imported (or use VAEMO_KERNELS=reference)"
        )
    return True


def masked_gather(tokens: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, N, D], [N, D], [B, K] long -> [B, K, D]; see kernels.reference.masked_gather."""
    if _use_triton(tokens):
        TRITON_CALLS["masked_gather"] += 1
        return _triton_modules()[0].masked_gather(tokens, pos, keep)
    return reference.masked_gather(tokens, pos, keep)


def masked_scatter(
    visible: torch.Tensor, keep: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor, n: int
) -> torch.Tensor:
    """[B, K, D] -> [B, n, D]; see kernels.reference.masked_scatter."""
    if _use_triton(visible):
        TRITON_CALLS["masked_scatter"] += 1
        return _triton_modules()[0].masked_scatter(visible, keep, mask_token, pos, n)
    return reference.masked_scatter(visible, keep, mask_token, pos, n)


def contrastive_loss(
    a: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Symmetric (distributed) InfoNCE; see kernels.reference.contrastive_loss."""
    if _use_triton(a):
        TRITON_CALLS["contrastive_loss"] += 1
        return _triton_modules()[1].contrastive_loss(a, v, logit_scale, group)
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if a.shape[0] * a.shape[0] * world > CHUNK_THRESHOLD:
        return reference.contrastive_loss_chunked(a, v, logit_scale, group, chunk=CHUNK_ROWS)
    return reference.contrastive_loss(a, v, logit_scale, group)
