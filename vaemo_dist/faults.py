"""Fault injection for the fault-tolerance tests (tests/faults/), driven by one environment variable.

    VAEMO_FAULTS="kill:rank=1:step=5,nan_loss:step=3-4,nan_grad:step=6"

* `kill`: the rank SIGKILLs itself when step `step` begins (a node that dies without a word).
* `nan_loss`: the loss of step `step` becomes NaN (forward blew up).
* `nan_grad`: the loss stays finite but its gradient is NaN (backward blew up).

`rank` (default: every rank) and `step` (one step or an inclusive range a-b) select where. Unset, the
hooks cost one dict lookup. Faults are production hooks rather than test monkeypatches so that the
tests exercise the real launcher, trainer and DeepSpeed path end to end.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ENV = "VAEMO_FAULTS"
KINDS = ("kill", "nan_loss", "nan_grad")


@dataclass(frozen=True)
class Fault:
    kind: str
    first_step: int
    last_step: int
    rank: int | None = None  # None: every rank

    def hits(self, kind: str, step: int, rank: int) -> bool:
        return (self.kind == kind and self.first_step <= step <= self.last_step
                and (self.rank is None or self.rank == rank))


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, *args = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r} in {item!r}; known: {list(KINDS)}")
        opts = dict(a.split("=", 1) for a in args)
        unknown = set(opts) - {"rank", "step"}
        if unknown or "step" not in opts:
            raise ValueError(f"{ENV}: {item!r} needs step=N or step=A-B and optionally rank=R")
        first, _, last = opts["step"].partition("-")
        rank = int(opts["rank"]) if "rank" in opts else None
        faults.append(Fault(kind, int(first), int(last or first), rank))
    return faults


_plan: list[Fault] | None = None


def plan() -> list[Fault]:
    global _plan
    if _plan is None:
        _plan = parse(os.environ.get(ENV, ""))
        if _plan:
            log.warning("fault injection active: %s", _plan)
    return _plan


def _hits(kind: str, step: int, rank: int) -> bool:
    return any(f.hits(kind, step, rank) for f in plan())


def at_step_start(step: int, rank: int) -> None:
    if _hits("kill", step, rank):
        log.warning("fault injection: rank %d kills itself (SIGKILL) at the start of step %d", rank, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def poison_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    if _hits("nan_loss", step, rank):
        return loss * float("nan")
    if _hits("nan_grad", step, rank):
        return _NanGrad.apply(loss)
    return loss
