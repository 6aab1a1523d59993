"""Native (Numba) step kernels for the two LSTM networks: gestures and wrist.

(The handwriting conformer's kernel is in :mod:`emgd.native_handwriting`; both are loaded by
:mod:`emgd.native`.)

Why: one streaming step of the gesture network reads its whole 3×512 LSTM — 25 MB of
float32 weights — every 5 ms hop. That is memory-bound: on a 2-core EPYC VM the effective
last-level cache holds about 12–16 MB, so every hop streams the weights from DRAM and ONNX
Runtime's LSTM step costs ~1.1 ms (``benchmarks/bench_decoders.py``). Stored as int16 with
one float32 scale per matrix row (``w ≈ scale_r · q``, ``|error| <= max|row| / 65534``), the
matrices take 12.6 MB, stay in cache and one step costs ~0.3 ms; products are accumulated in
float32, so the network's arithmetic is otherwise unchanged. On full-size random weights the
gesture logits move by at most 3e-5 over 30 s (int8 moved them by 2e-2) and the detected
events are identical; the exporter measures this for every model and writes it into the
card (``[native]``), and ``docs/adr/0005-native-decoder-kernels.md`` has the numbers.

The weights come from the card's ``[native]`` sidecar file: an ``.npz`` of the network's
``state_dict`` (reference parameter names, float32), plus ``rotation_gather`` for the wrist
network (the flat indices of the three channel rotations' vectorised MPF matrices). The
kernels reproduce exactly what the ONNX step graphs compute (``models/export.py``):

- gestures, per 10-sample unit: Reinhard compression into a buffer after the 11-sample
  compressed tail, Conv1d(16→512, k=21, stride 10) + ReLU, LayerNorm, the LSTM stack,
  LayerNorm, Linear(512→9);
- wrist, per MPF frame: for each rotation, gather its features, MLP with LeakyReLU(0.01)
  after every layer, mean over the rotations; the LSTM stack; LeakyReLU(0.01), Linear(512→1).

PyTorch conventions: gate order i, f, g, o; ``c' = σ(f)c + σ(i)tanh(g)``, ``h' = σ(o)tanh(c')``;
both biases added; LayerNorm eps 1e-5 with the biased variance.

:func:`load_native` builds a :class:`NativeNet` for a card (sha256, key and shape checks with
errors that name the key); the decoders (:mod:`emgd.decoders`) call its ``run``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from emgd.errors import ModelError
from emgd.modelcard import ModelCard
from emgd.native_common import (
    _FM,
    LEAKY_SLOPE,
    NativeNet,
    RotationMlp,
    _layer_norm,
    _rotation_mlp,
    _sigmoid,
    _Weights,
    quantize_rows,
)

# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True, fastmath=_FM)
def _gates_f32(w, off, rows, n_in, hidden, inp, hprev, bias, boff, gates):
    width = n_in + hidden
    for r in range(rows):
        row = w[off + r * width:off + (r + 1) * width]  # slices: no negative-index checks
        acc = np.float32(0.0)
        for j in range(n_in):
            acc += row[j] * inp[j]
        rec = row[n_in:]
        for j in range(hidden):
            acc += rec[j] * hprev[j]
        gates[r] = acc + bias[boff + r]


@njit(nogil=True, cache=True, fastmath=_FM)
def _gates_i16(w, off, rows, n_in, hidden, inp, hprev, scale, bias, boff, gates):
    width = n_in + hidden
    for r in range(rows):
        row = w[off + r * width:off + (r + 1) * width]
        acc = np.float32(0.0)
        for j in range(n_in):
            acc += np.float32(row[j]) * inp[j]
        rec = row[n_in:]
        for j in range(hidden):
            acc += np.float32(rec[j]) * hprev[j]
        gates[r] = acc * scale[boff + r] + bias[boff + r]


@njit(nogil=True, cache=True, fastmath=_FM)
def _lstm_stack(x, w32, w16, scale, bias, offs, n_ins, h, c, gates, use16):
    """One time step of a stacked LSTM; h, c (L, H) updated in place; returns h[L-1]."""
    layers, hidden = h.shape
    rows = 4 * hidden
    inp = x
    for layer in range(layers):
        boff = layer * rows
        if use16:
            _gates_i16(w16, offs[layer], rows, n_ins[layer], hidden, inp, h[layer], scale,
                       bias, boff, gates)
        else:
            _gates_f32(w32, offs[layer], rows, n_ins[layer], hidden, inp, h[layer], bias,
                       boff, gates)
        for k in range(hidden):
            ig = _sigmoid(gates[k])
            fg = _sigmoid(gates[hidden + k])
            gg = np.tanh(gates[2 * hidden + k])
            og = _sigmoid(gates[3 * hidden + k])
            cn = fg * c[layer, k] + ig * gg
            c[layer, k] = cn
            h[layer, k] = og * np.tanh(cn)
        inp = h[layer]
    return inp


@njit(nogil=True, cache=True, fastmath=_FM)
def _gestures_run(x, tail, cbuf, rng, mid, conv_w, conv_b, ln1_g, ln1_b, z, zn,
                  w32, w16, scale, bias, offs, n_ins, h, c, gates, use16,
                  ln2_g, ln2_b, hn, proj_w, proj_b, y):
    """x (10T, C) preprocessed µV; tail (P, C) compressed; y (T, n_out) written."""
    n, channels = x.shape
    keep = tail.shape[0]
    stride = 10
    units = n // stride
    for i in range(keep):
        for ch in range(channels):
            cbuf[i, ch] = tail[i, ch]
    for i in range(n):
        for ch in range(channels):
            s = x[i, ch]
            cbuf[keep + i, ch] = rng * s / (mid + abs(s))
    flat = cbuf.reshape(-1)
    taps = conv_w.shape[1]  # kernel * channels
    for t in range(units):
        start = t * stride * channels
        window = flat[start:start + taps]
        for o in range(conv_w.shape[0]):
            acc = np.float32(0.0)
            wo = conv_w[o]
            for k in range(taps):
                acc += wo[k] * window[k]
            acc += conv_b[o]
            z[o] = acc if acc > 0.0 else np.float32(0.0)
        _layer_norm(z, ln1_g, ln1_b, zn)
        top = _lstm_stack(zn, w32, w16, scale, bias, offs, n_ins, h, c, gates, use16)
        _layer_norm(top, ln2_g, ln2_b, hn)
        for o in range(proj_w.shape[0]):
            acc = np.float32(0.0)
            for k in range(hn.shape[0]):
                acc += proj_w[o, k] * hn[k]
            y[t, o] = acc + proj_b[o]
    for i in range(keep):
        for ch in range(channels):
            tail[i, ch] = cbuf[n + i, ch]


@njit(nogil=True, cache=True, fastmath=_FM)
def _wrist_run(frames, gather, mlp_w, mlp_b, mlp_woff, mlp_boff, mlp_dims, feats, act,
               w32, w16, scale, bias, offs, n_ins, h, c, gates, use16, out_w, out_b, y):
    """frames (K, F·C·C) flat MPF frames; y (K, n_out) written."""
    for kf in range(frames.shape[0]):
        _rotation_mlp(frames[kf:kf + 1], gather, mlp_w, mlp_b, mlp_woff, mlp_boff, mlp_dims,
                      feats, act)
        top = _lstm_stack(act, w32, w16, scale, bias, offs, n_ins, h, c, gates, use16)
        for o in range(out_w.shape[0]):
            acc = np.float32(0.0)
            for k in range(top.shape[0]):
                v = top[k]
                acc += out_w[o, k] * (v if v >= 0.0 else v * np.float32(LEAKY_SLOPE))
            y[kf, o] = acc + out_b[o]


# --------------------------------------------------------------------------- weights


@dataclass
class _Lstm:
    w32: np.ndarray
    w16: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    offs: np.ndarray
    n_ins: np.ndarray
    layers: int
    hidden: int
    use16: bool


def _lstm_weights(wts: _Weights, n_in: int, precision: str) -> _Lstm:
    layers = 0
    while f"lstm.weight_ih_l{layers}" in wts.arrays:
        layers += 1
    if layers == 0:
        raise ModelError(f"{wts.source}: native weights lack 'lstm.weight_ih_l0'")
    rows = wts.get("lstm.weight_hh_l0", (None, None)).shape[0]
    hidden = rows // 4
    mats, biases, n_ins = [], [], []
    for layer in range(layers):
        size = n_in if layer == 0 else hidden
        wi = wts.get(f"lstm.weight_ih_l{layer}", (4 * hidden, size))
        wh = wts.get(f"lstm.weight_hh_l{layer}", (4 * hidden, hidden))
        bi = wts.get(f"lstm.bias_ih_l{layer}", (4 * hidden,))
        bh = wts.get(f"lstm.bias_hh_l{layer}", (4 * hidden,))
        mats.append(np.concatenate([wi, wh], axis=1))
        biases.append(bi + bh)
        n_ins.append(size)
    offs = np.cumsum([0] + [m.size for m in mats[:-1]]).astype(np.int64)
    use16 = precision == "int16"
    if use16:
        qs = [quantize_rows(m) for m in mats]
        w16 = np.concatenate([q.reshape(-1) for q, _ in qs])
        scale = np.concatenate([s for _, s in qs])
        w32 = np.zeros(1, np.float32)
    else:
        w32 = np.concatenate([m.reshape(-1) for m in mats]).astype(np.float32)
        w16 = np.zeros(1, np.int16)
        scale = np.ones(layers * 4 * hidden, np.float32)
    return _Lstm(w32, w16, scale, np.concatenate(biases).astype(np.float32), offs,
                 np.asarray(n_ins, np.int64), layers, hidden, use16)


# --------------------------------------------------------------------------- networks


class NativeGestures(NativeNet):
    kind = "gestures_lstm"

    def __init__(self, wts: _Weights, card: ModelCard, precision: str, capacity: int) -> None:
        prime = card.input.prime
        if prime is None or prime.transform != "reinhard":
            raise ModelError(f"{card.path}: the native gesture kernel needs [input.prime] "
                             "with transform = 'reinhard'")
        channels = card.input.channels
        conv = wts.get("conv_layer.weight", (None, channels, None))
        out_ch, _, kernel = conv.shape
        if kernel != prime.samples + card.input.unit or card.input.unit != 10:
            raise ModelError(f"{wts.source}: conv_layer.weight kernel {kernel} does not fit "
                             f"the card's prime ({prime.samples}) + unit ({card.input.unit})")
        self.precision = precision
        self._tail_name = prime.state
        self._rng = np.float32(prime.range)
        self._mid = np.float32(prime.midpoint)
        self._conv_w = np.ascontiguousarray(conv.transpose(0, 2, 1).reshape(out_ch, -1))
        self._conv_b = wts.get("conv_layer.bias", (out_ch,))
        self._ln1 = (wts.get("post_conv_layer_norm.weight", (out_ch,)),
                     wts.get("post_conv_layer_norm.bias", (out_ch,)))
        self._lstm = lstm = _lstm_weights(wts, out_ch, precision)
        n_out = len(card.output.labels)
        self._ln2 = (wts.get("post_lstm_layer_norm.weight", (lstm.hidden,)),
                     wts.get("post_lstm_layer_norm.bias", (lstm.hidden,)))
        self._proj = (wts.get("projection.weight", (n_out, lstm.hidden)),
                      wts.get("projection.bias", (n_out,)))
        units = capacity // 10 + 1
        self._cbuf = np.zeros((prime.samples + units * 10, channels), np.float32)
        self._z = np.zeros(out_ch, np.float32)
        self._zn = np.zeros(out_ch, np.float32)
        self._gates = np.zeros(4 * lstm.hidden, np.float32)
        self._hn = np.zeros(lstm.hidden, np.float32)
        self._y = np.zeros((units, n_out), np.float32)
        _check_lstm_states(card, lstm, wts.source)

    def run(self, x: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        units = x.shape[0] // 10
        if units > self._y.shape[0]:
            raise ValueError(f"{units} units exceed the kernel's buffer ({self._y.shape[0]})")
        lstm = self._lstm
        y = self._y[:units]
        _gestures_run(x, state[self._tail_name][0], self._cbuf, self._rng, self._mid,
                      self._conv_w, self._conv_b, self._ln1[0], self._ln1[1], self._z,
                      self._zn, lstm.w32, lstm.w16, lstm.scale, lstm.bias, lstm.offs,
                      lstm.n_ins, _hc(state["h"]), _hc(state["c"]), self._gates, lstm.use16,
                      self._ln2[0], self._ln2[1], self._hn, self._proj[0], self._proj[1], y)
        return y


class NativeWrist(NativeNet):
    kind = "wrist_lstm"

    def __init__(self, wts: _Weights, card: ModelCard, precision: str, capacity: int) -> None:
        self.precision = precision
        self._mlp = mlp = RotationMlp.load(wts, card.input.channels)
        self._lstm = lstm = _lstm_weights(wts, mlp.out_dim, precision)
        n_out = len(card.output.labels)
        self._out = (wts.get("linear_out.weight", (n_out, lstm.hidden)),
                     wts.get("linear_out.bias", (n_out,)))
        self._feats = mlp.scratch(1)
        self._act = np.zeros(mlp.out_dim, np.float32)
        self._gates = np.zeros(4 * lstm.hidden, np.float32)
        self._y = np.zeros((capacity + 1, n_out), np.float32)
        self._frame = 6 * card.input.channels ** 2
        _check_lstm_states(card, lstm, wts.source)

    def run(self, x: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        k = x.shape[0]
        if k > self._y.shape[0]:
            raise ValueError(f"{k} frames exceed the kernel's buffer ({self._y.shape[0]})")
        lstm = self._lstm
        y = self._y[:k]
        m = self._mlp
        _wrist_run(x.reshape(k, self._frame), m.gather, m.w, m.b, m.woff, m.boff, m.dims,
                   self._feats, self._act, lstm.w32, lstm.w16, lstm.scale, lstm.bias, lstm.offs,
                   lstm.n_ins, _hc(state["h"]), _hc(state["c"]), self._gates, lstm.use16,
                   self._out[0], self._out[1], y)
        return y


def _hc(a: np.ndarray) -> np.ndarray:
    """(L, 1, H) state -> a contiguous (L, H) view (updated in place by the kernels)."""
    return a.reshape(a.shape[0], a.shape[-1])


def _check_lstm_states(card: ModelCard, lstm: _Lstm, source: str) -> None:
    shapes = {s.name: (s.shape, s.dtype) for s in card.states}
    want = ((lstm.layers, 1, lstm.hidden), "float32")
    for name in ("h", "c"):
        if shapes.get(name) != want:
            raise ModelError(f"{card.path}: the native kernel needs a float32 state {name!r} "
                             f"of shape {want[0]} (the weights in {source} have "
                             f"{lstm.layers} layers of {lstm.hidden}); the card has "
                             f"{shapes.get(name)}")
