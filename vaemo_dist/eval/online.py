"""Online evaluation during pretraining: cheap figures on held-out labelled clips every `eval.every` steps.

Which clips (`eval_set`): synthetic ones only when training reads synthetic ones. `eval.shards: auto`
(the default) is the synthetic held-out corpus when data.shards is the synthetic corpus (or stage 2
describes it); with the user's shards, `eval.holdout` (a fraction or a count) splits held-out clips off
the training shards by speaker (`ensure_holdout`: `<run>/holdout.json`; the training loader skips those
keys); with neither, evaluation is off and one start-up line says why. `eval.shards=<shards>` names
held-out shards; `eval.shards=synthetic` is honoured with any training data. The set's name is in every
evaluation log line, every evaluation record (`eval/set`), the pictures' titles and the curves.

* Probe (`eval/probe_uar`, `eval/probe_war`): features are the mean-pooled encoder tokens of each
  modality, concatenated ([video_pooled, audio_pooled], every token visible, `VAEmoModel.encode`);
  a closed-form ridge regression onto one-hot labels (features standardised on the fit half,
  penalty `eval.probe_l2` on the mean squared error) is fitted on one half of the clips and scored
  on the other. The halves are fixed: within each class, clips ordered by a hash of their key
  alternate between the two, so the split never changes between evaluations or runs.
* Retrieval (`eval/r1_v2a`, `eval/r1_a2v`): recall@1 of each clip's video embedding among the audio
  embeddings of all held-out clips, and the reverse (the contrastive heads, every token visible).
* Validation reconstruction (`eval/rec_video`, `eval/rec_audio`, and `eval/rec_loss` =
  loss.video_weight * rec_video + loss.audio_weight * rec_audio): the training forward and the
  stage-1 reconstruction MSE (`decoded_mse`: every masked patch under `model.decoder: full`, the
  sampled decoded ones under `cross`), with masks (and decoded patches) drawn from a dedicated
  generator seeded identically at every evaluation, so the figures compare across steps and the
  training RNG stream is not touched.
* Zero-shot (stage 2, a model with a text head: `eval/zero_shot_uar`, `eval/zero_shot_war`, and
  `eval/zero_shot_uar_audio` / `_video` for path 2): each held-out clip's joint (audio, visual)
  embedding against the class prompts of `vaemo_dist.text.synthetic.class_prompts`, projected by the
  current text head at each evaluation. The prompts are embedded by the frozen text encoder once,
  before training (`prepare_zero_shot`, called by launchers/stage2.py per node), so no text model is
  loaded mid-run. Needs the names of the held-out labels (`eval.class_names`, the held-out manifest's
  `class_names`, or the synthetic corpus's own); skipped otherwise.
* Pictures: on the main rank, a PNG of input / masked / reconstruction of the first
  `eval.pictures` clips (`vaemo_dist/eval/pictures.py`) under `<run>/pictures/`.

Every rank runs the same evaluation on the same clips, so collectives inside the model (tensor
parallelism, ZeRO-3 gathers) stay matched; only the main rank writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaemo_dist.config import Config
from vaemo_dist.data.holdout import (  # noqa: F401 - the split is data (layer 1); its names stay here too
    HOLDOUT_FILE,
    Holdout,
    HoldoutError,
    ensure_holdout,
    holdout_amount,
    holdout_path,
    redact_spec,
    run_dir_of,
    split_holdout,
    training_urls,
)
from vaemo_dist.data.holdout import training_data_name as _training_data
from vaemo_dist.eval.metrics import classification_metrics
from vaemo_dist.model.vaemo import ModelOutput, VAEmoModel
from vaemo_dist.objectives.stage1 import decoded_mse
from vaemo_dist.train.metrics import log_pictures  # noqa: F401 - its home is train.metrics

log = logging.getLogger(__name__)

METRIC_NAMES = ("eval/probe_uar", "eval/probe_war", "eval/r1_v2a", "eval/r1_a2v", "eval/rec_loss",
                "eval/rec_video", "eval/rec_audio")
ZERO_SHOT_NAMES = ("eval/zero_shot_uar", "eval/zero_shot_war", "eval/zero_shot_uar_audio",
                   "eval/zero_shot_uar_video")  # stage 2 only
PICTURES_DIR = "pictures"
MASK_SEED = 0x5EED  # offset of the validation masks' seed from train.seed
ZERO_SHOT_PROMPTS = "zero_shot_prompts.safetensors"  # stage 2: class prompts, embedded before training


# --------------------------------------------------------------------------------------------
# Which held-out clips


@dataclass(frozen=True)
class EvalSet:
    """The held-out clips online evaluation uses (`eval_set`): `kind` "synthetic" (the synthetic held-out
    corpus), "shards" (eval.shards), "holdout" (eval.holdout of the training shards) or "off"; `name`,
    said in every evaluation log line, metrics record (`eval/set`) and curve title; `why`: for "off",
    why, and how to turn evaluation on (the one start-up line)."""

    kind: str
    name: str
    why: str = ""


def trains_on_synthetic(cfg: Config) -> bool:
    """Whether training reads synthetic clips: `data.shards: synthetic` (stage 1: the synthetic corpus;
    stage 2: the synthetic described set, templated descriptions of it). A folder the user names is the
    user's data."""
    return cfg.data.shards == "synthetic"


def eval_set(cfg: Config) -> EvalSet:
    """Which held-out clips `eval.shards` / `eval.holdout` mean for this config (eval.every aside).

    auto: the synthetic held-out corpus when training reads synthetic clips (and no eval.holdout), else
    eval.holdout of the training shards, else no evaluation. "synthetic" is honoured whatever training
    reads (and named synthetic); anything else is the user's held-out shards."""
    e = cfg.eval
    if e.shards == "synthetic" or (e.shards == "auto" and not e.holdout and trains_on_synthetic(cfg)):
        return EvalSet("synthetic", f"synthetic held-out ({e.classes or cfg.data.synth.classes} classes)")
    if e.shards != "auto":
        return EvalSet("shards", redact_spec(e.shards))
    if e.holdout:
        return EvalSet("holdout", f"held-out {holdout_amount(e.holdout)} of {_training_data(cfg)}")
    return EvalSet("off", "", why=(
        f"online evaluation is off: training on your own shards (data.shards={_training_data(cfg)}) with "
        "eval.shards=auto and no eval.holdout, and synthetic held-out clips would say nothing about them. "
        "Turn it on with eval.holdout=0.1 (10% of the training clips held out by speaker where the clips "
        "have one, never trained on) or eval.shards=<your held-out shards>"))


def heldout_seed(cfg: Config) -> int:
    """The synthetic held-out corpus's seed: never the training corpus's, so its clips are unseen."""
    return cfg.data.synth.seed + 1


def heldout_dir(cfg: Config) -> Path:
    """Where the synthetic held-out corpus lives: next to `data.synth.dir`, named by seed and size."""
    synth = Path(cfg.data.synth.dir)
    classes = cfg.eval.classes or cfg.data.synth.classes
    return synth.parent / f"{synth.name}-heldout" / f"seed{heldout_seed(cfg)}-{cfg.eval.clips}-c{classes}"


def prepare_online_eval(cfg: Config, progress: bool = False) -> None:
    """What online evaluation needs before training, once per node (local rank 0): the synthetic
    held-out corpus when that is the set (concurrent builders take turns on a lock), or the held-out
    split of the training shards (`<run>/holdout.json`). Nothing when evaluation is off."""
    if cfg.eval.every <= 0:
        return
    kind = eval_set(cfg).kind
    if kind == "synthetic":
        from vaemo_dist.text.retrieval import heldout_corpus

        heldout_corpus(cfg, heldout_dir(cfg), seed=heldout_seed(cfg), clips=cfg.eval.clips,
                       classes=cfg.eval.classes, progress=progress)
    elif kind == "holdout" and cfg.data.shards != "synthetic":  # which synthetic set a stage reads: the
        ensure_holdout(cfg)  # trainer knows (its shard list), and splits that one


def heldout_class_names(cfg: Config) -> list[str] | None:
    """Names of the held-out labels 0, 1, ... for zero-shot prompts: `eval.class_names`, else the
    synthetic corpus's own names when the held-out corpus has the training corpus's classes (with
    another count, label k sits elsewhere on the generator's cue scale, so the names do not carry
    over), else the `class_names` of the held-out shards' manifest (eval.shards, or data.shards for
    eval.holdout); None when unknown."""
    if cfg.eval.class_names:
        return list(cfg.eval.class_names)
    kind = eval_set(cfg).kind
    if kind == "synthetic":
        if cfg.eval.classes not in (0, cfg.data.synth.classes):
            return None
        from vaemo_dist.data.synth import class_name

        return [class_name(c) for c in range(cfg.data.synth.classes)]
    if kind == "off" or (kind == "holdout" and cfg.data.shards == "synthetic"):
        return None
    from vaemo_dist.data.shards import shard_manifest

    manifest = shard_manifest(cfg.eval.shards if kind == "shards" else cfg.data.shards)
    names = manifest.get("class_names") if manifest else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def zero_shot_prompts_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / ZERO_SHOT_PROMPTS


def prepare_zero_shot(cfg: Config, run_dir: str | Path, encoder_name: str,
                      encoder: Any = None) -> Path | None:
    """Embed the held-out labels' class prompts with the frozen text encoder that embedded the
    descriptions (`encoder_name`; `encoder`: that model already loaded) into `<run>/zero_shot_prompts
    .safetensors`. Call once per node before training (a missing model fails the launch, not an
    evaluation hours in); an up-to-date file is kept. None when zero-shot does not apply."""
    names = heldout_class_names(cfg)
    if not (cfg.eval.every > 0 and cfg.eval.zero_shot and names):
        return None
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = zero_shot_prompts_path(run_dir)
    meta = {"names": json.dumps(names), "encoder": encoder_name}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        if all(stored.get(k) == v for k, v in meta.items()):
            return path
    from vaemo_dist.text.encode import load_text_encoder
    from vaemo_dist.text.retrieval import class_prompt_embeddings

    per_class = class_prompt_embeddings(names, encoder or load_text_encoder(encoder_name))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # several nodes may write it at once
    save_file({"prompts": torch.cat(per_class)}, str(tmp),
              metadata={**meta, "counts": json.dumps([len(p) for p in per_class])})
    os.replace(tmp, path)
    return path


def load_online_heldout(cfg: Config, run_dir: str | Path | None = None, holdout: Holdout | None = None,
                        urls: list[str] | None = None
                        ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, labels [N] (-1 unknown), video [N, ...], audio [N, ...]) of the first `eval.clips`
    held-out clips of `eval_set(cfg)`, decoded with the training preprocessing, in key order.
    eval.holdout: the clips of `holdout` (default: `ensure_holdout(cfg, run_dir, urls)`) in the training
    shards `urls` (default: data.shards expanded)."""
    from vaemo_dist.data.shards import expand_shards
    from vaemo_dist.text.retrieval import heldout_corpus, load_clips

    e = cfg.eval
    chosen = eval_set(cfg)
    if chosen.kind == "synthetic":
        synth = heldout_corpus(cfg, heldout_dir(cfg), seed=heldout_seed(cfg), clips=e.clips,
                               classes=e.classes)  # no-op if built
        return load_clips(expand_shards(synth.dir), cfg, limit=e.clips)
    if chosen.kind == "shards":
        return load_clips(expand_shards(e.shards, key="eval.shards"), cfg, limit=e.clips)
    if chosen.kind == "holdout":
        urls = urls or training_urls(cfg)
        holdout = holdout or ensure_holdout(cfg, run_dir, urls)
        return load_clips(urls, cfg, keys=holdout.keys, limit=e.clips)
    raise ValueError(chosen.why)


# --------------------------------------------------------------------------------------------
# Probe and retrieval (plain functions of features, so they can be checked on their own)


def probe_split(keys: Sequence[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, class-stratified halves (fit, score) of the labelled clips (label >= 0): within each
    class, clips ordered by CRC32 of their key go alternately to fit and score. Depends only on keys
    and labels, not on the order the clips were read in."""
    labels = np.asarray(labels)
    fit: list[int] = []
    score: list[int] = []
    for c in np.unique(labels[labels >= 0]):
        members = sorted(np.flatnonzero(labels == c), key=lambda i: (zlib.crc32(keys[i].encode()), keys[i]))
        fit.extend(members[0::2])
        score.extend(members[1::2])
    return np.array(sorted(fit), dtype=np.int64), np.array(sorted(score), dtype=np.int64)


def ridge_probe(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, num_classes: int,
                l2: float) -> np.ndarray:
    """Predicted classes of x_test from a ridge regression onto one-hot labels fitted on (x_fit, y_fit):
    minimises mean ||z W + b - onehot||^2 + l2 ||W||^2 over standardised features z (b unpenalised)."""
    x = np.asarray(x_fit, dtype=np.float64)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / std
    target = np.eye(num_classes)[np.asarray(y_fit, dtype=np.int64)]
    bias = target.mean(axis=0)  # z is centred, so the unpenalised bias decouples from W
    centred = target - bias
    n, d = z.shape
    if n <= d:  # dual form: an n x n system (the usual case, few clips and wide features)
        gram = z @ z.T / n + l2 * np.eye(n)
        weight = z.T @ _solve(gram, centred / n)
    else:
        gram = z.T @ z / n + l2 * np.eye(d)
        weight = _solve(gram, z.T @ centred / n)
    scores = ((np.asarray(x_test, dtype=np.float64) - mean) / std) @ weight + bias
    return scores.argmax(axis=1)


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # l2 = 0 with collinear features: least squares instead
        return np.linalg.lstsq(a, b, rcond=None)[0]


def probe_scores(features: np.ndarray, labels: np.ndarray, keys: Sequence[str],
                 l2: float) -> tuple[float, float]:
    """(UAR, WAR) of the ridge probe on the fixed split; NaN when the clips cannot support a probe
    (fewer than two classes with a clip in each half)."""
    labels = np.asarray(labels)
    fit, score = probe_split(keys, labels)
    if len(score) == 0 or len(np.unique(labels[fit])) < 2:
        return float("nan"), float("nan")
    num_classes = int(labels.max()) + 1
    pred = ridge_probe(features[fit], labels[fit], features[score], num_classes, l2)
    m = classification_metrics(labels[score], pred, num_classes)
    return float(m["uar"]), float(m["war"])


def recall_at_1(query: torch.Tensor, keys: torch.Tensor) -> float:
    """Share of rows i whose most similar row of `keys` is row i (ties go to the lower index, so
    collapsed embeddings score 1/N, not 1)."""
    hit = (query.float() @ keys.float().T).argmax(dim=1)
    return (hit == torch.arange(query.shape[0])).float().mean().item()


# --------------------------------------------------------------------------------------------
# The evaluator


def unwrap_vaemo(model: torch.nn.Module) -> VAEmoModel:
    """The VAEmoModel inside a DeepSpeed engine (`.module`) and/or a stage-2 model (`.vaemo`)."""
    from vaemo_dist.model.text_head import VAEMO

    inner: Any = model
    for _ in range(3):
        if isinstance(inner, VAEmoModel):
            return inner
        for name in ("module", VAEMO):  # DeepSpeed's engine holds the model as `.module`
            if getattr(inner, name, None) is not None:
                inner = getattr(inner, name)
                break
    if not isinstance(inner, VAEmoModel):
        raise TypeError(f"online evaluation needs a VAEmoModel (or a wrapper of one), "
                        f"got {type(model).__name__}")
    return inner


class OnlineEvaluator:
    """Loads the held-out clips once (CPU tensors) and evaluates a model on them with `run`."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, run_dir: str | Path,
                 is_main: bool, holdout: Holdout | None = None, urls: list[str] | None = None) -> None:
        """`holdout`: eval.holdout's split when the caller has it (default: `ensure_holdout`); `urls`:
        the training shards it is split from (default: data.shards expanded)."""
        self.cfg, self.device, self.dtype, self.is_main = cfg, torch.device(device), dtype, is_main
        self.pictures_dir = Path(run_dir) / PICTURES_DIR
        self.mask_seed = cfg.train.seed + MASK_SEED
        self.prompts_path = zero_shot_prompts_path(run_dir)
        self._prompts: tuple[torch.Tensor, list[int]] | None = None  # (flat [P, T], prompts per class)
        self._said_why = False
        start = time.perf_counter()
        chosen = eval_set(cfg)
        if chosen.kind == "off":
            raise ValueError(chosen.why)
        if chosen.kind == "holdout":
            holdout = holdout or ensure_holdout(cfg, run_dir, urls, write=is_main)
        # The name of the held-out set: in every log line, metrics record (eval/set) and picture title.
        self.set_name = holdout.name() if chosen.kind == "holdout" and holdout is not None else chosen.name
        self.keys, self.labels, self.video, self.audio = load_online_heldout(cfg, run_dir, holdout, urls)
        if len(self.keys) < 2:
            raise ValueError(f"online evaluation found {len(self.keys)} held-out clips in {self.set_name}; "
                             "it needs at least 2")
        if is_main:
            labelled = int((self.labels >= 0).sum())
            log.info("online evaluation every %d steps on %s: %d clips (%d labelled), loaded in %.1fs",
                     cfg.eval.every, self.set_name, len(self.keys), labelled, time.perf_counter() - start)
            if chosen.kind == "synthetic" and not trains_on_synthetic(cfg):
                log.warning("eval.shards=synthetic: the evaluation figures are on synthetic held-out clips, "
                            "not on your data (training reads data.shards=%s)", _training_data(cfg))

    def due(self, step: int) -> bool:
        """Whether `run` is meant for this step: eval.every > 0 and the step a multiple of it, or the
        last step (train.steps), so every run ends with an evaluation."""
        every = self.cfg.eval.every
        return every > 0 and step > 0 and (step % every == 0 or step == self.cfg.train.steps)

    def picture_path(self, step: int) -> Path:
        return self.pictures_dir / f"recon_step{step:08d}.png"

    def run(self, model: torch.nn.Module, step: int,
            train_flops: float | None = None) -> tuple[dict[str, Any], list[Path]]:
        """Evaluate `model` (a VAEmoModel, possibly inside a DeepSpeed engine or a stage-2 model) on
        the held-out clips: the metrics (METRIC_NAMES, `eval/time_s`, `eval/set` (the set's name, a
        string), and `train_flops` when given) and the PNGs written (main rank only). Every rank must
        call it at the same step. The model's train/eval modes and the global RNG states are as they
        were afterwards."""
        start = time.perf_counter()
        vaemo = unwrap_vaemo(model)
        modes = [(m, m.training) for m in vaemo.modules()]
        # fork_rng: whatever the model might draw from the global generators is given back afterwards.
        cuda = []
        if self.device.type == "cuda":
            cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        vaemo.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                features, video_emb, audio_emb, joint_emb = self._embed(vaemo)
                rec_video, rec_audio, shown = self._reconstruct(vaemo)
                zero_shot = self._zero_shot(model, joint_emb, audio_emb, video_emb)
        finally:
            for m, mode in modes:  # per module: a stage-2 model may keep frozen parts in eval mode
                m.training = mode

        uar, war = probe_scores(features.numpy(), self.labels.numpy(), self.keys, self.cfg.eval.probe_l2)
        w = self.cfg.loss
        metrics = {
            "eval/probe_uar": uar,
            "eval/probe_war": war,
            "eval/r1_v2a": recall_at_1(video_emb, audio_emb),
            "eval/r1_a2v": recall_at_1(audio_emb, video_emb),
            "eval/rec_loss": w.video_weight * rec_video + w.audio_weight * rec_audio,
            "eval/rec_video": rec_video,
            "eval/rec_audio": rec_audio,
            **zero_shot,
        }
        paths: list[Path] = []
        if shown is not None:
            from vaemo_dist.eval.pictures import save_reconstruction_grid

            video, audio, out = shown
            n = video.shape[0]
            paths.append(save_reconstruction_grid(
                video, audio, out, self.cfg.inputs, self.picture_path(step), max_clips=n,
                norm_pix=self.cfg.model.norm_pix_video, norm_pix_audio=self.cfg.model.norm_pix_audio,
                keys=self.keys[:n], labels=self.labels[:n].tolist(),
                title=f"step {step}: reconstructions of {self.set_name}"))
        metrics["eval/time_s"] = time.perf_counter() - start
        if train_flops is not None:
            metrics["train_flops"] = float(train_flops)
        if self.is_main:
            shown_figures = ", ".join(f"{k.removeprefix('eval/')} {metrics[k]:.4g}" for k in
                                      ("eval/probe_uar", "eval/r1_v2a", "eval/r1_a2v", "eval/rec_loss",
                                       "eval/zero_shot_uar") if k in metrics)
            log.info("step %d evaluation on %s: %s (%.1fs)", step, self.set_name, shown_figures,
                     metrics["eval/time_s"])
        metrics["eval/set"] = self.set_name
        return metrics, paths

    def _batches(self) -> Any:
        bs = self.cfg.eval.batch_size
        for i in range(0, len(self.keys), bs):
            yield (self.video[i : i + bs].to(self.device, self.dtype),
                   self.audio[i : i + bs].to(self.device, self.dtype))

    def _embed(self, vaemo: VAEmoModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probe features, video, audio and joint embeddings) of every held-out clip, on the CPU."""
        feats, v_emb, a_emb, j_emb = [], [], [], []
        for video, audio in self._batches():
            enc = vaemo.encode(video, audio)
            feats.append(torch.cat([enc.video_pooled, enc.audio_pooled], dim=1).float().cpu())
            v_emb.append(enc.video_emb.float().cpu())
            a_emb.append(enc.audio_emb.float().cpu())
            j_emb.append(enc.joint_emb.float().cpu())
        return torch.cat(feats), torch.cat(v_emb), torch.cat(a_emb), torch.cat(j_emb)

    def _zero_shot(self, model: torch.nn.Module, joint: torch.Tensor, audio: torch.Tensor,
                   video: torch.Tensor) -> dict[str, float]:
        """Zero-shot UAR/WAR of a stage-2 model (one with `text_head` / `embed_text`); {} otherwise.
        Every rank decides alike (same config, same prompts file), so the text head's forward, a
        collective under ZeRO-3, runs on all ranks or none."""
        inner = getattr(model, "module", model)  # a DeepSpeed engine's module
        head = getattr(inner, "text_head", None)
        if head is None or not self.cfg.eval.zero_shot:
            return {}
        prompts = self._load_prompts(head)
        if prompts is None:
            return {}
        from vaemo_dist.text.retrieval import class_embeddings, zero_shot_scores

        flat, counts = prompts
        param = head.log_logit_scale
        text = inner.embed_text(flat.to(param.device, param.dtype)).float().cpu()
        class_emb = class_embeddings(list(text.split(counts)))
        c = len(counts)
        known = (self.labels >= 0) & (self.labels < c)
        labels = self.labels[known].numpy()
        out = {}
        for suffix, clips in (("", joint), ("_audio", audio), ("_video", video)):
            pred = zero_shot_scores(clips[known], class_emb).argmax(dim=1).numpy()
            m = classification_metrics(labels, pred, c)
            out[f"eval/zero_shot_uar{suffix}"] = float(m["uar"])
            if not suffix:
                out["eval/zero_shot_war"] = float(m["war"])
        return out

    def _load_prompts(self, head: torch.nn.Module) -> tuple[torch.Tensor, list[int]] | None:
        """The prepared prompt embeddings (`prepare_zero_shot`), read once; None, said once, when
        there are none or they do not fit the head."""
        if self._prompts is not None:
            return self._prompts
        why = ""
        if not self.prompts_path.is_file():
            why = (f"no {self.prompts_path.name} in the run folder: the names of the held-out labels are "
                   "unknown (set eval.class_names, or eval.classes to data.synth.classes), or the launcher "
                   "did not call prepare_zero_shot")
        else:
            from safetensors import safe_open

            with safe_open(str(self.prompts_path), "pt") as f:
                flat, counts = f.get_tensor("prompts"), json.loads(f.metadata()["counts"])
            width = next(m.in_features for m in head.modules() if isinstance(m, torch.nn.Linear))
            if flat.shape[1] != width:
                why = (f"{self.prompts_path} holds {flat.shape[1]}-d prompt embeddings, the text head takes "
                       f"{width}-d ones (another text encoder?)")
            else:
                self._prompts = flat, counts
        if why and self.is_main and not self._said_why:
            log.warning("zero-shot evaluation skipped: %s", why)
        self._said_why = True
        return self._prompts

    def _reconstruct(
        self, vaemo: VAEmoModel
    ) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor, ModelOutput] | None]:
        """Validation reconstruction losses, as the training objective takes them (`decoded_mse`):
        means over every masked patch of every clip under `model.decoder: full`, over the decoded
        (sampled masked) patches under `cross`; and the inputs and outputs of the first `eval.pictures`
        clips on the main rank."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.mask_seed)  # the same masks at every evaluation
        want = self.cfg.eval.pictures if self.is_main else 0
        sums = torch.zeros(2, dtype=torch.float64)
        kept: list[tuple[torch.Tensor, torch.Tensor, ModelOutput]] = []
        held = 0
        for video, audio in self._batches():
            out = vaemo(video, audio, generator=generator)
            b = video.shape[0]
            # Every clip masks (and the cross decoder decodes) the same number of tokens, so batch means
            # weighted by size give the mean.
            losses = torch.stack([
                decoded_mse(out.video_pred, out.video_target, out.video_mask, out.video_decoded),
                decoded_mse(out.audio_pred, out.audio_target, out.audio_mask, out.audio_decoded)])
            sums += b * losses.double().cpu()
            if held < want:
                n = min(b, want - held)
                kept.append((video[:n].float().cpu(), audio[:n].float().cpu(), _head(out, n)))
                held += n
        rec_video, rec_audio = (sums / len(self.keys)).tolist()
        if not kept:
            return rec_video, rec_audio, None
        video = torch.cat([k[0] for k in kept])
        audio = torch.cat([k[1] for k in kept])
        return rec_video, rec_audio, (video, audio, _concat([k[2] for k in kept]))


def _head(out: ModelOutput, n: int) -> ModelOutput:
    """The first n clips of a model output, on the CPU, floating tensors in float32 (None stays None)."""
    fields = {}
    for f in dataclasses.fields(out):
        t = getattr(out, f.name)
        if t is None:
            fields[f.name] = None
            continue
        t = t.detach()
        t = t if t.dim() == 0 else t[:n]
        fields[f.name] = (t.float() if t.is_floating_point() else t).cpu()
    return ModelOutput(**fields)


def _concat(outs: list[ModelOutput]) -> ModelOutput:
    if len(outs) == 1:
        return outs[0]
    fields = {}
    for f in dataclasses.fields(ModelOutput):
        parts = [getattr(o, f.name) for o in outs]
        if any(p is None for p in parts):  # hand-built outputs (decoded indices left out): every patch
            fields[f.name] = None
        else:
            fields[f.name] = parts[0] if parts[0].dim() == 0 else torch.cat(parts)
    return ModelOutput(**fields)
