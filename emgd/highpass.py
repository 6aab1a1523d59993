"""Causal Butterworth high-pass filter for the EMG stream, with carried state.

The reference recordings were high-pass filtered at 40 Hz before the networks saw them
(``neuromotor-models.md`` §9 q7: the order, type and causality are not documented). A model
card that asks for it (``input.highpass_hz``) makes the runtime filter the raw band stream
the same way, causally, before the network: an even-order Butterworth high-pass designed
here by the bilinear transform with a pre-warped cut-off, as cascaded biquads (second-order
sections) in transposed direct form II.

Design (order N even, N/2 sections, ``K = tan(π f_c / f_s)``): section k has the analog
prototype ``s² / (s² + s/Q_k + 1)`` with ``1/Q_k = 2 sin(π (2k + 1) / (2N))`` (for N = 4:
Q = 1.3066, 0.5412), which the bilinear transform turns into

    b = [1, -2, 1] / a0,   a = [1, 2 (K² - 1) / a0, (1 - K/Q + K²) / a0],   a0 = 1 + K/Q + K².

The coefficients equal ``scipy.signal.butter(N, f_c, "highpass", fs=f_s, output="sos")``
(tested when SciPy happens to be installed; it is not a dependency).

Start of a stream: the first sample of a segment initialises each channel's state as if the
signal had been constant at that value forever (the filter's steady state for a step, as
``scipy.signal.sosfilt_zi`` × x0 gives), so a DC offset does not ring at every segment start.
For a high-pass that is: section 0 holds ``[(b1 + b2) x0, b2 x0]``, the others zero.

State and arithmetic are float64 (per channel, per section); input and output float32.
:meth:`HighPass.process` works on whole blocks in a Numba ``nogil`` kernel and may write in
place; splitting a stream into blocks of any size gives the same output.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

SAMPLE_RATE = 2000.0


def butter_highpass_sos(cutoff_hz: float, fs: float = SAMPLE_RATE, order: int = 4) -> np.ndarray:
    """Second-order sections ``(order/2, 6)`` ``[b0, b1, b2, 1, a1, a2]``, float64."""
    if order < 2 or order % 2:
        raise ValueError(f"high-pass order must be even and >= 2, got {order}")
    if not 0.0 < cutoff_hz < fs / 2:
        raise ValueError(f"high-pass cut-off must be in (0, {fs / 2}) Hz, got {cutoff_hz}")
    k = math.tan(math.pi * cutoff_hz / fs)
    sos = np.zeros((order // 2, 6))
    for i in range(order // 2):
        inv_q = 2.0 * math.sin(math.pi * (2 * i + 1) / (2 * order))
        a0 = 1.0 + k * inv_q + k * k
        sos[i] = (1.0 / a0, -2.0 / a0, 1.0 / a0,
                  1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k * inv_q + k * k) / a0)
    return sos


@njit(nogil=True, cache=True)
def _sos_block(x, out, sos, zi, primed):
    """Filter x (n, C) into out (n, C) (may alias x); zi (S, C, 2) float64 carried state."""
    n, channels = x.shape
    sections = sos.shape[0]
    if not primed[0] and n > 0:
        for c in range(channels):
            x0 = np.float64(x[0, c])
            zi[0, c, 0] = (sos[0, 1] + sos[0, 2]) * x0
            zi[0, c, 1] = sos[0, 2] * x0
            for s in range(1, sections):
                zi[s, c, 0] = 0.0
                zi[s, c, 1] = 0.0
        primed[0] = True
    for t in range(n):
        for c in range(channels):
            v = np.float64(x[t, c])
            for s in range(sections):
                y = sos[s, 0] * v + zi[s, c, 0]
                zi[s, c, 0] = sos[s, 1] * v - sos[s, 4] * y + zi[s, c, 1]
                zi[s, c, 1] = sos[s, 2] * v - sos[s, 5] * y
                v = y
            out[t, c] = v


class HighPass:
    """Causal high-pass of a (n, channels) float32 stream, state carried across blocks.

    ``process(x, out=None)`` returns the filtered block (``out`` may be ``x`` itself);
    ``reset()`` starts a new segment (the next sample primes the state, see the module
    docstring). One instance per stream; not thread-safe.
    """

    def __init__(self, cutoff_hz: float, fs: float = SAMPLE_RATE, order: int = 4,
                 channels: int = 16) -> None:
        self.cutoff_hz = float(cutoff_hz)
        self.fs = float(fs)
        self.order = int(order)
        self.channels = int(channels)
        self.sos = butter_highpass_sos(self.cutoff_hz, self.fs, self.order)
        self._zi = np.zeros((self.sos.shape[0], self.channels, 2))
        self._primed = np.zeros(1, dtype=np.bool_)

    def reset(self) -> None:
        """Forget the state: the next sample is the first of a new segment."""
        self._zi[:] = 0.0
        self._primed[0] = False

    def process(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Filter ``x`` (n, channels) float32 into ``out`` (same shape; default: new array)."""
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected (n, {self.channels}) samples, got {x.shape}")
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if out is None:
            out = np.empty_like(x)
        elif out.shape != x.shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {x.shape}, got {out.dtype} {out.shape}")
        _sos_block(x, out, self.sos, self._zi, self._primed)
        return out
