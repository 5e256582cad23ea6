"""Shard layout for decode speed: keyframe interval (GOP length) against the cost of decoding a window.

    python benchmarks/bench_layout.py                  # print the table (~2-3 minutes)
    python benchmarks/bench_layout.py --json out.json  # and write every figure

Synthetic clips (vaemo_dist/data/synth.py, H.264 at 224x224, 25 fps) of each `--durations` are
encoded with each `--keyints` (0: x264's default, 250; 1: all intra) and at each `--fps-div` k: a
variant that stores every k-th frame (frames[::k]) at 25/k fps (k = 4: 6.25 fps, stream rate the exact
fraction 25/4), keyints counted in stored frames. For each, the centred window of the base preset
(16 frames, stride 4: 61 frames span) is decoded, on a k-variant as 16 frames at stride 4/k: the same
instants up to the storage grid (the centred window of the stored frames may start up to k-1 source
frames earlier; the table's "first" column gives the window's first frame in source frames). Three ways,
side by side in one run on one pinned core (one torch thread):

* today: from the clip's first frame up to the window's last (a plain sequential decode), converting
  only the window's frames to RGB;
* seek: from the keyframe at or before the window's first frame (data/seek.py `frames_from`), the
  same conversion;
* loader: what the loader does since session 7: the seek, leaving out the H.264 pictures no window frame
  needs (`frames_from`'s `wanted`), and the container opened with `decode_pyav.VIDEO_PROBE`.

All give the same frames (checked on every clip). Timings are the fastest of `--rounds` passes over
all clips (the machine may be shared); per-clip rate = 1 / time per clip, on one core. "vs today" is a
row's seek rate over the rate of its clip length's 25 fps default-GOP row decoded from the start (how
shards are written and read today), measured in the same run: compare these ratios across machines,
not the absolute times. Only video is decoded: the audio cost does not depend on the layout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch

from vaemo_dist.config import SynthConfig
from vaemo_dist.data import synth
from vaemo_dist.data.decode_pyav import RGB_CONVERSION, VIDEO_PROBE, window_indices
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


WAYS = ("today", "seek", "loader")


def decode_window(data: bytes, wanted: list[int], way: str) -> tuple[dict[int, np.ndarray], int]:
    """The window's frames as RGB ({index: array}) and how many frames were decoded, one of WAYS."""
    last, kept, decoded = max(wanted), {}, 0
    with av.open(io.BytesIO(data), options=VIDEO_PROBE if way == "loader" else None) as container:
        stream = container.streams.video[0]
        if way != "today":
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            leave_out = set(wanted) if way == "loader" else None
            frames = frames_from(container, stream, min(wanted), fps, leave_out)
        else:
            frames = enumerate(container.decode(stream))
        for index, frame in frames:
            decoded += 1
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24", interpolation=RGB_CONVERSION)
            if index >= last:
                break
    return kept, decoded


def stored_rate(fps_div: int) -> Fraction:
    """The stream rate of a variant keeping every `fps_div`-th frame of the 25 fps clip: exactly 25/k."""
    return Fraction(synth.FPS, fps_div)


def encode_set(durations: list[float], keyints: list[int], clips: int, size: int, fps_divs: list[int]
               ) -> dict[tuple[float, int, int], list[bytes]]:
    """{(duration, fps_div, keyint): encoded clips}; each clip's raw frames are made once for all
    variants, and a `fps_div` k variant stores frames[::k] at 25/k fps."""
    out: dict[tuple[float, int, int], list[bytes]] = {
        (d, v, k): [] for d in durations for v in fps_divs for k in keyints}
    for d in durations:
        cfg = SynthConfig(size=size, duration=d, classes=4, clips=clips)
        for index, label in enumerate(synth.clip_labels(cfg)):
            frames, _ = synth.clip_media(cfg, index, label)
            for v in fps_divs:
                for k in keyints:
                    out[(d, v, k)].append(synth.encode_video(frames[::v], stored_rate(v),  # type: ignore[arg-type]
                                                             "h264", keyint=k))
    return out


def source_window(total: int, frames: int, stride: int, fps_div: int) -> list[int]:
    """The window a `fps_div` variant of a `total`-frame 25 fps clip decodes, in source frame indices:
    the centred window of 16 frames at stride/k over its ceil(total / k) stored frames, times k."""
    stored = -(-total // fps_div)
    return [i * fps_div for i in window_indices(stored, frames, stride // fps_div)]


def measure(clips: list[bytes], frames: int, stride: int, rounds: int) -> dict[str, Any]:
    windows, totals = [], []
    for data in clips:
        with av.open(io.BytesIO(data)) as container:
            totals.append(container.streams.video[0].frames)
        windows.append(window_indices(totals[-1], frames, stride))
    decoded = dict.fromkeys(WAYS, 0)
    for data, wanted in zip(clips, windows):  # same frames every way (and a warm-up)
        reference, n = decode_window(data, wanted, "today")
        decoded["today"] += n
        for way in WAYS[1:]:
            got, n = decode_window(data, wanted, way)
            if got.keys() != reference.keys() or any(not np.array_equal(got[i], reference[i]) for i in got):
                raise AssertionError(f"{way} gave other frames than decoding from the start")
            decoded[way] += n
    best = dict.fromkeys(WAYS, float("inf"))
    for _ in range(rounds):
        for way in WAYS:  # alternated, so drifts of a shared machine hit every way alike
            start = time.perf_counter()
            for data, wanted in zip(clips, windows):
                decode_window(data, wanted, way)
            best[way] = min(best[way], (time.perf_counter() - start) / len(clips))
    n = len(clips)
    return {
        "bytes_per_clip": sum(map(len, clips)) / n,
        "frames_per_clip": totals[0],
        "window_first": windows[0][0], "window_last": windows[0][-1],
        **{f"decoded_per_clip_{w}": decoded[w] / n for w in WAYS},
        **{f"ms_per_clip_{w}": 1e3 * best[w] for w in WAYS},
        **{f"clips_per_s_per_core_{w}": 1.0 / best[w] for w in WAYS},
        "speedup": best["today"] / best["seek"], "loader_speedup": best["today"] / best["loader"],
    }


def vs_today(row: dict[str, Any], rows: list[dict[str, Any]], way: str = "seek") -> float | None:
    """The row's rate decoded `way` over the rate of its clip length's 25 fps default-GOP row decoded
    from the start (shards as written and read before issue 19), or None when `rows` has no such row."""
    for r in rows:
        if r["duration"] == row["duration"] and r.get("fps_div", 1) == 1 and r["keyint"] == 0:
            return row[f"clips_per_s_per_core_{way}"] / r["clips_per_s_per_core_today"]
    return None


def table(rows: list[dict[str, Any]], all_rows: list[dict[str, Any]] | None = None) -> str:
    """Markdown table of `rows`; "vs today" looks for its baseline among `all_rows` (default: `rows`)."""
    lines = ["| clip | fps | keyint | first | KiB/clip | frames decoded today / seek | ms/clip today | "
             "ms/clip seek | clips/s/core today | clips/s/core seek | seek speed-up | vs today | "
             "frames decoded loader | ms/clip loader | loader vs today |",
             "| --- | ---: | --- |" + " ---: |" * 12]
    for r in rows:
        keyint = {0: "default (250)", 1: "1 (all intra)"}.get(r["keyint"], str(r["keyint"]))
        clip = f"{r['duration']:g} s ({r['frames_per_clip']} fr)"
        ratio = vs_today(r, rows if all_rows is None else all_rows)
        has_loader = "ms_per_clip_loader" in r  # rows of JSON written before the loader way existed
        loader = vs_today(r, rows if all_rows is None else all_rows, "loader") if has_loader else None
        lines.append(
            f"| {clip} | {r.get('fps', 25):g} | {keyint} | {r.get('window_first_source', r['window_first'])} "
            "| "
            f"{r['bytes_per_clip'] / 1024:.1f} | "
            f"{r['decoded_per_clip_today']:.0f} / {r['decoded_per_clip_seek']:.0f} | "
            f"{r['ms_per_clip_today']:.2f} | {r['ms_per_clip_seek']:.2f} | "
            f"{r['clips_per_s_per_core_today']:.0f} | {r['clips_per_s_per_core_seek']:.0f} | "
            f"{r['speedup']:.2f}x | {'-' if ratio is None else f'{ratio:.2f}x'} | "
            + (f"{r['decoded_per_clip_loader']:.0f} | {r['ms_per_clip_loader']:.2f} | "
               f"{'-' if loader is None else f'{loader:.2f}x'} |" if has_loader else "- | - | - |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16, help="clips per duration")
    p.add_argument("--durations", default="3.2,8", help="clip lengths in seconds, comma-separated")
    p.add_argument("--keyints", default="0,50,25,12,1", help="GOP lengths (0: the encoder's default)")
    p.add_argument("--size", type=int, default=224, help="stored frame side")
    p.add_argument("--frames", type=int, default=16, help="window frames (base preset: 16)")
    p.add_argument("--stride", type=int, default=4, help="window stride (base preset: 4)")
    p.add_argument("--fps-div", default="1,4",
                   help="frame-rate variants: k stores every k-th frame at 25/k fps (k must divide --stride)")
    p.add_argument("--rounds", type=int, default=5, help="timed passes; the fastest counts")
    p.add_argument("--cpu", type=int, default=None, help="the CPU to pin to (default: the first allowed)")
    p.add_argument("--json", default="", help="write every figure to this file")
    args = p.parse_args(argv)
    durations = [float(x) for x in args.durations.split(",")]
    keyints = [int(x) for x in args.keyints.split(",")]
    try:
        fps_divs = [int(x) for x in args.fps_div.split(",")]
    except ValueError:
        p.error(f"--fps-div takes comma-separated integers, got {args.fps_div!r}")
    if args.clips < 1 or args.rounds < 1 or min(keyints) < 0 or args.size % 2:
        p.error("--clips and --rounds >= 1, --keyints >= 0, --size even")
    if args.stride < 1 or any(v < 1 or args.stride % v for v in fps_divs):
        p.error(f"--fps-div values must be >= 1 and divide --stride {args.stride} (the window keeps its "
                f"instants at stride / k), got {args.fps_div!r}")
    cpu = pin(args.cpu)
    start = time.perf_counter()
    encoded = encode_set(durations, keyints, args.clips, args.size, fps_divs)
    encode_s = time.perf_counter() - start
    rows = []
    for d in durations:
        for v in fps_divs:
            for k in keyints:
                row = measure(encoded[(d, v, k)], args.frames, args.stride // v, args.rounds)
                # Where the window sits in source frames, beside the full-rate window of the same clip.
                total = round(d * synth.FPS)
                src = source_window(total, args.frames, args.stride, v)
                full = window_indices(total, args.frames, args.stride)
                if row["window_first"] * v != src[0]:
                    raise AssertionError(f"stored window {row['window_first']} is not source frame {src[0]}")
                rows.append({"duration": d, "fps_div": v, "fps": float(stored_rate(v)), "keyint": k,
                             "window_first_source": src[0], "window_offset_source": src[0] - full[0],
                             **row})
    print(table(rows))
    meta = {"cpu": cpu, "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "pyav": av.__version__,
            "libavcodec": av.library_versions.get("libavcodec"), "clips": args.clips, "size": args.size,
            "window": {"frames": args.frames, "stride": args.stride}, "fps_div": fps_divs,
            "rounds": args.rounds,
            "encode_s": encode_s, "total_s": time.perf_counter() - start}
    print(f"\n{args.clips} synthetic clips per row, H.264 {args.size}x{args.size} at 25/k fps "
          f"(k in {fps_divs}; x264 veryfast crf 23, keyint in stored frames); "
          f"window {args.frames} frames stride {args.stride}/k, centred; one core (CPU {cpu}), fastest of "
          f"{args.rounds} passes; {meta['total_s']:.0f} s in all", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "meta": meta}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
