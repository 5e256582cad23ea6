"""Dataset adapters on miniature replicas of each corpus (tests/data/replicas.py): labels, class names,
speakers, ids, folds (subject-independent, equal to the official fold files), skips with reasons; and
vaemo-shard --dataset end to end, read back through open_source."""

import csv
import json
from collections import defaultdict

import pytest

from tests.data import replicas
from vaemo_dist.data.datasets import DATASETS, DatasetError, dataset_names, get_dataset
from vaemo_dist.data.datasets.cremad import BROKEN
from vaemo_dist.data.frames import open_frames
from vaemo_dist.data.sources import open_source
from vaemo_dist.data.writer import ShardOptions, convert_clip, main

OPTS = ShardOptions(size=32, min_duration=0.5)


def skips_by_kind(listing):
    out = defaultdict(list)
    for s in listing.skipped:
        out[s["kind"]].append(s)
    return out


def subject_independent(inputs):
    folds_of = defaultdict(set)
    for i in inputs:
        folds_of[i.speaker].add(i.extra["fold"])
    return all(len(f) == 1 for f in folds_of.values())


@pytest.fixture(scope="module")
def cremad(tmp_path_factory):
    return replicas.make_cremad(tmp_path_factory.mktemp("cremad"))


def test_registry_names_every_adapter():
    assert set(dataset_names()) == {"voxceleb2", "cremad", "ravdess", "mafw", "dfew", "csv", "hicmae-csv"}
    assert get_dataset("mafw") is DATASETS["mafw"]
    with pytest.raises(DatasetError, match="unknown dataset"):
        get_dataset("affectnet")
    with pytest.raises(DatasetError, match="unknown option"):
        get_dataset("cremad").inputs("/nonexistent", colour="red")


def test_cremad_labels_speakers_folds_and_broken_clips(cremad):
    listing = get_dataset("cremad").inputs(cremad)
    assert len(listing.inputs) == len(replicas.CREMAD_ACTORS) * 6
    for item in listing.inputs:
        actor, sentence, emotion, level = item.extra["clip_id"].split("_")
        assert item.label == emotion and item.speaker == actor and item.extra["dataset"] == "cremad"
        assert item.audio.endswith(f"AudioWAV/{item.extra['clip_id']}.wav")
        assert item.key == f"cremad-{actor}_{sentence}_{emotion}_{level}"
        # HiCMAE's rule, written out independently: 18 actors per fold, the 91st in fold 5.
        assert item.extra["fold"] == {1001: "1", 1019: "2", 1037: "3", 1055: "4", 1091: "5"}[int(actor)]
    assert {i.label for i in listing.inputs} == set(get_dataset("cremad").class_names)
    assert subject_independent(listing.inputs)
    kinds = skips_by_kind(listing)
    assert [s["path"].rsplit("/", 1)[1] for s in kinds["known_broken"]] == ["1076_MTI_SAD_XX.flv"]
    assert kinds["known_broken"][0]["reason"] == BROKEN["1076_MTI_SAD_XX"]
    assert [s["path"].rsplit("/", 1)[1] for s in kinds["no_audio"]] == ["1002_IEO_HAP_HI.flv"]
    assert [s["path"].rsplit("/", 1)[1] for s in kinds["unparsable"]] == ["notes_copy.flv"]
    assert len(BROKEN) == 4 and "1076_MTI_SAD_XX" in BROKEN


def test_cremad_fold_rule_covers_all_91_actors():
    from vaemo_dist.data.datasets.cremad import actor_fold

    sizes = defaultdict(int)
    for actor in range(1001, 1092):
        sizes[actor_fold(actor)] += 1
    assert sizes == {"1": 18, "2": 18, "3": 18, "4": 18, "5": 19}
    with pytest.raises(ValueError):
        actor_fold(1092)


def test_ravdess_av_speech_by_default_and_video_only_with_paired_audio(tmp_path):
    root = replicas.make_ravdess(tmp_path)
    listing = get_dataset("ravdess").inputs(root)
    names = get_dataset("ravdess").class_names
    assert len(listing.inputs) == len(replicas.RAVDESS_ACTORS) * 8
    for item in listing.inputs:
        fields = item.extra["clip_id"].split("-")
        assert fields[:2] == ["01", "01"] and item.label == names[int(fields[2]) - 1]
        assert item.speaker == fields[6] and item.extra["fold"] == str((int(fields[6]) - 1) // 4 + 1)
        assert not item.audio
    assert {i.extra["fold"] for i in listing.inputs} == {"1", "2", "3", "4", "5", "6"}
    assert subject_independent(listing.inputs)
    excluded = skips_by_kind(listing)["excluded"]
    assert len(excluded) == 4  # the song, two video-only files, one audio-only wav
    assert all(s["reason"].startswith("excluded:") for s in excluded)

    video_only = get_dataset("ravdess").inputs(root, modality="02")
    assert [i.extra["clip_id"] for i in video_only.inputs] == ["02-01-03-01-01-01-01"]
    assert video_only.inputs[0].audio.endswith("Actor_01/03-01-03-01-01-01-01.wav")
    assert video_only.inputs[0].label == "happy"
    assert [s["path"].rsplit("/", 1)[1] for s in skips_by_kind(video_only)["no_audio"]] == \
        ["02-01-04-01-01-01-01.mp4"]


def read_mafw_sets(root):
    labels, folds = {}, {}
    sets = root / "Train & Test Set" / "single" / "no_caption"
    for folder in sets.iterdir():
        for line in (folder / "test.txt").read_text().splitlines():
            name, label = line.split()
            labels[name[:-4]], folds[name[:-4]] = label, folder.name[4:]
    return labels, folds


def test_mafw_official_folds_no_audio_missing_and_frame_folder(tmp_path):
    root = replicas.make_mafw(tmp_path)
    listing = get_dataset("mafw").inputs(root)
    labels, folds = read_mafw_sets(root)
    got = {i.extra["clip_id"]: i for i in listing.inputs}
    assert set(got) == set(labels) - {"00003", "00099"}
    for name, item in got.items():
        assert item.label == labels[name] and item.extra["fold"] == folds[name] and item.key == f"mafw-{name}"
    assert {i.label for i in listing.inputs} == set(get_dataset("mafw").class_names)
    assert got["00005"].path.endswith("data/frames/00005") and got["00005"].audio.endswith("00005.wav")
    kinds = skips_by_kind(listing)
    assert [s["reason"] for s in kinds["no_audio"]] == ["no audio: the clip has no audio track (mafw 00003)"]
    assert "00099" in kinds["missing"][0]["reason"] and "00100.mp4" in kinds["unlabelled"][0]["path"]


def test_mafw_overlapping_test_sets_are_refused(tmp_path):
    root = replicas.make_mafw(tmp_path)
    sets = root / "Train & Test Set" / "single" / "no_caption"
    with (sets / "set_2" / "test.txt").open("a") as f:
        f.write("00001.mp4 anger\n")  # already in set_1's test list
    with pytest.raises(DatasetError, match="partition"):
        get_dataset("mafw").inputs(root)


def test_dfew_official_folds_from_the_split_csvs(tmp_path):
    root = replicas.make_dfew(tmp_path)
    listing = get_dataset("dfew").inputs(root)
    expected = {}
    for path in (root / "EmoLabel_DataSplit" / "test(single-labeled)").glob("set_*.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                expected[f"{int(row['video_name']):05d}"] = (replicas.DFEW_CLASSES[int(row["label"]) - 1],
                                                              path.stem[4:])
    got = {i.extra["clip_id"]: (i.label, i.extra["fold"]) for i in listing.inputs}
    assert got == {k: v for k, v in expected.items() if k != "00004"}
    kinds = skips_by_kind(listing)
    assert "00004" in kinds["no_audio"][0]["reason"] and kinds["unlabelled"][0]["path"].endswith("00050.mp4")


def test_voxceleb2_speakers_ids_and_m4a_audio(tmp_path):
    root = replicas.make_voxceleb2(tmp_path)
    listing = get_dataset("voxceleb2").inputs(root)
    assert {i.speaker for i in listing.inputs} == {"id00012", "id00015", "id01000"}
    for item in listing.inputs:
        assert not item.label and "fold" not in item.extra
        assert item.extra["clip_id"] == "/".join(["dev", item.speaker, item.extra["youtube_id"],
                                                  item.extra["utterance"]])
        assert bool(item.audio) == (item.speaker == "id00012")
        assert item.audio.endswith(".m4a") or not item.audio
    assert len({i.key for i in listing.inputs}) == 6
    assert [s["kind"] for s in listing.skipped] == ["unparsable"]
    assert not any(i.audio for i in get_dataset("voxceleb2").inputs(root, audio="mp4").inputs)
    assert len(get_dataset("voxceleb2").inputs(root, audio="aac").inputs) == 2


def test_hicmae_lists_work_unchanged_with_folds_from_the_split_folders(tmp_path):
    lists = replicas.make_hicmae_lists(tmp_path)
    listing = get_dataset("hicmae-csv").inputs(lists, classes="cremad", fps="10")
    expected = {}
    for folder in lists.iterdir():
        for line in (folder / "test.csv").read_text().splitlines():
            video, audio, label = line.split()
            expected[video] = (audio, replicas.CREMAD_EMOTIONS[int(label)], str(int(folder.name[5:])))
    assert {i.path: (i.audio, i.label, i.extra["fold"]) for i in listing.inputs} == expected
    assert all(i.fps == 10 and i.speaker == i.path.rsplit("/", 1)[1][:4] for i in listing.inputs)
    assert subject_independent(listing.inputs)
    plain = get_dataset("hicmae-csv").inputs(lists / "split01" / "train.csv")
    assert {i.label for i in plain.inputs} == {"0", "1", "2"}
    assert all(not i.extra.get("fold") for i in plain.inputs)


def test_a_frame_folder_with_a_wav_becomes_a_clip(tmp_path):
    folder = replicas.frame_folder(tmp_path / "clip", frames=12)
    with open_frames(folder, 10) as src:
        times = [f.time for f in src.frames]
        assert (src.width, src.height, src.count, src.rate) == (32, 32, 12, 10.0)
    assert times == pytest.approx([i / 10 for i in range(12)])
    wav = replicas.wav(tmp_path / "clip.wav")
    listing = get_dataset("csv").inputs(_csv(tmp_path, [("clip", "clip.wav", "10", "happy")]))
    sample = convert_clip(listing.inputs[0], OPTS)
    meta = json.loads(sample["json"])
    assert meta["frames"] == 30 and meta["duration"] == pytest.approx(1.2)  # 1.2 s at 25 fps
    assert meta["audio_source"] == str(wav) and abs(meta["audio_samples"] - 1.2 * 16000) < 0.05 * 16000
    assert "audio" not in meta and meta["class_name"] == "happy"


def _csv(folder, rows):
    path = folder / "list.csv"
    path.write_text("path,audio,fps,label\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_vaemo_shard_dataset_cremad_end_to_end(cremad, tmp_path, capsys):
    out = tmp_path / "shards"
    code = main(["--dataset", "cremad", str(cremad), "--out", str(out), "--size", "32", "--min-duration",
                 "0.5", "--workers", "1", "--no-progress", "--clips-per-shard", "8"])
    assert code == 0
    err = capsys.readouterr().err
    assert "known broken" in err and "no audio" in err and "unparsable" in err
    manifest = json.loads((out / "manifest.json").read_text())
    names = list(get_dataset("cremad").class_names)
    assert manifest["class_names"] == names and manifest["dataset"]["name"] == "cremad"
    assert manifest["dataset"]["folds"] == 5 and manifest["total"] == 30
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_by_kind"] == {"no_audio": 1, "known_broken": 1, "unparsable": 1}
    assert report["inputs"] == 33
    source = open_source(out)
    assert source.class_names == names
    records = list(source.metadata())
    assert len(records) == 30
    folds_csv = dict(row.split(",") for row in (out / "folds.csv").read_text().split()[1:])
    for r in records:
        actor, _, emotion, _ = r.fields["clip_id"].split("_")
        assert r.class_name == emotion and r.label == names.index(emotion) and r.speaker == actor
        fold = {"1001": "1", "1019": "2", "1037": "3", "1055": "4", "1091": "5"}[actor]
        assert r.fold == folds_csv[r.key] == fold


def test_separate_audio_problems_are_skips_with_kinds(tmp_path):
    from vaemo_dist.data.sources import MediaInput
    from vaemo_dist.data.writer import Skip

    folder = replicas.frame_folder(tmp_path / "frames", frames=12)
    video = replicas.clip(tmp_path / "silent.mp4", audio=False)
    (tmp_path / "empty.wav").write_bytes(b"")
    cases = [
        (MediaInput(path=str(folder), key="a", fps=10), "no_audio"),  # a frame folder needs an audio file
        (MediaInput(path=str(folder), key="b", fps=10, audio=str(tmp_path / "gone.wav")), "no_audio"),
        (MediaInput(path=str(video), key="c", audio=str(tmp_path / "empty.wav")), "empty"),
        (MediaInput(path=str(tmp_path / "empty_dir"), key="d"), "no_video"),  # a folder without frames
    ]
    (tmp_path / "empty_dir").mkdir()
    for source, kind in cases:
        with pytest.raises(Skip) as e:
            convert_clip(source, OPTS)
        assert e.value.kind == kind, (source.key, str(e.value))
    # a silent video with a separate wav is a clip: the wav gives its audio
    ok = convert_clip(MediaInput(path=str(video), key="e", audio=str(replicas.wav(tmp_path / "a.wav"))), OPTS)
    assert json.loads(ok["json"])["audio_source"].endswith("a.wav")


def test_dataset_options_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--out", str(tmp_path / "o"), "--dataset-option", "audio=aac"])
    assert "needs --dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dataset", "voxceleb2", str(tmp_path), "--out", str(tmp_path / "o"),
              "--dataset-option", "audio"])
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--dataset", "cremad", str(tmp_path), "--out", str(tmp_path / "o")]) != 0
    assert "no VideoFlash or VideoMP4 folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before the output folder is claimed
