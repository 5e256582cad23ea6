"""The embedding API: from_pretrained + encode on tensors and on files, decoded as in training."""

import json
import subprocess
import sys

import pytest
import torch
from media_helpers import mp4_with_aac, resample_linear, voice, wav_bytes

import vaemo_dist
from vaemo_dist.config import AudioInput
from vaemo_dist.data.decode_files import decode_audio, decode_media
from vaemo_dist.data.decode_pyav import audio_tensor, decode_sample
from vaemo_dist.data.shards import expand_shards, read_shard
from vaemo_dist.data.types import DecodeError
from vaemo_dist.export import ExportError, model_config_from, save_pretrained


@pytest.fixture(scope="module")
def encoder(tiny_export):
    return vaemo_dist.from_pretrained(tiny_export)


def first_samples(corpus, n=3):
    samples = []
    for sample in read_shard(expand_shards(str(corpus))[0]):
        samples.append(sample)
        if len(samples) == n:
            return samples
    return samples


def test_import_stays_light():
    code = "import sys, vaemo_dist; print('torch' in sys.modules, 'av' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_encoder_is_frozen_and_in_eval_mode(encoder):
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not hasattr(encoder.model, "decoder_blocks")  # exported without the decoder


def test_files_decode_exactly_as_training_does(encoder, tiny_corpus, clip_files):
    for sample in first_samples(tiny_corpus):
        clip = decode_sample(sample, encoder.inputs)
        path = clip_files / f"{sample['__key__']}.mp4"
        video, audio = decode_media(path, path, encoder.inputs)  # audio: the sibling .flac
        assert torch.equal(video, clip.video) and torch.equal(audio, clip.audio)


def test_encode_files_equals_encode_tensors(encoder, tiny_corpus, clip_files):
    samples = first_samples(tiny_corpus)
    clips = [decode_sample(s, encoder.inputs) for s in samples]
    paths = [clip_files / f"{s['__key__']}.mp4" for s in samples]
    from_files = encoder.encode(video=paths, audio=paths)
    from_tensors = encoder.encode(video=torch.stack([c.video for c in clips]),
                                  audio=torch.stack([c.audio for c in clips]))
    for name in ("joint_emb", "video_emb", "audio_emb", "joint_pooled"):
        assert torch.equal(getattr(from_files, name), getattr(from_tensors, name))
    assert from_files.joint_emb.shape == (3, 128) and from_files.video_pooled.shape == (3, 192)
    torch.testing.assert_close(from_files.joint_emb.norm(dim=-1), torch.ones(3))


def test_one_modality_alone(encoder, clip_files):
    path = sorted(clip_files.glob("*.mp4"))[0]
    video, audio = encoder.load(path, path)
    both = encoder.encode(video=video, audio=audio)
    video_only = encoder.encode(video=video)
    audio_only = encoder.encode(audio=audio)
    assert torch.equal(encoder.encode(video=path).video_emb, video_only.video_emb)
    assert video_only.audio_emb is None and audio_only.video_emb is None
    # fusion "separate": a modality's embedding does not depend on the other one being there.
    torch.testing.assert_close(video_only.video_emb, both.video_emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(audio_only.audio_emb, both.audio_emb, rtol=0, atol=1e-6)
    assert not torch.allclose(video_only.joint_emb, both.joint_emb, atol=1e-3)  # joint = what is present


def test_video_with_its_own_aac_track(encoder, tmp_path):
    path = tmp_path / "phone.mp4"
    path.write_bytes(mp4_with_aac(label=1, rate=44100))
    out = encoder.encode(video=path, audio=path)  # 44.1 kHz stereo AAC: resampled, averaged to mono
    assert out.joint_emb.shape == (1, 128) and torch.isfinite(out.joint_emb).all()


def test_resampling_matches_native_rate():
    cfg = AudioInput()
    native = audio_tensor(decode_audio("a", wav_bytes(voice(2, 3.0), 16000), cfg), cfg, 1.5)
    resampled = audio_tensor(decode_audio("b", wav_bytes(resample_linear(voice(2, 3.0), 48000), 48000), cfg),
                              cfg, 1.5)
    other = audio_tensor(decode_audio("c", wav_bytes(voice(0, 3.0, seed=1), 16000), cfg), cfg, 1.5)
    assert (native - resampled).abs().mean() < 0.15  # measured 0.08 (band edge near 8 kHz)
    assert (native - other).abs().mean() > 0.4  # a different voice is far away on the same scale


def test_bad_inputs_fail_clearly(encoder, tmp_path):
    with pytest.raises(ValueError, match=r"expected shape \[B, 3, 4, 32, 32\]"):
        encoder.encode(video=torch.zeros(1, 3, 16, 96, 96))
    with pytest.raises(ValueError, match="video, audio or both"):
        encoder.encode()
    (tmp_path / "no_audio.wav").write_bytes(b"RIFF not really")
    with pytest.raises(DecodeError):
        encoder.encode(audio=tmp_path / "no_audio.wav")


def test_an_export_with_a_long_video_window_loads(tmp_path):
    """config.json names no corpus; the synthetic-clip length check must not reject a long window."""
    from vaemo_dist.config import load_config
    from vaemo_dist.export import is_decoder_key, save_pretrained
    from vaemo_dist.model.vaemo import VAEmoModel

    cfg = load_config(None, ["inputs.video.frames=32", "inputs.video.size=32", "inputs.audio.frames=32",
                             "model.depth=1", "model.decoder_depth=1", "data.synth.duration=6"])
    state = VAEmoModel(cfg.model, cfg.inputs).state_dict()
    weights = {k: v for k, v in state.items() if not is_decoder_key(k)}
    encoder = vaemo_dist.from_pretrained(save_pretrained(tmp_path, weights, cfg))
    assert encoder.inputs.video.frames == 32
    assert encoder.encode(video=torch.zeros(1, 3, 32, 32, 32)).video_emb.shape == (1, 128)


class HashTextEncoder:
    """Stands in for the sentence-transformer: deterministic L2-normalised vectors per text."""

    def __init__(self, dim: int = 384) -> None:
        self.dim, self.calls = dim, 0

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, **kwargs):
        self.calls += 1
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(sum(map(ord, t)) + len(t)))
                for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


@pytest.fixture(scope="module")
def stage2_export(tiny_export, tmp_path_factory):
    """The tiny export plus a random linear text head: a stage-2 export."""
    from safetensors.torch import load_file

    from vaemo_dist.model.text_head import TextHead

    cfg = model_config_from(json.loads((tiny_export / "config.json").read_text()))
    torch.manual_seed(4)
    head = TextHead(384, cfg.model.embed_dim).state_dict()
    return save_pretrained(tmp_path_factory.mktemp("stage2-export"),
                           load_file(str(tiny_export / "model.safetensors")), cfg, text_head=head)


def test_zero_shot_on_files_scores_the_files_embeddings(stage2_export, tiny_corpus, clip_files):
    text = HashTextEncoder()
    encoder = vaemo_dist.from_pretrained(stage2_export, text_encoder=text)
    paths = [clip_files / f"{s['__key__']}.mp4" for s in first_samples(tiny_corpus, 2)]
    prompts = {"happy": ["A happy face and voice.", "A person who sounds happy."], "sad": ["A sad face."]}
    res = encoder.zero_shot(video=paths, audio=paths, prompts=prompts)
    joint = encoder.encode(video=paths, audio=paths).joint_emb
    happy, sad = encoder.embed_text(prompts["happy"]), encoder.embed_text(prompts["sad"])
    classes = torch.nn.functional.normalize(torch.stack([happy.mean(dim=0), sad[0]]), dim=-1)
    torch.testing.assert_close(res.scores, joint @ classes.T, rtol=0, atol=1e-6)
    assert res.scores.shape == (2, 2) and res.predicted == [["happy", "sad"][i] for i in res.labels]
    torch.testing.assert_close(res.probs.sum(dim=1), torch.ones(2))
    assert encoder.text_encoder is text and text.calls >= 1  # the given encoder, never a download


def test_text_encoder_of_another_size_is_refused(stage2_export):
    encoder = vaemo_dist.from_pretrained(stage2_export, text_encoder=HashTextEncoder(dim=768))
    with pytest.raises(ExportError, match="768-d embeddings; the text head was trained on 384-d"):
        encoder.embed_text(["happy"])


def test_stage1_export_has_no_text_side(encoder):
    assert encoder.stage == 1 and not encoder.has_text_head
    with pytest.raises(ExportError, match="this is a stage-1 export.*export a stage-2 run"):
        encoder.embed_text(["happy"])
