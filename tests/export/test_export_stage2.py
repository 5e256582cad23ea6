"""vaemo-export of stage-2 (knowledge-injected) runs: a real DeepSpeed checkpoint of `Stage2Model`
(ZeRO-1, a frozen part) exports the VAEmo weights under their usual names plus the text head, and
`from_pretrained` reproduces the training model's clip and text embeddings and classifies zero-shot."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vaemo_dist import export
from vaemo_dist.checkpoints import consolidate, load_init
from vaemo_dist.config import load_config
from vaemo_dist.export import ExportError, export_checkpoint, is_decoder_key, save_pretrained
from vaemo_dist.model.text_head import Stage2Model
from vaemo_dist.model.vaemo import VAEmoModel
from vaemo_dist.pretrained import from_pretrained
from vaemo_dist.text.encode import embed_texts, load_text_encoder

WRITER = Path(__file__).with_name("ckpt_writer.py")
REPO = Path(__file__).resolve().parents[2]
# As in ckpt_writer.py (OVERRIDES + STAGE2_OVERRIDES, TEXT_DIM).
OVERRIDES = ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
             "model.depth=1", "model.decoder_depth=1", "data.batch_size=2",
             "stage2.text_head_hidden=32", "stage2.masked=false", "train.run_name=stage2-tiny-test"]
TEXT_DIM = 384
TEXTS = ["A person who looks and sounds happy.", "An angry face and voice.", "calm", ""]


def exported_run_folder(config: dict) -> Path:
    return Path(config["source"]["checkpoint"]).parents[1]


def tiny_config():
    return load_config(None, OVERRIDES)


def stage2_model(cfg) -> Stage2Model:
    return Stage2Model(VAEmoModel(cfg.model, cfg.inputs), TEXT_DIM, cfg.stage2, cfg.loss)


def clips(n: int = 3, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 32, 32, generator=g), torch.randn(n, 1, 32, 128, generator=g)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A stage-2 run folder: known (perturbed) Stage2Model weights checkpointed under ZeRO-1 by the
    real DeepSpeed engine at step 0 and after 2 stage-2 training steps, with metrics.jsonl."""
    root = tmp_path_factory.mktemp("stage2")
    cfg = tiny_config()
    torch.manual_seed(3)
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in stage2_model(cfg).state_dict().items()}
    save_file(weights, str(root / "weights.safetensors"))
    ckpts = root / "runs" / "stage2-tiny-test" / "checkpoints"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(WRITER), "1", str(ckpts), str(root / "weights.safetensors"),
                           "stage2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stage-2 writer failed:\n{proc.stderr[-3000:]}"
    held = load_file(str(ckpts / "step2_weights.safetensors"))
    return {"run": ckpts.parent, "ckpt": ckpts / "step_00000002", "weights": weights, "held": held}


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    return export_checkpoint(run["run"], tmp_path_factory.mktemp("exports") / "s2")  # the run: latest


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder()  # ~4 s: once for the module


@pytest.fixture(scope="module")
def trained(run) -> Stage2Model:
    """The training model with the weights the engine held at step 2 (independent of the export)."""
    model = stage2_model(tiny_config())
    model.load_state_dict(run["held"])
    return model.eval()


@pytest.fixture(scope="module")
def encoder(exported, text_encoder):
    return from_pretrained(exported, text_encoder=text_encoder)


def test_vaemo_weights_are_exported_under_their_usual_names(run, exported):
    weights = load_file(str(exported / "model.safetensors"))
    cfg = tiny_config()
    expected = {k for k in VAEmoModel(cfg.model, cfg.inputs).state_dict() if not is_decoder_key(k)}
    assert set(weights) == expected  # no vaemo. prefix, no text head in this file
    state = consolidate(run["ckpt"])  # the checkpoint's own weights
    for key, value in weights.items():
        assert torch.equal(value, state[f"vaemo.{key}"]), key
        assert torch.equal(value, run["held"][f"vaemo.{key}"]), key  # what the engine trained
    # Frozen under ZeRO-1 (DeepSpeed's consolidation drops it), yet exported unchanged.
    assert torch.equal(weights["joint_head.weight"], run["weights"]["vaemo.joint_head.weight"])
    assert not torch.equal(weights["video_head.weight"], run["weights"]["vaemo.video_head.weight"])
    head = load_file(str(exported / "text_head.safetensors"))
    assert set(head) == {k.removeprefix("text_head.") for k in run["held"] if k.startswith("text_head.")}
    for key, value in head.items():
        assert torch.equal(value, run["held"][f"text_head.{key}"]), key
    assert not torch.equal(head["proj.0.weight"], run["weights"]["text_head.proj.0.weight"])  # trained


def test_config_and_card_say_stage_2(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["stage"] == 2 and config["includes_text_head"] is True
    assert config["format_version"] == export.FORMAT_VERSION == 2
    assert config["text_head"] == {"file": "text_head.safetensors", "text_encoder": "all-MiniLM-L6-v2",
                                   "text_dim": TEXT_DIM, "text_head_hidden": 32, "embed_dim": 128}
    assert config["source"]["step"] == 2 and config["source"]["zero_stage"] == 1
    card = (exported / "README.md").read_text()
    assert "stage-2 (knowledge-injected) model: stage2-tiny-test at step 2" in card
    assert "MLP (hidden 32)" in card and "embed_text" in card and "zero_shot" in card
    assert "| loss | text_joint | text_audio | text_video | acc_t2j | acc_t2j_class |" in card
    logged = json.loads((exported_run_folder(config) / "metrics.jsonl").read_text())
    assert f"| {logged['loss']:.4f} | {logged['text_joint']:.4f} |" in card


def test_cli_exports_stage2_in_bf16(run, tmp_path, capsys, text_encoder):
    assert export.main([str(run["ckpt"]), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert "exported stage-2 step 2" in capsys.readouterr().err
    head = load_file(str(tmp_path / "bf16" / "text_head.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in head.values())
    enc = from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, text_encoder=text_encoder)
    emb = enc.embed_text(TEXTS[:2])
    assert emb.dtype == torch.bfloat16 and emb.shape == (2, 128)


def test_encode_equals_the_training_models_vaemo_encode(encoder, trained):
    video, audio = clips()
    with torch.no_grad():
        reference = trained.vaemo.encode(video, audio)
    out = encoder.encode(video=video, audio=audio)
    assert encoder.stage == 2 and encoder.has_text_head
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    for name in ("joint_emb", "audio_emb", "video_emb", "joint_pooled"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), rtol=0, atol=1e-6)


def test_embed_text_equals_the_training_text_head(encoder, trained, text_encoder):
    with torch.no_grad():
        reference = trained.text_head(embed_texts(TEXTS, text_encoder))[0]
    emb = encoder.embed_text(TEXTS)
    assert emb.shape == (len(TEXTS), 128)
    torch.testing.assert_close(emb, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(encoder.embed_text(TEXTS[1]), reference[1:2], rtol=0, atol=1e-6)
    # The text encoder is not part of the module: not moved, cast or listed with the parameters.
    assert not any(n.startswith("_text_encoder") for n, _ in encoder.named_parameters())


def test_load_init_reads_the_stage2_checkpoint_frozen_part_included(run):
    """Stage 2 resuming from a stage-2 checkpoint relies on checkpoints.consolidate for frozen weights."""
    model = stage2_model(tiny_config())
    load_init(model, run["ckpt"], tiny_config())
    state = model.state_dict()
    assert set(state) == set(run["held"])
    for key, value in run["held"].items():
        assert torch.equal(state[key], value), key


def test_zero_shot_picks_the_constructed_class(exported, encoder, text_encoder, tmp_path):
    """A linear text head built so that every prompt maps exactly onto a chosen unit vector (near one
    clip's joint embedding for the wordings of its class, different per wording): zero-shot must give
    each clip its class, with the cosines of the averaged, re-normalised prompt vectors."""
    video, audio = clips(2, seed=11)
    joint = encoder.encode(video=video, audio=audio).joint_emb  # [2, E]
    assert (joint[0] @ joint[1]).item() < 0.99  # the two clips are distinguishable
    noise = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    unit = torch.nn.functional.normalize
    prompts = {"happy": ["A person who looks and sounds happy.", "A happy face and voice."],
               "angry": ["An angry face and voice.", "A person who looks and sounds angry.",
                         "Furious shouting."],
               "sad": ["A sad face and voice."]}
    targets = {"happy": [joint[0], unit(joint[0] + 0.05 * noise[0], dim=0)],
               "angry": [joint[1], unit(joint[1] + 0.05 * noise[1], dim=0), unit(joint[1] + 0.05 * noise[2],
                                                                               dim=0)],
               "sad": [unit(noise[3], dim=0)]}
    frozen = embed_texts([p for ps in prompts.values() for p in ps], text_encoder).double()  # [6, T]
    stacked = torch.stack([t for ts in targets.values() for t in ts]).double()  # [6, E]
    weight = stacked.T @ torch.linalg.pinv(frozen.T)  # W t_p = target_p
    weights = load_file(str(exported / "model.safetensors"))
    head = {"proj.weight": weight.float(), "proj.bias": torch.zeros(128),
            "log_logit_scale": torch.full((1,), math.log(1 / 0.07))}
    folder = save_pretrained(tmp_path / "constructed", weights, tiny_config(), text_head=head)
    constructed = from_pretrained(folder, text_encoder=text_encoder)
    classes = unit(torch.stack([torch.stack(ts).mean(dim=0) for ts in targets.values()]), dim=1)  # [3, E]
    cos = joint @ classes.T  # [2, 3], what zero-shot must score
    assert cos.argmax(dim=1).tolist() == [0, 1] and (cos[0, 0] - cos[0, 1]).item() > 1e-3
    res = constructed.zero_shot(video=video, audio=audio, prompts=prompts)
    assert res.classes == ["happy", "angry", "sad"] and res.predicted == ["happy", "angry"]
    assert res.labels.tolist() == [0, 1]
    torch.testing.assert_close(res.scores, cos, rtol=0, atol=1e-4)
    torch.testing.assert_close(res.probs, (cos / 0.07).softmax(dim=1), rtol=0, atol=1e-3)
    # One prompt per class as a list: the prompts name the classes.
    res = constructed.zero_shot(video=video, audio=audio, prompts=[prompts["angry"][0], prompts["happy"][0]])
    assert res.predicted == [prompts["happy"][0], prompts["angry"][0]]
    # Another modality: the audio embeddings are compared instead.
    audio_emb = constructed.encode(video=video, audio=audio).audio_emb
    res = constructed.zero_shot(video=video, audio=audio, prompts=prompts, modality="audio")
    torch.testing.assert_close(res.scores, audio_emb @ classes.T, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="needs its input"):
        constructed.zero_shot(video=video, prompts=prompts, modality="audio")


def test_a_stage1_export_says_how_to_get_a_text_head(exported, tmp_path):
    folder = tmp_path / "s1"
    shutil.copytree(exported, folder)  # a stage-2 export, overwritten as a stage-1 one
    weights = load_file(str(exported / "model.safetensors"))
    save_pretrained(folder, weights, tiny_config())
    assert not (folder / "text_head.safetensors").exists()  # no stale head left behind
    config = json.loads((folder / "config.json").read_text())
    assert config["stage"] == 1 and config["includes_text_head"] is False and config["text_head"] is None
    encoder = from_pretrained(folder)
    assert encoder.stage == 1 and not encoder.has_text_head
    assert encoder.encode(video=clips(1)[0]).video_emb.shape == (1, 128)
    with pytest.raises(ExportError, match="this is a stage-1 export.*export a stage-2 run"):
        encoder.embed_text(["happy"])
    with pytest.raises(ExportError, match="this is a stage-1 export.*export a stage-2 run"):
        encoder.zero_shot(video=clips(1)[0], prompts=["happy", "sad"])


def test_an_old_format_export_still_loads(exported, encoder, tmp_path):
    """config.json of format version 1: no stage, includes_text_head or text_head fields."""
    folder = tmp_path / "v1"
    folder.mkdir()
    shutil.copy(exported / "model.safetensors", folder / "model.safetensors")
    config = json.loads((exported / "config.json").read_text())
    for key in ("stage", "includes_text_head", "text_head"):
        del config[key]
    config["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    old = from_pretrained(folder)
    assert old.stage == 1 and not old.has_text_head
    video, audio = clips(2)
    assert torch.equal(old.encode(video=video, audio=audio).joint_emb,
                       encoder.encode(video=video, audio=audio).joint_emb)
    with pytest.raises(ExportError, match="this is a stage-1 export"):
        old.embed_text(["happy"])


def test_stage2_weights_that_do_not_fit_are_refused(run):
    state = dict(run["held"])  # vaemo.* and text_head.*
    vaemo, head = export.split_stage2_state(state)
    assert head is not None and "proj.0.weight" in head and "blocks.0.attn.qkv.weight" in vaemo
    assert export.split_stage2_state(vaemo) == (vaemo, None)  # stage-1 names pass through
    with pytest.raises(ExportError, match="other weights too"):
        export.split_stage2_state({**state, "norm.weight": torch.ones(3)})
    with pytest.raises(ExportError, match="without text_head"):
        export.split_stage2_state({k: v for k, v in state.items() if k.startswith("vaemo.")})
    with pytest.raises(ExportError, match=r"text_head.proj.2.weight: shape .* for embed_dim 64"):
        export.select_text_head(head, embed_dim=64)
    with pytest.raises(ExportError, match="not those of TextHead"):
        export.select_text_head({**head, "extra": torch.ones(1)}, embed_dim=128)
