"""Log-mel spectrograms for the CPU (PyAV) data path, in plain torch.

The conventions deliberately follow the defaults of NVIDIA DALI's operators so that a GPU path
built from `fn.spectrogram -> fn.mel_filter_bank -> fn.to_decibels` gives the same numbers:

* STFT (DALI `fn.spectrogram` defaults): windows centred on multiples of the hop, the signal
  mirrored at both ends (numpy-style "reflect", edge sample not repeated), a Hann window sampled
  at half-integer points `0.5 - 0.5 cos(2 pi (n + 0.5) / N)`, power (|X|^2) spectrum, no scaling.
  A waveform of `n` samples gives `n // hop + 1` frames.
* FFT size: the next power of two at or above the window (25 ms -> 400 samples -> 512), as in
  Kaldi; DALI needs `nfft=512` passed explicitly (its default is the window length).
* Mel filter bank (DALI `fn.mel_filter_bank` defaults): Slaney mel scale (linear below 1 kHz,
  logarithmic above), triangles built on the Hz axis between 0 and sample_rate / 2, each filter
  scaled by 2 / (its width in Hz) so that its integral is 1 (librosa's `norm="slaney"`).
* Log: natural log of the mel power with a floor, `ln(max(p, LOG_FLOOR))`. Natural log (rather
  than dB) keeps values on the Kaldi-fbank-like scale that `AudioInput.mean/std` describe. In
  DALI this is `fn.to_decibels(x, multiplier=ln(10), reference=1.0, cutoff_db=ln(LOG_FLOOR))`.

`mel_spec_params(cfg)` returns every one of these numbers, for the DALI path to read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from vaemo_dist.config import AudioInput

# Silence (and zero padding) maps to ln(1e-10) ~ -23.0 instead of -inf.
LOG_FLOOR = 1e-10


@dataclass(frozen=True)
class MelSpecParams:
    """Everything that defines the log-mel transform, in samples and Hz."""

    sample_rate: int
    win_length: int  # samples per analysis window
    hop_length: int  # samples between window centres
    n_fft: int
    n_mels: int
    frames: int  # spectrogram frames per clip
    num_samples: int  # waveform length that yields exactly `frames` frames
    f_min: float
    f_max: float
    mel_formula: str = "slaney"
    mel_normalize: bool = True
    log_floor: float = LOG_FLOOR

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1


def mel_spec_params(cfg: AudioInput) -> MelSpecParams:
    win = int(round(cfg.sample_rate * cfg.win_ms / 1000.0))
    hop = int(round(cfg.sample_rate * cfg.hop_ms / 1000.0))
    if win < 2 or hop < 1:
        raise ValueError(f"audio window {win} / hop {hop} samples too small (win_ms, hop_ms)")
    n_fft = 1 << (win - 1).bit_length()
    return MelSpecParams(
        sample_rate=cfg.sample_rate,
        win_length=win,
        hop_length=hop,
        n_fft=n_fft,
        n_mels=cfg.n_mels,
        frames=cfg.frames,
        # Centred framing gives n // hop + 1 frames, so (frames - 1) * hop samples give `frames`.
        num_samples=(cfg.frames - 1) * hop,
        f_min=0.0,
        f_max=cfg.sample_rate / 2.0,
    )


def fit_length(waveform: torch.Tensor, num_samples: int, offset: int = 0) -> torch.Tensor:
    """Crop `waveform[offset : offset + num_samples]`, zero-padding at the end where it is short."""
    piece = waveform[max(offset, 0) : max(offset, 0) + num_samples]
    if piece.numel() < num_samples:
        piece = F.pad(piece, (0, num_samples - piece.numel()))
    return piece


@lru_cache(maxsize=8)
def hann_window(length: int) -> torch.Tensor:
    """DALI's Hann window: sampled at half-integer points, so it is symmetric and never exactly 0."""
    n = torch.arange(length, dtype=torch.float64) + 0.5
    return (0.5 - 0.5 * torch.cos(2.0 * math.pi * n / length)).float()


def hz_to_mel(hz: torch.Tensor, formula: str = "slaney") -> torch.Tensor:
    if formula == "htk":
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    if formula != "slaney":
        raise ValueError(f"unknown mel formula {formula!r}; use 'slaney' or 'htk'")
    # Slaney: 3 mels per 200 Hz up to 1 kHz (15 mels), then 27 mels per factor 6.4 in frequency.
    log_step = math.log(6.4) / 27.0
    linear = hz * 3.0 / 200.0
    log_part = 15.0 + torch.log(torch.clamp(hz, min=1e-9) / 1000.0) / log_step
    return torch.where(hz >= 1000.0, log_part, linear)


def mel_to_hz(mel: torch.Tensor, formula: str = "slaney") -> torch.Tensor:
    if formula == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if formula != "slaney":
        raise ValueError(f"unknown mel formula {formula!r}; use 'slaney' or 'htk'")
    log_step = math.log(6.4) / 27.0
    return torch.where(mel >= 15.0, 1000.0 * torch.exp((mel - 15.0) * log_step), mel * 200.0 / 3.0)


@lru_cache(maxsize=8)
def mel_filterbank(
    n_mels: int,
    n_fft: int,
    sample_rate: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    formula: str = "slaney",
    normalize: bool = True,
) -> torch.Tensor:
    """Triangular filters as a float32 matrix [n_mels, n_fft // 2 + 1].

    Filter m rises linearly (in Hz) from edge m to edge m + 1 and falls to edge m + 2, with the
    n_mels + 2 edges equally spaced on the mel scale between f_min and f_max.
    """
    f_max = sample_rate / 2.0 if f_max is None else f_max
    lo, hi = hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64), formula).tolist()
    edges = mel_to_hz(torch.linspace(lo, hi, n_mels + 2, dtype=torch.float64), formula)
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (sample_rate / n_fft)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - left) / (centre - left)
    falling = (right - freqs[None, :]) / (right - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if normalize:
        weights = weights * (2.0 / (right - left))
    return weights.float()


def power_spectrogram(waveform: torch.Tensor, win_length: int, hop_length: int, n_fft: int) -> torch.Tensor:
    """|STFT|^2 of a 1-D float waveform, [n_fft // 2 + 1, n // hop + 1] (DALI's centred framing)."""
    if waveform.dim() != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {tuple(waveform.shape)}")
    return power_spectrograms(waveform[None], win_length, hop_length, n_fft)[0]


def power_spectrograms(waves: torch.Tensor, win_length: int, hop_length: int, n_fft: int) -> torch.Tensor:
    """`power_spectrogram` of each row of `waves` [N, n] (one FFT call): [N, n_fft // 2 + 1, n // hop + 1]."""
    if waves.dim() != 2:
        raise ValueError(f"expected waveforms [N, samples], got shape {tuple(waves.shape)}")
    half = win_length // 2
    # Reflect padding needs more samples than the pad; shorter input is zero-extended first.
    if waves.shape[1] <= win_length - half:
        waves = F.pad(waves, (0, win_length - half + 1 - waves.shape[1]))
    n_frames = waves.shape[1] // hop_length + 1
    padded = F.pad(waves[:, None], (half, win_length - half), mode="reflect")[:, 0]
    frames = padded.unfold(1, win_length, hop_length)[:, :n_frames]  # [N, T, win]
    window = hann_window(win_length).to(waves.device)  # cached on the CPU; a copy on a GPU batch
    spec = torch.fft.rfft(frames * window, n=n_fft)  # window zero-padded to n_fft
    return (spec.real.square() + spec.imag.square()).transpose(1, 2).contiguous()


def log_mel(waveform: torch.Tensor, cfg: AudioInput) -> torch.Tensor:
    """Log-mel spectrogram [1, cfg.frames, cfg.n_mels] (not normalised) of a mono float waveform.

    The waveform (at cfg.sample_rate) is cropped from its start or zero-padded at its end to the
    exact length that gives cfg.frames frames; pick the window first with `fit_length` if needed.
    """
    p = mel_spec_params(cfg)
    return log_mels(fit_length(waveform.reshape(-1).float(), p.num_samples)[None], cfg)[0]


def log_mels(waves: torch.Tensor, cfg: AudioInput) -> torch.Tensor:
    """`log_mel` of a batch: waveforms [N, n] (each cropped or zero-padded as `log_mel` does) ->
    [N, 1, cfg.frames, cfg.n_mels], with one FFT and one filter-bank product for the whole batch."""
    p = mel_spec_params(cfg)
    if waves.dim() != 2:
        raise ValueError(f"expected waveforms [N, samples], got shape {tuple(waves.shape)}")
    waves = waves.float()
    if waves.shape[1] != p.num_samples:
        waves = waves[:, : p.num_samples]
        waves = F.pad(waves, (0, p.num_samples - waves.shape[1]))
    power = power_spectrograms(waves, p.win_length, p.hop_length, p.n_fft)  # [N, freq, time]
    fb = mel_filterbank(p.n_mels, p.n_fft, p.sample_rate, p.f_min, p.f_max, p.mel_formula, p.mel_normalize)
    fb = fb.to(power.device)  # data.finish=device: the batch may be on a GPU
    mel = torch.matmul(fb, power)  # [N, n_mels, frames]
    return torch.log(torch.clamp(mel, min=p.log_floor)).transpose(1, 2)[:, None].contiguous()


def normalise_log_mel(x: torch.Tensor, cfg: AudioInput) -> torch.Tensor:
    """Dataset normalisation applied after `log_mel`: (x - mean) / std."""
    return (x - cfg.mean) / cfg.std
