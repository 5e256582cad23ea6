"""Every entry point (each console script of setup.py and each launcher) goes through the one start-up
path (vaemo_dist/startup.py): secrets from the environment never reach its output, neither in the
one-line error it exits with (code 2) nor in a log line a library writes after the start-up ran."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.launching import REPO, run_env
from vaemo_dist.config import ConfigError
from vaemo_dist.secrets import MASK, SECRET_ENVS
from vaemo_dist.startup import entry_point, fail

# One planted value per secret variable vaemo_dist.secrets knows; the LLM key also names the input.
SECRETS = {name: f"planted-{name.lower().replace('_', '-')}-0123456789" for name in SECRET_ENVS}
KEY = SECRETS["VAEMO_LLM_API_KEY"]

# Runs one entry point (`module:function` called with the arguments, or a launcher file run as a
# script), then logs every secret the way a library would: the start-up path must have masked it.
DRIVER = r"""
import importlib, logging, os, runpy, sys

target, argv = sys.argv[1], sys.argv[2:]
try:
    if target.endswith(".py"):
        sys.argv = [target, *argv]
        runpy.run_path(target, run_name="__main__")
        code = 0
    else:
        module, _, name = target.partition(":")
        code = getattr(importlib.import_module(module), name)(argv)
except SystemExit as e:
    code = e.code
values = [os.environ[k] for k in sys.modules["vaemo_dist.secrets"].SECRET_ENVS]
logging.getLogger("some.library").warning("request failed with keys %s", values)
sys.exit(code)
"""


def _foreign_folder(tmp: Path) -> Path:
    """A non-empty folder of the user's, named by the key."""
    folder = tmp / f"{KEY}-mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


# Per entry point: arguments that fail fast, on an input whose name holds the key (so the error line
# holds it too).
CASES: dict[str, Callable[[Path], list[str]]] = {
    "vaemo-synth": lambda tmp: ["--out", str(_foreign_folder(tmp))],
    "vaemo-flops": lambda tmp: ["--config", str(tmp / f"{KEY}.yaml")],
    "vaemo-shard": lambda tmp: [str(tmp / KEY / "clips.csv"), "--out", str(tmp / "shards")],
    "vaemo-export": lambda tmp: [str(tmp / KEY), "--out", str(tmp / "export")],
    "vaemo-embed": lambda tmp: ["--model", str(tmp / KEY), "--input", str(tmp), "--out", str(tmp / "e.npz")],
    "vaemo-predict": lambda tmp: ["--model", str(tmp / KEY), "--input", str(tmp), "--out",
                                  str(tmp / "p.csv")],
    "vaemo-describe": lambda tmp: [str(tmp / KEY), "--out", str(tmp / "described"), "--synthetic"],
    "vaemo-embed-text": lambda tmp: [str(tmp / KEY / "described")],
    "vaemo-sweep": lambda tmp: ["plan", str(tmp / f"{KEY}.yaml")],
    "vaemo-plot": lambda tmp: [str(tmp / KEY)],
    "launchers/stage1.py": lambda tmp: ["--config", str(tmp / f"{KEY}.yaml")],
    "launchers/stage2.py": lambda tmp: ["--config", str(tmp / f"{KEY}.yaml")],
    "launchers/finetune.py": lambda tmp: ["--pretrained", str(tmp / KEY), "--data", str(tmp)],
}


def console_scripts() -> dict[str, str]:
    """setup.py's console scripts: name -> `module:function`."""
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"([\w-]+)=([\w.]+:\w+)"', text))


def entry_points() -> dict[str, str]:
    """Every entry point: console scripts (name -> target) and launchers (path -> path)."""
    launchers = [str(p.relative_to(REPO)) for p in (REPO / "launchers").glob("*.py")]
    return {**console_scripts(), **{path: path for path in launchers}}


def test_every_entry_point_has_a_case():
    assert len(console_scripts()) >= 10
    assert sorted(CASES) == sorted(entry_points())


@pytest.mark.parametrize("name", sorted(CASES))
def test_secrets_never_reach_the_output(name, tmp_path):
    target = entry_points()[name]
    proc = subprocess.run([sys.executable, "-c", DRIVER, target, *CASES[name](tmp_path)], cwd=REPO,
                          env=run_env(**SECRETS), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    for value in SECRETS.values():
        assert value not in text, text[-3000:]
    # The error line named the input (its key masked) and the library's line was logged, masked.
    logged = [line for line in text.splitlines() if "request failed with keys" in line]
    assert len(logged) == 1 and logged[0].count(MASK) == len(SECRETS), text[-3000:]
    said = [line for line in text.splitlines() if MASK in line and line not in logged]
    assert said, text[-3000:]
    assert "Traceback" not in text


def test_entry_point_says_a_known_error_once_masked_with_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    monkeypatch.delenv("RANK", raising=False)

    @entry_point("vaemo-test")
    def main(argv: list[str] | None = None) -> int:
        raise ConfigError(f"bad value {SECRETS['WANDB_API_KEY']}")

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err == f"vaemo-test: bad value {MASK}\n"
    # The mask is on the root logger's handlers (here: the test's own capture, which stays).
    assert any(type(f).__name__ == "MaskSecrets" for h in logging.getLogger().handlers for f in h.filters)


def test_only_rank_0_says_it(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    waited = []
    monkeypatch.setattr("vaemo_dist.startup.time.sleep", waited.append)
    assert fail("config error: x") == 2
    assert capsys.readouterr().err == "" and waited == [3]  # rank 0 says why before the launch ends
