"""launchers/stage1.py with a probe, for the elastic-resume tests (same arguments, any launcher).

With VAEMO_TEST_DUMP=<folder>, rank 0 writes the engine's full fp32 weights and Adam moments
(`w/<name>`, `m/<name>`, `v/<name>`) to `<folder>/saved-step<N>.safetensors` after every checkpoint
the trainer saves, and to `<folder>/loaded-step<N>.safetensors` right after it loads one (N: the
step), with the optimizer's parameter groups (all but their tensors) and Adam step counts in a
`.json` beside it. Every torch.load of the run must be weights-only: one that is not fails the run.
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "launchers")]

import stage1  # noqa: E402 - launchers/stage1.py: its build()
import torch  # noqa: E402

from vaemo_dist.launch import run_stage  # noqa: E402
from vaemo_dist.train import trainer  # noqa: E402

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
    def save(engine, ckpt_root, step, *args, **kwargs):
        folder = real(engine, ckpt_root, step, *args, **kwargs)
        dump(engine, f"saved-step{step}")
        return folder
    return save


def _after_load(real):
    def load(engine, *args, **kwargs):
        result = real(engine, *args, **kwargs)
        dump(engine, f"loaded-step{engine.global_steps}")
        return result
    return load


trainer.save_checkpoint = _after_save(trainer.save_checkpoint)
trainer.load_checkpoint = _after_load(trainer.load_checkpoint)  # the same-size path
trainer.load_model_state = _after_load(trainer.load_model_state)  # the resize path

if __name__ == "__main__":
    run_stage("stage1", stage1.build, default_config="configs/stage1/tiny.yaml")
