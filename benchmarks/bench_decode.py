"""The rows of BENCHMARKS.md "## Decode" (decode + preprocess per path, 1 and all cores, DALI's CPU
backend beside PyAV, and their parity): an alias of `bench_data.py` with these options

    --dali --procs 1,<allowed CPUs> --repeats 1 --codecs vp9,h264 --finish loader,device --section "## Decode"

    python benchmarks/bench_decode.py                          # print the table
    python benchmarks/bench_decode.py --update BENCHMARKS.md   # and replace its "## Decode" section

Any other `bench_data.py` option may follow (later ones win, e.g. `--passes 5 --clips 16`). Note that
`--repeats` is `data.repeats` here; the passes of the median are `--passes`.
"""

from __future__ import annotations

import os
import sys

from bench_data import main  # a sibling script: run from the repository root or benchmarks/


def decode_args() -> list[str]:
    """bench_data's options that reproduce the "## Decode" rows on this machine's allowed CPUs."""
    cores = len(os.sched_getaffinity(0))
    return ["--dali", "--procs", f"1,{cores}", "--repeats", "1", "--codecs", "vp9,h264",
            "--finish", "loader,device", "--section", "## Decode"]


if __name__ == "__main__":
    raise SystemExit(main(decode_args() + sys.argv[1:]))
