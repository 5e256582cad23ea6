"""Small file-system helpers shared by the writers of corpora, checkpoints and descriptions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one.

    The temporary name carries the pid, so concurrent writers (ranks, workers) never share it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Builders on one machine take turns: an exclusive lock on `folder/.lock` (several ranks may call
    the ensure_* builders at once; each checks again under the lock whether the work is done)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): single-builder use only
            pass
        yield
