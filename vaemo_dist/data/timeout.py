"""A per-sample time limit for decoding: `with deadline(seconds): ...` raises `DeadlineExceeded`.

It uses SIGALRM (`signal.setitimer(ITIMER_REAL)`), so it works only in the main thread of a process,
which is where decoding runs: DataLoader workers are processes that decode in their main thread, and
with `num_workers=0` the trainer's main thread decodes. Elsewhere (any other thread) it is a no-op:
Python delivers signals to the main thread only, so there is no way to interrupt another thread.

Limits, by construction: the handler runs when control returns to Python. PyAV returns to Python
between packets and frames, so a slow or endless stream is cut off, but a single FFmpeg (or DALI) call
that never returns is not.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType


class DeadlineExceeded(Exception):
    """Raised inside the `deadline` block when its time is up.

    An Exception (not a BaseException) on purpose: PyAV re-raises Exceptions raised in its I/O
    callbacks, but only prints BaseExceptions there and carries on.
    """


def can_interrupt() -> bool:
    """True where `deadline` can arm a timer: the main thread, on a platform with setitimer."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise DeadlineExceeded in the block if it runs longer than `seconds` (<= 0: no limit).

    Restores the previous SIGALRM handler and re-arms a previously set ITIMER_REAL (less the time
    spent here) on exit, so it nests inside whatever else uses the timer.
    """
    if seconds <= 0 or not can_interrupt():
        yield
        return
    armed = [True]

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        # Raise once, and only while the block runs: a signal that lands as the block finishes
        # must not escape into the caller.
        if armed[0]:
            armed[0] = False
            raise DeadlineExceeded(f"took longer than {seconds:g} s")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        # Nested so that the restoring always runs, even if the alarm's exception lands on the
        # first line here (the block is over, but the signal was already pending).
        try:
            armed[0] = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_handler)
            if previous_delay > 0:
                # The outer timer keeps its own due time; if that passed while we held the timer
                # it fires right away (a zero delay would disarm it instead).
                left = previous_delay - (time.monotonic() - started)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), previous_interval)
