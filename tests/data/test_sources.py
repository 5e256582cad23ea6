"""The one reader of inputs (vaemo_dist/data/sources.py) and the one table of media extensions
(vaemo_dist/data/media.py): shards named any way are the same records and class names; metadata
(labels, speakers) is read without the media; a folder of media is seen the same by vaemo-shard and
by the probe, embed and predict, whatever its video extensions."""

import json
import shutil

import fsspec
import pytest

from vaemo_dist.config import InputConfig
from vaemo_dist.data import media
from vaemo_dist.data.decode_pyav import decode_sample
from vaemo_dist.data.shards import ShardError, check_shard_spec, expand_shards, read_shard
from vaemo_dist.data.sources import SourceError, decode_record, media_inputs, open_source
from vaemo_dist.data.synth import write_media_file
from vaemo_dist.data.writer import ShardOptions, main, write_shards

INPUTS = InputConfig()
INPUTS.video.frames, INPUTS.video.stride, INPUTS.video.size = 4, 4, 32
INPUTS.audio.frames = 64

SPEAKERS, CLASSES = ("ann", "bob"), ("angry", "happy", "sad")


@pytest.fixture(scope="module")
def speaker_clips(tmp_path_factory):
    """`clips.csv` (path,label,speaker) and its mp4 files (H.264 + AAC): 2 speakers x 3 classes x 2."""
    folder = tmp_path_factory.mktemp("speaker-clips")
    rows = ["path,label,speaker"]
    for s, speaker in enumerate(SPEAKERS):
        for c, name in enumerate(CLASSES):
            for take in range(2):
                file = f"{speaker}_{name}_{take}.mp4"
                write_media_file(folder / file, seconds=1.2, seed=6 * s + 2 * c + take)
                rows.append(f"{file},{name},{speaker}")
    (folder / "clips.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def speaker_shards(speaker_clips, tmp_path_factory):
    """The same clips through vaemo-shard (3 shards): json label / class_name / speaker."""
    out = tmp_path_factory.mktemp("speaker-shards") / "shards"
    opts = ShardOptions(size=48, clips_per_shard=5)
    write_shards(media_inputs(speaker_clips / "clips.csv"), str(out), opts, progress=False)
    return out


def _view(source):
    return [(r.key, r.label, r.speaker, r.class_name) for r in source.records()]


def test_a_shard_folder_its_manifest_a_pattern_and_a_url_are_the_same_data(speaker_shards):
    manifest = json.loads((speaker_shards / "manifest.json").read_text())
    assert manifest["class_names"] == ["angry", "happy", "sad"] and len(manifest["shards"]) == 3
    # The same shards in an fsspec store (a URL) and a brace pattern over them.
    store = fsspec.filesystem("memory")
    for p in speaker_shards.iterdir():
        store.pipe(f"/corpus/{p.name}", p.read_bytes())
    specs = [str(speaker_shards), str(speaker_shards / "manifest.json"),
             str(speaker_shards / "shard-{000000..000002}.tar"), f"file://{speaker_shards}/manifest.json",
             "memory://corpus/manifest.json", "memory://corpus/shard-{000000..000002}.tar",
             ",".join(str(speaker_shards / f"shard-{i:06d}.tar") for i in range(3))]
    sources = [open_source(spec) for spec in specs]
    first = _view(sources[0])
    assert len(first) == 12 and {r[2] for r in first} == set(SPEAKERS)
    for spec, source in zip(specs, sources):
        assert source.kind == "shards" and source.class_names == ["angry", "happy", "sad"], spec
        assert source.size == 12, spec
        assert _view(source) == first, spec
    # A part of the set: the names still come from the manifest; the count is that part's.
    part = open_source(str(speaker_shards / "shard-000001.tar"))
    assert part.class_names == ["angry", "happy", "sad"] and part.size == manifest["samples_per_shard"][1]
    store.rm("/corpus", recursive=True)


def test_shards_without_a_manifest_take_class_names_from_the_clips_json(speaker_shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in speaker_shards.glob("*.tar"):
        shutil.copy(tar, bare)
    source = open_source(str(bare))
    assert source.class_names == [] and source.size is None  # nothing to read them from up front
    names = {r.label: r.class_name for r in source.metadata()}
    assert names == {0: "angry", 1: "happy", 2: "sad"}


def test_metadata_lists_the_records_without_their_media(speaker_shards, speaker_clips):
    source = open_source(str(speaker_shards))
    meta = list(source.metadata())
    full = list(source.records())
    assert [(r.key, r.label, r.speaker) for r in meta] == [(r.key, r.label, r.speaker) for r in full]
    assert all(r.sample is None for r in meta) and all(r.sample is not None for r in full)
    # A manifest CSV: the speaker column and any other column, for --group-by.
    csv = speaker_clips / "extra.csv"
    csv.write_text("path,label,speaker,session\nann_angry_0.mp4,angry,ann,s1\nbob_sad_1.mp4,,bob,\n")
    a, b = open_source(csv).metadata()
    assert (a.speaker, a.group("speaker"), a.group("session"), a.label) == ("ann", "ann", "s1", 0)
    assert (b.speaker, b.group("session"), b.label) == ("bob", None, -1)
    assert a.path == str(speaker_clips / "ann_angry_0.mp4") and a.key == "ann_angry_0"


def test_one_csv_two_views(speaker_clips):
    """vaemo-shard's inputs and the records of the same CSV: the same files, in the same order; the
    labels as written (vaemo-shard numbers them itself) and as class indices."""
    csv = speaker_clips / "clips.csv"
    inputs, records = media_inputs(csv), list(open_source(csv).records())
    assert [i.path for i in inputs] == [r.path for r in records]
    assert [i.speaker for i in inputs] == [r.speaker for r in records]
    assert [i.label for i in inputs][:2] == ["angry", "angry"] and [r.label for r in records][:2] == [0, 0]
    assert inputs[0].key == "0000000-ann_angry_0" and records[0].key == "ann_angry_0"


@pytest.mark.parametrize("spec", ["nothing-here", "nothing-here/manifest.json"])
def test_missing_shards_fail_by_name(tmp_path, spec):
    with pytest.raises(SourceError, match="nothing-here"):
        open_source(str(tmp_path / spec))


def test_unusable_inputs_are_refused(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.mp4,1\n")
    for read in (media_inputs, open_source):
        with pytest.raises(SourceError, match="'path' column"):
            read(tmp_path / "m.csv")
    with pytest.raises(SourceError, match="folder of videos or a .csv"):
        media_inputs(tmp_path / "nothing-here")


# --------------------------------------------------------------------------------------------
# One table of media extensions


def test_every_reader_of_media_types_reads_the_one_table():
    from vaemo_dist.data import decode_dali, decode_pyav, shards
    from vaemo_dist.text import media as text_media

    assert decode_pyav.VIDEO_FIELDS is media.VIDEO_FIELDS and decode_pyav.AUDIO_FIELDS is media.AUDIO_FIELDS
    assert decode_dali.VIDEO_FIELDS is media.VIDEO_FIELDS
    assert text_media.VIDEO_EXTS is media.VIDEO_FIELDS and text_media.AUDIO_EXTS is media.ANY_AUDIO_FIELDS
    assert shards.MEDIA_EXTS is media.MEDIA_EXTS
    assert {".mpg", ".mpeg", ".avi", ".m4v", ".mkv", ".webm", ".mov"} <= set(media.VIDEO_EXTS)
    assert media.is_video("a/B.MPG") and media.is_audio("x.Opus") and not media.is_media("notes.txt")
    assert [media.video_field(f"x{e}") for e in (".mp4", ".avi", ".mkv", ".mpg", ".m4v")] == \
           ["mp4", "avi", "mkv", "mp4", "mp4"]
    assert (media.audio_field("x.wav"), media.audio_field("x.mp3")) == ("wav", None)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Clips in the containers people have: mp4, MPEG-PS (.mpg), AVI, .m4v and Matroska below a
    sub-folder; a text file and a json beside them."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "sub").mkdir()
    write_media_file(root / "a.mp4", seconds=1.2)
    write_media_file(root / "b.mpg", seconds=1.2, container="mpeg", video="mpeg1video", audio="mp2", seed=1)
    write_media_file(root / "c.avi", seconds=1.2, container="avi", video="mpeg4", audio="mp3", seed=2)
    write_media_file(root / "d.m4v", seconds=1.2, container="mp4", seed=3)
    write_media_file(root / "sub" / "e.mkv", seconds=1.2, container="matroska", seed=4)
    (root / "notes.txt").write_text("not a clip")
    (root / "b.json").write_text("{}")
    return root


def test_a_folder_of_mpg_avi_m4v_is_seen_the_same_by_vaemo_shard_and_the_probe(mixed_folder, tmp_path):
    names = ["a.mp4", "b.mpg", "c.avi", "d.m4v", "sub/e.mkv"]
    listed = [str(mixed_folder / n) for n in names]
    assert [i.path for i in media_inputs(mixed_folder)] == listed  # vaemo-shard
    source = open_source(mixed_folder)  # vaemo-embed, vaemo-predict, the probe, fine-tuning
    assert source.kind == "folder" and [r.path for r in source.records()] == listed
    assert [r.key for r in source.records()] == ["a", "b", "c", "d", "sub/e"]
    for record in source.records():  # and each decodes as training decodes
        video, audio = decode_record(record, INPUTS)
        assert tuple(video.shape) == (3, 4, 32, 32) and audio.shape[0] == 1, record.key
    # Named as shards, the folder is refused with the vaemo-shard command; vaemo-shard takes all of it.
    with pytest.raises(ShardError, match="vaemo-shard"):
        check_shard_spec(str(mixed_folder))
    out = tmp_path / "shards"
    assert main([str(mixed_folder), "--out", str(out), "--size", "32", "--workers", "1",
                 "--no-progress"]) == 0
    samples = [s for url in expand_shards(str(out)) for s in read_shard(url)]
    assert sorted(json.loads(s["json"])["source"] for s in samples) == listed
    assert all(decode_sample(s, INPUTS).video.shape == (3, 4, 32, 32) for s in samples)
