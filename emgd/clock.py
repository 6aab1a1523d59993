"""Device sample index → host time (``time.monotonic_ns()``), fitted online.

What is observed
----------------
For every block the pipeline calls ``update(first_sample, n, t_recv_ns)``. The block's
last sample, index ``k = first_sample + n - 1``, was taken at an unknown host time
``T(k)`` and its bytes arrived at ``t_recv = T(k) + L``, where the transport latency
``L >= L_min`` is noisy (jitter) and sometimes large (BLE bursts: packets held for tens of
ms, then delivered together). ``T`` is a straight line, ``T(k) = T0 + k / f_dev``, with
the device rate ``f_dev`` off the nominal rate by the crystal's drift (tens to a few
hundred ppm, slowly varying).

What is estimated ("the truth")
-------------------------------
Only ``T(k) + L`` is ever observed, so a *constant* latency ``L_min`` cannot be told
apart from a constant clock offset: no host-side method can observe it without a
device-side time reference. ClockMap therefore estimates

    ``time_ns(k) ≈ T(k) + L_min - latency_ns``

i.e. the time sample ``k`` would have arrived over the fastest path seen, minus an
optional calibrated constant ``latency_ns`` (default 0; set it from a loopback or
marker measurement to get absolute sampling times). The tests compare against exactly
this quantity: true sampling time plus the simulator's base latency. The bias is the same
for every sample, so intervals between samples, and between samples and host events
measured with ``monotonic_ns``, are unaffected by it.

Method: lower envelope, windowed linear programme
------------------------------------------------
Residuals ``y = (t_recv - t_ref) - x·P`` (``x = k - k_ref``, ``P = 1e9/rate`` nominal
ns per sample) lie *above* the line ``α + βx`` that the truth traces out; latency only
ever adds. Per bucket of ``bucket_s`` (0.5 s) the lowest point is kept; over the last
``window_s`` (20 s) of buckets the line below all points that is highest at their mean
``x`` is taken (the LP of Moon, Skelly & Towsley for clock skew; its solution is the
edge of the lower convex hull that spans the mean). Jitter and bursts only raise
points, so they cannot drag the line; a burst shorter than a bucket does not move any
bucket's minimum. The fit runs once per bucket, over at most ``window_s / bucket_s``
points: O(1) amortised per update. Between fits, any new point below the line lowers the
line at once (keeping the slope), so the estimate never sits above a point seen.

Output: monotonic, slewed, frozen for the past
----------------------------------------------
Queries do not read the fitted line directly. The output is a continuous,
piecewise-linear, strictly increasing function of the index, stored as segments
``(k_anchor, t_anchor, slope)``. When the fit moves, a new segment is started at the
first index of the current update (indices already handed out keep their times), with
a slope that steers the output towards the fit: ``slope = (P + β) - e / H`` where ``e`` is
the output's error at the anchor and ``H`` corresponds to ``slew_s`` (0.5 s), the
correction clamped to ``max_slew`` (5 %) of the rate. The output is never stepped:
times never go backwards for queries in sample order, and a given index maps to the
same time for as long as its segment is held (the last 256 segments: tens of seconds);
older indices are extrapolated from the oldest segment. Only the first update after
construction or ``reset()`` places the output directly on the observation
(re-anchoring); call ``reset()`` on a gap or reconnect, because the device index or its
clock may have restarted.

Unix time
---------
``unix_time`` converts through one ``(time.time_ns(), time.monotonic_ns())`` pair captured
in the constructor. That is the only use of the wall clock in emgd: a later step of the
wall clock (NTP, the user) is deliberately not followed, so event times stay consistent
with the monotonic clock. Before the first update, ``time_ns`` maps index 0 to the
construction time at the nominal rate (a placeholder, not an estimate).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

__all__ = ["ClockMap"]

_SEGMENTS = 256  # output segments kept (replans are rate-limited, so this spans >= 25 s)
_MIN_FIT_BUCKETS = 4  # buckets needed before the drift is estimated (else: nominal)
_REPLAN_SAMPLES_S = 0.1  # at most one new output segment per this much signal
_TOLERANCE_NS = 200.0  # output error below which no new segment is started


class ClockMap:
    """Online map from device sample index to host monotonic ns (see module docstring)."""

    def __init__(self, rate: float = 2000.0, *, window_s: float = 20.0,
                 bucket_s: float = 0.5, slew_s: float = 0.5, max_slew: float = 0.05,
                 max_drift_ppm: float = 1000.0, latency_ns: int = 0) -> None:
        if rate <= 0 or bucket_s <= 0 or window_s < 2 * bucket_s or slew_s <= 0:
            raise ValueError("need rate > 0, bucket_s > 0, window_s >= 2*bucket_s, slew_s > 0")
        if not 0 < max_slew < 0.5:
            raise ValueError(f"max_slew must be in (0, 0.5), got {max_slew}")
        self.rate = float(rate)
        self._period = 1e9 / self.rate
        self._bucket = max(1, round(bucket_s * self.rate))
        self._window = max(2 * self._bucket, round(window_s * self.rate))
        self._slew_samples = slew_s * self.rate
        self._max_slew = float(max_slew)
        self._max_beta = max_drift_ppm * 1e-6 * self._period
        self._replan = max(1, round(_REPLAN_SAMPLES_S * self.rate))
        self._latency_ns = int(latency_ns)
        # The one wall-clock reading in emgd, paired with the monotonic clock (see above).
        self._wall0_ns = time.time_ns()
        self._mono0_ns = time.monotonic_ns()
        # output segments: anchors sorted, the last one mirrored in Python scalars
        self._seg_k = np.zeros(_SEGMENTS, np.int64)
        self._seg_t = np.zeros(_SEGMENTS, np.int64)
        self._seg_s = np.zeros(_SEGMENTS, np.float64)
        self._nseg = 0
        self._scratch = np.empty(0, np.float64)
        self._buckets: deque[tuple[float, float]] = deque(maxlen=self._window // self._bucket + 1)
        self.updates = 0  # observations used
        self.ignored = 0  # observations that did not advance the index (no reset between)
        self.resets = 0
        self._push_segment(0, self._mono0_ns, self._period)
        self.reset()
        self.resets = 0

    # ------------------------------------------------------------------ estimation
    def reset(self) -> None:
        """Forget the fit; the next update re-anchors the output (it may step, even back).

        Until then, queries use the mapping from before the reset."""
        self._k_ref: int | None = None
        self._t_ref = 0
        self._alpha = 0.0
        self._beta = 0.0
        self._last_x = -1
        self._cur_b = 0
        self._cur_x = 0.0
        self._cur_y = 0.0
        self._buckets.clear()
        self._dirty = False
        self.resets += 1

    def update(self, first_sample: int, n: int, t_recv_ns: int) -> None:
        """One observation: samples ``first_sample .. first_sample + n - 1`` had all
        arrived by ``t_recv_ns`` (host monotonic ns)."""
        if n <= 0:
            return
        last = int(first_sample) + int(n) - 1
        if self._k_ref is None:
            self._anchor(int(first_sample), last, int(t_recv_ns))
            return
        x = last - self._k_ref
        if x <= self._last_x:
            self.ignored += 1
            return
        self._last_x = x
        self.updates += 1
        y = float(t_recv_ns - self._t_ref) - x * self._period
        beta = self._beta
        b = x // self._bucket
        if b != self._cur_b:
            self._buckets.append((self._cur_x, self._cur_y))
            self._cur_b, self._cur_x, self._cur_y = b, float(x), y
            self._fit(x)
        elif y - beta * x < self._cur_y - beta * self._cur_x:
            self._cur_x, self._cur_y = float(x), y
        if y < self._alpha + self._beta * x:  # the line must stay below every point
            self._alpha = y - self._beta * x
            self._dirty = True
        self._steer(int(first_sample))

    def _anchor(self, first: int, last: int, t_recv_ns: int) -> None:
        """First observation after a reset: the output jumps onto it."""
        self._k_ref, self._t_ref = last, t_recv_ns
        self._last_x = 0
        self.updates += 1
        self._nseg = 0
        self._push_segment(first, self._target(first), self._period)

    def _fit(self, x_now: int) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] < x_now - self._window:
            buckets.popleft()
        if len(buckets) >= _MIN_FIT_BUCKETS:
            beta = _lp_slope(buckets)
            self._beta = min(max(beta, -self._max_beta), self._max_beta)
        beta = self._beta
        alpha = self._cur_y - beta * self._cur_x
        for bx, by in buckets:
            alpha = min(alpha, by - beta * bx)
        self._alpha = alpha
        self._dirty = True

    def _target(self, k: int) -> int:
        """The fitted line at index ``k``, in host ns."""
        x = k - self._k_ref  # type: ignore[operator]
        return self._t_ref + round(x * (self._period + self._beta) + self._alpha) - self._latency_ns

    def _steer(self, k_a: int) -> None:
        """Maybe start a new output segment at ``k_a`` that slews towards the fit."""
        if k_a < self._lk + self._replan:
            return
        t_a = self._lt + round((k_a - self._lk) * self._ls)
        err = t_a - self._target(k_a)
        if not self._dirty and abs(err) < _TOLERANCE_NS:
            return
        rate = self._period + self._beta
        limit = self._max_slew * rate
        corr = 0.0 if abs(err) < _TOLERANCE_NS else min(max(err / self._slew_samples, -limit), limit)
        self._dirty = False
        self._push_segment(k_a, t_a, rate - corr)

    def _push_segment(self, k: int, t: int, slope: float) -> None:
        if self._nseg == _SEGMENTS:  # keep the newer half (in-place, no allocation)
            half = _SEGMENTS // 2
            self._seg_k[:half] = self._seg_k[half:]
            self._seg_t[:half] = self._seg_t[half:]
            self._seg_s[:half] = self._seg_s[half:]
            self._nseg = half
        i = self._nseg
        self._seg_k[i], self._seg_t[i], self._seg_s[i] = k, t, slope
        self._nseg = i + 1
        self._lk, self._lt, self._ls = k, t, slope

    # ------------------------------------------------------------------ queries
    @property
    def drift_ppm(self) -> float:
        """Device rate error: positive when the band samples faster than ``rate``."""
        return (self._period / (self._period + self._beta) - 1.0) * 1e6

    def time_ns(self, index: int) -> int:
        """Host monotonic ns of device sample ``index``."""
        index = int(index)
        if index >= self._lk:
            return self._lt + round((index - self._lk) * self._ls)
        j = max(0, int(np.searchsorted(self._seg_k[:self._nseg], index, side="right")) - 1)
        return int(self._seg_t[j]) + round((index - int(self._seg_k[j])) * float(self._seg_s[j]))

    def times_ns(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`time_ns` for a 1-D int64 array into ``out`` (int64, same
        length); returns ``out``. No allocation when all indices are at or after the
        newest segment's anchor (the usual case: the block just received)."""
        m = indices.shape[0]
        if m == 0:
            return out
        if indices.min() >= self._lk:
            if self._scratch.shape[0] < m:
                self._scratch = np.empty(max(m, 2 * self._scratch.shape[0]), np.float64)
            s = self._scratch[:m]
            np.subtract(indices, self._lk, out=s, casting="unsafe")
            np.multiply(s, self._ls, out=s)
            np.rint(s, out=s)
            np.copyto(out, s, casting="unsafe")
            np.add(out, self._lt, out=out)
            return out
        nseg = self._nseg
        j = np.searchsorted(self._seg_k[:nseg], indices, side="right") - 1
        np.maximum(j, 0, out=j)
        delta = np.rint((indices - self._seg_k[j]) * self._seg_s[j])
        np.add(self._seg_t[j], delta.astype(np.int64), out=out)
        return out

    def unix_time(self, index: int) -> float:
        """Unix time (s) of device sample ``index``, via the constructor's clock pair."""
        return (self.time_ns(index) - self._mono0_ns + self._wall0_ns) / 1e9


def _lp_slope(points: deque[tuple[float, float]]) -> float:
    """Slope of the line below all ``points`` (sorted by x) that is highest at their mean
    x: the lower-hull edge spanning the mean. Coordinates are taken relative to the
    first point to keep the products small."""
    x0, y0 = points[0]
    hull: list[tuple[float, float]] = []
    sx = 0.0
    for px, py in points:
        px -= x0
        py -= y0
        sx += px
        while len(hull) >= 2:
            (ax, ay), (bx, by) = hull[-2], hull[-1]
            if (bx - ax) * (py - ay) - (by - ay) * (px - ax) > 0:
                break
            hull.pop()
        hull.append((px, py))
    xm = sx / len(points)
    for (ax, ay), (bx, by) in zip(hull, hull[1:]):
        if bx >= xm:
            return (by - ay) / (bx - ax)
    (ax, ay), (bx, by) = hull[-2], hull[-1]
    return (by - ay) / (bx - ax)
