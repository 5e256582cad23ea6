"""The embedding API over an exported encoder (see vaemo_dist/export.py).

    import vaemo_dist
    encoder = vaemo_dist.from_pretrained("exported/stage1-tiny")
    out = encoder.encode(video="clip.mp4", audio="clip.mp4")   # files, decoded as in training
    out = encoder.encode(video=video_tensor)                     # or tensors; either modality alone
    out.joint_emb, out.video_emb, out.audio_emb                  # [B, E], L2-normalised
    out.joint_pooled, out.video_pooled, out.audio_pooled         # [B, D], mean-pooled tokens

A stage-2 (knowledge-injected) export also carries the trained text head, so text lands in the same
space (the frozen text encoder named in config.json, all-MiniLM-L6-v2 by default, runs offline):

    text = encoder.embed_text(["A person who looks and sounds happy."])   # [N, E], L2-normalised
    res = encoder.zero_shot(video="clip.mp4", audio="clip.mp4",
                            prompts={"happy": ["A happy face and voice."], "sad": ["A sad face and voice."]})
    res.predicted, res.scores, res.probs                         # class names, [B, C] cosines, softmax

A classifier folder that the linear probe or fine-tuning saved (docs/downstream.md, section 8) loads
with the same call and predicts classes (vaemo_dist/eval/predict.py):

    clf = vaemo_dist.from_pretrained("runs/probe/classifier")
    res = clf.predict(video="clip.mp4")                          # res.predicted, res.probs, res.classes

Files are decoded with the training preprocessing (vaemo_dist/data/decode_files.py): the centred
window of `inputs.video.frames` frames, centre crop + resize + normalise, and the log-mel window
centred on that video window. Audio comes from a sibling `<stem>.flac` / `<stem>.wav` when there is
one (the layout of our shards), else from the file's own audio track (AAC in an mp4, say). Audio at
another sample rate is resampled with FFmpeg's resampler (libswresample) to `inputs.audio.sample_rate`;
the training data path itself never resamples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaemo_dist.checkpoints import CLASSIFIER_CONFIG, CONFIG, WEIGHTS, ExportError, read_export
from vaemo_dist.data.decode_files import decode_media
from vaemo_dist.model.vaemo import EncoderOutput, VAEmoModel

log = logging.getLogger(__name__)

PathLike = str | Path
MediaArg = torch.Tensor | PathLike | Sequence[PathLike] | None
Prompts = dict[str, list[str]] | dict[str, str] | Sequence[str]
MODALITIES = ("joint", "audio", "video")


# --------------------------------------------------------------------------------------------
# The encoder


@dataclass
class ZeroShot:
    """Zero-shot classification of a batch of clips against class prompts."""

    classes: list[str]  # class names, in the order of the score columns
    scores: torch.Tensor  # [B, C] cosine of the clip embedding and each class's averaged prompt embedding
    probs: torch.Tensor  # [B, C] softmax of scores x the text head's learnt logit scale
    labels: torch.Tensor  # [B] long: the argmax class index
    predicted: list[str]  # [B] the argmax class names


class Encoder(nn.Module):
    """A pretrained VAEmo encoder in eval mode: `encode` gives joint and per-modality embeddings; a
    stage-2 export adds `embed_text` and `zero_shot` (its text head, `self.text_head`)."""

    def __init__(self, model: VAEmoModel, config: dict[str, Any], text_head: nn.Module | None = None,
                 text_encoder: Any = None, folder: PathLike | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.inputs = model.inputs
        self.text_head = text_head
        self.folder = None if folder is None else Path(folder)
        # Not an attribute nn.Module would register: the frozen text encoder (a SentenceTransformer,
        # itself a Module) must stay out of parameters(), .to(dtype) and state_dict().
        object.__setattr__(self, "_text_encoder", text_encoder)

    @property
    def stage(self) -> int:
        """1 or 2; exports older than the `stage` field are stage-1 ones."""
        return int(self.config.get("stage", 1))

    @property
    def has_text_head(self) -> bool:
        return self.text_head is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    def forward(self, video: torch.Tensor | None = None, audio: torch.Tensor | None = None) -> EncoderOutput:
        return self.model.encode(video, audio)

    def load(self, video: MediaArg = None, audio: MediaArg = None) -> tuple[torch.Tensor | None,
                                                                           torch.Tensor | None]:
        """Files (one path or a list) -> batched, normalised input tensors; tensors pass through with
        a batch dimension added where missing and their shape checked."""
        v_paths, a_paths = _as_paths(video), _as_paths(audio)
        if v_paths is not None or a_paths is not None:
            if isinstance(video, torch.Tensor) or isinstance(audio, torch.Tensor):
                raise TypeError("give both modalities as files or both as tensors, not a mix")
            n = len(v_paths if v_paths is not None else a_paths)  # type: ignore[arg-type]
            if v_paths is not None and a_paths is not None and len(a_paths) != n:
                raise ValueError(f"{len(v_paths)} video files but {len(a_paths)} audio files")
            clips = [decode_media(v_paths[i] if v_paths else None, a_paths[i] if a_paths else None,
                                  self.inputs) for i in range(n)]
            video = torch.stack([c[0] for c in clips]) if v_paths else None
            audio = torch.stack([c[1] for c in clips]) if a_paths else None
        return self._check(video, "video"), self._check(audio, "audio")

    @torch.no_grad()
    def encode(self, video: MediaArg = None, audio: MediaArg = None) -> EncoderOutput:
        """Embeddings of a batch: video [B, 3, T, H, W] normalised, audio [B, 1, F, M] normalised
        log-mel, or file paths decoded as in training. Either modality may be left out."""
        if video is None and audio is None:
            raise ValueError("encode needs video, audio or both")
        video, audio = self.load(video, audio)
        move = dict(device=self.device, dtype=self.dtype)
        return self.model.encode(None if video is None else video.to(**move),
                                 None if audio is None else audio.to(**move))

    # ----------------------------------------------------------------------------------------
    # Text (stage-2 exports)

    def _require_text_head(self, what: str) -> nn.Module:
        if self.text_head is None:
            where = f" ({self.folder})" if self.folder is not None else ""
            raise ExportError(f"{what} needs the stage-2 text head, and this is a stage-1 export{where}: "
                              "export a stage-2 run (vaemo-export runs/<stage-2 run> --out DIR, after "
                              "launchers/stage2.py; docs/stage2.md) and load that folder")
        return self.text_head

    @property
    def text_encoder(self) -> Any:
        """The frozen text encoder the head was trained on, loaded offline on first use
        (vaemo_dist.text.encode; the name or folder in config.json, or as given to from_pretrained)."""
        self._require_text_head("the text encoder")
        enc = self._text_encoder
        if enc is None or isinstance(enc, (str, Path)):
            from vaemo_dist.text.encode import load_text_encoder

            name = str(enc) if enc is not None else self.config["text_head"]["text_encoder"]
            enc = load_text_encoder(name, device=str(self.device))
            object.__setattr__(self, "_text_encoder", enc)
        want = int(self.config["text_head"]["text_dim"])
        got = int(enc.get_embedding_dimension())
        if got != want:
            raise ExportError(f"the text encoder gives {got}-d embeddings; the text head was trained on "
                              f"{want}-d ones ({self.config['text_head']['text_encoder']})")
        return enc

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str] | str, batch_size: int = 64) -> torch.Tensor:
        """Texts -> [N, E] L2-normalised, in the space of joint_emb / audio_emb / video_emb: the frozen
        text encoder (as `vaemo-embed-text` runs it in training), then the exported text head."""
        head = self._require_text_head("embed_text")
        from vaemo_dist.text.encode import embed_texts

        if isinstance(texts, str):
            texts = [texts]
        frozen = embed_texts(list(texts), self.text_encoder, batch_size)
        param = head.log_logit_scale
        return head(frozen.to(device=param.device, dtype=param.dtype))[0]

    @torch.no_grad()
    def zero_shot(self, video: MediaArg = None, audio: MediaArg = None, *, prompts: Prompts,
                  modality: str = "joint") -> ZeroShot:
        """Zero-shot emotion classification of a batch of clips (files or tensors, as `encode`).

        `prompts`: {class name: [wordings]} (each class's prompt embeddings are averaged, as in the
        stage-2 benchmark, vaemo_dist/text/retrieval.py), {class name: wording}, or a list with one
        prompt per class (the prompts then name the classes). `modality`: which clip embedding is
        compared, "joint" (default), "audio" or "video"."""
        from vaemo_dist.text.retrieval import class_embeddings, zero_shot_scores

        head = self._require_text_head("zero_shot")
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r}: choose one of {MODALITIES}")
        names, wordings = _class_prompts(prompts)
        out = self.encode(video, audio)
        clip = getattr(out, f"{modality}_emb")
        if clip is None:
            raise ValueError(f"modality {modality!r} needs its input ({modality} was not given)")
        flat = self.embed_text([w for ws in wordings for w in ws]).float()
        class_emb = class_embeddings(list(flat.split([len(ws) for ws in wordings])))
        scores = zero_shot_scores(clip.float(), class_emb)
        scale = head.log_logit_scale.float().exp().clamp(max=head.max_logit_scale)
        labels = scores.argmax(dim=1)
        return ZeroShot(classes=names, scores=scores, probs=(scale * scores).softmax(dim=1), labels=labels,
                        predicted=[names[i] for i in labels.tolist()])

    def _check(self, x: Any, what: str) -> torch.Tensor | None:
        if x is None:
            return None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what}: expected a tensor or file path(s), got {type(x).__name__}")
        v, a = self.inputs.video, self.inputs.audio
        want = (3, v.frames, v.size, v.size) if what == "video" else (1, a.frames, a.n_mels)
        if x.dim() == len(want):
            x = x.unsqueeze(0)
        if x.dim() != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{what}: expected shape [B, {', '.join(map(str, want))}] (from the export's "
                             f"inputs config), got {list(x.shape)}")
        return x


def _class_prompts(prompts: Prompts) -> tuple[list[str], list[list[str]]]:
    """(class names, wordings per class) from the forms `zero_shot` takes."""
    if isinstance(prompts, str):
        raise TypeError("prompts: a dict {class: [wordings]} or a list of prompts, not one string")
    if isinstance(prompts, dict):
        names = [str(k) for k in prompts]
        wordings = [[v] if isinstance(v, str) else list(v) for v in prompts.values()]
    else:
        names = [str(p) for p in prompts]
        wordings = [[p] for p in names]
    if len(names) < 2:
        raise ValueError(f"zero-shot needs at least 2 classes, got {names}")
    empty = [n for n, ws in zip(names, wordings) if not ws]
    if empty:
        raise ValueError(f"classes without a prompt: {empty}")
    return names, wordings


def _as_paths(x: MediaArg) -> list[PathLike] | None:
    if x is None or isinstance(x, torch.Tensor):
        return None
    if isinstance(x, (str, Path)):
        return [x]
    return list(x)


def from_pretrained(folder: PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, text_encoder: Any = None) -> Encoder:
    """Load an exported encoder (vaemo-export) in eval mode, gradients off. Safetensors only: nothing
    is unpickled. A stage-2 export brings its text head (`embed_text`, `zero_shot`); `text_encoder`
    overrides the frozen text encoder named in its config.json: a name or local sentence-transformers
    folder, or an already loaded model (loaded on first use otherwise). `vaemo_dist.from_pretrained`
    also loads classifier folders (as predictors)."""
    folder = Path(folder)
    if (folder / CLASSIFIER_CONFIG).is_file():
        raise ExportError(f"{folder} is a classifier folder (probe / fine-tuning), not an export: load it "
                          "with vaemo_dist.from_pretrained(...), which returns a predictor")
    config_file, weights_file = folder / CONFIG, folder / WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ExportError(f"{folder} is not an exported model (needs {CONFIG} and {WEIGHTS}; "
                          f"see vaemo-export) nor a classifier folder (needs {CLASSIFIER_CONFIG}; saved by "
                          "the linear probe and fine-tuning, docs/downstream.md)")
    export = read_export(folder)  # vaemo_dist.checkpoints: config, weights and text head, checked
    encoder = Encoder(export.model, export.config, text_head=export.text_head, text_encoder=text_encoder,
                      folder=folder)
    return encoder.to(device=device, dtype=dtype).eval()
