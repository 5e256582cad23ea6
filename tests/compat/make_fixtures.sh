#!/usr/bin/env bash
# How tests/compat/pre_refactor/ was made (2026-12-07, by the code of commit 7a042f5, before the stage
# objects / checkpoint-reader redesign): a 4-step stage-1 run of a micro model on an 8-clip synthetic
# corpus, its step-2 checkpoint, the export of that checkpoint, the export's embeddings of fixed
# inputs, and the losses of steps 3-4 of the uninterrupted run. Kept as data; rerunning this script
# with later code makes a new-format copy, not the old one.
# losses_steps_3_4.jsonl was remade once, when issue 18 changed the synthetic corpus's chroma-siting tag
# (left -> centre: the decoded pixels, and so the losses, moved in the 4th decimal): by the same old code
# (a worktree of 7a042f5), resuming this checkpoint on a corpus built by the new synthetic-corpus code
# (the launcher line below with --resume latest and that corpus in data.synth.dir).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
work=$(mktemp -d); cd "$work"
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
SMALL=$(cat "$here/pre_refactor/overrides.txt")
python "$repo/launchers/stage1.py" --config "$repo/configs/stage1/tiny.yaml" $SMALL data.synth.dir="$work/synth" \
  train.steps=4 train.ckpt_every=2 train.run_name=pre15-stage1
out="$here/pre_refactor"
rm -rf "$out/checkpoint" "$out/export"
cp -r runs/pre15-stage1/checkpoints/step_00000002 "$out/checkpoint"
grep -E '"step": (3|4),' runs/pre15-stage1/metrics.jsonl > "$out/losses_steps_3_4.jsonl"
vaemo-export runs/pre15-stage1/checkpoints/step_00000002 --out "$out/export"
python "$here/reference_embeddings.py" "$out/export" "$out/embeddings.safetensors"
