"""Taking batches from a loader in tests, keeping a DataState up to date as the trainer does."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any


def take(loader: Iterable[Any], n: int, state: Any = None) -> list[Any]:
    """The next `n` batches of `loader`; each is applied to `state` (a DataState) when one is given."""
    out = list(itertools.islice(loader, n))
    if state is not None:
        for batch in out:
            state.update(batch)
    return out
