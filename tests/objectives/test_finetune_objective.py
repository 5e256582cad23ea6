import pytest
import torch

from vaemo_dist.config import OptimConfig, load_config
from vaemo_dist.model.vaemo import VAEmoModel
from vaemo_dist.objectives.finetune import Classifier, FinetuneObjective
from vaemo_dist.train.schedule import build_optimizer, warmup_cosine

OVERRIDES = ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32", "model.depth=2",
             "model.decoder_depth=1"]


def classifier(modality="av", decay=0.5):
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    return Classifier(VAEmoModel(cfg.model, cfg.inputs), 3, modality, layer_decay=decay)


def batch(b=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, 4, 32, 32, generator=g), torch.randn(b, 1, 32, 128, generator=g)


def test_layer_wise_lr_decay_groups():
    model = classifier(decay=0.5)
    optim = OptimConfig(lr=1e-3, weight_decay=0.05)
    groups = model.optimizer_param_groups(optim)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["backbone.norm.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["backbone.blocks.1.mlp.0.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == pytest.approx(2.5e-4)
    assert lr_of[id(named["backbone.video_embed.proj.weight"])] == pytest.approx(1.25e-4)
    assert wd_of[id(named["head.weight"])] == 0.05 and wd_of[id(named["head.bias"])] == 0.0
    # Frozen: the contrastive heads and the temperature, unused by the classifier; no decoder at all.
    assert id(named["backbone.video_head.weight"]) not in lr_of
    assert not named["backbone.log_logit_scale"].requires_grad
    assert not any("decoder" in n or "pred" in n for n in named)
    # build_optimizer takes the model's groups, and the schedule keeps their ratios.
    opt = build_optimizer(model, optim)
    sched = warmup_cosine(opt, 100, OptimConfig(lr=1e-3, warmup_steps=10))
    ratios = [g["lr"] / opt.param_groups[0]["lr"] for g in opt.param_groups]
    opt.step()  # no gradients: changes nothing, but keeps the scheduler's order check quiet
    sched.step()
    assert [g["lr"] / opt.param_groups[0]["lr"] for g in opt.param_groups] == pytest.approx(ratios)
    assert min(ratios) == pytest.approx(0.125)


def test_classifier_uses_the_chosen_modalities():
    video, audio = batch()
    av, v_only = classifier("av"), classifier("video")
    assert av(video, audio).shape == (4, 3) and av.head.in_features == 2 * 192
    assert v_only.head.in_features == 192
    assert torch.equal(v_only(video, audio), v_only(video, torch.randn_like(audio)))  # audio ignored
    assert not torch.equal(av(video, audio), av(video, torch.randn_like(audio)))


def test_objective_trains_and_mixup_changes_the_loss():
    model = classifier()
    video, audio = batch(6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = FinetuneObjective(3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(8):
        loss, metrics = plain(model, video, audio, labels)
        first = first if first is not None else metrics["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["loss"] < 0.5 * first and set(metrics) == {"loss", "acc"}
    model.eval()
    torch.manual_seed(0)
    mixed, _ = FinetuneObjective(3, mixup_alpha=0.4)(model, video, audio, labels)
    unmixed, _ = plain(model, video, audio, labels)
    assert not torch.isclose(mixed, unmixed)
    with pytest.raises(ValueError, match="labels"):
        plain(model, video, audio, torch.tensor([0, 1, 2, 0, 1, -1]))
