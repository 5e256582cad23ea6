"""Triton masked gather / scatter (under the interpreter, see conftest.py) against the torch reference.

Sizes are deliberately not multiples of the tiles (16 rows x 32 columns here), so every kernel runs
its masked tail tiles.
"""

import pytest
import torch

from kernels import masked_gather as mg
from kernels import reference

TILES = dict(block_d=32)


def _grads(fn, inputs, weight):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    (out.float() * weight).sum().backward()
    return out.detach(), [x.grad for x in inputs]


def test_kernels_are_interpreted():
    assert mg.INTERPRETED  # conftest set TRITON_INTERPRET before the first import


def test_gather_fp32_matches_reference_with_repeated_indices():
    torch.manual_seed(0)
    b, n, d, k = 3, 37, 50, 21
    tokens, pos = torch.randn(b, n, d), torch.randn(n, d)
    keep = torch.randint(0, n, (b, k))  # repeats within rows and across the batch
    keep[1, :4] = 5  # and certainly within row 1
    weight = torch.randn(b, k, d)
    out, (g_tok, g_pos) = _grads(lambda t, p: mg.masked_gather(t, p, keep, block_rows=16, **TILES),
                                 [tokens, pos], weight)
    ref, (r_tok, r_pos) = _grads(lambda t, p: reference.masked_gather(t, p, keep), [tokens, pos], weight)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_tok, r_tok)
    torch.testing.assert_close(g_pos, r_pos)


def test_scatter_fp32_matches_reference():
    torch.manual_seed(1)
    b, n, k, d = 3, 37, 13, 50
    visible, mask_token, pos = torch.randn(b, k, d), torch.randn(d), torch.randn(n, d)
    keep = torch.stack([torch.randperm(n)[:k] for _ in range(b)])
    weight = torch.randn(b, n, d)
    out, grads = _grads(lambda x, m, p: mg.masked_scatter(x, keep, m, p, n, block_n=16, **TILES),
                        [visible, mask_token, pos], weight)
    ref, ref_grads = _grads(lambda x, m, p: reference.masked_scatter(x, keep, m, p, n),
                            [visible, mask_token, pos], weight)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_gradcheck_fp64():
    torch.manual_seed(2)
    tokens = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[0, 0, 3, 4], [2, 2, 2, 1]])
    assert torch.autograd.gradcheck(lambda t, p: mg.masked_gather(t, p, keep, 16, 16), (tokens, pos))

    visible = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    mask_token = torch.randn(3, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[0, 3, 4], [2, 1, 0]])
    assert torch.autograd.gradcheck(lambda x, m, p: mg.masked_scatter(x, keep, m, p, 5, 16, 16),
                                    (visible, mask_token, pos))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_their_dtype(dtype):
    # The interpreter cannot do bf16 arithmetic; the kernels upcast after loading, so this works and
    # equals the fp32 result rounded once. The interpreter's fp32 -> bf16 store truncates rather than
    # rounding to nearest, hence one bf16 ulp of slack.
    tol = dict(rtol=2 ** -7, atol=0) if dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.manual_seed(3)
    b, n, d, k = 2, 19, 40, 7
    tokens = torch.randn(b, n, d).to(dtype).requires_grad_(True)
    pos = torch.randn(n, d, requires_grad=True)  # fp32 parameter next to half activations
    keep = torch.stack([torch.randperm(n)[:k] for _ in range(b)])
    out = mg.masked_gather(tokens, pos, keep, 16, 32)
    exact = reference.masked_gather(tokens.detach().float(), pos.detach(), keep)
    assert out.dtype == dtype
    torch.testing.assert_close(out, exact.to(dtype), **tol)
    out.float().sum().backward()
    assert tokens.grad.dtype == dtype and pos.grad.dtype == torch.float32
    counts = torch.zeros(n, d).index_add_(0, keep.flatten(), torch.ones(b * k, d))
    torch.testing.assert_close(pos.grad, counts)  # d(sum out)/d pos = how often each row was kept

    mask_token = torch.randn(d, dtype=dtype)
    full = mg.masked_scatter(out.detach(), keep, mask_token, pos.detach(), n, 16, 32)
    assert full.dtype == dtype
    ref = reference.masked_scatter(out.detach().float(), keep, mask_token.float(), pos.detach(), n)
    torch.testing.assert_close(full, ref.to(dtype), **tol)


def test_no_grad_inputs_and_empty_keep():
    tokens, pos = torch.randn(2, 6, 5), torch.randn(6, 5, requires_grad=True)
    keep = torch.tensor([[1, 4], [0, 5]])
    out = mg.masked_gather(tokens, pos, keep, 16, 32)
    out.sum().backward()  # only pos needs a gradient
    assert tokens.grad is None and pos.grad.sum() == 4 * 5
    empty = mg.masked_gather(tokens, pos, keep[:, :0], 16, 32)
    assert empty.shape == (2, 0, 5)
