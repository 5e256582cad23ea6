"""One rank of a 2-process gloo group for test_rank_failure.py: argv = mode rank port.

modes: `die`: rank 1 SIGKILLs itself, rank 0 sleeps (only the watchdog can end it);
       `hang`: rank 1 sleeps outside any collective, rank 0 all-reduces until the timeout;
       `die-remote`: as `die`, but the ranks claim different hosts (rank 1 on "node-b"), so rank 0 can
       only learn of it from its failed all-reduce and rank 1's stopped heartbeat;
       `store-lost`: different hosts, and rank 0 (which keeps the rendezvous store) dies: rank 1
       reports that the store does not answer."""

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
remote = mode in ("die-remote", "store-lost")
host = ("node-a", "node-b")[rank] if remote else None
watch = PeerWatch(rank, 2, heartbeat_s=0.5 if remote else 5.0, host=host).start()
watch.step = 7
dist.barrier()
victim, observer = (0, 1) if mode == "store-lost" else (1, 0)
if rank == victim:
    if mode != "hang":
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
