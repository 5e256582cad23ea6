"""Stage 2, knowledge injection: dual-path contrastive alignment of text descriptions with the VA model.

Path 1 aligns each clip's (frozen, precomputed) description embedding, through a trainable text
projection head, with the joint audio-visual embedding; path 2 aligns it with each modality's own
embedding (audio, visual). Every path is a symmetric InfoNCE over the global batch
(`kernels.dispatch.contrastive_loss` over the data-parallel group). The stage-1 objective (masked
reconstruction + audio-visual InfoNCE) can be kept with a weight so the representation does not drift.

    loss = joint_weight * L(text, joint) + audio_weight * L(text, audio) + video_weight * L(text, video)
           + stage1_weight * stage1_loss

The text head lives in `Stage2Model` next to the VAEmo model, so DeepSpeed trains, shards and
checkpoints both as one module (state-dict names `vaemo.*` and `text_head.*`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch
from vaemo_dist.config import Config, LossConfig, Stage2Config
from vaemo_dist.model.vaemo import ModelOutput, VAEmoModel
from vaemo_dist.objectives.stage1 import Stage1Objective

log = logging.getLogger(__name__)

VAEMO_PREFIX = "vaemo."
TEXT_HEAD_PREFIX = "text_head."


class TextHead(nn.Module):
    """Frozen text embedding [B, T] -> [B, E] L2-normalised, with its own learnable temperature."""

    def __init__(self, text_dim: int, embed_dim: int, hidden: int = 0, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        if hidden > 0:
            self.proj: nn.Module = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(),
                                                 nn.Linear(hidden, embed_dim))
        else:
            self.proj = nn.Linear(text_dim, embed_dim)
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.max_logit_scale = max_logit_scale
        # Shape [1], as in VAEmoModel: DeepSpeed broadcasts parameters as byte views (not 0-d).
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = F.normalize(self.proj(text), dim=-1)
        return emb, self.log_logit_scale.exp().clamp(max=self.max_logit_scale).squeeze(0)


@dataclass
class Stage2Output:
    text_emb: torch.Tensor  # [B, E] L2-normalised
    text_logit_scale: torch.Tensor  # scalar
    joint_emb: torch.Tensor  # [B, E] L2-normalised, as are the two below
    audio_emb: torch.Tensor
    video_emb: torch.Tensor
    va: ModelOutput | None  # the masked forward pass (reconstruction etc.) when it ran


class Stage2Model(nn.Module):
    """VAEmoModel + text projection head, trained together by DeepSpeed.

    masked=True aligns the embeddings of the MAE-masked forward pass (the stage-1 cost per step, and
    it also yields what the stage-1 objective needs); masked=False encodes every token (`encode`)."""

    def __init__(self, vaemo: VAEmoModel, text_dim: int, s2: Stage2Config, loss: LossConfig) -> None:
        super().__init__()
        self.vaemo = vaemo
        self.text_head = TextHead(text_dim, vaemo.cfg.embed_dim, s2.text_head_hidden, loss.init_temperature,
                                  loss.max_logit_scale)
        self.masked = s2.masked
        self.needs_forward = s2.masked or s2.stage1_weight > 0
        if s2.freeze_encoder:
            vaemo.requires_grad_(False)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor) -> Stage2Output:
        va = self.vaemo(video, audio) if self.needs_forward else None
        if self.masked:
            assert va is not None
            joint, a, v = va.joint_emb, va.audio_emb, va.video_emb
        else:
            enc = self.vaemo.encode(video, audio)
            joint, a, v = enc.joint_emb, enc.audio_emb, enc.video_emb
        text_emb, scale = self.text_head(text.to(self.text_head.log_logit_scale.dtype))
        return Stage2Output(text_emb=text_emb, text_logit_scale=scale, joint_emb=joint, audio_emb=a,
                            video_emb=v, va=va)

    @torch.no_grad()
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_head(text)[0]


class Stage2Objective:
    """`group`: the data-parallel process group the InfoNCE terms gather over (see Stage1Objective)."""

    def __init__(self, s2: Stage2Config, loss: LossConfig, group: Any = None) -> None:
        self.s2, self.group = s2, group
        self.stage1 = Stage1Objective(loss, group) if s2.stage1_weight > 0 else None

    def __call__(self, out: Stage2Output,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        s2 = self.s2
        t, scale = out.text_emb.float(), out.text_logit_scale.float()
        total = t.new_zeros(())
        names, values = [], []
        paths = (("text_joint", s2.joint_weight, out.joint_emb),
                 ("text_audio", s2.audio_weight, out.audio_emb),
                 ("text_video", s2.video_weight, out.video_emb))
        for name, weight, emb in paths:
            if weight > 0:  # a path switched off costs nothing
                term = dispatch.contrastive_loss(t, emb.float(), scale, self.group)
                total = total + weight * term
                names.append(name)
                values.append(term)
        stage1_metrics: dict[str, float] = {}
        if self.stage1 is not None:
            if out.va is None:
                raise ValueError("stage2.stage1_weight > 0 needs the masked forward pass (Stage2Model.va)")
            s1_total, stage1_metrics = self.stage1(out.va)
            total = total + self.s2.stage1_weight * s1_total
        with torch.no_grad():
            j = out.joint_emb.float()
            hit = (t @ j.T).argmax(dim=1)  # text -> clip within this rank's batch
            acc = (hit == torch.arange(t.shape[0], device=t.device)).float().mean()
            acc_class = torch.tensor(-1.0, device=t.device)  # -1: the labels are unknown
            if labels is not None:
                known = labels >= 0
                if known.any():
                    acc_class = (labels[hit] == labels)[known].float().mean()
            vals = torch.stack([total, *values, scale, acc, acc_class]).detach().cpu().tolist()
            metrics = dict(zip(["loss", *names, "text_logit_scale", "acc_t2j", "acc_t2j_class"], vals))
        for k, v in stage1_metrics.items():
            metrics["stage1_loss" if k == "loss" else k] = v
        return total, metrics


# --------------------------------------------------------------------------------------------
# Starting from a stage-1 checkpoint or export


def resolve_init(path: str | Path) -> Path:
    """What `stage2.init_from` names: an export folder (vaemo-export output) as given, else a checkpoint
    step folder from a step folder, `<ckpts>/latest` (the pointer file), the checkpoints folder or the run
    folder. Anything else raises ValueError saying what it is and what is wanted."""
    from vaemo_dist.export import describe_folder, is_checkpoint, is_export, resolve_checkpoint
    from vaemo_dist.train.checkpoint import LATEST, resolve

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"stage2.init_from: {p} does not exist (run stage 1 first, e.g. README "
                                "command 1, or point stage2.init_from at a checkpoint or an export)")
    if is_export(p):
        return p
    if p.name == LATEST and p.is_file():
        folder = resolve(LATEST, p.parent)
        assert folder is not None
        return folder
    folder = resolve_checkpoint(p)
    if not is_checkpoint(folder):
        raise ValueError(f"stage2.init_from={p} is {describe_folder(p)}; it wants a stage-1 or stage-2 "
                         "checkpoint (a step folder, <run>/checkpoints/latest or the run folder) or an "
                         "export folder (vaemo-export output: config.json + model.safetensors)")
    return folder


# Config keys that change the shapes of the weights (a mismatch cannot load) and the others.
_SHAPE_KEYS = {"model": ("dim", "depth", "heads", "mlp_ratio", "decoder_dim", "decoder_depth",
                         "decoder_heads", "embed_dim"),
               "inputs.video": ("frames", "size", "tubelet", "patch"),
               "inputs.audio": ("n_mels", "frames", "patch")}


def check_compatible(cfg: Config, folder: Path) -> None:
    """Compare the run's model/inputs with those the checkpoint (config.yaml) or export (config.json)
    was made with: shape keys must match."""
    import json

    import yaml

    from vaemo_dist.export import CONFIG, is_export

    config_file = folder / (CONFIG if is_export(folder) else "config.yaml")
    if not config_file.is_file():
        log.warning("%s has no config.yaml: architecture not checked before loading", folder)
        return
    text = config_file.read_text()
    raw = (json.loads(text) if config_file.suffix == ".json" else yaml.safe_load(text)) or {}
    what = "export" if config_file.suffix == ".json" else "checkpoint"
    ours = {"model": asdict(cfg.model), "inputs.video": asdict(cfg.inputs.video),
            "inputs.audio": asdict(cfg.inputs.audio)}
    theirs = {"model": raw.get("model", {}), "inputs.video": raw.get("inputs", {}).get("video", {}),
              "inputs.audio": raw.get("inputs", {}).get("audio", {})}
    # A key the checkpoint's config lacks (written before the key existed) had its default then.
    sections = {"model": cfg.model, "inputs.video": cfg.inputs.video, "inputs.audio": cfg.inputs.audio}
    defaults = {section: asdict(type(dc)()) for section, dc in sections.items()}
    errors, notes = [], []
    for section, values in ours.items():
        for key, value in values.items():
            before = theirs[section].get(key, defaults[section].get(key))
            if key == "preset" or before == value:
                continue
            line = f"{section}.{key}: {before!r} in the {what}, {value!r} here"
            (errors if key in _SHAPE_KEYS.get(section, ()) else notes).append(line)
    if errors:
        raise ValueError(f"stage2.init_from={folder}: the architecture differs: " + "; ".join(errors))
    for line in notes:
        log.warning("stage2.init_from: %s", line)


def load_init(model: Stage2Model, path: str | Path, cfg: Config | None = None) -> Path:
    """Load a stage-1 checkpoint (any ZeRO stage; VAEmoModel weights), a stage-2 one (VAEmo + text
    head), consolidated without unpickling (vaemo_dist.export), or an export folder (read by
    `from_pretrained`: safetensors only) into `model`. Returns the folder."""
    from vaemo_dist.export import consolidate, is_export

    folder = resolve_init(path)
    if cfg is not None:
        check_compatible(cfg, folder)
    if is_export(folder):
        what = _load_export(model, folder)
        log.info("loaded the %s from %s", what, folder)
        return folder
    state = consolidate(folder)  # frozen parameters included (export._with_frozen_parameters)
    if any(k.startswith((VAEMO_PREFIX, TEXT_HEAD_PREFIX)) for k in state):  # a stage-2 checkpoint
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith(VAEMO_PREFIX) for k in missing):
            raise ValueError(f"{folder}: weights do not fit: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        what = "stage-2 model (text head included)" if not missing else "VA model (text head fresh)"
    else:
        missing, unexpected = model.vaemo.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: not a VAEmoModel checkpoint: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        what = "stage-1 VA model"
    log.info("loaded the %s from %s", what, folder)
    return folder


def _load_export(model: Stage2Model, folder: Path) -> str:
    """An export's weights into `model` (what was loaded, in words). An export without the decoder
    leaves the reconstruction decoder as initialised; a text head is taken when it fits."""
    from vaemo_dist.export import is_decoder_key
    from vaemo_dist.pretrained import from_pretrained

    encoder = from_pretrained(folder)
    stage = f"stage-{encoder.stage}"
    missing, unexpected = model.vaemo.load_state_dict(encoder.model.state_dict(), strict=False)
    if unexpected or any(not is_decoder_key(k) for k in missing):
        raise ValueError(f"{folder}: weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if missing:
        log.warning("%s has no reconstruction decoder (exported without --with-decoder): the decoder starts "
                    "from its initial weights%s", folder,
                    "; stage2.stage1_weight > 0 trains it from there" if model.needs_forward else "")
    source = (encoder.config.get("source") or {})
    made = f" (an export made by vaemo-export from {source.get('checkpoint')} at step {source.get('step')})"
    if encoder.text_head is None:
        return f"{stage} VA model{made}"
    head = encoder.text_head.state_dict()
    ours = model.text_head.state_dict()
    if {k: tuple(v.shape) for k, v in head.items()} != {k: tuple(v.shape) for k, v in ours.items()}:
        log.warning("%s: its text head (%s) does not fit this run's (stage2.text_head_hidden, the text "
                    "encoder's dim): the text head starts fresh", folder,
                    (encoder.config.get("text_head") or {}).get("text_encoder"))
        return f"{stage} VA model (text head fresh){made}"
    model.text_head.load_state_dict(head)
    return f"{stage} model (text head included){made}"
