"""Reconstruction pictures: what the MAE decoder makes of a few clips, as one PNG.

Per clip, three rows: the input, the input with its masked tokens hidden, and the reconstruction
(visible patches from the input, masked patches from the decoder's prediction, as the MAE papers
show it). Left: a few video frames in RGB; right: the log-mel spectrogram (time across, mel bins up).
Where a modality's target is per-patch normalised (`model.norm_pix_video` / `model.norm_pix_audio`,
from `norm_pix_loss` and `norm_pix_loss_audio`), the decoder predicts per-patch normalised values; they
are taken back to the input's scale with the mean and variance of the input patch they replace.
Otherwise the prediction is already in the (globally normalised) input's scale and is shown as is.

With `model.decoder: cross` the decoder predicts only a sample of the masked patches
(`ModelOutput.video_decoded` / `audio_decoded`). The reconstruction row then shows the prediction
on those patches only; the masked patches that were not decoded stay hidden as in the masked row
(grey video, grey spectrogram), and each clip's caption says what share of the tokens was decoded.

`reconstruction_panels` computes the arrays that are drawn, so tests can check them directly;
`save_reconstruction_grid` draws them (matplotlib's Agg canvas, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaemo_dist.config import InputConfig
from vaemo_dist.model.embed import patchify_audio, patchify_video, unpatchify_audio, unpatchify_video
from vaemo_dist.model.vaemo import ModelOutput

MASK_GREY = 0.5  # RGB value of hidden video patches


@dataclass
class ReconstructionPanels:
    """The arrays a reconstruction grid shows (numpy float32), N clips."""

    frames: list[int]  # indices of the input frames shown
    video_input: np.ndarray  # [N, S, H, W, 3] RGB in [0, 1] (S = len(frames))
    video_masked: np.ndarray  # [N, S, H, W, 3] masked tubelet patches MASK_GREY
    # [N, S, H, W, 3] visible patches from the input, masked ones from the prediction (masked ones the
    # cross decoder did not predict: MASK_GREY)
    video_recon: np.ndarray
    audio_input: np.ndarray  # [N, M, F] log-mel (natural log of power), mel bins first
    audio_masked: np.ndarray  # [N, M, F] masked patches NaN (drawn in grey)
    audio_recon: np.ndarray  # [N, M, F] likewise (masked patches not predicted: NaN)
    video_mask_ratio: np.ndarray  # [N] share of video tokens masked
    audio_mask_ratio: np.ndarray  # [N]
    # [N] share of the tokens the decoder predicted (all masked ones under "full"; the cross decoder's
    # sample under "cross"). None: every masked token (panels built by hand).
    video_decoded_ratio: np.ndarray | None = None
    audio_decoded_ratio: np.ndarray | None = None


def unnormalise_patches(pred: torch.Tensor, patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Undo `patch_targets`: a prediction in per-patch normalised units back to the scale of
    `patches` (the model input's patches), using each input patch's own mean and variance."""
    if not norm_pix:
        return pred
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return pred * (var + 1e-6).sqrt() + mean


def picture_note(norm_pix_video: bool, norm_pix_audio: bool) -> str:
    """The line under the title saying which modalities' masked patches take the input patch's
    mean/std (their coarse colour then comes from the input, not from the model); "" for neither."""
    which = [name for name, on in (("video", norm_pix_video), ("audio", norm_pix_audio)) if on]
    if not which:
        return ""
    prefix = "masked patches" if len(which) == 2 else f"masked {which[0]} patches"
    return f"{prefix}: prediction scaled by the input patch's mean/std"


def _predicted(
    pred: torch.Tensor, decoded: torch.Tensor | None, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction laid out over every patch ([N, n, P]; zero where nothing was predicted) and which
    masked patches it covers ([N, n] bool). `pred` [N, D, P] predicts patches `decoded` [N, D]; a
    prediction of every patch (D = n, or `decoded` None) covers every masked one."""
    n = mask.shape[1]
    if decoded is None or pred.shape[1] == n:
        if pred.shape[1] != n:
            raise ValueError(f"a prediction of {pred.shape[1]} patches needs the decoded indices "
                             f"(ModelOutput.video_decoded / audio_decoded) to be drawn over {n} patches")
        return pred, mask
    if decoded.shape != pred.shape[:2]:
        raise ValueError(f"decoded indices {tuple(decoded.shape)} do not match the predictions "
                         f"{tuple(pred.shape)}")
    full = pred.new_zeros(pred.shape[0], n, pred.shape[2])
    full.scatter_(1, decoded[..., None].expand_as(pred), pred)
    covered = torch.zeros_like(mask).scatter_(1, decoded, True)
    return full, covered & mask


def _shown_frames(total: int, count: int) -> list[int]:
    count = max(1, min(count, total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, count)})


@torch.no_grad()
def reconstruction_panels(video: torch.Tensor, audio: torch.Tensor, out: ModelOutput, inputs: InputConfig,
                          *, norm_pix: bool = True, norm_pix_audio: bool | None = None, max_clips: int = 4,
                          frames_shown: int = 4) -> ReconstructionPanels:
    """The input / masked / reconstructed arrays of the first `max_clips` clips of a batch.

    video [B, 3, T, H, W] and audio [B, 1, F, M] are the (normalised) model inputs `out` came from.
    `norm_pix`: the video target is per-patch normalised; `norm_pix_audio`: the audio target is
    (None: as `norm_pix`), as `ModelConfig.norm_pix_loss` / `norm_pix_loss_audio`.
    """
    if norm_pix_audio is None:
        norm_pix_audio = norm_pix
    v, a = inputs.video, inputs.audio
    n = max(1, min(max_clips, video.shape[0]))
    video, audio = video[:n].detach().float().cpu(), audio[:n].detach().float().cpu()

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t[:n].detach().cpu()
        return t.float() if t.is_floating_point() else t

    v_mask, a_mask = take(out.video_mask), take(out.audio_mask)

    v_decoded = None if out.video_decoded is None else take(out.video_decoded)
    a_decoded = None if out.audio_decoded is None else take(out.audio_decoded)

    # Video: patches in the normalised input space, prediction back to it, then to RGB. Masked patches
    # without a prediction (cross decoder) stay MASK_GREY in the reconstruction too.
    v_patches = patchify_video(video, v.tubelet, v.patch)
    v_pred, v_drawn = _predicted(take(out.video_pred), v_decoded, v_mask)
    v_pred = unnormalise_patches(v_pred, v_patches, norm_pix)
    v_recon = torch.where(v_drawn[..., None], v_pred, v_patches)
    vgrid = inputs.video_grid
    v_flags = v_mask[..., None].expand_as(v_patches).float()
    v_hidden = unpatchify_video(v_flags, vgrid, v.tubelet, v.patch) > 0.5
    v_undecoded = (v_mask & ~v_drawn)[..., None].expand_as(v_patches).float()
    v_blank = unpatchify_video(v_undecoded, vgrid, v.tubelet, v.patch) > 0.5
    mean = torch.tensor(v.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(v.std).view(1, 3, 1, 1, 1)

    def to_rgb(x: torch.Tensor) -> torch.Tensor:  # [N, 3, T, H, W] normalised -> [N, T, H, W, 3] in [0, 1]
        return (x * std + mean).clamp(0.0, 1.0).permute(0, 2, 3, 4, 1)

    rgb_in = to_rgb(video)
    rgb_masked = torch.where(v_hidden.permute(0, 2, 3, 4, 1), torch.full_like(rgb_in, MASK_GREY), rgb_in)
    rgb_recon = to_rgb(unpatchify_video(v_recon, vgrid, v.tubelet, v.patch))
    rgb_recon = torch.where(v_blank.permute(0, 2, 3, 4, 1), torch.full_like(rgb_recon, MASK_GREY), rgb_recon)
    frames = _shown_frames(video.shape[2], frames_shown)

    # Audio: log-mel patches likewise; shown as [mel, time] so imshow(origin="lower") puts time across.
    a_patches = patchify_audio(audio, a.patch)
    a_pred, a_drawn = _predicted(take(out.audio_pred), a_decoded, a_mask)
    a_pred = unnormalise_patches(a_pred, a_patches, norm_pix_audio)
    agrid = inputs.audio_grid
    a_recon = unpatchify_audio(torch.where(a_drawn[..., None], a_pred, a_patches), agrid, a.patch)
    a_hidden = unpatchify_audio(a_mask[..., None].expand_as(a_patches).float(), agrid, a.patch) > 0.5
    a_undecoded = (a_mask & ~a_drawn)[..., None].expand_as(a_patches).float()
    a_blank = unpatchify_audio(a_undecoded, agrid, a.patch) > 0.5

    def to_logmel(x: torch.Tensor) -> torch.Tensor:  # [N, 1, F, M] normalised -> [N, M, F] log-mel
        return (x * a.std + a.mean)[:, 0].transpose(1, 2)

    mel_in = to_logmel(audio)
    mel_masked = torch.where(a_hidden[:, 0].transpose(1, 2), torch.full_like(mel_in, float("nan")), mel_in)
    mel_recon = to_logmel(a_recon)
    nan = torch.full_like(mel_recon, float("nan"))
    mel_recon = torch.where(a_blank[:, 0].transpose(1, 2), nan, mel_recon)

    def np32(x: torch.Tensor) -> np.ndarray:
        return x.numpy().astype(np.float32)

    return ReconstructionPanels(
        frames=frames,
        video_input=np32(rgb_in[:, frames]),
        video_masked=np32(rgb_masked[:, frames]),
        video_recon=np32(rgb_recon[:, frames]),
        audio_input=np32(mel_in),
        audio_masked=np32(mel_masked),
        audio_recon=np32(mel_recon),
        video_mask_ratio=np32(v_mask.float().mean(dim=1)),
        audio_mask_ratio=np32(a_mask.float().mean(dim=1)),
        video_decoded_ratio=np32(v_drawn.float().mean(dim=1)),
        audio_decoded_ratio=np32(a_drawn.float().mean(dim=1)),
    )


def save_reconstruction_grid(video: torch.Tensor, audio: torch.Tensor, out: ModelOutput, inputs: InputConfig,
                             path: str | Path, max_clips: int = 4, *, norm_pix: bool = True,
                             norm_pix_audio: bool | None = None,
                             keys: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                             title: str = "", frames_shown: int = 4) -> Path:
    """Draw `reconstruction_panels` of the first `max_clips` clips into a PNG at `path`
    (`norm_pix`, `norm_pix_audio`: as in `reconstruction_panels`)."""
    if norm_pix_audio is None:
        norm_pix_audio = norm_pix
    panels = reconstruction_panels(video, audio, out, inputs, max_clips=max_clips, frames_shown=frames_shown,
                                   norm_pix=norm_pix, norm_pix_audio=norm_pix_audio)
    note = picture_note(norm_pix, norm_pix_audio)
    if note:
        title = f"{title}\n{note}" if title else note
    return draw_panels(panels, path, keys=keys, labels=labels, title=title)


def clip_caption(panels: ReconstructionPanels, i: int) -> str:
    """What clip i's caption says of its masks: the share of each modality's tokens masked and, where
    the decoder predicted fewer than all of the masked ones (model.decoder: cross), the share decoded
    (the other masked tokens stay grey in the reconstruction row)."""
    parts = []
    for name, masked, decoded in (("video", panels.video_mask_ratio, panels.video_decoded_ratio),
                                  ("audio", panels.audio_mask_ratio, panels.audio_decoded_ratio)):
        text = f"{name} {100 * masked[i]:.0f}% masked"
        if decoded is not None and decoded[i] < masked[i]:
            text += f" ({100 * decoded[i]:.0f}% decoded, the rest grey)"
        parts.append(text)
    return ", ".join(parts)


def draw_panels(panels: ReconstructionPanels, path: str | Path, *, keys: Sequence[str] | None = None,
                labels: Sequence[int] | None = None, title: str = "") -> Path:
    """One block of three rows per clip: frames on the left, the spectrogram on the right."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, s = panels.video_input.shape[:2]
    mels, times = panels.audio_input.shape[1:]
    spec_width = float(np.clip(times / mels, 1.0, 3.0))  # spectrogram column, in frame widths
    cell = 1.5  # inches per frame panel
    title_height = 0.25 * (title.count("\n") + 1) if title else 0.0
    fig = Figure(figsize=(cell * (s + spec_width) + 1.6, n * (3 * cell + 0.5) + title_height),
                 dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=12)
    spec_cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.6")  # NaN (masked) in grey
    rows = (("input", panels.video_input, panels.audio_input),
            ("masked", panels.video_masked, panels.audio_masked),
            ("reconstruction", panels.video_recon, panels.audio_recon))
    subfigs = np.atleast_1d(fig.subfigures(n, 1))
    for i, sub in enumerate(subfigs):
        name = keys[i] if keys is not None and i < len(keys) else f"clip {i}"
        if labels is not None and i < len(labels):
            name += f"  (label {labels[i]})"
        sub.suptitle(f"{name}: {clip_caption(panels, i)}", fontsize=10, x=0.02, ha="left")
        grid = sub.add_gridspec(3, s + 1, width_ratios=[1.0] * s + [spec_width])
        # One colour scale per clip, from the input, so the reconstruction is judged against it.
        lo, hi = np.nanpercentile(panels.audio_input[i], [1.0, 99.5])
        for r, (row_name, frames, spec) in enumerate(rows):
            for j in range(s):
                ax = sub.add_subplot(grid[r, j])
                ax.imshow(frames[i, j], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"frame {panels.frames[j]}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"video\n{row_name}", fontsize=9)
            ax = sub.add_subplot(grid[r, s])
            ax.imshow(spec[i], origin="lower", aspect="auto", cmap=spec_cmap, vmin=lo, vmax=hi,
                      interpolation="nearest")
            ax.set_title(f"log-mel {row_name}", fontsize=8)
            ax.set_ylabel("mel bin", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == 2:
                ax.set_xlabel("time frame", fontsize=8)
            else:
                ax.set_xticklabels([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)  # readers (wandb, a viewer) never see half a file
    return path
