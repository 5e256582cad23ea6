"""The versioned chain-of-thought prompt (vaemo_dist/text/prompts/*.yaml) and the parsing of its answers."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml

# Shipped inside the package (setup.py package_data), so a wheel install finds them too.
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPT = "affect_cot_v1"
REASONING_KEYS = ("facial", "vocal", "agreement")


class MalformedAnswer(ValueError):
    """The model's answer is not the JSON object the prompt asks for (retried, then recorded)."""


@dataclass(frozen=True)
class PromptTemplate:
    version: str
    system: str
    user: str
    audio_present: str
    audio_absent: str
    required_keys: tuple[str, ...]
    intensities: tuple[str, ...]
    sha256: str  # of the file's bytes: two files claiming one version can be told apart

    def render(self, *, n_frames: int, duration: float, with_audio: bool) -> tuple[str, str]:
        """(system text, user text) for one clip."""
        modalities = f"{n_frames} video frames" + (" and the audio track" if with_audio else "")
        user = Template(self.user).safe_substitute(
            n_frames=n_frames, duration=f"{duration:.1f}", modalities=modalities,
            audio_note=self.audio_present if with_audio else self.audio_absent)
        return self.system.strip(), user.strip()


def load_prompt(name_or_path: str = DEFAULT_PROMPT) -> PromptTemplate:
    """A prompt by version name (PROMPTS_DIR/<name>.yaml) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROMPTS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"prompt template not found: {path}")
    raw = path.read_bytes()
    data = yaml.safe_load(raw)
    missing = [k for k in ("version", "system", "user", "required_keys") if k not in data]
    if missing:
        raise ValueError(f"{path}: prompt template lacks {missing}")
    return PromptTemplate(
        version=str(data["version"]), system=str(data["system"]), user=str(data["user"]),
        audio_present=str(data.get("audio_present", "")), audio_absent=str(data.get("audio_absent", "")),
        required_keys=tuple(data["required_keys"]), intensities=tuple(data.get("intensities", ())),
        sha256=hashlib.sha256(raw).hexdigest())


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def parse_answer(text: str, template: PromptTemplate) -> dict[str, str]:
    """The JSON object of an answer, tolerating code fences and prose around it.

    Raises MalformedAnswer when there is no object, a required key is missing or empty, or a value
    is not text."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedAnswer("empty answer")
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise MalformedAnswer(f"no JSON object in the answer: {text[:120]!r}")
    try:
        obj: Any = json.loads(body[start : end + 1])
    except json.JSONDecodeError as e:
        raise MalformedAnswer(f"answer is not valid JSON ({e.msg}): {text[:120]!r}") from e
    if not isinstance(obj, dict):
        raise MalformedAnswer("answer is not a JSON object")
    out: dict[str, str] = {}
    for key in template.required_keys:
        value = obj.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # an intensity given as a number is still usable
        if not isinstance(value, str) or not value.strip():
            raise MalformedAnswer(f"answer lacks a non-empty string for {key!r}")
        out[key] = value.strip()
    if "intensity" in out and template.intensities:
        out["intensity"] = out["intensity"].lower()
    return out
