"""Affective descriptions of clips from a multimodal LLM, written as a sidecar shard set.

    vaemo-describe SHARDS --out DIR --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-Omni-7B
    vaemo-describe SHARDS --out DIR --model Qwen/Qwen2.5-VL-7B-Instruct --no-audio
    vaemo-describe data_cache/synthetic --out DIR --synthetic        # templated, no model (CPU tests)

For each selected clip (all, `--count N` or `--fraction F`, seeded) a few frames (JPEG/PNG data URLs)
and optionally the audio (base64 WAV/FLAC `input_audio` part) go to an OpenAI-compatible
chat-completions endpoint (POST {base_url}/chat/completions) with the chain-of-thought prompt of
vaemo_dist/text/prompts/<version>.yaml; the JSON answer is parsed and stored. Server errors (5xx, 429),
timeouts, connection errors and malformed answers are retried with exponential backoff; a clip that
still fails is recorded as failed and the run goes on.

Output folder:
    descriptions.jsonl   the cache: one record per line, appended as each result arrives; a re-run
                         skips clips with an "ok" record of the same prompt version and model
    shard-XXXXXX.tar     the described subset: each clip's media + <key>.desc.json
    manifest.json        shards, counts, prompt version, model, sources
    summary.json         counts of the last run; _SUCCESS is written last

The output folder is claimed first (fsutil.claim_output_dir): a re-run resumes in a folder
vaemo-describe made, but a non-empty folder it did not create is refused before any request
(`--overwrite` moves it aside to `<out>.old-<timestamp>`, never deleted). The synthetic described set
that stage 2 builds for `data.shards: synthetic` lives in a cache folder of its own (writer
"synthetic described set"), never in a folder the user named.

The API key comes from --api-key, $VAEMO_LLM_API_KEY or $OPENAI_API_KEY; it is sent only in the
Authorization header and never logged or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import yaml
from tqdm import tqdm

from vaemo_dist.data.shards import ShardWriter
from vaemo_dist.fsutil import FolderInUseError, claim_output_dir, folder_lock, write_atomic
from vaemo_dist.startup import entry_point, fail
from vaemo_dist.text import media
from vaemo_dist.text.described import CACHE, read_cache  # noqa: F401  (CACHE: also this module's name)
from vaemo_dist.text.prompt import (
    DEFAULT_PROMPT,
    REASONING_KEYS,
    MalformedAnswer,
    PromptTemplate,
    load_prompt,
    parse_answer,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
SUCCESS = "_SUCCESS"
DESC_EXT = "desc.json"
FORMAT = "vaemo-described"
FORMAT_VERSION = 1
KEY_ENVS = ("VAEMO_LLM_API_KEY", "OPENAI_API_KEY")
WRITER = "vaemo-describe"  # the owners recorded in output folders (fsutil.claim_output_dir)
SYNTHETIC_WRITER = "synthetic described set"


# --------------------------------------------------------------------------------------------
# The endpoint


@dataclass
class EndpointSettings:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key: str = field(default="", repr=False)  # never printed with the settings
    timeout_s: float = 120.0
    max_attempts: int = 4  # requests per clip, first try included
    backoff_s: float = 1.0  # wait before the 2nd attempt; doubles each time
    backoff_max_s: float = 30.0
    max_tokens: int = 768
    temperature: float = 0.2
    json_mode: bool = False  # response_format {"type": "json_object"} (vLLM, OpenAI); not every server has it


@dataclass
class MediaSettings:
    frames: int = 4
    frame_size: int = 448  # longest side in pixels
    image_format: str = "jpeg"  # jpeg | png
    audio: bool = True  # VL-only models reject audio parts: --no-audio
    audio_format: str = "wav"  # wav | flac
    max_audio_seconds: float = 30.0


class RetryableError(RuntimeError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalRequestError(RuntimeError):
    """An answer that retrying will not change (e.g. 400: the model does not take audio)."""


def api_key_from_env() -> str:
    for name in KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return ""


def safe_url(url: str) -> str:
    """A URL without user info or query (which may carry credentials), for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class ChatClient:
    """POST {base_url}/chat/completions; one requests.Session per thread."""

    def __init__(self, settings: EndpointSettings) -> None:
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self._local = threading.local()
        self._lock = threading.Lock()
        self.requests_made = 0

    def redact(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "[redacted]") if key else text

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def complete(self, messages: list[dict[str, Any]]) -> str:
        """One request; the text of the first choice. Raises RetryableError or FatalRequestError."""
        s = self.settings
        body: dict[str, Any] = {"model": s.model, "messages": messages, "max_tokens": s.max_tokens,
                                "temperature": s.temperature}
        if s.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json"}
        if s.api_key:
            headers["Authorization"] = f"Bearer {s.api_key}"
        with self._lock:
            self.requests_made += 1
        try:
            resp = self._session().post(self.url, json=body, headers=headers,
                                        timeout=(min(10.0, s.timeout_s), s.timeout_s))
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as e:
            raise FatalRequestError(f"bad endpoint URL: {e}") from None
        except requests.RequestException as e:  # timeouts, refused or dropped connections
            raise RetryableError(f"{type(e).__name__}: {self.redact(str(e))[:300]}") from None
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            raise RetryableError(f"HTTP {resp.status_code}: {self.redact(resp.text)[:300]}",
                                 _retry_after(resp.headers.get("Retry-After")))
        if resp.status_code >= 400:
            raise FatalRequestError(f"HTTP {resp.status_code}: {self.redact(resp.text)[:300]}")
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            text = self.redact(resp.text)[:200]
            raise MalformedAnswer(f"not a chat-completions response: {text!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Describers: (key, sample) -> record


class LLMDescriber:
    """Asks the endpoint about one clip, with retries; never raises for a per-clip problem."""

    def __init__(self, client: ChatClient, template: PromptTemplate, media_settings: MediaSettings,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client, self.template, self.media = client, template, media_settings
        self.prompt_version = template.version
        self.model = client.settings.model
        self.sleep = sleep

    def messages(self, sample: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        m = self.media
        video = media.find_field(sample, media.VIDEO_EXTS)
        if video is None:
            raise media.MediaError(f"no video field (looked for {', '.join(media.VIDEO_EXTS)})")
        images, duration = media.sample_frames(video[1], m.frames, m.frame_size, m.image_format)
        parts: list[dict[str, Any]] = [media.image_part(img, m.image_format) for img in images]
        if m.audio:
            audio = media.find_field(sample, media.AUDIO_EXTS)
            if audio is None:
                raise media.MediaError(f"no audio field (looked for {', '.join(media.AUDIO_EXTS)}); "
                                       "use --no-audio for video-only clips")
            parts.append(media.audio_part(media.audio_clip(audio[1], m.audio_format, m.max_audio_seconds),
                                          m.audio_format))
        system, user = self.template.render(n_frames=len(images), duration=duration, with_audio=m.audio)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": [{"type": "text", "text": user}, *parts]}]
        return messages, {"n_frames": len(images), "audio": m.audio}

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self.client.settings
        wait_s = min(s.backoff_max_s, s.backoff_s * 2 ** (attempt - 1))
        if retry_after is not None:
            wait_s = min(s.backoff_max_s, max(wait_s, retry_after))
        return wait_s * random.uniform(0.8, 1.0)  # jitter: concurrent retries do not arrive together

    def __call__(self, key: str, sample: dict[str, Any]) -> dict[str, Any]:
        base = {"key": key, "prompt_version": self.prompt_version, "model": self.model}
        try:
            messages, info = self.messages(sample)
        except media.MediaError as e:
            return {**base, "status": "failed", "error": f"media: {e}", "attempts": 0}
        error, raw = "", ""
        attempts = self.client.settings.max_attempts
        for attempt in range(1, attempts + 1):
            retry_after = None
            try:
                raw = self.client.complete(messages)
                answer = parse_answer(raw, self.template)
                return {**base, "status": "ok", "description": answer["description"],
                        "emotion": answer["emotion"].lower(), "intensity": answer["intensity"],
                        "reasoning": {k: answer[k] for k in REASONING_KEYS if k in answer},
                        "prompt_sha256": self.template.sha256, "attempts": attempt, **info}
            except FatalRequestError as e:
                return {**base, "status": "failed", "error": str(e), "attempts": attempt}
            except RetryableError as e:
                error, retry_after = str(e), e.retry_after
            except MalformedAnswer as e:
                error = f"malformed answer: {self.client.redact(str(e))}"
            log.info("%s: attempt %d/%d failed: %s", key, attempt, attempts, error)
            if attempt < attempts:
                self.sleep(self._backoff(attempt, retry_after))
        record = {**base, "status": "failed", "error": error, "attempts": attempts}
        if raw:
            record["raw"] = self.client.redact(raw)[:2000]
        return record


class SyntheticDescriber:
    """Templated descriptions from the synthetic corpus's hidden class (no model, instant)."""

    def __init__(self, seed: int = 0) -> None:
        from vaemo_dist.text import synthetic

        self.seed = seed
        self.prompt_version, self.model = synthetic.PROMPT_VERSION, synthetic.MODEL

    def __call__(self, key: str, sample: dict[str, Any]) -> dict[str, Any]:
        from vaemo_dist.text.synthetic import describe_synthetic_clip

        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError, TypeError) as e:
            return {"key": key, "status": "failed", "error": f"no usable json metadata: {e}",
                    "prompt_version": self.prompt_version, "model": self.model, "attempts": 0}
        if "label" not in meta and "class_name" not in meta:
            return {"key": key, "status": "failed", "error": "json metadata has no label/class_name",
                    "prompt_version": self.prompt_version, "model": self.model, "attempts": 0}
        return describe_synthetic_clip(key, meta, self.seed)


# --------------------------------------------------------------------------------------------
# The cache


def is_done(record: dict[str, Any] | None, prompt_version: str, model: str) -> bool:
    return (record is not None and record.get("status") == "ok"
            and record.get("prompt_version") == prompt_version and record.get("model") == model)


class CacheWriter:
    """Appends one JSON line per result with a single write on an O_APPEND descriptor, so a killed
    run leaves whole lines (at worst one torn last line, which read_cache skips)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        if size:  # end a torn last line, so the next record starts a line of its own
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------------------------
# Running over shards


def iter_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    from vaemo_dist.data.shards import read_shard

    for url in urls:
        yield from read_shard(url)


def list_keys(urls: list[str]) -> list[str]:
    keys, seen = [], set()
    for sample in iter_samples(urls):
        key = sample["__key__"]
        if key in seen:
            log.warning("key %s appears more than once in the shards: the first one is used", key)
            continue
        seen.add(key)
        keys.append(key)
    return keys


def select_keys(keys: list[str], count: int = 0, fraction: float = 1.0, seed: int = 0) -> set[str]:
    """A seeded subset: `count` keys if count > 0, else round(fraction * len(keys)) (at least one)."""
    if count < 0 or not 0.0 < fraction <= 1.0:
        raise ValueError("need count >= 0 and 0 < fraction <= 1")
    n = min(len(keys), count) if count > 0 else max(1, round(fraction * len(keys)))
    if n >= len(keys):
        return set(keys)
    return set(random.Random(seed).sample(sorted(keys), n))


@dataclass
class Summary:
    selected: int = 0
    cached: int = 0  # already described by an earlier run (no request made)
    described: int = 0  # described by this run
    failed: int = 0
    requests: int = 0
    elapsed_s: float = 0.0
    prompt_version: str = ""
    model: str = ""
    out: str = ""

    def line(self) -> str:
        return (f"{self.selected} selected: {self.cached} from the cache, {self.described} described, "
                f"{self.failed} failed ({self.requests} requests, {self.elapsed_s:.1f}s); "
                f"written to {self.out}")


def holds_described_set(folder: str | Path) -> bool:
    """True if `folder` holds a described set (vaemo-describe output): its description cache, or a
    manifest of the described format."""
    folder = Path(folder)
    if (folder / CACHE).is_file():
        return True
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def holds_synthetic_described(folder: str | Path) -> bool:
    """True if `folder` holds a finished templated (synthetic) described set: such a folder, written
    before folders were marked with their owner, is adopted as the synthetic described set's own."""
    from vaemo_dist.text import synthetic

    try:
        built = json.loads((Path(folder) / SUCCESS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(built, dict) and built.get("model") == synthetic.MODEL \
        and built.get("prompt_version") == synthetic.PROMPT_VERSION


def claim_described_dir(out_dir: str | Path, writer: str = WRITER, *, overwrite: bool = False,
                        flag: str = "--overwrite") -> Path:
    """Make `out_dir` `writer`'s output folder (fsutil.claim_output_dir), or raise FolderInUseError
    with nothing changed. An unmarked folder of that writer's older output is adopted: a described set
    for vaemo-describe, a templated one for the synthetic described set."""
    out = Path(out_dir)
    adopt = holds_synthetic_described(out) if writer == SYNTHETIC_WRITER else holds_described_set(out)
    return claim_output_dir(out, writer, overwrite=overwrite, flag=flag, adopt=adopt)


def describe_shards(urls: list[str], out_dir: str | Path, describer: Any, *, count: int = 0,
                    fraction: float = 1.0, seed: int = 0, concurrency: int = 4, clips_per_shard: int = 100,
                    progress: bool = True, writer: str = WRITER, overwrite: bool = False) -> Summary:
    """Describe the selected clips of `urls` (resuming from the cache) and write the sidecar set.

    `out_dir` is claimed for `writer` first (claim_described_dir): a non-empty folder it did not create
    raises fsutil.FolderInUseError before anything is written, unless `overwrite` (moved aside)."""
    start = time.perf_counter()
    out = claim_described_dir(out_dir, writer, overwrite=overwrite)
    (out / SUCCESS).unlink(missing_ok=True)
    version, model = describer.prompt_version, describer.model
    selected = select_keys(list_keys(urls), count, fraction, seed)
    cache = read_cache(out / CACHE)
    todo = {k for k in selected if not is_done(cache.get(k), version, model)}
    summary = Summary(selected=len(selected), cached=len(selected) - len(todo), prompt_version=version,
                      model=model, out=str(out))
    log.info("describing %d of %d selected clips (%d cached) with %s / %s", len(todo), len(selected),
             summary.cached, model, version)

    writer = CacheWriter(out / CACHE)
    bar = tqdm(total=len(selected), initial=summary.cached, desc="describe", unit="clip",
               disable=not progress)

    def finish(record: dict[str, Any]) -> None:
        writer.append(record)
        cache[record["key"]] = record
        if record.get("status") == "ok":
            summary.described += 1
        else:
            summary.failed += 1
            log.warning("%s failed: %s", record["key"], record.get("error", "?"))
        bar.update(1)
        bar.set_postfix(ok=summary.described, failed=summary.failed)

    def run_one(key: str, sample: dict[str, Any]) -> dict[str, Any]:
        try:
            record = describer(key, sample)
        except Exception as e:  # noqa: BLE001 - one clip's trouble must not stop the run
            record = {"key": key, "status": "failed", "error": f"{type(e).__name__}: {e}",
                      "prompt_version": version, "model": model, "attempts": 0}
        record.setdefault("time", time.time())
        return record

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            pending: set[Future] = set()
            for sample in iter_samples(urls) if todo else ():
                key = sample["__key__"]
                if key not in todo:
                    continue
                todo.discard(key)  # a repeated key is described once
                pending.add(pool.submit(run_one, key, sample))
                # A bounded number in flight: samples (media bytes) are not all held at once.
                while len(pending) >= 2 * max(1, concurrency):
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        finish(f.result())
            for f in pending:
                finish(f.result())
    finally:
        bar.close()
        writer.close()
    summary.requests = getattr(getattr(describer, "client", None), "requests_made", 0)

    write_sidecar(urls, out, {k: cache[k] for k in selected if is_done(cache.get(k), version, model)},
                  clips_per_shard, source_record={"prompt_version": version, "model": model})
    summary.elapsed_s = time.perf_counter() - start
    write_atomic(out / SUMMARY, json.dumps(asdict(summary), indent=2))
    write_atomic(out / SUCCESS, json.dumps({"prompt_version": version, "model": model, "count": count,
                                             "fraction": fraction, "seed": seed, "sources": _sources(urls)},
                                            sort_keys=True))
    return summary


def _sources(urls: list[str]) -> list[str]:
    from vaemo_dist.data.storage import redact

    return [redact(u) for u in urls]


def desc_record(record: dict[str, Any]) -> dict[str, Any]:
    """What goes into <key>.desc.json: the description and how it was made."""
    keep = ("key", "description", "emotion", "intensity", "reasoning", "prompt_version", "prompt_sha256",
            "model", "n_frames", "audio")
    return {k: record[k] for k in keep if k in record}


def write_sidecar(urls: list[str], out: Path, records: dict[str, dict[str, Any]], clips_per_shard: int,
                  source_record: dict[str, Any]) -> list[str]:
    """Copy the media of the described clips into `out`'s shards, each with its <key>.desc.json."""
    written: set[str] = set()
    with ShardWriter(out, clips_per_shard) as shard_set:
        for sample in iter_samples(urls) if records else ():
            key = sample["__key__"]
            if key not in records or key in written:
                continue
            entry = {k: v for k, v in sample.items() if not k.startswith("__") and k != DESC_EXT}
            entry["__key__"] = key
            entry[DESC_EXT] = json.dumps(desc_record(records[key]), ensure_ascii=False,
                                         sort_keys=True).encode()
            shard_set.write(entry)
            written.add(key)
    shards, counts = shard_set.shards, shard_set.counts
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "shards": shards,
                "samples_per_shard": counts, "total": sum(counts), "sources": _sources(urls), **source_record}
    shard_set.write_manifest(manifest, name=MANIFEST)
    return shards


def described_is_complete(out_dir: str | Path, expected: dict[str, Any]) -> bool:
    """True if `out_dir` holds a finished described set made with the settings in `expected`."""
    try:
        built = json.loads((Path(out_dir) / SUCCESS).read_text())
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return built == expected and all((Path(out_dir) / s).is_file() for s in manifest.get("shards", []))


def ensure_synthetic_described(source: str | Path, out_dir: str | Path, *, count: int = 0,
                               fraction: float = 1.0, seed: int = 0, clips_per_shard: int = 16,
                               progress: bool = True) -> Path:
    """The templated described set of a synthetic corpus in `out_dir`, built unless already complete."""
    from vaemo_dist.data.shards import expand_shards

    out = Path(out_dir)
    urls = expand_shards(str(source))
    describer = SyntheticDescriber(seed)
    expected = {"prompt_version": describer.prompt_version, "model": describer.model, "count": count,
                "fraction": fraction, "seed": seed, "sources": _sources(urls)}
    if described_is_complete(out, expected):  # nothing to write (the folder may be read-only)
        return out
    claim_described_dir(out, SYNTHETIC_WRITER)  # refused before the lock file is made, if not ours
    with folder_lock(out):
        if not described_is_complete(out, expected):
            summary = describe_shards(urls, out, describer, count=count, fraction=fraction, seed=seed,
                                      concurrency=1, clips_per_shard=clips_per_shard, progress=progress,
                                      writer=SYNTHETIC_WRITER)
            log.info("synthetic descriptions: %s", summary.line())
    return out


# --------------------------------------------------------------------------------------------
# Command line (registered as `vaemo-describe`)


def _parser() -> argparse.ArgumentParser:
    e, m = EndpointSettings(), MediaSettings()
    p = argparse.ArgumentParser(prog="vaemo-describe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="source shards: a folder, a brace pattern, a comma list or a manifest.json")
    p.add_argument("--out", required=True,
                   help="output folder (cache, sidecar shards, summary): new, empty, or an earlier "
                        "vaemo-describe output (resumed)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="--out is a non-empty folder vaemo-describe did not create: move it aside to "
                        "<out>.old-<timestamp> (never deleted) and describe into a fresh one")
    p.add_argument("--config", help="YAML file with any of the long options below (e.g. base_url, model)")
    p.add_argument("--synthetic", action="store_true", default=None,
                   help="templated descriptions from the synthetic corpus's hidden class; no endpoint")
    g = p.add_argument_group("endpoint (also $VAEMO_LLM_BASE_URL, $VAEMO_LLM_MODEL)")
    g.add_argument("--base-url", default=None, help=f"OpenAI-compatible API root (default {e.base_url})")
    g.add_argument("--model", default=None, help="model name as the server knows it")
    g.add_argument("--api-key", default=None,
                   help="API key (prefer $VAEMO_LLM_API_KEY or $OPENAI_API_KEY: arguments show up in ps)")
    g.add_argument("--timeout", type=float, default=None, help=f"seconds per request (default {e.timeout_s})")
    g.add_argument("--attempts", type=int, default=None, help=f"tries per clip (default {e.max_attempts})")
    g.add_argument("--backoff", type=float, default=None,
                   help=f"first retry wait in seconds, doubling (default {e.backoff_s})")
    g.add_argument("--max-tokens", type=int, default=None, help=f"default {e.max_tokens}")
    g.add_argument("--temperature", type=float, default=None, help=f"default {e.temperature}")
    g.add_argument("--json-mode", action="store_true", default=None,
                   help="ask for response_format json_object")
    g.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 4)")
    g = p.add_argument_group("prompt and media")
    g.add_argument("--prompt", default=None,
                   help=f"prompt version (vaemo_dist/text/prompts/<v>.yaml) or file "
                        f"(default {DEFAULT_PROMPT})")
    g.add_argument("--frames", type=int, default=None, help=f"frames per clip (default {m.frames})")
    g.add_argument("--frame-size", type=int, default=None,
                   help=f"longest side in pixels (default {m.frame_size})")
    g.add_argument("--image-format", choices=["jpeg", "png"], default=None)
    g.add_argument("--no-audio", action="store_true", default=None, help="frames only (VL-only models)")
    g.add_argument("--audio-format", choices=["wav", "flac"], default=None)
    g.add_argument("--max-audio-seconds", type=float, default=None)
    g = p.add_argument_group("selection and output")
    g.add_argument("--count", type=int, default=None, help="describe this many clips (seeded choice)")
    g.add_argument("--fraction", type=float, default=None, help="describe this share of the clips (seeded)")
    g.add_argument("--seed", type=int, default=None, help="subset seed (default 0)")
    g.add_argument("--clips-per-shard", type=int, default=None, help="sidecar shard size (default 100)")
    g.add_argument("--embed", action="store_true", default=None,
                   help="also compute the text embeddings (vaemo-embed-text) when done")
    g.add_argument("--text-encoder", default=None, help="for --embed (default all-MiniLM-L6-v2)")
    g.add_argument("--no-progress", action="store_true", default=None)
    return p


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """CLI over environment over --config file over defaults."""
    opts: dict[str, Any] = {}
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if "api_key" in data:
            raise SystemExit("vaemo-describe: do not put api_key in a config file; use $VAEMO_LLM_API_KEY")
        opts.update({k.replace("-", "_"): v for k, v in data.items()})
    for env, name in (("VAEMO_LLM_BASE_URL", "base_url"), ("VAEMO_LLM_MODEL", "model")):
        if os.environ.get(env):
            opts[name] = os.environ[env]
    opts.update({k: v for k, v in vars(args).items() if v is not None})
    return opts


@entry_point("vaemo-describe")
def main(argv: list[str] | None = None) -> int:
    p = _parser()
    opts = _options(p.parse_args(argv))
    from vaemo_dist.data.shards import ShardError, expand_shards

    try:
        urls = expand_shards(str(opts["shards"]))
    except ShardError as e:
        return fail(f"vaemo-describe: {e}")
    if Path(opts["out"]).resolve() in {Path(u).resolve().parent for u in urls if "://" not in u}:
        p.error("--out must not be the folder of the source shards")
    try:  # before any request: a folder of someone else's is refused with nothing changed
        claim_described_dir(opts["out"], WRITER, overwrite=bool(opts.get("overwrite")))
    except FolderInUseError as e:
        return fail(f"vaemo-describe: {e}")
    if opts.get("synthetic"):
        describer: Any = SyntheticDescriber(int(opts.get("seed", 0)))
    else:
        if not opts.get("model"):
            p.error("--model (or $VAEMO_LLM_MODEL) is required unless --synthetic")
        e = EndpointSettings()
        settings = EndpointSettings(
            base_url=opts.get("base_url", e.base_url), model=opts["model"],
            api_key=opts.get("api_key") or api_key_from_env(),
            timeout_s=float(opts.get("timeout", e.timeout_s)),
            max_attempts=int(opts.get("attempts", e.max_attempts)),
            backoff_s=float(opts.get("backoff", e.backoff_s)),
            max_tokens=int(opts.get("max_tokens", e.max_tokens)),
            temperature=float(opts.get("temperature", e.temperature)),
            json_mode=bool(opts.get("json_mode", False)))
        m = MediaSettings()
        media_settings = MediaSettings(
            frames=int(opts.get("frames", m.frames)), frame_size=int(opts.get("frame_size", m.frame_size)),
            image_format=str(opts.get("image_format", m.image_format)), audio=not opts.get("no_audio", False),
            audio_format=str(opts.get("audio_format", m.audio_format)),
            max_audio_seconds=float(opts.get("max_audio_seconds", m.max_audio_seconds)))
        template = load_prompt(str(opts.get("prompt", DEFAULT_PROMPT)))
        log.info("endpoint %s, model %s, prompt %s, key %s", safe_url(settings.base_url), settings.model,
                 template.version, "set" if settings.api_key else "not set")
        describer = LLMDescriber(ChatClient(settings), template, media_settings)
    summary = describe_shards(
        urls, opts["out"], describer, count=int(opts.get("count", 0)),
        fraction=float(opts.get("fraction", 1.0)), seed=int(opts.get("seed", 0)),
        concurrency=int(opts.get("concurrency", 4)),
        clips_per_shard=int(opts.get("clips_per_shard", 100)), progress=not opts.get("no_progress", False))
    print(f"vaemo-describe: {summary.line()}", file=sys.stderr)
    if opts.get("embed"):
        from vaemo_dist.text.encode import DEFAULT_ENCODER, write_embeddings

        try:
            path, _ = write_embeddings(opts["out"], str(opts.get("text_encoder", DEFAULT_ENCODER)),
                                       overwrite=bool(opts.get("overwrite")))
        except FolderInUseError as e:
            return fail(f"vaemo-describe: {e}")
        print(f"vaemo-describe: text embeddings in {path}", file=sys.stderr)
    return 0 if summary.described + summary.cached > 0 or summary.selected == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
