"""Process groups: rank, world and device from whatever launcher started us.

`deepspeed` and `torchrun` both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
A plain `python launchers/stage1.py` runs as a world of one.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_size: int = 1  # tensor-parallel degree; ranks of one TP group see the same data
    tp_rank: int = 0
    dp_size: int = 1  # data-parallel degree = world_size // tp_size
    dp_rank: int = 0
    dp_group: Any = None  # the process group that data-parallel collectives (loss gather) use

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortInUseError(RuntimeError):
    """Rank 0 could not listen on the rendezvous port (MASTER_PORT): another run holds it."""


def port_in_use_message(port: str | int) -> str:
    """What to do when the rendezvous port is taken: one line naming the port and the launcher flags."""
    other = free_port()
    return (f"the rendezvous port {port} (MASTER_PORT) is already in use on this machine, most likely by "
            f"another run. Give this launch another port: `deepspeed --master_port {other} ...` or "
            f"`torchrun --master_port {other} ...` (several nodes: `--rdzv-endpoint HOST:{other}`); "
            f"port {other} is free right now")


def _address_in_use(e: BaseException) -> bool:
    text = str(e)
    return "EADDRINUSE" in text or "ddress already in use" in text


def init_distributed(timeout_s: int = 600, tensor_parallel: int = 1) -> DistInfo:
    """Start torch.distributed (NCCL on GPUs, gloo on CPU), megatron-core's tensor/data-parallel
    groups, and hand it all to DeepSpeed. PortInUseError when rank 0 cannot listen on MASTER_PORT."""
    if "RANK" not in os.environ:  # a world of one, started by hand
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        _skip_deepspeed_shm_build()

    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except RuntimeError as e:  # torch's DistNetworkError among them
            if _address_in_use(e):
                raise PortInUseError(port_in_use_message(os.environ.get("MASTER_PORT", "?"))) from e
            raise
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # wraps the group made above
    if world % tensor_parallel:
        raise ValueError(f"parallel.tensor={tensor_parallel} does not divide the world size {world}")
    if tensor_parallel == 1:  # plain data parallelism: no need for megatron-core (4 s to import)
        return DistInfo(rank, world, local_rank, device, dp_size=world, dp_rank=rank)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    return DistInfo(rank, world, local_rank, device,
                    tp_size=tensor_parallel, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                    dp_size=parallel_state.get_data_parallel_world_size(),
                    dp_rank=parallel_state.get_data_parallel_rank(),
                    dp_group=parallel_state.get_data_parallel_group())


class MegatronMpu:
    """What DeepSpeed asks of an `mpu`, answered by megatron-core's parallel_state, so that ZeRO
    partitions over the data-parallel group only and gradient norms count TP shards once."""

    def __getattr__(self, name: str) -> Any:
        from megatron.core import parallel_state

        return getattr(parallel_state, name)

    def get_model_parallel_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> Any:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~35 s on 2 cores) on first
    use. Our CPU runs are for development and CI, where gloo is fast enough; set VAEMO_DS_SHM=1 to
    let DeepSpeed build and use it."""
    if os.environ.get("VAEMO_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def reduce_over_ranks(values: dict[str, float], device: torch.device, group: Any = None, *,
                      sums: Collection[str] = (), maxes: Collection[str] = ()) -> dict[str, float]:
    """Each value's mean over the ranks of `group` (default: all); the sum for keys in `sums`, the max
    for keys in `maxes`. One collective: an all_gather of one small vector, where an all_reduce could
    give means and sums but not also maxima."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1) or not values:
        return dict(values)
    keys = sorted(values)
    mine = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    per_rank = torch.stack(gathered).cpu()  # ranks x keys
    out = {}
    for i, k in enumerate(keys):
        col = per_rank[:, i]
        out[k] = float(col.max() if k in maxes else col.sum() if k in sums else col.mean())
    return out


def shutdown(exit_code: int = 0) -> None:
    """End the process without the interpreter's teardown.

    DeepSpeed processes on CPU sometimes abort during interpreter exit after finishing correctly
    (SIGABRT, 'terminate called without an active exception'). A final barrier, a flush and
    os._exit make the exit code mean what happened in the run.
    """
    try:
        if exit_code == 0:
            barrier()
        if "megatron.core" in sys.modules:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the run's result is already decided
        log.warning("shutdown: %s", e)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
