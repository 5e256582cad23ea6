"""The described set's record file: what vaemo-describe writes (one JSON line per clip, the last line
of a key wins) and what the text encoder and stage 2 read. Below both describe.py and encode.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE = "descriptions.jsonl"


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The last record per key (a torn last line from a killed run is skipped)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[str(record["key"])] = record
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a record (torn write?): skipped", path, n)
    return records
