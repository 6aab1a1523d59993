"""A seeded, deterministic generator of plausible 16-channel sEMG, in µV.

Two parts, summed:

- a broadband floor on every channel: white noise through a short causal FIR low-pass,
  scaled to :data:`NOISE_FLOOR_UV` µV rms (the amplifier noise of the sEMG-RD band);
- muscle-activity bursts: a band-limited (≈20–450 Hz) noise source, smoothed across
  neighbouring electrodes of the ring, multiplied by a burst envelope. Bursts arrive as a
  Poisson process (``bursts`` per second), last 0.1–1 s (a sin² envelope), peak at
  20–300 µV rms (log-uniform) and cover a Gaussian patch of the 16-channel ring.

Output is generated in blocks with all filter state carried between blocks, and every
random draw comes from a stream that does not depend on how the samples are split: the
same seed gives bit-identical samples whether asked for in blocks of 1, 7 or 333.
Vectorised per block (the only Python loops run over filter taps and active bursts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emgd import N_CHANNELS, SAMPLE_RATE

NOISE_FLOOR_UV = 2.46
BURST_BAND_HZ = (20.0, 450.0)
BURST_SECONDS = (0.1, 1.0)
BURST_PEAK_UV = (20.0, 300.0)
BURST_WIDTH_CH = (0.8, 2.5)  # Gaussian sigma of a burst's patch, in electrodes

_FLOOR_TAPS = 7
_BURST_TAPS = 31
_SPATIAL = np.array([0.25, 0.6, 1.0, 0.6, 0.25])  # neighbour weights across the ring


def fir_taps(lo_hz: float, hi_hz: float, taps: int, rate: float = SAMPLE_RATE) -> np.ndarray:
    """A Hamming-windowed sinc band-pass (``lo_hz`` = 0: low-pass), scaled so white noise
    of unit variance comes out with unit variance."""
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * hi_hz / rate * np.sinc(2 * hi_hz / rate * n)
    if lo_hz > 0:
        h -= 2 * lo_hz / rate * np.sinc(2 * lo_hz / rate * n)
    h *= np.hamming(taps)
    return h / np.sqrt(np.sum(h * h))


class BlockFir:
    """A causal FIR over (n, channels) blocks, its input history carried between calls.

    Accumulates tap by tap in a fixed order, so each output sample is computed by the same
    floating-point operations whatever the block size."""

    def __init__(self, taps: np.ndarray, channels: int) -> None:
        self.h = np.asarray(taps, dtype=np.float64)
        self.hist = np.zeros((len(self.h) - 1, channels))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        k = len(self.h)
        n = x.shape[0]
        xp = np.concatenate((self.hist, x))
        y = np.zeros_like(x)
        for i in range(k):
            y += self.h[i] * xp[k - 1 - i : k - 1 - i + n]
        self.hist = xp[n:].copy()
        return y


@dataclass(frozen=True, slots=True)
class Burst:
    start: int  # sample index of the envelope's start
    length: int  # samples
    peak_uv: float  # rms of the activity at the envelope's peak, on the centre electrode
    profile: np.ndarray  # (16,) spatial gain over the ring, 1 at the centre

    @property
    def stop(self) -> int:
        return self.start + self.length


def _ring_mixer() -> tuple[np.ndarray, np.ndarray]:
    """Column indices and weights of a circulant smoothing over the electrode ring, with
    the weights scaled so independent unit-variance inputs give unit-variance outputs."""
    half = len(_SPATIAL) // 2
    w = _SPATIAL / np.sqrt(np.sum(_SPATIAL**2))
    cols = np.array([(np.arange(N_CHANNELS) + off) % N_CHANNELS for off in range(-half, half + 1)])
    return cols, w


class SignalGenerator:
    """Synthetic sEMG in µV, (n, 16) float64 per call to :meth:`generate`."""

    def __init__(self, seed: int = 0, bursts_per_s: float = 1.0, rate: float = SAMPLE_RATE):
        self.rate = rate
        self.bursts_per_s = bursts_per_s
        floor_ss, act_ss, burst_ss = (
            np.random.SeedSequence(seed, spawn_key=(k,)) for k in range(3)
        )
        self._floor_rng = np.random.default_rng(floor_ss)
        self._act_rng = np.random.default_rng(act_ss)
        self._burst_rng = np.random.default_rng(burst_ss)
        self._floor = BlockFir(fir_taps(0.0, 0.4 * rate, _FLOOR_TAPS, rate), N_CHANNELS)
        self._act = BlockFir(fir_taps(*BURST_BAND_HZ, _BURST_TAPS, rate), N_CHANNELS)
        self._cols, self._w = _ring_mixer()
        self.position = 0  # index of the next sample
        self._active: list[Burst] = []
        self._next_burst = self._draw_burst(0) if bursts_per_s > 0 else None

    def _draw_burst(self, after: int) -> Burst:
        r = self._burst_rng
        start = after + int(r.exponential(self.rate / self.bursts_per_s))
        length = int(r.uniform(*BURST_SECONDS) * self.rate)
        peak = float(np.exp(r.uniform(*np.log(BURST_PEAK_UV))))
        centre = r.uniform(0, N_CHANNELS)
        width = r.uniform(*BURST_WIDTH_CH)
        d = np.abs(np.arange(N_CHANNELS) - centre)
        d = np.minimum(d, N_CHANNELS - d)
        return Burst(start, length, peak, np.exp(-0.5 * (d / width) ** 2))

    def bursts(self) -> list[Burst]:
        """Bursts overlapping the last generated block (ground truth for tests)."""
        return list(self._active)

    def generate(self, n: int) -> np.ndarray:
        """The next ``n`` samples, (n, 16) float64 µV."""
        t0 = self.position
        floor = self._floor(self._floor_rng.standard_normal((n, N_CHANNELS)))
        out = floor * NOISE_FLOOR_UV
        if self._next_burst is not None:
            out += self._activity(t0, n)
        self.position = t0 + n
        return out

    def _activity(self, t0: int, n: int) -> np.ndarray:
        src = self._act(self._act_rng.standard_normal((n, N_CHANNELS)))
        mixed = np.zeros_like(src)
        for cols, w in zip(self._cols, self._w):
            mixed += w * src[:, cols]
        t1 = t0 + n
        self._active = [b for b in self._active if b.stop > t0]
        while self._next_burst.start < t1:
            burst = self._next_burst
            self._active.append(burst)
            self._next_burst = self._draw_burst(burst.start)
        gain = np.zeros((n, N_CHANNELS))
        for b in self._active:
            lo, hi = max(b.start, t0), min(b.stop, t1)
            if lo >= hi:
                continue
            phase = (np.arange(lo, hi) - b.start) * (np.pi / b.length)
            env = np.sin(phase) ** 2
            gain[lo - t0 : hi - t0] += (b.peak_uv * env)[:, None] * b.profile[None, :]
        return mixed * gain
