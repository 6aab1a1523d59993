"""Settings: frozen dataclasses, validated once, with one documented precedence.

Precedence, lowest to highest::

    built-in defaults  <  config file (TOML)  <  EMGD_* environment  <  command-line flags

Every key of the config file is a field below. Nested tables (``[gesture]``) map to nested
dataclasses. Environment variables are ``EMGD_<KEY>`` for top-level keys and
``EMGD_<TABLE>__<KEY>`` for nested ones (double underscore), for example
``EMGD_DEVICE=sim`` or ``EMGD_GESTURE__THRESHOLD=0.4``; their values are parsed as the
field's type (``true``/``false``/``1``/``0`` for booleans). An unknown key or a value of the
wrong type raises :class:`~emgd.errors.ConfigError` naming the key, where it came from and
what is accepted.

``docs/configuration.md`` and ``systemd/emgd.toml`` list every key; a test checks that both
stay in step with these dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emgd.errors import ConfigError

DECODER_BACKENDS = ("native-int16", "native-float32", "onnx")  # as emgd.decoders
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    """Everything the daemon can be told. Field comments are the documentation."""

    #: Device URL: auto, sim[?opts], serial:PATH[?baud=N], ble[:NAME-OR-ADDRESS], replay:FILE
    device: str = "auto"
    #: ZeroMQ endpoint the event PUB socket binds to.
    pub: str = "tcp://127.0.0.1:7400"
    #: ZeroMQ endpoint of the control (REP) socket.
    ctl: str = "tcp://127.0.0.1:7401"
    #: Also publish raw EMG blocks on raw/<device>.
    raw: bool = False
    #: Also publish each decoder's per-frame network output (research topics).
    outputs: bool = False
    #: Log level; when not set on a terminal the daemon shows a live status line instead.
    log_level: str = "info"
    #: Ring buffer length in seconds of EMG (readers that fall further behind lose samples).
    ring_seconds: float = 30.0
    #: Period of status/<device> messages in seconds (also sent on every change of state).
    status_interval_s: float = 1.0
    #: Python thread switch interval in ms (lower bounds how long another thread can hold the GIL).
    switch_interval_ms: float = 0.5
    #: ZeroMQ send high-water mark of the PUB socket (messages per subscriber).
    pub_hwm: int = 10000
    #: Record to this HDF5 file from the start ("" = do not record; see docs/recording.md).
    record: str = ""
    #: Folder of model cards, one per task ("" = the shipped models, then the user's
    #: ~/.local/share/emgd/models; "none" = run without decoders).
    models: str = ""
    #: Gestures: per-gesture detection threshold overriding the model card's (0.35 for the
    #: reference), e.g. {thumb_click = 0.5}.
    gesture_threshold: dict[str, float] = field(default_factory=dict)
    #: Gestures: per-gesture debounce window in ms overriding the card's (50 ms for the
    #: reference), e.g. {index_release = 80}.
    gesture_debounce_ms: dict[str, float] = field(default_factory=dict)
    #: Gestures: hops (10 samples each) gathered before one network call. 1 = every 5 ms,
    #: the lowest latency; more hops per call save some CPU at the price of up to
    #: 5 ms · (hops - 1) more latency on gesture events.
    gesture_batch_hops: int = 1
    #: What runs the decoders: "native-int16" = emgd's Numba kernels, the gesture and wrist
    #: LSTM matrices stored as int16 rows + float32 scales (the default: outputs within
    #: 1e-4, the card records the measured change; handwriting's kernel is float32),
    #: "native-float32" = the same kernels with float32 weights, "onnx" = ONNX Runtime
    #: running each card's graph. Models without native weights always run in ONNX Runtime.
    decoder_backend: str = "native-int16"
    #: Handwriting: finalise the current line after this many seconds without a key (0 = never).
    handwriting_idle_s: float = 0.0
    #: Wrist: gain applied when integrating the network output into `position`.
    wrist_gain: float = 1.0
    #: Wrist: clamp `position` to [-wrist_range_rad, +wrist_range_rad] (0 = no clamping).
    wrist_range_rad: float = 0.0
    #: Wrist: exponential smoothing factor of published velocity/position (0 = off, < 1).
    wrist_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(self.log_level in LOG_LEVELS, "log_level", self.log_level,
               f"one of {', '.join(LOG_LEVELS)}")
        _check(self.ring_seconds >= 1.0, "ring_seconds", self.ring_seconds, "a number >= 1")
        _check(self.status_interval_s > 0, "status_interval_s", self.status_interval_s,
               "a number > 0")
        _check(0 < self.switch_interval_ms <= 100, "switch_interval_ms",
               self.switch_interval_ms, "a number in (0, 100]")
        _check(self.pub_hwm > 0, "pub_hwm", self.pub_hwm, "a positive integer")
        for key in ("pub", "ctl"):
            value = getattr(self, key)
            _check("://" in value, key, value, "a ZeroMQ endpoint such as tcp://127.0.0.1:7400")
        _check(bool(self.device.strip()), "device", self.device, "a device URL")
        _check(self.handwriting_idle_s >= 0, "handwriting_idle_s", self.handwriting_idle_s,
               "a number >= 0")
        _check(1 <= self.gesture_batch_hops <= 40, "gesture_batch_hops",
               self.gesture_batch_hops, "an integer from 1 to 40")
        _check(self.decoder_backend in DECODER_BACKENDS, "decoder_backend", self.decoder_backend,
               f"one of {', '.join(DECODER_BACKENDS)}")
        for name, thr in self.gesture_threshold.items():
            _check(0.0 < thr < 1.0, f"gesture_threshold.{name}", thr, "a number in (0, 1)")
        for name, ms in self.gesture_debounce_ms.items():
            _check(ms >= 0, f"gesture_debounce_ms.{name}", ms, "a number >= 0")
        _check(self.wrist_range_rad >= 0, "wrist_range_rad", self.wrist_range_rad,
               "a number >= 0")
        _check(0 <= self.wrist_smoothing < 1, "wrist_smoothing", self.wrist_smoothing,
               "a number in [0, 1)")


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"bad value for {key!r}: {value!r}; expected {expected}")


# --------------------------------------------------------------------------- loading


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults, a TOML file, the environment and overrides.

    ``overrides`` holds command-line values (only the flags actually given); nested keys
    use dotted names (``"gesture.threshold"``).
    """
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged = _merge(merged, _read_toml(Path(config_file)), Settings, str(config_file))
    env = os.environ if environ is None else environ
    merged = _merge(merged, _from_env(env), Settings, "environment")
    if overrides:
        merged = _merge(merged, _undot(overrides), Settings, "command line")
    try:
        return _build(Settings, merged)
    except TypeError as exc:  # pragma: no cover - _merge validates names first
        raise ConfigError(str(exc)) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except PermissionError as exc:
        raise ConfigError(f"config file {path} is not readable ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("EMGD_") or name == "EMGD_CONFIG":
            continue
        path = name[len("EMGD_"):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _EnvString(value)
    return out


class _EnvString(str):
    """A value that came from the environment: parsed to the field's type on merge."""


def _undot(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], new: Mapping[str, Any], cls: type, source: str,
           prefix: str = "") -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown setting {dotted!r} ({source}); known keys"
                f"{' in [' + prefix[:-1] + ']' if prefix else ''}: {known}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted!r} ({source}) must be a table of settings")
            out[key] = _merge(out.get(key, {}), value, hint, source, dotted + ".")
        elif typing.get_origin(hint) is dict:
            coerced = _coerce(value, hint, dotted, source)
            out[key] = {**out.get(key, {}), **coerced}  # tables merge key by key
        else:
            out[key] = _coerce(value, hint, dotted, source)
    return out


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    from_env = isinstance(value, _EnvString)
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (from_env and value.lower() in ("", "none")):
            return None
        hint = options[0]
    try:
        if hint is bool:
            if from_env:
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if from_env:
                return int(value)
            if isinstance(value, int):
                return value
            raise ValueError
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            if from_env:
                return float(value)
            if isinstance(value, (int, float)):
                return float(value)
            raise ValueError
        if hint is str:
            if isinstance(value, str):
                return str(value)
            raise ValueError
        if typing.get_origin(hint) is dict:
            if isinstance(value, Mapping):
                value_type = typing.get_args(hint)[1]
                return {str(k): _coerce(v, value_type, f"{key}.{k}", source)
                        for k, v in value.items()}
            raise ValueError
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(
            f"bad value for {key!r} ({source}): {value!r}; expected {_type_name(hint)}"
        ) from None
    raise ConfigError(f"setting {key!r} has an unsupported type {hint!r}")  # pragma: no cover


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        kwargs[key] = _build(hint, value) if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)


def describe(cls: type = Settings, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, type name, default) for every setting: used by docs and tests."""
    rows: list[tuple[str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(describe(hint, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            name = str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))
            rows.append((f"{prefix}{f.name}", name, default))
    return rows


__all__ = ["Settings", "load_settings", "describe", "LOG_LEVELS", "field"]
