"""Parallelism, applied to a built model by plain functions, in a fixed order:

1. tensor parallelism (megatron-core): in every transformer block, QKV and MLP-in become
   ColumnParallelLinear, attention-out and MLP-out become RowParallelLinear. Each rank keeps its
   heads and its slice of the MLP; one all-reduce after attention and one after the MLP.
2. activation checkpointing: each block is recomputed in the backward pass.
3. torch.compile: each encoder and decoder block (with its checkpoint wrapper, if any) is compiled in
   place with `nn.Module.compile()`, so parameter and state-dict names stay those of the eager model.
   Last, so that the compiled code is that of the final (sharded, checkpointed) block.

Data parallelism and ZeRO come from DeepSpeed (train/trainer.py), over the data-parallel group.
The model code itself knows nothing of either.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vaemo_dist.config import ParallelConfig
from vaemo_dist.model.vaemo import Block

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, parallel: ParallelConfig) -> nn.Module:
    if parallel.tensor > 1:
        apply_tensor_parallel(model, parallel.tensor)
    if parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if parallel.compile:
        apply_compile(model)
    return model


def _megatron_layers():
    """ColumnParallelLinear / RowParallelLinear that return only their output (megatron returns
    (output, bias)), so they drop in where nn.Linear was and keep its parameter names."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class Column(ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return Column, Row


def _megatron_config(tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # CPU initialisation keeps creation identical everywhere; the weights are overwritten with the
    # shards of the full layers below, so TP=N starts from exactly the TP=1 weights.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False, perform_initialization=True)


def _rows(full: nn.Linear, index: torch.Tensor, layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(full.weight[index])
        layer.bias.copy_(full.bias[index])
    return layer


def _cols(full: nn.Linear, index: torch.Tensor, layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(full.weight[:, index])
        layer.bias.copy_(full.bias)  # the row-parallel bias is added once, after the all-reduce
    return layer


def shard_indices(width: int, tp: int, rank: int, groups: int = 1) -> torch.Tensor:
    """Indices of rank `rank`'s slice of a width-`width` axis made of `groups` equal blocks
    (e.g. q|k|v) each split into `tp` contiguous parts."""
    block = width // groups
    part = block // tp
    return torch.cat([torch.arange(g * block + rank * part, g * block + (rank + 1) * part)
                      for g in range(groups)])


def apply_tensor_parallel(model: nn.Module, tp: int) -> None:
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    Column, Row = _megatron_layers()
    config = _megatron_config(tp)
    init = nn.init.zeros_
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        attn, (fc1, _, fc2) = block.attn, block.mlp
        dim, hidden = attn.proj.in_features, fc1.out_features
        # Heads stay whole on one rank: q, k and v of the same heads go to the same rank.
        head_cols = shard_indices(dim, tp, rank)
        qkv_rows = shard_indices(3 * dim, tp, rank, groups=3)
        attn.qkv = _rows(attn.qkv, qkv_rows, Column(dim, 3 * dim, config=config, init_method=init, bias=True,
                                                    gather_output=False))
        attn.proj = _cols(attn.proj, head_cols,
                          Row(dim, dim, config=config, init_method=init, bias=True, input_is_parallel=True,
                              skip_bias_add=False))
        attn.heads //= tp
        mlp_cols = shard_indices(hidden, tp, rank)
        block.mlp[0] = _rows(fc1, mlp_cols, Column(dim, hidden, config=config, init_method=init, bias=True,
                                                   gather_output=False))
        block.mlp[2] = _cols(fc2, mlp_cols, Row(hidden, dim, config=config, init_method=init, bias=True,
                                                input_is_parallel=True, skip_bias_add=False))
    log.info("tensor parallel: %d blocks split %d ways (rank %d)", len(blocks), tp, rank)


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as wrap,
    )

    # Non-reentrant checkpointing; the wrapper keeps state-dict names unchanged.
    wrap(model, check_fn=lambda m: isinstance(m, Block))


def apply_compile(model: nn.Module) -> None:
    """torch.compile every transformer block in place (`nn.Module.compile`: the module keeps its
    parameters and names; its calls go through the compiled forward). A checkpoint-wrapped block is
    compiled with its wrapper, so the recomputation is part of the compiled graph."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    def is_block(m: nn.Module) -> bool:
        return isinstance(m, Block) or (isinstance(m, CheckpointWrapper)
                                        and isinstance(m._checkpoint_wrapped_module, Block))

    # The outermost module at each block position: a wrapped Block is compiled once, through its wrapper.
    blocks = [child for parent in model.modules() if not is_block(parent)
              for child in parent.children() if is_block(child)]
    from vaemo_dist.model.attention import flash_functions

    flash_functions()  # the flash-attn import resolved (and cached) now, not inside the first traced call
    for block in blocks:
        block.compile()
    log.info("torch.compile: %d transformer blocks, compiled on first use", len(blocks))
