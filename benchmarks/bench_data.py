"""Data supply vs GPU demand (issue 19): training samples/s per CPU core of the real loader path, the
bare-decode floor beside it, and the demand of one H100/H200 at a given MFU, hence CPU cores per GPU.

    python benchmarks/bench_data.py --config configs/stage1/base.yaml --repeats 1,2,4 --json out.json
    python benchmarks/bench_data.py ... --update BENCHMARKS.md   # replace its "## Data rate (issue 19)"
    python benchmarks/bench_data.py --dali --procs 1,2 ...        # also every row of "## Decode"

Method: a synthetic corpus (`data.synth`) of `--clips` clips of 3.2 s stored at `--size` (224: the
short side production shards are written at), H.264 and VP9 + FLAC. The process is pinned to one CPU
(`sched_setaffinity`, like `taskset -c 0`) with one torch thread, so every rate is per core.
* floor: PyAV decode of the frames the sampled window needs (from the keyframe at or before its first
  frame where `data/seek.py` exists, up to its last frame; no colour conversion, resize or log-mel) and
  of the audio track: what no CPU preprocessing can beat.
* lean floor: the floor decoding only what the loader decodes, where this version leaves work out: H.264
  pictures no window frame needs (non-reference B-frames off the window, `seek.frames_from`'s `wanted`),
  audio past the windows' end (`decode_pyav.window_ends`) and the pictures FFmpeg decodes to probe a
  video it opens (`decode_pyav.VIDEO_PROBE`). The loader over the floor says how much
  the whole loader costs beside bare decoding; the loader over the lean floor says what its
  preprocessing and batching cost beside the decoding it does.
* loader: `build_loader` (shards -> decode -> preprocess -> collate, `--workers` DataLoader workers
  (default 0: in this process; 1: a worker on the same core, adding the transfer to the trainer), the config's
  batch size and shapes) with `data.repeats=R`, samples counted as handed out.
* finish (`--finish loader,device`; only `loader` where `DataConfig` has no `finish` field): `loader`
  rows have the loader hand out finished float tensors; `device` rows have it hand out uint8 frames and
  raw waveforms (`Batch.raw`) that `Batch.to(device)` finishes on the trainer's device. The device's
  share is timed apart, here on this CPU (`batch.to("cpu")` of the batches of a pass, after the loader's
  clock stopped), and reported as its own column, never counted in the loader's samples/s.
* DALI (`--dali`): the same loader with `data.decoder=dali` on DALI's CPU backend (VP9 only: the VP9
  corpora), `data.dali_threads` = the cores used, repeats 1, finish `loader`; and the mean DALI-vs-PyAV
  difference on the first clips (frames in 1/255, log-mel in dB).
* procs (`--procs 1,2`): beside the 1-core figures, the same at P cores (the process pinned to P CPUs):
  the floor in P processes, the PyAV loader with P workers, DALI with P threads; repeats 1.
* before (`--before`): the same loader with the preprocessing of before issue 19 (full-resolution
  RGB, then torch's antialiased interpolate), swapped in for this run only, side by side.
Demand: `vaemo-flops`'s training FLOPs per sample of the config's model x peak x MFU.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import date
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from vaemo_dist.config import Config, DataConfig, InputConfig, SynthConfig, VideoInput, load_config
from vaemo_dist.data import decode_pyav
from vaemo_dist.data.loader import build_loader
from vaemo_dist.data.shards import expand_shards
from vaemo_dist.data.synth import build_corpus
from vaemo_dist.model.flops import PEAK_TFLOPS, account

try:  # keyframe seeking (issue 19), where this version has it
    from vaemo_dist.data.seek import frames_from
except ImportError:
    frames_from = None
# Leaving out undecoded pictures and audio past the windows (the lean floor), where this version does.
LEAN = frames_from is not None and "wanted" in inspect.signature(frames_from).parameters and \
    hasattr(decode_pyav, "window_ends")

SECTION = "## Data rate (issue 19)"
FINISH_MODES = ("loader", "device")
# The CPUs this process may run on when it starts (pinning narrows its affinity later).
ALLOWED_CPUS = sorted(os.sched_getaffinity(0))


def pin_cores(n: int) -> list[int]:
    """Pin this process (and the workers it starts later) to the first `n` CPUs it was allowed at
    start, torch to one thread; returns the CPUs."""
    if n < 1 or n > len(ALLOWED_CPUS):
        raise ValueError(f"cannot pin to {n} CPUs: this process may use {len(ALLOWED_CPUS)}")
    cpus = ALLOWED_CPUS[:n]
    os.sched_setaffinity(0, set(cpus))
    torch.set_num_threads(1)
    return cpus


def pin_one_core() -> int:
    """Pin this process to its first allowed CPU and torch to one thread; returns the CPU."""
    return pin_cores(1)[0]


def bare_decode(sample: dict[str, Any], frames: int, stride: int, audio: Any = None,
                lean: bool = False) -> None:
    """The floor: decode (no conversion) video frames up to the window's last one, and the audio.
    Where this version has `data/seek.py`, decoding starts at the keyframe at or before the window's
    first frame (with the encoders' default GOP of 250 frames, a 3.2 s clip's only keyframe is frame 0).
    `lean` (the lean floor; needs `audio`, the AudioInput): leave out the H.264 pictures the window does
    not need and the audio after the window's end, as the loader does."""
    video = sample.get("webm") or sample["mp4"]
    with av.open(io.BytesIO(video), options=getattr(decode_pyav, "VIDEO_PROBE", None) if lean else None) as c:
        stream = c.streams.video[0]
        window = decode_pyav.sample_indices(stream.frames or 80, frames, stride)
        last = max(window)
        if frames_from is None:
            decoded: Iterator[tuple[int, Any]] = enumerate(c.decode(stream))
        else:
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            decoded = frames_from(c, stream, min(window), fps, set(window)) if lean else \
                frames_from(c, stream, min(window), fps)
        for n, _ in decoded:
            if n >= last:
                break
    enough = math.inf
    if lean:
        enough = decode_pyav.window_ends(audio, [(window[0] + window[-1] + 1) / 2.0 / fps])
    with av.open(io.BytesIO(sample["flac"])) as c:
        n = 0
        for frame in c.decode(audio=0):
            frame.to_ndarray()
            n += frame.samples
            if n >= enough:
                break


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


def has_field(name: str) -> bool:
    """Whether this version's DataConfig has the field (the benchmark runs before and after it lands)."""
    return any(f.name == name for f in fields(DataConfig))


def has_repeats() -> bool:
    return has_field("repeats")


def finish_modes(wanted: list[str]) -> list[str]:
    """The finish modes of `wanted` this version can run: only `loader` where DataConfig has no `finish`."""
    unknown = [m for m in wanted if m not in FINISH_MODES]
    if unknown:
        raise ValueError(f"--finish: unknown mode(s) {unknown}; choose from {list(FINISH_MODES)}")
    if not has_field("finish"):
        return [m for m in wanted if m == "loader"]
    return wanted


@dataclass
class LoaderRun:
    """One loader measurement: samples/s handed out (median of passes) and, for finish=device, the
    fraction of samples that came out raw (the rest the loader finished itself: `types.collate`) and
    the seconds per raw sample that `Batch.to("cpu")` took to finish them (median of passes)."""

    samples_per_s: float
    device_s_per_sample: float | None = None
    raw_fraction: float | None = None


def loader_run(cfg: Config, folder: Path, clips: int, repeats: int, passes: int, workers: int = 0,
               decoder: str = "pyav", finish: str | None = None, dali_threads: int = 1) -> LoaderRun:
    """Training samples/s of build_loader over one pass of the corpus (x repeats), median of passes.
    Worker processes inherit this process's CPU affinity: all of it runs on the pinned core(s).
    `finish`: data.finish for this run (None: the field is left alone, for versions without it)."""
    extra: dict[str, Any] = {}
    if has_repeats():
        extra["repeats"] = repeats
    if finish is not None and has_field("finish"):
        extra["finish"] = finish
    data = replace(cfg.data, shards=str(folder), num_workers=workers, log_keys="", decoder=decoder,
                   dali_threads=dali_threads, **extra)
    urls = expand_shards(str(folder))
    # A worker decodes a group of batch_size clips into `repeats` consecutive micro-batches, and the
    # DataLoader takes batches from its workers in turn: the first `repeats x workers` batches are
    # every worker's first group, begun together at start-up. The clock starts once they are handed
    # out (worker start-up, DALI's pipeline build and the first groups are once per run, not per
    # sample) and stops after a pass of the corpus (x repeats), into the next epoch, and at least one
    # more group per worker.
    lanes = max(1, workers)
    skip = repeats * lanes
    want = max(clips * repeats, lanes * repeats * data.batch_size)
    times, device_times, raw, total = [], [], 0, 0
    for _ in range(passes):
        it = iter(build_loader(urls, data, cfg.inputs, 0, 1))
        for _ in range(skip):
            next(it)
        n = 0
        start = time.perf_counter()
        for batch in it:
            n += len(batch.keys)
            if finish == "device":  # how many came out raw (the rest the loader finished itself)
                total += len(batch.keys)
                raw += len(batch.keys) if getattr(batch, "raw", None) is not None else 0
            # As the trainer does once the batch is on its device (Batch.to): its shared-memory blocks go
            # back to the worker that made them (data/buffers.py; where this version has it).
            getattr(batch, "release", lambda: None)()
            if n >= want:
                break
        times.append(time.perf_counter() - start)
        # The device's share is timed on two more batches, after the loader's clock stopped.
        kept = [next(it), next(it)] if finish == "device" else []
        del it
        if finish == "device":
            # The device's share, timed after the loader's clock stopped (no worker competes for the
            # core), over the batches that came out raw.
            raws = [b for b in kept if getattr(b, "raw", None) is not None]
            if raws:
                start = time.perf_counter()
                for b in raws:
                    b.to("cpu")
                device_times.append((time.perf_counter() - start) / sum(len(b.keys) for b in raws))
    if finish == "device" and raw < total:
        print(f"warning: data.finish=device, but {total - raw} of {total} samples came out finished by "
              f"the loader (clips it cannot convert on the device: see data/finish.py)")
    return LoaderRun(n / statistics.median(times),
                     statistics.median(device_times) if device_times else None,
                     raw / total if finish == "device" and total else None)


def loader_rate(cfg: Config, folder: Path, clips: int, repeats: int, passes: int, workers: int = 0) -> float:
    """Samples/s of the PyAV loader as the config finishes batches (see `loader_run`)."""
    return loader_run(cfg, folder, clips, repeats, passes, workers).samples_per_s


def rate(n: int, run: Callable[[], None], passes: int) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def _one_thread() -> None:
    torch.set_num_threads(1)


def floor_rate(samples: list[dict[str, Any]], v: VideoInput, passes: int, procs: int,
               audio: Any = None) -> float:
    """Clips/s of `bare_decode` over `samples` in `procs` processes (1: this one), median of passes,
    after a warm-up pass (lazy imports, caches, the pool's start). With `audio` (an AudioInput): the
    lean floor."""
    fn = functools.partial(bare_decode, frames=v.frames, stride=v.stride, audio=audio, lean=audio is not None)
    if procs == 1:
        def run() -> None:
            for s in samples:
                fn(s)
        run()
        return rate(len(samples), run, passes)
    with ProcessPoolExecutor(procs, initializer=_one_thread) as pool:
        def run_pool() -> None:
            list(pool.map(fn, samples, chunksize=4))
        run_pool()
        return rate(len(samples), run_pool, passes)


def dali_parity(samples: list[dict[str, Any]], inputs: InputConfig) -> tuple[float, float]:
    """Mean |DALI CPU - PyAV| over the clips: frames in 1/255 steps, log-mel in dB."""
    from vaemo_dist.data.decode_dali import DaliDecoder, prepare_sample

    out = DaliDecoder(inputs, len(samples), None, 1).decode([prepare_sample(s, inputs, gpu=False)
                                                             for s in samples])
    if out.failed:
        raise RuntimeError(f"DALI failed on {[e.key for e in out.failed]}")
    std = torch.tensor(inputs.video.std).view(3, 1, 1, 1)
    dv = da = 0.0
    for i, s in enumerate(samples):
        clip = decode_pyav.decode_sample(s, inputs)
        dv += float(((clip.video - out.video[i]) * std * 255).abs().mean())
        da += float((clip.audio - out.audio[i]).abs().mean()) * inputs.audio.std * 10 / math.log(10)
    return dv / len(samples), da / len(samples)


def _row(samples_per_s: float, repeats: int, floor: float, demand: float,
         device_s: float | None = None, raw_fraction: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"samples_per_s_per_core": samples_per_s,
                           "clips_per_s_per_core": samples_per_s / repeats,
                           "ratio_to_floor_per_clip": samples_per_s / repeats / floor,
                           "cores_per_gpu": demand / samples_per_s}
    if device_s is not None:  # the device's share, on this CPU; never in the loader's figures
        row["device_ms_per_sample_on_this_cpu"] = device_s * 1e3
        row["device_samples_per_s_on_this_cpu"] = 1.0 / device_s if device_s > 0 else math.inf
    if raw_fraction is not None:  # finish=device: the share of samples the device finishes
        row["raw_fraction"] = raw_fraction
    return row


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
    p.add_argument("--finish", default="loader,device",
                   help="comma list of data.finish modes to time (loader, device); device only where "
                        "DataConfig has a finish field")
    p.add_argument("--dali", action="store_true",
                   help="also time the loader with DALI's CPU backend (VP9 corpora only) and its parity")
    p.add_argument("--procs", default="1", help="comma list of core counts (1 always runs); >1: the "
                   "floor, PyAV loader and DALI on that many cores, repeats 1")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--gpu", default="H100", choices=sorted(PEAK_TFLOPS))
    p.add_argument("--before", action="store_true", help="also time the pre-issue-19 preprocessing")
    p.add_argument("--json", default="", help="write the figures here")
    p.add_argument("--update", default="", help="a BENCHMARKS.md whose --section to replace")
    p.add_argument("--section", default=SECTION, help="the heading of the section --update replaces")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    # Every argument is checked before any corpus is built or anything is timed.
    if not args.section.startswith("## "):
        p.error(f"--section must be a level-2 heading ('## ...'), got {args.section!r}")
    cfg = load_config(args.config, args.overrides)
    repeats = [int(r) for r in args.repeats.split(",")]
    if not has_repeats() and repeats != [1]:
        print("data.repeats does not exist in this version: measuring repeats=1 only")
        repeats = [1]
    try:
        wanted = [m.strip() for m in args.finish.split(",") if m.strip()]
        modes = finish_modes(wanted)
    except ValueError as e:
        p.error(str(e))
    if not modes:
        p.error(f"--finish {args.finish}: none of these modes exists in this version (only 'loader')")
    if modes != wanted:
        print(f"data.finish does not exist in this version: measuring finish {modes} only")
    procs = sorted({1, *(int(x) for x in args.procs.split(","))})
    if procs[-1] > len(ALLOWED_CPUS):
        p.error(f"--procs {procs[-1]}: this process may use {len(ALLOWED_CPUS)} CPUs")
    codecs = [c.strip() for c in args.codecs.split(",")]
    if args.dali:
        from vaemo_dist.data.decode_dali import dali_available

        if not dali_available():
            p.error("--dali: NVIDIA DALI is not installed")
        if "vp9" not in codecs:
            p.error("--dali: DALI's CPU backend decodes VP9 only; add vp9 to --codecs")
    cpu = pin_one_core()
    v = cfg.inputs.video

    acc = account(cfg.model, cfg.inputs)
    demand = PEAK_TFLOPS[args.gpu] * 1e12 * args.mfu / acc.train_flops

    results: dict[str, Any] = {"config": args.config, "gpu": args.gpu, "mfu": args.mfu,
                               "train_gflop_per_sample": acc.train_flops / 1e9,
                               "gpu_demand_samples_per_s": demand, "finish_modes": modes, "codecs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size, codec in [(int(z), c) for z in args.size.split(",") for c in codecs]:
            synth = SynthConfig(clips=args.clips, clips_per_shard=max(1, args.clips // 4), classes=4,
                                size=size, duration=3.2, codec=codec, seed=11)
            folder = Path(build_corpus(synth, Path(tmp) / f"{codec}-{size}", progress=False))
            tars = sorted(str(x) for x in folder.glob("shard-*.tar"))
            samples = list(wds.WebDataset(tars, shardshuffle=False))

            pin_cores(1)
            floor = floor_rate(samples, v, args.passes, 1)
            res: dict[str, Any] = {"floor_clips_per_s_per_core": floor, "finish": {}}
            lean = floor_rate(samples, v, args.passes, 1, cfg.inputs.audio) if LEAN else None
            if lean is not None:
                res["lean_floor_clips_per_s_per_core"] = lean
            before = None
            if args.before:  # one sample per decoded clip, as before issue 19
                with before_issue_19():
                    before = loader_run(cfg, folder, args.clips, 1, args.passes, args.workers,
                                        finish="loader").samples_per_s
            for mode in modes:
                rows: dict[str, Any] = {}
                for r in repeats:
                    run = loader_run(cfg, folder, args.clips, r, args.passes, args.workers, finish=mode)
                    row = _row(run.samples_per_s, r, floor, demand, run.device_s_per_sample,
                               run.raw_fraction)
                    if lean is not None:
                        row["ratio_to_lean_floor_per_clip"] = run.samples_per_s / r / lean
                    if before is not None and r == 1 and mode == "loader":
                        row["before_samples_per_s_per_core"] = before
                    rows[str(r)] = row
                res["finish"][mode] = {"repeats": rows}
            if before is not None:
                res["before_samples_per_s_per_core"] = before
                res["before_ratio_to_floor"] = before / floor
                res["before_cores_per_gpu"] = demand / before
            if args.dali and codec == "vp9":
                run = loader_run(cfg, folder, args.clips, 1, args.passes, args.workers, decoder="dali",
                                 finish="loader", dali_threads=1)
                res["dali"] = {"threads": 1, **_row(run.samples_per_s, 1, floor, demand)}
                n = min(8, len(samples))
                dv, da = dali_parity(samples[:n], cfg.inputs)
                res["dali_parity"] = {"clips": n, "frames_mean_abs_per_255": dv, "log_mel_mean_abs_db": da}
            # P cores: totals and per core, repeats 1, against the floor in P processes.
            for n_cores in procs[1:]:
                pin_cores(n_cores)
                floor_p = floor_rate(samples, v, args.passes, n_cores)
                multi: dict[str, Any] = {"floor_clips_per_s": floor_p,
                                         "floor_clips_per_s_per_core": floor_p / n_cores, "pyav": {}}
                for mode in modes:
                    run = loader_run(cfg, folder, args.clips, 1, args.passes, n_cores, finish=mode)
                    m = multi["pyav"][mode] = {"samples_per_s": run.samples_per_s,
                                               "samples_per_s_per_core": run.samples_per_s / n_cores,
                                               "ratio_to_floor": run.samples_per_s / floor_p}
                    if run.device_s_per_sample is not None:
                        m["device_ms_per_sample_on_this_cpu"] = 1e3 * run.device_s_per_sample
                    if run.raw_fraction is not None:
                        m["raw_fraction"] = run.raw_fraction
                if args.dali and codec == "vp9":
                    run = loader_run(cfg, folder, args.clips, 1, args.passes, args.workers, decoder="dali",
                                     finish="loader", dali_threads=n_cores)
                    multi["dali"] = {"threads": n_cores, "samples_per_s": run.samples_per_s,
                                     "samples_per_s_per_core": run.samples_per_s / n_cores,
                                     "ratio_to_floor": run.samples_per_s / floor_p}
                res.setdefault("procs", {})[str(n_cores)] = multi
            pin_cores(1)
            results["codecs"][f"{codec}@{size}"] = res
    # Top-level per-repeats figures: the first codec and size (H.264 at 224: production shards), in the
    # headline finish mode: device where it was measured and every sample of it came out raw (then the
    # loader did only its own share; the device's share is the separate device_ms column), else loader.
    # Every mode's figures are under "finish".
    first = next(iter(results["codecs"].values()))
    device_rows = first["finish"].get("device", {}).get("repeats", {})
    all_raw = bool(device_rows) and all(row.get("raw_fraction") == 1.0 for row in device_rows.values())
    headline = "device" if all_raw or "loader" not in modes else "loader"
    results["headline_finish"] = headline
    for res in results["codecs"].values():
        res["repeats"] = res["finish"][headline]["repeats"]
    results["floor_clips_per_s_per_core"] = first["floor_clips_per_s_per_core"]
    results["finish"] = {
        mode: {"samples_per_s_per_core": {r: row["samples_per_s_per_core"] for r, row in rows.items()},
               "cores_per_gpu": {r: row["cores_per_gpu"] for r, row in rows.items()}, "repeats": rows}
        for mode, fin in first["finish"].items() for rows in [fin["repeats"]]}
    results["repeats"] = first["repeats"]
    results["samples_per_s_per_core"] = results["finish"][headline]["samples_per_s_per_core"]
    results["cores_per_gpu"] = results["finish"][headline]["cores_per_gpu"]
    load = os.getloadavg()[0]
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "pinned_cpu": cpu, "load_1min": load, "date": date.today().isoformat()}

    text = report(results, args, argv, cfg, acc.train_flops, demand, load)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.update:
        path = Path(args.update)
        old = path.read_text() if path.exists() else "# Benchmarks\n"
        section = re.compile(rf"^{re.escape(args.section)}\n.*?(?=^## |\Z)", re.S | re.M)
        path.write_text(section.sub(lambda _: text + "\n", old) if section.search(old)
                        else old.rstrip() + "\n\n" + text)
    return 0


def report(results: dict[str, Any], args: argparse.Namespace, argv: list[str] | None, cfg: Config,
           train_flops: float, demand: float, load: float) -> str:
    """The Markdown section: the supply-vs-demand table per finish mode, then the "Decode" rows."""
    v = cfg.inputs.video
    modes, headline = results["finish_modes"], results["headline_finish"]
    cmd = "python benchmarks/bench_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    device_note = (
        " Finish `device`: the loader hands out uint8 frames and raw waveforms; its samples/s exclude "
        "the device's share (colour conversion, crop/resize, normalisation, log-mel in `Batch.to`), "
        "timed apart here on this CPU core (`batch.to(\"cpu\")`; on a GPU it is not measured yet: "
        "benchmarks/device/finish_cost.py times it when one is lent)."
        if "device" in modes else " Finish `loader` only (this version has no `data.finish`).")
    lines = [
        args.section,
        "",
        f"`{cmd.strip()}` on 1 pinned core of a {os.cpu_count()}-core {platform.machine()} machine, "
        f"{date.today().isoformat()}, 1-minute load {load:.1f} at the end (a shared machine: compare "
        f"rows of this run only). {args.clips} synthetic clips of 3.2 s per codec@stored side; "
        f"config shapes: {v.frames} frames (stride {v.stride}) at {v.size}x{v.size}, "
        f"{cfg.inputs.audio.frames}x{cfg.inputs.audio.n_mels} log-mel, batch {cfg.data.batch_size}, "
        f"{args.workers} DataLoader workers; median of {args.passes} passes. "
        f"Demand: {train_flops / 1e9:.1f} training GFLOP/sample ({cfg.model.preset}) on one {args.gpu} "
        f"({PEAK_TFLOPS[args.gpu]:.0f} TFLOP/s) at {args.mfu:.0%} MFU = {demand:.0f} samples/s."
        + device_note + f" Headline (JSON top level): finish `{headline}`.",
        "",
        "| codec@stored side | repeats | finish | floor clips/s/core | "
        + ("before samples/s/core | " if args.before else "")
        + "samples/s/core | clips/s/core vs floor | vs lean floor | cores per GPU | device share, this CPU |",
        "| --- | ---: | --- | ---: | " + ("---: | " if args.before else "")
        + "---: | ---: | ---: | ---: | ---: |",
    ]
    for codec, res in results["codecs"].items():
        floor = res["floor_clips_per_s_per_core"]
        for r in res["repeats"]:
            for mode in modes:
                row = res["finish"][mode]["repeats"][r]
                before = ""
                if args.before:
                    b = row.get("before_samples_per_s_per_core")
                    before = (f"{b:.1f} ({b / floor:.2f}x floor, {demand / b:.0f} cores/GPU) | " if b
                              else "- | ")
                dev = row.get("device_ms_per_sample_on_this_cpu")
                share = f"{dev:.1f} ms/sample ({1e3 / dev:.0f} samples/s)" if dev else "-"
                if row.get("raw_fraction", 1.0) < 1.0:
                    share += f", {row['raw_fraction']:.0%} of samples raw"
                lean_ratio = row.get("ratio_to_lean_floor_per_clip")
                vs_lean = f"{lean_ratio:.2f} ({res['lean_floor_clips_per_s_per_core']:.1f})" if lean_ratio \
                    else "-"
                lines.append(f"| {codec} | {r} | {mode} | {floor:.1f} | {before}"
                             f"{row['samples_per_s_per_core']:.1f} | {row['ratio_to_floor_per_clip']:.2f} | "
                             f"{vs_lean} | {row['cores_per_gpu']:.1f} | {share} |")

    # The rows of BENCHMARKS.md "## Decode": floor, PyAV and DALI decode + preprocess, per core count.
    lines += ["", "Decode + preprocess per path and core count (repeats 1; 1 core: the rows above; P cores: "
              "the process pinned to P CPUs, the floor in P processes, the PyAV loader with P workers, "
              "DALI with P threads):", "",
              "| path | codec@stored side | cores | clips/s | clips/s/core | vs floor (same cores) |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for codec, res in results["codecs"].items():
        floor = res["floor_clips_per_s_per_core"]
        lines.append(f"| PyAV bare decode (floor) | {codec} | 1 | {floor:.1f} | {floor:.1f} | 1.00 |")
        if "1" in res["repeats"]:  # decode + preprocess per clip: the repeats-1 rows
            for mode in modes:
                s = res["finish"][mode]["repeats"]["1"]["samples_per_s_per_core"]
                lines.append(f"| PyAV loader, finish {mode} | {codec} | 1 | {s:.1f} | {s:.1f} | "
                             f"{s / floor:.2f} |")
        if "dali" in res:
            s = res["dali"]["samples_per_s_per_core"]
            lines.append(f"| DALI CPU loader, 1 thread | {codec} | 1 | {s:.1f} | {s:.1f} | {s / floor:.2f} |")
        for n_cores, multi in res.get("procs", {}).items():
            fp = multi["floor_clips_per_s"]
            lines.append(f"| PyAV bare decode (floor), {n_cores} proc | {codec} | {n_cores} | {fp:.1f} | "
                         f"{fp / int(n_cores):.1f} | 1.00 |")
            for mode, m in multi["pyav"].items():
                lines.append(f"| PyAV loader, finish {mode}, {n_cores} workers | {codec} | {n_cores} | "
                             f"{m['samples_per_s']:.1f} | {m['samples_per_s_per_core']:.1f} | "
                             f"{m['ratio_to_floor']:.2f} |")
            if "dali" in multi:
                m = multi["dali"]
                lines.append(f"| DALI CPU loader, {n_cores} threads | {codec} | {n_cores} | "
                             f"{m['samples_per_s']:.1f} | {m['samples_per_s_per_core']:.1f} | "
                             f"{m['ratio_to_floor']:.2f} |")
    for codec, res in results["codecs"].items():
        if "dali_parity" in res:
            par = res["dali_parity"]
            lines += ["", f"DALI CPU vs PyAV on the same {codec} clips (first {par['clips']}): frames "
                      f"differ by {par['frames_mean_abs_per_255']:.1e}/255 on average, log-mel by "
                      f"{par['log_mel_mean_abs_db']:.1e} dB (tests/data/test_decode_dali.py holds them to "
                      "2/255 and 0.1 dB)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
