"""Per-step metrics over data-parallel ranks: means, sums and maxima from one collective."""

import torch
import torch.distributed as dist

from tests.distributed import spawn_gloo
from vaemo_dist.dist import reduce_over_ranks

WORLD = 2


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # Rank 1 waited longer for data and had the slower step; rank 0 saw the bad clip.
        mine = {"loss": [2.0, 4.0][rank], "skipped_decode": [3, 0][rank],
                "step_time_s": [0.50, 0.75][rank], "data_wait_s": [0.05, 0.30][rank]}
        out = reduce_over_ranks(mine, torch.device("cpu"), sums=["skipped_decode"],
                                maxes=("step_time_s", "data_wait_s"))
        torch.save(out, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_means_sums_and_maxima_over_ranks(tmp_path):
    results = spawn_gloo(_worker, WORLD, tmp_path)
    expected = {"loss": 3.0, "skipped_decode": 3.0, "step_time_s": 0.75, "data_wait_s": 0.30}
    for out in results:  # every rank gets the same figures
        assert out.keys() == expected.keys()
        for k, v in expected.items():
            assert abs(out[k] - v) < 1e-12, (k, out[k])


def test_without_a_process_group_values_come_back_unchanged():
    values = {"loss": 1.5, "data_wait_s": 0.25}
    out = reduce_over_ranks(values, torch.device("cpu"), maxes=["data_wait_s"])
    assert out == values and out is not values
