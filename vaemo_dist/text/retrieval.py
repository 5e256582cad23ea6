"""Text-to-VA retrieval on held-out clips: how well a model's text head and VA embeddings agree.

On the synthetic corpus the descriptions are templated per hidden class, so many clips share what
their text can say: the text of clip i cannot single clip i out among others of its class. Retrieval
is therefore scored at the class level (stated in every report):

* t2va_r1: for each clip's description, the nearest clip (cosine of the projected text and the
  clip's joint embedding, all clips of the held-out set as candidates) has the description's class.
* t2va_map: mean average precision of that ranking, same-class clips relevant.
* va2t_r1: for each clip, the nearest description has the clip's class.
* zero_shot: each clip classified by the nearest class prompt ("A person who looks and sounds sad.",
  several wordings averaged per class).
* t2a_r1 / t2v_r1: t2va_r1 with the audio / visual embedding (path 2).
* t2va_r1_instance: the nearest clip is the described clip itself (chance 1/N; for reference).

Clips are encoded with every token visible (`VAEmoModel.encode`), as downstream use does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vaemo_dist.config import Config, SynthConfig
from vaemo_dist.model.text_head import Stage2Model

log = logging.getLogger(__name__)


@dataclass
class HeldOut:
    """Encoded inputs of a held-out set: keys, class labels, description embeddings (frozen encoder)."""

    keys: list[str]
    labels: torch.Tensor  # [N] long
    text: torch.Tensor  # [N, T] frozen text embeddings of each clip's description
    class_text: torch.Tensor  # [C, P, T] class prompts (P wordings per class)
    video: torch.Tensor  # [N, 3, T, H, W] decoded model inputs
    audio: torch.Tensor  # [N, 1, F, M]


def load_clips(urls: list[str], cfg: Config, keys: list[str] | None = None,
               limit: int | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode (with the training preprocessing) the clips of `urls`, optionally only `keys`, and
    at most the first `limit` of them in reading order:
    (keys, labels [N], video [N, ...], audio [N, ...]) in key order. Clips that cannot be decoded are
    skipped, named in the log and counted; none decodable is an error."""
    from vaemo_dist.data.decode_pyav import decode_sample
    from vaemo_dist.data.shards import read_shard
    from vaemo_dist.data.types import DecodeError

    wanted = set(keys) if keys is not None else None
    clips, skipped = [], []
    for url in urls:
        if limit is not None and len(clips) >= limit:
            break
        for sample in read_shard(url):
            if limit is not None and len(clips) >= limit:
                break
            if wanted is None or sample["__key__"] in wanted:
                try:
                    clips.append(decode_sample(sample, cfg.inputs))
                except DecodeError as e:
                    skipped.append(e.key)
                    log.warning("held-out clip %s (%s) skipped: %s", e.key, url, e.reason)
    if skipped:
        log.warning("%d held-out clip(s) could not be decoded and were skipped: %s", len(skipped),
                    skipped[:10])
    if not clips:
        raise ValueError(f"no decodable clip in {len(urls)} shard(s) starting with {urls[:1]}"
                         + (f" (skipped: {skipped[:10]})" if skipped else ""))
    clips.sort(key=lambda c: c.key)
    return ([c.key for c in clips], torch.tensor([c.label for c in clips]),
            torch.stack([c.video for c in clips]), torch.stack([c.audio for c in clips]))


@torch.no_grad()
def encode_clips(model: Stage2Model, video: torch.Tensor, audio: torch.Tensor,
                 batch_size: int = 32) -> dict[str, torch.Tensor]:
    """L2-normalised joint / audio / video embeddings [N, E] with every token visible."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"joint": [], "audio": [], "video": []}
    for start in range(0, video.shape[0], batch_size):
        out = model.vaemo.encode(video[start : start + batch_size], audio[start : start + batch_size])
        parts["joint"].append(out.joint_emb)
        parts["audio"].append(out.audio_emb)
        parts["video"].append(out.video_emb)
    return {k: torch.cat(v).float() for k, v in parts.items()}


def _r1_class(query: torch.Tensor, keys: torch.Tensor, q_labels: torch.Tensor,
              k_labels: torch.Tensor) -> float:
    hit = (query @ keys.T).argmax(dim=1)
    return (k_labels[hit] == q_labels).float().mean().item()


def _mean_average_precision(query: torch.Tensor, keys: torch.Tensor, q_labels: torch.Tensor,
                            k_labels: torch.Tensor) -> float:
    order = (query @ keys.T).argsort(dim=1, descending=True)
    relevant = (k_labels[order] == q_labels[:, None]).float()  # [Nq, Nk] in ranked order
    ranks = torch.arange(1, keys.shape[0] + 1, dtype=torch.float32)
    precision = relevant.cumsum(dim=1) / ranks
    ap = (precision * relevant).sum(dim=1) / relevant.sum(dim=1).clamp(min=1)
    return ap.mean().item()


def class_embeddings(prompt_emb: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """[C, E] class embeddings for zero-shot: each class's L2-normalised prompt embeddings (several
    wordings, [C, P, E], or one [P_c, E] tensor per class when the counts differ) averaged, then
    re-normalised. Shared by this benchmark and `Encoder.zero_shot` (vaemo_dist/pretrained.py)."""
    if isinstance(prompt_emb, torch.Tensor):
        return F.normalize(prompt_emb.mean(dim=1), dim=-1)
    if not prompt_emb or any(p.shape[0] == 0 for p in prompt_emb):
        raise ValueError("zero-shot needs at least one prompt for every class")
    return F.normalize(torch.stack([p.mean(dim=0) for p in prompt_emb]), dim=-1)


def class_prompt_embeddings(names: Sequence[str], encoder: Any) -> list[torch.Tensor]:
    """Per class, the frozen text embeddings [P_c, T] of its prompts (`text.synthetic.class_prompts`;
    classes may have different numbers of wordings)."""
    from vaemo_dist.text.encode import embed_texts
    from vaemo_dist.text.synthetic import class_prompts

    prompts = [class_prompts(n) for n in names]
    return list(embed_texts([w for p in prompts for w in p], encoder).split([len(p) for p in prompts]))


def zero_shot_scores(clip_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """[N, C] cosine similarities of L2-normalised clip embeddings [N, E] to class embeddings [C, E];
    the argmax over classes is the zero-shot prediction."""
    return clip_emb @ class_emb.T


@torch.no_grad()
def retrieval_metrics(model: Stage2Model, held: HeldOut, batch_size: int = 32) -> dict[str, float]:
    emb = encode_clips(model, held.video, held.audio, batch_size)
    head_dtype = model.text_head.log_logit_scale.dtype
    t = model.embed_text(held.text.to(head_dtype)).float()
    c, p, d = held.class_text.shape
    prompts = model.embed_text(held.class_text.reshape(c * p, d).to(head_dtype)).float()
    class_emb = class_embeddings(prompts.reshape(c, p, -1))
    labels = held.labels
    n = labels.shape[0]
    zero_shot = (zero_shot_scores(emb["joint"], class_emb).argmax(dim=1) == labels).float().mean().item()
    instance = ((t @ emb["joint"].T).argmax(dim=1) == torch.arange(n)).float().mean().item()
    return {
        "t2va_r1": _r1_class(t, emb["joint"], labels, labels),
        "t2va_map": _mean_average_precision(t, emb["joint"], labels, labels),
        "va2t_r1": _r1_class(emb["joint"], t, labels, labels),
        "zero_shot": zero_shot,
        "t2a_r1": _r1_class(t, emb["audio"], labels, labels),
        "t2v_r1": _r1_class(t, emb["video"], labels, labels),
        "t2va_r1_instance": instance,
        "clips": float(n),
        "chance_r1": max(torch.bincount(labels).tolist()) / n,
    }


# --------------------------------------------------------------------------------------------
# Models from checkpoints


def stage2_config_of(checkpoint: str | Path) -> Config:
    """The full config of a stage-2 run, from a checkpoint of it."""
    import yaml

    from vaemo_dist.checkpoints import resolve_init
    from vaemo_dist.config import config_from_dict

    folder = resolve_init(checkpoint)
    return config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))


def build_model(cfg: Config, text_dim: int, init: str | Path | None = None) -> Stage2Model:
    """The Stage2Model a stage-2 run with `cfg` builds (same seed, so the same initial text head),
    loaded from `init`: a stage-1 checkpoint gives the starting point of stage 2 (the stage-1 VA model
    with the untrained head), a stage-2 checkpoint the trained model."""
    from vaemo_dist.checkpoints import load_init
    from vaemo_dist.model.vaemo import VAEmoModel

    torch.manual_seed(cfg.train.seed)  # as vaemo_dist.launch does before build()
    vaemo = VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                       init_temperature=cfg.loss.init_temperature)
    model = Stage2Model(vaemo, text_dim, cfg.stage2, cfg.loss)
    if init is not None:
        load_init(model, init, cfg)
    return model.eval()


def heldout_corpus(cfg: Config, out_dir: str | Path, *, seed: int = 1, clips: int = 128,
                   classes: int = 0, progress: bool = False) -> SynthConfig:
    """The held-out synthetic corpus: `cfg.data.synth` drawn with another `seed`, `clips` clips and
    `classes` classes (0: as the training corpus), built under `out_dir/corpus` on first use (reused
    when complete; concurrent builders take turns). A clip depends only on (seed, index), so a seed
    other than the training corpus's gives unseen clips."""
    import dataclasses

    from vaemo_dist.data.synth import ensure_corpus

    synth = dataclasses.replace(cfg.data.synth, dir=str(Path(out_dir) / "corpus"), seed=seed, clips=clips,
                                classes=classes or cfg.data.synth.classes)
    ensure_corpus(synth, progress=progress)
    return synth


def prepare_heldout(cfg: Config, out_dir: str | Path, *, seed: int = 1, clips: int = 128,
                    encoder: Any = None, progress: bool = False) -> HeldOut:
    """A held-out synthetic corpus like `cfg.data.synth` but drawn with another seed, its templated
    descriptions and their embeddings (all cached under `out_dir`), decoded for `cfg.inputs`."""
    import json

    from vaemo_dist.data.shards import expand_shards
    from vaemo_dist.data.synth import class_name
    from vaemo_dist.text.describe import ensure_synthetic_described
    from vaemo_dist.text.encode import (
        EMBEDDINGS,
        TextEmbeddingTable,
        ensure_embeddings,
        load_text_encoder,
    )
    from vaemo_dist.text.synthetic import class_prompts

    out = Path(out_dir)
    synth = heldout_corpus(cfg, out, seed=seed, clips=clips, progress=progress)
    described = ensure_synthetic_described(synth.dir, out / "described", seed=seed,
                                           clips_per_shard=synth.clips_per_shard, progress=progress)
    encoder_name = cfg.stage2.text_encoder
    if encoder is None:
        encoder = load_text_encoder(encoder_name)
    ensure_embeddings(described, encoder_name, encoder=encoder)
    table = TextEmbeddingTable(described / EMBEDDINGS)
    keys, labels, video, audio = load_clips(expand_shards(str(synth.dir)), cfg)
    names = [class_name(c) for c in range(synth.classes)]
    per_class = class_prompt_embeddings(names, encoder)
    wordings = min(len(p) for p in per_class)  # a dense [C, P, T]: as many wordings for every class
    (out / "class_prompts.json").write_text(json.dumps({n: class_prompts(n) for n in names}, indent=1))
    return HeldOut(keys=keys, labels=labels, text=table.lookup(keys),
                   class_text=torch.stack([p[:wordings] for p in per_class]), video=video, audio=audio)
