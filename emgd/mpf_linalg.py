"""Matrix logarithm of small symmetric matrices in Numba, without LAPACK call overhead.

MPF needs six 16×16 symmetric eigendecompositions per frame per setting. LAPACK's
``syevd`` costs about 19 µs each at this size (mostly per-call overhead, measured through
SciPy and through Numba's ``np.linalg.eigh``), which alone would take 12 × 19 µs per 40-sample
hop. This module does the same two classical steps in place, with no allocation:

1. Householder reduction to tridiagonal form ``A = Q T Qᵀ`` (Golub & Van Loan §8.3.1);
2. implicit QL iterations with a Wilkinson-type shift on T, rotating the rows of Qᵀ
   (the EISPACK ``tql2`` scheme), so that row i of the result is the eigenvector of
   eigenvalue i.

Both steps are backward stable (the result is exact for ``A + E`` with ``|E| ~ 1e-16 |A|``),
as LAPACK's are; the float64 test against ``numpy.linalg.eigh`` is in ``tests/test_mpf.py``.

Two exact transformations come first; the reference (`emgd.mpf_reference.matrix_log`)
applies the same two:

- rows and columns that are exactly zero are taken out: their exact eigenvalue is 0
  (log := 0) with a unit eigenvector, which rounding inside a full decomposition would
  otherwise turn into ±1e-14 and a log of about -31 (a dead channel);
- the remaining rows/columns are ordered by decreasing diagonal. MPF band matrices are
  ill-conditioned because channels differ in amplitude (entries scale with amplitude⁴), i.e.
  they are *graded*; in decreasing-diagonal order the Householder + QL path (and LAPACK's)
  resolves the small eigenvalues to near-relative accuracy. Measured on band matrices of
  condition 3e10-1e11 against 40-digit mpmath: error 1e-14..7e-13 ordered, 1e-6..2e-5 in
  channel order (LAPACK ``syevd`` too).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

MAX_QL_ITERATIONS = 60
LN2 = math.log(2.0)


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def _tridiagonalize(a, n, d, e, qt, v, w):
    """Reduce a[:n, :n] (symmetric, destroyed) to T: diagonal d, off-diagonal e; qt = Qᵀ."""
    for i in range(n):
        for j in range(n):
            qt[i, j] = 1.0 if i == j else 0.0
    for k in range(n - 2):
        x0 = a[k + 1, k]
        sigma = 0.0
        for i in range(k + 2, n):
            sigma += a[i, k] * a[i, k]
        if sigma == 0.0:  # already tridiagonal in this column
            e[k] = x0
            continue
        norm = np.sqrt(x0 * x0 + sigma)
        alpha = -norm if x0 >= 0.0 else norm
        v[k + 1] = x0 - alpha
        for i in range(k + 2, n):
            v[i] = a[i, k]
        beta = 2.0 / (v[k + 1] * v[k + 1] + sigma)
        pv = 0.0
        for i in range(k + 1, n):  # w = beta A22 v, then w -= (beta/2)(wᵀv) v
            s = 0.0
            for j in range(k + 1, n):
                s += a[i, j] * v[j]
            w[i] = beta * s
            pv += w[i] * v[i]
        half = 0.5 * beta * pv
        for i in range(k + 1, n):
            w[i] -= half * v[i]
        for i in range(k + 1, n):  # A22 <- H A22 H = A22 - v wᵀ - w vᵀ
            for j in range(k + 1, n):
                a[i, j] -= v[i] * w[j] + w[i] * v[j]
        e[k] = alpha
        for j in range(n):  # Qᵀ <- H Qᵀ (rows k+1..n-1)
            w[j] = 0.0
        for i in range(k + 1, n):
            for j in range(n):
                w[j] += v[i] * qt[i, j]
        for i in range(k + 1, n):
            f = beta * v[i]
            for j in range(n):
                qt[i, j] -= f * w[j]
    if n >= 2:
        e[n - 2] = a[n - 1, n - 2]
    e[n - 1] = 0.0
    for i in range(n):
        d[i] = a[i, i]


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def _ql_implicit(n, d, e, zt):
    """Diagonalise the tridiagonal (d, e) in place; rotations applied to the rows of zt."""
    for lo in range(n):
        iterations = 0
        while True:
            m = lo
            while m < n - 1:
                dd = abs(d[m]) + abs(d[m + 1])
                if abs(e[m]) + dd == dd:
                    break
                m += 1
            if m == lo:
                break
            iterations += 1
            if iterations > MAX_QL_ITERATIONS:
                raise RuntimeError("symmetric eigensolver did not converge")
            g = (d[lo + 1] - d[lo]) / (2.0 * e[lo])
            r = np.sqrt(g * g + 1.0) if abs(g) < 1e150 else abs(g)
            g = d[m] - d[lo] + e[lo] / (g + (r if g >= 0.0 else -r))
            s = 1.0
            c = 1.0
            p = 0.0
            underflow = False
            for i in range(m - 1, lo - 1, -1):
                f = s * e[i]
                b = c * e[i]
                r = np.sqrt(f * f + g * g)
                e[i + 1] = r
                if r == 0.0:  # split: restart the sweep on the smaller problem
                    d[i + 1] -= p
                    e[m] = 0.0
                    underflow = True
                    break
                inv = 1.0 / r
                s = f * inv
                c = g * inv
                g = d[i + 1] - p
                r = (d[i] - g) * s + 2.0 * c * b
                p = s * r
                d[i + 1] = g + p
                g = c * r - b
                for k in range(n):
                    f = zt[i + 1, k]
                    zt[i + 1, k] = s * zt[i, k] + c * f
                    zt[i, k] = c * zt[i, k] - s * f
            if underflow:
                continue
            d[lo] -= p
            e[lo] = g
            e[m] = 0.0


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})
def log_symmetric(p, out, work, order):
    """out = V diag(log λ) Vᵀ of the symmetric (C, C) matrix p; log λ := 0 for λ <= 0.

    Scratch: ``work`` float64 (C + 4, C), ``order`` int64 (C,) (see `log_workspace`).
    """
    c_n = p.shape[0]
    a = work[:c_n]  # Qᵀ, then the eigenvectors (rows)
    d = work[c_n]
    e = work[c_n + 1]
    v = work[c_n + 2]
    w = work[c_n + 3]
    n = 0
    for i in range(c_n):  # active rows: not exactly zero
        for j in range(c_n):
            if p[i, j] != 0.0:
                order[n] = i
                n += 1
                break
    out[:] = 0.0
    if n == 0:
        return
    for i in range(1, n):  # stable insertion sort by decreasing diagonal (grading)
        key = order[i]
        j = i - 1
        while j >= 0 and p[order[j], order[j]] < p[key, key]:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = key
    # pack the active block into out, scaled by a power of two (exact) so that its largest
    # entry is below 1 and the squares in the QL rotations cannot overflow
    amax = 0.0
    for i in range(c_n):
        for j in range(c_n):
            amax = max(amax, abs(p[i, j]))
    exponent = math.frexp(amax)[1]
    scale = math.ldexp(1.0, -exponent)
    for i in range(n):
        for j in range(n):
            out[i, j] = p[order[i], order[j]] * scale
    _tridiagonalize(out, n, d, e, a, v, w)
    _ql_implicit(n, d, e, a)
    for i in range(n):
        d[i] = np.log(d[i]) + exponent * LN2 if d[i] > 0.0 else 0.0
    out[:] = 0.0
    for k in range(n):  # out (packed) = Σ_k log λ_k z_k z_kᵀ
        for i in range(n):
            f = a[k, i] * d[k]
            for j in range(n):
                out[i, j] += f * a[k, j]
    a[:n, :n] = out[:n, :n]  # scatter back to the original rows/columns
    out[:] = 0.0
    for i in range(n):
        for j in range(n):
            out[order[i], order[j]] = a[i, j]


def log_workspace(n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Scratch for `log_symmetric`: (float64 (C + 4, C), int64 (C,))."""
    return np.zeros((n_channels + 4, n_channels)), np.zeros(n_channels, dtype=np.int64)
