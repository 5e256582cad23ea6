"""vaemo-embed over shards, a CSV manifest and a folder; the file it writes."""

import json
import shutil

import numpy as np
import pytest
import torch
from media_helpers import mp4_with_aac

import vaemo_dist
from vaemo_dist.data.decode_pyav import decode_sample
from vaemo_dist.data.shards import expand_shards, read_shard
from vaemo_dist.data.sources import SourceError, open_source
from vaemo_dist.eval.embed import EmbeddingSet, main


def test_embed_shards_matches_the_encoder(tiny_export, tiny_corpus, tmp_path):
    out = tmp_path / "emb.npz"
    assert main(["--model", str(tiny_export), "--input", str(tiny_corpus), "--out", str(out),
                 "--workers", "2", "--batch-size", "5", "--quiet"]) == 0
    with np.load(out, allow_pickle=False) as z:  # no pickle needed to read it
        expected = {"keys", "labels", "meta", "joint_emb", "video_emb", "audio_emb", "joint_pooled"}
        assert set(z.files) >= expected
    emb = EmbeddingSet.load(out)
    assert len(emb) == 12 and emb.keys == [f"clip-{i:06d}" for i in range(12)]  # the source's order
    assert emb.class_names == ["neutral", "happy", "sad"] and sorted(set(emb.labels.tolist())) == [0, 1, 2]
    assert emb.arrays["joint_emb"].shape == (12, 128) and emb.features("concat_pooled").shape == (12, 384)
    # Same numbers as the API on the training decoder's output.
    encoder = vaemo_dist.from_pretrained(tiny_export)
    sample = next(read_shard(expand_shards(str(tiny_corpus))[0]))
    clip = decode_sample(sample, encoder.inputs)
    direct = encoder.encode(video=clip.video, audio=clip.audio)
    row = emb.keys.index(sample["__key__"])
    np.testing.assert_allclose(emb.arrays["joint_emb"][row], direct.joint_emb[0].numpy(), atol=1e-6)
    assert clip.label == emb.labels[row]


def test_embed_manifest_with_labels_and_a_broken_file(tiny_export, clip_files, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(clip_files, data)
    (data / "broken.mp4").write_bytes(b"\x00" * 500)
    (data / "phone.mp4").write_bytes(mp4_with_aac(label=2))
    rows = ["path,label", "clip-000000.mp4,sad", "clip-000001.mp4,calm", "broken.mp4,sad", "phone.mp4,"]
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "m.npz"
    assert main(["--model", str(tiny_export), "--input", str(data / "manifest.csv"), "--out", str(out),
                 "--quiet"]) == 0
    emb = EmbeddingSet.load(out)
    assert emb.keys == ["clip-000000", "clip-000001", "phone"]
    assert emb.class_names == ["calm", "sad"] and emb.labels.tolist() == [1, 0, -1]
    assert len(emb.meta["skipped"]) == 1 and emb.meta["skipped"][0].startswith("broken")


def test_embed_folder_audio_only(tiny_export, clip_files, tmp_path):
    out = tmp_path / "f.npz"
    assert main(["--model", str(tiny_export), "--input", str(clip_files), "--out", str(out),
                 "--modality", "audio", "--limit", "3", "--quiet"]) == 0
    emb = EmbeddingSet.load(out)
    assert len(emb) == 3 and "video_emb" not in emb.arrays and emb.arrays["audio_emb"].shape == (3, 128)
    assert json.loads(json.dumps(emb.meta))["modality"] == "audio"
    assert torch.isfinite(torch.from_numpy(emb.arrays["joint_emb"])).all()


def test_unusable_inputs_fail_clearly(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.mp4,1\n")
    with pytest.raises(SourceError, match="'path' column"):
        open_source(tmp_path / "m.csv")
    (tmp_path / "dup.csv").write_text("path,label\na/x.mp4,1\nb/x.mp4,2\n")
    with pytest.raises(SourceError, match="key 'x'"):
        open_source(tmp_path / "dup.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError):
        open_source(tmp_path / "empty")


def test_an_existing_output_is_refused_and_overwrite_moves_it_aside(tiny_export, clip_files, tmp_path,
                                                                     capsys):
    out = tmp_path / "emb.npz"
    out.write_bytes(b"the user's file")
    args = ["--model", str(tiny_export), "--input", str(clip_files), "--out", str(out), "--limit", "2",
            "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"refusing to write into {out}" in err and "--overwrite" in err
    assert out.read_bytes() == b"the user's file"
    (tmp_path / "folder.npz").mkdir()
    assert main([*args[:-4], str(tmp_path / "folder"), "--quiet"]) == 2  # ".npz" added: a folder is there
    assert "it is a folder" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert len(EmbeddingSet.load(out)) == 2
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("emb.npz.old-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"the user's file"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
