"""The ZeRO-1/2 keys deepspeed_config chooses (issue 19, `zero_tuning`): what they are, that
`train.deepspeed` still wins, that DeepSpeed accepts them, and that a real one-process engine trains
bit-identically with them and with DeepSpeed's defaults (they change copies, not arithmetic)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from vaemo_dist.config import load_config
from vaemo_dist.train.trainer import DS_REDUCE_BUCKET_DEFAULT, deepspeed_config, zero_tuning

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_get_in_place_all_reduce_and_a_bucket_fitted_to_the_model(stage):
    cfg = load_config(None, [f"train.zero_stage={stage}"])
    zero = deepspeed_config(cfg, 2, False, n_params=26_000_123)["zero_optimization"]
    assert zero == {"stage": stage, "reduce_scatter": False, "reduce_bucket_size": 26_000_123}
    DeepSpeedZeroConfig(**zero)  # DeepSpeed's own schema accepts them
    # Bigger than DeepSpeed's default: its default stays; no size known: DeepSpeed's bucket size.
    assert zero_tuning(stage, 10**10)["reduce_bucket_size"] == DS_REDUCE_BUCKET_DEFAULT
    assert zero_tuning(stage, None) == {"reduce_scatter": False}


@pytest.mark.parametrize("stage", [0, 3])
def test_other_stages_are_left_to_deepspeed(stage):
    cfg = load_config(None, [f"train.zero_stage={stage}"])
    assert deepspeed_config(cfg, 1, False, n_params=1000)["zero_optimization"] == {"stage": stage}


def test_train_deepspeed_overrides_the_tuned_keys():
    cfg = load_config(None, ["train.zero_stage=1", "train.deepspeed.zero_optimization.reduce_scatter=true",
                             "train.deepspeed.zero_optimization.reduce_bucket_size=1000"])
    zero = deepspeed_config(cfg, 1, False, n_params=5000)["zero_optimization"]
    assert zero == {"stage": 1, "reduce_scatter": True, "reduce_bucket_size": 1000}


_WORKER = r"""
import json, sys
import deepspeed, torch
from vaemo_dist.config import load_config
from vaemo_dist.train.schedule import build_optimizer
from vaemo_dist.train.trainer import deepspeed_config
out = {}
for stage, name in [(int(s), n) for s in sys.argv[1:] for n in ("ds_defaults", "tuned")]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 3))
    cfg = load_config(None, [f"train.zero_stage={stage}", "data.batch_size=4", "optim.clip_grad=0.05"])
    n = sum(p.numel() for p in model.parameters())
    ds = deepspeed_config(cfg, 1, False, n)
    if name == "ds_defaults":
        ds["zero_optimization"] = {"stage": stage}
    opt = build_optimizer(model, cfg.optim)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g)
        engine.backward(((engine(x) - y) ** 2).mean())
        engine.step()
    out.setdefault(stage, {})[name] = {
        "params": [p.detach().flatten().tolist() for p in model.parameters()],
        "bucket": int(opt.reduce_bucket_size), "reduce_scatter": bool(opt.reduce_scatter), "n": n}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def engine_runs() -> dict[str, dict]:
    """One worker process trains both stages' engines (one process start and DeepSpeed import, not two):
    {stage: {"ds_defaults": ..., "tuned": ...}}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _WORKER, "1", "2"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("stage", [1, 2])
def test_one_process_engine_trains_bit_identically_with_the_tuned_keys(engine_runs, stage):
    base, tuned = engine_runs[str(stage)]["ds_defaults"], engine_runs[str(stage)]["tuned"]
    assert base["bucket"] == DS_REDUCE_BUCKET_DEFAULT and base["reduce_scatter"] is True
    assert tuned["bucket"] == tuned["n"] and tuned["reduce_scatter"] is False  # the keys reached ZeRO
    assert tuned["params"] == base["params"]  # bit-identical after 3 clipped steps
