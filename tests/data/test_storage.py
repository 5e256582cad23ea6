"""Storage without a server: retries resume at the right byte, permanent errors are not retried,
messages name the URL and never carry secrets. (A real S3 server: tests/integration/test_s3_*.py.)"""

import io
import os
import time

import pytest
import webdataset as wds

from vaemo_dist.data import storage
from vaemo_dist.data.shards import StreamPosition, expand_shards, iter_slot


class FlakyFS:
    """An fsspec-like filesystem over bytes whose reads break at chosen offsets, once each."""

    def __init__(self, data: bytes, break_at: list[int], error: type[Exception] = ConnectionError) -> None:
        self.data, self.break_at, self.error = data, sorted(break_at), error
        self.opens = 0

    def _strip_protocol(self, url: str) -> str:
        return url.split("://", 1)[1]

    def open(self, path, mode="rb", block_size=None):
        self.opens += 1
        fs = self

        class File(io.BytesIO):
            def read(self, n=-1):
                n = min(n if n >= 0 else len(fs.data), 16384)  # short reads, like a network stream
                if fs.break_at and self.tell() + n > fs.break_at[0]:
                    fs.break_at.pop(0)
                    raise fs.error("connection reset by peer")
                return super().read(n)

        return File(self.data)


@pytest.fixture
def fast_retries():
    old = storage.settings()
    storage.configure(backoff_s=0.001, reopen_attempts=3)
    yield
    storage.configure(old)


def test_reads_resume_at_the_byte_they_reached(monkeypatch, fast_retries):
    data = os.urandom(300_000)
    fs = FlakyFS(data, break_at=[70_000, 150_000, 151_000])
    monkeypatch.setattr(storage, "filesystem", lambda protocol: fs)
    with storage.open_stream("mem://bucket/a.tar") as f:
        assert f.read() == data
    assert fs.opens == 4  # one open, three reopens


def test_gives_up_naming_the_url_without_secrets(monkeypatch, fast_retries):
    fs = FlakyFS(b"x" * 1000, break_at=[10] * 10)
    monkeypatch.setattr(storage, "filesystem", lambda protocol: fs)
    url = "mem://user:pw@bucket/a.tar?sig=SECRET"
    with pytest.raises(storage.StorageError) as info, storage.open_stream(url) as f:
        f.read()
    msg = str(info.value)
    assert "mem://bucket/a.tar" in msg and "4 attempts" in msg and "data.io_timeout_s" in msg
    assert isinstance(info.value, storage.StoreUnavailable) and "\n" not in msg
    assert "SECRET" not in msg and "pw" not in msg


def test_missing_objects_are_not_retried(monkeypatch, fast_retries):
    fs = FlakyFS(b"x" * 1000, break_at=[0], error=FileNotFoundError)
    monkeypatch.setattr(storage, "filesystem", lambda protocol: fs)
    with pytest.raises(FileNotFoundError, match="mem://bucket/a.tar"):
        storage.open_stream("mem://bucket/a.tar").read()
    assert fs.opens == 1


def test_a_shard_stream_survives_a_connection_reset(monkeypatch, fast_retries, tmp_path):
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(50):
            w.write({"__key__": f"k{i:02d}", "bin": os.urandom(3000)})
    fs = FlakyFS(path.read_bytes(), break_at=[40_000, 100_000])
    monkeypatch.setattr(storage, "filesystem", lambda protocol: fs)
    troubles = []
    stream = iter_slot(["mem://b/s.tar"], 0, 0, 1, StreamPosition(), troubles.append)
    got = [sample["__key__"] for _, (sample, _) in zip(range(50), stream)]
    assert got == [f"k{i:02d}" for i in range(50)] and not troubles and fs.opens == 3


def test_redact_and_local_paths(tmp_path):
    assert storage.redact("s3://bucket/x.tar") == "s3://bucket/x.tar"
    assert storage.redact("https://u:p@host:9000/x.tar?X-Amz-Signature=abc") == "https://host:9000/x.tar"
    assert storage.redact("/data/x.tar") == "/data/x.tar"
    p = tmp_path / "a.bin"
    storage.write_bytes(str(p), b"hello")
    assert storage.read_bytes(f"file://{p}") == b"hello"
    storage.check_shards_reachable([str(p)])  # local paths are checked by expand_shards instead


def test_manifest_lists_shards(tmp_path):
    (tmp_path / "manifest.json").write_text('{"shards": ["a.tar", "b.tar"]}')
    assert expand_shards(str(tmp_path / "manifest.json")) == [str(tmp_path / n) for n in ("a.tar", "b.tar")]


class HangingFS(FlakyFS):
    """A store that accepts the connection and never answers (a black-holed endpoint)."""

    def open(self, path, mode="rb", block_size=None):
        self.opens += 1
        time.sleep(3600)


@pytest.mark.parametrize("fs", [HangingFS(b"", []), FlakyFS(b"x" * 1000, break_at=[10] * 10**6)],
                         ids=["no-answer", "always-failing"])
def test_the_total_budget_ends_a_dead_store(monkeypatch, fs):
    """However the store fails (a call that never returns, or failures retried with backoff), the
    operation ends within io_timeout_s with one line naming the URL and the endpoint."""
    old = storage.settings()
    storage.configure(io_timeout_s=1.5, backoff_s=0.05, max_backoff_s=0.2, endpoint="http://10.9.9.9:9000")
    monkeypatch.setattr(storage, "filesystem", lambda protocol: fs)
    started = time.monotonic()
    try:
        with pytest.raises(storage.StoreUnavailable) as info, storage.open_stream("mem://bucket/a.tar") as f:
            f.read()
    finally:
        storage.configure(old)
    took = time.monotonic() - started
    msg = str(info.value)
    assert 1.4 < took < 2.5, took
    assert msg.startswith("mem://bucket/a.tar: the store at http://10.9.9.9:9000 did not answer within "
                          "data.io_timeout_s=1.5 s") and "\n" not in msg, msg
    assert fs.opens >= 1 if isinstance(fs, HangingFS) else fs.opens > 3


def test_a_store_that_dies_ends_the_shard_stream_instead_of_skipping(monkeypatch):
    """A bad shard is skipped, a dead store is not: every other shard lives there too."""
    old = storage.settings()
    storage.configure(io_timeout_s=0.5, backoff_s=0.05)
    monkeypatch.setattr(storage, "filesystem", lambda protocol: HangingFS(b"", []))
    troubles = []
    try:
        with pytest.raises(storage.StoreUnavailable):
            next(iter_slot(["mem://b/0.tar", "mem://b/1.tar"], 0, 0, 1, StreamPosition(), troubles.append))
    finally:
        storage.configure(old)
    assert not troubles


def test_message_of_an_error_a_dataloader_worker_reraised():
    line = "s3://b/x.tar: the store at http://h:1 did not answer within data.io_timeout_s=5 s (read)"
    wrapped = storage.StoreUnavailable(
        "Caught StoreUnavailable in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n  File \"x.py\", line 1, in f\n    raise e\n"
        f"vaemo_dist.data.storage.StoreUnavailable: {line}\n")
    assert storage.message(wrapped) == line
    assert storage.message(storage.StorageError(line)) == line


def test_io_timeout_is_a_validated_config_key():
    from vaemo_dist.config import ConfigError, DataConfig, load_config

    assert DataConfig().io_timeout_s == 300.0
    with pytest.raises(ConfigError, match="data.io_timeout_s"):
        load_config("configs/stage1/tiny.yaml", ["data.io_timeout_s=0"])
    assert storage.configure_from(DataConfig(io_timeout_s=7)).io_timeout_s == 7
    storage.configure(storage.StorageSettings())


def test_a_storage_error_gets_no_peer_death_companion():
    """The launcher asks describe_failure about every failure; the store's own line is the whole story,
    even though it mentions connections and timeouts."""
    from vaemo_dist.watchdog import PeerWatch, describe_failure

    watch = PeerWatch(0, 2, interval_s=0.01)  # not started: no peers known
    error = storage.StoreUnavailable("s3://b/x.tar: the store at http://h:1 did not answer within "
                                     "data.io_timeout_s=5 s (last error: ConnectTimeoutError: timed out)")
    assert describe_failure(watch, error) == ""
    assert describe_failure(watch, RuntimeError("gloo connection timed out")) != ""  # a real one
