"""Training-step time, throughput, TFLOP/s, MFU and peak memory of the stage-1 model, data path left out.

    python benchmarks/bench_step.py                                    # CPU: tiny, fp32, batch 8
    python benchmarks/bench_step.py --device cuda --presets small,base,large --batch 32 --json step.json
    python benchmarks/bench_step.py --presets base --zero 2 train.grad_accum=2    # extra config overrides
    python benchmarks/bench_step.py --compile                          # parallel.compile=true (per block)
    python benchmarks/bench_step.py --presets base --decoder full,cross --precision fp32 --device cpu
                                                     # the two reconstruction decoders side by side
    python benchmarks/bench_step.py --presets base --batch 2 --precision fp32 --device cpu \
        --loop plain,engine-ds-defaults,engine       # the engine's overhead over a plain torch loop

What runs is the trainer's own inner step on random tensors of the configured input shapes: the model
and loss of stage 1 (`vaemo_dist.stages.Stage1`), `parallelize`, the optimizer and schedule of
`vaemo_dist.train`, one DeepSpeed engine in a world of one (`deepspeed_config` as the trainer builds
it), then per step `engine.backward(loss); engine.step()`. Comparing its step time with a real run's
`step_time_s` says how much of the run is model and how much is data and communication.

`--loop` picks what drives the step, several side by side: `engine` (the default, as above),
`engine-ds-defaults` (the same engine with `zero_optimization` cut back to the stage alone, i.e.
DeepSpeed's own defaults for contiguous_gradients, bucket sizes and the rest: what the trainer used
before issue 19) and `plain` (no DeepSpeed: `loss.backward()`, `clip_grad_norm_`, `optimizer.step()`,
`scheduler.step()`, `zero_grad`, the same model, optimizer and schedule). Rows of one preset and
decoder get `vs plain`: their step time over the plain loop's.

Each preset runs in a fresh subprocess (its own allocator, its own DeepSpeed world). Times: median of
the timed steps after the warm-up steps (CUDA synchronised around each step). FLOPs are the model's
analytic training FLOPs (`vaemo_dist.model.flops.account`, checked against torch's flop counter in
tests/model/test_flops.py); MFU uses the device's bf16 dense peak when it is known. Peak memory: CUDA
`max_memory_allocated`, CPU the growth of the peak resident size over the run (whole process).
`first_step_s` is the first warm-up step alone: with `--compile` it holds the compile time (set
TORCHINDUCTOR_CACHE_DIR to a fresh folder to measure a cold compile).
On CPU, set OMP_NUM_THREADS to what one rank of a run gets (1 with the README's launch on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LOOPS = ("engine", "engine-ds-defaults", "plain")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(preset: str, args: argparse.Namespace) -> dict:
    """One preset, in this process: build, warm up, time `args.steps` steps."""
    import deepspeed
    import torch

    from vaemo_dist import dist
    from vaemo_dist.config import load_config
    from vaemo_dist.data.types import Batch
    from vaemo_dist.model import attention
    from vaemo_dist.model.flops import account, peak_tflops
    from vaemo_dist.model.parallelize import parallelize
    from vaemo_dist.stages import Stage1
    from vaemo_dist.train.schedule import build_optimizer, warmup_cosine
    from vaemo_dist.train.trainer import deepspeed_config, use_bf16

    overrides = [f"model.preset={preset}", f"data.batch_size={args.batch}", f"train.zero_stage={args.zero}",
                 f"train.precision={args.precision}", f"train.steps={args.warmup + args.steps}",
                 f"parallel.activation_checkpointing={str(args.activation_checkpointing).lower()}",
                 f"parallel.compile={str(args.compile).lower()}",
                 *args.overrides]
    cfg = load_config(args.config, overrides)
    info = dist.init_distributed()
    rss_before = _max_rss_bytes()
    torch.manual_seed(0)
    stage = Stage1(cfg)  # the exact model and loss a stage-1 run trains
    model, compute_loss = stage.build_model(info), stage.loss
    model = parallelize(model, cfg.parallel)
    bf16 = use_bf16(cfg, info.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = warmup_cosine(optimizer, cfg.train.steps, cfg.optim)
    if args.loop == "plain":
        if bf16:
            raise SystemExit("--loop plain runs fp32 only (bf16 is DeepSpeed's mixed precision): "
                             "--precision fp32")
        engine = model
    else:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ds_config = deepspeed_config(cfg, info.dp_size, bf16, n_params)  # as the trainer builds it
        if args.loop == "engine-ds-defaults":
            ds_config["zero_optimization"] = {"stage": cfg.train.zero_stage}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
    dtype = torch.bfloat16 if bf16 else torch.float32
    v, a, b = cfg.inputs.video, cfg.inputs.audio, cfg.data.batch_size
    batch = Batch(video=torch.randn(b, 3, v.frames, v.size, v.size),
                  audio=torch.randn(b, 1, a.frames, a.n_mels),
                  keys=[f"bench-{i}" for i in range(b)], label=torch.full((b,), -1)).to(info.device, dtype)
    cuda = info.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times, losses, first_step = [], [], 0.0
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        for _ in range(cfg.train.grad_accum):
            loss, _ = compute_loss(engine, batch)
            if args.loop == "plain":
                (loss / cfg.train.grad_accum).backward()
            else:
                engine.backward(loss)
                engine.step()
        if args.loop == "plain":
            if cfg.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        if i == 0:
            first_step = time.perf_counter() - t0  # with parallel.compile: the compile time, mostly
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    cost = account(cfg.model, cfg.inputs)
    step = statistics.median(times)
    samples_per_s = b * cfg.train.grad_accum / step
    tflops = cost.train_flops * samples_per_s / 1e12
    peak = peak_tflops(cfg.parallel.peak_tflops, info.device)
    mem = (torch.cuda.max_memory_allocated() if cuda else _max_rss_bytes() - rss_before) / 2**30
    q = torch.empty(1, 1, 1, 1, device=info.device, dtype=dtype)
    decoder = cfg.model.decoder + (f" {cfg.model.decode_fraction:g}" if cfg.model.decoder == "cross" else "")
    return {
        "preset": preset, "decoder": decoder, "loop": args.loop,
        "train_gflop_per_sample": cost.train_flops / 1e9,
        "params_m": round(cost.params / 1e6, 1), "batch": b,
        "grad_accum": cfg.train.grad_accum, "precision": "bf16" if bf16 else "fp32",
        "zero": cfg.train.zero_stage,
        "activation_checkpointing": cfg.parallel.activation_checkpointing, "compile": cfg.parallel.compile,
        "attention": attention.backend_for(q),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "step_s": step, "step_s_min": min(times), "first_step_s": first_step, "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * cost.tokens, "tflops": tflops, "mfu": tflops / peak if peak else None,
        "peak_mem_gib": mem, "final_loss": losses[-1], "steps": args.steps,
        "finite": all(x == x and abs(x) != float("inf") for x in losses),
    }


def _vs_plain(row: dict, rows: list[dict]) -> str:
    plain = [r for r in rows if r.get("loop") == "plain" and "error" not in r
             and (r["preset"], r["decoder"]) == (row["preset"], row["decoder"])]
    return f"{row['step_s'] / plain[0]['step_s']:.2f}" if plain else "-"


def table(rows: list[dict], context: list[dict] | None = None) -> str:
    """Markdown rows; `vs plain` looks for the plain loop's row among `context` (default: `rows`)."""
    context = rows if context is None else context
    head = ("| preset | decoder | loop | vs plain | train GFLOP/sample | params (M) | batch | precision | "
            "ZeRO | attention | step (median) | first step | samples/s | TFLOP/s | MFU | peak memory |")
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: "
                   "| ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r.get('decoder', '')} | {r.get('loop', '')} | "
                         f"failed: {r['error']} |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
        attention = r["attention"] + (", compiled" if r.get("compile") else "")
        lines.append(f"| {r['preset']} | {r['decoder']} | {r['loop']} | {_vs_plain(r, context)} | "
                     f"{r['train_gflop_per_sample']:.1f} | "
                     f"{r['params_m']} | {r['batch']}x{r['grad_accum']} | "
                     f"{r['precision']} | {r['zero']} | {attention} | {1000 * r['step_s']:.1f} ms | "
                     f"{r['first_step_s']:.1f} s | {r['samples_per_s']:.1f} | {r['tflops']:.3f} | {mfu} | "
                     f"{r['peak_mem_gib']:.2f} GiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "stage1" / "base.yaml"),
                   help="config whose inputs and model settings to use (default: the GPU reference)")
    p.add_argument("--presets", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="micro-batch per device")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="parallel.compile=true: torch.compile per block")
    p.add_argument("--decoder", default="",
                   help="comma-separated model.decoder values (full,cross) to run side by side per preset "
                        "(default: the config's); model.decode_fraction=... goes with the overrides")
    p.add_argument("--loop", default="engine",
                   help="comma-separated: engine (the trainer's DeepSpeed engine), engine-ds-defaults (the "
                        "same with DeepSpeed's zero_optimization defaults), plain (a torch loop, fp32)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="cpu hides the GPUs from the subprocesses")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one preset, print JSON
    p.add_argument("overrides", nargs="*", help="more config overrides, e.g. inputs.video.size=96")
    args = p.parse_args(argv)

    if args.one:
        print("BENCH_STEP " + json.dumps(measure(args.one, args)), flush=True)
        return 0
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    child = ["--config", args.config, "--batch", str(args.batch), "--precision", args.precision,
             "--zero", str(args.zero), "--warmup", str(args.warmup), "--steps", str(args.steps),
             *(["--activation-checkpointing"] if args.activation_checkpointing else []),
             *(["--compile"] if args.compile else []), *args.overrides]
    decoders = [d.strip() for d in args.decoder.split(",") if d.strip()] or [None]
    bad = [d for d in decoders if d not in (None, "full", "cross")]
    if bad:
        p.error(f"--decoder {','.join(bad)}: choose from full, cross")
    loops = [x.strip() for x in args.loop.split(",") if x.strip()]
    bad = [x for x in loops if x not in LOOPS]
    if bad or not loops:
        p.error(f"--loop {args.loop}: choose from {', '.join(LOOPS)}")
    if "plain" in loops and args.precision == "bf16":
        p.error("--loop plain runs fp32 only (bf16 is DeepSpeed's mixed precision)")
    rows = []
    runs = [(p_, d, lp) for p_ in args.presets.split(",") for d in decoders for lp in loops]
    for preset, decoder, loop in runs:
        extra = [] if decoder is None else [f"model.decoder={decoder}"]
        proc = subprocess.run([sys.executable, __file__, "--one", preset, "--loop", loop, *child, *extra],
                              env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_STEP ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append({"preset": preset, "decoder": decoder or "", "loop": loop,
                         "error": f"exit {proc.returncode}: {tail[0][:200]}"})
        else:
            rows.append(json.loads(line[len("BENCH_STEP "):]))
        print(table(rows[-1:], rows).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
