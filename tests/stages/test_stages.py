"""The stages as library objects (vaemo_dist/stages/): the registry, each stage's model and loss, its
start-up checks, data and evaluator, without a launch."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vaemo_dist import stages
from vaemo_dist.config import load_config
from vaemo_dist.data.types import Batch
from vaemo_dist.fsutil import FolderInUseError
from vaemo_dist.stages import STAGES, Finetune, Stage1, Stage2, get
from vaemo_dist.stages.finetune import main as finetune_main

REPO = Path(__file__).resolve().parents[2]
SMALL = ["inputs.video.frames=8", "inputs.video.size=64", "inputs.audio.frames=128", "model.depth=2",
         "model.decoder_depth=1", "eval.every=0"]
ONE = SimpleNamespace(dp_group=None, is_main=True, device=torch.device("cpu"))  # a world of one


def config(stage: str, *overrides: str):
    return load_config(str(REPO / "configs" / stage / "tiny.yaml"), [*SMALL, *overrides])


def random_batch(cfg, n: int = 4) -> Batch:
    v, a = cfg.inputs.video, cfg.inputs.audio
    return Batch(video=torch.randn(n, 3, v.frames, v.size, v.size),
                 audio=torch.randn(n, 1, a.frames, a.n_mels), keys=[f"k{i}" for i in range(n)],
                 label=torch.arange(n) % 2)


def test_the_registry_names_every_stage_once():
    assert list(STAGES) == ["stage1", "stage2", "finetune"]
    assert get("stage2") is Stage2 and stages.Stage1 is Stage1
    for name, stage in STAGES.items():
        assert stage.name == name
        assert (REPO / stage.default_config).is_file()
        assert (REPO / "launchers" / f"{name}.py").is_file()
    with pytest.raises(KeyError, match="stage1, stage2, finetune"):
        get("stage3")


def test_stage1_is_the_model_and_loss_of_a_stage1_run():
    """What the launcher built before stages existed: VAEmoModel + Stage1Objective on engine(video, audio)."""
    from vaemo_dist.model.vaemo import VAEmoModel
    from vaemo_dist.objectives.stage1 import Stage1Objective

    cfg = config("stage1")
    batch = random_batch(cfg)
    torch.manual_seed(0)
    stage = Stage1(cfg)
    model = stage.build_model(ONE)
    torch.manual_seed(1)
    loss, metrics = stage.loss(model, batch)
    torch.manual_seed(0)
    ref = VAEmoModel(cfg.model, cfg.inputs, max_logit_scale=cfg.loss.max_logit_scale,
                     init_temperature=cfg.loss.init_temperature)
    torch.manual_seed(1)
    ref_loss, ref_metrics = Stage1Objective(cfg.loss)(ref(batch.video, batch.audio))
    assert torch.equal(loss, ref_loss) and metrics == ref_metrics
    assert {"contrastive", "rec_video", "rec_audio", "loss"} <= metrics.keys()
    assert stage.init_from() is None and stage.cost()[0] > 0


def test_no_evaluator_without_held_out_clips(tmp_path, caplog):
    assert Stage1(config("stage1")).evaluator(ONE, []) is None  # eval.every=0
    own = config("stage1", "eval.every=5", f"data.shards={tmp_path}")
    with caplog.at_level(logging.INFO, logger="vaemo"):
        assert Stage1(own).evaluator(ONE, []) is None
    assert "online evaluation is off" in caplog.text and "eval.holdout=0.1" in caplog.text


def test_a_foreign_synthetic_corpus_folder_is_refused_by_every_stage(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for stage, name in ((Stage1, "stage1"), (Stage2, "stage2")):
        cfg = config(name, "data.shards=synthetic", f"data.synth.dir={mine}", f"train.out_dir={tmp_path}")
        with pytest.raises(FolderInUseError, match=f"^data.synth.dir: refusing to write into {mine}"):
            stage(cfg).check()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_stage2_starts_from_its_init_from():
    assert Stage2(config("stage2", "stage2.init_from=runs/s1/checkpoints/latest")).init_from() == \
        "runs/s1/checkpoints/latest"
    assert Stage2(config("stage2", "stage2.init_from=''")).init_from() is None


def test_finetune_trains_on_its_fold_shards_from_the_export(tmp_path):
    shards = tmp_path / "fold_1" / "train_shards"
    shards.mkdir(parents=True)
    for name in ("train-000001.tar", "train-000000.tar", "notes.txt"):
        (shards / name).write_bytes(b"")
    cfg = load_config(str(REPO / "configs" / "finetune" / "tiny.yaml"), [f"data.shards={shards}"])
    args = argparse.Namespace(pretrained="exports/tiny", mixup=0.0, label_smoothing=0.0)
    stage = Finetune(cfg, args, num_classes=3)
    assert stage.shards() == [str(shards / "train-000000.tar"), str(shards / "train-000001.tar")]
    assert stage.init_from() == "exports/tiny" and stage.cost() == (0.0, 0)
    assert Finetune.command is not None and Stage1.command is None and Stage2.command is None


def test_finetune_command_is_the_launchers(capsys, tmp_path):
    """launchers/finetune.py's command line: a missing export is said once, exit 2."""
    assert stages.main("finetune", ["--pretrained", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2
    assert finetune_main is Finetune.command.__globals__["main"]
    assert "probe: --pretrained" in capsys.readouterr().err
