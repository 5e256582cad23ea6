"""Fused symmetric InfoNCE in Triton: the [n_local, n_global] logits never exist in memory.

For rows q_i (this rank's a, or v) scored against columns k_j (all of v, or all of a, gathered over
the group) with logits S_ij = s * q_i . k_j and label column i + offset (offset = rank * n_local):

    loss = 1/(2n) * sum over both directions and rows i of [ LSE_j(S_ij) - S_{i, i+offset} ]

Forward: one program per block of rows streams over column tiles keeping an online logsumexp
(running max m and sum l), and picks up the label logit when its tile passes by. It stores one LSE
per row, so the backward needs O(n) saved state besides the inputs.

Backward (FlashAttention-style recomputation): with P_ij = exp(S_ij - LSE_i) and
D = P - onehot(label), the gradients are dq_i = g*s * sum_j D_ij k_j, dk_j = g*s * sum_i D_ij q_i and
ds = g * sum_ij D_ij (q_i . k_j), g = grad_out / (2n). A row kernel (dq and the ds partials) and a
column kernel (dk) each recompute S tile by tile, so neither needs atomics and both are deterministic.

Distributed semantics are those of kernels.reference.contrastive_loss (OpenCLIP local_loss=True,
gather_with_grad=True): the gathered columns come from reference.gather_with_grad, whose backward
all-reduces their gradient and keeps this rank's rows, so the kernels only ever see local tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.reference import gather_global

# Rows x columns per logits tile. The whole embedding (padded to a power of two) is held per tile,
# which suits the E = 128..512 of contrastive heads.
BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _lse_fwd_kernel(
    q_ptr, k_ptr, scale_ptr, lse_ptr, diag_ptr,
    n_rows, n_cols, E, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    e = tl.arange(0, BLOCK_E)
    row_ok = rows < n_rows
    e_ok = e < E
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * E + e[None, :], mask=row_ok[:, None] & e_ok[None, :],
                other=0.0).to(ACC)
    s = tl.load(scale_ptr).to(ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    diag = tl.zeros((BLOCK_M,), ACC)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        k = tl.load(k_ptr + cols.to(tl.int64)[:, None] * E + e[None, :],
                    mask=col_ok[:, None] & e_ok[None, :], other=0.0).to(ACC)
        logits = tl.dot(q, tl.trans(k), input_precision=PREC) * s
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        # Online logsumexp: rescale the running sum to the new running max.
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
        is_label = cols[None, :] == (rows + offset)[:, None]
        diag += tl.sum(tl.where(is_label, logits, 0.0), axis=1)
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)
    tl.store(diag_ptr + rows, diag, mask=row_ok)


@triton.jit
def _row_bwd_kernel(
    q_ptr, k_ptr, scale_ptr, lse_ptr, dq_ptr, dscale_ptr,
    n_rows, n_cols, E, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    # dq_i = sum_j D_ij k_j and the per-row part of ds, sum_j D_ij (q_i . k_j); unscaled (the
    # wrapper multiplies by g * s and g).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    e = tl.arange(0, BLOCK_E)
    row_ok = rows < n_rows
    e_ok = e < E
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * E + e[None, :], mask=row_ok[:, None] & e_ok[None, :],
                other=0.0).to(ACC)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    s = tl.load(scale_ptr).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_E), ACC)
    dscale = tl.zeros((BLOCK_M,), ACC)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        k = tl.load(k_ptr + cols.to(tl.int64)[:, None] * E + e[None, :],
                    mask=col_ok[:, None] & e_ok[None, :], other=0.0).to(ACC)
        raw = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.where(col_ok[None, :], tl.exp(raw * s - lse[:, None]), 0.0)
        d = p - tl.where(cols[None, :] == (rows + offset)[:, None], 1.0, 0.0)
        acc += tl.dot(d, k, input_precision=PREC)
        dscale += tl.sum(d * raw, axis=1)
    tl.store(dq_ptr + rows.to(tl.int64)[:, None] * E + e[None, :], acc, mask=row_ok[:, None] & e_ok[None, :])
    tl.store(dscale_ptr + rows, dscale, mask=row_ok)


@triton.jit
def _col_bwd_kernel(
    q_ptr, k_ptr, scale_ptr, lse_ptr, dk_ptr,
    n_rows, n_cols, E, offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    # dk_j = sum_i D_ij q_i (unscaled): one program per column block streams over the row tiles.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    col_ok = cols < n_cols
    e_ok = e < E
    k = tl.load(k_ptr + cols.to(tl.int64)[:, None] * E + e[None, :], mask=col_ok[:, None] & e_ok[None, :],
                other=0.0).to(ACC)
    s = tl.load(scale_ptr).to(ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_E), ACC)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * E + e[None, :],
                    mask=row_ok[:, None] & e_ok[None, :], other=0.0).to(ACC)
        # Padding rows get LSE = +inf, hence P = 0, and no label.
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        raw = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.exp(raw * s - lse[:, None])
        is_label = (cols[None, :] == (rows + offset)[:, None]) & row_ok[:, None]
        d = p - tl.where(is_label, 1.0, 0.0)
        acc += tl.dot(tl.trans(d), q, input_precision=PREC)
    tl.store(dk_ptr + cols.to(tl.int64)[:, None] * E + e[None, :], acc, mask=col_ok[:, None] & e_ok[None, :])


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    # fp64 inputs (gradcheck) are computed in fp64; everything else accumulates in fp32.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _launch_cfg(q: torch.Tensor, block_m: int, block_n: int) -> dict:
    e = q.shape[1]
    block_e = max(16, triton.next_power_of_2(e))  # tl.dot needs every dimension >= 16
    # fp32 inputs: exact fp32 products, as torch's default matmul (no TF32). 16-bit inputs are exact
    # in TF32 once upcast, so the tensor-core path loses nothing on the products.
    prec = "tf32" if q.dtype in (torch.bfloat16, torch.float16) else "ieee"
    acc = tl.float64 if _acc_dtype(q) == torch.float64 else tl.float32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_E=block_e, PREC=prec, ACC=acc,
                num_warps=8 if block_e >= 256 else 4)


def _direction_fwd(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int, block_m: int,
                   block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row LSE over all columns and the label logit, for rows q against columns k."""
    n, e = q.shape
    lse = torch.empty(n, dtype=_acc_dtype(q), device=q.device)
    diag = torch.empty_like(lse)
    _lse_fwd_kernel[(triton.cdiv(n, block_m),)](q, k, scale, lse, diag, n, k.shape[0], e, offset,
                                                **_launch_cfg(q, block_m, block_n))
    return lse, diag


def _direction_bwd(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor, offset: int,
                   block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unscaled sum_j D_ij k_j per row, sum_i D_ij q_i per column, and sum_ij D_ij (q_i . k_j)."""
    n, e = q.shape
    m = k.shape[0]
    cfg = _launch_cfg(q, block_m, block_n)
    acc = _acc_dtype(q)
    dq = torch.empty(n, e, dtype=acc, device=q.device)
    dscale = torch.empty(n, dtype=acc, device=q.device)
    _row_bwd_kernel[(triton.cdiv(n, block_m),)](q, k, scale, lse, dq, dscale, n, m, e, offset, **cfg)
    dk = torch.empty(m, e, dtype=acc, device=q.device)
    _col_bwd_kernel[(triton.cdiv(m, block_n),)](q, k, scale, lse, dk, n, m, e, offset, **cfg)
    return dq, dk, dscale.sum()


class _FusedInfoNCE(torch.autograd.Function):
    """(a, v, all_a, all_v, logit_scale) -> scalar loss. all_a / all_v may be a / v themselves
    (single process): autograd then adds the row and column gradients, as the reference does."""

    @staticmethod
    def forward(ctx, a, v, all_a, all_v, logit_scale, offset: int, block_m: int, block_n: int):
        a, v, all_a, all_v = (x.contiguous() for x in (a, v, all_a, all_v))
        scale = logit_scale.detach().reshape(1).contiguous()
        lse_a, diag_a = _direction_fwd(a, all_v, scale, offset, block_m, block_n)
        lse_v, diag_v = _direction_fwd(v, all_a, scale, offset, block_m, block_n)
        n = a.shape[0]
        loss = ((lse_a - diag_a).sum() + (lse_v - diag_v).sum()) / (2 * n)
        ctx.save_for_backward(a, v, all_a, all_v, scale, lse_a, lse_v)
        ctx.offset, ctx.blocks = offset, (block_m, block_n)
        ctx.scale_dtype, ctx.scale_shape = logit_scale.dtype, logit_scale.shape
        return loss.to(torch.result_type(a, logit_scale))

    @staticmethod
    def backward(ctx, grad):
        a, v, all_a, all_v, scale, lse_a, lse_v = ctx.saved_tensors
        block_m, block_n = ctx.blocks
        g = grad.to(lse_a.dtype) / (2 * a.shape[0])
        s = scale[0].to(lse_a.dtype)
        da, dall_v, ds_a = _direction_bwd(a, all_v, scale, lse_a, ctx.offset, block_m, block_n)
        dv, dall_a, ds_v = _direction_bwd(v, all_a, scale, lse_v, ctx.offset, block_m, block_n)
        gs = g * s
        return (
            (da * gs).to(a.dtype), (dv * gs).to(v.dtype), (dall_a * gs).to(all_a.dtype),
            (dall_v * gs).to(all_v.dtype), (g * (ds_a + ds_v)).to(ctx.scale_dtype).reshape(ctx.scale_shape),
            None, None, None,
        )


def contrastive_loss(
    a: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """Symmetric InfoNCE between embeddings a, v [n_local, E] (L2-normalised by the caller), fused.

    Same value and gradients as kernels.reference.contrastive_loss, distributed case included: this
    rank's rows against every gathered column, labels offset by rank * n_local, gradient through the
    gather. Assumes the same n_local on every rank of `group`.
    """
    if a.dim() != 2 or a.shape != v.shape:
        raise ValueError(f"a and v must both be [n, E], got {tuple(a.shape)} and {tuple(v.shape)}")
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=a.device)
    all_a, all_v, offset = gather_global(a, v, group)
    return _FusedInfoNCE.apply(a, v, all_a, all_v, logit_scale, offset, block_m, block_n)
