"""Does stage-1 pretraining learn something a linear probe can read? Evidence on the synthetic corpus.

    python benchmarks/probe_synthetic.py [--steps 120] [--run-dir runs/<name>] [--out runs/probe-synthetic]
                                         [--cues all|dynamics]

1. Pretrain the tiny model on the synthetic corpus with the real launcher
   (`OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launchers/stage1.py --config configs/stage1/tiny.yaml`),
   unless --run-dir names a finished run to reuse.
2. Export its latest checkpoint (vaemo-export), and export the same architecture at its
   initialisation (the launcher's seed) as the random baseline.
3. Build held-out synthetic corpora (same settings, another seed: clips never seen in pretraining),
   one per --heldout-classes value. The generator turns the class into continuous knobs (hue, pitch,
   head-motion speed, syllable rate), so more classes over the same range ask for finer
   discrimination: 4 classes (as pretrained) is easy, 32 puts neighbouring classes within the
   per-clip jitter of each single cue. --cues dynamics pretrains and probes on corpora whose class
   drives only syllable rate and head-motion speed (SynthConfig.cues; its own data.synth.dir), so
   colour and pitch averages no longer give the class away.
4. Embed the held-out clips with both encoders and fit the linear probe (vaemo_dist/eval/probe.py)
   on several feature sets, 5-fold stratified; print markdown tables of UAR / WAR (mean ± std).
   --shots N also probes with only N training clips per class (the rest of the fold unused).
5. Zero-shot audio->video retrieval on the held-out clips, what the contrastive objective trains,
   with no probe at all: for each clip's audio embedding, the nearest of all N video embeddings is
   its own clip (instance top-1, chance 1/N) or a clip of its class (class match, chance 1/classes),
   and the median rank of its own clip (chance about N/2).

Results go to <out>/results.json; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from vaemo_dist.checkpoints import resolve  # noqa: E402
from vaemo_dist.config import SynthConfig  # noqa: E402
from vaemo_dist.data.sources import open_source  # noqa: E402
from vaemo_dist.data.synth import ensure_corpus  # noqa: E402
from vaemo_dist.eval.embed import EmbeddingSet, embed_source  # noqa: E402
from vaemo_dist.eval.metrics import summarise  # noqa: E402
from vaemo_dist.eval.probe import probe_folds  # noqa: E402
from vaemo_dist.eval.splits import Fold, stratified_folds  # noqa: E402
from vaemo_dist.export import (  # noqa: E402
    export_checkpoint,
    model_config_from,
    save_pretrained,
    select_weights,
)
from vaemo_dist.model.vaemo import VAEmoModel  # noqa: E402
from vaemo_dist.pretrained import from_pretrained  # noqa: E402
from vaemo_dist.train.curves import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FEATURES = ["concat_pooled", "joint_pooled", "video_pooled", "audio_pooled", "joint_emb"]


def pretrain(steps: int, run_name: str, out_dir: str, extra: list[str]) -> Path:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "launchers/stage1.py", "--config", "configs/stage1/tiny.yaml", f"train.steps={steps}",
           f"train.ckpt_every={steps}", f"train.run_name={run_name}", f"train.out_dir={out_dir}",
           "wandb.mode=disabled", *extra]
    print("pretraining:", " ".join(cmd[2:]), file=sys.stderr)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    print(f"pretraining took {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return REPO / out_dir / run_name


def random_export(checkpoint: Path, out: Path) -> Path:
    """The run's architecture at the launcher's initialisation (seed train.seed, as launch.py does)."""
    raw = yaml.safe_load((checkpoint / "config.yaml").read_text())
    cfg = model_config_from(raw)
    torch.manual_seed(raw.get("train", {}).get("seed", 0))
    model = VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                       init_temperature=cfg.loss.init_temperature)
    weights = select_weights(model.state_dict(), cfg.model, cfg.inputs, include_decoder=False)
    return save_pretrained(out, weights, cfg, source={"note": "random initialisation (step 0)"})


def few_shot(folds: dict[str, Fold], labels: dict[str, int], shots: int) -> dict[str, Fold]:
    """The same test clips, but only the first `shots` training clips of each class."""
    out = {}
    for name, fold in folds.items():
        taken: dict[int, int] = {}
        train = []
        for key in fold.train:
            if taken.get(labels[key], 0) < shots:
                taken[labels[key]] = taken.get(labels[key], 0) + 1
                train.append(key)
        out[name] = Fold(name, train=train, test=fold.test)
    return out


def a2v_retrieval(emb: EmbeddingSet) -> dict[str, float]:
    """Audio -> video retrieval over all clips: instance top-1, class match of the top-1, median rank."""
    a, v, y = emb.arrays["audio_emb"], emb.arrays["video_emb"], emb.labels
    sim = a @ v.T
    nearest = sim.argmax(axis=1)
    own = sim[np.arange(len(a)), np.arange(len(a))]
    rank = (sim > own[:, None]).sum(axis=1)  # 0 = own clip first
    return {"instance_top1": float((nearest == np.arange(len(a))).mean()),
            "class_top1": float((y[nearest] == y).mean()), "median_rank": float(np.median(rank))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120, help="pretraining steps (tiny.yaml: 120)")
    p.add_argument("--run-dir", default=None, help="reuse a finished stage-1 run instead of pretraining")
    p.add_argument("--out", default=None, help="default runs/probe-synthetic[-<cues>]")
    p.add_argument("--cues", choices=["all", "dynamics"], default=None,
                   help="data.synth.cues for pretraining and held-out corpora (default: the run's)")
    p.add_argument("--heldout-clips", type=int, default=256)
    p.add_argument("--heldout-classes", default="4,32", help="comma-separated class counts, one corpus each")
    p.add_argument("--heldout-seed", type=int, default=1000)
    p.add_argument("--kfold", type=int, default=5)
    p.add_argument("--shots", type=int, default=0, help="also probe with N training clips per class")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("overrides", nargs="*", help="extra stage-1 overrides for the pretraining run")
    args = p.parse_args()
    suffix = f"-{args.cues}" if args.cues not in (None, "all") else ""
    out = REPO / (args.out or f"runs/probe-synthetic{suffix}")
    out.mkdir(parents=True, exist_ok=True)

    overrides = list(args.overrides)
    if suffix:  # a corpus of its own, so the default one (data_cache/synthetic) is left as it is
        overrides = [f"data.synth.cues={args.cues}", f"data.synth.dir=data_cache/synthetic{suffix}",
                     *overrides]
    run_name = f"probe-synth-{args.steps}{suffix}"
    run_dir = Path(args.run_dir) if args.run_dir else pretrain(args.steps, run_name, "runs", overrides)
    checkpoint = resolve(run_dir)
    raw = yaml.safe_load((checkpoint / "config.yaml").read_text())
    start = time.perf_counter()
    models = {"pretrained": export_checkpoint(checkpoint, out / "export-pretrained")}
    export_s = time.perf_counter() - start
    models["random init"] = random_export(checkpoint, out / "export-random")

    results: dict[str, dict[str, dict[str, dict]]] = {}
    retrieval: dict[str, dict[str, dict[str, float]]] = {}
    heldout_cues = args.cues or raw["data"]["synth"].get("cues", "all")  # runs from before the knob: "all"
    for classes in [int(c) for c in args.heldout_classes.split(",")]:
        corpus = f"{classes} classes"
        synth = SynthConfig(**{**raw["data"]["synth"], "seed": args.heldout_seed, "classes": classes,
                               "clips": args.heldout_clips, "dir": str(out / f"heldout-{classes}"),
                               "cues": heldout_cues})
        source = open_source(ensure_corpus(synth, progress=False))
        for name, folder in models.items():
            tag = (f"{checkpoint.parent.parent.name}-{checkpoint.name}-{classes}c-{args.heldout_clips}"
                   f"-{synth.cues}")
            cache = out / f"features-{tag}-{name.replace(' ', '-')}.npz"
            if not cache.is_file():
                encoder = from_pretrained(folder)
                embed_source(encoder, source, modality="av", batch_size=16, workers=args.workers,
                             progress=False).save(cache)
            emb = EmbeddingSet.load(cache)
            retrieval.setdefault(corpus, {})[name] = a2v_retrieval(emb)
            folds = stratified_folds(emb.keys, emb.labels.tolist(), args.kfold, seed=0)
            protocols = {f"{corpus}, {args.kfold}-fold": folds}
            if args.shots:
                label_of = dict(zip(emb.keys, emb.labels.tolist()))
                protocols[f"{corpus}, {args.shots}-shot"] = few_shot(folds, label_of, args.shots)
            for protocol, chosen in protocols.items():
                for feature in FEATURES:
                    x = emb.features(feature)
                    per_fold = probe_folds(x, emb.labels, emb.keys, chosen, classes, "auto")
                    summary = summarise(per_fold)
                    summary["l2"] = sorted({f["l2"] for f in per_fold.values()})
                    results.setdefault(protocol, {}).setdefault(feature, {})[name] = summary
                    print(f"{name:12s} {protocol:20s} {feature:14s} UAR {100 * summary['uar_mean']:5.1f} "
                          f"± {100 * summary['uar_std']:4.1f}  WAR {100 * summary['war_mean']:5.1f}",
                          file=sys.stderr)

    metrics, _ = read_metrics(run_dir / "metrics.jsonl")  # training steps, not the online eval's records
    last = metrics[-5:]
    report = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "export_seconds": round(export_s, 2),
              "heldout": {"classes": args.heldout_classes, "clips": args.heldout_clips,
                          "seed": args.heldout_seed, "cues": heldout_cues},
              "final_metrics": {k: float(np.mean([m[k] for m in last]))
                                for k in ("loss", "contrastive", "acc_a2v")},
              "retrieval_a2v": retrieval, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nPretrained: {checkpoint} (export {export_s:.1f}s); held-out: {args.heldout_clips} clips, "
          f"seed {args.heldout_seed}; last-5-step loss {report['final_metrics']['loss']:.3f}, "
          f"acc_a2v {report['final_metrics']['acc_a2v']:.2f}\n")
    print(f"Zero-shot audio->video retrieval over the {args.heldout_clips} held-out clips (pretrained / "
          "random init):\n")
    print("| held-out corpus | instance top-1 % | class of top-1 matches % | median rank of own clip |")
    print("| --- | ---: | ---: | ---: |")
    for corpus, by_model in retrieval.items():
        p, r = by_model["pretrained"], by_model["random init"]
        print(f"| {corpus} | {100 * p['instance_top1']:.1f} / {100 * r['instance_top1']:.1f} "
              f"| {100 * p['class_top1']:.1f} / {100 * r['class_top1']:.1f} "
              f"| {p['median_rank']:.0f} / {r['median_rank']:.0f} |")
    print()
    for protocol, table in results.items():
        print(f"{protocol} probe, UAR / WAR % (mean ± std over folds):\n")
        print("| features | pretrained UAR | pretrained WAR | random-init UAR | random-init WAR |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for feature, by_model in table.items():
            cells = []
            for name in ("pretrained", "random init"):
                s = by_model[name]
                cells += [f"{100 * s['uar_mean']:.1f} ± {100 * s['uar_std']:.1f}",
                          f"{100 * s['war_mean']:.1f} ± {100 * s['war_std']:.1f}"]
            print(f"| `{feature}` | " + " | ".join(cells) + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
