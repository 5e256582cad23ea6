"""launchers/stage1.py with a probe, for the elastic-resume tests (same arguments, any launcher).

With VAEMO_TEST_DUMP=<folder>, rank 0 writes the engine's full fp32 weights and Adam moments
(`w/<name>`, `m/<name>`, `v/<name>`) to `<folder>/saved-step<N>.safetensors` after the engine's part of
every checkpoint the trainer saves, and to `<folder>/loaded-step<N>.safetensors` right after it loads
one (N: the step), with the optimizer's parameter groups (all but their tensors) and Adam step counts in a
`.json` beside it. Under tensor parallelism the ranks' pieces are gathered and joined by the TP plan
(`unshard`), so the dumps are full tensors whatever the layout.

The `.json` also holds `probe_loss`: the stage-1 loss of the model as it is at that moment on a fixed
batch (seeded, the same on every rank) with fixed masks (the torch RNG seeded for it, then put back),
each rank counting only its own copy in the contrastive term: a forward the same for every layout, to
compare the loss a resharded model computes with the loss the saving layout computed.
Every torch.load of the run must be weights-only: one that is not fails the run.
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402

from vaemo_dist.model.parallelize import unshard  # noqa: E402
from vaemo_dist.stages import run  # noqa: E402
from vaemo_dist.stages.stage1 import Stage1  # noqa: E402
from vaemo_dist.train import checkpoint  # noqa: E402

DUMP = Path(os.environ["VAEMO_TEST_DUMP"])
_real_torch_load = torch.load


def _weights_only_load(*args, **kwargs):
    if kwargs.get("weights_only", True) is False:
        raise RuntimeError(f"torch.load(weights_only=False) of {args[:1]}: unpickles freely")
    return _real_torch_load(*args, **kwargs)


torch.load = _weights_only_load


STAGE: list = []  # the Stage1 of this run (its config), kept by build_model below
_SINGLES: dict = {}  # one process group per rank, for the probe's contrastive term


def _keep_stage(real):
    def build_model(self, info):
        STAGE[:] = [self]
        return real(self, info)
    return build_model


Stage1.build_model = _keep_stage(Stage1.build_model)


def _tp_group():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group() \
        if parallel_state.get_tensor_model_parallel_world_size() > 1 else None


def _tp_full(name: str, t: torch.Tensor) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's piece (collective over the TP group)."""
    group = _tp_group()
    if group is None:
        return t
    pieces = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(pieces, t.contiguous(), group=group)
    return unshard(name, pieces)


def probe_loss(engine) -> float:
    """Collective: the stage-1 loss on the fixed probe batch (see the module's docstring)."""
    from vaemo_dist.objectives.stage1 import Stage1Objective

    cfg = STAGE[0].cfg
    if not _SINGLES:
        world = torch.distributed.get_world_size()
        _SINGLES.update({r: torch.distributed.new_group([r], backend="gloo") for r in range(world)})
    v, a = cfg.inputs.video, cfg.inputs.audio
    g = torch.Generator().manual_seed(20261207)
    video = torch.randn(4, 3, v.frames, v.size, v.size, generator=g)
    audio = torch.randn(4, 1, a.frames, a.n_mels, generator=g)
    objective = Stage1Objective(cfg.loss, group=_SINGLES[torch.distributed.get_rank()])
    kept = torch.get_rng_state()
    torch.manual_seed(7)
    try:
        with torch.no_grad():
            loss, _ = objective(engine.module(video, audio))
    finally:
        torch.set_rng_state(kept)
    return float(loss)


def dump(engine, name: str) -> None:
    """Collective (ZeRO and tensor-parallel gathers): every rank calls it, rank 0 writes."""
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
            out[f"{key}/{n}"] = _tp_full(n, t.detach().float().cpu().contiguous()).clone()
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's AdamW
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    steps = sorted({float(st["step"]) for st in base.state.values() if "step" in st})
    loss = probe_loss(engine)
    if torch.distributed.get_rank() == 0:
        DUMP.mkdir(parents=True, exist_ok=True)
        save_file(out, str(DUMP / f"{name}.safetensors"))
        (DUMP / f"{name}.json").write_text(json.dumps({"param_groups": groups, "adam_steps": steps,
                                                           "probe_loss": loss}))


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
