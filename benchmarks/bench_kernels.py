"""Time and peak memory of the hot ops: contrastive loss (naive full matrix / row-chunked torch /
fused Triton) and masked gather + scatter (torch ops / fused Triton), forward + backward.

    python benchmarks/bench_kernels.py                  # CPU: naive vs chunked, torch gather/scatter
    python benchmarks/bench_kernels.py --device cuda    # adds the Triton kernels
    python benchmarks/bench_kernels.py --sizes 1024,8192 --naive-max 8192 --json out.json

Every case runs in a fresh subprocess, so one case's allocator state cannot hide another's peak.
Peak memory:
  cpu:  peak RSS growth of that process over the timed runs (ru_maxrss after minus the resident
        size just before, inputs already allocated). Whole-process, allocator slack included; small
        cases sit in the noise of a few MB.
  cuda: torch.cuda.max_memory_allocated() minus memory_allocated() before (torch allocations only).
Times: the fastest of the timed repeats (the machine may be shared; the minimum is the least
disturbed figure), after one warm-up on a tiny input (which takes one-off costs such as the first
checkpoint call or Triton compilation out of the figure) and, when repeating, one at full size.
The 1-minute load average at the start of each case is reported next to it. On CPU the process's
CPU time (all its threads, time.process_time) is reported too, and the ratios use it: on a shared
machine it moves far less with other jobs than the wall time does. On CUDA the ratios use wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shapes for the gather / scatter case: base-size video tokens (16 frames of 160 px, tubelet 2,
# patch 16 -> 800 tokens), 90 % masked, encoder width 768, decoder width 512.
GATHER_SHAPE = dict(b=64, n=800, k=80, d=768, d_dec=512)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _contrastive_fn(impl: str, chunk: int):
    from kernels import reference

    if impl == "naive":
        return reference.contrastive_loss
    if impl == "chunked":
        return lambda a, v, s: reference.contrastive_loss_chunked(a, v, s, chunk=chunk)
    if impl == "fused":
        from kernels import contrastive

        return contrastive.contrastive_loss
    raise ValueError(impl)


def _gather_fn(impl: str):
    if impl == "torch":
        from kernels import reference as mod
    elif impl == "fused":
        from kernels import masked_gather as mod
    else:
        raise ValueError(impl)

    def step(tokens, pos, keep, mask_token, dec_pos, dec_in):
        # Encoder-side gather, then the decoder-side scatter of a [B, K, D_dec] tensor.
        vis = mod.masked_gather(tokens, pos, keep)
        full = mod.masked_scatter(dec_in, keep, mask_token, dec_pos, tokens.shape[1])
        return vis.float().sum() + full.float().sum()

    return step


def run_one(op: str, impl: str, n: int, embed: int, chunk: int, device: str, reps: int) -> dict:
    """One case in this process: returns times (s) and peak memory (bytes)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    if op == "contrastive":
        fn = _contrastive_fn(impl, chunk)

        def make(rows):
            a = F.normalize(torch.randn(rows, embed, device=dev), dim=-1).requires_grad_(True)
            v = F.normalize(torch.randn(rows, embed, device=dev), dim=-1).requires_grad_(True)
            return a, v, torch.tensor(14.3, device=dev, requires_grad=True)

        def step(args):
            fn(*args).backward()

    else:
        fn = _gather_fn(impl)
        s = GATHER_SHAPE

        def make(batch):
            tokens = torch.randn(batch, s["n"], s["d"], device=dev, requires_grad=True)
            pos = torch.randn(s["n"], s["d"], device=dev, requires_grad=True)
            keep = torch.rand(batch, s["n"], device=dev).argsort(dim=1)[:, :s["k"]]
            mask_token = torch.randn(s["d_dec"], device=dev, requires_grad=True)
            dec_pos = torch.randn(s["n"], s["d_dec"], device=dev, requires_grad=True)
            dec_in = torch.randn(batch, s["k"], s["d_dec"], device=dev, requires_grad=True)
            return tokens, pos, keep, mask_token, dec_pos, dec_in

        def step(args):
            fn(*args).backward()

    step(make(min(n, 64)))  # tiny warm-up: imports, compilation, first-call costs
    args = make(n)
    if reps > 1:
        step(args)
    for x in args:
        x.grad = None
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times, cpu_times = [], []
    for _ in range(reps):
        for x in args:
            x.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        step(args)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _max_rss_bytes()) - base
    return dict(op=op, impl=impl, n=n, embed=embed, chunk=chunk if impl == "chunked" else None,
                device=device, threads=torch.get_num_threads(), reps=reps,
                time_s=min(times), cpu_s=min(cpu_times), peak_bytes=max(peak, 0), load=os.getloadavg()[0])


def _spawn(op: str, impl: str, n: int, args: argparse.Namespace) -> dict:
    reps = args.reps if n <= args.many_reps_max else 1
    cmd = [sys.executable, __file__, "--one", op, impl, str(n), "--device", args.device,
           "--embed", str(args.embed), "--chunk", str(args.chunk), "--reps", str(reps)]
    env = dict(os.environ)
    if args.device == "cpu" and impl == "fused":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return dict(op=op, impl=impl, n=n, error=proc.stderr.strip().splitlines()[-1:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.0f}" if b >= 2**20 else f"{b / 2**20:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768",
                   help="global batch sizes N for the contrastive loss (single process: n_local = N)")
    p.add_argument("--embed", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024, help="rows per block of the chunked variant")
    p.add_argument("--naive-max", type=int, default=None,
                   help="largest N for the naive full matrix (peak ~16 N^2 bytes; default 16384 on cpu, "
                        "where 32k would need ~16 GiB, and 32768 on cuda)")
    p.add_argument("--fused-max", type=int, default=None,
                   help="largest N for the Triton kernel (default: all on cuda; 0 on cpu, where it would "
                        "run in the interpreter)")
    p.add_argument("--gather-batches", default="16,64", help="batch sizes for the gather / scatter case")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--many-reps-max", type=int, default=4096, help="cases above this N are timed once")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--one", nargs=3, metavar=("OP", "IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        op, impl, n = args.one
        print(json.dumps(run_one(op, impl, int(n), args.embed, args.chunk, args.device, args.reps)))
        return

    if args.naive_max is None:
        args.naive_max = 32768 if args.device == "cuda" else 16384
    fused_max = args.fused_max if args.fused_max is not None else (1 << 62 if args.device == "cuda" else 0)
    results = []
    print(f"## contrastive loss, fwd+bwd, E={args.embed}, device={args.device}, chunk={args.chunk}")
    key = "time_s" if args.device == "cuda" else "cpu_s"
    print("| N | impl | wall (s) | CPU (s) | peak (MiB) | time / naive | peak / naive | one N x N fp32 (MiB) "
          "| load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.sizes.split(",")]:
        impls = ["naive"] * (n <= args.naive_max) + ["chunked"] + ["fused"] * (n <= fused_max)
        row = {impl: _spawn("contrastive", impl, n, args) for impl in impls}
        results += row.values()
        naive = row.get("naive", {})
        for impl, r in row.items():
            if "error" in r:
                print(f"| {n} | {impl} | error: {r['error']} | | | | | | |")
                continue
            ratio_t = f"{r[key] / naive[key]:.2f}" if key in naive else "-"
            ratio_m = (f"{r['peak_bytes'] / naive['peak_bytes']:.3f}"
                       if naive.get("peak_bytes") else "-")
            print(f"| {n} | {impl} | {r['time_s']:.3f} | {r['cpu_s']:.3f} | {_fmt_mb(r['peak_bytes'])} "
                  f"| {ratio_t} | {ratio_m} "
                  f"| {_fmt_mb(n * n * 4)} | {r['load']:.1f} |", flush=True)

    g = GATHER_SHAPE
    print(f"\n## masked gather + scatter, fwd+bwd, N={g['n']}, K={g['k']}, D={g['d']}, "
          f"D_dec={g['d_dec']}, device={args.device}")
    print("| B | impl | wall (ms) | CPU (ms) | peak (MiB) | time / torch | load |")
    print("|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.gather_batches.split(",")]:
        impls = ["torch"] + ["fused"] * (args.device == "cuda")
        row = {impl: _spawn("gather", impl, b, args) for impl in impls}
        results += row.values()
        for impl, r in row.items():
            if "error" in r:
                print(f"| {b} | {impl} | error: {r['error']} | | | | |")
                continue
            ratio = r[key] / row["torch"][key] if key in row["torch"] else float("nan")
            print(f"| {b} | {impl} | {r['time_s'] * 1e3:.1f} | {r['cpu_s'] * 1e3:.1f} "
                  f"| {_fmt_mb(r['peak_bytes'])} | {ratio:.2f} | {r['load']:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
