"""The stage-2 dual-path objective against a plain reference, its model wrapper, and its start-up checks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.distributed import spawn_gloo, unit_rows
from vaemo_dist.checkpoints import check_compatible, resolve_init
from vaemo_dist.config import LossConfig, Stage2Config, load_config
from vaemo_dist.model.text_head import Stage2Model, Stage2Output
from vaemo_dist.model.vaemo import ModelOutput, VAEmoModel
from vaemo_dist.objectives.stage1 import Stage1Objective
from vaemo_dist.objectives.stage2 import Stage2Objective


def _plain_infonce(x, y, scale):
    """Symmetric InfoNCE written out: row i of x matches row i of y."""
    logits = scale * x @ y.T
    n = x.shape[0]
    loss_xy = -torch.stack([logits[i].log_softmax(0)[i] for i in range(n)]).mean()
    loss_yx = -torch.stack([logits.T[i].log_softmax(0)[i] for i in range(n)]).mean()
    return (loss_xy + loss_yx) / 2


def _va_output(b, e, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    mask_v, mask_a = torch.rand(b, 10, generator=g) < 0.7, torch.rand(b, 6, generator=g) < 0.5
    return ModelOutput(
        video_pred=r(b, 10, 12), video_target=r(b, 10, 12), video_mask=mask_v,
        audio_pred=r(b, 6, 5), audio_target=r(b, 6, 5), audio_mask=mask_a,
        video_emb=unit_rows(b, e, seed + 1).float(), audio_emb=unit_rows(b, e, seed + 2).float(),
        joint_emb=unit_rows(b, e, seed + 3).float(), logit_scale=torch.tensor(12.0),
        video_keep=torch.zeros(b, 1, dtype=torch.long), audio_keep=torch.zeros(b, 1, dtype=torch.long))


def _output(b=6, e=8, seed=0, scale=14.3):
    va = _va_output(b, e, seed)
    return Stage2Output(text_emb=unit_rows(b, e, seed + 4).float(), text_logit_scale=torch.tensor(scale),
                        joint_emb=va.joint_emb, audio_emb=va.audio_emb, video_emb=va.video_emb, va=va)


def test_dual_path_loss_matches_plain_reference():
    out = _output()
    s2 = Stage2Config(joint_weight=1.0, audio_weight=0.3, video_weight=0.7, stage1_weight=0.0)
    total, metrics = Stage2Objective(s2, LossConfig())(out)
    t, s = out.text_emb.double(), torch.tensor(14.3, dtype=torch.float64)
    ref = {name: _plain_infonce(t, emb.double(), s)
           for name, emb in (("text_joint", out.joint_emb), ("text_audio", out.audio_emb),
                             ("text_video", out.video_emb))}
    for name, value in ref.items():
        assert metrics[name] == pytest.approx(value.item(), rel=1e-5)
    expected = 1.0 * ref["text_joint"] + 0.3 * ref["text_audio"] + 0.7 * ref["text_video"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(total.item())
    assert metrics["text_logit_scale"] == pytest.approx(14.3)
    assert metrics["acc_t2j_class"] == -1.0  # no labels given
    assert all(isinstance(v, float) for v in metrics.values())


def test_stage1_term_is_kept_with_its_weight_and_zero_weight_paths_are_skipped():
    out = _output()
    loss_cfg = LossConfig(video_weight=0.5, audio_weight=2.0, contrastive_weight=0.1)
    s2 = Stage2Config(joint_weight=1.0, audio_weight=0.0, video_weight=0.0, stage1_weight=0.25)
    total, metrics = Stage2Objective(s2, loss_cfg)(out)
    s1_total, s1 = Stage1Objective(loss_cfg)(out.va)
    t, s = out.text_emb.double(), torch.tensor(14.3, dtype=torch.float64)
    expected = _plain_infonce(t, out.joint_emb.double(), s) + 0.25 * s1_total.double()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert "text_audio" not in metrics and "text_video" not in metrics
    assert metrics["stage1_loss"] == pytest.approx(s1["loss"]) and metrics["rec_video"] == s1["rec_video"]
    assert {"contrastive", "acc_a2v", "logit_scale"} <= set(metrics)


def test_class_accuracy_counts_same_class_hits():
    e = unit_rows(4, 8, 1).float()
    out = Stage2Output(text_emb=e, text_logit_scale=torch.tensor(10.0), joint_emb=e[[1, 0, 3, 2]],
                       audio_emb=e, video_emb=e, va=None)
    s2 = Stage2Config(audio_weight=0.0, video_weight=0.0)
    _, metrics = Stage2Objective(s2, LossConfig())(out, torch.tensor([0, 0, 1, 1]))
    assert metrics["acc_t2j"] == 0.0 and metrics["acc_t2j_class"] == 1.0
    # Text i retrieves clip [1, 0, 3, 2][i]; rows of unknown class (-1) are not scored.
    _, metrics = Stage2Objective(s2, LossConfig())(out, torch.tensor([0, 0, 1, -1]))
    assert metrics["acc_t2j_class"] == pytest.approx(2 / 3)


WORLD, N_LOCAL, EMBED = 2, 3, 8


def _dist_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        full = _output(b=N_LOCAL * WORLD)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        text = full.text_emb[rows].clone().requires_grad_(True)
        out = Stage2Output(text_emb=text, text_logit_scale=full.text_logit_scale,
                           joint_emb=full.joint_emb[rows], audio_emb=full.audio_emb[rows],
                           video_emb=full.video_emb[rows], va=None)
        loss, _ = Stage2Objective(Stage2Config(), LossConfig(), group=None)(out)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": text.grad}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_infonce_is_over_the_global_batch(tmp_path):
    """Two ranks with 3 rows each: the mean of their losses is the one-process loss over 6 rows, and
    each rank's gradient is its share of the global gradient."""
    res = spawn_gloo(_dist_worker, WORLD, tmp_path)
    out = _output(b=N_LOCAL * WORLD)
    out.text_emb.requires_grad_(True)
    loss, _ = Stage2Objective(Stage2Config(), LossConfig())(out)
    loss.backward()
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    # Each rank's loss is the mean over its own rows: its gradient is WORLD times its share.
    grad = torch.cat([r["grad"] for r in res]) / WORLD
    torch.testing.assert_close(grad, out.text_emb.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The model wrapper


def _tiny_cfg():
    return load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                              "inputs.audio.n_mels=32", "model.dim=32", "model.heads=2", "model.depth=1",
                              "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_depth=1",
                              "model.embed_dim=16", "model.preset=custom"])


def _inputs(cfg, b=3):
    v, a = cfg.inputs.video, cfg.inputs.audio
    video, audio = torch.randn(b, 3, v.frames, v.size, v.size), torch.randn(b, 1, a.frames, a.n_mels)
    return video, audio, torch.randn(b, 24)


@pytest.mark.parametrize("masked", [True, False])
def test_stage2_model_outputs_and_paths(masked):
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = Stage2Model(VAEmoModel(cfg.model, cfg.inputs), 24, Stage2Config(masked=masked), cfg.loss)
    video, audio, text = _inputs(cfg)
    out = model(video, audio, text)
    assert out.text_emb.shape == (3, 16) and out.joint_emb.shape == (3, 16)
    torch.testing.assert_close(out.text_emb.norm(dim=1), torch.ones(3))
    assert (out.va is not None) == masked
    if not masked:  # all tokens visible: the same embeddings as VAEmoModel.encode
        torch.testing.assert_close(out.joint_emb, model.vaemo.encode(video, audio).joint_emb)
    assert set(n.split(".")[0] for n, _ in model.named_parameters()) == {"vaemo", "text_head"}


def test_freeze_encoder_trains_only_the_text_head():
    cfg = _tiny_cfg()
    model = Stage2Model(VAEmoModel(cfg.model, cfg.inputs), 24, Stage2Config(freeze_encoder=True), cfg.loss)
    loss, _ = Stage2Objective(Stage2Config(), cfg.loss)(model(*_inputs(cfg)))
    loss.backward()
    assert all(p.grad is None for p in model.vaemo.parameters())
    assert all(p.grad is not None for p in model.text_head.parameters())


def test_init_checks_name_architecture_differences(tmp_path):
    cfg = _tiny_cfg()
    folder = tmp_path / "run" / "checkpoints" / "step_00000010"
    folder.mkdir(parents=True)
    (folder.parent / "latest").write_text("step_00000010")
    raw = cfg.to_dict()
    raw["model"]["depth"] = 3
    raw["inputs"]["video"]["stride"] = 2
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"")  # what makes it a checkpoint
    for given in (folder, folder.parent / "latest", folder.parent, tmp_path / "run"):
        assert resolve_init(given) == folder
    with pytest.raises(ValueError, match=r"model.depth: 3 in the checkpoint, 1 here"):
        check_compatible(cfg, folder)
    raw["model"]["depth"] = 1
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    check_compatible(cfg, folder)  # only a non-shape difference (a warning)


def test_a_key_the_checkpoint_predates_is_compared_with_its_default(tmp_path, caplog):
    # A stage-1 run written before model.norm_pix_loss_audio existed trained per-patch audio targets
    # (the default, None: as norm_pix_loss); a stage-2 run with false changes them, and says so.
    cfg = _tiny_cfg()
    cfg.model.norm_pix_loss_audio = False
    folder = tmp_path / "step_00000010"
    folder.mkdir()
    raw = cfg.to_dict()
    del raw["model"]["norm_pix_loss_audio"]
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    with caplog.at_level("WARNING"):
        check_compatible(cfg, folder)
    assert "model.norm_pix_loss_audio: None in the checkpoint, False here" in caplog.text
    caplog.clear()
    cfg.model.norm_pix_loss_audio = None
    with caplog.at_level("WARNING"):
        check_compatible(cfg, folder)
    assert "norm_pix_loss_audio" not in caplog.text


def test_frozen_weights_missing_from_consolidation_come_from_the_module_state(tmp_path):
    """ZeRO-0/1 checkpoints of a head-only run keep the frozen encoder only in the module state."""
    from vaemo_dist.checkpoints import _with_frozen_parameters

    cfg = _tiny_cfg()
    model = Stage2Model(VAEmoModel(cfg.model, cfg.inputs), 24, Stage2Config(freeze_encoder=True), cfg.loss)
    full = model.state_dict()
    torch.save({"module": full}, tmp_path / "mp_rank_00_model_states.pt")
    consolidated = {k: v for k, v in full.items() if k.startswith("text_head.")}  # what zero_to_fp32 gives
    state = _with_frozen_parameters(consolidated, tmp_path, tp_rank=0)
    assert state.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(state[k], full[k])


def _export(cfg, folder, seed, text_head=None):
    """An export folder (vaemo-export's format) of a VAEmoModel with seeded weights, every one moved off
    its initial value, decoder left out."""
    from vaemo_dist.export import save_pretrained, select_weights

    torch.manual_seed(seed)
    initial = VAEmoModel(cfg.model, cfg.inputs).state_dict()
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in initial.items()}
    weights = select_weights(state, cfg.model, cfg.inputs, include_decoder=False)
    source = {"checkpoint": "/runs/x/checkpoints/step_00000007", "step": 7}
    save_pretrained(folder, weights, cfg, source=source, text_head=text_head)
    return weights


def test_init_from_an_export_gives_the_exports_weights(tmp_path, caplog):
    from vaemo_dist.checkpoints import load_init
    from vaemo_dist.model.vaemo import is_decoder_key

    cfg = _tiny_cfg()
    weights = _export(cfg, tmp_path / "export", seed=1)
    torch.manual_seed(2)
    model = Stage2Model(VAEmoModel(cfg.model, cfg.inputs), 24, Stage2Config(), cfg.loss)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    assert resolve_init(tmp_path / "export") == tmp_path / "export"
    with caplog.at_level("INFO"):
        assert load_init(model, tmp_path / "export", cfg) == tmp_path / "export"
    assert ("loaded the stage-1 VA model (an export made by vaemo-export from /runs/x/checkpoints/"
            "step_00000007 at step 7)") in caplog.text and "no reconstruction decoder" in caplog.text
    state = model.state_dict()
    for name, value in weights.items():
        torch.testing.assert_close(state[f"vaemo.{name}"], value, rtol=0, atol=0)
        assert not torch.equal(value, initial[f"vaemo.{name}"]), name
    for name, value in initial.items():  # the decoder and the text head keep their initial weights
        if name.startswith("text_head.") or is_decoder_key(name.removeprefix("vaemo.")):
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)

    # A stage-2 export brings its text head when it fits this run's.
    head = {k: torch.randn_like(v) for k, v in model.text_head.state_dict().items()}
    _export(cfg, tmp_path / "export2", seed=3, text_head=head)
    load_init(model, tmp_path / "export2", cfg)
    for name, value in head.items():
        torch.testing.assert_close(model.text_head.state_dict()[name], value, rtol=0, atol=0)

    # An export of another architecture is refused, naming the difference.
    other = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                               "inputs.audio.n_mels=32", "model.dim=32", "model.heads=2", "model.depth=2",
                               "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_depth=1",
                               "model.embed_dim=16", "model.preset=custom"])
    with pytest.raises(ValueError, match=r"model.depth: 1 in the export, 2 here"):
        load_init(Stage2Model(VAEmoModel(other.model, other.inputs), 24, Stage2Config(), other.loss),
                  tmp_path / "export", other)


def test_init_from_the_wrong_kind_of_folder_says_what_it_got(tmp_path):
    described = tmp_path / "described"
    described.mkdir()
    (described / "descriptions.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"is a described set \(vaemo-describe output\); it wants a stage-1 "
                                         r"or stage-2 checkpoint .* or an export folder"):
        resolve_init(described)
