"""Text-to-VA retrieval on held-out synthetic clips, before and after stage 2.

    python benchmarks/retrieval_stage2.py                                   # the README default runs
    python benchmarks/retrieval_stage2.py --stage2 runs/stage2-tiny/checkpoints/latest \
        --extra head-only=runs/stage2-tiny-headonly/checkpoints/latest --json retrieval.json

"Before" is what stage 2 starts from: the stage-1 checkpoint with the stage-2 run's freshly initialised
text head (same seed). "After" is the stage-2 checkpoint. The held-out set is a synthetic corpus
like the training one but drawn with another seed (--seed), described with the same templates
(other wording draws) and embedded with the same frozen text encoder. Metrics are class-level; see
vaemo_dist/text/retrieval.py for their definitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from vaemo_dist.text.retrieval import build_model, prepare_heldout, retrieval_metrics, stage2_config_of  # noqa: E402

COLUMNS = ("t2va_r1", "t2va_map", "va2t_r1", "zero_shot", "t2a_r1", "t2v_r1", "t2va_r1_instance")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage1", default="runs/stage1-tiny/checkpoints/latest", help="stage-1 checkpoint")
    p.add_argument("--stage2", default="runs/stage2-tiny/checkpoints/latest", help="stage-2 checkpoint")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=CKPT",
                   help="more stage-2 checkpoints to score (e.g. a head-only baseline)")
    p.add_argument("--heldout", default="data_cache/stage2/heldout", help="cache folder of the held-out set")
    p.add_argument("--seed", type=int, default=1, help="held-out corpus seed (training uses data.synth.seed)")
    p.add_argument("--clips", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    cfg = stage2_config_of(args.stage2)
    if args.seed == cfg.data.synth.seed:
        p.error(f"--seed {args.seed} is the training corpus seed: the clips would not be held out")
    t0 = time.perf_counter()
    held = prepare_heldout(cfg, Path(args.heldout) / f"seed{args.seed}-{args.clips}", seed=args.seed,
                           clips=args.clips)
    prep_s = time.perf_counter() - t0
    runs = [("stage 1 (start of stage 2)", args.stage1), ("stage 2", args.stage2)]
    runs += [tuple(item.split("=", 1)) for item in args.extra]  # type: ignore[misc]

    results = {}
    for name, ckpt in runs:
        t0 = time.perf_counter()
        run_cfg = cfg if ckpt == args.stage1 else stage2_config_of(ckpt)
        model = build_model(run_cfg, held.text.shape[1], ckpt)
        metrics = retrieval_metrics(model, held)
        metrics["eval_s"] = time.perf_counter() - t0
        results[name] = {"checkpoint": ckpt, **metrics}

    n, chance = int(results["stage 2"]["clips"]), results["stage 2"]["chance_r1"]
    print(f"held-out: {n} clips of {cfg.data.synth.classes} classes (synthetic seed {args.seed}); "
          f"class-level metrics, chance R@1 {chance:.3f}; instance R@1 chance {1 / n:.3f}; "
          f"prepared in {prep_s:.1f}s\n")
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "clips": n, "prepare_s": prep_s,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
