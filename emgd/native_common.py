"""What emgd's native (Numba) step kernels share: numerics, weight access, the base class.

The kernels themselves: :mod:`emgd.native_lstm` (gestures, wrist) and
:mod:`emgd.native_handwriting`; loading and checking them against their graphs:
:mod:`emgd.native`. Conventions are PyTorch's: LayerNorm eps 1e-5 with the biased variance,
LeakyReLU slope 0.01.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numba import njit

from emgd.errors import ModelError

PRECISIONS = ("int16", "float32")
LN_EPS = 1e-5
LEAKY_SLOPE = 0.01
INT16_MAX = 32767.0

# reassociation lets LLVM vectorise the dot products; no assumptions about inf/NaN
_FM = {"reassoc", "contract", "nsz"}


@njit(nogil=True, cache=True, inline="always", fastmath=_FM)
def _sigmoid(v: float) -> float:
    if v >= 0.0:
        return 1.0 / (1.0 + np.exp(-v))
    e = np.exp(v)
    return e / (1.0 + e)


@njit(nogil=True, cache=True, fastmath=_FM)
def _layer_norm(v, g, b, out):
    n = v.shape[0]
    mean = 0.0
    for i in range(n):
        mean += v[i]
    mean /= n
    var = 0.0
    for i in range(n):
        d = v[i] - mean
        var += d * d
    inv = 1.0 / np.sqrt(var / n + LN_EPS)
    for i in range(n):
        out[i] = np.float32((v[i] - mean) * inv) * g[i] + b[i]


class _Weights:
    """The sidecar's arrays, with errors that name the file and the key."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        self.arrays = arrays
        self.source = source

    def get(self, key: str, shape: tuple[int | None, ...], dtype: type = np.float32
            ) -> np.ndarray:
        if key not in self.arrays:
            raise ModelError(f"{self.source}: native weights lack {key!r}")
        a = np.asarray(self.arrays[key])
        if a.dtype != np.dtype(dtype):
            raise ModelError(f"{self.source}: {key} has dtype {a.dtype}, expected "
                             f"{np.dtype(dtype)}")
        if len(a.shape) != len(shape) or any(e is not None and e != s
                                             for e, s in zip(shape, a.shape)):
            want = "(" + ", ".join("?" if e is None else str(e) for e in shape) + ")"
            raise ModelError(f"{self.source}: {key} has shape {tuple(a.shape)}, expected {want}")
        if dtype == np.float32 and not np.all(np.isfinite(a)):
            raise ModelError(f"{self.source}: {key} holds NaN or inf")
        return np.ascontiguousarray(a)


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int16 rows and their float32 scales: ``w[r] ≈ scale[r] · q[r]`` (round to nearest)."""
    w64 = w.astype(np.float64)
    peak = np.abs(w64).max(axis=1)
    scale = np.where(peak > 0, peak / INT16_MAX, 1.0)
    q = np.rint(w64 / scale[:, None])
    return q.astype(np.int16), scale.astype(np.float32)


class NativeNet:
    """A network's step on preallocated buffers; ``run(x, state)`` mirrors the ONNX graph."""

    kind = ""
    precision = "float32"

    def run(self, x: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """Consume ``x`` (the graph's x without the batch axis), update ``state`` in place,
        return the output rows (a view of a reused buffer)."""
        raise NotImplementedError
