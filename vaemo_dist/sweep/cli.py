"""`vaemo-sweep plan|run|report`: the command line of scaling sweeps (docs/scaling.md)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from vaemo_dist.fsutil import FolderInUseError
from vaemo_dist.startup import entry_point, fail
from vaemo_dist.sweep.plan import (
    SweepError,
    build_points,
    changed_keys,
    format_commands,
    format_table,
    load_spec,
    slurm_script,
    statuses,
    write_manifest,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaemo-sweep",
                                description="Scaling sweeps over presets, data and compute.")
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="resolve the points, show where each stands, emit commands or SLURM")
    plan.add_argument("sweep", help="the sweep YAML file")
    plan.add_argument("--emit", choices=["table", "commands", "slurm"], default="table",
                      help="table: points and status; commands: deepspeed lines (done ones commented out); "
                           "slurm: an array script with one task per point not done")
    plan.add_argument("--out", default=None,
                      help="write here instead of stdout (slurm: default <out_dir>/sweep.sbatch)")

    run = sub.add_parser("run", help="run the points here, one after another "
                                     "(skips done points, resumes interrupted ones)")
    run.add_argument("sweep", help="the sweep YAML file")
    run.add_argument("--only", default=None, help="comma list of point names or indices to run")
    run.add_argument("--verbose", action="store_true",
                     help="stream the launcher's output (it always goes to <point>/launch.log)")
    run.add_argument("extra", nargs="*", help="overrides for this invocation only, not part of any point, "
                                              "e.g. train.stop_at=500 for a time slice")

    rep = sub.add_parser("report", help="collect the runs into scaling.csv and scaling.png")
    rep.add_argument("sweep", help="the sweep YAML file or its folder (with sweep.json)")
    rep.add_argument("--out", default=None, help="folder for the CSV and PNG (default: the sweep folder)")
    rep.add_argument("--last", type=int, default=5, help="final loss = mean of this many last logged steps")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@entry_point("sweep error")
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides after an option (`run S --only x key=v`) are left over by argparse: they are extras too.
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "run":
        args.extra = args.extra + rest
    try:
        if args.command == "report":
            from vaemo_dist.sweep.aggregate import format_rows, report

            csv_path, png_path, rows = report(args.sweep, args.out, args.last)
            print(format_rows(rows), end="")
            print(f"wrote {csv_path} and {png_path}")
            return 0
        spec = load_spec(args.sweep)
        if args.command == "run":
            from vaemo_dist.sweep.run import run_sweep

            for item in args.extra:
                if "=" not in item or item.startswith("-"):
                    raise SweepError(f"{item!r}: extra overrides are key=value (e.g. train.stop_at=500)")
            only = args.only.split(",") if args.only else None
            # Ctrl-C and a kill (e.g. by SLURM) stop the running point too. SIGINT is set here as well:
            # Python only turns it into KeyboardInterrupt when it was not ignored at start-up, and a
            # process started in the background of a script (`cmd &`) inherits it ignored.
            previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                return run_sweep(spec, only=only, extra=args.extra, verbose=args.verbose)
            except KeyboardInterrupt:
                print("\ninterrupted: run the same command again to resume", file=sys.stderr)
                return 130
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        points = build_points(spec)
        write_manifest(spec, points)
        if args.emit != "table":  # the emitted commands name the synthetic corpus's shards: build it now
            from vaemo_dist.sweep.run import prepare_data

            prepare_data(spec, points)
        states = statuses(spec, points)
        if args.emit == "table":
            notes = []
            for p, s in zip(points, states):
                changed = changed_keys(spec, p, Path(spec.out_dir) / p.name) if s.state == "done" else []
                notes.append(f"ran with other {', '.join(changed)}" if changed else "")
            text = format_table(points, states, notes)
        elif args.emit == "commands":
            text = format_commands(spec, points, states)
        else:
            text = slurm_script(spec, points, states)
            if all(s.state == "done" for s in states):
                print(f"all {len(points)} points of sweep {spec.name} are done: nothing to submit")
                return 0
            out = Path(args.out or Path(spec.out_dir) / "sweep.sbatch")
            out.write_text(text)
            print(f"wrote {out} ({sum(s.state != 'done' for s in states)} array tasks): sbatch {out}")
            return 0
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text, end="")
        return 0
    except (SweepError, FolderInUseError) as e:  # FolderInUseError: data.synth.dir is a folder of the user's
        return fail(f"sweep error: {e}")


if __name__ == "__main__":
    sys.exit(main())
