"""Model cards: the TOML file next to each decoder's ONNX graph that says how to drive it.

A card declares the task, the input the graph expects (raw EMG or MPF frames, the scale from
µV to the network's units, the high-pass the runtime applies first), the timing (hop, left
context, output rate), the outputs (labels or vocabulary, blank), the carried state tensors
(names, shapes, dtypes, initial values), event parameters for the detectors, the licence and
the provenance (where the weights came from, sha256 of the ONNX file). ``models/README.md``
documents every key; this module parses (``tomllib``) and validates cards (every error is a
:class:`~emgd.errors.ModelError` naming the key, via ``emgd.modelcard_reader``) and
re-exports the writer (:func:`write_card`, a small TOML writer of its own in
``emgd.modelcard_write``: no dependency).

    card = load_card("models/discrete_gestures.toml")
    card.onnx_path, card.states[0].name, card.output_sample(j)

Checking the card against the graph itself (tensor names, shapes, dtypes, the file's
sha256) happens when the runtime loads it (:func:`emgd.decoders.load_decoder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from emgd.errors import ModelError
from emgd.modelcard_reader import TableReader
from emgd.modelcard_write import (  # re-exported: callers import the writer from here
    card_to_dict,  # noqa: F401
    dumps_toml,  # noqa: F401
    write_card,  # noqa: F401
)

SCHEMA = 1
TASKS = ("discrete_gestures", "wrist", "handwriting")
INPUT_KINDS = ("emg", "mpf")
OUTPUT_KINDS = ("logits", "log_probs", "value")
DTYPES: dict[str, type] = {"float32": np.float32, "int64": np.int64, "int32": np.int32,
                           "bool": np.bool_}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PRIME_TRANSFORMS = ("none", "reinhard")
MPF_WINDOWS = (16, 20)  # STFT frames per MPF window: handwriting, wrist
RESERVED_NAMES = ("x", "y")

Scalar = str | int | float | bool


@dataclass(frozen=True)
class ModelFile:
    """``[model]``: the ONNX file (relative to the card) and how to open it."""

    file: str
    sha256: str
    data_file: str | None = None  # ONNX external data, when the exporter wrote one
    data_sha256: str | None = None
    graph_optimization: str = "all"
    opset: int | None = None


@dataclass(frozen=True)
class Prime:
    """``[input.prime]``: the first ``samples`` of a segment fill state ``state`` (not x)."""

    state: str
    samples: int
    transform: str = "none"  # "reinhard": range * s / (midpoint + |s|)
    range: float = 64.0
    midpoint: float = 32.0

    def apply(self, samples: np.ndarray) -> np.ndarray:
        """The state value (float32) for the first ``samples`` (n, C) of a segment."""
        s = samples.astype(np.float32)
        if self.transform != "reinhard":
            return s
        out = np.float32(self.range) * s / (np.float32(self.midpoint) + np.abs(s))
        return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class InputSpec:
    """``[input]``: what ``x`` holds and what the runtime does to the stream first."""

    kind: str  # "emg" (raw samples, rows (C,)) or "mpf" (frames, rows (6, C, C))
    unit: int  # rows of x per network step unit (x's time length is a multiple of it)
    fixed: bool = False  # true: x takes exactly `unit` rows per call
    channels: int = 16
    sample_rate: float = 2000.0
    units: str = "uV"  # units of the stream the runtime receives
    scale: float = 1.0  # network input = scale × stream (for MPF: applied before MPF)
    scale_note: str = ""
    highpass_hz: float = 0.0  # 0: none; else causal Butterworth before the network / MPF
    highpass_order: int = 4
    mpf_window: int | None = None  # MPF only: STFT frames per window (16 or 20)
    prime: Prime | None = None

    @property
    def row_shape(self) -> tuple[int, ...]:
        c = self.channels
        return (c,) if self.kind == "emg" else (6, c, c)


@dataclass(frozen=True)
class Timing:
    """``[timing]``, in samples of the stream: output j ends at ``left_context + hop·j``."""

    hop: int
    left_context: int
    output_rate_hz: float


@dataclass(frozen=True)
class OutputSpec:
    """``[output]``: what a row of ``y`` means."""

    kind: str  # "logits" (sigmoid each), "log_probs" (CTC), "value" (regression)
    labels: tuple[str, ...]
    blank: int | None = None
    valid: str | None = None  # name of a bool output: rows where it is false are no output
    units: str = ""


@dataclass(frozen=True)
class StateSpec:
    """One ``[[state]]``: a graph input ``name`` whose next value is output ``name_next``."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    init: float = 0.0

    def initial(self) -> np.ndarray:
        return np.full(self.shape, self.init, dtype=DTYPES[self.dtype])


@dataclass(frozen=True)
class NativeSpec:
    """``[native]``: the network's weights for emgd's Numba step kernel (:mod:`emgd.native`)."""

    kernel: str  # "gestures_lstm", "wrist_lstm" or "handwriting_conformer"
    file: str  # .npz of the state_dict (float32), next to the card
    sha256: str
    # measured by the exporter: int16 LSTM rows against float32, same weights, offline
    int16_max_abs_delta: float | None = None
    int16_events_identical: bool | None = None
    test_data: str = ""


@dataclass(frozen=True)
class ModelCard:
    name: str
    task: str
    description: str
    licence: str
    model: ModelFile
    input: InputSpec
    timing: Timing
    output: OutputSpec
    states: tuple[StateSpec, ...]
    events: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Scalar] = field(default_factory=dict)
    schema: int = SCHEMA
    native: NativeSpec | None = None
    path: Path | None = field(default=None, compare=False)  # where it was loaded from

    @property
    def onnx_path(self) -> Path:
        base = self.path.parent if self.path is not None else Path(".")
        return base / self.model.file

    @property
    def data_path(self) -> Path | None:
        if self.model.data_file is None:
            return None
        base = self.path.parent if self.path is not None else Path(".")
        return base / self.model.data_file

    @property
    def native_path(self) -> Path | None:
        if self.native is None:
            return None
        base = self.path.parent if self.path is not None else Path(".")
        return base / self.native.file

    def initial_state(self) -> dict[str, np.ndarray]:
        return {s.name: s.initial() for s in self.states}

    def output_sample(self, j: int) -> int:
        """Segment-relative index of the last sample output ``j`` depends on."""
        return self.timing.left_context + self.timing.hop * j


# --------------------------------------------------------------------------- reading


def load_card(path: str | PathLike[str]) -> ModelCard:
    """Read and validate a card (not yet against its graph: see ``emgd.decoders``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(f"model card not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read model card {path}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"model card {path} is not valid TOML: {exc}") from exc
    card = parse_card(data, str(path))
    return _replace_path(card, path)


def parse_card(data: Mapping[str, Any], source: str = "<card>") -> ModelCard:
    """Validate a card's TOML tables; errors name ``source`` and the offending key."""
    r = TableReader(data, source, "")
    schema = r.integer("schema", minimum=1)
    if schema != SCHEMA:
        raise ModelError(f"{source}: schema = {schema} is not supported (this emgd reads "
                         f"schema {SCHEMA}); upgrade emgd or re-run 'emgd models import'")
    task = r.choice("task", TASKS)
    card = ModelCard(
        name=r.name("name"),
        task=task,
        description=r.text("description", ""),
        licence=r.nonempty("licence"),
        model=_model(r.table("model")),
        input=_input(r.table("input"), task),
        timing=_timing(r.table("timing")),
        output=_output(r.table("output")),
        states=tuple(_state(t) for t in r.tables("state")),
        events=_free(r.table("events", optional=True)),
        provenance=_provenance(r.table("provenance")),
        schema=schema,
        native=_native(r.table("native", optional=True), task),
    )
    r.done()
    _cross_check(card, source)
    return card


def _model(r: TableReader) -> ModelFile:
    m = ModelFile(
        file=r.text("file"),
        sha256=r.sha256("sha256"),
        data_file=r.text("data_file", None),
        data_sha256=r.sha256("data_sha256", None),
        graph_optimization=r.choice("graph_optimization", OPTIMIZATION_LEVELS, "all"),
        opset=r.integer("opset", None, minimum=1),
    )
    r.done()
    if (m.data_file is None) != (m.data_sha256 is None):
        raise r.error("data_file", "data_file and data_sha256 go together")
    for key, name in (("file", m.file), ("data_file", m.data_file)):
        if name is not None and (Path(name).is_absolute() or ".." in Path(name).parts):
            raise r.error(key, f"must be a file name next to the card, got {name!r}")
    return m


NATIVE_KERNELS = {"discrete_gestures": "gestures_lstm", "wrist": "wrist_lstm",
                  "handwriting": "handwriting_conformer"}


def _native(r: TableReader | None, task: str) -> NativeSpec | None:
    if r is None:
        return None
    kernels = (NATIVE_KERNELS[task],) if task in NATIVE_KERNELS else ()
    if not kernels:
        raise r.error("kernel", f"task {task} has no native kernel (only "
                                f"{', '.join(NATIVE_KERNELS)})")
    n = NativeSpec(
        kernel=r.choice("kernel", kernels),
        file=r.text("file"),
        sha256=r.sha256("sha256"),
        int16_max_abs_delta=r.number("int16_max_abs_delta", None, minimum=0.0),
        int16_events_identical=r.flag("int16_events_identical", None),
        test_data=r.text("test_data", ""),
    )
    r.done()
    if Path(n.file).is_absolute() or ".." in Path(n.file).parts:
        raise r.error("file", f"must be a file name next to the card, got {n.file!r}")
    return n


def _input(r: TableReader, task: str) -> InputSpec:
    kind = r.choice("kind", INPUT_KINDS)
    prime_table = r.table("prime", optional=True)
    spec = InputSpec(
        kind=kind,
        unit=r.integer("unit", minimum=1),
        fixed=r.flag("fixed", False),
        channels=r.integer("channels", 16, minimum=1),
        sample_rate=r.number("sample_rate", 2000.0, positive=True),
        units=r.text("units", "uV"),
        scale=r.number("scale", 1.0, positive=True),
        scale_note=r.text("scale_note", ""),
        highpass_hz=r.number("highpass_hz", 0.0, minimum=0.0),
        highpass_order=r.integer("highpass_order", 4, minimum=2),
        mpf_window=r.integer("mpf_window", None, minimum=1),
        prime=_prime(prime_table) if prime_table is not None else None,
    )
    r.done()
    expected = "emg" if task == "discrete_gestures" else "mpf"
    if kind != expected:
        raise r.error("kind", f"task {task} takes input kind {expected!r}, not {kind!r}")
    if kind == "mpf":
        if spec.mpf_window not in MPF_WINDOWS:
            raise r.error("mpf_window", f"MPF input needs mpf_window in {MPF_WINDOWS} "
                                        f"(STFT frames), got {spec.mpf_window}")
        if spec.prime is not None:
            raise r.error("prime", "only raw EMG input can prime a state")
    elif spec.mpf_window is not None:
        raise r.error("mpf_window", "only MPF input has an MPF window")
    if spec.highpass_hz and not spec.highpass_hz < spec.sample_rate / 2:
        raise r.error("highpass_hz", f"must be below {spec.sample_rate / 2} Hz")
    if spec.highpass_order % 2:
        raise r.error("highpass_order", "must be even")
    return spec


def _prime(r: TableReader) -> Prime:
    p = Prime(state=r.name("state"), samples=r.integer("samples", minimum=1),
              transform=r.choice("transform", PRIME_TRANSFORMS, "none"),
              range=r.number("range", 64.0), midpoint=r.number("midpoint", 32.0, positive=True))
    r.done()
    return p


def _timing(r: TableReader) -> Timing:
    t = Timing(hop=r.integer("hop", minimum=1), left_context=r.integer("left_context", minimum=0),
               output_rate_hz=r.number("output_rate_hz", positive=True))
    r.done()
    return t


def _output(r: TableReader) -> OutputSpec:
    o = OutputSpec(kind=r.choice("kind", OUTPUT_KINDS), labels=r.str_list("labels"),
                   blank=r.integer("blank", None, minimum=0), valid=r.name("valid", None),
                   units=r.text("units", ""))
    r.done()
    if not o.labels:
        raise r.error("labels", "needs at least one label")
    if o.blank is not None and o.blank >= len(o.labels):
        raise r.error("blank", f"{o.blank} is not a label index (0..{len(o.labels) - 1})")
    if o.kind == "log_probs" and o.blank is None:
        raise r.error("blank", "log_probs output (CTC) needs the blank index")
    return o


def _state(r: TableReader) -> StateSpec:
    s = StateSpec(name=r.name("name"), shape=r.shape("shape"),
                  dtype=r.choice("dtype", tuple(DTYPES), "float32"), init=r.number("init", 0.0))
    r.done()
    if s.name in RESERVED_NAMES or s.name.endswith("_next"):
        raise r.error("name", f"{s.name!r} is reserved (x, y and *_next are not state names)")
    return s


def _cross_check(card: ModelCard, source: str) -> None:
    seen: set[str] = set()
    for i, s in enumerate(card.states):
        if s.name in seen:
            raise ModelError(f"{source}: state[{i}].name: {s.name!r} is declared twice")
        seen.add(s.name)
    if card.output.valid is not None and (card.output.valid in seen
                                          or card.output.valid in RESERVED_NAMES):
        raise ModelError(f"{source}: output.valid: {card.output.valid!r} clashes with a tensor")
    inp, timing = card.input, card.timing
    expected_rate = inp.sample_rate / timing.hop
    if not math.isclose(timing.output_rate_hz, expected_rate, rel_tol=1e-9):
        raise ModelError(f"{source}: timing.output_rate_hz = {timing.output_rate_hz} but "
                         f"input.sample_rate / timing.hop = {expected_rate}")
    prime = inp.prime
    if prime is not None:
        spec = next((s for s in card.states if s.name == prime.state), None)
        if spec is None:
            raise ModelError(f"{source}: input.prime.state: {prime.state!r} is not a declared "
                             "state")
        if spec.shape != (1, prime.samples, inp.channels) or spec.dtype != "float32":
            raise ModelError(f"{source}: input.prime: state {prime.state!r} must be float32 "
                             f"(1, {prime.samples}, {inp.channels}), the card says "
                             f"{spec.dtype} {spec.shape}")


def _free(r: TableReader | None, scalars_only: bool = False) -> dict[str, Any]:
    if r is None:
        return {}
    out = {}
    for key, value in r.data.items():
        ok = isinstance(value, (str, int, float, bool)) or (
            not scalars_only and isinstance(value, list)
            and all(isinstance(v, (str, int, float, bool)) for v in value))
        if not ok:
            what = "a string, number or boolean" + ("" if scalars_only else " (or a list)")
            raise r.error(key, f"must be {what}")
        out[key] = value
    return out


def _provenance(r: TableReader) -> dict[str, Any]:
    r.nonempty("source")
    return _free(r, scalars_only=True)


def _replace_path(card: ModelCard, path: Path) -> ModelCard:
    return dataclasses.replace(card, path=path)


def file_sha256(path: str | PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
