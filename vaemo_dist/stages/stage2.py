"""Stage 2, knowledge injection: dual-path contrastive alignment of affective text descriptions with the
joint and per-modality VA embeddings, starting from a stage-1 checkpoint or export (docs/stage2.md).

    deepspeed --num_gpus 2 launchers/stage2.py --config configs/stage2/tiny.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage2.py --config configs/stage2/tiny.yaml data.shards=<set>

`data.shards` is the described set to train on:

* `synthetic`: the synthetic described set, templated descriptions of the synthetic corpus (data.synth),
  built on first use in a cache folder of its own, `<parent of data.synth.dir>/stage2/<name>-described`
  (data_cache/stage2/synthetic-described by default), with its text embeddings next to it.
* anything else: a described set of yours (vaemo-describe output: a folder or its manifest.json). Stage 2
  only reads it, whatever `stage2.describe_synthetic` says (that key is ignored then, with a warning).
  Its `text_emb.safetensors` is used when current; when missing or stale (other descriptions, another
  `stage2.text_encoder`), the embeddings are computed into stage 2's own cache folder,
  `<parent of data.synth.dir>/stage2/text-emb/<set>-<hash>/`, never into your set (`vaemo-embed-text
  <set>` writes them next to it, explicitly).

`stage2.init_from` takes a checkpoint (a step folder, `<run>/checkpoints/latest`, a run folder) or an
export folder (vaemo-export output).

The module's functions (`check`, `prepare`, `shards`, `embeddings_path`, ...) take the run's config; the
`Stage2` object is what a launch uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from vaemo_dist.config import Config, ConfigError
from vaemo_dist.stages.base import Stage, shard_urls

log = logging.getLogger("vaemo")

EMBEDDINGS_WRITER = "stage-2 text embeddings"  # the owner of the embedding cache folders


def cache_root(cfg: Config) -> Path:
    """Stage 2's own folders: `<parent of data.synth.dir>/stage2` (data_cache/stage2 by default)."""
    return Path(cfg.data.synth.dir).parent / "stage2"


def synthetic_described_dir(cfg: Config) -> Path:
    """Where `data.shards: synthetic` builds the synthetic described set (never a folder the user named)."""
    return cache_root(cfg) / f"{Path(cfg.data.synth.dir).name}-described"


def is_synthetic(cfg: Config) -> bool:
    return cfg.data.shards == "synthetic"


def user_set_folder(cfg: Config) -> Path | None:
    """The local folder of the user's described set (data.shards a folder or its manifest.json);
    None for a remote URL, a brace pattern or a list."""
    spec = cfg.data.shards
    if "," in spec or "://" in spec or any(ch in spec for ch in "{*?["):
        return None
    p = Path(spec)
    return p.parent if p.name == "manifest.json" else p


def data_label(cfg: Config) -> str:
    """How every log line names the data: synthetic or the user's."""
    if is_synthetic(cfg):
        return f"the synthetic described set {synthetic_described_dir(cfg)} (templated, not your data)"
    from vaemo_dist.fsutil import folder_owner
    from vaemo_dist.text.describe import SYNTHETIC_WRITER, holds_synthetic_described

    folder = user_set_folder(cfg)
    if folder is not None and folder_owner(folder) == SYNTHETIC_WRITER:  # named by its path
        return f"the synthetic described set {cfg.data.shards} (templated, not your data; read only)"
    if folder is not None and holds_synthetic_described(folder):
        return f"your described set {cfg.data.shards} (templated descriptions; read only)"
    return f"your described set {cfg.data.shards} (read only)"


def _not_ours(cfg: Config, folder: Path) -> str:
    """The refusal when the synthetic described set's cache folder holds something else."""
    from vaemo_dist.fsutil import folder_owner

    owner = folder_owner(folder)
    why = f"it holds the output of {owner}" if owner else "it is not empty and stage 2 did not make it"
    return (f"refusing to write into {folder}: the synthetic described set (data.shards=synthetic) is built "
            f"there, but {why}. Nothing was changed. Move that folder away yourself, or set "
            f"data.synth.dir=<another folder> (stage 2's cache, now {cache_root(cfg)}, moves with it)")


def check(cfg: Config) -> None:
    """Start-up checks on every rank, before any process group (a ConfigError ends the launch, exit 2)."""
    from vaemo_dist.fsutil import FolderInUseError
    from vaemo_dist.text.describe import SYNTHETIC_WRITER, claim_described_dir, holds_synthetic_described

    s2 = cfg.stage2
    if is_synthetic(cfg):
        folder = synthetic_described_dir(cfg)
        if not holds_synthetic_described(folder):  # ours or refused, before any work
            try:
                claim_described_dir(folder, SYNTHETIC_WRITER)
            except FolderInUseError:
                raise FolderInUseError(_not_ours(cfg, folder)) from None
        return
    if s2.describe_synthetic and os.environ.get("RANK", "0") == "0":
        log.warning("stage2.describe_synthetic=true is ignored: data.shards=%s names your described set, "
                    "which stage 2 only reads and never writes. The synthetic described set is "
                    "data.shards=synthetic (built in %s).", cfg.data.shards, synthetic_described_dir(cfg))
    folder = user_set_folder(cfg)
    if folder is None:
        if not s2.text_embeddings:
            raise ConfigError(f"stage2.text_embeddings: data.shards={cfg.data.shards!r} is not a local "
                              "described-set folder, so its descriptions cannot be embedded here; set "
                              "stage2.text_embeddings to its text_emb.safetensors (made by vaemo-embed-text)")
        return
    from vaemo_dist.checkpoints import describe_folder
    from vaemo_dist.text.describe import holds_described_set

    if not folder.is_dir():
        raise ConfigError(f"data.shards: {cfg.data.shards} is {describe_folder(folder)}; stage 2 wants a "
                          "described set (vaemo-describe output), or `synthetic`")
    if not s2.text_embeddings and not holds_described_set(folder):
        raise ConfigError(
            f"data.shards: {folder} is {describe_folder(folder)}, not a described set; stage 2 trains on "
            f"clips with text descriptions: run `vaemo-describe {folder} --out <new folder> ...` and set "
            "data.shards=<new folder> (or data.shards=synthetic for the synthetic described set)")


def embeddings_path(cfg: Config) -> Path:
    """The text embeddings this run uses; the same answer on every rank once `prepare` ran."""
    from vaemo_dist.text.encode import EMBEDDINGS, embeddings_are_current

    s2 = cfg.stage2
    if s2.text_embeddings:
        return Path(s2.text_embeddings)
    if is_synthetic(cfg):
        return synthetic_described_dir(cfg) / EMBEDDINGS
    folder = user_set_folder(cfg)
    assert folder is not None  # check() asked for stage2.text_embeddings otherwise
    if embeddings_are_current(folder, folder / EMBEDDINGS, s2.text_encoder):
        return folder / EMBEDDINGS
    return embeddings_cache_dir(cfg, folder) / EMBEDDINGS


def embeddings_cache_dir(cfg: Config, folder: Path) -> Path:
    """Stage 2's own folder for the embeddings of a user's described set, keyed by the set's path and
    the text encoder."""
    key = hashlib.sha256(f"{folder.resolve()}\n{cfg.stage2.text_encoder}".encode()).hexdigest()[:12]
    return cache_root(cfg) / "text-emb" / f"{folder.resolve().name}-{key}"


def prepare(cfg: Config) -> None:
    """Once per node, before the shards are listed: the described set and its text embeddings. A user's
    described set is only read."""
    from vaemo_dist.text.encode import EMBEDDINGS, ensure_embeddings

    s2 = cfg.stage2
    if is_synthetic(cfg):
        from vaemo_dist.text.describe import ensure_synthetic_described

        # Stage.prepare built the synthetic corpus (data.shards == "synthetic") before this.
        described = ensure_synthetic_described(cfg.data.synth.dir, synthetic_described_dir(cfg),
                                               count=s2.subset_count, fraction=s2.subset_fraction,
                                               seed=s2.subset_seed,
                                               clips_per_shard=cfg.data.synth.clips_per_shard)
        log.info("stage 2 data: %s, from the synthetic corpus %s", data_label(cfg), cfg.data.synth.dir)
        if not s2.text_embeddings:
            path = ensure_embeddings(described, s2.text_encoder)
            log.info("text embeddings of the synthetic described set: %s", path)
    else:
        log.info("stage 2 data: %s", data_label(cfg))
        folder = user_set_folder(cfg)
        if not s2.text_embeddings and folder is not None:
            path = embeddings_path(cfg)
            if path.parent == folder:
                log.info("text embeddings of your described set: %s (current, %s)", path, s2.text_encoder)
            else:
                from vaemo_dist.fsutil import claim_output_dir

                why = "missing" if not (folder / EMBEDDINGS).is_file() else "stale or from another encoder"
                claim_output_dir(path.parent, EMBEDDINGS_WRITER)
                ensure_embeddings(folder, s2.text_encoder, out=path)
                log.info("text embeddings of your described set: %s/%s is %s, so stage 2 computed them "
                         "with %s into its own cache %s (your set is not written; `vaemo-embed-text %s` "
                         "writes them next to it)", folder, EMBEDDINGS, why, s2.text_encoder, path, folder)
    if s2.text_embeddings:
        log.info("text embeddings of %s: stage2.text_embeddings=%s", data_label(cfg), s2.text_embeddings)
    if cfg.eval.every:
        # The online evaluation's zero-shot prompts, embedded now by the encoder that embedded the
        # descriptions: a text model that cannot load fails the launch, not an evaluation hours in.
        from vaemo_dist.eval.online import prepare_zero_shot
        from vaemo_dist.text.encode import TextEmbeddingTable

        encoder = TextEmbeddingTable(embeddings_path(cfg)).meta.get("encoder") or s2.text_encoder
        prepare_zero_shot(cfg, Path(cfg.train.out_dir) / cfg.train.run_name, encoder)


def shards(cfg: Config) -> list[str]:
    """The training shards: the synthetic described set's for `synthetic`, else data.shards."""
    if is_synthetic(cfg):
        from vaemo_dist.data.shards import expand_shards

        return expand_shards(str(synthetic_described_dir(cfg)))
    return shard_urls(cfg.data)


class Stage2(Stage):
    name = "stage2"
    default_config = "configs/stage2/tiny.yaml"

    def check(self) -> None:
        super().check()
        check(self.cfg)

    def prepare(self) -> None:
        super().prepare()
        prepare(self.cfg)

    def shards(self) -> list[str]:
        return shards(self.cfg)

    def init_from(self) -> str | None:
        return self.cfg.stage2.init_from or None

    def build_model(self, info: Any) -> torch.nn.Module:
        from vaemo_dist.checkpoints import load_init, resolve
        from vaemo_dist.model.text_head import Stage2Model
        from vaemo_dist.model.vaemo import VAEmoModel
        from vaemo_dist.objectives.stage2 import Stage2Objective
        from vaemo_dist.text.encode import TextEmbeddingTable

        cfg = self.cfg
        table = TextEmbeddingTable(embeddings_path(cfg))
        if table.meta.get("encoder") != cfg.stage2.text_encoder and info.is_main:
            log.warning("text embeddings in %s (of %s) were made with %s, the config names %s", table.path,
                        data_label(cfg), table.meta.get("encoder"), cfg.stage2.text_encoder)
        vaemo = VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                           init_temperature=cfg.loss.init_temperature)
        model = Stage2Model(vaemo, table.dim, cfg.stage2, cfg.loss)
        ckpt_root = Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints"
        resuming = bool(cfg.train.resume) and resolve(cfg.train.resume, ckpt_root) is not None
        init = self.init_from()
        if init and not resuming:  # a resumed run gets its weights from its own checkpoint
            folder = load_init(model, init, cfg)
            if info.is_main:
                log.info("stage 2 starts from %s", folder)
        elif not init and info.is_main:
            log.warning("stage2.init_from is empty: stage 2 starts from randomly initialised weights")
        self.table = table
        self.objective = Stage2Objective(cfg.stage2, cfg.loss, group=info.dp_group)
        return model

    def loss(self, engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        text = self.table.lookup(batch.keys).to(batch.video.device, batch.video.dtype)
        return self.objective(engine(batch.video, batch.audio, text), batch.label)
