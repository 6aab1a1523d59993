"""Native (Numba) step kernel for the handwriting conformer: one call per pair of MPF frames.

Why: the exported step graph (``models/export_handwriting.py``) has ~1200 ONNX nodes and costs
~2.8 ms per call in ONNX Runtime, almost all of it per-node overhead: the arithmetic is about
1 M multiply-adds. This kernel computes the same step on preallocated float32 buffers and
skips the blocks whose input is not valid (on most calls only the first 5 or 10 of the 15
blocks receive a frame), which the graph cannot do (it computes every block and discards).

What one call computes (x = MPF frames 2u and 2u+1, the graph's I/O contract):

- front end: per frame, the rotation-invariant MLP (gather each rotation's band-major
  features, Linear + LeakyReLU(0.01) per layer, mean over the rotations); the two results
  concatenated (time reduction) and the input Linear;
- per block b, while its input is valid: FF (``LN, Linear, SiLU, Linear``; ``+ 0.5 x``),
  windowed attention (``+ 1.0 x``), conv module (``+ 1.0 x``, the newest input), FF,
  LayerNorm; its caches shift by one row and its count grows by one; the output is valid
  when ``count >= k - 1`` and ``(count - (k - 1)) % stride == 0`` (count before this
  input). A block whose input is not valid leaves caches and count alone, and so do all
  blocks after it;
- when the last block's output is valid: the output Linear and LogSoftmax into ``y``.

Attention of a block with window W reads the newest W-1 cached post-LayerNorm inputs plus the
current one, as the reference's key/value tokens: the (W, D) time-ascending window read as
its transpose (token a = row a of the (D, W) block reshaped to (W, D)). Token a is blocked
while ``a < W - 1 - count`` (warm-up). The arithmetic is rearranged (exact in real numbers):
the key projection moves onto the query, ``q_h · (Wk_h t_a + bk_h) = (Wk_hᵀ q_h) · t_a +
q_h · bk_h``, and the value projection after the softmax mix, ``Σ_a p_a (Wv_h t_a + bv_h) =
Wv_h (Σ_a p_a t_a) + bv_h``, so W tokens cost two D-vectors per head instead of 2·W
projections (~20 k instead of ~135 k multiply-adds per block at full size).

Weights: the card's ``[native]`` sidecar, the network's ``state_dict`` (float32, reference
names) plus ``rotation_gather`` (3, D_vec) int64, ``block_strides``, ``block_windows``,
``block_kernels`` (L,) int64 and ``num_heads`` (1,) int64 (written by ``models/build.py``).
The kernel is float32 only (no LSTM, so no int16 variant): ``precision`` is always float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from emgd.errors import ModelError
from emgd.modelcard import ModelCard
from emgd.native_common import _FM, NativeNet, RotationMlp, _layer_norm, _rotation_mlp, _Weights

FRAMES_PER_CALL = 2
FF_WEIGHT = 0.5  # Residual weight of the feed-forward modules (attention and conv: 1.0)

# rows of the per-block vector table ``vecs`` (L, N_VEC, D)
(V_FF1_LNW, V_FF1_LNB, V_FF1_B2, V_ATT_LNW, V_ATT_LNB, V_ATT_OUTB, V_CV_LNW, V_CV_LNB,
 V_CV_DWB, V_CV_LN2W, V_CV_LN2B, V_CV_B2, V_FF2_LNW, V_FF2_LNB, V_FF2_B2, V_LNW,
 V_LNB) = range(17)
N_VEC = 17
# rows of the scratch table (S_ROWS, width)
S_X, S_OUT, S_Z, S_T, S_U, S_BIG, S_HID, S_Q, S_ATT, S_ACC, S_RED, S_LOGIT = range(12)
S_FIXED = 12  # then: heads rows of qk, heads rows of mix, heads rows of scores


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True, inline="always", fastmath=_FM)
def _sig(v):
    """The logistic function; exp(-v) = inf for v < -88 gives 0, as it should."""
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-v))


@njit(nogil=True, cache=True, fastmath=_FM)
def _linear(w, b, x, out):
    """out = w @ x + b; w (n_out, n_in) C-contiguous; four rows at a time (x read once)."""
    n_in = x.shape[0]
    n_out = w.shape[0]
    o = 0
    while o + 4 <= n_out:
        r0 = w[o]
        r1 = w[o + 1]
        r2 = w[o + 2]
        r3 = w[o + 3]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for j in range(n_in):
            xj = x[j]
            a0 += r0[j] * xj
            a1 += r1[j] * xj
            a2 += r2[j] * xj
            a3 += r3[j] * xj
        out[o] = a0 + b[o]
        out[o + 1] = a1 + b[o + 1]
        out[o + 2] = a2 + b[o + 2]
        out[o + 3] = a3 + b[o + 3]
        o += 4
    while o < n_out:
        row = w[o]
        acc = np.float32(0.0)
        for j in range(n_in):
            acc += row[j] * x[j]
        out[o] = acc + b[o]
        o += 1


@njit(nogil=True, cache=True, fastmath=_FM)
def _feed_forward(x, lnw, lnb, w1, b1, w2, b2, t, hid, out):
    """out = w2 · SiLU(w1 · LN(x) + b1) + b2 + 0.5 x (out may not alias x)."""
    _layer_norm(x, lnw, lnb, t)
    _linear(w1, b1, t, hid)
    for i in range(hid.shape[0]):
        v = hid[i]
        hid[i] = v * _sig(v)
    _linear(w2, b2, hid, out)
    for i in range(out.shape[0]):
        out[i] += np.float32(FF_WEIGHT) * x[i]


@njit(nogil=True, cache=True, fastmath=_FM)
def _attention(x, hist, count, window, heads, vecs, in_w, in_b, out_w, s, tokbuf, out):
    """out = out_proj(attention of LN(x) over the window) + x; hist (H, D) is read, the new
    post-LayerNorm input is left in s[S_Z]."""
    d = x.shape[0]
    n_hist = hist.shape[0]
    dh = d // heads
    z = s[S_Z, :d]
    _layer_norm(x, vecs[V_ATT_LNW], vecs[V_ATT_LNB], z)
    q = s[S_Q, :d]
    _linear(in_w[:d], in_b[:d], z, q)
    # tokens: the (W, D) window (newest W-1 cached rows, then z) read as its transpose
    tok_t = tokbuf[:d * window].reshape(d, window)
    first = n_hist + 1 - window
    for t in range(window - 1):
        src = hist[first + t]
        for c in range(d):
            tok_t[c, t] = src[c]
    for c in range(d):
        tok_t[c, window - 1] = z[c]
    tokens = tokbuf[:d * window].reshape(window, d)
    wk = in_w[d:2 * d]
    bk = in_b[d:2 * d]
    wv = in_w[2 * d:]
    bv = in_b[2 * d:]
    scale = np.float32(1.0 / np.sqrt(dh))
    lo = max(window - 1 - count, 0)  # tokens a < lo are blocked (warm-up)
    att = s[S_ATT, :d]
    for h in range(heads):
        qk = s[S_FIXED + h, :d]  # Wk_hᵀ q_h
        for c in range(d):
            qk[c] = 0.0
        qb = np.float32(0.0)
        for i in range(h * dh, (h + 1) * dh):
            qi = q[i]
            row = wk[i]
            for c in range(d):
                qk[c] += qi * row[c]
            qb += qi * bk[i]
        sc = s[S_FIXED + 2 * heads + h, :window]
        top = np.float32(-np.inf)
        for a in range(lo, window):
            ta = tokens[a]
            acc = np.float32(0.0)
            for c in range(d):
                acc += qk[c] * ta[c]
            v = (acc + qb) * scale
            sc[a] = v
            top = max(top, v)
        total = np.float32(0.0)
        for a in range(lo, window):
            e = np.exp(sc[a] - top)
            sc[a] = e
            total += e
        mix = s[S_FIXED + heads + h, :d]
        for c in range(d):
            mix[c] = 0.0
        for a in range(lo, window):
            p = sc[a] / total
            ta = tokens[a]
            for c in range(d):
                mix[c] += p * ta[c]
        for i in range(h * dh, (h + 1) * dh):
            row = wv[i]
            acc = np.float32(0.0)
            for c in range(d):
                acc += row[c] * mix[c]
            att[i] = acc + bv[i]
    _linear(out_w, vecs[V_ATT_OUTB], att, out)
    for i in range(d):
        out[i] += x[i]


@njit(nogil=True, cache=True, fastmath=_FM)
def _conv_module(x, cache, vecs, cw1, cb1, dw, w2, s, out):
    """out = Linear(SiLU(LN(depthwise conv over [cache; GLU(Linear(LN(x)))]))) + x; the new
    GLU output is left in s[S_U]."""
    d = x.shape[0]
    taps = cache.shape[0]
    t = s[S_T, :d]
    _layer_norm(x, vecs[V_CV_LNW], vecs[V_CV_LNB], t)
    big = s[S_BIG, :2 * d]
    _linear(cw1, cb1, t, big)
    g = s[S_U, :d]
    for c in range(d):
        g[c] = big[c] * _sig(big[d + c])
    acc = s[S_ACC, :d]  # depthwise conv, one output for k inputs
    wlast = dw[taps]
    bias = vecs[V_CV_DWB]
    for c in range(d):
        acc[c] = wlast[c] * g[c] + bias[c]
    for k in range(taps):
        wk = dw[k]
        row = cache[k]
        for c in range(d):
            acc[c] += wk[c] * row[c]
    _layer_norm(acc, vecs[V_CV_LN2W], vecs[V_CV_LN2B], t)
    for c in range(d):
        v = t[c]
        t[c] = v * _sig(v)
    _linear(w2, vecs[V_CV_B2], t, out)
    for c in range(d):
        out[c] += x[c]


@njit(nogil=True, cache=True, fastmath=_FM)
def _push_row(rows, new):
    """Drop rows[0], shift the others up by one, append ``new`` (element loops: no copy)."""
    n = rows.shape[0]
    if n == 0:
        return
    for r in range(n - 1):
        dst = rows[r]
        src = rows[r + 1]
        for c in range(dst.shape[0]):
            dst[c] = src[c]
    last = rows[n - 1]
    for c in range(last.shape[0]):
        last[c] = new[c]


@njit(nogil=True, cache=True, fastmath=_FM)
def _handwriting_run(frames, gather, mlp_w, mlp_b, mlp_woff, mlp_boff, mlp_dims, feats,
                     in_w, in_b, vecs, ff_w1, ff_b1, ff_w2, att_w, att_b, att_out, cv_w1,
                     cv_b1, dw, cv_w2, windows, strides, heads, attn, conv, count, out_w,
                     out_b, s, tokbuf, y):
    """One call: frames (2, F·C·C); attn (L, H, D), conv (L, K, D), count (L,) updated in
    place; returns whether y (n_classes,) now holds an emission."""
    blocks, _, d = attn.shape
    taps = conv.shape[1]
    lag = taps  # kernel - 1
    red = s[S_RED, :2 * mlp_dims[mlp_dims.shape[0] - 1]]
    _rotation_mlp(frames, gather, mlp_w, mlp_b, mlp_woff, mlp_boff, mlp_dims, feats, red)
    x = s[S_X, :d]
    _linear(in_w, in_b, red, x)
    hid = s[S_HID, :ff_w1.shape[2]]
    tmp = s[S_OUT, :d]
    for b in range(blocks):
        n = count[b]
        v = vecs[b]
        # x -> tmp -> x -> tmp -> x -> tmp -> x: each module reads one buffer, writes the other
        _feed_forward(x, v[V_FF1_LNW], v[V_FF1_LNB], ff_w1[b, 0], ff_b1[b, 0], ff_w2[b, 0],
                      v[V_FF1_B2], s[S_T, :d], hid, tmp)
        _attention(tmp, attn[b], n, windows[b], heads, v, att_w[b], att_b[b], att_out[b], s,
                   tokbuf, x)
        cache = conv[b]
        _conv_module(x, cache, v, cv_w1[b], cv_b1[b], dw[b], cv_w2[b], s, tmp)
        _feed_forward(tmp, v[V_FF2_LNW], v[V_FF2_LNB], ff_w1[b, 1], ff_b1[b, 1], ff_w2[b, 1],
                      v[V_FF2_B2], s[S_T, :d], hid, x)
        _layer_norm(x, v[V_LNW], v[V_LNB], tmp)
        for c in range(d):
            x[c] = tmp[c]
        # caches: drop the oldest row, append the newest (post-LN attention input, GLU output)
        _push_row(attn[b], s[S_Z, :d])
        _push_row(cache, s[S_U, :d])
        count[b] = n + 1
        if n < lag or (n - lag) % strides[b] != 0:
            return False  # no output: the later blocks get no input in this call
    logits = s[S_LOGIT, :y.shape[0]]
    _linear(out_w, out_b, x, logits)
    top = logits[0]
    for i in range(logits.shape[0]):
        top = max(top, logits[i])
    total = 0.0
    for i in range(logits.shape[0]):
        total += np.exp(np.float64(logits[i] - top))
    shift = np.float32(top + np.log(total))
    for i in range(logits.shape[0]):
        y[i] = logits[i] - shift
    return True


# --------------------------------------------------------------------------- network


class NativeHandwriting(NativeNet):
    """The handwriting step (:mod:`emgd.models.export_handwriting`) on preallocated buffers.

    ``run(x, state)`` takes x (2, 6, C, C) (one call's MPF frames), updates ``attn``,
    ``conv`` and ``count`` in place and returns ``(y, valid)``: y (1, n_classes) float32 (a
    reused buffer; meaningful only when valid) and whether this call emitted.
    """

    kind = "handwriting_conformer"

    def __init__(self, wts: _Weights, card: ModelCard, precision: str, capacity: int) -> None:
        self.precision = "float32"  # float32 weights whatever was asked (no LSTM rows)
        src = wts.source
        inp = card.input
        if inp.kind != "mpf" or not inp.fixed or inp.unit != FRAMES_PER_CALL:
            raise ModelError(f"{card.path}: the native handwriting kernel needs a fixed MPF "
                             f"input of {FRAMES_PER_CALL} frames per call")
        if card.output.valid is None:
            raise ModelError(f"{card.path}: the native handwriting kernel needs output.valid")
        c = inp.channels
        self._frame = 6 * c * c

        # front end: rotation MLP, then the input Linear on the frame pair
        self._mlp = RotationMlp.load(wts, c)
        dims = list(self._mlp.dims)
        mlp = dims[-1]
        in_w = wts.get("conformer.1.weight", (None, FRAMES_PER_CALL * mlp))
        d = in_w.shape[0]
        self._in = (in_w, wts.get("conformer.1.bias", (d,)))

        # block layout
        strides = wts.get("block_strides", (None,), np.int64)
        n = strides.shape[0]
        windows = wts.get("block_windows", (n,), np.int64)
        kernels = wts.get("block_kernels", (n,), np.int64)
        heads = int(wts.get("num_heads", (1,), np.int64)[0])
        if n == 0:
            raise ModelError(f"{src}: block_strides is empty (no conformer blocks)")
        if f"conformer.2.{n}.layer_norm.weight" in wts.arrays:
            raise ModelError(f"{src}: block_strides has {n} entries but the weights hold "
                             "more conformer blocks")
        if strides.min() < 1 or windows.min() < 1 or kernels.min() < 1:
            raise ModelError(f"{src}: block_strides, block_windows and block_kernels must "
                             "be >= 1")
        if np.any(kernels != kernels[0]):
            raise ModelError(f"{src}: block_kernels differ between blocks "
                             f"({sorted(set(kernels.tolist()))}); the conv state needs one")
        if heads < 1 or d % heads:
            raise ModelError(f"{src}: num_heads = {heads} does not divide the model width {d}")
        kernel = int(kernels[0])
        n_hist = int(windows.max()) - 1
        self._windows, self._strides, self._heads = windows, strides, heads

        ffn = wts.get("conformer.2.0.ff_block1.child.1.weight", (None, d)).shape[0]
        vecs = np.zeros((n, N_VEC, d), np.float32)
        ff_w1 = np.zeros((n, 2, ffn, d), np.float32)
        ff_b1 = np.zeros((n, 2, ffn), np.float32)
        ff_w2 = np.zeros((n, 2, d, ffn), np.float32)
        att_w = np.zeros((n, 3 * d, d), np.float32)
        att_b = np.zeros((n, 3 * d), np.float32)
        att_out = np.zeros((n, d, d), np.float32)
        cv_w1 = np.zeros((n, 2 * d, d), np.float32)
        cv_b1 = np.zeros((n, 2 * d), np.float32)
        dw = np.zeros((n, kernel, d), np.float32)
        cv_w2 = np.zeros((n, d, d), np.float32)
        for b in range(n):
            p = f"conformer.2.{b}."

            def vec(key: str, row: int, b: int = b, p: str = p) -> None:
                vecs[b, row] = wts.get(p + key, (d,))

            for j, ff in enumerate(("ff_block1", "ff_block2")):
                lnw, lnb, b2 = ((V_FF1_LNW, V_FF1_LNB, V_FF1_B2) if j == 0
                                else (V_FF2_LNW, V_FF2_LNB, V_FF2_B2))
                vec(f"{ff}.child.0.weight", lnw)
                vec(f"{ff}.child.0.bias", lnb)
                ff_w1[b, j] = wts.get(p + f"{ff}.child.1.weight", (ffn, d))
                ff_b1[b, j] = wts.get(p + f"{ff}.child.1.bias", (ffn,))
                ff_w2[b, j] = wts.get(p + f"{ff}.child.4.weight", (d, ffn))
                vec(f"{ff}.child.4.bias", b2)
            a = "attn_block.child."
            vec(a + "0.weight", V_ATT_LNW)
            vec(a + "0.bias", V_ATT_LNB)
            att_w[b] = wts.get(p + a + "2.op.in_proj_weight", (3 * d, d))
            att_b[b] = wts.get(p + a + "2.op.in_proj_bias", (3 * d,))
            att_out[b] = wts.get(p + a + "2.op.out_proj.weight", (d, d))
            vec(a + "2.op.out_proj.bias", V_ATT_OUTB)
            cv = "conv_block.child."
            vec(cv + "0.weight", V_CV_LNW)
            vec(cv + "0.bias", V_CV_LNB)
            cv_w1[b] = wts.get(p + cv + "1.weight", (2 * d, d))
            cv_b1[b] = wts.get(p + cv + "1.bias", (2 * d,))
            dw[b] = wts.get(p + cv + "3.net.weight", (d, 1, kernel))[:, 0, :].T
            vec(cv + "3.net.bias", V_CV_DWB)
            vec(cv + "4.weight", V_CV_LN2W)
            vec(cv + "4.bias", V_CV_LN2B)
            cv_w2[b] = wts.get(p + cv + "6.weight", (d, d))
            vec(cv + "6.bias", V_CV_B2)
            vec("layer_norm.weight", V_LNW)
            vec("layer_norm.bias", V_LNB)
        self._blocks = (vecs, ff_w1, ff_b1, ff_w2, att_w, att_b, att_out, cv_w1, cv_b1, dw,
                        cv_w2)
        n_out = len(card.output.labels)
        self._out = (wts.get("conformer.3.weight", (n_out, d)),
                     wts.get("conformer.3.bias", (n_out,)))

        # the card's states must be the ones this network carries
        want = {"attn": ((n, 1, n_hist, d), "float32"),
                "conv": ((n, 1, kernel - 1, d), "float32"),
                "count": ((n, 1), "int64")}
        have = {st.name: (st.shape, st.dtype) for st in card.states}
        for name, spec in want.items():
            if have.get(name) != spec:
                raise ModelError(f"{card.path}: the native handwriting kernel needs state "
                                 f"{name!r} {spec[1]}{list(spec[0])} (from the weights in "
                                 f"{src}); the card has {have.get(name)}")
        self._shapes = {"attn": (n, n_hist, d), "conv": (n, kernel - 1, d), "count": (n,)}

        # buffers
        self._feats = self._mlp.scratch(FRAMES_PER_CALL)
        width = max(ffn, 2 * d, FRAMES_PER_CALL * mlp, n_out, int(windows.max()))
        self._s = np.zeros((S_FIXED + 3 * heads, width), np.float32)
        self._tok = np.zeros(int(windows.max()) * d, np.float32)
        self._y = np.zeros((1, n_out), np.float32)

    def _state(self, state: dict[str, np.ndarray], name: str, dtype: type) -> np.ndarray:
        a = state[name]
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"state {name!r} must be a C-contiguous {np.dtype(dtype)} array "
                             "(the kernel updates it in place)")
        return a.reshape(self._shapes[name])

    def run(self, x: np.ndarray, state: dict[str, np.ndarray]  # type: ignore[override]
            ) -> tuple[np.ndarray, bool]:
        if x.shape[0] != FRAMES_PER_CALL:
            raise ValueError(f"the handwriting step takes {FRAMES_PER_CALL} MPF frames per "
                             f"call, got {x.shape[0]}")
        frames = x.reshape(FRAMES_PER_CALL, self._frame)
        (vecs, ff_w1, ff_b1, ff_w2, att_w, att_b, att_out, cv_w1, cv_b1, dw,
         cv_w2) = self._blocks
        m = self._mlp
        valid = _handwriting_run(
            frames, m.gather, m.w, m.b, m.woff, m.boff, m.dims, self._feats, self._in[0],
            self._in[1], vecs, ff_w1, ff_b1, ff_w2,
            att_w, att_b, att_out, cv_w1, cv_b1, dw, cv_w2, self._windows, self._strides,
            self._heads, self._state(state, "attn", np.float32),
            self._state(state, "conv", np.float32), self._state(state, "count", np.int64),
            self._out[0], self._out[1], self._s, self._tok, self._y[0])
        return self._y, bool(valid)
