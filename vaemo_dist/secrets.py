"""Keeping credentials out of logs, saved configs and exception messages.

Credentials reach us from the environment (AWS chain, wandb, the LLM client) and, sometimes, inside
URLs (user info, presigned query strings). Two measures, both cheap:
* `redact_url` / `redact_config` strip user info, query and fragment from URLs before they are
  written anywhere (messages, the config saved with checkpoints, the wandb run config).
* `MaskSecrets`, a logging filter installed by the launcher, replaces the values of the known
  secret environment variables in every log record, in case a library puts one into a message.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SECRET_ENVS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY", "VAEMO_LLM_API_KEY",
               "OPENAI_API_KEY", "HF_TOKEN")
MASK = "[redacted secret]"


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment (where keys and signatures sit); paths unchanged."""
    if "://" not in url or url.startswith("file://"):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact_config(value: Any) -> Any:
    """A copy of a config dict whose URL strings (also inside comma lists) are redacted."""
    if isinstance(value, dict):
        return {k: redact_config(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_config(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return ",".join(redact_url(part) for part in value.split(","))
    return value


def secret_values() -> list[str]:
    # Short values would mask ordinary words; real keys are long.
    return [v for k in SECRET_ENVS if len(v := os.environ.get(k, "")) >= 8]


def mask_secrets(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret value (default: those of the environment now) replaced by MASK."""
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, MASK)
    return text


class MaskSecrets(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets = secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            masked = mask_secrets(message, self.secrets)
            if masked != message:
                record.msg, record.args = masked, None
        return True


def install_log_masking() -> None:
    """Mask secrets in everything the root logger's handlers write."""
    mask = MaskSecrets()
    for handler in logging.getLogger().handlers:
        handler.addFilter(mask)
