"""Where shard bytes come from: local paths, `s3://` (through s3fs) and any other fsspec URL.

* One filesystem object per protocol and process, made on first use. s3fs keeps an event-loop
  thread and open connections that do not survive a fork, so every DataLoader worker builds its own.
* Two layers of retries under one time budget. botocore retries each request (`standard` mode,
  `retries` attempts), which rides out short outages; `RetryingReader` then reopens the object at the
  byte it had reached, with exponential backoff, when a read still fails (a longer server restart).
  Both share `io_timeout_s` (`data.io_timeout_s`): an operation that has not succeeded within it,
  counted from its start, raises `StoreUnavailable`, one line naming the URL and the endpoint. A call
  still inside botocore at the deadline is abandoned (it runs in a daemon thread). Missing objects and
  refused credentials are not retried.
* Credentials come from the usual AWS chain (environment, `~/.aws` profile, instance role); the
  endpoint from `data.s3_endpoint`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`. Messages carry
  URLs with any query string and user info removed, never keys or signatures.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import IO, Any
from urllib.parse import urlsplit

import fsspec

from vaemo_dist.secrets import redact_url

log = logging.getLogger(__name__)

# Errors that retrying cannot fix: report at once.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class StorageError(OSError):
    """A shard location that cannot be read; the message names the URL (redacted)."""


class StoreUnavailable(StorageError):
    """The store did not answer within `io_timeout_s`: fatal for the run (every other shard lives there
    too), not a bad shard to skip."""


@dataclass(frozen=True)
class StorageSettings:
    endpoint: str = ""  # S3 endpoint URL; "" = AWS_ENDPOINT_URL(_S3) or AWS itself
    retries: int = 10  # botocore attempts per request
    reopen_attempts: int = 1000  # our reopen-and-seek attempts after botocore gave up (the budget ends first)
    io_timeout_s: float = 300.0  # the total budget of one operation, retries and reopens included
    backoff_s: float = 0.5  # first wait before a reopen; doubles each time
    max_backoff_s: float = 10.0
    # Bytes fetched per request. Small enough that a shard streams in several requests (memory,
    # and a restart costs one block), large enough to keep request overhead low.
    block_size: int = 8 << 20


_settings = StorageSettings()
_filesystems: dict[tuple[int, str, StorageSettings], fsspec.AbstractFileSystem] = {}


def configure(settings: StorageSettings | None = None, **changes: Any) -> StorageSettings:
    """Set the process-wide storage settings (each DataLoader worker calls this with the config)."""
    global _settings
    _settings = replace(settings or _settings, **changes)
    return _settings


def configure_from(data: Any) -> StorageSettings:
    """Apply the storage keys of a `DataConfig` (s3_endpoint, io_retries) to this process."""
    return configure(endpoint=data.s3_endpoint, retries=data.io_retries,
                     io_timeout_s=getattr(data, "io_timeout_s", _settings.io_timeout_s))


def reset() -> None:
    """Forget this process's filesystem objects (after changing credentials in the environment)."""
    _filesystems.clear()


def settings() -> StorageSettings:
    return _settings


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def redact(url: str) -> str:
    """The URL without user info, query or fragment (where signatures and keys would sit)."""
    return redact_url(url)


def _endpoint_url() -> str:
    env = os.environ
    return _settings.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""


def endpoint() -> str:
    """The S3 endpoint in use ("" for AWS's own), for messages; redacted."""
    url = _endpoint_url()
    return redact(url) if url else ""


def filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """This process's filesystem for `protocol`, created on first use."""
    key = (os.getpid(), protocol, _settings)
    fs = _filesystems.get(key)
    if fs is None:
        if protocol in ("s3", "s3a"):
            import s3fs

            # No single attempt may outlast the budget (botocore's defaults are 60 s each).
            attempt_s = max(1.0, min(60.0, _settings.io_timeout_s))
            kwargs: dict[str, Any] = {
                "config_kwargs": {"retries": {"max_attempts": _settings.retries, "mode": "standard"},
                                  "connect_timeout": attempt_s, "read_timeout": attempt_s},
                "default_block_size": _settings.block_size,
                "skip_instance_cache": True,  # fsspec's shared cache would hand a forked child our loop
            }
            url = _endpoint_url()
            if url:
                kwargs["client_kwargs"] = {"endpoint_url": url}
            fs = s3fs.S3FileSystem(**kwargs)
        else:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        # Drop what a parent process left behind (after fork the dict is a copy).
        for stale in [k for k in _filesystems if k[0] != key[0]]:
            del _filesystems[stale]
        _filesystems[key] = fs
    return fs


def split(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = url.split("://", 1)[0]
    fs = filesystem(protocol)
    return fs, fs._strip_protocol(url)


def _backoff(attempt: int) -> float:
    return min(_settings.backoff_s * 2**attempt, _settings.max_backoff_s)


def describe_error(url: str, e: BaseException) -> str:
    """A one-line reason for `url` failing, with a hint for the usual causes."""
    what = f"{type(e).__name__}: {e}"
    if isinstance(e, PermissionError):
        where = endpoint() or "AWS"
        return (f"{redact(url)}: access denied ({what}). Check the credentials (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the endpoint ({where}).")
    if isinstance(e, FileNotFoundError):
        return f"{redact(url)}: not found"
    return f"{redact(url)}: {what}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def message(e: BaseException) -> str:
    """The one-line message of a storage error, also when a DataLoader worker re-raised it (torch puts
    the worker's traceback into the message; the original message is its last line)."""
    text = str(e)
    if "Original Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        head, sep, rest = text.partition(": ")
        if sep and " " not in head:  # "vaemo_dist.data.storage.StoreUnavailable: <message>"
            text = rest
    return _one_line(text)


def unavailable(url: str, what: str, budget: float, last: BaseException | None) -> StoreUnavailable:
    """The one-line error for a store that did not answer within the budget."""
    where = endpoint() or ("AWS" if url.startswith(("s3://", "s3a://")) else "its server")
    cause = (f"; last error: {type(last).__name__}: {_one_line(str(last))}" if last is not None
             else "; no answer yet")
    return StoreUnavailable(f"{redact(url)}: the store at {where} did not answer within data.io_timeout_s="
                            f"{budget:g} s ({what}{cause})")


class _NoAnswer(Exception):
    """An action still running when the budget ended."""


def _call(action: Any, timeout: float) -> Any:
    """`action()`, given up (left running in a daemon thread) after `timeout` seconds."""
    if timeout <= 0:
        raise _NoAnswer
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = action()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="vaemo-storage-call", daemon=True).start()
    if not done.wait(timeout):
        raise _NoAnswer
    if "error" in box:
        raise box["error"]
    return box["value"]


def within_budget(url: str, action: Any, what: str, on_failure: Any = None) -> Any:
    """Run `action()` until it succeeds, retrying transient failures with backoff, within
    `io_timeout_s` from now; then `StoreUnavailable`. Permanent errors (missing, refused) are raised
    as they are. `on_failure(error, wait)` is told of each retry (after it, the action starts afresh)."""
    budget = _settings.io_timeout_s
    deadline = time.monotonic() + budget
    last: BaseException | None = None
    for attempt in range(_settings.reopen_attempts + 1):
        try:
            return _call(action, deadline - time.monotonic())
        except _NoAnswer:
            raise unavailable(url, what, budget, last) from last
        except PERMANENT:
            raise
        except Exception as e:  # noqa: BLE001 - network failures come in many types; retry them all
            last = e
            wait = min(_backoff(attempt), deadline - time.monotonic())
            if wait <= 0 or attempt == _settings.reopen_attempts:
                raise unavailable(url, f"{what}, {attempt + 1} attempts", budget, e) from e
            if on_failure is not None:
                on_failure(e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class RetryingReader(io.RawIOBase):
    """A read-only stream over a remote object that survives transient failures.

    It remembers how many bytes it has handed out; when a read fails it waits, reopens the object
    and seeks back to that offset, so the consumer (a tar parser) never notices the outage.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._fs, self._path = split(url)
        self._offset = 0
        self._file: IO[bytes] | None = None
        self._file = self._retry(self._open, "open")

    def _open(self) -> IO[bytes]:
        f = self._fs.open(self._path, "rb", block_size=_settings.block_size)
        if self._offset:
            f.seek(self._offset)
        return f

    def _retry(self, action: Any, what: str) -> Any:
        def reopen(e: BaseException, wait: float) -> None:
            log.warning("%s: %s failed at byte %d (%s: %s); reopening in %.1fs", redact(self.url), what,
                        self._offset, type(e).__name__, e, wait)
            self._close_file()  # the next attempt opens afresh and seeks back to the offset

        try:
            return within_budget(self.url, action, f"{what} at byte {self._offset}", reopen)
        except PERMANENT as e:
            raise type(e)(describe_error(self.url, e)) from e

    def _close_file(self) -> None:
        if self._file is not None:
            # A broken connection may fail to close; it is dropped anyway.
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        def read() -> bytes:
            if self._file is None:
                self._file = self._open()
            return self._file.read(len(buffer))

        data = self._retry(read, "read")
        n = len(data)
        buffer[:n] = data
        self._offset += n
        return n

    def close(self) -> None:
        self._close_file()
        super().close()


def open_stream(url: str) -> IO[bytes]:
    """A binary read stream for a local path or any fsspec URL (remote ones retry, see above)."""
    if not is_remote(url):
        return open(local_path(url), "rb")
    return io.BufferedReader(RetryingReader(url), buffer_size=1 << 20)


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        return f.read()


def _retrying(url: str, action: Any, what: str) -> Any:
    """Run `action()` (a whole-object operation), retrying transient failures with backoff, within
    the budget."""
    def retrying(e: BaseException, wait: float) -> None:
        log.warning("%s: %s failed (%s: %s); retrying", redact(url), what, type(e).__name__, e)

    try:
        return within_budget(url, action, what, retrying)
    except PERMANENT as e:
        raise StorageError(describe_error(url, e)) from e


def put_file(local: str, url: str) -> None:
    """Move a finished local file to `url` (a path or any fsspec URL; remote ones are uploaded)."""
    if not is_remote(url):
        os.makedirs(os.path.dirname(os.path.abspath(local_path(url))), exist_ok=True)
        os.replace(local, local_path(url))  # atomic: a shard name only ever points at a whole file
        return
    fs, path = split(url)
    _retrying(url, lambda: fs.put_file(local, path), "upload")
    os.unlink(local)


def write_bytes(url: str, data: bytes) -> None:
    """Write a small object (a manifest) in one piece; local files are replaced atomically."""
    if not is_remote(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, path = split(url)
    _retrying(url, lambda: fs.pipe_file(path, data), "write")


def check_shards_reachable(urls: Iterable[str]) -> None:
    """Fail fast, with a clear message, when remote shards cannot be read at all.

    One metadata request per bucket (the first shard named in it): refused credentials, an
    unreachable endpoint or a missing bucket stop the run here, before training starts. A missing
    individual shard is only warned about; it is reported and counted when the stream reaches it.
    """
    first_per_bucket: dict[tuple[str, str], str] = {}
    for url in urls:
        if is_remote(url):
            parts = urlsplit(url)
            first_per_bucket.setdefault((parts.scheme, parts.netloc), url)
    for url in first_per_bucket.values():
        fs, path = split(url)
        try:
            within_budget(url, lambda fs=fs, path=path: fs.info(path), "checking a shard")
        except FileNotFoundError:
            check_bucket(url, "cannot read shards")
            log.warning("shard %s does not exist; it will be reported and skipped", redact(url))
        except StoreUnavailable as e:
            raise StoreUnavailable(f"cannot read shards: {e}") from None
        except Exception as e:  # noqa: BLE001 - credentials, endpoint, network: all fatal at start-up
            raise StorageError(f"cannot read shards: {describe_error(url, e)}") from None


def bucket_of(url: str) -> str:
    """`s3://bucket` of `s3://bucket/key`."""
    return f"{url.split('://', 1)[0]}://{urlsplit(url).netloc}"


def check_bucket(url: str, prefix: str) -> None:
    """After `url` was not found: raise a StorageError (`<prefix>: ...`) when its bucket is missing or
    unreadable; return when the bucket is there (only the object is missing)."""
    bucket = bucket_of(url)
    fs = filesystem(url.split("://", 1)[0])
    name = fs._strip_protocol(bucket)
    try:
        within_budget(bucket, lambda: fs.ls(name), "listing the bucket")
    except FileNotFoundError:
        where = endpoint() or "AWS"
        raise StorageError(f"{prefix}: {redact(url)}: no bucket {urlsplit(url).netloc!r} at {where} "
                           "(check the bucket name and the endpoint)") from None
    except StoreUnavailable as e:
        raise StoreUnavailable(f"{prefix}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure here means the bucket is unusable
        raise StorageError(f"{prefix}: {describe_error(bucket, e)}") from None


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """A `webdataset.gopen` handler for fsspec URLs (webdataset has none for s3://)."""
    if mode != "rb":
        raise ValueError(f"{redact(url)}: only reading is supported, not mode {mode!r}")
    return open_stream(url)


def register_webdataset_opener(protocols: tuple[str, ...] = ("s3",)) -> None:
    """Let `webdataset.WebDataset("s3://...")` read through this module."""
    import importlib

    # Not `from webdataset import gopen`: the package exports a function of the module's name.
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    for p in protocols:
        schemes[p] = gopen_fsspec
