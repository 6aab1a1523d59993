"""emgd's native (Numba) decoder kernels: which kernel runs which card, loading, checking.

The daemon runs its decoders in its own Numba step kernels by default (setting
``decoder_backend``; ``docs/adr/0005-native-decoder-kernels.md`` says why and what it
measured): :mod:`emgd.native_lstm` for the gesture and wrist networks (LSTM matrices as
int16 rows or float32), :mod:`emgd.native_handwriting` for the handwriting conformer
(float32). Each computes exactly what its ONNX step graph computes, from the card's
``[native]`` weights: an ``.npz`` of the network's ``state_dict`` (``models/README.md``).

:func:`load_native` builds the kernel for a card (sha256, key and shape checks with errors
that name the key); :func:`check_native` runs a seeded probe through the kernel and the ONNX
session and refuses a mismatch. The decoders (:mod:`emgd.decoders`) call ``run``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from emgd.errors import ModelError
from emgd.modelcard import ModelCard, file_sha256
from emgd.native_common import PRECISIONS, NativeNet, _Weights, quantize_rows
from emgd.native_handwriting import NativeHandwriting
from emgd.native_lstm import NativeGestures, NativeWrist

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["KERNELS", "NATIVE_TOL", "PRECISIONS", "NativeNet", "check_native", "load_native",
           "quantize_rows"]

log = logging.getLogger(__name__)

KERNELS: dict[str, Callable[..., NativeNet]] = {
    "gestures_lstm": NativeGestures,
    "wrist_lstm": NativeWrist,
    "handwriting_conformer": NativeHandwriting,
}
TASK_KERNEL = {"discrete_gestures": "gestures_lstm", "wrist": "wrist_lstm",
               "handwriting": "handwriting_conformer"}
# native kernel vs graph on the load-time probe, relative to max(1, max |output|)
NATIVE_TOL = {"int16": 2e-3, "float32": 1e-4}


def load_native(card: ModelCard, precision: str, capacity: int, verify: bool = True
                ) -> NativeNet:
    """The card's native kernel with its sidecar weights (``capacity`` input rows per call)."""
    spec = card.native
    if spec is None:
        raise ModelError(f"{card.path}: the card has no [native] table")
    if precision not in PRECISIONS:
        raise ModelError(f"native precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {precision!r}")
    if TASK_KERNEL.get(card.task) != spec.kernel:
        raise ModelError(f"{card.path}: native.kernel = {spec.kernel!r} does not run task "
                         f"{card.task!r}")
    path = card.native_path
    assert path is not None
    if not path.is_file():
        raise ModelError(f"native weights {path} (named by {card.path}) do not exist")
    if verify:
        actual = file_sha256(path)
        if actual != spec.sha256:
            raise ModelError(f"{path}: sha256 {actual} does not match the card's native.sha256 "
                             f"{spec.sha256} ({card.path}); re-run 'emgd models import' (or "
                             "'emgd models build-random') to regenerate the model")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ModelError(f"cannot read native weights {path}: {exc}") from exc
    return KERNELS[spec.kernel](_Weights(arrays, str(path)), card, precision, capacity)


def check_native(card: ModelCard, session: ort.InferenceSession, native: NativeNet) -> float:
    """Run a seeded probe through the graph and the native kernel from the initial state;
    ModelError when they disagree by more than the precision allows. Returns the difference."""
    if card.output.valid is not None:
        return _check_native_steps(card, session, native)
    rng = np.random.default_rng(20251125)
    state = card.initial_state()
    inp = card.input
    if inp.kind == "emg":
        prime = inp.prime
        assert prime is not None
        emg = (rng.standard_normal((prime.samples + 40 * inp.unit, inp.channels)) * 30.0
               ).astype(np.float32)
        state[prime.state] = prime.apply(emg[:prime.samples])[None]
        x = emg[prime.samples:]
    else:
        x = rng.standard_normal((20, *inp.row_shape)).astype(np.float32)
    names = [s.name for s in card.states]
    want = session.run(["y"], {"x": x[None], **state})[0][0]
    got = native.run(x, {k: v.copy() for k, v in state.items() if k in names})
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    tol = (NATIVE_TOL[native.precision] * max(1.0, float(np.max(np.abs(want))))
           if want.size else 0.0)
    if not diff <= tol:
        raise ModelError(
            f"{card.path}: the native weights {card.native_path} disagree with the ONNX graph "
            f"{card.onnx_path} by {diff:.3g} on a probe input (tolerance {tol:.3g} for "
            f"{native.precision}): they are not the same network. Re-run 'emgd models import' "
            "(or 'build-random') to regenerate both, or set decoder_backend = \"onnx\"")
    log.debug("%s: native %s kernel matches the graph to %.2g", card.name, native.precision,
              diff)
    return diff


# handwriting probe: calls from a state with warm caches; at least PROBE_CALLS, then on until
# two emissions (the reference layout emits on the 2nd and 6th call), at most PROBE_MAX_CALLS
PROBE_CALLS = 8
PROBE_MAX_CALLS = 64


def _check_native_steps(card: ModelCard, session: ort.InferenceSession,
                        native: NativeNet) -> float:
    """The probe for a graph with a ``valid`` output (handwriting): from a seeded state with
    random caches and counts 40 + b (past every block's warm-up, so calls emit soon), calls
    through both, each carrying its own state (module constants: how many). ``valid`` must
    agree on every call and be true at least once; y is compared where valid, the next states
    after every call (counts exactly)."""
    rng = np.random.default_rng(20251125)
    inp = card.input
    state = card.initial_state()
    for spec in card.states:
        a = state[spec.name]
        if a.dtype.kind == "f":
            state[spec.name] = rng.standard_normal(a.shape).astype(a.dtype)
        else:  # counters: block b has seen 40 + b inputs
            seen = (40 + np.arange(a.shape[0])).reshape(-1, *([1] * (a.ndim - 1)))
            state[spec.name] = np.broadcast_to(seen, a.shape).astype(a.dtype)
    names = [s.name for s in card.states]
    graph_state = {k: v.copy() for k, v in state.items()}
    native_state = {k: v.copy() for k, v in state.items()}
    outputs = ["y", card.output.valid, *(f"{n}_next" for n in names)]
    diff, emitted = 0.0, 0
    problem = None
    calls = 0
    while calls < PROBE_CALLS or (emitted < 2 and calls < PROBE_MAX_CALLS):
        call = calls
        calls += 1
        x = rng.standard_normal((inp.unit, *inp.row_shape)).astype(np.float32)
        out = session.run(outputs, {"x": x[None], **graph_state})
        graph_state = dict(zip(names, out[2:]))
        y, valid = native.run(x, native_state)  # type: ignore[misc]
        want_valid = bool(np.asarray(out[1]).reshape(-1)[0])
        if bool(valid) != want_valid:
            problem = f"valid is {bool(valid)} on probe call {call}, the graph says {want_valid}"
            break
        pairs = [(n, native_state[n], graph_state[n]) for n in names]
        if want_valid:
            emitted += 1
            pairs.insert(0, ("y", np.asarray(y).reshape(-1), out[0].reshape(-1)))
        for name, got, want in pairs:
            if got.shape != want.shape:
                problem = f"{name} has shape {got.shape}, the graph's {want.shape}"
            elif got.dtype.kind != "f":
                if not np.array_equal(got, want):
                    problem = f"{name} differs from the graph's after probe call {call}"
            elif want.size:
                d = float(np.max(np.abs(got.astype(np.float64) - want)))
                t = NATIVE_TOL[native.precision] * max(1.0, float(np.max(np.abs(want))))
                diff = max(diff, d)
                if not d <= t:
                    problem = (f"{name} differs by {d:.3g} after probe call {call} "
                               f"(tolerance {t:.3g} for {native.precision})")
            if problem:
                break
        if problem:
            break
    if problem is None and emitted == 0:
        problem = f"none of {calls} probe calls emitted (the check would prove nothing)"
    if problem is not None:
        raise ModelError(
            f"{card.path}: the native weights {card.native_path} disagree with the ONNX graph "
            f"{card.onnx_path}: {problem}; they are not the same network. Re-run 'emgd models "
            "import' (or 'build-random') to regenerate both, or set decoder_backend = \"onnx\"")
    log.debug("%s: native %s kernel matches the graph to %.2g over %d probe calls "
              "(%d emitted)", card.name, native.precision, diff, calls, emitted)
    return diff
