"""Shard layout for decode speed: keyframe interval (GOP length) against the cost of decoding a window.

    python benchmarks/bench_layout.py                  # print the table (~2-3 minutes)
    python benchmarks/bench_layout.py --json out.json  # and write every figure

Synthetic clips (vaemo_dist/data/synth.py, H.264 at 224x224, 25 fps) of each `--durations` are
encoded with each `--keyints` (0: x264's default, 250; 1: all intra). For each, the centred window of
the base preset (16 frames, stride 4: 61 frames span) is decoded two ways, side by side in one run
on one pinned core (one torch thread):

* today: from the clip's first frame up to the window's last (decode_pyav.decode_video_windows'
  loop), converting only the window's frames to RGB;
* seek: from the keyframe at or before the window's first frame (data/seek.py `frames_from`), the
  same conversion.

Both give the same frames (checked on every clip). Timings are the fastest of `--rounds` passes over
all clips (the machine may be shared); per-clip rate = 1 / time per clip, on one core. Only video is
decoded: the audio cost does not depend on the layout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from typing import Any

import av
import numpy as np
import torch

from vaemo_dist.config import SynthConfig
from vaemo_dist.data import synth
from vaemo_dist.data.decode_pyav import RGB_CONVERSION, window_indices
from vaemo_dist.data.seek import frames_from


def pin(cpu: int | None) -> int:
    """Pin this process to one CPU (default: the first it may use) and torch to one thread."""
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[0] if cpu is None else cpu
    if cpu not in allowed:
        raise SystemExit(f"--cpu {cpu} is not among the CPUs this process may use: {allowed}")
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    return cpu


def decode_window(data: bytes, wanted: list[int], seek: bool) -> tuple[dict[int, np.ndarray], int]:
    """The window's frames as RGB ({index: array}) and how many frames were decoded."""
    last, kept, decoded = max(wanted), {}, 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        if seek:
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            frames = frames_from(container, stream, min(wanted), fps)
        else:
            frames = enumerate(container.decode(stream))
        for index, frame in frames:
            decoded += 1
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24", interpolation=RGB_CONVERSION)
            if index >= last:
                break
    return kept, decoded


def encode_set(durations: list[float], keyints: list[int], clips: int, size: int
               ) -> dict[tuple[float, int], list[bytes]]:
    """{(duration, keyint): encoded clips}; each clip's raw frames are made once for all keyints."""
    out: dict[tuple[float, int], list[bytes]] = {(d, k): [] for d in durations for k in keyints}
    for d in durations:
        cfg = SynthConfig(size=size, duration=d, classes=4, clips=clips)
        for index, label in enumerate(synth.clip_labels(cfg)):
            frames, _ = synth.clip_media(cfg, index, label)
            for k in keyints:
                out[(d, k)].append(synth.encode_video(frames, synth.FPS, "h264", keyint=k))
    return out


def measure(clips: list[bytes], frames: int, stride: int, rounds: int) -> dict[str, Any]:
    windows, totals = [], []
    for data in clips:
        with av.open(io.BytesIO(data)) as container:
            totals.append(container.streams.video[0].frames)
        windows.append(window_indices(totals[-1], frames, stride))
    decoded = {"today": 0, "seek": 0}
    for data, wanted in zip(clips, windows):  # same frames both ways (and a warm-up)
        a, decoded_today = decode_window(data, wanted, seek=False)
        b, decoded_seek = decode_window(data, wanted, seek=True)
        if a.keys() != b.keys() or any(not np.array_equal(a[i], b[i]) for i in a):
            raise AssertionError("seeking gave other frames than decoding from the start")
        decoded["today"] += decoded_today
        decoded["seek"] += decoded_seek
    best = {"today": float("inf"), "seek": float("inf")}
    for _ in range(rounds):
        for way in ("today", "seek"):  # alternated, so drifts of a shared machine hit both alike
            start = time.perf_counter()
            for data, wanted in zip(clips, windows):
                decode_window(data, wanted, seek=way == "seek")
            best[way] = min(best[way], (time.perf_counter() - start) / len(clips))
    n = len(clips)
    return {
        "bytes_per_clip": sum(map(len, clips)) / n,
        "frames_per_clip": totals[0],
        "window_first": windows[0][0], "window_last": windows[0][-1],
        "decoded_per_clip_today": decoded["today"] / n, "decoded_per_clip_seek": decoded["seek"] / n,
        "ms_per_clip_today": 1e3 * best["today"], "ms_per_clip_seek": 1e3 * best["seek"],
        "clips_per_s_per_core_today": 1.0 / best["today"], "clips_per_s_per_core_seek": 1.0 / best["seek"],
        "speedup": best["today"] / best["seek"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| clip | keyint | KiB/clip | frames decoded today / seek | ms/clip today | ms/clip seek | "
             "clips/s/core today | clips/s/core seek | seek speed-up |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        keyint = {0: "default (250)", 1: "1 (all intra)"}.get(r["keyint"], str(r["keyint"]))
        clip = f"{r['duration']:g} s ({r['frames_per_clip']} fr)"
        lines.append(
            f"| {clip} | {keyint} | {r['bytes_per_clip'] / 1024:.1f} | "
            f"{r['decoded_per_clip_today']:.0f} / {r['decoded_per_clip_seek']:.0f} | "
            f"{r['ms_per_clip_today']:.2f} | {r['ms_per_clip_seek']:.2f} | "
            f"{r['clips_per_s_per_core_today']:.0f} | {r['clips_per_s_per_core_seek']:.0f} | "
            f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16, help="clips per duration")
    p.add_argument("--durations", default="3.2,8", help="clip lengths in seconds, comma-separated")
    p.add_argument("--keyints", default="0,50,25,12,1", help="GOP lengths (0: the encoder's default)")
    p.add_argument("--size", type=int, default=224, help="stored frame side")
    p.add_argument("--frames", type=int, default=16, help="window frames (base preset: 16)")
    p.add_argument("--stride", type=int, default=4, help="window stride (base preset: 4)")
    p.add_argument("--rounds", type=int, default=5, help="timed passes; the fastest counts")
    p.add_argument("--cpu", type=int, default=None, help="the CPU to pin to (default: the first allowed)")
    p.add_argument("--json", default="", help="write every figure to this file")
    args = p.parse_args(argv)
    durations = [float(x) for x in args.durations.split(",")]
    keyints = [int(x) for x in args.keyints.split(",")]
    if args.clips < 1 or args.rounds < 1 or min(keyints) < 0 or args.size % 2:
        p.error("--clips and --rounds >= 1, --keyints >= 0, --size even")
    cpu = pin(args.cpu)
    start = time.perf_counter()
    encoded = encode_set(durations, keyints, args.clips, args.size)
    encode_s = time.perf_counter() - start
    rows = []
    for d in durations:
        for k in keyints:
            rows.append({"duration": d, "keyint": k, **measure(encoded[(d, k)], args.frames, args.stride,
                                                              args.rounds)})
    print(table(rows))
    meta = {"cpu": cpu, "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "pyav": av.__version__,
            "libavcodec": av.library_versions.get("libavcodec"), "clips": args.clips, "size": args.size,
            "window": {"frames": args.frames, "stride": args.stride}, "rounds": args.rounds,
            "encode_s": encode_s, "total_s": time.perf_counter() - start}
    print(f"\n{args.clips} synthetic clips per row, H.264 {args.size}x{args.size} 25 fps "
          "(x264 veryfast crf 23); "
          f"window {args.frames} frames stride {args.stride}, centred; one core (CPU {cpu}), fastest of "
          f"{args.rounds} passes; {meta['total_s']:.0f} s in all", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "meta": meta}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
