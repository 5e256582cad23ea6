"""`csv`: vaemo-shard's own input, a folder of video files or a CSV manifest (data/sources.py
`media_inputs`), as a dataset adapter. A manifest's `audio` column (a separate audio file) and `fps`
column (the rate of a frame-folder `path`) become MediaInput.audio (relative to the CSV's
folder) / .fps; other columns go to the
clip's json as before. Labels keep the writer's numbering (sorted names); no folds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vaemo_dist.data.datasets.base import Dataset, DatasetError, Listing
from vaemo_dist.data.sources import media_inputs


class Csv(Dataset):
    name = "csv"

    def _list(self, root: Path, **_: Any) -> Listing:
        inputs = media_inputs(root)
        for item in inputs:
            audio = item.extra.pop("audio", "")
            # relative to the CSV's folder, as `path` is (sources.manifest_rows)
            item.audio = str(root.parent / audio) if audio and not Path(audio).is_absolute() else audio
            fps = item.extra.pop("fps", "")
            try:
                item.fps = float(fps) if fps else 0.0
            except ValueError:
                raise DatasetError(f"{root}: fps {fps!r} of {item.path} is not a number") from None
        return Listing(inputs=inputs)

    def inputs(self, root: str | Path, **options: Any) -> Listing:
        listing = super().inputs(root, **options)
        listing.inputs.sort(key=lambda i: i.key)  # media_inputs' keys: <row number>-<stem>, in row order
        return listing
