"""The event schema: one pack function and one unpack function (see ``docs/events.md``).

A message on the wire is a ZeroMQ multipart message of two frames:

1. the topic, UTF-8 ``<kind>/<device>`` (for example ``status/SIM-0000``), so a prefix
   subscription to ``gesture`` receives every device's gestures;
2. the payload, one msgpack map with string keys.

Every payload carries the common fields of :data:`COMMON_FIELDS`; each kind adds its own.
Binary arrays (raw EMG, per-frame network outputs) travel as msgpack ``bin`` holding
little-endian float32 values in row-major order, with their shape in sibling fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

#: Schema version carried in every payload as ``v``. Bumped on incompatible changes only.
SCHEMA_VERSION = 1

#: Fields every event carries, in the order they are written.
COMMON_FIELDS = ("v", "seq", "device", "sample", "t", "t_recv_ns", "t_pub_ns", "simulated")

#: Kinds emgd publishes (the part of the topic before the slash).
KINDS = ("status", "raw", "gesture", "handwriting", "wrist", "outputs", "marker", "truth")


@dataclass(slots=True)
class Event:
    """A decoded message. ``fields`` holds everything beyond the common fields."""

    kind: str
    device: str
    seq: int
    sample: int
    t: float
    t_recv_ns: int
    t_pub_ns: int
    simulated: bool
    v: int = SCHEMA_VERSION
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        return f"{self.kind}/{self.device}"

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def array(self, key: str = "data") -> np.ndarray:
        """Decode a binary float32 array field using its shape fields (``n``, ``channels``)."""
        buf = self.fields[key]
        arr = np.frombuffer(buf, dtype="<f4")
        if key == "data" and "channels" in self.fields:
            return arr.reshape(-1, int(self.fields["channels"]))
        return arr

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (binary arrays become nested lists of floats)."""
        out: dict[str, Any] = {"topic": self.topic}
        for name in COMMON_FIELDS:
            out[name] = getattr(self, name)
        for key, value in self.fields.items():
            if isinstance(value, (bytes, bytearray)):
                out[key] = self.array(key).tolist()
            else:
                out[key] = value
        return out


class EventPacker:
    """Packs events; owns a reusable msgpack packer (one per publishing thread)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def pack(self, common: tuple[int, str, int, float, int, int, bool],
             fields: dict[str, Any]) -> bytes:
        """Pack ``(seq, device, sample, t, t_recv_ns, t_pub_ns, simulated)`` plus ``fields``."""
        seq, device, sample, t, t_recv_ns, t_pub_ns, simulated = common
        payload = {
            "v": SCHEMA_VERSION, "seq": seq, "device": device, "sample": int(sample),
            "t": float(t), "t_recv_ns": int(t_recv_ns), "t_pub_ns": int(t_pub_ns),
            "simulated": bool(simulated),
        }
        for key in fields:
            if key in payload:
                raise ValueError(f"field {key!r} collides with a common field")
        payload.update(fields)
        return self._packer.pack(payload)


def pack_event(event: Event) -> tuple[bytes, bytes]:
    """(topic, payload) for an :class:`Event` (convenience for tests and tools)."""
    payload = EventPacker().pack(
        (event.seq, event.device, event.sample, event.t, event.t_recv_ns, event.t_pub_ns,
         event.simulated), event.fields)
    return event.topic.encode(), payload


class SchemaError(ValueError):
    """A message that does not follow docs/events.md."""


def unpack_event(topic: bytes, payload: bytes) -> Event:
    """Decode one ``[topic, payload]`` message; raises :class:`SchemaError` if malformed."""
    try:
        kind, _, device = topic.decode().partition("/")
        data = msgpack.unpackb(payload, raw=False)
    except (UnicodeDecodeError, ValueError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise SchemaError(f"undecodable message on topic {topic!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise SchemaError(f"payload on {topic!r} is not a map")
    missing = [k for k in COMMON_FIELDS if k not in data]
    if missing:
        raise SchemaError(f"payload on {topic!r} lacks common fields {missing}")
    if data["v"] != SCHEMA_VERSION:
        raise SchemaError(f"payload on {topic!r} has schema v{data['v']}, "
                          f"this emgd understands v{SCHEMA_VERSION}")
    common = {k: data.pop(k) for k in COMMON_FIELDS}
    return Event(kind=kind, device=common["device"], seq=common["seq"],
                 sample=common["sample"], t=common["t"], t_recv_ns=common["t_recv_ns"],
                 t_pub_ns=common["t_pub_ns"], simulated=common["simulated"],
                 v=common["v"], fields=data)


__all__ = ["Event", "EventPacker", "pack_event", "unpack_event", "SchemaError",
           "SCHEMA_VERSION", "COMMON_FIELDS", "KINDS"]
