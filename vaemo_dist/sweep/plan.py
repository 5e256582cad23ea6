"""Sweep files: parse and validate them, expand the grid into points, and say where each point stands.

A sweep is a YAML file (format in docs/scaling.md):

    name: tiny
    config: ../stage1/tiny.yaml        # the base run config, relative to this file
    out_dir: runs/sweeps/tiny          # one folder per point under it
    launch: {nproc: 2}                 # processes per run
    overrides: {model.depth: 2}        # fixed for every point
    presets: {tiny-d2: {model.preset: tiny, model.depth: 2}}   # optional named model variants
    grid: {preset: [tiny, small], flops: [2.5e11, 1e12], seed: [0]}
    final_eval: true                   # one online evaluation per point, at its last step

Every point of the grid is an ordinary run of the launcher with its own overrides, in
`<out_dir>/<name>` (`train.out_dir` / `train.run_name`), named from its grid values, e.g.
`tiny-f2.5e11-s0`. A compute budget (`flops`) becomes `train.steps` through the model's training FLOPs
per sample and the global batch. A data fraction keeps the first part of the resolved shard list.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaemo_dist.config import MODEL_PRESETS, Config, ConfigError, load_config, validate_world


class SweepError(ValueError):
    """A problem with a sweep file, with the offending key in the message."""


# Grid axes with a meaning of their own; any other axis must be a dotted config key.
AXES = ("preset", "data_fraction", "flops", "steps", "seed")
AXIS_ALIASES = {"model.preset": "preset", "train.steps": "steps", "train.seed": "seed"}
# Set by the sweep itself for every point, so a sweep file may not set them.
RESERVED_KEYS = ("train.out_dir", "train.run_name", "train.resume")

MANIFEST = "sweep.json"  # the resolved points, written into the sweep folder
STATUS_FILE = "sweep_status.json"  # the outcome of the last launch, written into a point's folder
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class LaunchSpec:
    nproc: int = 1  # processes (GPUs) per node for every run
    nodes: int = 1  # nodes per run; local runs use one, SLURM array tasks may use more
    script: str = "launchers/stage1.py"  # relative to the directory the sweep is run from
    env: dict[str, str] = field(default_factory=dict)  # set for every run (local, commands, SLURM)


@dataclass
class SlurmSpec:
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    cpus_per_task: int = 16
    omp_threads: int = 8
    extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. "--qos=high"


@dataclass
class SweepSpec:
    name: str
    path: Path  # the sweep file
    config: str  # the base run config, as a path from the current directory
    out_dir: str
    launch: LaunchSpec
    slurm: SlurmSpec
    overrides: dict[str, Any]
    presets: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]]  # axis -> values, in file order
    final_eval: bool = False  # evaluate each point once, at its last step (eval.every = its steps)

    @property
    def world_size(self) -> int:
        return self.launch.nproc * self.launch.nodes


@dataclass
class Point:
    index: int
    name: str
    preset: str  # the grid's preset label (a built-in preset or a name from `presets:`)
    model_preset: str  # model.preset of the resolved config
    seed: int
    data_fraction: float
    data_shards: int | None  # shards this point trains on (None: unknown, e.g. a remote glob)
    data_clips: int | None  # clips in them, where a manifest or the synthetic config says
    steps: int
    global_batch: int
    flops_per_sample: int  # training FLOPs of one sample (vaemo_dist.model.flops)
    flops_budget: float | None  # the grid's compute budget, if it gave one
    flops_planned: float  # steps x global batch x FLOPs per sample
    params: int
    axes: dict[str, Any]  # this point's grid values
    overrides: list[str]  # key=value, everything that makes this run this point
    # Whether it trains on (part of) the synthetic corpus: data.shards is `synthetic` in its config. A
    # point whose data.shards names shards (in `overrides` or the config) never builds that corpus.
    synthetic_data: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Point:
        names = {f.name for f in dataclasses.fields(Point)}
        return Point(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------
# Reading a sweep file


def _unknown(key: str, where: str, valid: list[str]) -> SweepError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return SweepError(f"unknown sweep key '{where}{key}'.{hint} Valid keys"
                      f"{' in ' + repr(where.rstrip('.')) if where else ''}: {', '.join(sorted(valid))}")


def _build(cls: type, raw: Any, where: str) -> Any:
    """A LaunchSpec/SlurmSpec from a mapping, rejecting unknown keys and values of the wrong type."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping, got {raw!r}")
    defaults = cls()
    kwargs = {}
    for key, value in raw.items():
        if not hasattr(defaults, str(key)):
            raise _unknown(str(key), f"{where}.", [f.name for f in dataclasses.fields(cls)])
        want = type(getattr(defaults, key))
        if want is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SweepError(f"{where}.{key}: expected a positive integer, got {value!r}")
        if want is str and not isinstance(value, str):
            raise SweepError(f"{where}.{key}: expected a string, got {value!r}")
        if want is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise SweepError(f"{where}.{key}: expected a list of strings, got {value!r}")
        if want is dict:
            if not isinstance(value, dict):
                raise SweepError(f"{where}.{key}: expected a mapping, got {value!r}")
            value = {str(k): str(v) for k, v in value.items()}
        kwargs[key] = value
    return cls(**kwargs)


def _dotted_mapping(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping of dotted config keys (e.g. model.depth: 2)")
    out = {}
    for key, value in raw.items():
        key = str(key)
        if "." not in key:
            raise SweepError(f"{where}.{key}: expected a dotted config key such as model.depth or train.seed")
        if key in RESERVED_KEYS:
            raise SweepError(f"{where}.{key}: set by the sweep for every point (its folder); remove it")
        out[key] = value
    return out


def _relative_to_cwd(path: Path) -> str:
    """A path as typed from the current directory: relative when below it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (the grid's config keys are checked later, per point)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: top level must be a mapping")
    valid = ["name", "config", "out_dir", "launch", "slurm", "overrides", "presets", "grid", "final_eval"]
    for key in raw:
        if key not in valid:
            raise _unknown(str(key), "", valid)
    name = str(raw.get("name") or path.stem)
    if not _NAME_RE.match(name):
        raise SweepError(f"name: {name!r} must be letters, digits, '.', '_', '+' or '-'")
    if not isinstance(raw.get("config"), str):
        raise SweepError("config: the base run config (a YAML path, relative to the sweep file) is required")
    config = path.parent / raw["config"]
    if not config.is_file():
        raise SweepError(f"config: {config} not found (the path is relative to the sweep file)")
    out_dir = raw.get("out_dir", f"runs/sweeps/{name}")
    if not isinstance(out_dir, str) or not out_dir:
        raise SweepError(f"out_dir: expected a folder path, got {out_dir!r}")

    presets: dict[str, dict[str, Any]] = {}
    raw_presets = raw.get("presets") or {}
    if not isinstance(raw_presets, dict):
        raise SweepError("presets: expected a mapping of name -> {dotted key: value}")
    for pname, bundle in raw_presets.items():
        pname = str(pname)
        if pname in MODEL_PRESETS or pname == "custom":
            raise SweepError(f"presets.{pname}: shadows the built-in model preset; choose another name")
        if not _NAME_RE.match(pname):
            raise SweepError(f"presets.{pname}: a name of letters, digits, '.', '_', '+' or '-'")
        presets[pname] = _dotted_mapping(bundle, f"presets.{pname}")

    spec = SweepSpec(name=name, path=path, config=_relative_to_cwd(config), out_dir=out_dir,
                     launch=_build(LaunchSpec, raw.get("launch"), "launch"),
                     slurm=_build(SlurmSpec, raw.get("slurm"), "slurm"),
                     overrides=_dotted_mapping(raw.get("overrides"), "overrides"), presets=presets,
                     grid=_parse_grid(raw.get("grid"), presets), final_eval=raw.get("final_eval", False))
    if not isinstance(spec.final_eval, bool):
        raise SweepError(f"final_eval: expected true or false, got {spec.final_eval!r}")
    if spec.final_eval and ("eval.every" in spec.overrides or "eval.every" in spec.grid):
        raise SweepError("final_eval: sets eval.every to each point's steps; remove eval.every or final_eval")
    if "train.steps" in spec.overrides and "flops" in spec.grid:
        raise SweepError("overrides.train.steps: the grid gives a compute budget (grid.flops), which sets "
                         "train.steps per point; remove one of them")
    return spec


def _parse_grid(raw: Any, presets: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError("grid: expected a mapping of axis -> list of values")
    grid: dict[str, list[Any]] = {}
    for key, values in raw.items():
        key = str(key)
        axis = AXIS_ALIASES.get(key, key)
        if axis not in AXES and "." not in axis:
            valid = list(AXES) + sorted(AXIS_ALIASES)
            close = difflib.get_close_matches(axis, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise SweepError(f"unknown grid axis 'grid.{key}'.{hint} Valid axes: {', '.join(AXES)}, "
                             "or any dotted config key (e.g. optim.lr)")
        if axis in RESERVED_KEYS:
            raise SweepError(f"grid.{key}: set by the sweep for every point (its folder); remove it")
        if axis in grid:
            raise SweepError(f"grid.{key}: the axis '{axis}' is given twice")
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
        grid[axis] = [_axis_value(axis, v, f"grid.{key}[{i}]", presets) for i, v in enumerate(values)]
        if len(set(map(repr, grid[axis]))) != len(values):
            raise SweepError(f"grid.{key}: repeated values {values}")
    if "flops" in grid and "steps" in grid:
        raise SweepError("grid: give a budget either as flops or as steps, not both")
    return grid


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):  # YAML 1.1 reads 2e12 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) else None


def _axis_value(axis: str, value: Any, where: str, presets: dict[str, dict[str, Any]]) -> Any:
    if axis == "preset":
        if value not in MODEL_PRESETS and value not in presets:
            raise SweepError(f"{where}: {value!r} is neither a model preset ({', '.join(MODEL_PRESETS)}) "
                             "nor a name under presets:")
        return value
    if axis == "flops":
        n = _number(value)
        if n is None or not math.isfinite(n) or n <= 0:
            raise SweepError(f"{where}: expected a positive number of training FLOPs (e.g. 2.5e11), "
                             f"got {value!r}")
        return n
    if axis == "data_fraction":
        n = _number(value)
        if n is None or not 0.0 < n <= 1.0:
            raise SweepError(f"{where}: expected a fraction in (0, 1], got {value!r}")
        return n
    if axis in ("steps", "seed"):
        low = 1 if axis == "steps" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SweepError(f"{where}: expected an integer >= {low}, got {value!r}")
        return value
    if isinstance(value, (dict, list)):
        raise SweepError(f"{where}: a grid value must be a scalar, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Points


def format_number(x: float) -> str:
    """Short and stable: 2.5e11, 1e12, 0.001, 40."""
    s = f"{x:.3g}"
    return re.sub(r"e([+-]?)0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2), s)


def override_value(value: Any) -> str:
    """A value as the launcher's `key=value` override reads it back (a YAML scalar)."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format_number(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(value))


def point_name(axes: dict[str, Any], preset: str, budget: str, seed: int) -> str:
    """`<preset>[-d<fraction>]-<budget>[-<key><value>...]-s<seed>`, e.g. tiny-f2.5e11-s0."""
    parts = [preset]
    if "data_fraction" in axes:
        parts.append("d" + _label(axes["data_fraction"]))
    parts.append(budget)
    parts += [key.rsplit(".", 1)[-1] + _label(v) for key, v in axes.items() if key not in AXES]
    parts.append(f"s{seed}")
    return "-".join(parts)


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product, first axis slowest, in file order."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def steps_for_budget(flops: float, flops_per_sample: float, global_batch: int) -> int:
    """Optimizer steps whose training FLOPs come closest to the budget (at least one)."""
    return max(1, round(flops / (flops_per_sample * global_batch)))


def _set(overrides: list[str], key: str, value: Any) -> None:
    """Append key=value, dropping an earlier value of the key: one value per key on a command line."""
    overrides[:] = [o for o in overrides if o.partition("=")[0] != key]
    overrides.append(f"{key}={override_value(value)}")


def _load(spec: SweepSpec, overrides: list[str], where: str) -> Config:
    try:
        cfg = load_config(spec.config, overrides)
        validate_world(cfg, spec.world_size)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from e
    return cfg


def build_points(spec: SweepSpec) -> list[Point]:
    """Resolve every point of the grid: its overrides, steps, data and cost. Config errors fail here."""
    from vaemo_dist.model.flops import account

    fixed = [f"{k}={override_value(v)}" for k, v in spec.overrides.items()]
    base = _load(spec, fixed, "overrides")  # a bad fixed key is reported once, not per point
    points: list[Point] = []
    for index, axes in enumerate(expand_grid(spec.grid) or [{}]):
        preset = axes.get("preset", base.model.preset)
        seed = axes.get("seed", base.train.seed)
        fraction = axes.get("data_fraction", 1.0)
        ov = list(fixed)
        if preset in spec.presets:
            for k, v in spec.presets[preset].items():
                _set(ov, k, v)
        elif "preset" in axes:
            _set(ov, "model.preset", preset)
        for k, v in axes.items():
            if k not in AXES:
                _set(ov, k, v)
        _set(ov, "train.seed", seed)
        where = f"grid point {index} ({', '.join(f'{k}={v}' for k, v in axes.items()) or 'no grid'})"
        cfg = _load(spec, ov, where)
        shards_override, n_shards, n_clips = resolve_data(cfg, fraction, where)
        synthetic_data = cfg.data.shards == "synthetic"
        if shards_override is not None:
            _set(ov, "data.shards", shards_override)
            if synthetic_data and cfg.eval.shards == "auto" and not cfg.eval.holdout:  # synthetic clips still
                _set(ov, "eval.shards", "synthetic")
        cost = account(cfg.model, cfg.inputs)
        global_batch = cfg.data.batch_size * cfg.train.grad_accum * (spec.world_size // cfg.parallel.tensor)
        budget = axes.get("flops")
        if budget is not None:
            steps = steps_for_budget(budget, cost.train_flops, global_batch)
            label = "f" + format_number(budget)
        else:
            steps = axes.get("steps", cfg.train.steps)
            label = f"n{steps}"
        if spec.final_eval:  # one evaluation, at the end: the trainer evaluates at multiples of eval.every
            _set(ov, "eval.every", steps)
        _set(ov, "train.steps", steps)
        name = point_name(axes, preset, label, seed)
        _set(ov, "train.out_dir", spec.out_dir)
        _set(ov, "train.run_name", name)
        final = _load(spec, ov, f"{where}, {name}")  # e.g. train.stop_at above the budget's steps
        points.append(Point(
            index=index, name=name, preset=preset, model_preset=final.model.preset, seed=seed,
            data_fraction=fraction, data_shards=n_shards, data_clips=n_clips, steps=steps,
            global_batch=global_batch, flops_per_sample=cost.train_flops, flops_budget=budget,
            flops_planned=float(steps * global_batch * cost.train_flops), params=cost.params,
            axes=axes, overrides=ov, synthetic_data=synthetic_data))
    seen: dict[str, int] = {}
    for p in points:
        if p.name in seen:
            raise SweepError(f"grid points {seen[p.name]} and {p.index} get the same name {p.name!r}; "
                             "make the values of their axes differ in their short form")
        seen[p.name] = p.index
    return points


# --------------------------------------------------------------------------------------------
# Data fractions: the first part of the resolved shard list


def synthetic_shards(cfg: Config) -> tuple[list[str], list[int]]:
    """The synthetic corpus's shard paths and clips per shard, known from its config before it is built."""
    s = cfg.data.synth
    n = math.ceil(s.clips / s.clips_per_shard)
    counts = [s.clips_per_shard] * (n - 1) + [s.clips - s.clips_per_shard * (n - 1)]
    return [str(Path(s.dir) / f"shard-{i:06d}.tar") for i in range(n)], counts


def _manifest_counts(spec: str, n: int) -> list[int] | None:
    """Clips per shard from a vaemo-shard / synthetic manifest.json next to local shards, if there is one."""
    from vaemo_dist.data.shards import MANIFEST_NAME

    path = Path(spec if spec.endswith(MANIFEST_NAME) else Path(spec) / MANIFEST_NAME)
    try:
        counts = json.loads(path.read_text())["samples_per_shard"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [int(c) for c in counts] if len(counts) == n else None


def resolve_data(cfg: Config, fraction: float, where: str) -> tuple[str | None, int | None, int | None]:
    """(data.shards override or None, shards used, clips used) for a data fraction.

    The fraction keeps the first ceil(fraction x n) shards of the resolved list, so smaller fractions are
    subsets of larger ones. A full fraction leaves data.shards as the config has it.
    """
    from vaemo_dist.data.shards import ShardError, expand_shards

    spec = cfg.data.shards
    if spec == "synthetic":
        urls, counts = synthetic_shards(cfg)
    elif fraction >= 1.0 and ("://" in spec or "{" in spec):
        return None, None, None  # nothing to cut, and no need to list remote shards
    else:
        try:
            urls = expand_shards(spec)
        except ShardError as e:
            raise SweepError(f"{where}: data.shards: {e}") from e
        counts = _manifest_counts(spec, len(urls))
    k = max(1, math.ceil(fraction * len(urls) - 1e-9))
    clips = sum(counts[:k]) if counts else None
    if k == len(urls):
        return None, k, clips
    return compact_shards(urls[:k]), k, clips


def compact_shards(urls: list[str]) -> str:
    """A brace range when the shards are consecutive numbers with one prefix and suffix, else a comma list."""
    if len(urls) == 1:
        return urls[0]
    parts = [re.fullmatch(r"(.*?)(\d+)(\D*)", u) for u in urls]
    if all(parts):
        prefix, first, suffix = parts[0].groups()
        same = all(m.group(1) == prefix and m.group(3) == suffix and len(m.group(2)) == len(first)
                   for m in parts)
        numbers = [int(m.group(2)) for m in parts]
        if same and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return f"{prefix}{{{first}..{parts[-1].group(2)}}}{suffix}"
    return ",".join(urls)


# --------------------------------------------------------------------------------------------
# Where a point stands


@dataclass
class Status:
    state: str  # "new", "interrupted", "done" or "failed"
    step: int  # the newest complete checkpoint's step (0: none)

    def describe(self, steps: int) -> str:
        if self.state == "done":
            return f"done (step {self.step}/{steps})"
        if self.step:
            return f"{self.state} (checkpoint at step {self.step}/{steps})"
        return self.state


def run_dir(out_dir: str | Path, point: Point) -> Path:
    return Path(out_dir) / point.name


def checkpoint_step(folder: Path) -> int:
    """The step of the checkpoint that `checkpoints/latest` names (0 when there is none)."""
    pointer = folder / "checkpoints" / "latest"
    try:
        m = re.fullmatch(r"step_(\d+)", pointer.read_text().strip())
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def point_status(folder: Path, steps: int) -> Status:
    """done: the newest checkpoint is the last step; interrupted: an earlier one; new: none. A run
    whose last launch exited with an error and that is not done is "failed" (and resumes like
    an interrupted one)."""
    step = checkpoint_step(folder)
    if step >= steps:
        return Status("done", step)
    try:
        failed = json.loads((folder / STATUS_FILE).read_text()).get("returncode", 0) != 0
    except (OSError, ValueError, AttributeError):
        failed = False
    return Status("failed" if failed else ("interrupted" if step else "new"), step)


# Keys that may differ between launches of the same point (a time slice, resuming).
_PER_LAUNCH_KEYS = {"train.resume", "train.stop_at"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(spec: SweepSpec, point: Point, folder: Path) -> list[str]:
    """Config keys whose value in the point's newest checkpoint differs from what the sweep now asks: a
    done point is never re-run, so an edited sweep file would otherwise go unnoticed."""
    step = checkpoint_step(folder)
    try:
        ran = yaml.safe_load((folder / "checkpoints" / f"step_{step:08d}" / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(ran, dict):
        return []
    ran, now = _flatten(ran), _flatten(load_config(spec.config, point.overrides).to_dict())
    keys = (now.keys() | ran.keys()) - _PER_LAUNCH_KEYS
    return sorted(k for k in keys if now.get(k) != ran.get(k))


def statuses(spec: SweepSpec, points: list[Point]) -> list[Status]:
    return [point_status(run_dir(spec.out_dir, p), p.steps) for p in points]


def write_manifest(spec: SweepSpec, points: list[Point]) -> Path:
    """`<out_dir>/sweep.json`: the sweep and its resolved points, for `vaemo-sweep report` and people."""
    folder = Path(spec.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "name": spec.name, "sweep_file": str(spec.path), "config": spec.config, "out_dir": spec.out_dir,
        "launch": dataclasses.asdict(spec.launch), "grid": spec.grid, "final_eval": spec.final_eval,
        "written": time.time(),
        "points": [p.to_dict() for p in points],
    }
    path = folder / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_manifest(folder: str | Path) -> tuple[dict[str, Any], list[Point]]:
    path = Path(folder) / MANIFEST
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SweepError(f"no readable {MANIFEST} in {folder} (run `vaemo-sweep plan` or `run` first): {e}") \
            from e
    return record, [Point.from_dict(p) for p in record["points"]]


# --------------------------------------------------------------------------------------------
# Emitting: command lines and a SLURM array script


def launcher_args(spec: SweepSpec, point: Point) -> list[str]:
    """The launcher script's arguments: the base config, resume-or-start, the point's overrides."""
    return [spec.launch.script, "--config", spec.config, "--resume", "latest", *point.overrides]


def command_line(spec: SweepSpec, point: Point) -> str:
    """One shell line that runs (or resumes) a point with the deepspeed launcher."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.launch.env.items())
    cmd = shlex.join(["deepspeed", "--num_gpus", str(spec.launch.nproc), *launcher_args(spec, point)])
    return f"{env} {cmd}" if env else cmd


def format_commands(spec: SweepSpec, points: list[Point], states: list[Status]) -> str:
    """A shell script of the points in order; done points are commented out, so piping it to bash runs
    exactly what is left (`--resume latest` makes an interrupted point continue)."""
    lines = [f"# sweep {spec.name}: {len(points)} points, {sum(s.state != 'done' for s in states)} to run"]
    for p, s in zip(points, states):
        lines.append(f"# [{p.index + 1}/{len(points)}] {p.name}: {s.describe(p.steps)}")
        lines.append(("# " if s.state == "done" else "") + command_line(spec, p))
    return "\n".join(lines) + "\n"


def slurm_script(spec: SweepSpec, points: list[Point], states: list[Status]) -> str:
    """A SLURM array script with one task per point that is not done (the task id is the point index)."""
    todo = [p.index for p, s in zip(points, states) if s.state != "done"]
    sl, la = spec.slurm, spec.launch
    out = Path(spec.out_dir)
    head = [
        "#!/bin/bash",
        f"# Sweep {spec.name}: one array task per point not done when this was written (task id = point",
        "# index), each a requeue-safe stage run that resumes from its newest checkpoint. Written by",
        f"# `vaemo-sweep plan {spec.path} --emit slurm`; submit from the directory it was written in:",
        f"#   sbatch {out / 'sweep.sbatch'}",
        "# Points:",
        *[f"#   {p.index}: {p.name}  {s.describe(p.steps)}" for p, s in zip(points, states)],
        f"#SBATCH --job-name=vaemo-sweep-{spec.name}",
        f"#SBATCH --array={','.join(map(str, todo))}",
        f"#SBATCH --nodes={la.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={la.nproc}",
        f"#SBATCH --cpus-per-task={sl.cpus_per_task}",
        f"#SBATCH --time={sl.time}",
        "#SBATCH --requeue",
        f"#SBATCH --output={out}/slurm-%x-%A_%a.out",
    ]
    head += [f"#SBATCH --partition={sl.partition}"] * bool(sl.partition)
    head += [f"#SBATCH --account={sl.account}"] * bool(sl.account)
    head += [f"#SBATCH {opt}" for opt in sl.extra]
    body = ["set -euo pipefail", "", 'case "$SLURM_ARRAY_TASK_ID" in']
    for p in points:
        body.append(f"  {p.index}) ARGS=({shlex.join(p.overrides)}) ;;  # {p.name}")
    body += [f'  *) echo "no point $SLURM_ARRAY_TASK_ID in sweep {spec.name}" >&2; exit 1 ;;', "esac", ""]
    body += [
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((29500 + SLURM_ARRAY_TASK_ID % 1000))  # tasks sharing a node differ",
        *[f"export OMP_NUM_THREADS={sl.omp_threads}"] * ("OMP_NUM_THREADS" not in la.env),
        *[f"export {k}={shlex.quote(v)}" for k, v in la.env.items()],
        "# A requeued task resumes from the newest complete checkpoint (or starts if there is none).",
        "srun torchrun \\",
        f'  --nnodes "$SLURM_NNODES" --nproc_per_node {la.nproc} \\',
        '  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \\',
        f"  {shlex.quote(la.script)} --config {shlex.quote(spec.config)} --resume latest " + '"${ARGS[@]}"',
    ]
    return "\n".join(head + body) + "\n"


def format_table(points: list[Point], states: list[Status], notes: list[str] | None = None) -> str:
    rows = [("#", "point", "params", "data", "steps", "global batch", "train FLOPs", "status")]
    for p, s in zip(points, states):
        data = f"{p.data_shards} shards" if p.data_shards is not None else "-"
        if p.data_clips is not None:
            data += f", {p.data_clips} clips"
        note = notes[p.index] if notes else ""
        rows.append((str(p.index), p.name, f"{p.params / 1e6:.1f}M", data, str(p.steps), str(p.global_batch),
                     format_number(p.flops_planned), s.describe(p.steps) + (f"; {note}" if note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"
