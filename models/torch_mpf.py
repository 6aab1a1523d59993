"""PyTorch transcription of the reference MPF featurizer and the rotation-invariant MLP.

Offline oracle only (conversion and tests; torch is never imported by the daemon's runtime).
Facts: docs ``neuromotor-models.md`` §2 (MPF) and §3.2-3.3 (vectorization, rotation MLP).

The MPF here computes in float64 whatever the input dtype: the band matrices are too
ill-conditioned for float32 (``runtime-facts.md``). It returns features in the input's dtype
(float32 for float32 EMG), so a float64 network stays float64 end to end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

N_FFT = 64
FFT_STRIDE = 10
MPF_STRIDE = 40
FREQUENCY_BINS_HZ: tuple[tuple[float, float], ...] = (
    (0.0, 50.0),
    (30.0, 100.0),
    (100.0, 225.0),
    (225.0, 375.0),
    (375.0, 700.0),
    (700.0, 1000.0),
)


def hann_window() -> torch.Tensor:
    """The symmetric 64-point Hann (float32, ``w[0] = w[63] = 0``), as the buffer holds it."""
    return torch.hann_window(N_FFT, periodic=False, dtype=torch.float32)


def frequency_masks(fs: float = 2000.0) -> torch.Tensor:
    """Band masks, uint8 (1, 1, 6, 33, 1, 1): bin f is in band (lo, hi] iff lo < f_hz <= hi."""
    freqs = torch.fft.fftfreq(N_FFT, d=1.0 / fs, dtype=torch.float64)[: N_FFT // 2 + 1].abs()
    rows = [(freqs > lo) & (freqs <= hi) for lo, hi in FREQUENCY_BINS_HZ]
    return torch.stack(rows).to(torch.uint8).reshape(1, 1, len(rows), N_FFT // 2 + 1, 1, 1)


class MPFFeatures(nn.Module):
    """Multivariate power-frequency features: (B, C, N) raw EMG -> (B, 6, C, C, K).

    The persistent ``window`` buffer is the reference's float32 Hann (torch computes it in
    float32 arithmetic: up to 1.5e-7 off). While it holds that window, the float64 computation
    uses the exact float64 Hann, so the features are the §2 definition evaluated accurately;
    any other loaded window is used as it is.

    ``window_length`` is 200 (wrist) or 160 (handwriting); W = window_length / 10 STFT frames
    per output frame; ``K = floor((N - left_context - 1) / 40) + 1`` with
    ``left_context = window_length - 10 + 64 - 1`` (253 or 213).
    """

    def __init__(self, window_length: int) -> None:
        super().__init__()
        if window_length < N_FFT or window_length % FFT_STRIDE:
            raise ValueError(f"window_length must be a multiple of 10, >= 64: {window_length}")
        self.num_stft_frames = window_length // FFT_STRIDE
        self.left_context = window_length - FFT_STRIDE + N_FFT - 1
        self.stride = MPF_STRIDE
        self.register_buffer("window", hann_window())
        exact = torch.hann_window(N_FFT, periodic=False, dtype=torch.float64)
        self.register_buffer("exact_window", exact, persistent=False)
        self.register_buffer("freq_masks", frequency_masks())

    def num_frames(self, n: int) -> int:
        """Output frames for an input of n samples (0 when too short)."""
        return (n - self.left_context - 1) // self.stride + 1 if n > self.left_context else 0

    def _analysis_window(self) -> torch.Tensor:
        """The float64 Hann when ``window`` is the Hann up to float32 rounding, else ``window``."""
        w = self.window.to(torch.float64)
        exact = self.exact_window.to(w.device)
        return exact if torch.allclose(w, exact, rtol=0.0, atol=1e-6) else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape
        if n <= self.left_context:
            raise ValueError(f"MPF needs at least {self.left_context + 1} samples, got {n}")
        w = self._analysis_window()
        stft = torch.stft(
            x.to(torch.float64).reshape(b * c, n),
            n_fft=N_FFT,
            hop_length=FFT_STRIDE,
            window=w,
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        ) / torch.linalg.vector_norm(w)
        spec = stft.reshape(b, c, N_FFT // 2 + 1, -1)
        # (B, C, 33, K, W): MPF frame k uses STFT frames 4k ... 4k + W - 1.
        y = spec.unfold(-1, self.num_stft_frames, self.stride // FFT_STRIDE)
        cross = torch.einsum("bcfkw,bdfkw->bkfcd", y, y.conj()) / self.num_stft_frames
        power = cross.abs().square()  # (B, K, 33, C, C), |S|^2 elementwise
        masks = self.freq_masks.reshape(-1, N_FFT // 2 + 1).to(torch.float64)
        bands = torch.einsum("bkfcd,gf->bkgcd", power, masks / masks.sum(dim=1, keepdim=True))
        eigvals, eigvecs = torch.linalg.eigh(bands)
        logs = torch.nan_to_num(torch.log(eigvals), nan=0.0, neginf=0.0)
        mats = (eigvecs * logs.unsqueeze(-2)) @ eigvecs.transpose(-1, -2)
        return mats.permute(0, 2, 3, 4, 1).to(x.dtype)  # (B, 6, C, C, K)


def vectorized_indices(num_channels: int, num_adjacent_cov: int) -> list[int]:
    """Flat indices ``i*C + j`` (i <= j, row-major) of the circular band kept by the MLP (§3.2)."""
    if num_adjacent_cov > num_channels // 2:
        raise ValueError(
            f"num_adjacent_cov must be <= num_channels // 2 = {num_channels // 2}, "
            f"got {num_adjacent_cov}"
        )
    c = num_channels
    keep = {(i, i) for i in range(c)}
    for i in range(c):
        for j in range(num_adjacent_cov):
            keep.add((i, (i + j + 1) % c))
            keep.add((i, (i - j - 1) % c))
    return [i * c + j for i in range(c) for j in range(i, c) if (i, j) in keep]


def rotation_gather_indices(
    num_channels: int, num_adjacent_cov: int, offsets: Sequence[int]
) -> torch.Tensor:
    """(len(offsets), D) flat indices into M such that row r gathers vec(roll(M, offsets[r])).

    ``roll(M, (o, o))[i, j] = M[(i - o) mod C, (j - o) mod C]``: one gather per rotation
    replaces the reference's three rolls followed by the vectorization (same values, exactly).
    """
    c = num_channels
    flat = vectorized_indices(c, num_adjacent_cov)
    rows = [[((k // c - o) % c) * c + (k % c - o) % c for k in flat] for o in offsets]
    return torch.tensor(rows, dtype=torch.long)


class RotationInvariantMLP(nn.Module):
    """(B, F, C, C, K) -> (B, H_last, K): shared MLP over channel rotations, averaged (§3.3).

    Parameter names follow the reference: ``fully_connected_layers.<i>`` are the Linear
    layers in order (the reference configurations have one; the numbering for several
    layers is an assumption). LeakyReLU(0.01) follows every layer, the last included.
    """

    def __init__(
        self,
        num_channels: int,
        num_freqs: int,
        hidden_dims: Sequence[int],
        offsets: Sequence[int] = (-1, 0, 1),
        num_adjacent_cov: int = 3,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        gather = rotation_gather_indices(num_channels, num_adjacent_cov, offsets)
        self.register_buffer("rotation_indices", gather, persistent=False)
        dims = [num_freqs * gather.shape[1], *hidden_dims]
        self.fully_connected_layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])
        )
        self.activation = nn.LeakyReLU(0.01)

    def forward_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Time-major form: (B, K, F, C, C) -> (B, K, H_last)."""
        b, k, f, c, _ = x.shape
        flat = x.reshape(b, k, f, c * c)
        r, d = self.rotation_indices.shape
        h = flat.index_select(-1, self.rotation_indices.reshape(-1)).reshape(b, k, f, r, d)
        h = h.transpose(2, 3).reshape(b, k, r, f * d)  # band-major features per rotation
        for layer in self.fully_connected_layers:
            h = self.activation(layer(h))
        return h.mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_frames(x.permute(0, 4, 1, 2, 3)).transpose(1, 2)
