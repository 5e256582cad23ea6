"""The device's share of `data.finish: device` (issue 19): time `Batch.to(device)` (YUV->RGB, crop,
antialiased resize, normalisation, log-mel) for a batch of raw clips at a preset's shapes.

    python benchmarks/device/finish_cost.py --device cuda --json finish.json

The clips are synthetic (`vaemo_dist.data.synth`, stored at `--size`, H.264), decoded once on the CPU
by the loader's own function (`decode_repeats(..., raw=True)`) and repeated to `--batch`; the clock
covers host -> device copy and finishing, synchronised, median of `--passes`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from vaemo_dist.config import SynthConfig, load_config
from vaemo_dist.data.decode_pyav import decode_sample
from vaemo_dist.data.synth import build_corpus
from vaemo_dist.data.types import collate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/stage1/base.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="stored frame side of the clips")
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_corpus(SynthConfig(clips=4, clips_per_shard=4, classes=2, size=args.size, duration=3.2,
                                          seed=3), Path(tmp) / "c", progress=False)
        samples = list(wds.WebDataset(sorted(str(x) for x in folder.glob("shard-*.tar")), shardshuffle=False))
    clips = [decode_sample(s, cfg.inputs, raw=True) for s in samples]
    assert all(c.raw is not None for c in clips), "clips were finished in the loader (no chroma_siting?)"
    batch = collate([clips[i % len(clips)] for i in range(args.batch)], {}, cfg.inputs)
    if args.device.startswith("cuda"):
        batch = batch.pin_memory()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    times = []
    for n in range(args.passes + 2):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = batch.to(args.device, dtype)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if n >= 2:  # warm-up: kernels, FFT plans
            times.append(time.perf_counter() - start)
    per_sample_ms = statistics.median(times) / args.batch * 1e3
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "batch": args.batch, "stored_size": args.size, "video": list(out.video.shape),
              "audio": list(out.audio.shape), "ms_per_sample": per_sample_ms,
              "samples_per_s": 1e3 / per_sample_ms}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
