"""vaemo-export: DeepSpeed checkpoints of every ZeRO stage give the same portable weights, read
without unpickling, and the exported encoder reproduces the training model's embeddings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.files import tree_hashes
from vaemo_dist import export
from vaemo_dist.config import load_config
from vaemo_dist.export import ExportError, export_checkpoint
from vaemo_dist.model.vaemo import VAEmoModel
from vaemo_dist.pretrained import from_pretrained

WRITER = Path(__file__).with_name("ckpt_writer.py")
REPO = Path(__file__).resolve().parents[2]
# As in ckpt_writer.py.
OVERRIDES = ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
             "model.depth=1", "model.decoder_depth=1", "data.batch_size=2"]
STAGES = (0, 1, 2, 3)


def tiny_config():
    return load_config(None, OVERRIDES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Known weights (not an initialisation: perturbed) checkpointed under ZeRO 0-3, at step 0 and
    after 2 training steps. The four one-process DeepSpeed runs go in parallel."""
    root = tmp_path_factory.mktemp("ckpts")
    cfg = tiny_config()
    torch.manual_seed(3)
    model = VAEmoModel(cfg.model, cfg.inputs)
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(weights, str(root / "weights.safetensors"))
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = {s: subprocess.Popen([sys.executable, str(WRITER), str(s), str(root / f"zero{s}"),
                                  str(root / "weights.safetensors")], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in STAGES}
    for stage, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"ZeRO-{stage} writer failed:\n{err[-3000:]}"
    return {"root": root, "weights": weights}


def exported(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("exports")
    result = {}
    for stage in STAGES:
        for step in (0, 2):
            folder = checkpoints["root"] / f"zero{stage}" / f"step_{step:08d}"
            result[stage, step] = export_checkpoint(folder, out / f"z{stage}s{step}", include_decoder=True)
    return result


def test_every_zero_stage_exports_the_same_weights(checkpoints, exports):
    source = checkpoints["weights"]
    reference = exported(exports[0, 0])
    assert set(reference) == set(source)
    for key, value in source.items():
        assert torch.equal(reference[key], value), key
    for stage in (1, 2, 3):
        other = exported(exports[stage, 0])
        assert set(other) == set(reference)
        for key in reference:
            assert torch.equal(other[key], reference[key]), (stage, key)


def test_frozen_weights_are_exported_under_every_stage(checkpoints, exports):
    source = checkpoints["weights"]["joint_head.weight"]  # frozen in the writer
    for stage in STAGES:
        assert torch.equal(exported(exports[stage, 2])["joint_head.weight"], source), stage


def test_export_after_training_equals_the_engines_weights(checkpoints, exports):
    for stage in STAGES:
        held = load_file(str(checkpoints["root"] / f"zero{stage}" / "step2_weights.safetensors"))
        weights = exported(exports[stage, 2])
        name = "blocks.0.attn.qkv.weight"
        assert not torch.equal(weights[name], checkpoints["weights"][name])  # training moved it
        for key, value in held.items():
            assert torch.equal(weights[key], value), (stage, key)


def test_export_leaves_the_decoder_out_and_describes_itself(checkpoints, tmp_path):
    folder = checkpoints["root"] / "zero3"  # the run's checkpoints/ root: resolves `latest`
    out = export_checkpoint(folder, tmp_path / "enc")
    weights = exported(out)
    assert "blocks.0.attn.qkv.weight" in weights and "video_head.weight" in weights
    assert "log_logit_scale" in weights
    assert not any(k.startswith(("decoder_", "video_pred", "mask_token")) for k in weights)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["depth"] == 1 and config["inputs"]["video"]["size"] == 32
    assert config["includes_decoder"] is False and config["dtype"] == "float32"
    assert config["source"]["step"] == 2 and config["source"]["zero_stage"] == 3
    assert config["stage"] == 1 and config["includes_text_head"] is False and config["text_head"] is None
    assert not (out / "text_head.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "step 2" in card and "ZeRO-3" in card and "synthetic corpus" in card
    assert card.startswith("# VAEmo encoder:") and "stage-2" not in card


def test_export_reads_checkpoints_with_weights_only(checkpoints, tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for stage in (0, 3):
        export_checkpoint(checkpoints["root"] / f"zero{stage}" / "step_00000002", tmp_path / f"s{stage}")
    assert calls and all(c is True for c in calls), calls


def test_from_pretrained_reproduces_the_training_models_embeddings(checkpoints, exports):
    """An export's encoder equals the training model run with masking off (mask ratios 0)."""
    cfg = load_config(None, OVERRIDES + ["model.mask_ratio_video=0.0", "model.mask_ratio_audio=0.0"])
    trained = VAEmoModel(cfg.model, cfg.inputs)
    held = load_file(str(checkpoints["root"] / "zero3" / "step2_weights.safetensors"))
    trained.load_state_dict(held)
    trained.eval()
    g = torch.Generator().manual_seed(5)
    video, audio = torch.randn(3, 3, 4, 32, 32, generator=g), torch.randn(3, 1, 32, 128, generator=g)
    with torch.no_grad():
        reference = trained(video, audio)
    encoder = from_pretrained(exports[3, 2])
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    out = encoder.encode(video=video, audio=audio)
    for name in ("video_emb", "audio_emb", "joint_emb"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), rtol=0, atol=1e-6)


def test_an_export_from_a_newer_version_loads_ignoring_keys_it_does_not_know(exports, tmp_path, caplog):
    folder = tmp_path / "newer"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (folder / name).write_bytes((exports[3, 2] / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["model"]["a_future_knob"] = 3
    config["inputs"]["audio"]["another_one"] = "x"
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        newer = from_pretrained(folder)
    assert "a_future_knob" in caplog.text and "another_one" in caplog.text
    g = torch.Generator().manual_seed(5)
    video, audio = torch.randn(2, 3, 4, 32, 32, generator=g), torch.randn(2, 1, 32, 128, generator=g)
    torch.testing.assert_close(newer.encode(video=video, audio=audio).joint_emb,
                               from_pretrained(exports[3, 2]).encode(video=video, audio=audio).joint_emb,
                               rtol=0, atol=0)
    config["model"]["dim"] = 2 * config["model"]["dim"]  # an architecture that does not fit the weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="does not fit the architecture.*size mismatch"):
        from_pretrained(folder)


def test_cli_exports_and_fails_clearly(checkpoints, tmp_path, capsys):
    args = [str(checkpoints["root"] / "zero1"), "--out", str(tmp_path / "cli"), "--dtype", "bf16"]
    assert export.main(args) == 0
    weights = exported(tmp_path / "cli")
    assert weights["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert export.main([str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a folder of other files (cli)" in err and "wants a training checkpoint" in err
    assert not (tmp_path / "x").exists()


def test_mismatched_weights_are_refused(checkpoints):
    cfg = tiny_config()
    state = dict(checkpoints["weights"])
    state.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(ExportError, match="lacks 1 weights"):
        export.select_weights(state, cfg.model, cfg.inputs, include_decoder=False)
    state = dict(checkpoints["weights"])
    state["norm.weight"] = torch.ones(7)
    with pytest.raises(ExportError, match="norm.weight: shape"):
        export.select_weights(state, cfg.model, cfg.inputs, include_decoder=False)





def test_vaemo_export_on_an_export_says_it_is_already_one(exports, tmp_path, capsys):
    assert export.main([str(exports[1, 2]), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert f"{exports[1, 2]} is already an export (made by vaemo-export from " in err
    assert "step_00000002 at step 2, stage 1)" in err and "config.yaml" not in err
    assert not (tmp_path / "again").exists()
    described = tmp_path / "described"  # another kind of folder: said what it is
    described.mkdir()
    (described / "descriptions.jsonl").write_text("{}\n")
    assert export.main([str(described), "--out", str(tmp_path / "x")]) == 2
    assert "is a described set (vaemo-describe output); vaemo-export wants a training checkpoint" in \
        capsys.readouterr().err


def test_export_into_a_users_folder_is_refused_and_left_unchanged(checkpoints, tmp_path, capsys):
    from vaemo_dist.fsutil import OWNER_FILE, folder_owner

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    (mine / "model.safetensors").write_bytes(b"my own weights")
    before = tree_hashes(mine)
    args = [str(checkpoints["root"] / "zero2"), "--out", str(mine)]
    assert export.main(args) == 2
    err = capsys.readouterr().err
    assert f"refusing to write into {mine}" in err and "Nothing was changed" in err and "--overwrite" in err
    assert tree_hashes(mine) == before
    assert export.main([*args, "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(aside) == 1 and tree_hashes(aside[0]) == before  # moved aside whole, never deleted
    assert folder_owner(mine) == export.WRITER and export.is_export(mine)
    # vaemo-export's own folder (and an older, unmarked export) takes a new export.
    assert export.main(args) == 0
    (mine / OWNER_FILE).unlink()
    assert export.main(args) == 0 and folder_owner(mine) == export.WRITER


def test_export_or_checkpoint_gives_an_export_for_either(checkpoints, exports, tmp_path, monkeypatch):
    import os

    assert export.export_or_checkpoint(exports[0, 2], tmp_path / "cache") == exports[0, 2]
    calls = []
    real = export.export_checkpoint
    monkeypatch.setattr(export, "export_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    run = checkpoints["root"] / "zero0"
    for given in (run, run / "latest", run / "step_00000002"):  # all mean step 2
        out = export.export_or_checkpoint(given, tmp_path / "cache")
        assert out.parent == tmp_path / "cache" and export.is_export(out)
    assert len(calls) == 1  # exported once, then reused
    for name, value in exported(out).items():
        torch.testing.assert_close(value, exported(exports[0, 2])[name], rtol=0, atol=0)
    states = next((run / "step_00000002").glob("*model_states.pt"))
    os.utime(states, ns=(states.stat().st_atime_ns, states.stat().st_mtime_ns + 10**9))  # changed since
    assert export.export_or_checkpoint(run, tmp_path / "cache") == out and len(calls) == 2
    with pytest.raises(ExportError, match="is an empty folder; vaemo-export wants a training checkpoint"):
        (tmp_path / "empty").mkdir()
        export.export_or_checkpoint(tmp_path / "empty", tmp_path / "cache")
