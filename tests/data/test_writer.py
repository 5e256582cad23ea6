"""vaemo-shard: ordinary videos (H.264/VP9 + AAC/Opus, any rate and size) -> training shards."""

import json
import tarfile

import pytest
import webdataset as wds

from vaemo_dist.config import InputConfig
from vaemo_dist.data.decode_pyav import decode_sample
from vaemo_dist.data.shards import expand_shards
from vaemo_dist.data.synth import write_media_file
from vaemo_dist.data.writer import main, read_sources

INPUTS = InputConfig()
INPUTS.video.frames, INPUTS.video.stride, INPUTS.video.size = 4, 4, 32
INPUTS.audio.frames = 64


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Five usable files and four bad ones, as a user's folder might hold them."""
    root = tmp_path_factory.mktemp("media")
    write_media_file(root / "a-conforming.mp4", width=64, height=48)  # H.264 25 fps, short side 48
    write_media_file(root / "b-30fps.mp4", fps=30, width=96, height=64)
    write_media_file(root / "c-ntsc.mp4", fps=30000 / 1001, width=80, height=60, audio_rate=48000, channels=1)
    (root / "sub").mkdir()
    write_media_file(root / "sub" / "d-vp9-opus.webm", video="libvpx-vp9", audio="libopus", audio_rate=48000,
                     container="webm")
    write_media_file(root / "e-long.mp4", seconds=3.0, width=48, height=64)
    write_media_file(root / "f-silent.mp4", audio=None)
    write_media_file(root / "g-audio-only.mp4", video=None)
    write_media_file(root / "h-short.mp4", seconds=0.4)
    (root / "i-broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    return root


def samples(folder):
    return list(wds.WebDataset(expand_shards(str(folder / "manifest.json")), shardshuffle=False))


def test_folder_of_mp4_aac_becomes_shards_readable_by_webdataset_and_tar(media, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main([str(media), "--out", str(out), "--size", "48", "--clips-per-shard", "2", "--workers", "2",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["samples_per_shard"] == [2, 2, 1] and manifest["total"] == 5 and manifest["skipped"] == 4

    with tarfile.open(out / "shard-000000.tar") as tar:  # plain tar sees the three members per clip
        names = tar.getnames()
    assert names == [f"{key}.{ext}" for key in ("0000000-a-conforming", "0000001-b-30fps")
                     for ext in ("flac", "json", "mp4")]

    got = {s["__key__"]: s for s in samples(out)}
    assert sorted(got) == ["0000000-a-conforming", "0000001-b-30fps", "0000002-c-ntsc", "0000003-e-long",
                           "0000008-d-vp9-opus"]
    for key, s in got.items():
        meta = json.loads(s["json"])
        assert meta["fps"] == 25 and meta["sample_rate"] == 16000 and min(meta["width"], meta["height"]) == 48
        assert abs(meta["duration"] - (3.0 if "long" in key else 2.0)) <= 0.04, (key, meta)
        assert abs(meta["audio_samples"] - meta["duration"] * 16000) < 0.05 * 16000
        clip = decode_sample(s, INPUTS)  # the training decoder takes it as it is
        assert clip.video.shape == (3, 4, 32, 32) and clip.meta["frames"] == meta["frames"]
    # Stream copy only where the source already conforms (H.264, 25 fps, short side 48).
    assert {k: json.loads(s["json"])["stream_copied"] for k, s in got.items()} == {
        "0000000-a-conforming": True, "0000001-b-30fps": False, "0000002-c-ntsc": False,
        "0000003-e-long": True, "0000008-d-vp9-opus": False}

    report = json.loads((out / "report.json").read_text())
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert reasons["f-silent.mp4"] == "no audio track"
    assert reasons["g-audio-only.mp4"] == "no video track"
    assert reasons["h-short.mp4"].startswith("too short")
    assert reasons["i-broken.mp4"].startswith("unreadable")
    assert report["skipped_by_reason"] == {"no audio track": 1, "no video track": 1, "too short": 1,
                                           "unreadable": 1}
    err = capsys.readouterr().err
    assert "wrote 5 of 9 clips" in err and "i-broken.mp4: unreadable" in err
    assert not list(out.glob(".*tmp*"))


def test_csv_manifest_with_labels_and_vp9(media, tmp_path):
    csv = tmp_path / "clips.csv"
    csv.write_text("path,label,speaker,description,session\n"
                   f"{media / 'a-conforming.mp4'},happy,spk1,a smile,s1\n"
                   f"{media / 'b-30fps.mp4'},sad,spk2,,\n"
                   "missing.mp4,happy,spk3,,\n")
    out = tmp_path / "vp9"
    assert main([str(csv), "--out", str(out), "--codec", "vp9", "--size", "32", "--workers", "1",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == ["happy", "sad"] and manifest["video_ext"] == "webm"
    got = {s["__key__"]: (json.loads(s["json"]), s) for s in samples(out)}
    meta, sample = got["0000000-a-conforming"]
    assert (meta["label"], meta["class_name"], meta["speaker"], meta["description"], meta["session"]) == \
           (0, "happy", "spk1", "a smile", "s1")
    assert got["0000001-b-30fps"][0]["label"] == 1 and "webm" in sample and "mp4" not in sample
    assert decode_sample(sample, INPUTS).label == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["reason"].split(":")[0] for s in report["skipped"]] == ["unreadable"]


def test_bad_input_spec_is_refused(tmp_path):
    with pytest.raises(ValueError, match="folder of videos or a .csv"):
        read_sources(str(tmp_path / "nothing-here"))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.mp4,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        read_sources(str(bad))
