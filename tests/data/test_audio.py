import math

import numpy as np
import pytest
import torch

from vaemo_dist.config import AudioInput
from vaemo_dist.data.audio import (
    LOG_FLOOR,
    fit_length,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_spec_params,
    mel_to_hz,
    normalise_log_mel,
    power_spectrogram,
)

CFG = AudioInput()
SR = CFG.sample_rate
DB_PER_NEPER = 10.0 / math.log(10.0)  # ln(p) * this = 10 log10(p)


def tone(freq: float, seconds: float, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def voice_like(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding pitch with syllable-like gaps and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(150 + 40 * np.sin(2 * np.pi * 0.7 * t)) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.maximum(np.sin(2 * np.pi * 3 * t), 0.0)
    return (0.3 * envelope * voice + rng.normal(0, 0.01, t.size)).astype(np.float32)


def test_params_for_default_config():
    p = mel_spec_params(CFG)
    assert (p.win_length, p.hop_length, p.n_fft) == (400, 160, 512)
    assert p.num_samples == 255 * 160  # (frames - 1) * hop samples give exactly `frames` frames
    assert power_spectrogram(torch.zeros(p.num_samples), 400, 160, 512).shape == (257, CFG.frames)


@pytest.mark.parametrize("n_samples", [100, 16000, 40800, 200000])
def test_output_shape_is_exact(n_samples):
    out = log_mel(torch.randn(n_samples) * 0.1, CFG)
    assert out.shape == (1, CFG.frames, CFG.n_mels) and out.dtype == torch.float32
    small = AudioInput(frames=64, n_mels=32)
    assert log_mel(torch.randn(n_samples) * 0.1, small).shape == (1, 64, 32)


def test_short_waveform_is_zero_padded_to_floor():
    out = log_mel(tone(440.0, 0.5), CFG)  # 0.5 s = 50 frames of signal, the rest padding
    floor = math.log(LOG_FLOOR)
    assert torch.allclose(out[0, 60:], torch.tensor(floor))
    assert out[0, :45].max() > floor + 20


def test_fit_length_crops_at_offset_and_pads():
    x = torch.arange(10.0)
    assert fit_length(x, 4, offset=3).tolist() == [3.0, 4.0, 5.0, 6.0]
    assert fit_length(x, 4, offset=8).tolist() == [8.0, 9.0, 0.0, 0.0]


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0, 6000.0])
def test_pure_tone_peaks_in_its_mel_bin(freq):
    out = log_mel(tone(freq, 3.0), CFG)[0]  # [frames, mels]
    mean_over_time = out[5:-5].mean(dim=0)
    # Filter m is centred on the (m + 1)-th of n_mels + 2 points equally spaced in mel.
    top = float(hz_to_mel(torch.tensor(SR / 2.0, dtype=torch.float64)))
    centres = mel_to_hz(torch.linspace(0.0, top, CFG.n_mels + 2, dtype=torch.float64)[1:-1])
    expected = int(torch.argmin((centres - freq).abs()))
    assert abs(int(mean_over_time.argmax()) - expected) <= 1
    # And the energy is concentrated there: far bins are much lower.
    assert mean_over_time[expected] > mean_over_time[(expected + 20) % CFG.n_mels] + 5


def test_louder_is_higher_by_the_power_ratio():
    quiet, loud = log_mel(tone(1000.0, 3.0, 0.1), CFG), log_mel(tone(1000.0, 3.0, 0.4), CFG)
    peak = int(quiet[0, 100].argmax())
    assert float(loud[0, 100, peak] - quiet[0, 100, peak]) == pytest.approx(math.log(16.0), abs=1e-3)


def test_normalise():
    x = torch.full((1, 4, 4), CFG.mean + 2 * CFG.std)
    assert torch.allclose(normalise_log_mel(x, CFG), torch.full_like(x, 2.0))


# --------------------------------------------------------------------------------------------
# Parity with NVIDIA DALI's CPU operators (the later GPU data path must reproduce this output)


def run_dali(data: np.ndarray, build) -> np.ndarray:
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None)  # CPU only
    with pipe:
        x = fn.external_source(source=lambda: [data], batch=True, dtype=types.FLOAT)
        pipe.set_outputs(build(fn, x))
    pipe.build()
    (out,) = pipe.run()
    return np.array(out[0])


def test_filterbank_equals_dali():
    pytest.importorskip("nvidia.dali")
    p = mel_spec_params(CFG)
    # Feeding an identity "spectrogram" (freq x time) returns the filter matrix itself.
    identity = np.eye(p.n_freqs, dtype=np.float32)
    dali_fb = run_dali(identity, lambda fn, x: fn.mel_filter_bank(x, sample_rate=p.sample_rate,
                                                                  nfilter=p.n_mels))
    ours = mel_filterbank(p.n_mels, p.n_fft, p.sample_rate).numpy()
    assert dali_fb.shape == ours.shape == (128, 257)
    np.testing.assert_allclose(ours, dali_fb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seconds", [3.0, 1.0])  # 1 s: the zero-padded tail is compared too
def test_log_mel_matches_dali_pipeline(seconds):
    pytest.importorskip("nvidia.dali")
    p = mel_spec_params(CFG)
    wave = fit_length(torch.from_numpy(voice_like(seconds)), p.num_samples).numpy()

    def build(fn, x):
        spec = fn.spectrogram(x, window_length=p.win_length, window_step=p.hop_length, nfft=p.n_fft)
        mel = fn.mel_filter_bank(spec, sample_rate=p.sample_rate, nfilter=p.n_mels,
                                 freq_low=p.f_min, freq_high=p.f_max)
        # ln(max(x, floor)) expressed as decibels: multiplier ln(10), fixed reference 1.
        return fn.to_decibels(mel, multiplier=math.log(10.0), reference=1.0,
                              cutoff_db=math.log(p.log_floor))

    dali = run_dali(wave, build).T  # DALI gives [mels, frames]
    ours = log_mel(torch.from_numpy(wave), CFG)[0].numpy()
    assert dali.shape == ours.shape == (CFG.frames, CFG.n_mels)
    diff_db = np.abs(dali - ours) * DB_PER_NEPER
    # Measured: mean ~1e-5 dB, max ~6e-4 dB (float32 FFT rounding), far inside the 0.1 dB mean
    # that the DALI path is held to.
    assert diff_db.mean() < 1e-3, diff_db.mean()
    assert diff_db.max() < 0.05, diff_db.max()
