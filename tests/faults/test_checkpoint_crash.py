import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ckpt_worker.py")
REPO = Path(__file__).resolve().parents[2]


def run(mode: str, stage: int, root: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(WORKER), mode, str(stage), str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_crash_during_save_leaves_previous_checkpoint_loadable_without_pickle(tmp_path, stage):
    saved = run("save", stage, tmp_path)
    assert saved.returncode == 9, saved.stderr[-3000:]  # died inside the second save
    assert (tmp_path / "latest").read_text() == "step_00000002"
    assert (tmp_path / ".tmp-step_00000003").is_dir() and not (tmp_path / "step_00000003").exists()

    loaded = run("load", stage, tmp_path)  # DeepSpeed files go through torch.load(weights_only=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    before, after = last_json(saved), last_json(loaded)
    assert after["folder"] == "step_00000002" and after["state"]["step"] == 2
    assert after["state"]["data"] == {"note": "two"}
    assert after["checksum"] == before["checksum"]
    assert after["next_loss"] == before["next_loss"]  # optimizer state and RNG came back too
