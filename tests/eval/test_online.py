"""Online evaluation: a tiny model on a 16-clip held-out synthetic corpus, evaluated as the trainer does."""

from __future__ import annotations

import copy
import json
import math
import re
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
    from vaemo_dist.model.text_head import Stage2Model
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
    from vaemo_dist.model.text_head import Stage2Model

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


# --------------------------------------------------------------------------------------------
# Which held-out clips: synthetic only when training is synthetic; eval.holdout by speaker


def _with_speakers(source: Path, out: Path, speaker_of) -> list[str]:
    """A copy of the shards of `source` whose clips' json carry `speaker_of(index)` (None: no field),
    with a vaemo-shard-like manifest naming the classes; returns the keys in order."""
    import webdataset as wds

    from vaemo_dist.data.shards import expand_shards, read_shard

    out.mkdir(parents=True)
    keys, names = [], []
    for s, url in enumerate(expand_shards(str(source))):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for sample in read_shard(url):
                meta = json.loads(sample["json"])
                speaker = speaker_of(len(keys))
                if speaker is not None:
                    meta["speaker"] = speaker
                w.write({"__key__": sample["__key__"], "mp4": sample["mp4"], "flac": sample["flac"],
                         "json": json.dumps(meta).encode()})
                keys.append(sample["__key__"])
        names.append(name)
    (out / "manifest.json").write_text(json.dumps({"shards": names, "class_names": ["n", "h", "s", "a"]}))
    return keys


@pytest.fixture(scope="module")
def speaker_shards(setup, tmp_path_factory):
    """The 16 held-out synthetic clips as 'user' shards of 4 speakers (4 clips each, mixed classes)."""
    cfg = setup[0]
    out = tmp_path_factory.mktemp("user") / "shards"
    keys = _with_speakers(heldout_dir(cfg) / "corpus", out, lambda i: f"spk{i % 4}")
    return out, keys


def test_eval_set_is_synthetic_only_when_training_is(tmp_path):
    from vaemo_dist.eval.online import eval_set

    synthetic = eval_set(load_config(None, TINY))
    assert (synthetic.kind, synthetic.name) == ("synthetic", "synthetic held-out (4 classes)")
    assert eval_set(load_config(None, [*TINY, "eval.classes=16"])).name == "synthetic held-out (16 classes)"
    described = load_config(None, [*TINY, f"data.shards={tmp_path / 'described'}"])
    assert eval_set(described).kind == "off"  # a folder named by the user is the user's data

    user = [*TINY, f"data.shards={tmp_path / 'mine'}"]
    off = eval_set(load_config(None, user))
    assert off.kind == "off" and "eval.holdout=0.1" in off.why
    assert "eval.shards=<your held-out shards>" in off.why
    assert str(tmp_path / "mine") in off.why
    held = eval_set(load_config(None, [*user, "eval.holdout=0.1"]))
    assert (held.kind, held.name) == ("holdout", f"held-out 10% of {tmp_path / 'mine'}")
    assert eval_set(load_config(None, [*user, "eval.holdout=12"])).name.startswith("held-out 12 clips of")
    given = eval_set(load_config(None, [*user, "eval.shards=s3://key:secret@bucket/val-{0..3}.tar"]))
    assert given.kind == "shards" and "secret" not in given.name and "bucket/val-{0..3}.tar" in given.name
    asked = eval_set(load_config(None, [*user, "eval.shards=synthetic"]))  # asked for: honoured, so named
    assert asked.kind == "synthetic" and asked.name.startswith("synthetic")


@pytest.mark.parametrize("overrides, message", [
    (["eval.holdout=1.5"], "eval.holdout: 1.5: a fraction in [0, 1)"),
    (["eval.holdout=-0.1"], "eval.holdout: -0.1"),
    (["eval.holdout=0.1", "eval.shards=/val"], "eval.shards='/val' already names the held-out clips"),
])
def test_bad_holdout_settings_are_config_errors(overrides, message):
    from vaemo_dist.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*TINY, *overrides])


def test_split_holdout_never_puts_a_speaker_on_both_sides():
    from vaemo_dist.eval.online import HoldoutError, split_holdout

    rng = np.random.default_rng(0)
    for seed in range(20):
        n_speakers = int(rng.integers(2, 9))
        clips = [(f"k{i:03d}", f"spk{int(rng.integers(n_speakers))}") for i in range(60)]
        for holdout in (0.1, 0.3, 5):
            try:
                keys, speakers, rest, how = split_holdout(clips, holdout, seed)
            except HoldoutError:
                assert len({s for _, s in clips}) == 1 or holdout >= 0.3
                continue
            held = set(keys)
            speaker_of = dict(clips)
            assert how == "speaker" and {speaker_of[k] for k in held} == set(speakers)
            assert {speaker_of[k] for k in speaker_of if k not in held} == set(rest)
            assert not set(speakers) & set(rest) and rest
            target = round(holdout * 60) if holdout < 1 else holdout
            assert len(held) >= target  # whole speakers until the amount is reached
    clips = [(f"k{i}", f"spk{i % 6}") for i in range(48)]
    assert split_holdout(clips, 0.1, 0) == split_holdout(list(reversed(clips)), 0.1, 0)  # order-free
    assert len({tuple(split_holdout(clips, 0.1, seed)[1]) for seed in range(10)}) > 2  # the seed picks them
    with pytest.raises(HoldoutError, match="would leave none to train on"):
        split_holdout([(f"k{i}", "only") for i in range(10)], 0.2, 0)
    with pytest.raises(HoldoutError, match="nothing would be left"):
        split_holdout(clips, 48, 0)


def test_split_holdout_without_speakers_is_by_clip_and_says_so():
    from vaemo_dist.eval.online import split_holdout

    keys, speakers, rest, how = split_holdout([(f"k{i}", None) for i in range(40)], 0.25, 1)
    assert how == "clip" and len(keys) == 10 and speakers == [] and rest == []
    mixed = [(f"k{i}", "a" if i < 10 else "b" if i < 20 else None) for i in range(30)]
    _, _, _, how = split_holdout(mixed, 0.5, 0)
    assert how == "speaker (10 clips without one by clip)"


def test_holdout_is_split_by_speaker_written_once_and_reused(setup, speaker_shards, tmp_path, caplog):
    from vaemo_dist.eval.online import HOLDOUT_FILE, ensure_holdout, eval_set, heldout_class_names

    shards, keys = speaker_shards
    run_dir = tmp_path / "runs" / "mine"
    cfg = load_config(None, [*TINY, f"data.shards={shards}", "eval.holdout=0.25", "eval.clips=4",
                             f"train.out_dir={run_dir.parent}", f"train.run_name={run_dir.name}"])
    with caplog.at_level("INFO"):
        prepare_online_eval(cfg)  # as the launcher does, once per node
    record = json.loads((run_dir / HOLDOUT_FILE).read_text())
    assert record["by"] == "speaker" and len(record["speakers"]) == 1 and len(record["keys"]) == 4
    assert record["clips_total"] == 16 and record["seed"] == cfg.data.shuffle_seed
    assert record["shards"] == [str(shards / "shard-000000.tar"), str(shards / "shard-000001.tar")]
    speaker_of = {k: f"spk{i % 4}" for i, k in enumerate(keys)}
    assert {speaker_of[k] for k in record["keys"]} == set(record["speakers"])
    assert not set(record["speakers"]) & set(record["train_speakers"])
    assert len(record["train_speakers"]) == 3
    assert "never trained on" in caplog.text
    assert heldout_class_names(cfg) == ["n", "h", "s", "a"]  # from the training shards' manifest

    # The evaluator uses those clips and names the set everywhere.
    evaluator = OnlineEvaluator(cfg, torch.device("cpu"), torch.float32, run_dir, is_main=True)
    assert sorted(evaluator.keys) == sorted(record["keys"])
    assert evaluator.set_name == f"held-out 25% of {shards} by speaker (4 clips, 1 speaker)"
    torch.manual_seed(0)
    with caplog.at_level("INFO"):
        figures, _ = evaluator.run(VAEmoModel(cfg.model, cfg.inputs), 5)
    assert figures["eval/set"] == evaluator.set_name
    assert f"step 5 evaluation on {evaluator.set_name}: probe_uar" in caplog.text

    # Reused as it is on resume, even when the config now asks for another amount (said in the log).
    before = (run_dir / HOLDOUT_FILE).read_bytes()
    more = load_config(None, [*TINY, f"data.shards={shards}", "eval.holdout=0.5",
                              f"train.out_dir={run_dir.parent}", f"train.run_name={run_dir.name}"])
    with caplog.at_level("WARNING"):
        again = ensure_holdout(more)
    assert again.keys == record["keys"] and (run_dir / HOLDOUT_FILE).read_bytes() == before
    assert "Kept as it is" in caplog.text
    assert eval_set(more).kind == "holdout"


def test_without_heldout_clips_evaluation_is_off_and_nothing_synthetic_is_built(speaker_shards, tmp_path):
    shards, _ = speaker_shards
    cfg = load_config(None, [*TINY, f"data.shards={shards}", f"data.synth.dir={tmp_path / 'synthetic'}",
                             f"train.out_dir={tmp_path}"])
    prepare_online_eval(cfg)
    assert not any(tmp_path.iterdir())  # no synthetic held-out corpus, no holdout.json
    with pytest.raises(ValueError, match="online evaluation is off"):
        OnlineEvaluator(cfg, torch.device("cpu"), torch.float32, tmp_path / "run", is_main=True)


def test_holdout_without_speakers_is_by_clip(setup, tmp_path):
    from vaemo_dist.eval.online import ensure_holdout

    cfg = setup[0]
    shards = tmp_path / "nospeaker"
    _with_speakers(heldout_dir(cfg) / "corpus", shards, lambda i: None)
    spec = load_config(None, [*TINY, f"data.shards={shards}", "eval.holdout=4", f"train.out_dir={tmp_path}"])
    record = ensure_holdout(spec)
    assert record.by == "clip" and len(record.keys) == 4 and record.speakers == []
    assert record.name() == f"held-out 4 clips of {shards} by clip (4 clips)"


def test_a_stage1_run_with_the_cross_decoder_logs_eval_reconstruction(tmp_path):
    """model.decoder=cross (predictions of a sampled subset of the masked patches) through the real
    launcher with online evaluation on: the evaluation figures are logged, the reconstruction ones
    among them, and the picture is drawn. One process, 2 steps, 8 training and 8 held-out clips."""
    from tests.launching import output, run_stage1

    run_dir = tmp_path / "runs" / "cross"
    proc = run_stage1(run_dir, "synthetic", 1, "train.steps=2", "eval.every=2", "eval.clips=8",
                      "eval.batch_size=4", "eval.pictures=1", "eval.classes=0", "model.decoder=cross",
                      "model.decode_fraction=0.25", "model.depth=1", "data.batch_size=2",
                      f"data.synth.dir={tmp_path / 'synthetic'}", "data.synth.clips=8",
                      "data.synth.clips_per_shard=4", "data.synth.size=64", "train.ckpt_every=2",
                      timeout=300)
    assert proc.returncode == 0, output(proc)[-6000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/rec_loss" in r]
    assert [r["step"] for r in evals] == [2]
    rec = evals[0]
    assert all(math.isfinite(rec[k]) and rec[k] > 0 for k in ("eval/rec_video", "eval/rec_audio"))
    assert rec["eval/rec_loss"] == pytest.approx(rec["eval/rec_video"] + rec["eval/rec_audio"])
    assert "rec_loss" in output(proc)  # the evaluation log line
    with Image.open(run_dir / "pictures" / "recon_step00000002.png") as im:
        im.load()
