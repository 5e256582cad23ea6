"""eval.holdout: the clips of the training shards that training never reads, split off by speaker.

The split is data, not evaluation: the training loader passes over its keys (`training_holdout`, which
the trainer calls) and online evaluation (`vaemo_dist.eval.online`) evaluates on them. It is made once
from the training shards' json (`speaker`; only the json members are read), written to
`<run>/holdout.json` and reused as it is on every resume (`ensure_holdout`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaemo_dist.config import Config
from vaemo_dist.fsutil import write_atomic

log = logging.getLogger(__name__)

HOLDOUT_FILE = "holdout.json"


class HoldoutError(ValueError):
    """The training shards cannot give the held-out split asked for."""


def redact_spec(spec: str) -> str:
    """A comma-separated shard spec with the credentials of its remote URLs removed."""
    from vaemo_dist.data.storage import is_remote, redact

    return ",".join(redact(s) if is_remote(s) else s for s in spec.split(","))


def training_data_name(cfg: Config) -> str:
    """data.shards as said in names and records (no credentials)."""
    if cfg.data.shards == "synthetic":
        return f"the synthetic corpus {cfg.data.synth.dir}"
    return redact_spec(cfg.data.shards)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / cfg.train.run_name


def holdout_amount(holdout: float) -> str:
    """eval.holdout as said in names: "10%" or "40 clips"."""
    return f"{100 * holdout:g}%" if holdout < 1 else f"{int(holdout)} clips"


@dataclass
class Holdout:
    """The split of `eval.holdout`, as written to `<run>/holdout.json`: the held-out keys (never trained
    on), the speakers they belong to, how it was split, and from what."""

    keys: list[str]
    speakers: list[str]  # held-out speakers (none when split by clip)
    train_speakers: list[str]
    by: str  # "speaker", "clip", or "speaker, by clip where a clip has none"
    holdout: float  # eval.holdout when the split was made
    seed: int  # data.shuffle_seed when the split was made
    data_shards: str  # data.shards (credentials removed)
    shards: list[str]  # the shard list read (credentials removed)
    clips_total: int

    def name(self) -> str:
        n = len(self.speakers)
        who = f", {n} speaker{'s' if n != 1 else ''}" if n else ""
        return (f"held-out {holdout_amount(self.holdout)} of {self.data_shards} by {self.by} "
                f"({len(self.keys)} clips{who})")

    def to_dict(self) -> dict[str, Any]:
        return {"format": "vaemo-holdout", "format_version": 1, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Holdout:
        names = {f.name for f in dataclasses.fields(Holdout)}
        return Holdout(**{k: v for k, v in d.items() if k in names})


def split_holdout(clips: Sequence[tuple[str, str | None]], holdout: float,
                  seed: int) -> tuple[list[str], list[str], list[str], str]:
    """(held-out keys, held-out speakers, training speakers, how) of (key, speaker or None) clips.

    Whole speakers are held out: the speakers, in an order fixed by `seed`, are taken until at least
    `holdout` (a fraction < 1 of the clips, or a count) are held out, so no speaker is in both sets. A clip
    without a speaker is a group of its own (split by clip). At least one group stays for training."""
    n = len(clips)
    target = max(1, round(holdout * n) if holdout < 1 else int(holdout))
    if n < 2 or target >= n:
        raise HoldoutError(f"eval.holdout={holdout:g} asks for {target} of {n} training clips held out: "
                           "nothing would be left to train on")
    groups: dict[str, list[str]] = {}
    for key, speaker in clips:
        groups.setdefault(f"s:{speaker}" if speaker is not None else f"k:{key}", []).append(key)
    order = sorted(groups)
    random.Random(f"holdout:{seed}").shuffle(order)
    held: list[str] = []
    taken = 0
    while len(held) < target and taken < len(order):
        held.extend(groups[order[taken]])
        taken += 1
    if taken == len(order):
        one = [g[2:] for g in order if g.startswith("s:")]
        raise HoldoutError(f"eval.holdout={holdout:g}: the training clips hold {len(order)} group(s) "
                           f"({len(one)} speaker(s): {one[:5]}), and holding out {target} clips by speaker "
                           "would leave none to train on; give held-out shards in eval.shards instead")
    speakers = sorted(g[2:] for g in order[:taken] if g.startswith("s:"))
    rest = sorted(g[2:] for g in order[taken:] if g.startswith("s:"))
    with_speaker = sum(1 for _, s in clips if s is not None)
    how = "speaker" if with_speaker == n else "clip" if with_speaker == 0 else \
        f"speaker ({n - with_speaker} clips without one by clip)"
    return sorted(held), speakers, rest, how


def training_urls(cfg: Config) -> list[str]:
    """data.shards expanded (the synthetic corpus's shards for `synthetic`), as the launcher lists them."""
    from vaemo_dist.data.shards import expand_shards

    data = cfg.data
    return expand_shards(data.synth.dir if data.shards == "synthetic" else data.shards)


def holdout_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / HOLDOUT_FILE


def ensure_holdout(cfg: Config, run_dir: str | Path | None = None, urls: list[str] | None = None,
                   write: bool = True) -> Holdout:
    """The held-out split of `eval.holdout`: read from `<run>/holdout.json` when there (a resumed run keeps
    the clips it held out when it started, whatever the config says now, said in the log), else made from
    the training shards' json (`speaker`; only the json members are read) and, with `write`, written
    there. `urls`: the training shard list (default: data.shards expanded)."""
    run_dir = Path(run_dir) if run_dir is not None else run_dir_of(cfg)
    path = holdout_path(run_dir)
    if path.is_file():
        record = Holdout.from_dict(json.loads(path.read_text()))
        now = (cfg.eval.holdout, cfg.data.shuffle_seed, training_data_name(cfg))
        if (record.holdout, record.seed, record.data_shards) != now:
            log.warning("%s was made for eval.holdout=%g, seed %d, data.shards=%s; the config now says %g, "
                        "%d, %s. Kept as it is: its clips were held out since the run started", path,
                        record.holdout, record.seed, record.data_shards, *now)
        return record
    from vaemo_dist.data.shards import read_clip_meta

    urls = urls or training_urls(cfg)
    clips: dict[str, str | None] = {}
    for url in urls:
        for key, meta in read_clip_meta(url):
            speaker = meta.get("speaker")
            clips[key] = None if speaker in (None, "") else str(speaker)
    keys, speakers, rest, how = split_holdout(sorted(clips.items()), cfg.eval.holdout, cfg.data.shuffle_seed)
    record = Holdout(keys=keys, speakers=speakers, train_speakers=rest, by=how, holdout=cfg.eval.holdout,
                     seed=cfg.data.shuffle_seed, data_shards=training_data_name(cfg),
                     shards=[redact_spec(u) for u in urls], clips_total=len(clips))
    if write:
        if (run_dir / "checkpoints").is_dir():
            log.warning("eval.holdout: %s is new but the run has checkpoints: the clips held out now may "
                        "have been trained on before", path)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record.to_dict(), indent=1) + "\n")
        log.info("eval.holdout: %s (of %d clips; speakers %s held out), never trained on; written to %s",
                 record.name(), len(clips), speakers[:10] if speakers else "-", path)
    return record


def splits_training(cfg: Config) -> bool:
    """Whether this config holds clips of the training shards out: online evaluation on (eval.every),
    on eval.holdout of the training shards (eval.shards auto)."""
    return cfg.eval.every > 0 and cfg.eval.shards == "auto" and bool(cfg.eval.holdout)


def training_holdout(cfg: Config, run_dir: str | Path, urls: list[str], write: bool) -> Holdout | None:
    """The held-out split the training loader must pass over (None: nothing held out). Made by the
    launcher (prepare_online_eval) before the process group; here it is read (or made alike on every
    rank, written by the one with `write`, when a caller skipped that)."""
    if cfg.eval.holdout and not cfg.eval.every:
        if write:
            log.warning("eval.holdout=%g is set but eval.every is 0: no evaluation, nothing held out",
                        cfg.eval.holdout)
        return None
    if not splits_training(cfg):
        return None
    return ensure_holdout(cfg, run_dir, urls=urls, write=write)
