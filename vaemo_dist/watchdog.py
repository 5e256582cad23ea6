"""When a rank dies, the others stop promptly and say which one.

A rank killed outright (OOM killer, kill -9, a node reboot) cannot report anything itself, and its
peers may sit in a collective until `train.dist_timeout_s`. `PeerWatch` makes the survivors name it:

* At start-up every rank shares (host, pid) with all others (one all_gather_object).
* A daemon thread checks, twice a second, whether the peers on its own host are still running
  (a dead process or an unreaped zombie). When one is gone it logs which rank, on which host, at
  which step, and where the last complete checkpoint is, then ends this process with EXIT_PEER_LOST.
  It runs while the main thread is blocked inside a collective (those release the GIL).
* On SIGTERM (torchrun stopping the survivors after a failure) the same report is logged.
* `describe_failure` turns the exception of a failed or timed-out collective (peers on other hosts)
  into a message with the same facts; the launcher logs it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 3


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int


def process_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class PeerWatch:
    """Start once per process after the process group exists; `step` is updated by the trainer."""

    def __init__(self, rank: int, world_size: int, ckpt_root: Path | None = None,
                 interval_s: float = 0.5) -> None:
        self.rank, self.world_size = rank, world_size
        self.ckpt_root, self.interval_s = ckpt_root, interval_s
        self.step = 0
        self.peers: list[Peer] = []
        self.host = socket.gethostname()
        self._stop = threading.Event()

    def start(self) -> PeerWatch:
        table: list[tuple[str, int] | None] = [None] * self.world_size
        dist.all_gather_object(table, (self.host, os.getpid()))
        self.peers = [Peer(r, host, pid) for r, (host, pid) in enumerate(table)]  # type: ignore[misc]
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._watch, name="vaemo-peer-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def local_peers(self) -> list[Peer]:
        return [p for p in self.peers if p.host == self.host and p.rank != self.rank]

    def dead_local_peers(self) -> list[Peer]:
        return [p for p in self.local_peers() if not process_running(p.pid)]

    def report(self, what: str) -> str:
        """One message with the facts a person needs to decide what to do next."""
        dead = self.dead_local_peers()
        if dead:
            gone = "; ".join(f"rank {p.rank} (pid {p.pid} on {p.host}) is no longer running" for p in dead)
        else:
            remote = sorted({p.host for p in self.peers} - {self.host})
            gone = ("all ranks on this host are running" if not remote else
                    f"all ranks on this host are running; ranks on {', '.join(remote)} cannot be checked "
                    "from here: the first error in their logs names the culprit")
        return (f"rank {self.rank} on {self.host}, step {self.step}: {what}. {gone}. {self.resume_hint()}")

    def resume_hint(self) -> str:
        latest = self.ckpt_root / "latest" if self.ckpt_root else None
        if latest is not None and latest.exists():
            return (f"Last complete checkpoint: {self.ckpt_root / latest.read_text().strip()}; relaunch "
                    "the same command with --resume latest to continue from it.")
        return "No complete checkpoint yet: relaunching starts from step 0."

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            dead = self.dead_local_peers()
            if dead:
                self._die(self.report("a peer process died"), EXIT_PEER_LOST)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._die(self.report("stopped by SIGTERM (the launcher ends the job after a failure)"),
                  128 + signal.SIGTERM)

    def _die(self, message: str, code: int) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        log.error(message)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def describe_failure(watch: PeerWatch | None, error: BaseException) -> str:
    """A message for an exception that may come from a lost or hung peer; '' if it does not look like one."""
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    signs = ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "distbackenderror")
    if watch is None or not any(s in lowered for s in signs):
        return ""
    if not watch.dead_local_peers():  # the process may be gone a moment later than the socket
        time.sleep(2 * watch.interval_s)
    first_line = text.splitlines()[0][:300]
    return watch.report(f"a collective failed ({first_line})")
