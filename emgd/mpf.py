"""Incremental MPF features in Numba: samples in, handwriting and wrist frames out.

The definition (and the offline oracle) is `emgd.mpf_reference`; `docs/features.md` explains
the timing, the gap and non-finite policies and the measured costs. In short:

- every 10 samples of a stream, one 16-channel windowed FFT (bins 1..32; float64, one small
  matrix product against a precomputed Hann-weighted DFT basis), shared by both settings;
- its per-bin cross-spectral products ``X Xᴴ`` (packed lower triangle) are summed into the
  block of 4 STFT frames it belongs to; a ring keeps the last 5 blocks;
- every 40 samples (when STFT frame t with ``t % 4 == 3`` completes) the handwriting window
  (W = 16) is the sum of the newest 4 blocks and the wrist window (W = 20) that plus the one
  before: both windows end at the same STFT frame, so both settings emit at the same sample.
  Window sums are recomputed from the blocks each time (no running sum, so no drift);
- per setting, six 16×16 band matrices in float64, their matrix log by the allocation-free
  Householder + QL of `emgd.mpf_linalg` (log λ := 0 for λ <= 0), and float32 frames written
  into preallocated outputs.

Frame k of a setting covers stream samples ``[40k, 40k + L]`` (L = 213 handwriting, 253 wrist)
and is emitted when sample ``40k + L`` arrives. ``reset()`` starts a new stream (new phase);
a run of samples with any NaN/inf channel is discarded and treated as a gap (reset).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from numba import njit

from emgd.mpf_linalg import log_symmetric, log_workspace
from emgd.mpf_reference import (
    FFT_HOP,
    HANDWRITING,
    MPF_STRIDE,
    N_BANDS,
    N_FFT,
    WRIST,
    band_bins,
    hann_symmetric,
)

log = logging.getLogger(__name__)

N_CH = 16
N_BINS = N_FFT // 2  # bins 1..32 (DC is never used)
N_TRI = N_CH * (N_CH + 1) // 2  # packed lower triangle, row-major: (c, d <= c)
N_BLOCKS = 5  # blocks of 4 STFT frames: the wrist window spans 5, handwriting 4
W_HW = HANDWRITING.n_stft  # 16
W_WR = WRIST.n_stft  # 20
FIRST_T_HW = W_HW - 1  # STFT frame index that completes handwriting frame 0
FIRST_T_WR = W_WR - 1

# Slots of the int64 state vector.
POS, SEEN, NONFINITE, RESETS, BAD, N_HW, N_WR, TOTAL_HW, TOTAL_WR, START = range(10)
N_STATE = 10


def _dft_basis() -> np.ndarray:
    """(64, 64) float64: rows 0..31 give Re X of bins 1..32, rows 32..63 Im X; Hann and 1/g in."""
    w = hann_symmetric()
    g = np.sqrt(np.sum(w * w))
    n = np.arange(N_FFT)
    f = np.arange(1, N_BINS + 1)[:, None]
    phase = 2.0 * np.pi * f * n[None, :] / N_FFT
    return np.ascontiguousarray(np.vstack([np.cos(phase), -np.sin(phase)]) * w / g)


def _bin_bands() -> tuple[np.ndarray, np.ndarray]:
    """For bin f+1: up to two band indices (-1 = none) and each band's 1/len(bins)."""
    to_band = np.full((N_BINS, 2), -1, dtype=np.int64)
    scale = np.zeros(N_BANDS)
    for b, bins in enumerate(band_bins()):
        scale[b] = 1.0 / len(bins)
        for f in bins:
            slot = 0 if to_band[f - 1, 0] < 0 else 1
            to_band[f - 1, slot] = b
    return to_band, scale


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def _stft_products(ring, pos, basis, frame, spec, block_re, block_im):
    """STFT frame ending at phase sample ``pos``; add its lower-triangle X Xᴴ into a block."""
    for n in range(N_FFT):
        src = (pos - (N_FFT - 1) + n) & (N_FFT - 1)
        for c in range(N_CH):
            frame[n, c] = ring[src, c]
    np.dot(basis, frame, spec)
    for f in range(N_BINS):
        for c in range(N_CH):
            ac = spec[f, c]
            bc = spec[N_BINS + f, c]
            q0 = c * (c + 1) // 2
            for d in range(c + 1):
                ad = spec[f, d]
                bd = spec[N_BINS + f, d]
                block_re[f, q0 + d] += ac * ad + bc * bd
                block_im[f, q0 + d] += bc * ad - ac * bd


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def _window_bands(m, blocks_re, blocks_im, hw, wr, to_band, scale, bands_hw, bands_wr):
    """Packed band matrices (lower triangles) of the windows ending with block m."""
    bands_hw[:] = 0.0
    bands_wr[:] = 0.0
    s0 = m % N_BLOCKS
    s1 = (m - 1) % N_BLOCKS
    s2 = (m - 2) % N_BLOCKS
    s3 = (m - 3) % N_BLOCKS
    s4 = (m - 4) % N_BLOCKS
    for f in range(N_BINS):
        b0 = to_band[f, 0]
        b1 = to_band[f, 1] if to_band[f, 1] >= 0 else b0
        w0 = scale[b0]
        w1 = scale[b1] if to_band[f, 1] >= 0 else 0.0
        w0_hw, w1_hw = w0 / (W_HW * W_HW), w1 / (W_HW * W_HW)
        w0_wr, w1_wr = w0 / (W_WR * W_WR), w1 / (W_WR * W_WR)
        for q in range(N_TRI):
            sre = (blocks_re[s0, f, q] + blocks_re[s1, f, q]
                   + blocks_re[s2, f, q] + blocks_re[s3, f, q])
            sim = (blocks_im[s0, f, q] + blocks_im[s1, f, q]
                   + blocks_im[s2, f, q] + blocks_im[s3, f, q])
            if hw:
                p = sre * sre + sim * sim
                bands_hw[b0, q] += p * w0_hw
                bands_hw[b1, q] += p * w1_hw
            if wr:
                sre += blocks_re[s4, f, q]
                sim += blocks_im[s4, f, q]
                p = sre * sre + sim * sim
                bands_wr[b0, q] += p * w0_wr
                bands_wr[b1, q] += p * w1_wr


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def _matrix_log(bands, sym, logm, work, order, out):
    """out[b] = float32 log of each packed band matrix (lower triangle), in float64."""
    for b in range(N_BANDS):
        q = 0
        for c in range(N_CH):
            for d in range(c + 1):
                sym[c, d] = bands[b, q]
                sym[d, c] = bands[b, q]
                q += 1
        log_symmetric(sym, logm, work, order)
        for c in range(N_CH):
            for d in range(N_CH):
                out[b, c, d] = logm[c, d]


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def _push(x, hw, wr, st, ring, basis, frame, spec, blocks_re, blocks_im, to_band, scale,
          bands_hw, bands_wr, sym, logm, work, order, out_hw, idx_hw, out_wr,
          idx_wr):
    """Feed samples ``x`` (n, 16) float32; frames go to out_*/idx_*, their counts to st."""
    st[N_HW] = 0
    st[N_WR] = 0
    for i in range(x.shape[0]):
        here = st[SEEN]
        st[SEEN] = here + 1
        finite = True
        for c in range(N_CH):
            if not np.isfinite(x[i, c]):
                finite = False
        if not finite:  # a gap: drop the sample, restart the phase after the run
            st[NONFINITE] += 1
            if st[BAD] == 0:
                st[BAD] = 1
                st[RESETS] += 1
            st[POS] = 0
            continue
        st[BAD] = 0
        pos = st[POS]
        if pos == 0:
            st[START] = here
        st[POS] = pos + 1
        for c in range(N_CH):
            ring[pos & (N_FFT - 1), c] = x[i, c]
        if pos < N_FFT - 1 or (pos - (N_FFT - 1)) % FFT_HOP != 0:
            continue
        t = (pos - (N_FFT - 1)) // FFT_HOP  # STFT frame just completed
        m = t // 4
        slot = m % N_BLOCKS
        if t % 4 == 0:
            blocks_re[slot] = 0.0
            blocks_im[slot] = 0.0
        _stft_products(ring, pos, basis, frame, spec, blocks_re[slot], blocks_im[slot])
        if t % 4 != 3:
            continue
        do_hw = hw and t >= FIRST_T_HW
        do_wr = wr and t >= FIRST_T_WR
        if not (do_hw or do_wr):
            continue
        _window_bands(m, blocks_re, blocks_im, do_hw, do_wr, to_band, scale, bands_hw, bands_wr)
        if do_hw:
            k = st[N_HW]
            if k >= out_hw.shape[0]:
                raise ValueError("MPF output capacity exceeded")
            _matrix_log(bands_hw, sym, logm, work, order, out_hw[k])
            idx_hw[k] = here
            st[N_HW] = k + 1
            st[TOTAL_HW] += 1
        if do_wr:
            k = st[N_WR]
            if k >= out_wr.shape[0]:
                raise ValueError("MPF output capacity exceeded")
            _matrix_log(bands_wr, sym, logm, work, order, out_wr[k])
            idx_wr[k] = here
            st[N_WR] = k + 1
            st[TOTAL_WR] += 1


class MpfExtractor:
    """Streaming MPF for one band: ``push(samples) -> (n_hw, n_wrist)`` frames ready.

    ``push(x)`` takes float32 µV samples, shape (n, 16), time-major, with
    ``n <= max_push``. After it returns ``(n_hw, n_wr)``:

    - ``out_hw[:n_hw]`` / ``out_wrist[:n_wr]``: float32 frames of shape (6, 16, 16);
    - ``idx_hw[:n_hw]`` / ``idx_wrist[:n_wr]``: int64 index of each frame's last sample,
      counted over every sample ever pushed (``samples_seen`` before the call + the row in x).

    The outputs are overwritten by the next ``push``: copy what you keep. A disabled setting
    always reports 0 frames. No allocation per call when x is already C-contiguous float32.
    """

    def __init__(self, handwriting: bool = True, wrist: bool = True, max_push: int = 4000):
        if max_push < 1:
            raise ValueError(f"max_push must be >= 1, got {max_push}")
        self.handwriting = bool(handwriting)
        self.wrist = bool(wrist)
        self.max_push = int(max_push)
        cap = -(-self.max_push // MPF_STRIDE)  # ceil: frames of one setting are 40 apart
        self._st = np.zeros(N_STATE, dtype=np.int64)
        self._ring = np.zeros((N_FFT, N_CH))
        self._basis = _dft_basis()
        self._frame = np.zeros((N_FFT, N_CH))
        self._spec = np.zeros((N_FFT, N_CH))
        self._blocks_re = np.zeros((N_BLOCKS, N_BINS, N_TRI))
        self._blocks_im = np.zeros((N_BLOCKS, N_BINS, N_TRI))
        self._to_band, self._scale = _bin_bands()
        self._bands_hw = np.zeros((N_BANDS, N_TRI))
        self._bands_wr = np.zeros((N_BANDS, N_TRI))
        self._sym = np.zeros((N_CH, N_CH))
        self._logm = np.zeros((N_CH, N_CH))
        self._work, self._order = log_workspace(N_CH)
        shape = (N_BANDS, N_CH, N_CH)
        self.out_hw = np.zeros((cap if handwriting else 0, *shape), dtype=np.float32)
        self.idx_hw = np.zeros(cap if handwriting else 0, dtype=np.int64)
        self.out_wrist = np.zeros((cap if wrist else 0, *shape), dtype=np.float32)
        self.idx_wrist = np.zeros(cap if wrist else 0, dtype=np.int64)
        self._warned_nonfinite = False

    def push(self, x: np.ndarray) -> tuple[int, int]:
        """Feed (n, 16) float32 samples; returns (handwriting frames, wrist frames) ready."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != N_CH:
            raise ValueError(f"samples must have shape (n, {N_CH}), got {x.shape}")
        if x.shape[0] > self.max_push:
            raise ValueError(f"push of {x.shape[0]} samples exceeds max_push={self.max_push}; "
                             "split the block or raise max_push")
        st = self._st
        _push(x, self.handwriting, self.wrist, st, self._ring, self._basis, self._frame,
              self._spec, self._blocks_re, self._blocks_im, self._to_band, self._scale,
              self._bands_hw, self._bands_wr, self._sym, self._logm, self._work,
              self._order, self.out_hw, self.idx_hw, self.out_wrist, self.idx_wrist)
        if st[NONFINITE] and not self._warned_nonfinite:
            self._warned_nonfinite = True
            log.warning("non-finite EMG samples dropped and treated as a gap (counted in "
                        "nonfinite_samples; logged once)")
        return int(st[N_HW]), int(st[N_WR])

    def reset(self) -> None:
        """Drop all state (a gap): the next sample pushed starts a new stream and phase."""
        self._st[POS] = 0
        self._st[RESETS] += 1

    @property
    def samples_seen(self) -> int:
        """Samples pushed since construction, non-finite ones included (never reset)."""
        return int(self._st[SEEN])

    @property
    def stream_start(self) -> int:
        """Index (in samples_seen terms) of the current stream's first sample."""
        return int(self._st[START])

    @property
    def stream_samples(self) -> int:
        """Samples of the current stream so far (frame phase: frames end at 40k + L)."""
        return int(self._st[POS])

    @property
    def nonfinite_samples(self) -> int:
        """Samples dropped because a channel was NaN or infinite."""
        return int(self._st[NONFINITE])

    @property
    def resets(self) -> int:
        """State resets: reset() calls plus one per run of non-finite samples."""
        return int(self._st[RESETS])

    @property
    def frames_hw(self) -> int:
        """Handwriting frames emitted since construction."""
        return int(self._st[TOTAL_HW])

    @property
    def frames_wrist(self) -> int:
        """Wrist frames emitted since construction."""
        return int(self._st[TOTAL_WR])


def warmup() -> float:
    """Compile the kernels (or load them from Numba's cache); returns the seconds it took.

    Call once before reporting ready. It runs a throwaway extractor over 300 samples of a
    deterministic signal, which goes through every kernel (STFT, both windows, eigh).
    """
    t0 = time.perf_counter()
    ex = MpfExtractor(max_push=300)
    x = np.sin(np.arange(300 * N_CH, dtype=np.float32) * np.float32(0.37)).reshape(300, N_CH)
    ex.push(x)
    return time.perf_counter() - t0
