"""Stage-2 knowledge injection: dual-path contrastive alignment of affective text descriptions with the
joint and per-modality VA embeddings, starting from a stage-1 checkpoint (docs/stage2.md).

    deepspeed --num_gpus 2 launchers/stage2.py --config configs/stage2/tiny.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage2.py --config configs/stage2/tiny.yaml

`data.shards` is a described set (vaemo-describe output). With `stage2.describe_synthetic` it is built
on first use from the synthetic corpus, and the description embeddings are computed on first use.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vaemo_dist.config import Config  # noqa: E402
from vaemo_dist.launch import run_stage  # noqa: E402

log = logging.getLogger("vaemo")


def embeddings_path(cfg: Config) -> Path:
    if cfg.stage2.text_embeddings:
        return Path(cfg.stage2.text_embeddings)
    from vaemo_dist.text.encode import EMBEDDINGS

    return Path(cfg.data.shards) / EMBEDDINGS


def prepare(cfg: Config) -> None:
    """Once per node, before the shards are listed: the described set and its text embeddings."""
    s2 = cfg.stage2
    if s2.describe_synthetic:
        from vaemo_dist.data.synth import ensure_corpus
        from vaemo_dist.text.describe import ensure_synthetic_described

        ensure_corpus(cfg.data.synth)
        ensure_synthetic_described(cfg.data.synth.dir, cfg.data.shards, count=s2.subset_count,
                                   fraction=s2.subset_fraction, seed=s2.subset_seed,
                                   clips_per_shard=cfg.data.synth.clips_per_shard)
    if not s2.text_embeddings and Path(cfg.data.shards).is_dir():
        # Stored next to the described set; computed only when missing or stale.
        from vaemo_dist.text.encode import ensure_embeddings

        ensure_embeddings(cfg.data.shards, s2.text_encoder)
    if cfg.eval.every:
        # The online evaluation's zero-shot prompts, embedded now by the encoder that embedded the
        # descriptions: a text model that cannot load fails the launch, not an evaluation hours in.
        from vaemo_dist.eval.online import prepare_zero_shot
        from vaemo_dist.text.encode import TextEmbeddingTable

        encoder = TextEmbeddingTable(embeddings_path(cfg)).meta.get("encoder") or s2.text_encoder
        prepare_zero_shot(cfg, Path(cfg.train.out_dir) / cfg.train.run_name, encoder)


def build(cfg: Config, info: Any) -> tuple[Any, Callable[[Any, Any], Any]]:
    from vaemo_dist.model.vaemo import VAEmoModel
    from vaemo_dist.objectives.stage2 import Stage2Model, Stage2Objective, load_init
    from vaemo_dist.text.encode import TextEmbeddingTable
    from vaemo_dist.train.checkpoint import resolve

    table = TextEmbeddingTable(embeddings_path(cfg))
    if table.meta.get("encoder") != cfg.stage2.text_encoder:
        log.warning("text embeddings in %s were made with %s, the config names %s", table.path,
                    table.meta.get("encoder"), cfg.stage2.text_encoder)
    vaemo = VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                       init_temperature=cfg.loss.init_temperature)
    model = Stage2Model(vaemo, table.dim, cfg.stage2, cfg.loss)
    ckpt_root = Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints"
    resuming = bool(cfg.train.resume) and resolve(cfg.train.resume, ckpt_root) is not None
    if cfg.stage2.init_from and not resuming:  # a resumed run gets its weights from its own checkpoint
        folder = load_init(model, cfg.stage2.init_from, cfg)
        if info.is_main:
            log.info("stage 2 starts from %s", folder)
    elif not cfg.stage2.init_from and info.is_main:
        log.warning("stage2.init_from is empty: stage 2 starts from randomly initialised weights")
    objective = Stage2Objective(cfg.stage2, cfg.loss, group=info.dp_group)

    def compute_loss(engine, batch):
        text = table.lookup(batch.keys).to(batch.video.device, batch.video.dtype)
        return objective(engine(batch.video, batch.audio, text), batch.label)

    return model, compute_loss


if __name__ == "__main__":
    run_stage("stage2", build, default_config="configs/stage2/tiny.yaml", prepare=prepare)
