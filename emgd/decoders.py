"""Streaming decoders: one ONNX Runtime session plus the carried state, driven from a card.

Each decoder owns its session and its state (STYLE habit 6): input goes in with
``accept(...)``, ``ready()`` says whether a step would produce output, ``step()`` runs every
whole step unit buffered and returns the new outputs, ``reset()`` starts a new segment (after
a gap). The graph maps ``(x, *state) -> (y, [valid], *state_next)``; the card
(:mod:`emgd.modelcard`, ``models/README.md``) says what x holds, how long a step unit is
and which tensors are state. Carrying state is generic: after each call the dictionary of
state arrays takes the ``<name>_next`` outputs (no copy).

- :class:`GestureDecoder` (input kind ``emg``): raw µV samples ``(n, C)`` in; scale and the
  card's causal high-pass applied on the way into a preallocated buffer; the first
  ``input.prime.samples`` of a segment fill the ``prime`` state (the gesture network's
  compressed 11-sample tail), after which every ``unit`` (10) samples are one output.
  One ``step()`` runs all buffered units in one session call.
- :class:`MpfDecoder` (``mpf``, the wrist network): MPF frames ``(k, 6, C, C)`` in, computed
  once by the pipeline's extractor (:mod:`emgd.mpf`) and shared; one call per ``step()``.
- :class:`HandwritingDecoder` (``mpf`` with a ``valid`` output, a fixed-size x): frames are
  fed ``unit`` (2) at a time, an odd one waits; rows whose ``valid`` is false are dropped.

Output ``j`` of a segment (counting only valid rows) ends at segment sample
``card.output_sample(j) = left_context + hop·j``; ``step()`` returns the rows and the index
of the first one.

Input scale: ``network input = scale × µV``. For MPF decoders the scale cannot be applied to
the shared EMG; it is applied to the frames instead, exactly: scaling EMG by a multiplies
every band matrix by a⁴, so its matrix log gains ``4 ln a`` on the diagonal (eigenvalues
<= 0, which MPF maps to log 0 := 0, are the one case this does not cover). The high-pass of
an MPF card must be applied by whoever computes the shared MPF (:func:`mpf_highpass`).

Sessions (:mod:`emgd.onnxsession`: :func:`open_session`, :func:`check_graph`) use one
intra-op and one inter-op thread unless told otherwise; create decoders once, call
:meth:`Decoder.warmup` before reporting ready.
"""

from __future__ import annotations

import logging
import math
from os import PathLike
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from emgd.errors import ModelError
from emgd.highpass import HighPass
from emgd.modelcard import ModelCard, load_card
from emgd.mpf_reference import FFT_HOP, MPF_STRIDE, MpfSetting
from emgd.native import NativeNet, check_native, load_native
from emgd.onnxsession import check_graph, open_session

log = logging.getLogger(__name__)

DEFAULT_CAPACITY_S = 1.0  # buffered input a decoder holds between steps, in seconds of EMG
DECODER_BACKENDS = ("native-int16", "native-float32", "onnx")


class StepOutput(NamedTuple):
    """New outputs of one ``step()``: ``values`` (k, n_labels) float32; ``first`` = segment
    index of ``values[0]``. ``values`` may be reused by the next step: copy what you keep."""

    values: np.ndarray
    first: int


# --------------------------------------------------------------------------- loading


def load_decoder(card_path: str | PathLike[str], *, threads: int = 1,
                 optimization: str | None = None, capacity: int | None = None,
                 verify: bool = True, backend: str = "onnx") -> Decoder:
    """Load a card, check its file(s) and graph, and build the decoder its input kind needs.

    ``capacity`` is the most input rows (samples or frames) held between steps. ``verify``
    checks the ONNX file's sha256 against the card (turn off only for files you just built).
    ``backend``: ``"onnx"`` runs the graph in ONNX Runtime; ``"native-int16"`` or
    ``"native-float32"`` run emgd's Numba kernel (:mod:`emgd.native`) on the card's
    ``[native]`` weights, after checking it against the graph on a probe input (cards without
    ``[native]`` always run in ONNX Runtime; the handwriting kernel is float32 whichever
    native precision is asked for).
    """
    card = load_card(card_path)
    if backend not in DECODER_BACKENDS:
        raise ModelError(f"decoder backend must be one of {', '.join(DECODER_BACKENDS)}, "
                         f"got {backend!r}")
    session = open_session(card, threads=threads, optimization=optimization, verify=verify)
    check_graph(card, session)
    if card.input.kind == "emg":
        decoder: Decoder = GestureDecoder(card, session, capacity)
    elif card.output.valid is not None:
        decoder = HandwritingDecoder(card, session, capacity)
    else:
        decoder = MpfDecoder(card, session, capacity)
    if backend == "onnx":
        return decoder
    if card.native is None:
        log.info("%s: the card has no [native] weights, so ONNX Runtime runs it (re-import or "
                 "rebuild the model to get them)", card.name)
        return decoder
    native = load_native(card, backend.removeprefix("native-"), decoder.capacity, verify=verify)
    check_native(card, session, native)
    decoder.native = native
    return decoder


def mpf_highpass(cards: list[ModelCard]) -> tuple[float, int] | None:
    """The one (cut-off Hz, order) the shared MPF input needs, or None; ModelError if the MPF
    cards disagree (they share one extractor, so they must share its preprocessing)."""
    wanted = {(c.input.highpass_hz, c.input.highpass_order if c.input.highpass_hz else 0)
              for c in cards if c.input.kind == "mpf"}
    if len(wanted) > 1:
        names = ", ".join(f"{c.name} ({c.input.highpass_hz} Hz)" for c in cards
                          if c.input.kind == "mpf")
        raise ModelError(f"MPF decoders disagree on input.highpass_hz: {names}; they share "
                         "one MPF extractor, so re-import them with the same --highpass")
    hz, order = wanted.pop() if wanted else (0.0, 0)
    return (hz, order) if hz else None


# --------------------------------------------------------------------------- decoders


class Decoder:
    """The shared machinery: an input buffer of rows, the state, and the session call.

    Subclasses turn what ``accept`` receives into rows (:meth:`_append`).
    """

    def __init__(self, card: ModelCard, session: ort.InferenceSession,
                 capacity: int | None = None) -> None:
        self.card = card
        self.session = session
        inp = card.input
        self.unit = inp.unit
        rows_per_second = inp.sample_rate if inp.kind == "emg" else inp.sample_rate / 40.0
        if capacity is None:
            capacity = math.ceil(DEFAULT_CAPACITY_S * rows_per_second)
        self.capacity = max(int(capacity), 0) + self.unit
        self._buf = np.zeros((self.capacity, *inp.row_shape), dtype=np.float32)
        self._n = 0  # rows buffered
        self._initial = card.initial_state()
        self.state: dict[str, np.ndarray] = {}
        self._feeds: dict[str, np.ndarray] = {}
        self._names = [s.name for s in card.states]
        self._out_names = ["y", *(f"{n}_next" for n in self._names)]
        self._valid = card.output.valid
        if self._valid is not None:
            self._out_names.insert(1, self._valid)
        n_labels = len(card.output.labels)
        self._rows = np.zeros((self.capacity if inp.fixed else 0, n_labels), dtype=np.float32)
        self._empty = np.zeros((0, n_labels), dtype=np.float32)
        self.emitted = 0  # outputs produced in this segment
        self.steps = 0  # session calls since construction
        self.native: NativeNet | None = None  # set by load_decoder: runs instead of the graph
        self._valid_out = np.zeros(1, dtype=bool)  # the native kernel's valid, as an array
        self.reset()

    # ------------------------------------------------------------------ public API

    def accept(self, data: np.ndarray) -> None:
        """Buffer new input (see the subclass); raises ValueError when it would overflow."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True when ``step()`` would run the network (a whole unit is buffered)."""
        return self._n >= self.unit

    def step(self, max_units: int | None = None) -> StepOutput:
        """Run every whole unit buffered (at most ``max_units`` of them, oldest first);
        returns the new output rows (possibly none)."""
        units = self._n // self.unit
        if max_units is not None:
            units = min(units, max(int(max_units), 0))
        first = self.emitted
        if units == 0:
            return StepOutput(self._empty, first)
        used = units * self.unit
        if self.card.input.fixed:
            values = self._run_fixed(units)
        else:
            values = self._run(self._buf[None, :used])[0][0]
        rest = self._n - used
        if rest:
            self._buf[:rest] = self._buf[used:self._n]
        self._n = rest
        self.consumed += used
        self.emitted += len(values)
        return StepOutput(values, first)

    def reset(self) -> None:
        """Start a new segment: initial state, nothing buffered, output index 0."""
        self.state = {k: v.copy() for k, v in self._initial.items()}
        self._n = 0
        self.consumed = 0  # rows consumed by steps in this segment
        self.emitted = 0

    def warmup(self, units: int = 3) -> None:
        """Run a few steps on zeros (first-call allocations, kernel set-up), then reset."""
        self._warm_feed(units)
        while self.ready():
            self.step()
        self.reset()

    def output_sample(self, j: int) -> int:
        """Segment-relative index of the last sample output ``j`` depends on."""
        return self.card.output_sample(j)

    @property
    def buffered(self) -> int:
        """Rows (samples or frames) accepted but not yet consumed by a step."""
        return self._n

    # ------------------------------------------------------------------ internals

    @property
    def backend(self) -> str:
        """What runs the network: ``onnx`` or ``native-int16`` / ``native-float32``."""
        return "onnx" if self.native is None else f"native-{self.native.precision}"

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.native is not None:
            out = self.native.run(x[0], self.state)
            self.steps += 1
            if self._valid is not None:  # handwriting: (y (1, n), valid), as the graph's pair
                y, valid = out
                self._valid_out[0] = valid
                return [y[None], self._valid_out]
            return [out[None]]
        feeds = self._feeds
        feeds["x"] = x
        for name in self._names:
            feeds[name] = self.state[name]
        out = self.session.run(self._out_names, feeds)
        self.steps += 1
        base = 1 if self._valid is None else 2
        for i, name in enumerate(self._names):
            self.state[name] = out[base + i]
        return out

    def _run_fixed(self, units: int) -> np.ndarray:
        """One call per unit (a graph with a fixed-size x); keep the rows marked valid."""
        m = 0
        for u in range(units):
            x = self._buf[None, u * self.unit:(u + 1) * self.unit]
            out = self._run(x)
            y = out[0][0]
            if self._valid is None:
                keep = y
            else:
                keep = y[np.asarray(out[1], dtype=bool).reshape(-1)]
            self._rows[m:m + len(keep)] = keep
            m += len(keep)
        return self._rows[:m]

    def _append(self, rows: np.ndarray) -> None:
        k = rows.shape[0]
        if self._n + k > self.capacity:
            raise ValueError(f"{self.card.name}: accepting {k} rows would overflow the "
                             f"buffer ({self._n} of {self.capacity} used): call step() first "
                             "or create the decoder with a larger capacity")
        self._buf[self._n:self._n + k] = rows
        self._n += k

    def _warm_feed(self, units: int) -> None:
        raise NotImplementedError


class GestureDecoder(Decoder):
    """Raw EMG in (µV), the gesture network's logits out (one row per 10 samples).

    ``accept(samples)`` takes float32 (n, C) µV, applies ``input.scale`` and the card's
    high-pass (state carried, reset with the decoder), primes the tail state with the first
    ``input.prime.samples`` of the segment and buffers the rest. Output j covers segment
    samples ``[hop·j, hop·j + left_context]``.
    """

    def __init__(self, card: ModelCard, session: ort.InferenceSession,
                 capacity: int | None = None) -> None:
        inp = card.input
        self._scale = np.float32(inp.scale)
        self._highpass = (HighPass(inp.highpass_hz, inp.sample_rate, inp.highpass_order,
                                   inp.channels) if inp.highpass_hz else None)
        self._prime = inp.prime
        need = self._prime.samples if self._prime is not None else 0
        self._prime_buf = np.zeros((need, inp.channels), dtype=np.float32)
        self._primed = 0
        cap = math.ceil(DEFAULT_CAPACITY_S * inp.sample_rate) if capacity is None else capacity
        self._scratch = np.zeros((cap + inp.unit, inp.channels), dtype=np.float32)
        super().__init__(card, session, capacity)

    def accept(self, samples: np.ndarray) -> None:
        """Buffer (n, C) float32 µV samples of the current segment."""
        channels = self.card.input.channels
        if samples.ndim != 2 or samples.shape[1] != channels:
            raise ValueError(f"samples must have shape (n, {channels}), got {samples.shape}")
        n = samples.shape[0]
        pending = self._prime_buf.shape[0] - self._primed
        if n - min(n, pending) + self._n > self.capacity:
            raise ValueError(f"{self.card.name}: accepting {n} samples would overflow the "
                             f"buffer ({self._n} of {self.capacity} used): call step() first "
                             "or create the decoder with a larger capacity")
        x = self._preprocess(samples)
        if pending:
            take = min(n, pending)
            self._prime_buf[self._primed:self._primed + take] = x[:take]
            self._primed += take
            x = x[take:]
            if self._primed == self._prime_buf.shape[0] and self._prime is not None:
                self.state[self._prime.state] = self._prime.apply(self._prime_buf)[None]
        if len(x):
            self._append(x)

    def reset(self) -> None:
        super().reset()
        self._primed = 0
        if self._highpass is not None:
            self._highpass.reset()

    def _preprocess(self, samples: np.ndarray) -> np.ndarray:
        if self._scale == 1.0 and self._highpass is None:
            return samples if samples.dtype == np.float32 else samples.astype(np.float32)
        out = self._scratch[:samples.shape[0]] if samples.shape[0] <= len(self._scratch) \
            else np.empty(samples.shape, np.float32)
        np.multiply(samples, self._scale, out=out, casting="unsafe")
        if self._highpass is not None:
            self._highpass.process(out, out=out)
        return out

    def _warm_feed(self, units: int) -> None:
        self.accept(np.zeros((self._prime_buf.shape[0] + units * self.unit,
                              self.card.input.channels), np.float32))


class MpfDecoder(Decoder):
    """MPF frames (k, 6, C, C) in, one network output row per ``unit`` frames.

    Frame f of the segment is the f-th frame of the shared extractor since its last reset;
    the frames must come from EMG filtered as the card's ``input.highpass_hz`` says
    (:func:`mpf_highpass`). The card's scale is applied to the frames (module docstring).
    """

    def __init__(self, card: ModelCard, session: ort.InferenceSession,
                 capacity: int | None = None) -> None:
        self._shift = np.float32(4.0 * math.log(card.input.scale))
        super().__init__(card, session, capacity)

    def accept(self, frames: np.ndarray) -> None:
        """Buffer (k, 6, C, C) float32 MPF frames of the current segment."""
        shape = self.card.input.row_shape
        if frames.ndim != 4 or frames.shape[1:] != shape:
            raise ValueError(f"frames must have shape (k, {', '.join(map(str, shape))}), "
                             f"got {frames.shape}")
        start = self._n
        self._append(frames)
        if self._shift != 0.0:
            c = shape[-1]
            block = self._buf[start:self._n].reshape(-1, shape[0], c * c)
            block[..., ::c + 1] += self._shift

    def _warm_feed(self, units: int) -> None:
        self.accept(np.zeros((units * self.unit, *self.card.input.row_shape), np.float32))


class HandwritingDecoder(MpfDecoder):
    """MPF frames in, CTC log-probabilities out, only on the calls the graph marks valid.

    The graph takes ``unit`` (2) frames per call (one time-reduction pair; an odd frame waits
    in the buffer) and says with its ``valid`` output whether ``y`` is an emission; emission
    i of a segment ends at sample ``left_context + hop·i``.
    """

    def __init__(self, card: ModelCard, session: ort.InferenceSession,
                 capacity: int | None = None) -> None:
        if card.output.valid is None:
            raise ModelError(f"{card.path}: a handwriting decoder needs output.valid")
        # MPF frame k of the segment ends at sample MPF_STRIDE·k + L (emgd.mpf_reference)
        window = card.input.mpf_window
        assert window is not None  # the card reader requires it for MPF input
        self._frame_lc = MpfSetting("input", window * FFT_HOP).left_context
        super().__init__(card, session, capacity)

    def emits_within(self, units: int) -> bool:
        """Whether running the next ``units`` calls would produce an output row (emission).

        Emission ``emitted`` ends at sample ``output_sample(emitted)``, i.e. at MPF frame
        ``(output_sample - L) / 40``; the next ``units`` calls consume frames
        ``consumed .. consumed + unit·units - 1``. Lets the caller run calls that cannot emit
        later (:class:`emgd.stages.DecoderStage`); a timing that does not fit this rule
        reports True (run now), so a wrong guess can only cost time, never an output.
        """
        if units <= 0:
            return False
        last = self.output_sample(self.emitted) - self._frame_lc
        if last % MPF_STRIDE:
            return True
        return last // MPF_STRIDE < self.consumed + self.unit * units


__all__ = ["Decoder", "GestureDecoder", "HandwritingDecoder", "MpfDecoder", "StepOutput",
           "check_graph", "load_decoder", "mpf_highpass", "open_session"]

