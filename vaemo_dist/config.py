"""Typed configuration: dataclasses, YAML files, dotted command-line overrides.

Every value a run uses lives here. A YAML file may name a `base:` file (relative path), or a list
of them, that it extends. Overrides look like `model.depth=8` and are parsed as YAML scalars. Unknown keys and
values of the wrong type fail at start-up with a message naming the key and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


# --------------------------------------------------------------------------------------------
# The tree


@dataclass
class VideoInput:
    frames: int = 16  # frames sampled per clip
    stride: int = 4  # source frames between sampled frames
    size: int = 160  # square side after resize + centre crop
    tubelet: int = 2  # frames per video token
    patch: int = 16  # pixels per token side
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class AudioInput:
    sample_rate: int = 16000
    n_mels: int = 128
    frames: int = 256  # spectrogram frames (time)
    hop_ms: float = 10.0
    win_ms: float = 25.0
    patch: int = 16
    # Log-mel normalisation: dataset statistics of our log-mel (natural log of power through
    # area-normalised Slaney mel filters). Defaults measured on the synthetic corpus; measure yours.
    mean: float = -8.56
    std: float = 3.13


@dataclass
class InputConfig:
    video: VideoInput = field(default_factory=VideoInput)
    audio: AudioInput = field(default_factory=AudioInput)

    @property
    def video_grid(self) -> tuple[int, int, int]:
        v = self.video
        return (v.frames // v.tubelet, v.size // v.patch, v.size // v.patch)

    @property
    def audio_grid(self) -> tuple[int, int]:
        a = self.audio
        return (a.frames // a.patch, a.n_mels // a.patch)


@dataclass
class SynthConfig:
    """The synthetic corpus built on first use when `data.shards: synthetic`."""

    dir: str = "data_cache/synthetic"
    clips: int = 256
    clips_per_shard: int = 16
    classes: int = 4
    size: int = 128  # stored frame side (the decoder resizes to inputs.video.size)
    duration: float = 3.2  # seconds
    codec: Literal["h264", "vp9"] = "h264"
    seed: int = 0
    # What the hidden class drives. "all": colour tint, voice pitch, head-motion speed and amplitude,
    # syllable rate (a random encoder's mean-pooled tokens already separate 4 classes). "dynamics":
    # only syllable rate (voice and mouth) and head-motion speed; tint, pitch and motion amplitude
    # are per-clip draws independent of the class, so a probe must read rhythm, not averages.
    cues: Literal["all", "dynamics"] = "all"
    # Longest GOP in frames of the stored video (a keyframe at least this often; 1: all intra), so a
    # window decodes from the keyframe before it (data/seek.py); 0: the encoder's default (x264: 250).
    keyint: int = 0


@dataclass
class DataConfig:
    # "synthetic", a brace pattern ("s3://b/train-{000000..000127}.tar"), a comma list, or a folder.
    shards: str = "synthetic"
    synth: SynthConfig = field(default_factory=SynthConfig)
    # auto: DALI on a GPU (NVDEC video, GPU log-mel), PyAV on CPU; dali: DALI also on CPU (VP9/MJPEG only).
    decoder: Literal["auto", "dali", "pyav"] = "auto"
    dali_threads: int = 0  # DALI CPU threads; 0: min(4, cores)
    batch_size: int = 8  # micro-batch per rank
    num_workers: int = 1  # DataLoader workers per rank
    shuffle_seed: int = 0
    resampled: bool = False  # draw shards with replacement per slot (seeded, resumable) instead of epochs
    max_skip_fraction: float = 0.1  # fail if more than this fraction of samples is undecodable
    s3_endpoint: str = ""  # S3 endpoint URL; "" = AWS_ENDPOINT_URL or AWS. Credentials: AWS env/profile
    io_retries: int = 10  # botocore attempts per storage request (then reopen-and-seek with backoff)
    # Total budget of one storage operation (botocore retries and our reopens together): a store that
    # does not answer within it ends the run with one line naming the URL and the endpoint.
    io_timeout_s: float = 300.0
    log_keys: str = ""  # debug: a folder; each rank appends the keys it trains on to keys-rank<R>.txt
    # Global batch (all data-parallel ranks x grad_accum); 0: not set. When set, it must equal
    # batch_size x grad_accum x data-parallel size, checked before any process group starts.
    global_batch_size: int = 0
    decode_timeout_s: float = 60.0  # one clip's decode longer than this is skipped as a hang
    # Clips shorter than min_clip_s are skipped; a clip shorter than the sampled window (but not than
    # this) repeats its last frame.
    min_clip_s: float = 0.5
    max_clip_s: float = 3600.0  # clips longer than this are skipped before decoding
    # Training samples per decoded clip (issue 19): repeat r samples the centred window moved by whole
    # strides (0, +1, -1, +2, ...) where the clip is long enough (masks differ per sample; DALI repeats
    # the same window). The R repeats of a batch of clips go to R consecutive
    # micro-batches, never two into one, so no contrastive denominator holds two repeats of a clip.
    repeats: int = 1
    # Where the PyAV path's preprocessing after decoding runs (issue 19): "loader" (the DataLoader workers:
    # swscale YUV -> RGB, crop, resize, normalise, log-mel), "device" (the workers only decode; the
    # trainer's device converts, resizes, normalises and makes the log-mel, vaemo_dist/data/finish.py),
    # or "auto": device on a GPU, loader on CPU. DALI always finishes on its own.
    finish: Literal["auto", "loader", "device"] = "auto"
    # With repeats > 1: repeats r > 0 crop their own square, its side drawn from [(1 - j) x, x] of the
    # frame's short side x and its place uniformly inside the frame (seeded by clip key and repeat, so
    # resume draws the same); 0: every repeat takes the centre square. PyAV only (DALI repeats the crop).
    crop_jitter: float = 0.0


@dataclass
class ModelConfig:
    # A preset fills in the sizes below; any size set explicitly wins. "custom": nothing filled in.
    preset: Literal["custom", "tiny", "small", "base", "large", "huge"] = "tiny"
    dim: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    embed_dim: int = 128  # contrastive projection size
    mask_ratio_video: float = 0.9
    mask_ratio_audio: float = 0.8
    # "separate": the shared encoder sees each modality's tokens on their own (no cross-modal
    # leak into the contrastive embeddings); "joint": one sequence of both modalities.
    fusion: Literal["separate", "joint"] = "separate"
    # Reconstruction targets normalised per patch (each patch by its own mean and std, as in MAE);
    # false: the globally normalised input itself. `norm_pix_loss_audio` sets the audio target apart
    # (null: as norm_pix_loss): per-patch normalisation turns near-silent log-mel patches (noise
    # floor, high bins) into unit-variance noise, which no model predicts (BENCHMARKS.md, stage 1).
    norm_pix_loss: bool = True
    norm_pix_loss_audio: bool | None = None
    # The reconstruction decoder. "full": self-attention blocks over every token of both modalities
    # (visible ones and mask tokens). "cross" (CrossMAE-style): only a sampled `decode_fraction` of each
    # modality's masked patches is reconstructed, by query tokens that cross-attend to the visible
    # tokens of both modalities (no self-attention among the queries); the loss is on those patches.
    decoder: Literal["full", "cross"] = "full"
    decode_fraction: float = 0.25  # "cross" only: share of each modality's masked patches decoded

    @property
    def norm_pix_video(self) -> bool:
        """Whether the video reconstruction target is per-patch normalised."""
        return self.norm_pix_loss

    @property
    def norm_pix_audio(self) -> bool:
        """Whether the audio reconstruction target is per-patch normalised."""
        return self.norm_pix_loss if self.norm_pix_loss_audio is None else self.norm_pix_loss_audio


# Preset values are applied under whatever the YAML or the command line sets explicitly.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=192, depth=4, heads=3, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                 embed_dim=128),
    "small": dict(dim=384, depth=12, heads=6, decoder_dim=256, decoder_depth=4, decoder_heads=8,
                  embed_dim=256),
    "base": dict(dim=768, depth=12, heads=12, decoder_dim=384, decoder_depth=4, decoder_heads=12,
                 embed_dim=512),
    "large": dict(dim=1024, depth=24, heads=16, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                  embed_dim=768),
    "huge": dict(dim=1280, depth=32, heads=16, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                 embed_dim=1024),
}


@dataclass
class LossConfig:
    video_weight: float = 1.0
    audio_weight: float = 1.0
    contrastive_weight: float = 0.01  # lambda
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    clip_grad: float = 1.0


@dataclass
class ProfileConfig:
    """A torch.profiler window over a few optimizer steps; traces to <run>/profile/ (one per rank)."""

    start_step: int = 0  # the first recorded step (1-based, as in metrics.jsonl); 0: off
    steps: int = 3  # steps recorded from start_step on
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that profile
    record_shapes: bool = False  # input shapes per op (key averages grouped by shape cost more)
    memory: bool = False  # allocations and frees per op (profile_memory)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps (the schedule spans these)
    stop_at: int = 0  # leave after this step with a checkpoint (time-sliced jobs); 0: run to `steps`
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: int = 1
    log_every: int = 1
    ckpt_every: int = 50
    keep_last: int = 2
    out_dir: str = "runs"
    run_name: str = "stage1-tiny"
    resume: str = ""  # "", "latest", or a checkpoint folder
    # Resuming onto a corpus other than the checkpoint's (its shard list's fingerprint differs): "keep"
    # refuses it; "reset" carries weights, optimizer and step and starts the data at the new corpus's start.
    resume_data: Literal["keep", "reset"] = "keep"
    # An existing run folder (out_dir/run_name) is refused without resume; overwrite moves it aside to
    # <run>.old-<timestamp> (never deleted) and starts a fresh run.
    overwrite: bool = False
    dist_timeout_s: int = 600  # collectives that wait longer than this fail (a dead or hung peer)
    # A step whose loss or gradient is not finite is skipped and counted; this many in a row stop
    # the run with an error.
    max_nonfinite_steps: int = 5
    # More DeepSpeed config, in DeepSpeed's own JSON keys, deep-merged into the config the trainer
    # generates (ZeRO offload, overlap_comm, bucket sizes, stage3_* knobs, communication_data_type,
    # flops_profiler, comms_logger, ...). DeepSpeed validates these keys; the ones derived from the
    # typed config above (DEEPSPEED_OWNED) are refused. Overrides reach nested keys:
    # train.deepspeed.zero_optimization.overlap_comm=true
    deepspeed: dict[str, Any] = field(default_factory=dict)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class ParallelConfig:
    tensor: int = 1  # megatron-core tensor parallel degree (divides heads, MLP width and world size)
    activation_checkpointing: bool = False  # recompute each transformer block in the backward pass
    # torch.compile each encoder and decoder block in place (after TP and activation checkpointing);
    # state-dict names, checkpoints and exports are unchanged. The first steps pay the compile time.
    compile: bool = False
    # Peak dense bf16 TFLOP/s of one device, for MFU; 0 = look the device name up (H100, H200, A100).
    peak_tflops: float = 0.0


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff a key is set
    project: str = "vaemo"
    entity: str = ""


@dataclass
class EvalConfig:
    """Online evaluation during pretraining (docs/scaling.md): every `every` steps, on held-out clips."""

    every: int = 0  # steps between evaluations; 0: off
    # Labelled held-out clips. "auto": the synthetic held-out corpus when training on the synthetic
    # corpus, else eval.holdout of the training shards, else no evaluation (one start-up line says why).
    # "synthetic": a corpus like data.synth with another seed, built on first use next to it;
    # otherwise shards as in data.shards (labels from their json).
    shards: str = "auto"
    # With the user's own training shards and no eval.shards: a fraction (< 1) or a count (>= 1) of the
    # training clips held out for evaluation, by speaker where the clips' json has one; those keys are
    # never trained on and the split is written to <run>/holdout.json. 0: no held-out split.
    holdout: float = 0.0
    clips: int = 64  # held-out clips used (probe: half fit, half scored; retrieval and rec loss: all)
    # Synthetic held-out classes; 0: as data.synth. More classes (e.g. 32) make neighbouring classes
    # close, so the probe does not saturate at chance-free 100% on the easy 4-class set.
    classes: int = 0
    batch_size: int = 16
    pictures: int = 4  # clips shown in the reconstruction PNG; 0: no pictures
    probe_l2: float = 1e-2  # ridge penalty of the closed-form linear probe
    # Stage 2 (a model with a text head): zero-shot classification of the held-out clips against
    # class prompts. Names of the held-out labels 0, 1, ...; empty: the synthetic corpus's own names,
    # known when the held-out set has data.synth's classes (eval.classes 0 or equal).
    zero_shot: bool = True
    class_names: list[str] = field(default_factory=list)


@dataclass
class Stage2Config:
    """Stage 2, knowledge injection: text descriptions aligned with the VA embeddings (docs/stage2.md)."""

    # A stage-1 (or stage-2) checkpoint to start from: a step folder, `<run>/checkpoints/latest`, the
    # checkpoints folder or the run folder (both meaning latest), any ZeRO stage; or an export folder
    # (vaemo-export output). "": random init.
    init_from: str = ""
    # data.shards is a described set (vaemo-describe output: media + <key>.desc.json), only read; or
    # "synthetic": templated descriptions of the data.synth corpus, built on first use in a cache folder
    # of stage 2's own (<parent of data.synth.dir>/stage2/<name>-described). describe_synthetic is
    # obsolete: ignored, with a warning, when data.shards names a described set.
    describe_synthetic: bool = False
    subset_fraction: float = 1.0  # synthetic: the share of the corpus to describe (seeded)
    subset_count: int = 0  # synthetic: describe this many clips instead (0: use subset_fraction)
    subset_seed: int = 0
    # Frozen text encoder: "all-MiniLM-L6-v2" (bundled, offline) or a local sentence-transformers folder.
    text_encoder: str = "all-MiniLM-L6-v2"
    # Precomputed description embeddings; "": <data.shards>/text_emb.safetensors when current, else
    # computed on first use into stage 2's own cache folder (never into the user's described set).
    text_embeddings: str = ""
    text_head_hidden: int = 0  # 0: linear text projection head; > 0: an MLP with this hidden width
    masked: bool = True  # align the embeddings of MAE-masked inputs (cheap); false: all tokens visible
    freeze_encoder: bool = False  # train only the text head (a baseline: no knowledge enters the encoder)
    joint_weight: float = 1.0  # path 1: text <-> joint VA embedding
    audio_weight: float = 0.5  # path 2: text <-> audio embedding
    video_weight: float = 0.5  # path 2: text <-> visual embedding
    stage1_weight: float = 0.0  # keep the stage-1 objective (loss.* weights) at this weight


@dataclass
class Config:
    inputs: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from an optional YAML file and `a.b=value` overrides, then validate it."""
    return config_from_dict(read_config_dict(path, overrides))


def read_config_dict(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of a YAML file (its `base:` files merged in) with `a.b=value` overrides set, not
    yet typed or validated (for callers that replace sections first, e.g. fine-tuning's model)."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.depth=8)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = _apply_model_preset(raw)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"config 'base:' cycle through {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:  # later bases win over earlier ones
        _deep_merge(merged, _read_yaml(path.parent / base, _seen + (path.resolve(),)))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _apply_model_preset(raw: dict[str, Any]) -> dict[str, Any]:
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    preset = model.get("preset", ModelConfig.preset)
    if preset in MODEL_PRESETS:
        raw = dict(raw)
        raw["model"] = {**MODEL_PRESETS[preset], **model}
    return raw


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{full}'.{hint} Valid keys in '{where or '<root>'}': "
                f"{', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, value in raw.items():
        full = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is dict:  # a free-form mapping handed on to a library (train.deepspeed)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return _free_form(value, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _free_form(value: Any, where: str) -> Any:
    """A copy of a free-form YAML value with string keys, as JSON would give it: YAML 1.1 reads `5e8`
    (no dot) as a string, where DeepSpeed's JSON examples (reduce_bucket_size: 5e8) mean a number."""
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"{where}: key {k!r} must be a string")
        return {k: _free_form(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_free_form(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
        number = float(value)
        return int(number) if number.is_integer() else number
    if value is not None and not isinstance(value, (str, int, float, bool)):
        # YAML dates, sets, ...: JSON has no such value; refused here, on every rank alike.
        raise ConfigError(f"{where}: {value!r} ({type(value).__name__}) is not a JSON value")
    return value


# --------------------------------------------------------------------------------------------
# DeepSpeed keys the trainer derives from the typed config (train/trainer.py: deepspeed_config), and
# the typed key to set instead. train.deepspeed may not set them: two sources of one value drift apart.

DEEPSPEED_OWNED: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "data.batch_size and train.grad_accum (check it with data.global_batch_size)",
    "gradient_clipping": "optim.clip_grad",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "bfloat16.enabled": "train.precision",  # DeepSpeed's older name of the bf16 section
    "fp16.enabled": "train.precision (fp32 or bf16)",
    "optimizer": "optim.* (the trainer builds torch AdamW itself)",
    "scheduler": "optim.lr, optim.min_lr and optim.warmup_steps (warmup + cosine)",
}


def check_deepspeed_extra(extra: dict[str, Any], where: str = "train.deepspeed") -> None:
    """Refuse keys of `extra` that the generated DeepSpeed config owns, naming the typed key to set."""
    for owned, instead in DEEPSPEED_OWNED.items():
        section, _, leaf = owned.rpartition(".")
        node = extra.get(section) if section else extra
        if section and section in extra and not isinstance(node, dict):
            raise ConfigError(f"{where}.{section}: expected a mapping of DeepSpeed keys, got {node!r} "
                              f"(its {leaf!r} comes from {instead})")
        if isinstance(node, dict) and leaf in node:
            raise ConfigError(f"{where}.{owned}: set {instead} instead")


# --------------------------------------------------------------------------------------------
# Validation: impossible combinations fail here, before any process group starts.


def validate(cfg: Config) -> None:
    v, a, m = cfg.inputs.video, cfg.inputs.audio, cfg.model
    _check(bool(cfg.data.shards.strip()), "data.shards",
           "is empty: set data.shards=<your shards> (vaemo-shard's output: OUT/manifest.json, a folder of "
           ".tar, a brace pattern or s3:// URLs), or data.shards=synthetic for the built-in corpus. The "
           "recipes in configs/recipes/ leave it for you to set")
    _check(v.frames % v.tubelet == 0, "inputs.video.frames",
           f"{v.frames} must be a multiple of inputs.video.tubelet ({v.tubelet})")
    _check(v.size % v.patch == 0, "inputs.video.size",
           f"{v.size} must be a multiple of inputs.video.patch ({v.patch})")
    _check(len(v.mean) == 3 and len(v.std) == 3, "inputs.video.mean/std", "need 3 values each")
    _check(a.frames % a.patch == 0, "inputs.audio.frames",
           f"{a.frames} must be a multiple of inputs.audio.patch ({a.patch})")
    _check(a.n_mels % a.patch == 0, "inputs.audio.n_mels",
           f"{a.n_mels} must be a multiple of inputs.audio.patch ({a.patch})")
    for key in ("mask_ratio_video", "mask_ratio_audio"):
        r = getattr(m, key)
        _check(0.0 <= r < 1.0, f"model.{key}", f"{r} must be in [0, 1)")
    _check(0.0 < m.decode_fraction <= 1.0, "model.decode_fraction",
           f"{m.decode_fraction} must be in (0, 1] (the share of masked patches the cross decoder predicts)")
    _check(m.dim % m.heads == 0, "model.heads", f"model.dim ({m.dim}) must be divisible by {m.heads}")
    _check(m.decoder_dim % m.decoder_heads == 0, "model.decoder_heads",
           f"model.decoder_dim ({m.decoder_dim}) must be divisible by {m.decoder_heads}")
    for key in ("dim", "depth", "heads", "decoder_dim", "decoder_depth", "decoder_heads", "embed_dim"):
        _check(getattr(m, key) > 0, f"model.{key}", "must be positive")
    tp = cfg.parallel.tensor
    _check(tp >= 1, "parallel.tensor", "must be >= 1")
    for key, n in (("model.heads", m.heads), ("model.decoder_heads", m.decoder_heads)):
        _check(n % tp == 0, "parallel.tensor", f"{tp} must divide {key} ({n})")
    for key, width in (("model.dim", m.dim), ("model.decoder_dim", m.decoder_dim)):
        _check(int(width * m.mlp_ratio) % tp == 0, "parallel.tensor",
               f"{tp} must divide the MLP width of {key} ({int(width * m.mlp_ratio)})")
    t = cfg.train
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{t.zero_stage} not in [0, 1, 2, 3]")
    _check(t.steps > 0, "train.steps", "must be positive")
    _check(0 <= t.stop_at <= t.steps, "train.stop_at", f"{t.stop_at} must be in [0, train.steps={t.steps}]")
    _check(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _check(t.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
    _check(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(cfg.data.repeats >= 1, "data.repeats", "must be >= 1 (training samples per decoded clip)")
    _check(0.0 <= cfg.data.crop_jitter < 1.0, "data.crop_jitter",
           f"{cfg.data.crop_jitter}: must be in [0, 1) (the share of the short side a crop may lose)")
    _check(cfg.data.finish in ("auto", "loader", "device"), "data.finish",
           f"must be auto, loader or device, got {cfg.data.finish!r}")
    _check(cfg.data.dali_threads >= 0, "data.dali_threads", "must be >= 0")
    _check(cfg.data.io_retries >= 1, "data.io_retries", "must be >= 1")
    _check(cfg.data.io_timeout_s > 0, "data.io_timeout_s", "must be > 0")
    _check(0.0 <= cfg.data.max_skip_fraction <= 1.0, "data.max_skip_fraction", "must be in [0, 1]")
    _check(cfg.data.global_batch_size >= 0, "data.global_batch_size", "must be >= 0 (0: not set)")
    _check(cfg.data.decode_timeout_s > 0, "data.decode_timeout_s", "must be > 0")
    _check(0.0 <= cfg.data.min_clip_s < cfg.data.max_clip_s, "data.min_clip_s",
           f"{cfg.data.min_clip_s} must be >= 0 and below data.max_clip_s ({cfg.data.max_clip_s})")
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    check_deepspeed_extra(t.deepspeed)
    pr = t.profile
    _check(0 <= pr.start_step <= t.steps, "train.profile.start_step",
           f"{pr.start_step} must be in [0, train.steps={t.steps}] (0: off)")
    _check(pr.steps >= 1, "train.profile.steps", "must be >= 1")
    _check(bool(pr.ranks) and min(pr.ranks) >= 0, "train.profile.ranks", "one or more ranks, each >= 0")
    e = cfg.eval
    _check(e.every >= 0, "eval.every", "must be >= 0 (0: off)")
    _check(not e.class_names or (len(e.class_names) >= 2 and len(set(e.class_names)) == len(e.class_names)),
           "eval.class_names", f"{e.class_names}: two or more distinct names (label 0, 1, ...), or none")
    _check(e.clips >= 4 and e.batch_size >= 1 and e.pictures >= 0, "eval",
           "clips >= 4, batch_size >= 1, pictures >= 0")
    _check(e.holdout >= 0 and (e.holdout < 1 or float(e.holdout).is_integer()), "eval.holdout",
           f"{e.holdout}: a fraction in [0, 1) of the training clips or a whole count >= 1 (0: none)")
    _check(not (e.holdout and e.shards != "auto"), "eval.holdout",
           f"eval.shards={e.shards!r} already names the held-out clips: set eval.shards or eval.holdout")
    _check(len(cfg.optim.betas) == 2, "optim.betas", "needs two values")
    s = cfg.data.synth
    _check(s.clips >= 1 and s.clips_per_shard >= 1 and s.classes >= 2, "data.synth",
           "clips, clips_per_shard >= 1 and classes >= 2")
    _check(s.keyint >= 0, "data.synth.keyint", f"{s.keyint}: must be >= 0 (0: the encoder's default)")
    need = (v.frames - 1) * v.stride + 1
    _check(s.duration * 25.0 >= need, "data.synth.duration",
           f"{s.duration}s at 25 fps is shorter than the {need} frames that inputs.video needs")
    s2 = cfg.stage2
    _check(0.0 < s2.subset_fraction <= 1.0, "stage2.subset_fraction", "must be in (0, 1]")
    _check(s2.subset_count >= 0, "stage2.subset_count", "must be >= 0")
    _check(s2.text_head_hidden >= 0, "stage2.text_head_hidden", "must be >= 0")
    for key in ("joint_weight", "audio_weight", "video_weight", "stage1_weight"):
        _check(getattr(s2, key) >= 0.0, f"stage2.{key}", "must be >= 0")
    # Stage 2's data (launchers/stage2.py: check): data.shards=synthetic is the synthetic described set in
    # its own cache folder; any other data.shards is a described set stage 2 only reads.


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of processes (WORLD_SIZE, known before the process group starts)."""
    tp = cfg.parallel.tensor
    _check(world_size % tp == 0, "parallel.tensor", f"{tp} must divide the world size ({world_size})")
    if cfg.train.profile.start_step:
        ranks = cfg.train.profile.ranks
        _check(max(ranks) < world_size, "train.profile.ranks",
               f"{ranks}: every rank must be below the world size ({world_size})")
    gb, accum, micro = cfg.data.global_batch_size, cfg.train.grad_accum, cfg.data.batch_size
    if gb:
        dp = world_size // tp
        _check(gb % dp == 0, "data.global_batch_size",
               f"{gb} is not divisible by the data-parallel size {dp} (world {world_size} / tensor {tp})")
        hint = f"; set data.batch_size={gb // dp // accum}" if (gb // dp) % accum == 0 else ""
        _check(gb == micro * accum * dp, "data.global_batch_size",
               f"{gb} != data.batch_size ({micro}) x train.grad_accum ({accum}) x data-parallel size "
               f"({dp}) = {micro * accum * dp}{hint}")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")
