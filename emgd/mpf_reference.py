"""Multivariate power-frequency (MPF) features, offline: the readable specification.

Whole recording in, all frames out, written straight from the definition in
``neuromotor-models.md`` §2. It is the oracle the incremental Numba path (`emgd.mpf`) is
tested against, so it favours clarity over speed and computes everything in float64:
the band matrices are too ill-conditioned for float32 (``runtime-facts.md``).

For an input ``x`` of N samples × C channels (time-major, µV) and a setting with window
length ``L_w`` (160 handwriting, 200 wrist):

1. symmetric Hann window of 64, ``w[n] = 0.5 - 0.5 cos(2πn/63)``, ``g = ||w||₂``;
2. STFT, n_fft 64, hop 10, no centring, one-sided, divided by g:
   ``X[t, f, c] = (1/g) Σ_n w[n] x[10t + n, c] e^{-2πi f n / 64}``;
3. MPF frame k uses the ``W = L_w / 10`` STFT frames ``t = 4k … 4k + W - 1``
   (samples ``40k … 40k + L_w + 53``);
4. per FFT bin f: ``S = Σ_t X[t, f] X[t, f]ᴴ / W`` and ``P_f = |S|²`` elementwise;
5. band b: the plain mean of ``P_f`` over the bins f with ``lo_b < f·31.25 Hz <= hi_b``;
6. matrix logarithm ``V diag(log λ) Vᵀ`` from ``eigh``, with log λ := 0 where λ <= 0.

Output layout per frame: (F=6, C, C); all frames: (K, 6, C, C) float64, where
``K = floor((N - left_context - 1) / 40) + 1`` and ``left_context = L_w + 53``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_FFT = 64
FFT_HOP = 10
MPF_STRIDE = 40
STFT_PER_STRIDE = MPF_STRIDE // FFT_HOP  # 4
FS = 2000.0
BANDS_HZ: tuple[tuple[float, float], ...] = (
    (0.0, 50.0), (30.0, 100.0), (100.0, 225.0), (225.0, 375.0), (375.0, 700.0), (700.0, 1000.0),
)
N_BANDS = len(BANDS_HZ)


@dataclass(frozen=True)
class MpfSetting:
    """One MPF configuration: a name and the window length in samples."""

    name: str
    window_length: int

    @property
    def n_stft(self) -> int:
        """W: STFT frames per MPF window."""
        return self.window_length // FFT_HOP

    @property
    def left_context(self) -> int:
        """Samples before a frame's last sample: ``window_length - 10 + 64 - 1``."""
        return self.window_length - FFT_HOP + N_FFT - 1


HANDWRITING = MpfSetting("handwriting", 160)  # W = 16, left_context 213
WRIST = MpfSetting("wrist", 200)  # W = 20, left_context 253
SETTINGS = (HANDWRITING, WRIST)


def n_frames(n_samples: int, setting: MpfSetting) -> int:
    """Frames from ``n_samples`` samples: ``floor((N - left_context - 1)/40) + 1``, or 0."""
    span = setting.left_context + 1
    return 0 if n_samples < span else (n_samples - span) // MPF_STRIDE + 1


def frame_last_sample(k: int | np.ndarray, setting: MpfSetting) -> int | np.ndarray:
    """Index (from the stream's first sample) of the last sample frame k spans: ``40k + L``."""
    return MPF_STRIDE * k + setting.left_context


def hann_symmetric() -> np.ndarray:
    """The symmetric 64-point Hann window, float64, ``w[0] = w[63] = 0``."""
    n = np.arange(N_FFT, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (N_FFT - 1))


def band_bins() -> tuple[tuple[int, ...], ...]:
    """FFT bins of each band: bin f (f·fs/64 Hz) is in band (lo, hi] iff lo < f·fs/64 <= hi."""
    freqs = np.abs(np.fft.fftfreq(N_FFT, d=1.0 / FS)[: N_FFT // 2 + 1])
    return tuple(tuple(int(f) for f in np.flatnonzero((freqs > lo) & (freqs <= hi)))
                 for lo, hi in BANDS_HZ)


def stft(x: np.ndarray) -> np.ndarray:
    """(N, C) samples -> (T_s, 33, C) complex128, ``T_s = floor((N - 64)/10) + 1``."""
    x = np.asarray(x, dtype=np.float64)
    w = hann_symmetric()
    g = np.sqrt(np.sum(w * w))
    n_stft = (x.shape[0] - N_FFT) // FFT_HOP + 1
    starts = FFT_HOP * np.arange(n_stft)
    frames = x[starts[:, None] + np.arange(N_FFT)[None, :]]  # (T_s, 64, C)
    return np.fft.rfft(frames * w[None, :, None], axis=1) / g


def band_matrices(x: np.ndarray, setting: MpfSetting) -> np.ndarray:
    """(N, C) -> (K, 6, C, C) float64: the band-averaged |cross-spectrum|² matrices P_b."""
    n_out = n_frames(x.shape[0], setting)
    n_ch = x.shape[1]
    out = np.zeros((n_out, N_BANDS, n_ch, n_ch))
    if n_out == 0:
        return out
    spec = stft(x)
    w_len = setting.n_stft
    for k in range(n_out):
        y = spec[STFT_PER_STRIDE * k: STFT_PER_STRIDE * k + w_len]  # (W, 33, C)
        s = np.einsum("tfc,tfd->fcd", y, np.conj(y)) / w_len  # (33, C, C)
        p = np.abs(s) ** 2
        for b, bins in enumerate(band_bins()):
            out[k, b] = p[list(bins)].mean(axis=0)
    return out


def matrix_log(p: np.ndarray) -> np.ndarray:
    """Symmetric matrix log of (..., C, C) via ``eigh``; log λ := 0 for λ <= 0.

    Two exact transformations make the evaluation accurate (the definition, not float noise):

    - a row/column that is exactly zero (a dead channel, all-zero input) has the exact
      eigenvalue 0, so it is taken out before ``eigh`` and its row/column of the result is 0;
      inside a full decomposition rounding would give it λ = ±1e-14 and a log near -31;
    - the other rows/columns are ordered by decreasing diagonal before ``eigh`` (a
      permutation, undone afterwards). The band matrices are graded (channel amplitudes
      differ, entries scale with amplitude⁴; condition numbers reach 1e8-1e11); in this
      order LAPACK resolves their small eigenvalues to ~1e-13 instead of ~1e-5 (checked
      against 40-digit arithmetic; see `emgd.mpf_linalg`).
    """
    p = np.asarray(p, dtype=np.float64)
    flat = p.reshape(-1, *p.shape[-2:])
    out = np.zeros_like(flat)
    for i, m in enumerate(flat):
        active = np.flatnonzero(np.any(m != 0.0, axis=1))
        if active.size == 0:
            continue
        active = active[np.argsort(-np.diag(m)[active], kind="stable")]
        lam, vec = np.linalg.eigh(m[np.ix_(active, active)])
        log_lam = np.log(lam, where=lam > 0, out=np.zeros_like(lam))
        out[i][np.ix_(active, active)] = (vec * log_lam) @ vec.T
    return out.reshape(p.shape)


def mpf_offline(x: np.ndarray, setting: MpfSetting) -> np.ndarray:
    """MPF features of a whole recording: (N, C) -> (K, 6, C, C) float64."""
    return matrix_log(band_matrices(x, setting))
