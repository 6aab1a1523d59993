"""Writing model cards: :func:`write_card` and a small TOML writer of its own (no dependency).

Re-exported from ``emgd.modelcard``, where callers import it; reading and validation live
there (``load_card``, ``parse_card``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emgd.modelcard import ModelCard


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
        **({"native": _drop_none({
            "kernel": card.native.kernel, "file": card.native.file,
            "sha256": card.native.sha256,
            "int16_max_abs_delta": card.native.int16_max_abs_delta,
            "int16_events_identical": card.native.int16_events_identical,
            "test_data": card.native.test_data or None})} if card.native else {}),
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
