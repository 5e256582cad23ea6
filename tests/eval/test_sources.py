"""Where downstream clips come from: shards named any way are the same records and class names;
metadata (labels, speakers) is read without the media."""

import json
import shutil

import fsspec
import pytest

from vaemo_dist.eval.sources import open_source


def _view(source):
    return [(r.key, r.label, r.speaker, r.class_name) for r in source.records()]


def test_a_shard_folder_its_manifest_a_pattern_and_a_url_are_the_same_data(speaker_shards, tmp_path):
    manifest = json.loads((speaker_shards / "manifest.json").read_text())
    assert manifest["class_names"] == ["angry", "happy", "sad"] and len(manifest["shards"]) == 3
    # The same shards in an fsspec store (a URL) and a brace pattern over them.
    store = fsspec.filesystem("memory")
    for p in speaker_shards.iterdir():
        store.pipe(f"/corpus/{p.name}", p.read_bytes())
    specs = [str(speaker_shards), str(speaker_shards / "manifest.json"),
             str(speaker_shards / "shard-{000000..000002}.tar"), f"file://{speaker_shards}/manifest.json",
             "memory://corpus/manifest.json", "memory://corpus/shard-{000000..000002}.tar"]
    sources = [open_source(spec) for spec in specs]
    first = _view(sources[0])
    assert len(first) == 24 and {r[2] for r in first} == {"ann", "bob", "cyd", "dee"}
    for spec, source in zip(specs, sources):
        assert source.class_names == ["angry", "happy", "sad"], spec
        assert source.size == 24, spec
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


@pytest.mark.parametrize("spec", ["nothing-here", "nothing-here/manifest.json"])
def test_missing_shards_fail_by_name(tmp_path, spec):
    from vaemo_dist.eval.sources import SourceError

    with pytest.raises(SourceError, match="nothing-here"):
        open_source(str(tmp_path / spec))
