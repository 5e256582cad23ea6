"""One rank of a 2-process gloo group for test_rank_failure.py: argv = mode rank port.

modes: `die`: rank 1 SIGKILLs itself, rank 0 sleeps (only the watchdog can end it);
       `hang`: rank 1 sleeps outside any collective, rank 0 all-reduces until the timeout."""

import datetime
import logging
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from vaemo_dist.watchdog import PeerWatch, describe_failure

mode, rank, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=4))
watch = PeerWatch(rank, 2).start()
watch.step = 7
dist.barrier()
if rank == 1:
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
    sys.exit(0)
if mode == "die":
    time.sleep(60)
    sys.exit(0)
try:
    while True:
        dist.all_reduce(torch.ones(1))
except Exception as e:  # noqa: BLE001 - what the launcher does with a failed collective
    print(describe_failure(watch, e), flush=True)
    os._exit(1)
