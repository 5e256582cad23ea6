"""The embedding API over an exported encoder (see vaemo_dist/export.py).

    import vaemo_dist
    encoder = vaemo_dist.from_pretrained("exports/stage1-tiny")
    out = encoder.encode(video="clip.mp4", audio="clip.mp4")   # files, decoded as in training
    out = encoder.encode(video=video_tensor)                     # or tensors; either modality alone
    out.joint_emb, out.video_emb, out.audio_emb                  # [B, E], L2-normalised
    out.joint_pooled, out.video_pooled, out.audio_pooled         # [B, D], mean-pooled tokens

Files are decoded with the training preprocessing (vaemo_dist/data/decode_pyav.py): the centred
window of `inputs.video.frames` frames, centre crop + resize + normalise, and the log-mel window
centred on that video window. Audio comes from a sibling `<stem>.flac` / `<stem>.wav` when there is
one (the layout of our shards), else from the file's own audio track (AAC in an mp4, say). Audio at
another sample rate is resampled with FFmpeg's resampler (libswresample) to `inputs.audio.sample_rate`;
the training data path itself never resamples.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaemo_dist.export import CONFIG, FORMAT, WEIGHTS, ExportError, is_decoder_key, model_config_from
from vaemo_dist.model.vaemo import EncoderOutput, VAEmoModel

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".flv", ".m4v")
AUDIO_EXTS = (".flac", ".wav", ".mp3", ".m4a", ".aac", ".ogg", ".opus")
SIBLING_AUDIO_EXTS = (".flac", ".wav")

PathLike = str | Path
MediaArg = torch.Tensor | PathLike | Sequence[PathLike] | None


# --------------------------------------------------------------------------------------------
# Decoding files with the training preprocessing


def audio_source(path: PathLike) -> Path:
    """Where the audio of media file `path` comes from: a sibling .flac/.wav, else the file itself."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_EXTS:
        for ext in SIBLING_AUDIO_EXTS:
            sibling = path.with_suffix(ext)
            if sibling.is_file():
                return sibling
    return path


def _sidecar_meta(path: Path) -> dict[str, Any]:
    """A sibling `<stem>.json` (frames, duration), as our shards carry; {} when there is none."""
    meta_file = path.with_suffix(".json")
    if not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def decode_audio(key: str, data: bytes, cfg: Any, duration: Any = None) -> np.ndarray:
    """Mono float32 waveform at cfg.sample_rate. At that rate this is exactly the training decoder;
    at any other rate the stream is resampled by libswresample, then channels are averaged."""
    import av

    from vaemo_dist.data.decode_pyav import _decode_audio
    from vaemo_dist.data.types import DecodeError

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise DecodeError(key, "audio: no audio stream (and no sibling .flac/.wav)")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            if rate == cfg.sample_rate:
                return _decode_audio(key, data, cfg, duration)
            # Keep the channel layout through the resampler; average to mono afterwards, as training does.
            resampler = av.AudioResampler(format="fltp", rate=cfg.sample_rate)
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray() for f in resampler.resample(None)]
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(key, f"audio: decoding failed ({type(e).__name__}: {e})") from e
    if not chunks:
        raise DecodeError(key, "audio: no decodable samples")
    wave = np.concatenate(chunks, axis=1).astype(np.float32).mean(axis=0, dtype=np.float32)
    if wave.size == 0:
        raise DecodeError(key, "audio: no decodable samples")
    return wave


def decode_media(video: PathLike | None, audio: PathLike | None, inputs: Any) -> tuple[torch.Tensor | None,
                                                                                      torch.Tensor | None]:
    """Decode one clip's files into model inputs: video [3, T, H, W] and audio [1, F, M], normalised.

    `audio` may be the video file itself (its sibling .flac/.wav or own track is used). With both, the
    audio window is centred on the sampled video window, as in training; audio alone is centred in
    the recording. Raises DecodeError (vaemo_dist.data.types) for media it cannot use.
    """
    from vaemo_dist.data.decode_pyav import _audio_tensor, _decode_video, _video_tensor
    from vaemo_dist.data.types import DecodeError

    if video is None and audio is None:
        raise ValueError("decode_media needs a video file, an audio file or both")
    video_t = audio_t = None
    centre_s: float | None = None
    if video is not None:
        path = Path(video)
        meta = _sidecar_meta(path)
        promised = meta.get("frames") if isinstance(meta.get("frames"), int) else None
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DecodeError(str(path), f"cannot read ({e})") from e
        frames, indices, fps, _ = _decode_video(str(path), data, inputs.video, promised)
        video_t = _video_tensor(frames, inputs.video)
        centre_s = (indices[0] + indices[-1] + 1) / 2.0 / fps  # as vaemo_dist.data.decode_pyav does
    if audio is not None:
        path = audio_source(audio)
        meta = _sidecar_meta(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DecodeError(str(path), f"cannot read ({e})") from e
        wave = decode_audio(str(path), data, inputs.audio, meta.get("duration"))
        if centre_s is None:
            centre_s = wave.size / inputs.audio.sample_rate / 2.0
        audio_t = _audio_tensor(wave, inputs.audio, centre_s)
    return video_t, audio_t


# --------------------------------------------------------------------------------------------
# The encoder


def strip_decoder(model: VAEmoModel) -> VAEmoModel:
    """Remove the reconstruction decoder (modules, parameters, buffers): `encode` never uses it, and
    a decoder left with random weights would be a trap."""
    names = [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]
    for name in names:
        if is_decoder_key(name) or is_decoder_key(name + "."):
            delattr(model, name)
    for name in ("dec_video_pos", "dec_audio_pos"):
        if hasattr(model, name):
            delattr(model, name)
    return model


class Encoder(nn.Module):
    """A pretrained VAEmo encoder in eval mode: `encode` gives joint and per-modality embeddings."""

    def __init__(self, model: VAEmoModel, config: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.inputs = model.inputs

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


def _as_paths(x: MediaArg) -> list[PathLike] | None:
    if x is None or isinstance(x, torch.Tensor):
        return None
    if isinstance(x, (str, Path)):
        return [x]
    return list(x)


def from_pretrained(folder: PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Encoder:
    """Load an exported encoder (vaemo-export) in eval mode, gradients off."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG, folder / WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ExportError(f"{folder} is not an exported model (needs {CONFIG} and {WEIGHTS}; "
                          "see vaemo-export)")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise ExportError(f"{config_file}: format {config.get('format')!r}, expected {FORMAT!r}")
    cfg = model_config_from(config)
    model = VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                       init_temperature=cfg.loss.init_temperature)
    weights = load_file(str(weights_file))
    if not any(is_decoder_key(k) for k in weights):
        strip_decoder(model)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"{weights_file} does not fit the architecture in {CONFIG}: missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.requires_grad_(False)
    return Encoder(model, config).to(device=device, dtype=dtype).eval()
