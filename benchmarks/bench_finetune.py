"""Fine-tuning step time and data wait on a user-like corpus at a camera's resolution.

    python benchmarks/bench_finetune.py                         # this checkout
    mkdir -p /tmp/before && git archive f55086b | tar -x -C /tmp/before   # before issue 14, same clips
    python benchmarks/bench_finetune.py --repo /tmp/before --label before

Makes (once, under --work) a labelled corpus as a user would bring it: --clips mp4 files (H.264 +
stereo AAC 44.1 kHz, --width x --height, 30 fps, 3 s, PyAV via `vaemo_dist.data.synth.write_media_file`),
4 classes, 4 speakers, and `clips.csv` (path,label,speaker); and a randomly initialised export of the
tiny preset with configs/stage1/tiny.yaml's inputs (video 16 frames at 96 px, audio 256x128). Then runs
`launchers/finetune.py --mode finetune` of `--repo` on fold 1 of 4 clip-level folds (the same folds in
every version), one process, `--steps` steps, and reads that fold's metrics.jsonl: the median
`step_time_s` and the mean `data_wait_frac` over the steps after the first two, plus the whole
command's wall time (which includes preparing the training clips).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ("angry", "happy", "neutral", "sad")
SPEAKERS = ("s1", "s2", "s3", "s4")


def make_corpus(folder: Path, clips: int, width: int, height: int) -> Path:
    from vaemo_dist.data.synth import write_media_file

    csv = folder / "clips.csv"
    if csv.is_file():
        return csv
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,speaker"]
    for i in range(clips):
        name = f"clip{i:03d}.mp4"
        write_media_file(folder / name, seconds=3.0, fps=30, width=width, height=height, seed=i)
        rows.append(f"{name},{CLASSES[i % len(CLASSES)]},{SPEAKERS[(i // len(CLASSES)) % len(SPEAKERS)]}")
    csv.write_text("\n".join(rows) + "\n")
    return csv


def make_export(folder: Path) -> Path:
    import torch

    from vaemo_dist.config import load_config
    from vaemo_dist.export import is_decoder_key, save_pretrained
    from vaemo_dist.model.vaemo import VAEmoModel

    if (folder / "model.safetensors").is_file():
        return folder
    cfg = load_config(str(REPO / "configs/stage1/tiny.yaml"), [])
    torch.manual_seed(0)
    state = VAEmoModel(cfg.model, cfg.inputs).state_dict()
    return save_pretrained(folder, {k: v for k, v in state.items() if not is_decoder_key(k)}, cfg,
                           source={"note": "random weights, for timing"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=str(REPO), help="the checkout whose launchers/finetune.py runs")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--work", default="data_cache/bench_finetune", help="corpus, export and runs")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    work = Path(args.work).resolve()
    t0 = time.perf_counter()
    csv = make_corpus(work / f"corpus-{args.width}x{args.height}-{args.clips}", args.clips, args.width,
                      args.height)
    export = make_export(work / "export-tiny")
    print(f"corpus and export ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    repo = Path(args.repo).resolve()
    launcher = repo / "launchers" / "finetune.py"
    help_text = subprocess.run([sys.executable, str(launcher), "--help"], capture_output=True,
                               text=True).stdout
    out = work / f"run-{args.label.replace(' ', '_')}-{int(time.time())}"
    cmd = [sys.executable, str(launcher), "--mode", "finetune", "--pretrained", str(export),
           "--data", str(csv), "--kfold", "4", "--folds", "1", "--seed", "0", "--out", str(out),
           f"train.steps={args.steps}", "train.log_every=1", "wandb.mode=disabled"]
    if "--group-by" in help_text:
        cmd[cmd.index("--out"):cmd.index("--out")] = ["--group-by", "none"]  # the folds older versions make
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        return proc.returncode
    records = [json.loads(line) for line in (out / "fold_1" / "metrics.jsonl").open()]
    steps = [r for r in records if "step_time_s" in r and r.get("step", 0) > 2]
    step_time = statistics.median(r["step_time_s"] for r in steps)
    wait = statistics.mean(r["data_wait_frac"] for r in steps)
    result = {"label": args.label, "repo": str(repo), "clips": args.clips,
              "source": f"{args.width}x{args.height} 30 fps 3 s", "steps_measured": len(steps),
              "median_step_s": round(step_time, 3), "mean_data_wait_frac": round(wait, 3),
              "wall_s": round(wall, 1), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine()}
    print(json.dumps(result))
    print(f"| {args.label} | {args.width}x{args.height} | {step_time:.2f} s | {100 * wait:.0f} % "
          f"| {wall:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
