"""vaemo_dist.checkpoints, the one reader of checkpoints and exports: what `resolve` makes of each way of
naming a checkpoint, how the kinds of folder are told apart, and reading an export. Consolidating real
DeepSpeed checkpoints is tested in tests/export (every ZeRO stage) and tests/integration (TP)."""

from __future__ import annotations

import json

import pytest
import torch

from vaemo_dist import checkpoints
from vaemo_dist.checkpoints import (
    CheckpointError,
    ExportError,
    NotACheckpointError,
    describe_folder,
    is_checkpoint,
    is_export,
    read_export,
    resolve,
)
from vaemo_dist.config import load_config
from vaemo_dist.model.vaemo import VAEmoModel, is_decoder_key


def _run(tmp_path, steps=(2, 4)):
    """A run folder with step folders (DeepSpeed model states) and `latest` naming the last."""
    ckpts = tmp_path / "run" / "checkpoints"
    for step in steps:
        folder = ckpts / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpts / "latest").write_text(f"step_{steps[-1]:08d}\n")
    return ckpts


def test_every_way_of_naming_a_checkpoint_resolves_to_its_step_folder(tmp_path):
    ckpts = _run(tmp_path)
    newest, older = ckpts / "step_00000004", ckpts / "step_00000002"
    for given in (newest, ckpts / "latest", ckpts, ckpts.parent, str(ckpts.parent)):
        assert resolve(given) == newest, given
    assert resolve(older) == older  # a step folder is itself, whatever `latest` says
    # The run's own `train.resume`: the word "latest" in its checkpoints folder, None before the first.
    assert resolve("latest", ckpts) == newest
    assert resolve("latest", tmp_path / "fresh" / "checkpoints") is None
    assert resolve(older, ckpts) == older


def test_what_is_not_a_checkpoint_is_refused_saying_what_it_is(tmp_path):
    ckpts = _run(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        resolve(tmp_path / "missing")
    (ckpts / "latest").write_text("step_00000099")  # a pointer to a folder that is gone
    with pytest.raises(CheckpointError, match="step_00000099"):
        resolve(ckpts)
    with pytest.raises(CheckpointError, match="step_00000099"):
        resolve("latest", ckpts)
    described = tmp_path / "described"
    described.mkdir()
    (described / "descriptions.jsonl").write_text("{}\n")
    with pytest.raises(NotACheckpointError, match=r"is a described set \(vaemo-describe output\)"):
        resolve(described)
    (tmp_path / "bare-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(NotACheckpointError, match="a run folder without checkpoints"):
        resolve(tmp_path / "bare-run")


def test_the_old_names_still_resolve(tmp_path):
    """train.checkpoint.resolve / LATEST / CheckpointError are the reader's, imported for older code."""
    from vaemo_dist.train import checkpoint as train_checkpoint

    ckpts = _run(tmp_path)
    assert train_checkpoint.resolve(train_checkpoint.LATEST, ckpts) == ckpts / "step_00000004"
    assert train_checkpoint.CheckpointError is CheckpointError
    assert issubclass(ExportError, CheckpointError)


def _export(tmp_path, with_decoder=False):
    from vaemo_dist.export import save_pretrained

    cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                             "model.depth=1", "model.decoder_depth=1"])
    torch.manual_seed(0)
    state = VAEmoModel(cfg.model, cfg.inputs).state_dict()
    weights = {k: v for k, v in state.items() if with_decoder or not is_decoder_key(k)}
    return save_pretrained(tmp_path / "export", weights, cfg, source={"checkpoint": "/x", "step": 3}), weights


def test_an_export_is_told_apart_and_read_back(tmp_path):
    folder, weights = _export(tmp_path)
    assert is_export(folder) and not is_checkpoint(folder)
    assert describe_folder(folder) == "an export (made by vaemo-export from /x at step 3, stage 1)"
    with pytest.raises(NotACheckpointError, match="is an export"):
        resolve(folder)
    export = read_export(folder)
    assert export.stage == 1 and export.text_head is None and export.folder == folder
    state = export.model.state_dict()
    assert set(state) == set(weights)  # no decoder in the export: none in the model
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert not any(p.requires_grad for p in export.model.parameters())


def test_a_broken_export_is_refused(tmp_path):
    folder, _ = _export(tmp_path)
    config = json.loads((folder / checkpoints.CONFIG).read_text())
    (folder / checkpoints.CONFIG).write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(ExportError, match="format 'other'"):
        read_export(folder)
    config["model"]["depth"] = 2
    (folder / checkpoints.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ExportError, match="does not fit the architecture"):
        read_export(folder)
    with pytest.raises(ExportError, match="is not an exported model"):
        read_export(tmp_path)


def _cross_checkpoint(tmp_path, **model_overrides):
    """A step folder whose config.yaml is that of a `model.decoder: cross` run (weights not needed)."""
    import yaml

    cfg = load_config(None, ["model.decoder=cross", "model.decode_fraction=0.25"])
    raw = cfg.to_dict()
    raw["model"].update(model_overrides)
    folder = tmp_path / "step_00000010"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    return folder, raw


def test_a_cross_checkpoint_under_a_full_config_is_refused_naming_model_decoder(tmp_path):
    from vaemo_dist.train.checkpoint import architecture_differences

    folder, raw = _cross_checkpoint(tmp_path)
    full = load_config(None, [])
    assert full.model.decoder == "full"
    with pytest.raises(ValueError, match=r"model\.decoder: 'cross' in the checkpoint, 'full' here"):
        checkpoints.check_compatible(full, folder)
    # Resuming (the trainer's plan reads the same list) is refused likewise.
    assert architecture_differences(full, raw) == ["model.decoder: 'cross' in the checkpoint, 'full' here"]
    # A checkpoint written before model.decoder existed had the full decoder.
    del raw["model"]["decoder"]
    cross = load_config(None, ["model.decoder=cross"])
    assert architecture_differences(cross, raw) == ["model.decoder: 'full' in the checkpoint, 'cross' here"]


def test_decode_fraction_changes_no_weight_and_is_only_noted(tmp_path, caplog):
    folder, _ = _cross_checkpoint(tmp_path)
    cfg = load_config(None, ["model.decoder=cross", "model.decode_fraction=0.5"])
    with caplog.at_level("WARNING"):
        checkpoints.check_compatible(cfg, folder)
    assert "model.decode_fraction: 0.25 in the checkpoint, 0.5 here" in caplog.text


def test_full_and_cross_weights_do_not_load_into_each_other():
    """Why model.decoder is a shape key: the decoder blocks' state-dict names differ, while
    decode_fraction leaves every name and shape as it is."""
    def state(*overrides):
        cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                                 "model.preset=custom", "model.dim=32", "model.heads=2", "model.depth=1",
                                 "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_depth=1",
                                 "model.embed_dim=16", *overrides])
        return {k: tuple(v.shape) for k, v in VAEmoModel(cfg.model, cfg.inputs).state_dict().items()}

    full, cross = state(), state("model.decoder=cross", "model.decode_fraction=0.25")
    assert set(full) != set(cross)
    assert cross == state("model.decoder=cross", "model.decode_fraction=1.0")


def test_an_export_without_the_decoder_starts_any_decoder_fresh(tmp_path, caplog):
    # The export carries no decoder weights: a run with another decoder kind or size may start from
    # it (the decoder starts fresh, said in the log); the encoder's shape keys still must match.
    folder, _ = _export(tmp_path)
    base = ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32", "model.depth=1"]
    other = load_config(None, [*base, "model.decoder=cross", "model.decoder_depth=2"])
    with caplog.at_level("WARNING"):
        checkpoints.check_compatible(other, folder)
    assert "model.decoder: 'full' in the export, 'cross' here (the export has no decoder" in caplog.text
    with pytest.raises(ValueError, match=r"model\.depth: 1 in the export, 2 here"):
        checkpoints.check_compatible(load_config(None, [*base[:3], "model.depth=2"]), folder)
    with_decoder, _ = _export(tmp_path / "d", with_decoder=True)  # its decoder is loaded: kinds must match
    with pytest.raises(ValueError, match=r"model\.decoder: 'full' in the export, 'cross' here"):
        checkpoints.check_compatible(other, with_decoder)
