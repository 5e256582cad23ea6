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


# --------------------------------------------------------------------------------------------
# Whose folder is it: every writer of the project claims its output folder the same way.

OWNER_FILE = ".vaemo-owner.json"


class FolderInUseError(RuntimeError):
    """A writer was pointed at a non-empty folder it did not create (or at an existing run)."""


def aside_name(path: Path) -> Path:
    """`<path>.old-<UTC timestamp>`, numbered if that exists: where an overwritten folder is moved."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    return candidate


def move_aside(path: Path) -> Path:
    """Rename `path` to `<path>.old-<timestamp>` (never delete) and return the new name."""
    target = aside_name(path)
    os.replace(path, target)
    return target


def folder_owner(path: Path) -> str | None:
    """The writer that claimed `path` (its OWNER_FILE), or None."""
    import json

    try:
        return str(json.loads((Path(path) / OWNER_FILE).read_text()).get("writer"))
    except (OSError, ValueError, AttributeError):
        return None


def _is_empty(path: Path) -> bool:
    # The owner file being written by a concurrent claim (another rank) does not make a folder non-empty.
    return not any(p for p in path.iterdir()
                   if p.name not in (".lock", OWNER_FILE) and not p.name.startswith(f".{OWNER_FILE}.tmp-"))


def refusal(path: Path, why: str, flag: str) -> str:
    """The one wording of every refusal to write into a folder of the user's."""
    return (f"refusing to write into {path}: {why}. Nothing was changed. Name a new or empty folder, or "
            f"pass {flag} to move the existing folder aside to {path.name}.old-<timestamp> (never deleted) "
            "and write a fresh one")


def claim_output_dir(path: str | Path, writer: str, *, overwrite: bool = False,
                     flag: str = "--overwrite", adopt: bool = False) -> Path:
    """Make `path` the output folder of `writer` ("vaemo-shard", "synthetic corpus", ...).

    A missing or empty folder is created and marked as `writer`'s (OWNER_FILE). A folder this writer
    marked before is returned as is (the writer resumes or completes its own work). A non-empty folder
    of anyone else raises FolderInUseError naming `flag`, unless `overwrite`, which moves it aside to
    `<path>.old-<timestamp>` (never deleted). `adopt=True` accepts an unmarked non-empty folder that the
    caller recognised as its own older output (written before folders were marked) and marks it."""
    import json

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FolderInUseError(refusal(path, "it is a file, not a folder", flag))
    if path.is_dir() and not _is_empty(path):
        owner = folder_owner(path)
        if owner == writer or (owner is None and adopt):
            if owner is None:
                write_atomic(path / OWNER_FILE, json.dumps({"writer": writer}) + "\n")
            return path
        if not overwrite:
            why = (f"it holds the output of {owner}, not of {writer}" if owner
                   else f"it is not empty and {writer} did not create it")
            raise FolderInUseError(refusal(path, why, flag))
        move_aside(path)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / OWNER_FILE, json.dumps({"writer": writer}) + "\n")
    return path
