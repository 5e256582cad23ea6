import torch

from vaemo_dist.config import ParallelConfig, load_config
from vaemo_dist.model.parallelize import parallelize, shard_indices
from vaemo_dist.model.vaemo import VAEmoModel
from vaemo_dist.objectives.stage1 import Stage1Objective


def test_shard_indices_keep_heads_whole_across_q_k_v():
    # width 12 = q|k|v of 4 each, 2 ranks: rank 1 gets the second half of each of q, k, v.
    assert shard_indices(12, 2, 1, groups=3).tolist() == [2, 3, 6, 7, 10, 11]
    assert shard_indices(8, 4, 2).tolist() == [4, 5]


def test_activation_checkpointing_changes_nothing_but_memory():
    cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                             "model.depth=2", "model.decoder_depth=1"])
    objective = Stage1Objective(cfg.loss)
    video, audio = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 32, 128)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VAEmoModel(cfg.model, cfg.inputs)
        keys = list(model.state_dict())
        model = parallelize(model, ParallelConfig(activation_checkpointing=checkpointing))
        assert list(model.state_dict()) == keys  # checkpoints stay interchangeable
        torch.manual_seed(1)
        loss, _ = objective(model(video, audio))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb)


def test_compile_per_block_matches_eager_and_keeps_the_state_dict_names(tmp_path, monkeypatch):
    """parallel.compile: three AdamW steps, compiled vs eager, same losses and gradients (fusion: separate,
    so the encoder runs SDPA with the block-diagonal mask). One compile of the encoder and one of the
    decoder block, cold (a fresh inductor cache): ~25 s on the 2-core machine."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                             "model.depth=2", "model.decoder_depth=1"])
    assert cfg.model.fusion == "separate"
    objective = Stage1Objective(cfg.loss)
    video, audio = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 32, 128)
    runs = []
    try:
        for compiled in (False, True):
            torch.manual_seed(0)
            model = VAEmoModel(cfg.model, cfg.inputs)
            keys = list(model.state_dict())
            model = parallelize(model, ParallelConfig(compile=compiled))
            assert list(model.state_dict()) == keys  # checkpoints and exports stay interchangeable
            blocks = [*model.blocks, *model.decoder_blocks]
            assert all((b._compiled_call_impl is not None) == compiled for b in blocks)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            steps = []
            for step in range(3):
                torch.manual_seed(1 + step)  # the same masks in both runs
                loss, _ = objective(model(video, audio))
                loss.backward()
                steps.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
                optimizer.step()
                optimizer.zero_grad()
            runs.append(steps)
    finally:
        torch._dynamo.reset()  # drop the compiled code and its guards for the tests that follow
    for (loss_a, grads_a), (loss_b, grads_b) in zip(*runs):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) > 30
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_after_activation_checkpointing_keeps_the_state_dict_names():
    cfg = load_config(None, ["model.depth=2", "model.decoder_depth=1"])
    torch.manual_seed(0)
    model = VAEmoModel(cfg.model, cfg.inputs)
    keys = list(model.state_dict())
    model = parallelize(model, ParallelConfig(activation_checkpointing=True, compile=True))
    assert list(model.state_dict()) == keys
    # The checkpoint wrapper is what is compiled (the recomputation inside the compiled code), once.
    for block in [*model.blocks, *model.decoder_blocks]:
        assert type(block).__name__ == "CheckpointWrapper" and block._compiled_call_impl is not None
        assert block._checkpoint_wrapped_module._compiled_call_impl is None


def test_the_tp_plan_names_the_linear_layers_of_a_block():
    from vaemo_dist.model.parallelize import TP_PLAN
    from vaemo_dist.model.vaemo import Block

    block = Block(8, 2, 4.0)
    for path in TP_PLAN:
        assert isinstance(block.get_submodule(path), torch.nn.Linear), path


def test_unshard_joins_what_apply_tensor_parallel_split(monkeypatch):
    """apply_tensor_parallel and the export's merge read one plan (TP_PLAN): the state dicts of the TP
    ranks, merged, are the unsharded model's, under the same names. Megatron's layers are stood in for
    by plain Linear layers of the shard's shape (no process group needed)."""
    import copy

    from megatron.core import parallel_state

    from vaemo_dist.checkpoints import merge_tensor_parallel
    from vaemo_dist.model import parallelize as par

    tp = 2

    class Column(torch.nn.Linear):
        def __init__(self, fin, fout, *, config, init_method, bias, gather_output):
            super().__init__(fin, fout // tp)

    class Row(torch.nn.Linear):
        def __init__(self, fin, fout, *, config, init_method, bias, input_is_parallel, skip_bias_add):
            super().__init__(fin // tp, fout)

    cfg = load_config(None, ["inputs.video.frames=4", "inputs.video.size=32", "inputs.audio.frames=32",
                             "model.depth=2", "model.decoder_depth=1", "model.heads=4"])
    torch.manual_seed(0)
    model = VAEmoModel(cfg.model, cfg.inputs)
    full = model.state_dict()
    monkeypatch.setattr(par, "_megatron_layers", lambda: (Column, Row))
    monkeypatch.setattr(par, "_megatron_config", lambda tp: None)
    shards = []
    for rank in range(tp):
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        sharded = copy.deepcopy(model)
        par.apply_tensor_parallel(sharded, tp)
        assert sharded.blocks[0].attn.heads == cfg.model.heads // tp
        shards.append(sharded.state_dict())
    dim = cfg.model.dim
    assert shards[0]["blocks.0.attn.qkv.weight"].shape == (3 * dim // tp, dim)
    fc2 = "decoder_blocks.0.mlp.2.weight"  # the decoder's blocks are split too
    assert shards[1][fc2].shape[1] == full[fc2].shape[1] // tp
    merged = merge_tensor_parallel(shards)
    assert list(merged) == list(full)
    for key, value in full.items():
        assert torch.equal(merged[key], value), key
