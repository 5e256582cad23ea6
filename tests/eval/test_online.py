"""Online evaluation: a tiny model on a 16-clip held-out synthetic corpus, evaluated as the trainer does."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vaemo_dist.config import load_config
from vaemo_dist.eval.online import (
    METRIC_NAMES,
    OnlineEvaluator,
    heldout_dir,
    heldout_seed,
    load_online_heldout,
    log_pictures,
    prepare_online_eval,
    probe_scores,
    probe_split,
    recall_at_1,
)
from vaemo_dist.model.vaemo import EncoderOutput, VAEmoModel
from vaemo_dist.objectives.stage1 import masked_mse

# Inputs as in tests/integration/test_stage1_run.py, one encoder and one decoder block.
TINY = ["inputs.video.frames=8", "inputs.video.size=64", "inputs.audio.frames=128", "model.depth=1",
        "model.decoder_depth=1", "data.synth.size=64", "data.synth.clips_per_shard=8",
        "eval.every=5", "eval.clips=16", "eval.batch_size=6", "eval.pictures=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    cfg = load_config(None, [*TINY, f"data.synth.dir={root / 'synthetic'}"])
    prepare_online_eval(cfg)
    evaluator = OnlineEvaluator(cfg, torch.device("cpu"), torch.float32, root / "run", is_main=True)
    torch.manual_seed(0)
    model = VAEmoModel(cfg.model, cfg.inputs)
    return cfg, evaluator, model, root


def test_heldout_corpus_sits_next_to_the_training_corpus_with_another_seed(setup):
    cfg, evaluator, _, root = setup
    assert heldout_dir(cfg) == root / "synthetic-heldout" / "seed1-16-c4"
    manifest = json.loads((heldout_dir(cfg) / "corpus" / "manifest.json").read_text())
    assert manifest["seed"] == heldout_seed(cfg) != cfg.data.synth.seed
    assert manifest["total"] == 16 and manifest["class_counts"] == [4, 4, 4, 4]
    assert not (root / "synthetic").exists()  # the training corpus is not built for evaluation
    assert evaluator.keys == sorted(evaluator.keys) and len(evaluator.keys) == 16
    assert evaluator.video.shape == (16, 3, 8, 64, 64) and evaluator.audio.shape == (16, 1, 128, 128)
    assert evaluator.due(5) and evaluator.due(10) and not evaluator.due(0) and not evaluator.due(7)


def test_shard_spec_with_labels_and_a_clip_limit(setup):
    cfg, _, _, _ = setup
    spec = load_config(None, [*TINY, f"eval.shards={heldout_dir(cfg) / 'corpus'}", "eval.clips=6"])
    keys, labels, video, audio = load_online_heldout(spec)
    assert len(keys) == 6 and video.shape[0] == 6 and audio.shape[0] == 6
    assert (labels >= 0).all()


def test_an_undecodable_heldout_clip_is_skipped_and_named(setup, tmp_path, caplog):
    import webdataset as wds

    cfg, _, _, _ = setup
    source = sorted((heldout_dir(cfg) / "corpus").glob("shard-*.tar"))[0]
    shard = tmp_path / "val-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i, sample in enumerate(wds.WebDataset(str(source), shardshuffle=False)):
            sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            if i == 1:
                sample["mp4"] = b"garbage" * 10
            w.write(sample)
            if i == 3:
                break
    spec = load_config(None, [*TINY, f"eval.shards={shard}", "eval.clips=4"])
    with caplog.at_level("WARNING"):
        keys, _, video, _ = load_online_heldout(spec)
    assert len(keys) == 3 and video.shape[0] == 3
    assert "held-out clip clip-000001" in caplog.text
    assert "1 held-out clip(s) could not be decoded" in caplog.text


def test_run_gives_finite_deterministic_figures_and_leaves_training_state_alone(setup):
    cfg, evaluator, model, root = setup
    model.train()
    model.decoder_norm.eval()  # a module someone keeps in eval mode stays so
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first, paths = evaluator.run(model, 5, train_flops=2.5e12)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.blocks[0].training and not model.decoder_norm.training

    assert set(METRIC_NAMES) <= set(first) and first["train_flops"] == 2.5e12
    assert all(math.isfinite(first[k]) for k in METRIC_NAMES)
    for k in ("eval/probe_uar", "eval/probe_war", "eval/r1_v2a", "eval/r1_a2v"):
        assert 0.0 <= first[k] <= 1.0, (k, first[k])
    assert first["eval/rec_video"] > 0 and first["eval/rec_audio"] > 0
    w = cfg.loss
    assert first["eval/rec_loss"] == pytest.approx(w.video_weight * first["eval/rec_video"]
                                                   + w.audio_weight * first["eval/rec_audio"])

    torch.manual_seed(999)  # another training RNG position: the masks must not follow it
    second, paths2 = evaluator.run(model, 10)
    assert {k: second[k] for k in METRIC_NAMES} == {k: first[k] for k in METRIC_NAMES}
    assert "train_flops" not in second

    assert paths == [root / "run" / "pictures" / "recon_step00000005.png"]
    assert paths2 == [root / "run" / "pictures" / "recon_step00000010.png"]
    with Image.open(paths[0]) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 500


def test_rec_loss_is_the_training_objectives_masked_mse_at_the_same_masks(setup):
    cfg, evaluator, model, _ = setup
    quiet = copy.copy(evaluator)
    quiet.is_main = False  # no pictures: nothing written, none returned
    base, paths = quiet.run(model, 1)
    assert paths == []
    # By hand: the eval-mode forward with masks from a generator seeded as the evaluator's, batch by batch.
    generator = torch.Generator().manual_seed(evaluator.mask_seed)
    model.eval()
    sums, bs = torch.zeros(2, dtype=torch.float64), cfg.eval.batch_size
    with torch.no_grad():
        for i in range(0, 16, bs):
            out = model(evaluator.video[i : i + bs], evaluator.audio[i : i + bs], generator=generator)
            n = out.video_mask.shape[0]
            sums[0] += n * masked_mse(out.video_pred, out.video_target, out.video_mask).item()
            sums[1] += n * masked_mse(out.audio_pred, out.audio_target, out.audio_mask).item()
    model.train()
    assert base["eval/rec_video"] == pytest.approx(sums[0].item() / 16, rel=1e-6)
    assert base["eval/rec_audio"] == pytest.approx(sums[1].item() / 16, rel=1e-6)
    # A change of the video decoder's output moves the video figure only.
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.video_pred.bias.add_(1.0)
    worse, _ = quiet.run(changed, 1)
    assert worse["eval/rec_video"] > base["eval/rec_video"] + 0.5
    assert worse["eval/rec_audio"] == pytest.approx(base["eval/rec_audio"])


def test_wrapped_models_are_unwrapped(setup):
    _, evaluator, model, _ = setup
    quiet = copy.copy(evaluator)
    quiet.is_main = False
    direct, _ = quiet.run(model, 1)
    engine = SimpleNamespace(module=model)  # DeepSpeed engine
    stage2 = SimpleNamespace(vaemo=model)  # Stage2Model
    for wrapped in (engine, stage2, SimpleNamespace(module=stage2)):
        got, _ = quiet.run(wrapped, 1)
        assert {k: got[k] for k in METRIC_NAMES} == {k: direct[k] for k in METRIC_NAMES}
    with pytest.raises(TypeError):
        quiet.run(torch.nn.Linear(2, 2), 1)


def test_probe_and_retrieval_see_label_carrying_features(setup, monkeypatch):
    """An encoder whose pooled video features are the clip's one-hot label (plus noise) gives a
    perfect probe; clip-specific embeddings shared by both modalities give perfect retrieval."""
    _, evaluator, model, _ = setup
    lookup = {evaluator.video[i].numpy().tobytes(): i for i in range(len(evaluator.keys))}
    labels = evaluator.labels

    def fake_encode(video, audio):
        idx = torch.tensor([lookup[v.numpy().tobytes()] for v in video])
        g = torch.Generator().manual_seed(int(idx.sum()))
        onehot = 3.0 * F.one_hot(labels[idx], 4).float() + 0.3 * torch.randn(len(idx), 4, generator=g)
        noise = torch.randn(len(idx), 8, generator=g)
        emb = F.normalize(torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(int(i)))
                                       for i in idx]), dim=-1)
        return EncoderOutput(video_tokens=None, audio_tokens=None, video_pooled=onehot, audio_pooled=noise,
                             joint_pooled=onehot, video_emb=emb, audio_emb=emb, joint_emb=emb)

    monkeypatch.setattr(model, "encode", fake_encode)
    quiet = copy.copy(evaluator)
    quiet.is_main = False
    m, _ = quiet.run(model, 1)
    assert m["eval/probe_uar"] == 1.0 and m["eval/probe_war"] == 1.0
    assert m["eval/r1_v2a"] == 1.0 and m["eval/r1_a2v"] == 1.0


def test_probe_is_near_chance_on_random_features_and_perfect_on_separable_ones():
    rng = np.random.default_rng(0)
    n, classes = 400, 4
    labels = np.arange(n) % classes
    keys = [f"clip-{i:06d}" for i in range(n)]
    uar, war = probe_scores(rng.normal(size=(n, 64)), labels, keys, l2=1e-2)
    assert abs(uar - 0.25) < 0.1 and abs(war - 0.25) < 0.1, (uar, war)
    separable = np.eye(classes)[labels] + 0.1 * rng.normal(size=(n, classes))
    separable = np.concatenate([separable, rng.normal(size=(n, 60))], axis=1)
    uar, war = probe_scores(separable, labels, keys, l2=1e-2)
    assert uar > 0.97 and war > 0.97
    # Too few classes to fit: no figure rather than a misleading one.
    assert all(math.isnan(x) for x in probe_scores(rng.normal(size=(4, 3)), np.zeros(4, int), keys[:4], 1e-2))


def test_probe_split_is_fixed_stratified_and_order_free():
    keys = [f"clip-{i:06d}" for i in range(21)]
    labels = np.array([i % 3 for i in range(20)] + [-1])  # the last clip has no label
    fit, score = probe_split(keys, labels)
    assert len(set(fit) & set(score)) == 0 and sorted([*fit, *score]) == list(range(20))
    for c in range(3):
        assert abs(int((labels[fit] == c).sum()) - int((labels[score] == c).sum())) <= 1
    order = np.random.default_rng(1).permutation(21)
    fit2, score2 = probe_split([keys[i] for i in order], labels[order])
    assert {keys[order[i]] for i in fit2} == {keys[i] for i in fit}
    assert {keys[order[i]] for i in score2} == {keys[i] for i in score}


def test_recall_at_1():
    emb = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert recall_at_1(emb, emb) == 1.0
    assert recall_at_1(emb, emb.roll(1, dims=0)) == 0.0
    collapsed = torch.ones(10, 8)
    assert recall_at_1(collapsed, collapsed) == pytest.approx(0.1)


def test_log_pictures_sends_images_to_wandb(setup, tmp_path):
    _, _, _, root = setup
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png)
    calls = []
    log_pictures(SimpleNamespace(log=lambda data, step: calls.append((data, step))), [png], 30)
    assert len(calls) == 1 and calls[0][1] == 30 and len(calls[0][0]["eval/reconstruction"]) == 1
    log_pictures(None, [png], 30)  # rank != 0 or wandb disabled: nothing to do
    assert Path(png).is_file()


def test_stage2_models_get_zero_shot_figures_that_match_an_independent_computation(setup, tmp_path):
    """Zero-shot UAR/WAR as the evaluator reports them, recomputed here from the text encoder, the
    model's head and the clips' embeddings, with scikit-learn's balanced accuracy as the UAR."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from vaemo_dist.config import Stage2Config
    from vaemo_dist.data.synth import class_name
    from vaemo_dist.eval.online import ZERO_SHOT_NAMES, prepare_zero_shot
    from vaemo_dist.objectives.stage2 import Stage2Model
    from vaemo_dist.text.encode import DEFAULT_ENCODER, embed_texts, load_text_encoder
    from vaemo_dist.text.synthetic import class_prompts

    cfg, _, model, _ = setup
    encoder = load_text_encoder()
    run_dir = tmp_path / "run"
    path = prepare_zero_shot(cfg, run_dir, DEFAULT_ENCODER, encoder)
    assert path is not None and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert prepare_zero_shot(cfg, run_dir, DEFAULT_ENCODER) == path and path.stat().st_mtime_ns == mtime
    evaluator = OnlineEvaluator(cfg, torch.device("cpu"), torch.float32, run_dir, is_main=True)
    torch.manual_seed(1)
    stage2 = Stage2Model(copy.deepcopy(model), 384, Stage2Config(), cfg.loss).eval()
    figures, _ = evaluator.run(SimpleNamespace(module=stage2), 5)  # as the trainer passes a DeepSpeed engine
    assert set(ZERO_SHOT_NAMES) <= figures.keys()

    class_emb = []
    for c in range(cfg.data.synth.classes):  # every wording of every class, averaged per class
        text = stage2.embed_text(embed_texts(class_prompts(class_name(c)), encoder))
        class_emb.append(F.normalize(text.mean(dim=0), dim=-1))
    class_emb = torch.stack(class_emb)
    with torch.no_grad():
        enc = stage2.vaemo.encode(evaluator.video, evaluator.audio)
    labels = evaluator.labels.numpy()
    for key, emb in (("", enc.joint_emb), ("_audio", enc.audio_emb), ("_video", enc.video_emb)):
        pred = (emb @ class_emb.T).argmax(dim=1).numpy()
        uar = balanced_accuracy_score(labels, pred)
        assert figures[f"eval/zero_shot_uar{key}"] == pytest.approx(uar, abs=1e-9), key
        if not key:
            assert figures["eval/zero_shot_war"] == pytest.approx(accuracy_score(labels, pred), abs=1e-9)

    figures1, _ = evaluator.run(stage2.vaemo, 5)  # a stage-1 model has no text head: no zero-shot keys
    assert not set(ZERO_SHOT_NAMES) & figures1.keys()
    off = OnlineEvaluator(copy.deepcopy(cfg), torch.device("cpu"), torch.float32, run_dir, is_main=True)
    off.cfg.eval.zero_shot = False
    assert not set(ZERO_SHOT_NAMES) & off.run(stage2, 5)[0].keys()


def test_zero_shot_without_prepared_prompts_is_skipped_and_said_once(setup, tmp_path, caplog):
    from vaemo_dist.config import Stage2Config
    from vaemo_dist.eval.online import ZERO_SHOT_NAMES
    from vaemo_dist.objectives.stage2 import Stage2Model

    cfg, _, model, _ = setup
    evaluator = OnlineEvaluator(cfg, torch.device("cpu"), torch.float32, tmp_path / "bare", is_main=True)
    stage2 = Stage2Model(copy.deepcopy(model), 384, Stage2Config(), cfg.loss).eval()
    with caplog.at_level("WARNING"):
        for step in (5, 10):
            assert not set(ZERO_SHOT_NAMES) & evaluator.run(stage2, step)[0].keys()
    assert caplog.text.count("zero-shot evaluation skipped") == 1


def test_zero_shot_needs_the_names_of_the_heldout_labels(setup, tmp_path):
    from vaemo_dist.eval.online import heldout_class_names, prepare_zero_shot

    cfg, _, _, _ = setup
    assert heldout_class_names(cfg) == ["neutral", "happy", "sad", "angry"]
    many = load_config(None, [*TINY, "eval.classes=32"])
    assert heldout_class_names(many) is None  # label k sits elsewhere on the cue scale
    assert prepare_zero_shot(many, tmp_path, "unused") is None  # nothing to embed, no model loaded
    named = load_config(None, [*TINY, "eval.shards=/some/val", "eval.class_names=[calm,tense]"])
    assert heldout_class_names(named) == ["calm", "tense"]
    shards = tmp_path / "val"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"class_names": ["calm", "tense", "sad"]}))
    from_manifest = load_config(None, [*TINY, f"eval.shards={shards}"])
    assert heldout_class_names(from_manifest) == ["calm", "tense", "sad"]
