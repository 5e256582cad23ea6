import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import dispatch, reference
from tests.distributed import spawn_gloo, unit_rows


def _gather_loop(tokens, pos, keep):
    b, k = keep.shape
    return torch.stack(
        [torch.stack([tokens[i, keep[i, j]] + pos[keep[i, j]] for j in range(k)]) for i in range(b)]
    )


def _scatter_loop(visible, keep, mask_token, pos, n):
    rows = []
    for i in range(visible.shape[0]):
        row = [mask_token + pos[t] for t in range(n)]
        for j in range(keep.shape[1]):
            row[keep[i, j]] = visible[i, j] + pos[keep[i, j]]
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _grads(fn, inputs, weight):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    (out * weight).sum().backward()
    return out.detach(), [x.grad for x in inputs]


def test_masked_gather_matches_loop_with_repeated_indices():
    torch.manual_seed(0)
    b, n, d = 3, 7, 5
    tokens, pos = torch.randn(b, n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    # Repeated indices: both gradients must accumulate (scatter-add), not overwrite.
    keep = torch.tensor([[0, 0, 3, 6], [2, 5, 5, 5], [1, 4, 6, 2]])
    weight = torch.randn(b, keep.shape[1], d, dtype=torch.float64)
    out, (g_tok, g_pos) = _grads(lambda t, p: reference.masked_gather(t, p, keep), [tokens, pos], weight)
    ref, (r_tok, r_pos) = _grads(lambda t, p: _gather_loop(t, p, keep), [tokens, pos], weight)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_tok, r_tok)
    torch.testing.assert_close(g_pos, r_pos)
    # Row 1 keeps index 5 three times: its token gradient is the sum of three output gradients.
    torch.testing.assert_close(g_tok[1, 5], weight[1, 1:].sum(0))


def test_masked_scatter_matches_loop():
    torch.manual_seed(0)
    b, n, k, d = 3, 9, 4, 6
    visible = torch.randn(b, k, d, dtype=torch.float64)
    mask_token, pos = torch.randn(d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    keep = torch.stack([torch.randperm(n)[:k] for _ in range(b)])
    weight = torch.randn(b, n, d, dtype=torch.float64)
    fn = lambda x, m, p: reference.masked_scatter(x, keep, m, p, n)
    loop = lambda x, m, p: _scatter_loop(x, keep, m, p, n)
    out, grads = _grads(fn, [visible, mask_token, pos], weight)
    ref, ref_grads = _grads(loop, [visible, mask_token, pos], weight)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    # Gathering with -pos undoes the scatter on the kept positions.
    back = reference.masked_gather(out, -pos, keep)
    torch.testing.assert_close(back, visible)


def _plain_clip_loss(a, v, scale):
    logits = scale * a @ v.T
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_contrastive_loss_single_process_matches_plain():
    a, v = unit_rows(6, 8, 1), unit_rows(6, 8, 2)
    for scale in (1.0, 14.3, 100.0):
        s = torch.tensor(scale, dtype=torch.float64)
        torch.testing.assert_close(reference.contrastive_loss(a, v, s), _plain_clip_loss(a, v, s))
    # Perfectly aligned pairs at a high temperature scale give a near-zero loss.
    assert reference.contrastive_loss(a, a, torch.tensor(100.0, dtype=torch.float64)) < 1e-3


N_LOCAL, EMBED, WORLD = 3, 8, 2


def _dist_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        a_all, v_all = unit_rows(N_LOCAL * WORLD, EMBED, 1), unit_rows(N_LOCAL * WORLD, EMBED, 2)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        a = a_all[rows].clone().requires_grad_(True)
        v = v_all[rows].clone().requires_grad_(True)
        scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
        loss = dispatch.contrastive_loss(a, v, scale)
        loss.backward()
        torch.save(dict(loss=loss.detach(), a=a.grad, v=v.grad, scale=scale.grad), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_distributed_equals_global_batch(tmp_path):
    res = spawn_gloo(_dist_worker, WORLD, tmp_path)

    a = unit_rows(N_LOCAL * WORLD, EMBED, 1).requires_grad_(True)
    v = unit_rows(N_LOCAL * WORLD, EMBED, 2).requires_grad_(True)
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    loss = _plain_clip_loss(a, v, scale)
    loss.backward()

    # Each rank averages its own rows; equal row counts make the mean over ranks the global loss.
    torch.testing.assert_close(torch.stack([r["loss"] for r in res]).mean(), loss.detach())
    assert not torch.allclose(res[0]["loss"], res[1]["loss"])  # the ranks really differ
    # The gathered copies carry gradient back (summed over ranks), so rank r's embedding gradient is
    # d(sum_s L_s)/d(rows of r) = WORLD * dL_global/d(rows of r). DDP/ZeRO then average parameter
    # gradients over ranks, which divides by WORLD again: parameters see exactly dL_global.
    for r in range(WORLD):
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        torch.testing.assert_close(res[r]["a"], WORLD * a.grad[rows])
        torch.testing.assert_close(res[r]["v"], WORLD * v.grad[rows])
    # logit_scale is replicated, not gathered: the mean of its per-rank gradients is the global one.
    torch.testing.assert_close(torch.stack([r["scale"] for r in res]).mean(), scale.grad)


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    # The Triton path and the rest of the dispatch rule: tests/kernels/test_dispatch_triton.py.
    monkeypatch.delenv("VAEMO_KERNELS", raising=False)
    torch.manual_seed(0)
    tokens, pos = torch.randn(2, 5, 4), torch.randn(5, 4)
    keep = torch.tensor([[0, 2], [4, 1]])
    assert torch.equal(dispatch.masked_gather(tokens, pos, keep), reference.masked_gather(tokens, pos, keep))
    monkeypatch.setenv("VAEMO_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="VAEMO_KERNELS"):
        dispatch.masked_gather(tokens, pos, keep)
