"""Embeddings of a whole collection, and the `vaemo-embed` command.

    vaemo-embed --model exports/stage1-tiny --input clips/ --out clips.npz [--modality av|video|audio]

`--input` is a folder of media files, a CSV manifest or WebDataset shards (vaemo_dist/data/sources.py).
The output is one .npz (read it with `np.load(path)`, no pickle needed):

    keys          [N] str     clip keys, in the source's order
    labels        [N] int64   class index, -1 where unknown
    joint_emb     [N, E]      L2-normalised joint embedding
    video_emb     [N, E]      per modality (present for the modalities encoded)
    audio_emb     [N, E]
    joint_pooled  [N, D]      mean-pooled encoder tokens before the projection heads
    video_pooled  [N, D]
    audio_pooled  [N, D]
    meta          0-d str     JSON: model folder, source, modality, class names, skipped clips

Clips that cannot be decoded are skipped, counted and named in `meta`.

An existing `--out` file is never replaced: vaemo-embed refuses it before loading the model (exit 2),
unless `--overwrite`, which moves it aside to `<out>.old-<timestamp>` (never deleted). The file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vaemo_dist.data.sources import MODALITIES, Decoded, Record, Source, decoded_loader, open_source
from vaemo_dist.startup import entry_point, fail

log = logging.getLogger(__name__)

OUTPUTS = ("joint_emb", "video_emb", "audio_emb", "joint_pooled", "video_pooled", "audio_pooled")


@dataclass
class EmbeddingSet:
    keys: list[str]
    labels: np.ndarray  # [N] int64
    arrays: dict[str, np.ndarray]  # name -> [N, dim] float32
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    def features(self, name: str) -> np.ndarray:
        """One stored array, or "concat_pooled" / "concat_emb": the video and audio arrays side by side."""
        if name in self.arrays:
            return self.arrays[name]
        if name.startswith("concat_"):
            kind = name.removeprefix("concat_")
            parts = [self.arrays.get(f"video_{kind}"), self.arrays.get(f"audio_{kind}")]
            if all(p is not None for p in parts):
                return np.concatenate(parts, axis=1)  # type: ignore[arg-type]
        raise KeyError(f"no features {name!r} here; have {sorted(self.arrays)} (and concat_* of video+audio)")

    def save(self, path: str | Path) -> Path:
        """Write `path` (".npz" added if missing) whole: under a temporary name, then renamed."""
        path = npz_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            np.savez(f, keys=np.array(self.keys, dtype=str), labels=self.labels,
                     meta=np.array(json.dumps(self.meta)), **self.arrays)
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | Path) -> EmbeddingSet:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in OUTPUTS if k in z.files}
            return EmbeddingSet(keys=z["keys"].tolist(), labels=z["labels"], arrays=arrays,
                                meta=json.loads(str(z["meta"])))


def embed_source(encoder: Any, source: Source, *, modality: str = "av", batch_size: int = 16,
                 workers: int = 0, progress: bool = True, keep: Any = None) -> EmbeddingSet:
    """Encode every record of `source` (those `keep(record)` accepts) with a pretrained Encoder."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}: choose one of {MODALITIES}")
    keys: list[str] = []
    labels: list[int] = []
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUTS}
    skipped: list[str] = []
    pending: list[Decoded] = []
    folds: dict[str, str] = {}  # the source's own fold / split columns, for evaluation protocols
    splits: dict[str, str] = {}

    def flush() -> None:
        if not pending:
            return
        video = torch.stack([d.video for d in pending]) if pending[0].video is not None else None
        audio = torch.stack([d.audio for d in pending]) if pending[0].audio is not None else None
        out = encoder.encode(video=video, audio=audio)
        for name in OUTPUTS:
            value = getattr(out, name)
            if value is not None:
                chunks[name].append(value.float().cpu().numpy())
        keys.extend(d.key for d in pending)
        labels.extend(d.label for d in pending)
        pending.clear()

    total = source.size if keep is None else None
    bar = tqdm(total=total, desc="embed", unit="clip", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for item in decoded_loader(source, encoder.inputs, modality, workers, keep):
        bar.update(1)
        if item.error is not None:
            skipped.append(f"{item.key}: {item.error}")
            log.warning("skipped %s: %s", item.key, item.error)
            continue
        if item.fold is not None:
            folds[item.key] = item.fold
        if item.split is not None:
            splits[item.key] = item.split
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    flush()
    bar.close()
    arrays = {k: np.concatenate(v) for k, v in chunks.items() if v}
    meta = {
        "model": str(encoder.config.get("source", {}).get("checkpoint", "")),
        "source": source.spec,
        "source_kind": source.kind,
        "modality": modality,
        "class_names": source.class_names or _class_names_from(labels),
        "count": len(keys),
        "skipped": skipped,
        "folds": folds,
        "splits": splits,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return EmbeddingSet(keys, np.array(labels, dtype=np.int64), arrays, meta)


def npz_path(path: str | Path) -> Path:
    """The file EmbeddingSet.save(path) writes."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def claim_output_file(path: str | Path, overwrite: bool = False) -> Path:
    """The .npz to write for `--out`, checked before any work: an existing file or folder there is
    refused (FolderInUseError, the project's one wording) unless `overwrite`, which moves it aside."""
    from vaemo_dist.fsutil import FolderInUseError, move_aside, refusal

    target = npz_path(path)
    if target.exists() or target.is_symlink():
        if not overwrite:
            what = "it is a folder (--out names the .npz file to write)" if target.is_dir() else \
                "the file exists and vaemo-embed does not replace files"
            raise FolderInUseError(refusal(target, what, "--overwrite"))
        log.warning("--overwrite: moved %s aside to %s", target, move_aside(target))
    return target


def _class_names_from(labels: list[int]) -> list[str]:
    top = max(labels, default=-1)
    return [str(i) for i in range(top + 1)]


@entry_point("vaemo-embed")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vaemo-embed", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an exported model folder (vaemo-export)")
    p.add_argument("--input", required=True, help="a folder of media files, a CSV manifest or shards")
    p.add_argument("--out", required=True, help="output .npz (a new file)")
    p.add_argument("--overwrite", action="store_true",
                   help="if --out exists, move it aside to <out>.old-<timestamp> (never deleted)")
    p.add_argument("--modality", choices=MODALITIES, default="av")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: decode in this one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", default=None, help="comma-separated class names, in label order")
    p.add_argument("--limit", type=int, default=0, help="only the first N clips (0: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from vaemo_dist.data.sources import SourceError
    from vaemo_dist.export import ExportError
    from vaemo_dist.fsutil import FolderInUseError
    from vaemo_dist.pretrained import from_pretrained

    try:
        claim_output_file(args.out, args.overwrite)
        encoder = from_pretrained(args.model, device=args.device)
        source = open_source(args.input, args.classes.split(",") if args.classes else None)
    except (ExportError, SourceError, FolderInUseError) as e:
        return fail(f"vaemo-embed: {e}")
    keep = None
    if args.limit > 0:
        order: dict[str, int] = {}

        def keep(record: Record) -> bool:  # the first N records (the records callable restarts per worker)
            order.setdefault(record.key, len(order))
            return order[record.key] < args.limit

    result = embed_source(encoder, source, modality=args.modality, batch_size=args.batch_size,
                          workers=args.workers, progress=not args.quiet, keep=keep)
    out = result.save(args.out)
    print(f"wrote {len(result)} embeddings ({len(result.meta['skipped'])} clips skipped) to {out} "
          f"in {result.meta['seconds']:.1f}s", file=sys.stderr)
    return 0 if len(result) else 1


if __name__ == "__main__":
    sys.exit(main())
