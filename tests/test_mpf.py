"""Incremental MPF (`emgd.mpf`) against the offline NumPy definition (`emgd.mpf_reference`).

The signals are generated here (seeded): a broadband floor of 2.46 µVrms on every channel, as
a real band's electrode noise gives, plus band-limited bursts of tens to hundreds of µV on
some channels. Without the floor the band matrices become nearly singular and no two
implementations agree (``runtime-facts.md``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emgd.mpf import MpfExtractor, warmup
from emgd.mpf_linalg import log_symmetric, log_workspace
from emgd.mpf_reference import (
    HANDWRITING,
    WRIST,
    band_bins,
    band_matrices,
    frame_last_sample,
    hann_symmetric,
    matrix_log,
    mpf_offline,
    n_frames,
)

TOL = 1e-5
N_TEN_SECONDS = 20_000


def emg(n: int, seed: int = 0) -> np.ndarray:
    """(n, 16) float32 µV: white floor on every channel plus band-limited bursts on some."""
    rng = np.random.default_rng(seed)
    x = 2.46 * rng.standard_normal((n, 16))
    t = np.arange(n)
    for ch in rng.choice(16, size=6, replace=False):
        noise = rng.standard_normal(n + 20)
        band = np.convolve(noise, np.ones(4) / 4, "same") - np.convolve(noise, np.ones(20) / 20,
                                                                           "same")
        env = np.zeros(n)
        for _ in range(max(1, n // 4000)):
            centre, width = rng.uniform(0, n), rng.uniform(400, 2000)
            env += rng.uniform(20, 300) * np.exp(-0.5 * ((t - centre) / (0.3 * width)) ** 2)
        x[:, ch] += env * band[10:10 + n] / band.std()
    return x.astype(np.float32)


def stream(ex: MpfExtractor, x: np.ndarray, chunk: int):
    """Push x in chunks; return (hw frames, hw idx, wrist frames, wrist idx), concatenated."""
    hw, ihw, wr, iwr = [], [], [], []
    for start in range(0, len(x), chunk):
        n_hw, n_wr = ex.push(x[start:start + chunk])
        hw.append(ex.out_hw[:n_hw].copy())
        ihw.append(ex.idx_hw[:n_hw].copy())
        wr.append(ex.out_wrist[:n_wr].copy())
        iwr.append(ex.idx_wrist[:n_wr].copy())
    return (np.concatenate(hw), np.concatenate(ihw), np.concatenate(wr), np.concatenate(iwr))


@pytest.fixture(scope="module")
def recording():
    x = emg(N_TEN_SECONDS, seed=1)
    return x, mpf_offline(x, HANDWRITING), mpf_offline(x, WRIST)


@pytest.mark.parametrize("chunk", [1, 7, 10, 40, 333, 2000])
def test_streaming_equals_offline(recording, chunk):
    x, ref_hw, ref_wr = recording
    hw, ihw, wr, iwr = stream(MpfExtractor(), x, chunk)
    assert len(hw) == n_frames(len(x), HANDWRITING) == (len(x) - 214) // 40 + 1 == len(ref_hw)
    assert len(wr) == n_frames(len(x), WRIST) == (len(x) - 254) // 40 + 1 == len(ref_wr)
    np.testing.assert_array_equal(ihw, 40 * np.arange(len(hw)) + 213)
    np.testing.assert_array_equal(iwr, 40 * np.arange(len(wr)) + 253)
    assert hw.dtype == wr.dtype == np.float32
    assert np.abs(hw - ref_hw).max() < TOL
    assert np.abs(wr - ref_wr).max() < TOL


def test_signal_is_realistic(recording):
    x, ref_hw, _ = recording
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=0))
    assert rms.min() > 2.0 and rms.max() > 20.0  # a floor everywhere, bursts somewhere
    assert np.abs(ref_hw).max() > 10.0  # features far from trivially small


@pytest.mark.parametrize("setting", [HANDWRITING, WRIST], ids=lambda s: s.name)
def test_left_context_edges(setting):
    x = emg(setting.left_context + 1, seed=2)
    for n, expected in ((setting.left_context, 0), (setting.left_context + 1, 1)):
        ref = mpf_offline(x[:n], setting)
        ex = MpfExtractor(handwriting=setting is HANDWRITING, wrist=setting is WRIST)
        got = ex.push(x[:n])[0 if setting is HANDWRITING else 1]
        assert len(ref) == n_frames(n, setting) == got == expected
        if expected:
            out = ex.out_hw if setting is HANDWRITING else ex.out_wrist
            idx = ex.idx_hw if setting is HANDWRITING else ex.idx_wrist
            assert idx[0] == setting.left_context == frame_last_sample(0, setting)
            assert np.abs(out[0] - ref[0]).max() < TOL


@pytest.mark.parametrize("n", [0, 1, 63, 64, 213, 214, 215, 253, 254, 255, 293, 294, 1000, 1013])
def test_frame_counts_match_the_formula(n):
    ex = MpfExtractor()
    assert ex.push(emg(n, seed=3)) == (n_frames(n, HANDWRITING), n_frames(n, WRIST))
    assert n_frames(n, HANDWRITING) == (max((n - 214) // 40 + 1, 0) if n >= 214 else 0)
    assert n_frames(n, WRIST) == (max((n - 254) // 40 + 1, 0) if n >= 254 else 0)


def test_all_zero_input_gives_zero_features():
    x = np.zeros((1000, 16), np.float32)
    hw, _, wr, _ = stream(MpfExtractor(), x, 333)
    assert len(hw) and len(wr)
    assert not hw.any() and not wr.any()
    assert not mpf_offline(x, HANDWRITING).any()


def test_dead_channel_follows_the_log_zero_rule():
    x = emg(2000, seed=4)
    x[:, 5] = 0.0
    ref = mpf_offline(x, WRIST)
    _, _, wr, _ = stream(MpfExtractor(), x, 7)
    assert not ref[:, :, 5, :].any() and not ref[:, :, :, 5].any()
    assert not wr[:, :, 5, :].any() and not wr[:, :, :, 5].any()
    assert np.abs(wr - ref).max() < TOL


def test_reference_matches_the_definition_written_as_sums():
    """One frame's band matrices against the formula of §2 evaluated with explicit sums."""
    x = emg(400, seed=5).astype(np.float64)
    k, w_len = 2, HANDWRITING.n_stft
    w = hann_symmetric()
    g = np.sqrt(np.sum(w ** 2))
    n = np.arange(64)
    bins = band_bins()
    assert bins == ((1,), (1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11, 12), tuple(range(13, 23)),
                    tuple(range(23, 33)))
    expected = np.zeros((6, 16, 16))
    for b, fs in enumerate(bins):
        for f in fs:
            s = np.zeros((16, 16), complex)
            for t in range(4 * k, 4 * k + w_len):
                xf = (w[:, None] * x[10 * t + n] * np.exp(-2j * np.pi * f * n / 64)[:, None])
                spec = xf.sum(axis=0) / g
                s += np.outer(spec, spec.conj())
            expected[b] += np.abs(s / w_len) ** 2 / len(fs)
    got = band_matrices(x, HANDWRITING)[k]
    assert np.abs(got - expected).max() < 1e-12 * np.abs(expected).max()


def test_graded_band_matrices_are_decomposed_accurately():
    """Both matrix logs against 40-digit arithmetic on the worst-conditioned band matrix."""
    mpmath = pytest.importorskip("mpmath")
    p = band_matrices(emg(2000, seed=1), WRIST).reshape(-1, 16, 16)
    lam = np.linalg.eigvalsh(p)
    a = p[np.argmax(lam[:, -1] / lam[:, 0])]
    assert np.linalg.cond(a) > 1e9  # graded: channel amplitudes differ
    mpmath.mp.dps = 40
    ev, q = mpmath.eigsy(mpmath.matrix(a.tolist()))
    truth = np.array((q * mpmath.diag([mpmath.log(e) for e in ev]) * q.T).tolist(), float)
    out, (work, order) = np.zeros((16, 16)), log_workspace(16)
    log_symmetric(a, out, work, order)
    assert np.abs(matrix_log(a) - truth).max() < 1e-10
    assert np.abs(out - truth).max() < 1e-10


def test_log_symmetric_against_numpy_and_the_rules():
    rng = np.random.default_rng(6)
    out, (work, order) = np.zeros((16, 16)), log_workspace(16)
    for trial in range(200):
        q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
        lam = 10.0 ** rng.uniform(-4, 4, 16)  # condition numbers up to 1e8
        if trial % 4 == 0:
            lam[3] = -lam[3]  # negative eigenvalue -> log := 0
        a = (q * lam) @ q.T
        a = 0.5 * (a + a.T) * 10.0 ** rng.uniform(-3, 12)  # any scale: no overflow, no loss
        log_symmetric(a, out, work, order)
        lam_a, vec = np.linalg.eigh(a)
        expected = (vec * np.where(lam_a > 0, np.log(np.abs(lam_a)), 0.0)) @ vec.T
        assert np.abs(out - expected).max() < 1e-6
    log_symmetric(np.zeros((16, 16)), out, work, order)
    assert not out.any()


def test_nonfinite_samples_are_a_gap_and_never_reach_the_features():
    x = emg(3000, seed=7)
    bad = x.copy()
    bad[1000, 3] = np.nan
    bad[1001:1004, 0] = np.inf
    bad[2500, 15] = -np.inf
    ex = MpfExtractor()
    hw, ihw, wr, iwr = stream(ex, bad, 333)
    assert np.isfinite(hw).all() and np.isfinite(wr).all()
    assert ex.nonfinite_samples == 5 and ex.resets == 2
    # each finite segment is a fresh stream, anchored at its own first sample
    for lo, hi in ((0, 1000), (1004, 2500), (2501, 3000)):
        ref = mpf_offline(x[lo:hi], HANDWRITING)
        sel = (ihw >= lo) & (ihw < hi)
        assert sel.sum() == len(ref)
        np.testing.assert_array_equal(ihw[sel], lo + 40 * np.arange(len(ref)) + 213)
        assert np.abs(hw[sel] - ref).max() < TOL
    assert len(wr) == sum(n_frames(n, WRIST) for n in (1000, 1496, 499))


def test_reset_starts_a_new_phase():
    a, b = emg(777, seed=8), emg(900, seed=9)
    ex = MpfExtractor()
    stream(ex, a, 100)
    ex.reset()
    assert ex.resets == 1 and ex.stream_samples == 0
    hw, ihw, wr, iwr = stream(ex, b, 40)
    assert ex.stream_start == len(a) and ex.samples_seen == len(a) + len(b)
    np.testing.assert_array_equal(iwr, len(a) + 253 + 40 * np.arange(len(wr)))
    assert np.abs(hw - mpf_offline(b, HANDWRITING)).max() < TOL
    assert np.abs(wr - mpf_offline(b, WRIST)).max() < TOL


@pytest.mark.parametrize("hw_on, wr_on", [(True, False), (False, True)])
def test_one_setting_only(hw_on, wr_on):
    x = emg(1500, seed=10)
    ex = MpfExtractor(handwriting=hw_on, wrist=wr_on)
    hw, _, wr, _ = stream(ex, x, 333)
    assert (len(hw) > 0) == hw_on and (len(wr) > 0) == wr_on
    if hw_on:
        assert np.abs(hw - mpf_offline(x, HANDWRITING)).max() < TOL
    else:
        assert np.abs(wr - mpf_offline(x, WRIST)).max() < TOL
    assert ex.frames_hw == len(hw) and ex.frames_wrist == len(wr)


def test_push_limits_and_input_conversion():
    ex = MpfExtractor(max_push=80)
    with pytest.raises(ValueError, match="max_push"):
        ex.push(np.zeros((81, 16), np.float32))
    with pytest.raises(ValueError, match="shape"):
        ex.push(np.zeros((10, 8), np.float32))
    x = emg(400, seed=11)
    ref = mpf_offline(x, WRIST)
    xf = np.asfortranarray(x.astype(np.float64))  # converted (this path allocates)
    _, _, wr, _ = stream(ex, xf, 80)
    assert np.abs(wr - ref).max() < TOL
    assert ex.out_hw.shape == (2, 6, 16, 16)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=40))
def test_any_chunking_gives_the_same_frames(chunks):
    x = emg(900, seed=12)
    ex = MpfExtractor(max_push=120)
    got_hw, got_wr, start = [], [], 0
    while start < len(x):
        for c in chunks:
            n_hw, n_wr = ex.push(x[start:start + c])
            got_hw.append(ex.out_hw[:n_hw].copy())
            got_wr.append(ex.out_wrist[:n_wr].copy())
            start += c
    ref_hw, ref_wr = mpf_offline(x, HANDWRITING), mpf_offline(x, WRIST)
    hw, wr = np.concatenate(got_hw), np.concatenate(got_wr)
    assert len(hw) == len(ref_hw) and len(wr) == len(ref_wr)
    assert np.abs(hw - ref_hw).max() < TOL and np.abs(wr - ref_wr).max() < TOL


def test_warmup_returns_seconds():
    assert 0.0 <= warmup() < 120.0
