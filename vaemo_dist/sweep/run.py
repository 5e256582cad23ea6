"""Run the points of a sweep on this machine, one after another.

Each point is launched as `python -m deepspeed.launcher.runner --num_gpus <nproc> <script> --config ...
--resume latest <overrides>`, so an interrupted point continues from its newest checkpoint and a new one
starts from step 0. Done points are skipped. A failing point is reported and the sweep goes on; the
exit code says whether any failed. The launcher's output goes to `<point>/launch.log`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vaemo_dist.dist import free_port
from vaemo_dist.sweep.plan import (
    STATUS_FILE,
    Point,
    SweepError,
    SweepSpec,
    build_points,
    changed_keys,
    format_number,
    launcher_args,
    point_status,
    run_dir,
    write_manifest,
)

LOG_FILE = "launch.log"
HEARTBEAT_S = 10.0  # how often a quiet run prints the point's progress

# (spec, point, extra overrides, stream the launcher's output?) -> exit code
Launcher = Callable[[SweepSpec, Point, list[str], bool], int]


def launch_env(spec: SweepSpec) -> dict[str, str]:
    env = {**os.environ, **spec.launch.env}
    import torch

    if not torch.cuda.is_available():  # CPU processes fight over cores without it (README)
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _last_record(metrics: Path) -> dict | None:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            return record
    return None


def launch_point(spec: SweepSpec, point: Point, extra: list[str], verbose: bool) -> int:
    """Run one point through the deepspeed launcher; its output goes to launch.log (and the terminal
    when verbose). Quiet runs print the point's step and loss every few seconds instead."""
    folder = run_dir(spec.out_dir, point)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(spec.launch.nproc),
           "--master_port", str(free_port()), *launcher_args(spec, point), *extra]
    start, shown = time.perf_counter(), -1
    with open(folder / LOG_FILE, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        # Its own process group: a stop reaches the launcher, its ranks and their data workers at once.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=launch_env(spec),
                                start_new_session=True)
        assert proc.stdout is not None
        try:
            fd, next_beat = proc.stdout.fileno(), time.monotonic() + HEARTBEAT_S
            while True:
                ready, _, _ = select.select([fd], [], [], 1.0)
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    log.write(chunk)
                    if verbose:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                if not verbose and time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_S
                    record = _last_record(folder / "metrics.jsonl")
                    if record and record["step"] != shown:
                        shown, loss = record["step"], record["loss"]
                        loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else str(loss)  # null: NaN
                        print(f"    step {shown}/{point.steps}  loss {loss}  "
                              f"({time.perf_counter() - start:.0f} s)", flush=True)
            return proc.wait()
        except BaseException:  # Ctrl-C or a kill of the sweep: leave no orphaned trainers behind
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """End the launcher and everything it started (ranks, data workers): they share its process group.
    SIGTERM first, so ranks can leave cleanly; whatever is left after the grace period is killed."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so that only live members keep the group alive
            os.killpg(proc.pid, 0)  # raises once the group is empty
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_bytes()[-20000:].decode(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def select_points(points: list[Point], only: list[str] | None) -> list[Point]:
    """Points named (or numbered) in `only`, in sweep order; all when None."""
    if not only:
        return points
    by_name = {p.name: p for p in points}
    chosen = set()
    for item in only:
        if item in by_name:
            chosen.add(by_name[item].index)
        elif item.isdigit() and int(item) < len(points):
            chosen.add(int(item))
        else:
            raise SweepError(f"--only {item}: no such point; points are {', '.join(by_name)} "
                             f"(or their indices 0..{len(points) - 1})")
    return [p for p in points if p.index in chosen]


def prepare_data(spec: SweepSpec, points: list[Point]) -> None:
    """Build the synthetic corpus first when a point trains on part of it: the launcher builds it only for
    `data.shards=synthetic`, and such a point names its shards instead. A point whose data.shards is set
    (the user's shards) never builds it."""
    from vaemo_dist.config import load_config
    from vaemo_dist.data.synth import ensure_corpus

    built = set()
    for p in points:
        if p.data_fraction >= 1.0 or not p.synthetic_data:
            continue
        cfg = load_config(spec.config, p.overrides)
        if cfg.data.synth.dir not in built:
            ensure_corpus(cfg.data.synth)
            built.add(cfg.data.synth.dir)


def run_sweep(spec: SweepSpec, only: list[str] | None = None, extra: list[str] | None = None,
              verbose: bool = False, launcher: Launcher = launch_point) -> int:
    """Run what is left of the sweep; 0 when every selected point ran without an error."""
    if spec.launch.nodes > 1 and launcher is launch_point:
        raise SweepError(f"launch.nodes={spec.launch.nodes}: local runs use this machine only; "
                         "use `vaemo-sweep plan --emit slurm` for multi-node points")
    points = build_points(spec)
    write_manifest(spec, points)
    chosen = select_points(points, only)
    prepare_data(spec, chosen)
    n, failed, sweep_start = len(points), [], time.perf_counter()
    print(f"sweep {spec.name}: {len(chosen)} of {n} points, runs in {spec.out_dir}/", flush=True)
    for p in chosen:
        folder = run_dir(spec.out_dir, p)
        before = point_status(folder, p.steps)
        head = f"[{p.index + 1}/{n}] {p.name}"
        if before.state == "done":
            changed = changed_keys(spec, p, folder)
            note = (f"; NOTE: it ran with other {', '.join(changed)} than the sweep now asks (a done point "
                    "is never re-run: give the sweep another out_dir to run it again)") if changed else ""
            print(f"{head}: done (step {before.step}/{p.steps}), skipped{note}", flush=True)
            continue
        how = f"resuming from step {before.step}" if before.step else "starting"
        print(f"{head}: {how}, {p.steps} steps x {p.global_batch} samples, "
              f"{format_number(p.flops_planned)} FLOPs ({before.state})", flush=True)
        t0 = time.perf_counter()
        rc = launcher(spec, p, list(extra or []), verbose)
        wall = time.perf_counter() - t0
        after = point_status(folder, p.steps)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATUS_FILE).write_text(json.dumps(
            {"returncode": rc, "step": after.step, "steps": p.steps, "wall_s": round(wall, 1),
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "extra_overrides": extra or []}) + "\n")
        if rc != 0:
            failed.append(p.name)
            print(f"{head}: FAILED (exit {rc}) after {wall:.0f} s at step {after.step}; last lines of "
                  f"{folder / LOG_FILE}:\n{_tail(folder / LOG_FILE)}", flush=True)
        elif after.state == "done":
            print(f"{head}: done in {wall:.0f} s", flush=True)
        else:
            print(f"{head}: stopped at step {after.step}/{p.steps} after {wall:.0f} s (resumable)",
                  flush=True)
    states = [point_status(run_dir(spec.out_dir, p), p.steps).state for p in points]
    summary = ", ".join(f"{states.count(s)} {s}" for s in ("done", "interrupted", "failed", "new")
                        if states.count(s))
    print(f"sweep {spec.name}: {summary} ({time.perf_counter() - sweep_start:.0f} s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}; rerun the same command to retry them", flush=True)
    return 1 if failed else 0
