"""Model cards: the TOML file next to each decoder's ONNX graph that says how to drive it.

A card declares the task, the input the graph expects (raw EMG or MPF frames, the scale from
µV to the network's units, the high-pass the runtime applies first), the timing (hop, left
context, output rate), the outputs (labels or vocabulary, blank), the carried state tensors
(names, shapes, dtypes, initial values), event parameters for the detectors, the licence and
the provenance (where the weights came from, sha256 of the ONNX file). ``models/README.md``
documents every key; this module parses (``tomllib``), validates (every error is a
:class:`~emgd.errors.ModelError` naming the key) and writes cards (:func:`write_card`, a
small TOML writer of its own: no dependency).

    card = load_card("models/discrete_gestures.toml")
    card.onnx_path, card.states[0].name, card.output_sample(j)

Checking the card against the graph itself (tensor names, shapes, dtypes, the file's
sha256) happens when the runtime loads it (:func:`emgd.decoders.load_decoder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from emgd.errors import ModelError

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
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

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
    r = _Reader(data, source, "")
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
    )
    r.done()
    _cross_check(card, source)
    return card


def _model(r: _Reader) -> ModelFile:
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


def _input(r: _Reader, task: str) -> InputSpec:
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


def _prime(r: _Reader) -> Prime:
    p = Prime(state=r.name("state"), samples=r.integer("samples", minimum=1),
              transform=r.choice("transform", PRIME_TRANSFORMS, "none"),
              range=r.number("range", 64.0), midpoint=r.number("midpoint", 32.0, positive=True))
    r.done()
    return p


def _timing(r: _Reader) -> Timing:
    t = Timing(hop=r.integer("hop", minimum=1), left_context=r.integer("left_context", minimum=0),
               output_rate_hz=r.number("output_rate_hz", positive=True))
    r.done()
    return t


def _output(r: _Reader) -> OutputSpec:
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


def _state(r: _Reader) -> StateSpec:
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


def _free(r: _Reader | None, scalars_only: bool = False) -> dict[str, Any]:
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


def _provenance(r: _Reader) -> dict[str, Any]:
    r.nonempty("source")
    return _free(r, scalars_only=True)


def _replace_path(card: ModelCard, path: Path) -> ModelCard:
    return dataclasses.replace(card, path=path)


class _Reader:
    """Typed access to one TOML table; every error names ``source: prefix.key``."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str) -> None:
        self.data, self.source, self.prefix = data, source, prefix
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ModelError:
        return ModelError(f"{self.source}: {self.prefix}{key}: {message}")

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, "missing (required)")
            return default
        value = self.data[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(key, f"must be {what}, got {type(value).__name__} {value!r}")
        return value

    def text(self, key: str, default: Any = ...) -> Any:
        return self._get(key, _REQUIRED if default is ... else default, (str,), "a string")

    def nonempty(self, key: str) -> Any:
        value = self.text(key)
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def name(self, key: str, default: Any = ...) -> Any:
        value = self.text(key, default)
        if value is not None and not _NAME.fullmatch(value):
            raise self.error(key, f"{value!r} is not a valid name (letters, digits, _ . -)")
        return value

    def flag(self, key: str, default: Any = ...) -> Any:
        return self._get(key, _REQUIRED if default is ... else default, (bool,), "true or false")

    def integer(self, key: str, default: Any = ..., minimum: int | None = None) -> Any:
        value = self._get(key, _REQUIRED if default is ... else default, (int,), "an integer")
        if value is not None and minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def number(self, key: str, default: Any = ..., positive: bool = False,
              minimum: float | None = None) -> Any:
        value = self._get(key, _REQUIRED if default is ... else default, (int, float), "a number")
        if value is None:
            return None
        value = float(value)
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, got {value}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.text(key, default)
        if value is not None and value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def sha256(self, key: str, default: Any = ...) -> Any:
        value = self.text(key, default)
        if value is not None and not _SHA256.fullmatch(value):
            raise self.error(key, "must be 64 lower-case hex digits")
        return value

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self._get(key, _REQUIRED, (list,), "a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise self.error(key, "must be a list of strings")
        return tuple(value)

    def shape(self, key: str) -> tuple[int, ...]:
        value = self._get(key, _REQUIRED, (list,), "a list of positive integers")
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                for v in value):
            raise self.error(key, f"must be a list of positive integers, got {value!r}")
        return tuple(value)

    def table(self, key: str, optional: bool = False) -> Any:
        value = self._get(key, None if optional else _REQUIRED, (dict,), "a table")
        return None if value is None else _Reader(value, self.source, f"{self.prefix}{key}.")

    def tables(self, key: str) -> list[_Reader]:
        value = self._get(key, [], (list,), "an array of tables ([[...]])")
        out = []
        for i, t in enumerate(value):
            if not isinstance(t, dict):
                raise self.error(f"{key}[{i}]", "must be a table")
            out.append(_Reader(t, self.source, f"{self.prefix}{key}[{i}]."))
        return out

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key (see models/README.md for the schema)")


_REQUIRED = object()


# --------------------------------------------------------------------------- writing


def card_to_dict(card: ModelCard) -> dict[str, Any]:
    """The card as TOML tables (optional keys left out when unset)."""
    m, i, t, o = card.model, card.input, card.timing, card.output
    model = _drop_none({"file": m.file, "sha256": m.sha256, "data_file": m.data_file,
                        "data_sha256": m.data_sha256,
                        "graph_optimization": m.graph_optimization, "opset": m.opset})
    inp = _drop_none({
        "kind": i.kind, "unit": i.unit, "fixed": i.fixed, "channels": i.channels,
        "sample_rate": i.sample_rate, "units": i.units, "scale": i.scale,
        "scale_note": i.scale_note or None, "highpass_hz": i.highpass_hz,
        "highpass_order": i.highpass_order, "mpf_window": i.mpf_window,
    })
    if i.prime is not None:
        p = i.prime
        inp["prime"] = {"state": p.state, "samples": p.samples, "transform": p.transform,
                        "range": p.range, "midpoint": p.midpoint}
    out = _drop_none({"kind": o.kind, "labels": list(o.labels), "blank": o.blank,
                      "valid": o.valid, "units": o.units or None})
    return {
        "schema": card.schema,
        "name": card.name,
        "task": card.task,
        "description": card.description,
        "licence": card.licence,
        "model": model,
        "input": inp,
        "timing": {"hop": t.hop, "left_context": t.left_context,
                   "output_rate_hz": t.output_rate_hz},
        "output": out,
        **({"events": dict(card.events)} if card.events else {}),
        "provenance": dict(card.provenance),
        "state": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "init": s.init}
                  for s in card.states],
    }


def write_card(card: ModelCard, path: str | PathLike[str]) -> Path:
    """Write ``card`` as TOML (UTF-8); reading it back gives an equal card."""
    path = Path(path)
    path.write_text(dumps_toml(card_to_dict(card)), encoding="utf-8")
    return path


def dumps_toml(data: Mapping[str, Any]) -> str:
    """TOML for nested dicts of str/int/float/bool/lists; lists of dicts become [[tables]]."""
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(data: Mapping[str, Any], keys: list[str], lines: list[str]) -> None:
    plain = {k: v for k, v in data.items() if not _is_table(v) and not _is_table_array(v)}
    for k, v in plain.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in data.items():
        if _is_table(v):
            lines.extend(["", f"[{'.'.join(map(_key, [*keys, k]))}]"])
            _emit_table(v, [*keys, k], lines)
    for k, v in data.items():
        if _is_table_array(v):
            for item in v:
                lines.extend(["", f"[[{'.'.join(map(_key, [*keys, k]))}]]"])
                _emit_table(item, [*keys, k], lines)


def _is_table(v: Any) -> bool:
    return isinstance(v, Mapping)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _string(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def file_sha256(path: str | PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
