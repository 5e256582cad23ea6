"""A shard spec that yields no shards (an empty folder, e.g. vaemo-shard skipped every input; a folder of
other files; a pattern matching nothing) stops a launch before work starts: one line on stderr naming
the folder and what to do, exit code 2, no traceback (vaemo_dist/launch.py: check_local_shards, and the
ShardError case of run_stage; the messages: vaemo_dist/data/shards.py)."""

import json
import subprocess
import time

import pytest

from tests.launching import REPO, output, run_stage1
from vaemo_dist.config import load_config
from vaemo_dist.data.shards import ShardError, expand_shards
from vaemo_dist.launch import check_local_shards


def _error(spec: str, key: str = "data.shards") -> str:
    with pytest.raises(ShardError) as e:
        expand_shards(spec, key)
    text = str(e.value)
    assert "\n" not in text, text  # said as one line
    return text


def _said(proc: subprocess.CompletedProcess) -> list[str]:
    """The non-empty stderr lines, with the accelerator notice DeepSpeed prints on a CPU-only machine
    left out (it is DeepSpeed's import, not our start-up)."""
    return [line for line in proc.stderr.splitlines()
            if line.strip() and "Setting accelerator to CPU" not in line]


# -- the launch, end to end ------------------------------------------------------------------------------


def test_an_empty_shard_folder_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "shards"
    empty.mkdir()
    run = tmp_path / "runs" / "r"
    start = time.monotonic()
    proc = run_stage1(run, empty, 1, timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 2, output(proc)[-3000:]
    assert "Traceback" not in output(proc)
    lines = _said(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert str(empty) in line and "is empty" in line, line
    assert "point data.shards at a folder of WebDataset *.tar shards" in line, line
    assert f"vaemo-shard <your videos or CSV> --out {empty}" in line, line
    assert not run.parent.exists()  # said before any work: not even the run folder
    assert took < 30, took


def test_a_folder_vaemo_shard_left_without_shards_names_its_report(tmp_path):
    """What vaemo-shard leaves when it skipped every input: manifest.json with no shards and
    report.json. The launch says so, with the --overwrite way to make them again."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"shards": [], "samples_per_shard": [], "total": 0,
                                                   "skipped": 3}))
    (out / "report.json").write_text("{}")
    proc = run_stage1(tmp_path / "runs" / "r", out, 1, timeout=60)
    assert proc.returncode == 2, output(proc)[-3000:]
    assert "Traceback" not in output(proc)
    lines = _said(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "vaemo-shard wrote no shards there, it skipped all 3 inputs" in lines[0], lines[0]
    assert str(out / "report.json") in lines[0] and f"--out {out} --overwrite" in lines[0], lines[0]


def test_the_listing_after_prepare_is_one_line_too(tmp_path):
    """The safety net inside run_stage: shards listed after the process group (here a synthetic corpus
    folder whose preparation a probe stage skips) that yield none: one line, exit 2, no traceback."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from vaemo_dist.launch import run_stage\n"
        "from vaemo_dist.stages.stage1 import Stage1\n\n\n"
        "class NoPrepare(Stage1):\n"
        "    def prepare(self):\n"
        "        pass\n\n\n"
        "run_stage(NoPrepare)\n")
    synth = tmp_path / "synth"
    proc = run_stage1(tmp_path / "runs" / "r", "synthetic", 1, f"data.synth.dir={synth}", timeout=60,
                      script=str(probe))
    assert proc.returncode == 2, output(proc)[-3000:]
    assert "Traceback" not in output(proc)
    said = [line for line in output(proc).splitlines() if "no *.tar shards in folder" in line]
    assert len(said) == 1 and str(synth) in said[0], output(proc)[-3000:]


# -- the messages ----------------------------------------------------------------------------------------


def test_a_folder_of_other_files_names_them(tmp_path):
    for name in ("notes.txt", "a.json", "b.log", "c.md"):
        (tmp_path / name).write_text("x")
    text = _error(str(tmp_path))
    assert f"no *.tar shards in folder {tmp_path}" in text
    assert "it holds 4 files, none *.tar (a.json, b.log, c.md, ...)" in text, text
    assert f"--out {tmp_path}" in text


def test_shards_one_level_down_are_pointed_at(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-000000.tar").write_bytes(b"")
    text = _error(str(tmp_path), "eval.shards")
    assert f"set eval.shards={tmp_path / 'train'}" in text, text


def test_a_pattern_matching_nothing_says_what_its_folder_holds(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"")
    (tmp_path / "train-000001.tar").write_bytes(b"")
    text = _error(str(tmp_path / "val-*.tar"))
    assert text.startswith(f"shard pattern matched nothing: {tmp_path / 'val-*.tar'}"), text
    assert f"its folder {tmp_path} holds 2 *.tar shards; set data.shards={tmp_path}" in text, text
    text = _error(str(tmp_path / "gone" / "*.tar"))
    assert f"its folder {tmp_path / 'gone'} does not exist" in text, text
    (tmp_path / "other").mkdir()
    text = _error(str(tmp_path / "other" / "*.tar"))
    assert f"its folder {tmp_path / 'other'} holds no *.tar shards" in text and "vaemo-shard" in text, text


def test_a_manifest_listing_no_shards_says_every_input_was_skipped(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [], "skipped": 2}))
    text = _error(str(tmp_path / "manifest.json"))
    assert "names no shards" in text and "every input was skipped" in text and "--overwrite" in text, text


def test_check_local_shards_checks_what_the_launch_will_read(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    good = tmp_path / "good"
    good.mkdir()
    (good / "shard-000000.tar").write_bytes(b"")
    cfg = load_config(REPO / "configs/stage1/tiny.yaml", [f"data.shards={good}", "eval.every=0"])
    assert check_local_shards(cfg) is None
    cfg.data.shards = f"{good},s3://bucket/a-{{0..1}}.tar"  # remote items: Stage.check_storage's, not listed
    assert check_local_shards(cfg) is None
    cfg.data.shards = f"{good},{empty}"
    assert f"no *.tar shards in folder {empty}" in (check_local_shards(cfg) or "")
    cfg.data.shards, cfg.eval.shards = str(good), str(empty)
    assert check_local_shards(cfg) is None  # eval.every=0: eval.shards is never read
    cfg.eval.every = 5
    problem = check_local_shards(cfg) or ""
    assert problem.startswith(f"no *.tar shards in folder {empty} (from eval.shards="), problem
    cfg.data.shards, cfg.eval.shards = "synthetic", "auto"  # built or chosen later
    assert check_local_shards(cfg) is None


def test_two_processes_say_it_once(tmp_path):
    empty = tmp_path / "shards"
    empty.mkdir()
    proc = run_stage1(tmp_path / "runs" / "r", empty, 2, timeout=120)
    assert proc.returncode == 2, output(proc)[-3000:]
    assert "Traceback" not in output(proc)
    assert output(proc).count(f"no *.tar shards in folder {empty}") == 1, output(proc)[-3000:]
