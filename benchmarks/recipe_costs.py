"""GPU-hour estimates of the recipes in configs/recipes/ (docs/datasets.md), from FLOPs.

    python benchmarks/recipe_costs.py [--mfu 0.40 0.25] [--peak 989]

Pretraining: train FLOP/sample from vaemo_dist.model.flops.account (analytic: matmuls only, encoder on
the visible tokens, the decoder as configured, 3x forward). Fine-tuning: 3x the forward FLOPs of the
classifier (encoder with every token visible, pooled head) counted by torch.utils.flop_counter on a
model built on the meta device (no weights, no memory), plus the test views' forward passes.
Samples = epochs x clips (pretraining); epochs x training clips summed over folds, each clip training in
(folds - 1) folds (fine-tuning). GPU-hours = FLOPs / (MFU x peak dense bf16 FLOP/s of one H100).
The clip counts and epochs are the recipes' stated assumptions (their headers).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vaemo_dist.config import Config, load_config  # noqa: E402
from vaemo_dist.model.flops import PEAK_TFLOPS, account  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"
STAGE1_CLIPS = {"stage1_vox2_hicmae_base": 1_092_009, "stage1_avfmae_scale": 1_090_000}
# benchmark -> (usable clips, folds, epochs, classes); fine-tuned from the HiCMAE-base-shaped recipe
FINETUNE = {
    "cremad": (7_438, 5, 50, 6),
    "ravdess": (1_440, 6, 50, 8),
    "mafw": (10_045, 5, 100, 11),
    "dfew": (11_697, 5, 100, 7),
}
TEST_VIEWS = 4  # --test-views 2,2


@dataclass
class Cost:
    recipe: str
    samples: int  # training samples processed
    train_gflop: float  # per training sample
    eval_pflop: float = 0.0  # test-view forward passes

    @property
    def pflop(self) -> float:
        return self.samples * self.train_gflop / 1e6 + self.eval_pflop


def stage1_cost(name: str) -> Cost:
    cfg = load_config(RECIPES / f"{name}.yaml", ["data.shards=/unset"])
    acc = account(cfg.model, cfg.inputs)
    samples = cfg.train.steps * cfg.data.global_batch_size
    return Cost(name, samples, acc.train_flops / 1e9)


def classifier_forward_flops(cfg: Config, num_classes: int) -> int:
    """Forward FLOPs of one clip through the fine-tuning classifier, every token visible, counted by
    torch's FlopCounterMode on the meta device."""
    from vaemo_dist.model.vaemo import VAEmoModel
    from vaemo_dist.objectives.finetune import Classifier

    with torch.device("meta"):
        model = Classifier(VAEmoModel(cfg.model, cfg.inputs), num_classes)
        v, a = cfg.inputs.video, cfg.inputs.audio
        video = torch.empty(1, 3, v.frames, v.size, v.size)
        audio = torch.empty(1, 1, a.frames, a.n_mels)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(video, audio)
    return counter.get_total_flops()


def finetune_costs(pretrain: str = "stage1_vox2_hicmae_base") -> list[Cost]:
    cfg = load_config(RECIPES / f"{pretrain}.yaml", ["data.shards=/unset"])
    out = []
    for bench, (clips, folds, epochs, classes) in FINETUNE.items():
        fwd = classifier_forward_flops(cfg, classes)
        samples = epochs * clips * (folds - 1)  # each clip trains in every fold but its own
        eval_pflop = clips * TEST_VIEWS * fwd / 1e15  # each clip is tested once, in its own fold
        out.append(Cost(f"finetune_{bench}", samples, 3 * fwd / 1e9, eval_pflop))
    return out


def table(costs: list[Cost], mfus: list[float], peak_tflops: float) -> str:
    head = ["recipe", "samples (M)", "train GFLOP/sample", "total PFLOP"]
    for m in mfus:
        head += [f"H100 GPU-h @ {m:.0%} MFU", f"samples/s/GPU @ {m:.0%}"]
    rows = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for c in costs:
        cells = [c.recipe, f"{c.samples / 1e6:.2f}", f"{c.train_gflop:.1f}", f"{c.pflop:,.0f}"]
        for m in mfus:
            rate = m * peak_tflops * 1e12  # FLOP/s per GPU
            cells += [f"{c.pflop * 1e15 / rate / 3600:,.1f}", f"{rate / (c.train_gflop * 1e9):,.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mfu", type=float, nargs="+", default=[0.40, 0.25], help="model FLOP utilisations")
    p.add_argument("--peak", type=float, default=PEAK_TFLOPS["H100"], help="peak dense bf16 TFLOP/s")
    args = p.parse_args(argv)
    costs = [stage1_cost(n) for n in STAGE1_CLIPS] + finetune_costs()
    mfus = ", ".join(f"{m:.0%}" for m in args.mfu)
    print(f"Assumed: one H100 = {args.peak:g} dense bf16 TFLOP/s; MFU {mfus}; "
          "fine-tuning from the base preset at HiCMAE shapes, all folds, test views 2x2 included.\n")
    print(table(costs, args.mfu, args.peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
