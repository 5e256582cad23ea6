"""When a rank dies, the others stop promptly and say which one.

A rank killed outright (OOM killer, kill -9, a node reboot) cannot report anything itself, and its
peers may sit in a collective until `train.dist_timeout_s`. `PeerWatch` makes the survivors name it:

* At start-up every rank shares (host, pid) with all others (one all_gather_object).
* A daemon thread checks, twice a second, whether the peers on its own host are still running
  (a dead process or an unreaped zombie). When one is gone it logs which rank, on which host, at
  which step, and where the last complete checkpoint is, then ends this process with EXIT_PEER_LOST.
  It runs while the main thread is blocked inside a collective (those release the GIL).
* Peers on other hosts cannot be checked that way: every rank also writes a heartbeat (its clock)
  into the job's rendezvous store (MASTER_ADDR:MASTER_PORT, through our own client connection)
  every few seconds, and a report names the ranks whose heartbeat stopped.
* On SIGTERM (torchrun stopping the survivors after a failure) the report is logged too.
* `describe_failure` turns the exception of a failed or timed-out collective into the report; it
  waits a little for the evidence first (a socket closes before its process is reaped, and seconds
  before its heartbeat is stale). The launcher logs it.
"""

from __future__ import annotations

import contextlib
import datetime
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

    def __init__(self, rank: int, world_size: int, ckpt_root: Path | None = None, interval_s: float = 0.5,
                 heartbeat_s: float = 5.0, host: str | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.ckpt_root, self.interval_s, self.heartbeat_s = ckpt_root, interval_s, heartbeat_s
        self.host = host or socket.gethostname()
        self.step = 0
        self.peers: list[Peer] = []
        self.store: dist.TCPStore | None = None
        self._stop = threading.Event()

    def start(self) -> PeerWatch:
        self.store = _connect_store()
        self._beat()
        table: list[tuple[str, int] | None] = [None] * self.world_size
        dist.all_gather_object(table, (self.host, os.getpid()))  # after it, every first heartbeat is in
        self.peers = [Peer(r, host, pid) for r, (host, pid) in enumerate(table)]  # type: ignore[misc]
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._watch, name="vaemo-peer-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ---- evidence

    def local_peers(self) -> list[Peer]:
        return [p for p in self.peers if p.host == self.host and p.rank != self.rank]

    def remote_peers(self) -> list[Peer]:
        return [p for p in self.peers if p.host != self.host]

    def dead_local_peers(self) -> list[Peer]:
        return [p for p in self.local_peers() if not process_running(p.pid)]

    @property
    def stale_after_s(self) -> float:
        return 3 * self.heartbeat_s + 2

    def heartbeat_ages(self) -> dict[int, float] | None:
        """Seconds since each remote peer's last heartbeat; None if the store does not answer."""
        remote = self.remote_peers()
        if not remote or self.store is None:
            return {}
        try:
            values = self.store.multi_get([_beat_key(p.rank) for p in remote])
        except Exception:  # noqa: BLE001 - the store's host (rank 0, or node 0's agent) is gone
            return None
        now = time.time()
        return {p.rank: now - float(v) for p, v in zip(remote, values)}

    def stale_remote_peers(self) -> list[tuple[Peer, float]]:
        ages = self.heartbeat_ages() or {}
        return [(self.peers[r], age) for r, age in sorted(ages.items()) if age > self.stale_after_s]

    def evidence(self) -> bool:
        """Is there anything to name yet: a dead local peer, a stale heartbeat, a silent store?"""
        return bool(self.dead_local_peers() or self.stale_remote_peers()
                    or (self.remote_peers() and self.heartbeat_ages() is None))

    # ---- reports

    def report(self, what: str) -> str:
        """One message with the facts a person needs to decide what to do next."""
        dead = self.dead_local_peers()
        facts = [f"rank {p.rank} (pid {p.pid} on {p.host}) is no longer running" for p in dead]
        if not dead:
            facts.append("all ranks on this host are running")
        if self.remote_peers():
            ages = self.heartbeat_ages()
            if ages is None:
                facts.append(f"the job's store at {_store_address()} (kept by rank 0 or node 0's launcher) "
                             "does not answer: that node is probably lost")
            else:
                stale = self.stale_remote_peers()
                facts += [f"rank {p.rank} on {p.host} stopped its heartbeat {age:.0f} s ago"
                          for p, age in stale]
                if not stale:
                    facts.append("the ranks on other hosts still send their heartbeats")
        where = f"rank {self.rank} on {self.host}, step {self.step}"
        return f"{where}: {what}. {'; '.join(facts)}. {self.resume_hint()}"

    def resume_hint(self) -> str:
        latest = self.ckpt_root / "latest" if self.ckpt_root else None
        if latest is not None and latest.exists():
            return (f"Last complete checkpoint: {self.ckpt_root / latest.read_text().strip()}; relaunch "
                    "the same command with --resume latest to continue from it.")
        return ("No complete checkpoint yet: relaunch the same command with --resume latest (it starts from "
                "step 0 and keeps the run's metrics) or with train.overwrite=true.")

    # ---- the thread and the signal

    def _beat(self) -> None:
        if self.store is not None:
            # A silent store is reported when someone asks for the heartbeats.
            with contextlib.suppress(Exception):
                self.store.set(_beat_key(self.rank), repr(time.time()))

    def _watch(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._stop.wait(self.interval_s):
            if self.dead_local_peers():
                self._die(self.report("a peer process died"), EXIT_PEER_LOST)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_s
                self._beat()

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
    """A report for an exception that may come from a lost or hung peer; '' if it does not look like one."""
    if any(c.__name__ == "StorageError" for c in type(error).__mro__):
        return ""  # the object store, not a peer: its own one-line message says what happened
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    signs = ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "distbackenderror")
    if watch is None or not any(s in lowered for s in signs):
        return ""
    wait_s = watch.stale_after_s + watch.heartbeat_s if watch.remote_peers() else 2 * watch.interval_s
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not watch.evidence():
        time.sleep(watch.interval_s)
    first_line = text.splitlines()[0][:300]
    return watch.report(f"a collective failed ({first_line})")


def _beat_key(rank: int) -> str:
    return f"vaemo/heartbeat/{rank}"


def _store_address() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _connect_store() -> dist.TCPStore | None:
    """Our own client of the job's rendezvous store (the process group's connection is not ours to use
    from a thread); None where there is none (a single process, another init method)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=5),
                             wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - heartbeats are a diagnostic, not a requirement
        log.warning("no heartbeats: cannot reach the store at %s:%s (%s)", addr, port, e)
        return None
