"""vaemo-describe against a local chat-completions server: content, retries, failures, resume, key safety."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
import webdataset as wds

from tests.files import tree_hashes
from vaemo_dist.data.decode_pyav import decode_sample
from vaemo_dist.data.shards import expand_shards
from vaemo_dist.text import describe
from vaemo_dist.text.describe import (
    CACHE,
    ChatClient,
    EndpointSettings,
    LLMDescriber,
    MediaSettings,
    SyntheticDescriber,
    describe_shards,
    read_cache,
    select_keys,
)
from vaemo_dist.text.prompt import load_prompt

PLANTED_KEY = "sk-planted-5f3a9c1e7d2b4a6f8e0c"


def _describer(url: str, attempts: int = 2, audio: bool = True) -> LLMDescriber:
    settings = EndpointSettings(base_url=url, model="test-model", timeout_s=0.5, max_attempts=attempts,
                                backoff_s=0.01, backoff_max_s=0.02)
    media = MediaSettings(frames=3, frame_size=64, audio=audio)
    return LLMDescriber(ChatClient(settings), load_prompt(), media)


def _run(corpus: Path, out: Path, describer, count: int) -> describe.Summary:
    return describe_shards(expand_shards(str(corpus)), out, describer, count=count, seed=0, concurrency=1,
                           clips_per_shard=2, progress=False)


def _sidecar(out: Path) -> dict[str, dict]:
    samples = {}
    for url in expand_shards(str(out)):
        for s in wds.WebDataset(url, shardshuffle=False):
            samples[s["__key__"]] = s
    return samples


def test_request_content_retries_and_recorded_failure(chat_server, tiny_corpus, tmp_path):
    # Clip 1: a 500, then ok. Clip 2: a timeout, then ok. Clip 3: malformed twice -> failed.
    # Clip 4: an answer inside a ```json fence (parsed).
    chat_server.script = ["500", "ok", "timeout", "ok", "malformed", "malformed", "fenced"]
    out = tmp_path / "described"
    summary = _run(tiny_corpus, out, _describer(chat_server.url), count=4)

    assert (summary.selected, summary.described, summary.failed, summary.requests) == (4, 3, 1, 7)
    assert chat_server.count == 7
    records = read_cache(out / CACHE)
    assert sorted(r["attempts"] for r in records.values()) == [1, 2, 2, 2]
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "malformed" in failed[0]["error"] and "raw" in failed[0]
    for r in records.values():
        assert r["prompt_version"] == "affect_cot_v1" and r["model"] == "test-model"
        if r["status"] == "ok":
            assert r["emotion"] == "happy" and r["intensity"] == "high"
            assert set(r["reasoning"]) == {"facial", "vocal", "agreement"}
            assert r["description"].startswith("The person is very happy")

    # The request: system + user (text, 3 JPEG frames as data URLs, WAV audio as input_audio).
    body = chat_server.requests[0]
    assert body["model"] == "test-model" and body["messages"][0]["role"] == "system"
    parts = body["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url", "image_url", "input_audio"]
    assert "facial" in parts[0]["text"] and "3 video frames and the audio track" in parts[0]["text"]
    url = parts[1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1])[:2] == b"\xff\xd8"
    assert parts[4]["input_audio"]["format"] == "wav"
    assert base64.b64decode(parts[4]["input_audio"]["data"])[:4] == b"RIFF"
    assert "Authorization" not in chat_server.headers[0]  # no key configured, none sent

    # Sidecar: the described clips only, media kept, each with its desc.json.
    samples = _sidecar(out)
    ok = {k for k, r in records.items() if r["status"] == "ok"}
    assert set(samples) == ok
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 3 and manifest["prompt_version"] == "affect_cot_v1"
    for key, s in samples.items():
        desc = json.loads(s["desc.json"])
        assert desc["description"] == records[key]["description"] and desc["model"] == "test-model"
        decode_sample(s, _inputs())  # the media still decodes for training
    assert (out / "_SUCCESS").is_file()
    assert json.loads((out / "summary.json").read_text())["failed"] == 1


def _inputs():
    from vaemo_dist.config import load_config

    overrides = ["inputs.video.frames=8", "inputs.video.size=64", "inputs.audio.frames=128"]
    return load_config(None, overrides).inputs


def test_no_audio_mode_and_client_errors_are_not_retried(chat_server, tiny_corpus, tmp_path):
    chat_server.script = ["400"]  # e.g. a model that rejects a request: recorded, not retried
    out = tmp_path / "described"
    summary = _run(tiny_corpus, out, _describer(chat_server.url, attempts=3, audio=False), count=3)
    assert (summary.described, summary.failed, chat_server.count) == (2, 1, 3)
    parts = chat_server.requests[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url", "image_url"]
    assert "No audio is attached" in parts[0]["text"]
    failed = [r for r in read_cache(out / CACHE).values() if r["status"] == "failed"]
    assert failed[0]["attempts"] == 1 and "HTTP 400" in failed[0]["error"]

    # A re-run asks again only for the failed clip.
    summary = _run(tiny_corpus, out, _describer(chat_server.url, audio=False), count=3)
    assert (summary.cached, summary.described, summary.failed, chat_server.count) == (2, 1, 0, 4)


def test_resume_of_a_half_finished_run_pays_only_for_the_rest(chat_server, tiny_corpus, tmp_path):
    out = tmp_path / "described"
    _run(tiny_corpus, out, _describer(chat_server.url), count=6)
    assert chat_server.count == 6
    # As if the run had been killed after 3 results, mid-way through writing the 4th line.
    lines = (out / CACHE).read_text().splitlines(keepends=True)
    (out / CACHE).write_text("".join(lines[:3]) + lines[3][:25])

    summary = _run(tiny_corpus, out, _describer(chat_server.url), count=6)
    assert (summary.cached, summary.described, chat_server.count) == (3, 3, 9)
    assert len(_sidecar(out)) == 6

    summary = _run(tiny_corpus, out, _describer(chat_server.url), count=6)  # all done: no request at all
    assert (summary.cached, summary.described, chat_server.count) == (6, 0, 9)

    # Another model (or prompt version) is another description: asked for again.
    other = _describer(chat_server.url)
    other.model = "other-model"
    other.client.settings.model = "other-model"
    summary = _run(tiny_corpus, out, other, count=6)
    assert (summary.cached, summary.described, chat_server.count) == (0, 6, 15)


def test_api_key_is_sent_but_never_logged_or_written(chat_server, tiny_corpus, tmp_path, monkeypatch, caplog,
                                                     capfd):
    monkeypatch.setenv("VAEMO_LLM_API_KEY", PLANTED_KEY)
    chat_server.script = ["echo-key", "ok", "500", "500"]  # the server echoes the key in an error body
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "described"
    code = describe.main([str(tiny_corpus), "--out", str(out), "--base-url", chat_server.url, "--model", "m",
                          "--count", "3", "--attempts", "2", "--backoff", "0.01", "--frames", "2",
                          "--frame-size", "64", "--no-progress"])
    assert code == 0
    assert all(h.get("Authorization") == f"Bearer {PLANTED_KEY}" for h in chat_server.headers)
    assert "[redacted]" in caplog.text  # the echoed key was seen, and redacted
    captured = capfd.readouterr()
    for text in (caplog.text, captured.out, captured.err):
        assert PLANTED_KEY not in text
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for path in files:
        assert PLANTED_KEY.encode() not in path.read_bytes(), path
    assert {r["model"] for r in read_cache(out / CACHE).values()} == {"m"}


def test_synthetic_mode_writes_varied_class_descriptions(tiny_corpus, tmp_path):
    out = tmp_path / "synthetic"
    assert describe.main([str(tiny_corpus), "--out", str(out), "--synthetic", "--no-progress"]) == 0
    records = read_cache(out / CACHE)
    samples = _sidecar(out)
    assert len(records) == len(samples) == 12
    texts = set()
    for s in samples.values():
        meta, desc = json.loads(s["json"]), json.loads(s["desc.json"])
        assert desc["emotion"] == meta["class_name"] and desc["prompt_version"] == "synthetic-template-v1"
        texts.add(desc["description"])
    assert len(texts) >= 10  # varied wording, not one sentence per class

    # The same settings again: nothing to do; a subset with a fraction is seeded.
    summary = describe_shards(expand_shards(str(tiny_corpus)), out, SyntheticDescriber(), progress=False)
    assert (summary.cached, summary.described) == (12, 0)


def test_subset_selection_is_seeded():
    keys = [f"k{i}" for i in range(100)]
    assert select_keys(keys, count=10, seed=1) == select_keys(keys, count=10, seed=1)
    assert select_keys(keys, count=10, seed=1) != select_keys(keys, count=10, seed=2)
    assert len(select_keys(keys, fraction=0.25)) == 25 and len(select_keys(keys, count=500)) == 100
    with pytest.raises(ValueError):
        select_keys(keys, fraction=0.0)


def test_a_bad_clip_is_recorded_and_the_run_goes_on(chat_server, tiny_corpus, tmp_path):
    good = next(iter(wds.WebDataset(str(tiny_corpus / "shard-000000.tar"), shardshuffle=False)))
    shard = tmp_path / "src" / "shard-000000.tar"
    shard.parent.mkdir()
    with wds.TarWriter(str(shard)) as w:
        audio_meta = {"flac": good["flac"], "json": good["json"]}
        w.write({"__key__": "broken", "mp4": b"\x00not a video" * 20, **audio_meta})
        w.write({"__key__": "fine", "mp4": good["mp4"], **audio_meta})
    summary = _run(shard.parent, tmp_path / "out", _describer(chat_server.url), count=0)
    records = read_cache(tmp_path / "out" / CACHE)
    assert (summary.described, summary.failed, chat_server.count) == (1, 1, 1)  # no request for the bad one
    assert records["broken"]["status"] == "failed" and records["broken"]["error"].startswith("media:")


def test_options_come_from_cli_then_env_then_config_file(tmp_path, monkeypatch):
    cfg = tmp_path / "describe.yaml"
    cfg.write_text("base_url: http://from-file/v1\nmodel: file-model\nconcurrency: 16\nno_audio: true\n")
    monkeypatch.setenv("VAEMO_LLM_MODEL", "env-model")
    args = describe._parser().parse_args(["shards", "--out", "o", "--config", str(cfg), "--concurrency", "2"])
    opts = describe._options(args)
    assert opts["base_url"] == "http://from-file/v1" and opts["model"] == "env-model"
    assert opts["concurrency"] == 2 and opts["no_audio"] is True
    cfg.write_text("api_key: sk-in-a-file\n")
    with pytest.raises(SystemExit, match="do not put api_key"):
        describe._options(args)




def test_a_folder_vaemo_describe_did_not_create_is_refused_unchanged(tiny_corpus, tmp_path, capsys):
    from vaemo_dist.fsutil import OWNER_FILE, folder_owner

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "shard-000000.tar").write_bytes(b"my own shard")
    before = tree_hashes(mine)
    args = [str(tiny_corpus), "--out", str(mine), "--synthetic", "--no-progress"]
    assert describe.main(args) == 2
    err = capsys.readouterr().err
    assert f"refusing to write into {mine}" in err and "Nothing was changed" in err and "--overwrite" in err
    assert tree_hashes(mine) == before
    # --overwrite moves it aside (never deleted) and describes into a fresh folder.
    assert describe.main([*args, "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(aside) == 1 and tree_hashes(aside[0]) == before
    assert folder_owner(mine) == describe.WRITER and len(read_cache(mine / CACHE)) == 12
    # Its own folder: a re-run resumes there (nothing to do); so does an older, unmarked output.
    assert describe.main(args) == 0 and "12 from the cache" in capsys.readouterr().err
    (mine / OWNER_FILE).unlink()
    assert describe.main(args) == 0 and folder_owner(mine) == describe.WRITER
    # A synthetic described set in stage 2's cache folder is another writer's.
    assert describe.main([str(tiny_corpus), "--out", str(tmp_path / "cache"), "--synthetic",
                          "--no-progress"]) == 0
    describe.claim_described_dir(tmp_path / "s2", describe.SYNTHETIC_WRITER)
    (tmp_path / "s2" / "x.txt").write_text("x")
    assert describe.main([str(tiny_corpus), "--out", str(tmp_path / "s2"), "--synthetic"]) == 2
    assert "holds the output of synthetic described set" in capsys.readouterr().err
