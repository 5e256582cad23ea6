"""Fused Triton InfoNCE (under the interpreter, see conftest.py) and the chunked torch variant against
the reference, single-process and over a 2-process gloo group.

Row and column counts are not multiples of the 16 / 32 tiles used here, and E = 20 is padded to 32.
"""

import functools
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import contrastive, dispatch, reference
from tests.distributed import spawn_gloo, unit_rows

TILES = dict(block_m=16, block_n=32)


unit_rows32 = functools.partial(unit_rows, dtype=torch.float32)  # the Triton kernels' dtype


def _loss_and_grads(fn, a, v, scale):
    a, v, scale = (x.detach().clone().requires_grad_(True) for x in (a, v, scale))
    loss = fn(a, v, scale)
    loss.backward()
    return loss.detach(), a.grad, v.grad, scale.grad


def test_fused_fp32_matches_reference():
    a, v = unit_rows32(45, 20, 1), unit_rows32(45, 20, 2)
    for s in (1.0, 14.3, 100.0):
        scale = torch.tensor(s)
        fused = _loss_and_grads(lambda a, v, s: contrastive.contrastive_loss(a, v, s, **TILES), a, v, scale)
        ref = _loss_and_grads(reference.contrastive_loss, a, v, scale)
        for x, r in zip(fused, ref):
            torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-6)


def test_fused_gradcheck_fp64():
    a, v = unit_rows(5, 3, 3), unit_rows(5, 3, 4)
    inputs = [x.requires_grad_(True) for x in (a, v, torch.tensor(3.0, dtype=torch.float64))]
    fn = lambda a, v, s: contrastive.contrastive_loss(a, v, s, block_m=16, block_n=16)
    assert torch.autograd.gradcheck(fn, inputs)


def test_fused_half_inputs_accumulate_in_fp32():
    a, v, scale = unit_rows32(40, 20, 5), unit_rows32(40, 20, 6), torch.tensor(14.3)
    a16, v16 = a.to(torch.bfloat16), v.to(torch.bfloat16)
    loss, ga, gv, gs = _loss_and_grads(lambda a, v, s: contrastive.contrastive_loss(a, v, s, **TILES),
                                       a16, v16, scale)
    assert loss.dtype == ga.dtype == gv.dtype == torch.bfloat16 and gs.dtype == torch.float32
    # Against the reference in fp32 on the same bf16-rounded embeddings: only output rounding differs.
    ref = _loss_and_grads(reference.contrastive_loss, a16.float(), v16.float(), scale)
    torch.testing.assert_close(loss.float(), ref[0], rtol=2 ** -7, atol=0)
    torch.testing.assert_close(ga.float(), ref[1], rtol=2 ** -6, atol=1e-4)
    torch.testing.assert_close(gs, ref[3], rtol=1e-5, atol=1e-6)


def test_chunked_reference_matches_reference():
    a, v, scale = unit_rows(45, 20, 7), unit_rows(45, 20, 8), torch.tensor(14.3)
    scale = scale.double()
    for chunk in (1, 16, 45, 1000):
        fn = functools.partial(reference.contrastive_loss_chunked, chunk=chunk)
        got = _loss_and_grads(fn, a, v, scale)
        ref = _loss_and_grads(reference.contrastive_loss, a, v, scale)
        for x, r in zip(got, ref):
            torch.testing.assert_close(x, r)


N_LOCAL, EMBED, WORLD = 19, 20, 2
VARIANTS = ("fused", "chunked", "reference")


def _dist_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        a_all, v_all = unit_rows32(N_LOCAL * WORLD, EMBED, 1), unit_rows32(N_LOCAL * WORLD, EMBED, 2)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        fns = dict(
            fused=lambda a, v, s: contrastive.contrastive_loss(a, v, s, **TILES),
            chunked=lambda a, v, s: reference.contrastive_loss_chunked(a, v, s, chunk=8),
            reference=reference.contrastive_loss,
        )
        res = {}
        for name, fn in fns.items():
            loss, ga, gv, gs = _loss_and_grads(fn, a_all[rows], v_all[rows], torch.tensor(14.3))
            res[name] = dict(loss=loss, a=ga, v=gv, scale=gs)
        # And through the model's entry point with the Triton backend forced.
        with dispatch.use_backend("triton"):
            calls = dispatch.TRITON_CALLS["contrastive_loss"]
            loss, *_ = _loss_and_grads(dispatch.contrastive_loss, a_all[rows], v_all[rows],
                                       torch.tensor(14.3))
            res["dispatch"] = dict(loss=loss, calls=dispatch.TRITON_CALLS["contrastive_loss"] - calls)
        torch.save(res, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_fused_equals_global_batch(tmp_path):
    res = spawn_gloo(_dist_worker, WORLD, tmp_path)

    a = unit_rows32(N_LOCAL * WORLD, EMBED, 1).requires_grad_(True)
    v = unit_rows32(N_LOCAL * WORLD, EMBED, 2).requires_grad_(True)
    scale = torch.tensor(14.3, requires_grad=True)
    logits = scale * a @ v.T
    labels = torch.arange(N_LOCAL * WORLD)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()

    tol = dict(rtol=1e-5, atol=1e-6)
    for name in VARIANTS:
        per_rank = [r[name] for r in res]
        # Same relation as the reference's test: the mean over ranks is the global loss; the
        # embedding gradients are WORLD x the global ones on each rank's rows (summed through the
        # gather); the mean of the replicated logit_scale's gradients is the global one.
        torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), loss.detach(), **tol)
        assert not torch.allclose(per_rank[0]["loss"], per_rank[1]["loss"])
        for r in range(WORLD):
            rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
            torch.testing.assert_close(per_rank[r]["a"], WORLD * a.grad[rows], **tol)
            torch.testing.assert_close(per_rank[r]["v"], WORLD * v.grad[rows], **tol)
        torch.testing.assert_close(torch.stack([r["scale"] for r in per_rank]).mean(), scale.grad, **tol)
    for r in range(WORLD):
        assert res[r]["dispatch"]["calls"] == 1
        torch.testing.assert_close(res[r]["dispatch"]["loss"], res[r]["reference"]["loss"], **tol)
