"""What emgd's native (Numba) step kernels share: numerics, weight access, the base class.

The kernels themselves: :mod:`emgd.native_lstm` (gestures, wrist) and
:mod:`emgd.native_handwriting`; loading and checking them against their graphs:
:mod:`emgd.native`. Conventions are PyTorch's: LayerNorm eps 1e-5 with the biased variance,
LeakyReLU slope 0.01.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


@njit(nogil=True, cache=True, inline="always", fastmath=_FM)
def _leaky(v):
    return v if v >= 0.0 else v * np.float32(LEAKY_SLOPE)


@njit(nogil=True, cache=True, fastmath=_FM)
def _rotation_mlp(frames, gather, mlp_w, mlp_b, mlp_woff, mlp_boff, mlp_dims, feats, red):
    """The rotation-invariant MLP: frames (K, F·C·C) -> red (K·M), per frame the mean over
    the rotations of the MLP output (LeakyReLU after every layer). feats (2, K·R, width) is
    scratch; each row of the weights is read once for three vectors at a time."""
    n_frames = frames.shape[0]
    rotations, width = gather.shape
    layers = mlp_dims.shape[0] - 1
    last = mlp_dims[layers]
    n_vec = n_frames * rotations
    for kf in range(n_frames):  # gather every (frame, rotation) feature vector
        fr = frames[kf]
        for r in range(rotations):
            g = gather[r]
            dst = feats[0, kf * rotations + r]
            for i in range(width):
                dst[i] = fr[g[i]]
    src = 0
    for layer in range(layers):
        n_in = mlp_dims[layer]
        n_out = mlp_dims[layer + 1]
        woff = mlp_woff[layer]
        boff = mlp_boff[layer]
        dst = 1 - src
        for o in range(n_out):
            row = mlp_w[woff + o * n_in:woff + (o + 1) * n_in]
            bias = mlp_b[boff + o]
            v = 0
            while v + 3 <= n_vec:  # three vectors per pass over the row
                f0 = feats[src, v]
                f1 = feats[src, v + 1]
                f2 = feats[src, v + 2]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                for j in range(n_in):
                    r = row[j]
                    a0 += r * f0[j]
                    a1 += r * f1[j]
                    a2 += r * f2[j]
                feats[dst, v, o] = _leaky(a0 + bias)
                feats[dst, v + 1, o] = _leaky(a1 + bias)
                feats[dst, v + 2, o] = _leaky(a2 + bias)
                v += 3
            while v < n_vec:
                inp = feats[src, v]
                acc = np.float32(0.0)
                for j in range(n_in):
                    acc += row[j] * inp[j]
                feats[dst, v, o] = _leaky(acc + bias)
                v += 1
        src = dst
    for kf in range(n_frames):
        out = red[kf * last:(kf + 1) * last]
        for i in range(last):
            out[i] = 0.0
        for r in range(rotations):
            v = feats[src, kf * rotations + r]
            for i in range(last):
                out[i] += v[i]
        for i in range(last):
            out[i] /= np.float32(rotations)


@dataclass(frozen=True)
class RotationMlp:
    """The rotation-invariant MLP's weights, flat for :func:`_rotation_mlp`.

    ``gather`` (R, F·D): per channel rotation, the flat indices into one (F, C, C) MPF frame
    of its band-major vectorised features (the sidecar's ``rotation_gather`` (R, D) holds
    them for one band); the Linear layers ``rotation_invariant_mlp.fully_connected_layers.i``
    are concatenated row-major with their offsets.
    """

    gather: np.ndarray
    w: np.ndarray
    b: np.ndarray
    woff: np.ndarray
    boff: np.ndarray
    dims: np.ndarray  # input size, then each layer's output size

    PREFIX = "rotation_invariant_mlp.fully_connected_layers"

    @classmethod
    def load(cls, wts: _Weights, channels: int) -> RotationMlp:
        c = channels
        gather = wts.get("rotation_gather", (None, None), np.int64)
        if gather.size == 0 or gather.min() < 0 or gather.max() >= c * c:
            raise ModelError(f"{wts.source}: rotation_gather is empty or indexes outside a "
                             f"({c}, {c}) matrix")
        rotations, per_band = gather.shape
        full = (np.arange(6)[None, :, None] * c * c + gather[:, None, :]).reshape(rotations, -1)
        dims = [6 * per_band]
        ws: list[np.ndarray] = []
        bs: list[np.ndarray] = []
        while f"{cls.PREFIX}.{len(ws)}.weight" in wts.arrays:
            i = len(ws)
            w = wts.get(f"{cls.PREFIX}.{i}.weight", (None, dims[-1]))
            ws.append(w)
            bs.append(wts.get(f"{cls.PREFIX}.{i}.bias", (w.shape[0],)))
            dims.append(w.shape[0])
        if not ws:
            raise ModelError(f"{wts.source}: native weights lack '{cls.PREFIX}.0.weight'")
        return cls(np.ascontiguousarray(full.astype(np.int64)),
                   np.concatenate([w.reshape(-1) for w in ws]), np.concatenate(bs),
                   np.cumsum([0] + [w.size for w in ws[:-1]]).astype(np.int64),
                   np.cumsum([0] + [b.size for b in bs[:-1]]).astype(np.int64),
                   np.asarray(dims, np.int64))

    @property
    def out_dim(self) -> int:
        return int(self.dims[-1])

    def scratch(self, frames: int) -> np.ndarray:
        """The kernel's ``feats`` buffer for ``frames`` frames per call."""
        return np.zeros((2, frames * self.gather.shape[0], int(self.dims.max())), np.float32)


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
