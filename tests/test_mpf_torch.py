"""The NumPy MPF reference against a PyTorch transcription of the same definition (§2).

The transcription follows the published featurizer's operations (torch.stft with the symmetric
Hann, center=False, one-sided, divided by g; unfold into windows of W STFT frames with step 4;
Y Yᴴ / W; |·|²; band means; torch.linalg.eigh; log with NaN/-inf -> 0), in float64, with no
reordering: plain LAPACK in channel order. It therefore agrees with the reference only where
the band matrices are conditioned well enough for that (the signal here has the realistic mix
of ``runtime-facts.md``: a 2.46 µVrms floor and bursts of 10-100 µVrms).
"""

from __future__ import annotations

import numpy as np
import pytest

from emgd.mpf_reference import BANDS_HZ, HANDWRITING, WRIST, MpfSetting, mpf_offline

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch


def torch_mpf(x: np.ndarray, setting: MpfSetting) -> np.ndarray:
    """(N, C) -> (K, 6, C, C), transcribed with torch ops in float64."""
    emg = torch.from_numpy(np.asarray(x, np.float64)).T  # (C, N)
    window = torch.hann_window(64, periodic=False, dtype=torch.float64)
    g = window.pow(2).sum().sqrt()
    spec = torch.stft(emg, n_fft=64, hop_length=10, window=window, center=False,
                      normalized=False, onesided=True, return_complex=True) / g  # (C, 33, T)
    w_len = setting.n_stft
    frames = spec.unfold(-1, w_len, 4)  # (C, 33, K, W)
    cross = torch.einsum("cfkw,dfkw->kfcd", frames, frames.conj()) / w_len
    power = cross.abs().pow(2)  # (K, 33, C, C)
    freqs = torch.fft.fftfreq(64, d=1 / 2000.0, dtype=torch.float64)[:33].abs()
    bands = torch.stack([power[:, (freqs > lo) & (freqs <= hi)].mean(dim=1)
                         for lo, hi in BANDS_HZ], dim=1)  # (K, 6, C, C)
    lam, vec = torch.linalg.eigh(bands)
    log_lam = torch.nan_to_num(lam.log(), nan=0.0, neginf=0.0)
    return (vec * log_lam.unsqueeze(-2) @ vec.transpose(-1, -2)).numpy()


def realistic_emg(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 2.46 * rng.standard_normal((n, 16))
    t = np.arange(n)
    for ch in rng.choice(16, size=6, replace=False):
        noise = rng.standard_normal(n + 20)
        band = np.convolve(noise, np.ones(4) / 4, "same") - np.convolve(noise, np.ones(20) / 20,
                                                                           "same")
        centre, width = rng.uniform(0, n), rng.uniform(400, 2000)
        env = rng.uniform(10, 100) * np.exp(-0.5 * ((t - centre) / (0.3 * width)) ** 2)
        x[:, ch] += env * band[10:10 + n] / band.std()
    return x.astype(np.float32)


@pytest.mark.parametrize("setting", [HANDWRITING, WRIST], ids=lambda s: s.name)
def test_numpy_reference_equals_torch_transcription(setting):
    x = realistic_emg(6000, seed=21)
    ref = mpf_offline(x, setting)
    got = torch_mpf(x, setting)
    assert got.shape == ref.shape == ((6000 - setting.left_context - 1) // 40 + 1, 6, 16, 16)
    assert np.abs(got - ref).max() < 1e-5


def test_all_zero_and_left_context_edges_agree_with_torch():
    zeros = np.zeros((400, 16), np.float32)
    assert not torch_mpf(zeros, WRIST).any() and not mpf_offline(zeros, WRIST).any()
    x = realistic_emg(WRIST.left_context + 1, seed=22)
    ref = mpf_offline(x, WRIST)
    assert len(ref) == 1
    assert np.abs(torch_mpf(x, WRIST) - ref).max() < 1e-5
    with pytest.raises(RuntimeError):  # torch's unfold refuses a window longer than the input
        torch_mpf(x[:-1], WRIST)
    assert len(mpf_offline(x[:-1], WRIST)) == 0
