"""The causal high-pass: design, an offline sample-by-sample reference, chunk-split invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emgd.highpass import HighPass, butter_highpass_sos


def reference_filter(sos: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Plain-Python transposed direct form II, one sample at a time, primed at x[0]."""
    out = np.empty(x.shape)
    for c in range(x.shape[1]):
        x0 = float(x[0, c])
        z = [[0.0, 0.0] for _ in sos]
        z[0] = [(sos[0, 1] + sos[0, 2]) * x0, sos[0, 2] * x0]
        for t in range(x.shape[0]):
            v = float(x[t, c])
            for s, (b0, b1, b2, _, a1, a2) in enumerate(sos):
                y = b0 * v + z[s][0]
                z[s][0] = b1 * v - a1 * y + z[s][1]
                z[s][1] = b2 * v - a2 * y
                v = y
            out[t, c] = v
    return out


def signal(n: int, channels: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None] / 2000.0
    offset = rng.uniform(-500, 500, channels)  # electrode DC offsets
    drift = 30.0 * np.sin(2 * np.pi * 2.0 * t + rng.uniform(0, 6, channels))
    return (offset + drift + 5.0 * rng.standard_normal((n, channels))).astype(np.float32)


def gain(sos: np.ndarray, f: float, fs: float = 2000.0) -> float:
    z = np.exp(-2j * np.pi * f / fs)
    h = 1.0
    for b0, b1, b2, a0, a1, a2 in sos:
        h *= (b0 + b1 * z + b2 * z * z) / (a0 + a1 * z + a2 * z * z)
    return abs(h)


def test_design_is_butterworth():
    sos = butter_highpass_sos(40.0, 2000.0, 4)
    assert sos.shape == (2, 6)
    assert gain(sos, 40.0) == pytest.approx(1 / math.sqrt(2), rel=1e-9)  # -3 dB at the cut-off
    assert gain(sos, 999.0) == pytest.approx(1.0, abs=1e-6)
    assert gain(sos, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert gain(sos, 20.0) == pytest.approx((20 / 40) ** 4, rel=0.1)  # 24 dB/octave below
    poles = np.concatenate([np.roots([1, a1, a2]) for *_, a1, a2 in sos])
    assert np.all(np.abs(poles) < 1)


@pytest.mark.parametrize("order", [0, 3, -2])
def test_design_rejects_odd_orders(order):
    with pytest.raises(ValueError, match="order"):
        butter_highpass_sos(40.0, 2000.0, order)


def test_design_rejects_bad_cutoff():
    with pytest.raises(ValueError, match="cut-off"):
        butter_highpass_sos(1000.0, 2000.0, 4)


def test_matches_sample_by_sample_reference():
    x = signal(3000)
    hp = HighPass(40.0)
    got = hp.process(x)
    ref = reference_filter(hp.sos, x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # DC offsets are gone without a start-up transient, the 2 Hz drift is attenuated
    assert np.abs(got).max() < 40.0


@pytest.mark.parametrize("chunk", [1, 7, 10, 40, 333, 2000])
def test_chunk_split_invariance(chunk):
    x = signal(4100, seed=1)
    whole = HighPass(40.0).process(x)
    hp = HighPass(40.0)
    parts = [hp.process(x[i: i + chunk]) for i in range(0, len(x), chunk)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_in_place_and_reset():
    x = signal(500, seed=2)
    hp = HighPass(40.0)
    first = hp.process(x)
    hp.reset()
    buf = x.copy()
    assert hp.process(buf, out=buf) is buf
    np.testing.assert_array_equal(buf, first)


def test_channels_are_independent():
    x = signal(800, seed=3)
    hp = HighPass(40.0)
    both = hp.process(x)
    y = x.copy()
    y[:, 5] = 0.0
    other = HighPass(40.0).process(y)
    np.testing.assert_array_equal(np.delete(both, 5, 1), np.delete(other, 5, 1))


def test_rejects_wrong_shape():
    with pytest.raises(ValueError):
        HighPass(40.0).process(np.zeros((10, 8), np.float32))


def test_matches_scipy_when_available():
    sig = pytest.importorskip("scipy.signal", reason="SciPy is optional (not a dependency)")
    ours = butter_highpass_sos(40.0, 2000.0, 4)
    theirs = sig.butter(4, 40.0, "highpass", fs=2000.0, output="sos")  # gain all in section 0
    freqs = np.linspace(0.5, 999.5, 200)
    _, h_ours = sig.sosfreqz(ours, worN=freqs, fs=2000.0)
    _, h_theirs = sig.sosfreqz(theirs, worN=freqs, fs=2000.0)
    np.testing.assert_allclose(h_ours, h_theirs, rtol=1e-9, atol=1e-12)
    x = signal(2000, seed=4).astype(np.float64)
    zi = sig.sosfilt_zi(theirs)[:, :, None] * x[0][None, None, :]  # (S, 2, C)
    ref, _ = sig.sosfilt(theirs, x, axis=0, zi=zi)
    got = HighPass(40.0).process(x.astype(np.float32))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
