"""Data supply vs GPU demand (issue 19): training samples/s per CPU core of the real loader path, the
bare-decode floor beside it, and the demand of one H100/H200 at a given MFU, hence CPU cores per GPU.

    python benchmarks/bench_data.py --config configs/stage1/base.yaml --repeats 1,2,4 --json out.json
    python benchmarks/bench_data.py ... --update BENCHMARKS.md   # replace its "## Data rate (issue 19)"

Method: a synthetic corpus (`data.synth`) of `--clips` clips of 3.2 s stored at `--size` (224: the
short side production shards are written at), H.264 and VP9 + FLAC. The process is pinned to one CPU
(`sched_setaffinity`, like `taskset -c 0`) with one torch thread, so every rate is per core.
* floor: PyAV decode of the frames the sampled window needs (up to its last frame; no colour
  conversion, resize or log-mel) and of the audio track: what no CPU preprocessing can beat.
* loader: `build_loader` (shards -> decode -> preprocess -> collate, `--workers` DataLoader workers
  (default 0: in this process; 1: a worker on the same core, adding the transfer to the trainer), the config's
  batch size and shapes) with `data.repeats=R`, samples counted as handed out.
* before (`--before`): the same loader with the preprocessing of before issue 19 (full-resolution
  RGB, then torch's antialiased interpolate), swapped in for this run only, side by side.
Demand: `vaemo-flops`'s training FLOPs per sample of the config's model x peak x MFU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from datetime import date
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from vaemo_dist.config import Config, DataConfig, SynthConfig, VideoInput, load_config
from vaemo_dist.data import decode_pyav
from vaemo_dist.data.loader import build_loader
from vaemo_dist.data.shards import expand_shards
from vaemo_dist.data.synth import build_corpus
from vaemo_dist.model.flops import PEAK_TFLOPS, account

SECTION = "## Data rate (issue 19)"


def pin_one_core() -> int:
    """Pin this process to its first allowed CPU and torch to one thread; returns the CPU."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    return cpu


def bare_decode(sample: dict[str, Any], frames: int, stride: int) -> None:
    """The floor: decode (no conversion) video frames up to the window's last one, and the audio."""
    video = sample.get("webm") or sample["mp4"]
    with av.open(io.BytesIO(video)) as c:
        stream = c.streams.video[0]
        last = max(decode_pyav.sample_indices(stream.frames or 80, frames, stride))
        for n, _ in enumerate(c.decode(stream)):
            if n >= last:
                break
    with av.open(io.BytesIO(sample["flac"])) as c:
        for frame in c.decode(audio=0):
            frame.to_ndarray()


def legacy_video_tensor(frames: Any, cfg: VideoInput) -> torch.Tensor:
    """The preprocessing before issue 19 (for the 'before' rows): frames -> float, crop, torch's
    antialiased interpolate, normalise."""
    if isinstance(frames, torch.Tensor):  # the new decoder hands a uint8 [T, H, W, 3] tensor
        frames = list(frames.numpy())
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, :, top : top + side, left : left + side]
    if side != cfg.size:
        x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False,
                          antialias=side > cfg.size)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x / 255.0 - mean) / std).permute(1, 0, 2, 3).contiguous()


@contextmanager
def before_issue_19() -> Iterator[None]:
    """Swap the old preprocessing into decode_pyav for the duration (repeats stay available)."""
    saved = decode_pyav.video_tensor
    decode_pyav.video_tensor = legacy_video_tensor
    try:
        yield
    finally:
        decode_pyav.video_tensor = saved


def has_repeats() -> bool:
    return any(f.name == "repeats" for f in fields(DataConfig))


def loader_rate(cfg: Config, folder: Path, clips: int, repeats: int, passes: int, workers: int = 0) -> float:
    """Training samples/s of build_loader over one pass of the corpus (x repeats), median of passes.
    Worker processes inherit this process's CPU affinity: all of it runs on the one pinned core."""
    data = replace(cfg.data, shards=str(folder), num_workers=workers, log_keys="", decoder="pyav",
                   **({"repeats": repeats} if has_repeats() else {}))
    urls = expand_shards(str(folder))
    want = clips * repeats
    times = []
    for _ in range(passes):
        # The clock starts at the first batch (worker start-up is once per run, not per sample) and
        # stops after `clips * repeats` more samples (a pass of the corpus, into the next epoch).
        it = iter(build_loader(urls, data, cfg.inputs, 0, 1))
        next(it)
        n = 0
        start = time.perf_counter()
        for batch in it:
            n += len(batch.keys)
            if n >= want:
                break
        times.append(time.perf_counter() - start)
        del it
    return n / statistics.median(times)


def rate(n: int, run: Callable[[], None], passes: int) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/stage1/base.yaml")
    p.add_argument("--repeats", default="1,2,4", help="comma list of data.repeats values")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--size", default="224", help="stored frame side(s) of the synthetic clips, comma list "
                   "(224: as production shards; the config's size: shards written at training resolution)")
    p.add_argument("--codecs", default="h264,vp9")
    p.add_argument("--passes", type=int, default=3, help="median of this many passes")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers (on the same pinned core; 1 adds the worker -> trainer transfer)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--gpu", default="H100", choices=sorted(PEAK_TFLOPS))
    p.add_argument("--before", action="store_true", help="also time the pre-issue-19 preprocessing")
    p.add_argument("--json", default="", help="write the figures here")
    p.add_argument("--update", default="", help=f"a BENCHMARKS.md whose '{SECTION}' section to replace")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    repeats = [int(r) for r in args.repeats.split(",")]
    if not has_repeats() and repeats != [1]:
        print("data.repeats does not exist in this version: measuring repeats=1 only")
        repeats = [1]
    cpu = pin_one_core()
    v = cfg.inputs.video

    acc = account(cfg.model, cfg.inputs)
    demand = PEAK_TFLOPS[args.gpu] * 1e12 * args.mfu / acc.train_flops

    results: dict[str, Any] = {"config": args.config, "gpu": args.gpu, "mfu": args.mfu,
                               "train_gflop_per_sample": acc.train_flops / 1e9,
                               "gpu_demand_samples_per_s": demand, "codecs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size, codec in [(int(z), c) for z in args.size.split(",") for c in args.codecs.split(",")]:
            synth = SynthConfig(clips=args.clips, clips_per_shard=max(1, args.clips // 4), classes=4,
                                size=size, duration=3.2, codec=codec, seed=11)
            folder = Path(build_corpus(synth, Path(tmp) / f"{codec}-{size}", progress=False))
            tars = sorted(str(x) for x in folder.glob("shard-*.tar"))
            samples = list(wds.WebDataset(tars, shardshuffle=False))

            def floor_pass(samples: list[dict[str, Any]] = samples) -> None:
                for s in samples:
                    bare_decode(s, v.frames, v.stride)

            floor_pass()  # warm-up: lazy imports, caches
            floor = rate(len(samples), floor_pass, args.passes)
            rows: dict[str, Any] = {}
            before = None
            if args.before:  # one sample per decoded clip, as before issue 19
                with before_issue_19():
                    before = loader_rate(cfg, folder, args.clips, 1, args.passes, args.workers)
            for r in repeats:
                row: dict[str, Any] = {}
                if before is not None and r == 1:
                    row["before_samples_per_s_per_core"] = before
                row["samples_per_s_per_core"] = loader_rate(cfg, folder, args.clips, r, args.passes,
                                                            args.workers)
                row["clips_per_s_per_core"] = row["samples_per_s_per_core"] / r
                row["ratio_to_floor_per_clip"] = row["clips_per_s_per_core"] / floor
                row["cores_per_gpu"] = demand / row["samples_per_s_per_core"]
                rows[str(r)] = row
            name = f"{codec}@{size}"
            results["codecs"][name] = {"floor_clips_per_s_per_core": floor, "repeats": rows}
            if before is not None:
                results["codecs"][name]["before_samples_per_s_per_core"] = before
                results["codecs"][name]["before_ratio_to_floor"] = before / floor
                results["codecs"][name]["before_cores_per_gpu"] = demand / before
    # Top-level per-repeats figures: the first codec and size (H.264 at 224: production shards).
    first = next(iter(results["codecs"].values()))
    results["floor_clips_per_s_per_core"] = first["floor_clips_per_s_per_core"]
    results["cores_per_gpu"] = {r: row["cores_per_gpu"] for r, row in first["repeats"].items()}
    results["repeats"] = first["repeats"]
    load = os.getloadavg()[0]
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "pinned_cpu": cpu, "load_1min": load, "date": date.today().isoformat()}

    cmd = "python benchmarks/bench_data.py " + " ".join(argv if argv is not None else os.sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"`{cmd.strip()}` on 1 pinned core of a {os.cpu_count()}-core {platform.machine()} machine, "
        f"{date.today().isoformat()}, 1-minute load {load:.1f} at the end (a shared machine: compare "
        f"rows of this run only). {args.clips} synthetic clips of 3.2 s per codec@stored side; "
        f"config shapes: {v.frames} frames (stride {v.stride}) at {v.size}x{v.size}, "
        f"{cfg.inputs.audio.frames}x{cfg.inputs.audio.n_mels} log-mel, batch {cfg.data.batch_size}, "
        f"{args.workers} DataLoader workers. "
        f"Demand: {acc.train_flops / 1e9:.1f} training GFLOP/sample ({cfg.model.preset}) on one {args.gpu} "
        f"({PEAK_TFLOPS[args.gpu]:.0f} TFLOP/s) at {args.mfu:.0%} MFU = {demand:.0f} samples/s.",
        "",
        "| codec@stored side | repeats | floor clips/s/core | "
        + ("before samples/s/core | " if args.before else "")
        + "samples/s/core | clips/s/core vs floor | cores per GPU |",
        "| --- | ---: | ---: | " + ("---: | " if args.before else "") + "---: | ---: | ---: |",
    ]
    for codec, res in results["codecs"].items():
        for r, row in res["repeats"].items():
            before = ""
            if args.before:
                b = row.get("before_samples_per_s_per_core")
                before = f"{b:.1f} ({b / res['floor_clips_per_s_per_core']:.2f}x floor, " \
                         f"{demand / b:.0f} cores/GPU) | " if b else "- | "
            lines.append(f"| {codec} | {r} | {res['floor_clips_per_s_per_core']:.1f} | {before}"
                         f"{row['samples_per_s_per_core']:.1f} | {row['ratio_to_floor_per_clip']:.2f} | "
                         f"{row['cores_per_gpu']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.update:
        path = Path(args.update)
        old = path.read_text()
        section = re.compile(r"^## Data rate \(issue 19\)\n.*?(?=^## |\Z)", re.S | re.M)
        path.write_text(section.sub(lambda _: text + "\n", old) if section.search(old)
                        else old.rstrip() + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
