"""Device URLs: one string addresses any band.

Grammar::

    url     = scheme [ ":" target ] [ "?" option *( "&" option ) ]
    option  = name "=" value | name          ; a bare name sets a boolean option to true
    scheme  = sim | serial | ble | replay | auto

Examples: ``sim``, ``sim?seed=1&counter=1&paced=0``, ``serial:/dev/ttyACM0?baud=2000000``,
``ble``, ``ble:EMG-1234``, ``replay:session.h5?speed=4``, ``auto``.

The target and values may be percent-encoded (``%3F`` for ``?``, ``%26`` for ``&``). Each
scheme declares its options (name, type, default, help) in :data:`SCHEMES`; an unknown
scheme, a missing or unexpected target, an unknown option or a bad value raises
:class:`emgd.errors.ConfigError` with a message that repeats the scheme's grammar.
Booleans accept 1/0, true/false, yes/no, on/off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import unquote

from emgd.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class Option:
    """One URL option: its name, type (int, float, bool, str), default and help."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None

    def metavar(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        return {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT"}[self.type]

    def parse(self, text: str) -> object:
        """The typed value of ``text``; raises ValueError with a short reason."""
        if self.type is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")
        if self.type is str:
            if self.choices and text not in self.choices:
                raise ValueError(f"expected one of {', '.join(self.choices)}")
            return text
        try:
            number = self.type(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if self.type is int else 'a number'}") from None
        if self.type is float and not math.isfinite(number):
            raise ValueError("expected a finite number")
        if self.min is not None and number < self.min:
            raise ValueError(f"must be >= {self.min:g}")
        if self.max is not None and number > self.max:
            raise ValueError(f"must be <= {self.max:g}")
        return number


@dataclass(frozen=True, slots=True)
class Scheme:
    """A URL scheme: whether it takes a target, and its options."""

    name: str
    summary: str
    target: str  # "none", "optional" or "required"
    target_name: str = ""
    options: tuple[Option, ...] = ()

    def option(self, name: str) -> Option | None:
        for opt in self.options:
            if opt.name == name:
                return opt
        return None

    def usage(self) -> str:
        """One line: the scheme's syntax and summary."""
        head = self.name
        if self.target == "required":
            head += f":{self.target_name}"
        elif self.target == "optional":
            head += f"[:{self.target_name}]"
        if self.options:
            head += "[?option=value&...]"
        return f"{head}  -- {self.summary}"

    def grammar(self) -> str:
        """Multi-line help: the scheme's syntax, then one line per option."""
        lines = [self.usage()]
        for opt in self.options:
            key = f"{opt.name}={opt.metavar()}"
            lines.append(f"    {key:<22} {opt.help} (default: {_show(opt.default)})")
        return "\n".join(lines)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class DeviceUrl(NamedTuple):
    """A parsed, validated URL; ``options`` holds every option of the scheme (defaults
    filled in), read-only."""

    scheme: str
    target: str | None
    options: Mapping[str, object]

    def __str__(self) -> str:
        text = self.scheme + (f":{self.target}" if self.target is not None else "")
        spec = SCHEMES[self.scheme]
        changed = [
            f"{o.name}={_show(self.options[o.name])}"
            for o in spec.options
            if self.options[o.name] != o.default
        ]
        return text + ("?" + "&".join(changed) if changed else "")


_SIM_OPTIONS = (
    Option("seed", int, 0, "seed of the signal and fault generators", min=0),
    Option("paced", bool, True, "deliver in real time; 0 = as fast as possible"),
    Option("counter", bool, False, "replace channel 15 by the sample index (tests)"),
    Option("format", str, "int24", "sample format on the wire", choices=("int16", "int24")),
    Option("frame", int, 10, "samples per EMG frame (int24 <= 42, int16 <= 63)", min=1, max=63),
    Option("serial", str, "SIM-0000", "serial number the band reports"),
    Option("bursts", float, 1.0, "mean muscle bursts per second; 0 = noise floor only", min=0),
    Option("limit", int, 0, "stop after this many samples (end of stream); 0 = never", min=0),
    Option("drop", float, 0.0, "probability that a frame is dropped", min=0, max=1),
    Option("corrupt", float, 0.0, "probability that a frame gets one byte flipped", min=0, max=1),
    Option("pause", float, 0.0, "seconds the link stalls (bytes held, then burst)", min=0),
    Option("pause_every", float, 0.0, "seconds between link stalls; 0 = never", min=0),
    Option("drift_ppm", float, 0.0, "device clock error in ppm (+ = band runs fast)",
           min=-10000, max=10000),
)

SCHEMES: dict[str, Scheme] = {
    "sim": Scheme("sim", "simulated band (synthetic sEMG, same bytes as hardware)", "none",
                  options=_SIM_OPTIONS),
    "serial": Scheme(
        "serial", "band on a serial port / USB CDC-ACM dongle", "required", "PORT",
        (
            Option("baud", int, 2000000, "baud rate (int24 needs >= 2000000)", min=1),
            Option("reconnect", bool, True, "reopen the port with backoff after it fails"),
            Option("timeout", float, 5.0,
                   "seconds to wait at start for the first frame; 0 = do not wait", min=0),
        ),
    ),
    "ble": Scheme(
        "ble", "band over Bluetooth LE (first band found, or by name/address/serial)",
        "optional", "NAME-OR-ADDRESS",
        (
            Option("adapter", str, "", "host adapter, e.g. hci0 (empty = system default)"),
            Option("timeout", float, 10.0, "seconds to scan for the band", min=0),
            Option("reconnect", bool, True,
                   "after link loss, reconnect with backoff (0 = stay lost)"),
            Option("format", str, "int24", "sample format to ask the band for",
                   choices=("int16", "int24")),
        ),
    ),
    "replay": Scheme(
        "replay", "replay a recording (HDF5) as if it were a band", "required", "FILE",
        (
            Option("speed", float, 1.0, "playback speed; 0 = as fast as possible", min=0),
            Option("start", float, 0.0, "first sample at this Unix time (s); 0 = file start",
                   min=0),
            Option("end", float, 0.0, "stop before this Unix time (s); 0 = file end", min=0),
            Option("loop", bool, False, "start again at the end"),
        ),
    ),
    "auto": Scheme("auto", "look for a band (serial, virtual pty, BLE); else the simulated band",
                   "none",
                   options=(Option("timeout", float, 2.0, "seconds to scan for a BLE band",
                                   min=0),)),
}


def grammar(scheme: str | None = None) -> str:
    """Help text for one scheme, or for all of them."""
    if scheme is not None:
        return SCHEMES[scheme].grammar()
    return "\n".join(spec.grammar() for spec in SCHEMES.values())


def split_url(text: str) -> tuple[str, str | None, list[tuple[str, str | None]]]:
    """Syntax only: (scheme, target or None, [(name, raw value or None), ...])."""
    rest, sep, query = text.partition("?")
    scheme, colon, target = rest.partition(":")
    pairs: list[tuple[str, str | None]] = []
    if sep:
        for item in query.split("&"):
            if not item:
                continue
            name, eq, value = item.partition("=")
            pairs.append((unquote(name), unquote(value) if eq else None))
    return scheme.strip().lower(), (unquote(target) if colon else None), pairs


def parse_url(text: str) -> DeviceUrl:
    """Parse and validate ``text`` against its scheme's options."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            "empty device URL; expected one of:\n"
            + "\n".join(s.usage() for s in SCHEMES.values())
        )
    scheme, target, pairs = split_url(text.strip())
    spec = SCHEMES.get(scheme)
    if spec is None:
        raise ConfigError(
            f"device URL {text!r}: unknown scheme {scheme!r}; known schemes: "
            f"{', '.join(SCHEMES)}\n" + "\n".join(s.usage() for s in SCHEMES.values())
        )

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"device URL {text!r}: {reason}\nusage: {spec.grammar()}")

    if target == "":
        target = None
    if spec.target == "none" and target is not None:
        raise fail(f"scheme {scheme!r} takes no target")
    if spec.target == "required" and target is None:
        raise fail(f"scheme {scheme!r} needs a {spec.target_name}")
    values: dict[str, object] = {o.name: o.default for o in spec.options}
    seen: set[str] = set()
    for name, raw in pairs:
        opt = spec.option(name)
        if opt is None:
            raise fail(f"unknown option {name!r}")
        if name in seen:
            raise fail(f"option {name!r} given twice")
        seen.add(name)
        if raw is None:
            if opt.type is not bool:
                raise fail(f"option {name!r} needs a value ({name}={opt.metavar()})")
            values[name] = True
            continue
        try:
            values[name] = opt.parse(raw)
        except ValueError as exc:
            raise fail(f"bad value {raw!r} for option {name!r}: {exc}") from None
    return DeviceUrl(scheme, target, MappingProxyType(values))
