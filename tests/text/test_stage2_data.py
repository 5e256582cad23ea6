"""Stage 2's data (vaemo_dist/stages/stage2.py: check, prepare, shards, embeddings_path): a user's described
set is only read, whatever stage2.describe_synthetic says; the synthetic described set lives in a cache
folder of its own; embeddings a user's set lacks are computed into stage 2's own cache."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.files import tree_hashes
from tests.text.test_encode import FakeEncoder
from vaemo_dist.config import ConfigError, load_config
from vaemo_dist.data.shards import expand_shards
from vaemo_dist.fsutil import OWNER_FILE, FolderInUseError, folder_owner
from vaemo_dist.stages import stage2
from vaemo_dist.text import encode
from vaemo_dist.text.describe import (
    SUCCESS,
    SYNTHETIC_WRITER,
    SyntheticDescriber,
    describe_shards,
    ensure_synthetic_described,
)
from vaemo_dist.text.encode import EMBEDDINGS, TextEmbeddingTable, ensure_embeddings, read_metadata

REPO = Path(__file__).resolve().parents[2]




@pytest.fixture
def fake_encoder(monkeypatch) -> FakeEncoder:
    fake = FakeEncoder()
    monkeypatch.setattr(encode, "load_text_encoder", lambda name, device="cpu": fake)
    return fake


def _cfg(tmp_path: Path, shards: str, *overrides: str):
    return load_config(str(REPO / "configs" / "stage2" / "tiny.yaml"),
                       [f"data.shards={shards}", f"data.synth.dir={tmp_path / 'corpus'}", "eval.every=0",
                        "stage2.text_encoder=fake", f"train.out_dir={tmp_path / 'runs'}", *overrides])


@pytest.fixture
def users_set(tiny_corpus, tmp_path) -> Path:
    """A described set of the user's (vaemo-describe output)."""
    out = tmp_path / "my-described"
    describe_shards(expand_shards(str(tiny_corpus)), out, SyntheticDescriber(), clips_per_shard=5,
                    progress=False)
    return out


@pytest.mark.parametrize("describe_synthetic", [True, False])
@pytest.mark.parametrize("embeddings", ["missing", "other-encoder", "stale"])
def test_a_users_described_set_is_only_read(users_set, tmp_path, fake_encoder, caplog, describe_synthetic,
                                            embeddings):
    if embeddings != "missing":  # a text_emb.safetensors the run cannot use as it is
        encoder = "fake" if embeddings == "stale" else "another-encoder"
        ensure_embeddings(users_set, encoder, encoder=fake_encoder)
    if embeddings == "stale":  # descriptions changed since the embeddings were made
        lines = (users_set / "descriptions.jsonl").read_text().splitlines()
        record = json.loads(lines[0])
        record["description"] = "Changed since."
        (users_set / "descriptions.jsonl").write_text("\n".join([*lines, json.dumps(record)]) + "\n")
    before = tree_hashes(users_set)
    for shards in (str(users_set), str(users_set / "manifest.json")):
        cfg = _cfg(tmp_path, shards, f"stage2.describe_synthetic={str(describe_synthetic).lower()}")
        with caplog.at_level(logging.INFO, logger="vaemo"):
            stage2.check(cfg)
            stage2.prepare(cfg)
        path = stage2.embeddings_path(cfg)
        urls = stage2.shards(cfg)
        assert tree_hashes(users_set) == before  # not a byte, not a lock file, added or changed
        assert path.parent.parent == tmp_path / "stage2" / "text-emb" and path.name == EMBEDDINGS
        assert folder_owner(path.parent) == stage2.EMBEDDINGS_WRITER
        assert read_metadata(path)["encoder"] == "fake"
        lines = (users_set / "descriptions.jsonl").read_text().splitlines()
        assert set(TextEmbeddingTable(path).index) == {json.loads(line)["key"] for line in lines}
        assert urls and all(Path(u).parent == users_set for u in urls)
    assert fake_encoder.calls == 1 + (embeddings != "missing")  # computed once, then reused from the cache
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "stage2" / "corpus-described").exists()
    assert f"your described set {users_set} (templated descriptions; read only)" in caplog.text
    assert ("stage2.describe_synthetic=true is ignored" in caplog.text) == describe_synthetic
    assert f"{users_set}/{EMBEDDINGS} is {'missing' if embeddings == 'missing' else 'stale'}" in caplog.text


def test_current_embeddings_of_a_users_set_are_read_where_they_are(users_set, tmp_path, fake_encoder):
    ensure_embeddings(users_set, "fake", encoder=fake_encoder)
    before = tree_hashes(users_set)
    cfg = _cfg(tmp_path, str(users_set))
    stage2.check(cfg)
    stage2.prepare(cfg)
    assert stage2.embeddings_path(cfg) == users_set / EMBEDDINGS
    assert fake_encoder.calls == 1 and tree_hashes(users_set) == before
    assert not (tmp_path / "stage2").exists()


def test_the_synthetic_described_set_is_built_in_its_own_cache_folder(tiny_corpus, tmp_path, fake_encoder,
                                                                      caplog):
    shutil.copytree(tiny_corpus, tmp_path / "corpus")
    cfg = _cfg(tmp_path, "synthetic", "stage2.describe_synthetic=true",
               f"data.synth.clips_per_shard={5}")
    with caplog.at_level(logging.INFO, logger="vaemo"):
        stage2.check(cfg)
        stage2.prepare(cfg)
    described = tmp_path / "stage2" / "corpus-described"
    assert stage2.synthetic_described_dir(cfg) == described and folder_owner(described) == SYNTHETIC_WRITER
    assert json.loads((described / "manifest.json").read_text())["total"] == 12
    assert stage2.embeddings_path(cfg) == described / EMBEDDINGS
    assert len(TextEmbeddingTable(described / EMBEDDINGS)) == 12
    assert all(Path(u).parent == described for u in stage2.shards(cfg))
    assert "the synthetic described set" in caplog.text and "not your data" in caplog.text
    # The default config's folder is data_cache/stage2/synthetic-described, as before.
    default = load_config(str(REPO / "configs" / "stage2" / "tiny.yaml"), [])
    assert default.data.shards == "synthetic"
    assert stage2.synthetic_described_dir(default) == Path("data_cache/stage2/synthetic-described")


def test_an_older_unmarked_synthetic_described_set_keeps_working(tiny_corpus, tmp_path, fake_encoder):
    shutil.copytree(tiny_corpus, tmp_path / "corpus")
    cfg = _cfg(tmp_path, "synthetic", "data.synth.clips_per_shard=5")
    described = stage2.synthetic_described_dir(cfg)
    ensure_synthetic_described(tmp_path / "corpus", described, clips_per_shard=5, progress=False)
    (described / OWNER_FILE).unlink()  # as the code before owner marks left it
    success = (described / SUCCESS).stat().st_mtime_ns
    stage2.check(cfg)
    stage2.prepare(cfg)
    assert (described / SUCCESS).stat().st_mtime_ns == success  # reused, not rebuilt
    assert all(Path(u).parent == described for u in stage2.shards(cfg))
    assert stage2.embeddings_path(cfg) == described / EMBEDDINGS and (described / EMBEDDINGS).is_file()


def test_a_users_folder_at_the_synthetic_cache_path_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "synthetic")
    mine = stage2.synthetic_described_dir(cfg)
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    before = tree_hashes(mine)
    with pytest.raises(FolderInUseError, match="refusing to write into .*Nothing was changed"):
        stage2.check(cfg)
    assert tree_hashes(mine) == before


def test_the_wrong_kind_of_folder_says_what_it_is(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"a shard folder \(3 shards.*not a described set.*vaemo-describe"):
        stage2.check(_cfg(tmp_path, str(tiny_corpus)))
    with pytest.raises(ConfigError, match="stage2.text_embeddings"):
        stage2.check(_cfg(tmp_path, "s3://bucket/described/shard-{000000..000001}.tar"))


def test_the_launcher_refuses_a_shard_folder_before_any_work(tiny_corpus, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    before = tree_hashes(tiny_corpus)
    proc = subprocess.run([sys.executable, "launchers/stage2.py", f"data.shards={tiny_corpus}",
                           f"data.synth.dir={tmp_path / 'corpus'}", f"train.out_dir={tmp_path / 'runs'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"config error: data.shards: {tiny_corpus} is a shard folder" in proc.stderr
    assert "vaemo-describe" in proc.stderr and "Traceback" not in proc.stderr
    assert tree_hashes(tiny_corpus) == before and not (tmp_path / "runs").exists()
