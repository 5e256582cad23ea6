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
