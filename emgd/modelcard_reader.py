"""Typed, key-naming access to the TOML tables of a model card (used by ``emgd.modelcard``).

Every error is a :class:`~emgd.errors.ModelError` that names ``source: table.key``; unknown
keys are errors too (:meth:`TableReader.done`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from emgd.errors import ModelError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class TableReader:
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
        return None if value is None else TableReader(value, self.source, f"{self.prefix}{key}.")

    def tables(self, key: str) -> list[TableReader]:
        value = self._get(key, [], (list,), "an array of tables ([[...]])")
        out = []
        for i, t in enumerate(value):
            if not isinstance(t, dict):
                raise self.error(f"{key}[{i}]", "must be a table")
            out.append(TableReader(t, self.source, f"{self.prefix}{key}[{i}]."))
        return out

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key (see models/README.md for the schema)")


_REQUIRED = object()
