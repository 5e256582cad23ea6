import torch
import torch.nn.functional as F

from kernels import reference
from vaemo_dist.config import LossConfig
from vaemo_dist.model.vaemo import ModelOutput
from vaemo_dist.objectives.stage1 import Stage1Objective


def _output(b=4, nv=10, na=6, pv=12, pa=5, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    mask_v = torch.rand(b, nv, generator=g).argsort(1) < 7  # 7 masked per sample
    mask_a = torch.rand(b, na, generator=g).argsort(1) < 3
    return ModelOutput(
        video_pred=r(b, nv, pv).requires_grad_(True), video_target=r(b, nv, pv), video_mask=mask_v,
        audio_pred=r(b, na, pa).requires_grad_(True), audio_target=r(b, na, pa), audio_mask=mask_a,
        video_emb=F.normalize(r(b, e), dim=-1), audio_emb=F.normalize(r(b, e), dim=-1),
        joint_emb=F.normalize(r(b, e), dim=-1), logit_scale=torch.tensor(10.0),
        video_keep=(~mask_v).nonzero()[:, 1].reshape(b, -1),
        audio_keep=(~mask_a).nonzero()[:, 1].reshape(b, -1),
    )


def _rec_loop(pred, target, mask):
    per_sample = []
    for i in range(pred.shape[0]):
        errs = [((pred[i, j] - target[i, j]) ** 2).mean() for j in range(pred.shape[1]) if mask[i, j]]
        per_sample.append(torch.stack(errs).mean())
    return torch.stack(per_sample).mean()


def test_losses_match_plain_references_and_total_is_weighted_sum():
    out = _output()
    cfg = LossConfig(video_weight=0.7, audio_weight=1.3, contrastive_weight=0.25)
    total, metrics = Stage1Objective(cfg)(out)
    rec_v = _rec_loop(out.video_pred, out.video_target, out.video_mask)
    rec_a = _rec_loop(out.audio_pred, out.audio_target, out.audio_mask)
    con = reference.contrastive_loss(out.audio_emb, out.video_emb, out.logit_scale)
    torch.testing.assert_close(torch.tensor(metrics["rec_video"]), rec_v.detach())
    torch.testing.assert_close(torch.tensor(metrics["rec_audio"]), rec_a.detach())
    torch.testing.assert_close(torch.tensor(metrics["contrastive"]), con)
    torch.testing.assert_close(total, 0.7 * rec_v + 1.3 * rec_a + 0.25 * con)
    assert metrics["loss"] == total.item()
    assert set(metrics) == {"loss", "rec_video", "rec_audio", "contrastive", "logit_scale", "acc_a2v"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["logit_scale"] == 10.0


def test_unmasked_patches_do_not_contribute():
    out = _output()
    total, _ = Stage1Objective(LossConfig())(out)
    total.backward()
    assert (out.video_pred.grad[~out.video_mask] == 0).all()
    assert (out.video_pred.grad[out.video_mask].abs().sum(-1) > 0).all()
    assert (out.audio_pred.grad[~out.audio_mask] == 0).all()


def test_retrieval_accuracy():
    out = _output()
    out.video_emb = out.audio_emb.clone()
    assert Stage1Objective(LossConfig())(out)[1]["acc_a2v"] == 1.0
    out.video_emb = out.audio_emb.roll(1, dims=0)  # every audio row's best match is the wrong clip
    assert Stage1Objective(LossConfig())(out)[1]["acc_a2v"] == 0.0
