"""Triton kernels for MAE masking: the encoder-side gather and the decoder-side scatter.

Both fuse the positional embedding into the index move, so the [B, N, D] "tokens + pos" tensor is
never written. Inputs may be fp32, bf16 or fp16; every kernel upcasts to fp32 after loading (bf16
arithmetic is also broken in the Triton interpreter) and rounds once, when storing.

Semantics are those of kernels.reference.masked_gather / masked_scatter, which the tests compare
against. Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU
tensors, which is how the tests exercise them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows (b, k) per program and embedding columns per program. D is tiled too, so wide models still
# fit in registers; the tests pass larger tiles to keep the interpreter fast.
BLOCK_ROWS = 32
BLOCK_D = 128
# Whether the kernels below were built for the interpreter (TRITON_INTERPRET=1 when this module was
# imported): only then can they run on CPU tensors.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def _gather_fwd_kernel(
    tok_ptr, pos_ptr, keep_ptr, out_ptr,
    R, K, N, D,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_R flattened output rows r = b * K + k, BLOCK_D embedding columns.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols[None, :] < D)
    idx = tl.load(keep_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    b = (rows // K).to(tl.int64)
    tok = tl.load(tok_ptr + (b * N + idx)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    pos = tl.load(pos_ptr + idx[:, None] * D + cols[None, :], mask=mask, other=0.0)
    out = tok.to(ACC) + pos.to(ACC)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _gather_bwd_kernel(
    grad_ptr, keep_ptr, gtok_ptr, gpos_ptr,
    R, K, N, D,
    NEED_TOK: tl.constexpr, NEED_POS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Scatter-add of the output gradient into fp32 buffers. Atomics: `keep` may repeat an index
    # within a row (tokens) and always repeats indices across the batch (pos).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols[None, :] < D)
    idx = tl.load(keep_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    g = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    g = g.to(ACC)
    if NEED_TOK:
        b = (rows // K).to(tl.int64)
        tl.atomic_add(gtok_ptr + (b * N + idx)[:, None] * D + cols[None, :], g, mask=mask)
    if NEED_POS:
        tl.atomic_add(gpos_ptr + idx[:, None] * D + cols[None, :], g, mask=mask)


@triton.jit
def _scatter_fwd_kernel(
    vis_ptr, inv_ptr, mask_tok_ptr, pos_ptr, out_ptr,
    B, N, K, D,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[b, n] = (visible[b, inv[b, n]] if inv[b, n] >= 0 else mask_token) + pos[n]; one program
    # covers BLOCK_N positions x BLOCK_D columns of one sample, so every output row is written once.
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    col_ok = cols < D
    mask = n_ok[:, None] & col_ok[None, :]
    inv = tl.load(inv_ptr + b * N + n, mask=n_ok, other=-1).to(tl.int64)
    kept = inv >= 0
    vis = tl.load(vis_ptr + (b * K + tl.where(kept, inv, 0))[:, None] * D + cols[None, :],
                  mask=mask & kept[:, None], other=0.0).to(ACC)
    mtok = tl.load(mask_tok_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    pos = tl.load(pos_ptr + n.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    out = tl.where(kept[:, None], vis, mtok[None, :]) + pos.to(ACC)
    tl.store(out_ptr + (b * N + n)[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_bwd_kernel(
    grad_ptr, inv_ptr, gvis_ptr, gmask_part_ptr, gpos_ptr,
    B, N, K, D,
    NEED_VIS: tl.constexpr, NEED_MASK: tl.constexpr, NEED_POS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program owns BLOCK_N positions x BLOCK_D columns and walks the batch, so the pos gradient
    # (sum over b) needs no atomics; the mask-token gradient is written as one partial sum per
    # position block and reduced by torch. Deterministic.
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    col_ok = cols < D
    mask = n_ok[:, None] & col_ok[None, :]
    acc_pos = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    acc_mask = tl.zeros((BLOCK_D,), dtype=ACC)
    n64 = n.to(tl.int64)
    for b in range(0, B):
        # b * N counts rows (fits int32); element offsets are int64 via n64.
        g = tl.load(grad_ptr + (b * N + n64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        g = g.to(ACC)
        inv = tl.load(inv_ptr + b * N + n64, mask=n_ok, other=-1).to(tl.int64)
        kept = inv >= 0
        acc_pos += g
        if NEED_MASK:
            acc_mask += tl.sum(tl.where(kept[:, None], 0.0, g), axis=0)
        if NEED_VIS:
            tl.store(gvis_ptr + (b * K + tl.where(kept, inv, 0))[:, None] * D + cols[None, :],
                     g.to(gvis_ptr.dtype.element_ty), mask=mask & kept[:, None])
    if NEED_POS:
        tl.store(gpos_ptr + n.to(tl.int64)[:, None] * D + cols[None, :],
                 acc_pos.to(gpos_ptr.dtype.element_ty), mask=mask)
    if NEED_MASK:
        tl.store(gmask_part_ptr + pid_n * D + cols, acc_mask, mask=col_ok)


def _acc_dtype(*tensors: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    # fp64 inputs (gradcheck) keep fp64 throughout; everything else accumulates in fp32.
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _check_keep(keep: torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    if keep.dim() != 2 or keep.shape[0] != b:
        raise ValueError(f"keep must be [B={b}, K], got {tuple(keep.shape)}")
    if keep.device != device:
        raise ValueError(f"keep is on {keep.device}, the tokens on {device}")
    return keep.contiguous()


class _MaskedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor,
                block_rows: int, block_d: int) -> torch.Tensor:
        b, n, d = tokens.shape
        keep = _check_keep(keep, b, tokens.device)
        tokens, pos = tokens.contiguous(), pos.contiguous()
        k = keep.shape[1]
        out = torch.empty(b, k, d, dtype=tokens.dtype, device=tokens.device)
        r = b * k
        if r > 0 and d > 0:
            grid = (triton.cdiv(r, block_rows), triton.cdiv(d, block_d))
            _gather_fwd_kernel[grid](tokens, pos, keep, out, r, k, n, d, ACC=_acc_dtype(tokens, pos)[1],
                                     BLOCK_R=block_rows, BLOCK_D=block_d)
        ctx.save_for_backward(keep)
        ctx.shapes = (b, n, d, tokens.dtype, pos.dtype)
        ctx.blocks = (block_rows, block_d)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        b, n, d, tok_dtype, pos_dtype = ctx.shapes
        block_rows, block_d = ctx.blocks
        need_tok, need_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_tok or need_pos):
            return None, None, None, None, None
        grad = grad.contiguous()
        k = keep.shape[1]
        # fp32 accumulators: many bf16 atomic adds into one pos row would lose precision.
        acc, acc_tl = _acc_dtype(grad)
        gtok = torch.zeros(b, n, d, dtype=acc, device=grad.device) if need_tok else None
        gpos = torch.zeros(n, d, dtype=acc, device=grad.device) if need_pos else None
        r = b * k
        if r > 0 and d > 0:
            dummy = grad.new_empty(1, dtype=acc)
            grid = (triton.cdiv(r, block_rows), triton.cdiv(d, block_d))
            _gather_bwd_kernel[grid](grad, keep, gtok if need_tok else dummy, gpos if need_pos else dummy,
                                     r, k, n, d, NEED_TOK=need_tok, NEED_POS=need_pos, ACC=acc_tl,
                                     BLOCK_R=block_rows, BLOCK_D=block_d)
        gtok = gtok.to(tok_dtype) if need_tok else None
        gpos = gpos.to(pos_dtype) if need_pos else None
        return gtok, gpos, None, None, None


class _MaskedScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visible: torch.Tensor, keep: torch.Tensor, mask_token: torch.Tensor,
                pos: torch.Tensor, n: int, block_n: int, block_d: int) -> torch.Tensor:
        b, k, d = visible.shape
        keep = _check_keep(keep, b, visible.device)
        visible, mask_token, pos = visible.contiguous(), mask_token.contiguous(), pos.contiguous()
        # Inverse map: inv[b, t] = the visible row placed at position t, or -1 for a mask token.
        # With it each output row is produced by exactly one program, and the backward can gather.
        inv = torch.full((b, n), -1, dtype=torch.int32, device=visible.device)
        src = torch.arange(k, dtype=torch.int32, device=visible.device).expand(b, k)
        inv.scatter_(1, keep, src)
        out = torch.empty(b, n, d, dtype=visible.dtype, device=visible.device)
        if b * n > 0 and d > 0:
            grid = (b, triton.cdiv(n, block_n), triton.cdiv(d, block_d))
            _scatter_fwd_kernel[grid](visible, inv, mask_token, pos, out, b, n, k, d,
                                      ACC=_acc_dtype(visible, mask_token, pos)[1],
                                      BLOCK_N=block_n, BLOCK_D=block_d)
        ctx.save_for_backward(inv)
        ctx.shapes = (b, n, k, d, visible.dtype, mask_token.dtype, pos.dtype)
        ctx.blocks = (block_n, block_d)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv,) = ctx.saved_tensors
        b, n, k, d, vis_dtype, mask_dtype, pos_dtype = ctx.shapes
        block_n, block_d = ctx.blocks
        need_vis, need_mask, need_pos = (ctx.needs_input_grad[0], ctx.needs_input_grad[2],
                                         ctx.needs_input_grad[3])
        if not (need_vis or need_mask or need_pos):
            return (None,) * 7
        grad = grad.contiguous()
        n_blocks = triton.cdiv(n, block_n)
        # Zeros: a visible row whose index was overwritten by a duplicate gets no gradient, as in
        # the reference's scatter.
        gvis = torch.zeros(b, k, d, dtype=vis_dtype, device=grad.device) if need_vis else None
        acc, acc_tl = _acc_dtype(grad)
        gmask_part = (torch.zeros(n_blocks, d, dtype=acc, device=grad.device)
                      if need_mask else None)
        gpos = torch.empty(n, d, dtype=pos_dtype, device=grad.device) if need_pos else None
        if n > 0 and d > 0:
            dummy = grad.new_empty(1)
            grid = (n_blocks, triton.cdiv(d, block_d))
            _scatter_bwd_kernel[grid](
                grad, inv, gvis if need_vis else dummy, gmask_part if need_mask else dummy,
                gpos if need_pos else dummy, b, n, k, d,
                NEED_VIS=need_vis, NEED_MASK=need_mask, NEED_POS=need_pos, ACC=acc_tl,
                BLOCK_N=block_n, BLOCK_D=block_d,
            )
        elif need_pos:
            gpos.zero_()
        gmask = gmask_part.sum(0).to(mask_dtype) if need_mask else None
        return gvis, None, gmask, gpos, None, None, None


def masked_gather(tokens: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor,
                  block_rows: int = BLOCK_ROWS, block_d: int = BLOCK_D) -> torch.Tensor:
    """tokens [B, N, D], pos [N, D], keep [B, K] long -> [B, K, D] in tokens' dtype with
    out[b, k] = tokens[b, keep[b, k]] + pos[keep[b, k]], differentiable in tokens and pos."""
    return _MaskedGather.apply(tokens, pos, keep, block_rows, block_d)


def masked_scatter(visible: torch.Tensor, keep: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor,
                   n: int, block_n: int = BLOCK_ROWS, block_d: int = BLOCK_D) -> torch.Tensor:
    """visible [B, K, D], keep [B, K] long (no repeats within a row), mask_token [D], pos [N, D]
    -> [B, n, D] in visible's dtype: visible rows at their kept positions, the mask token elsewhere,
    plus pos everywhere; differentiable in visible, mask_token and pos."""
    return _MaskedScatter.apply(visible, keep, mask_token, pos, n, block_n, block_d)
