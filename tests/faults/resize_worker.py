"""launchers/stage1.py with a probe, for the elastic-resume tests (same arguments, any launcher).

With VAEMO_TEST_DUMP=<folder>, rank 0 writes the engine's full fp32 weights and Adam moments
(`w/<name>`, `m/<name>`, `v/<name>`) to `<folder>/saved-step<N>.safetensors` after the engine's part of
every checkpoint the trainer saves, and to `<folder>/loaded-step<N>.safetensors` right after it loads
one (N: the step), with the optimizer's parameter groups (all but their tensors) and Adam step counts in a
`.json` beside it. Every torch.load of the run must be weights-only: one that is not fails the run.
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402

from vaemo_dist.stages import run  # noqa: E402
from vaemo_dist.train import checkpoint  # noqa: E402

DUMP = Path(os.environ["VAEMO_TEST_DUMP"])
_real_torch_load = torch.load


def _weights_only_load(*args, **kwargs):
    if kwargs.get("weights_only", True) is False:
        raise RuntimeError(f"torch.load(weights_only=False) of {args[:1]}: unpickles freely")
    return _real_torch_load(*args, **kwargs)


torch.load = _weights_only_load


def dump(engine, name: str) -> None:
    """Collective (ZeRO gathers): every rank calls it, rank 0 writes."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    out = {}
    for n, p in engine.module.named_parameters():
        w = safe_get_full_fp32_param(p)
        if w is None:  # ZeRO-0: the module holds the weights, torch's AdamW the moments
            state = engine.optimizer.state[p]
            w, m, v = p.detach(), state["exp_avg"], state["exp_avg_sq"]
        elif not hasattr(p, "ds_id"):  # ZeRO-1/2 (ZeRO-3 parameters have a ds_id)
            m, v = _zero12_state(engine, p, "exp_avg"), _zero12_state(engine, p, "exp_avg_sq")
        else:
            m, v = safe_get_full_optimizer_state(p, "exp_avg"), safe_get_full_optimizer_state(p, "exp_avg_sq")
        for key, t in (("w", w), ("m", m), ("v", v)):
            out[f"{key}/{n}"] = t.detach().float().cpu().contiguous().clone()
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's AdamW
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    steps = sorted({float(st["step"]) for st in base.state.values() if "step" in st})
    if torch.distributed.get_rank() == 0:
        DUMP.mkdir(parents=True, exist_ok=True)
        save_file(out, str(DUMP / f"{name}.safetensors"))
        (DUMP / f"{name}.json").write_text(json.dumps({"param_groups": groups, "adam_steps": steps}))


def _zero12_state(engine, p, key: str) -> torch.Tensor:
    """A ZeRO-1/2 parameter's full optimizer state `key`, read from the flat partitions. (DeepSpeed's
    safe_get_full_optimizer_state knows the moments only once it has linked them, after a load.)"""
    full = torch.zeros(p.numel(), dtype=torch.float32)
    hp = getattr(p, "_hp_mapping", None)
    if hp is not None:  # this rank holds a piece of it
        flat = engine.optimizer.single_partition_of_fp32_groups[hp.param_group_index]
        state = engine.optimizer.optimizer.state[flat][key]
        piece = state.narrow(0, hp.hp_fragment_address.start, hp.hp_fragment_address.numel)
        full.narrow(0, hp.lp_fragment_address.start, hp.lp_fragment_address.numel).copy_(piece)
    torch.distributed.all_reduce(full, group=p._dp_group)
    return full.reshape(p.shape)


def _after_save(real):
    def save(part, folder, rank):
        real(part, folder, rank)
        dump(part.engine, f"saved-step{int(folder.name.rsplit('_', 1)[1])}")  # .tmp-step_00000004
    return save


def _after_load(real):
    def load(part, folder, rank):
        real(part, folder, rank)
        dump(part.engine, f"loaded-step{part.engine.global_steps}")
    return load


# The engine's part of every checkpoint, saved and loaded (the same-size and the resize paths alike).
checkpoint.EngineState.save = _after_save(checkpoint.EngineState.save)
checkpoint.EngineState.load = _after_load(checkpoint.EngineState.load)

if __name__ == "__main__":
    run("stage1")
