"""File helpers the tests share."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}
