"""The event schema: one pack/unpack pair; malformed payloads are rejected, not crashed on."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from emgd.events import (COMMON_FIELDS, SCHEMA_VERSION, Event, EventPacker, SchemaError,
                         pack_event, unpack_event)


def make_event(**fields):
    return Event(kind="gesture", device="SIM-0001", seq=7, sample=12345, t=1.7e9,
                 t_recv_ns=100, t_pub_ns=250, simulated=True, fields=fields)


def test_round_trip_keeps_every_field():
    ev = make_event(name="index_press", p=0.91)
    topic, payload = pack_event(ev)
    assert topic == b"gesture/SIM-0001"
    back = unpack_event(topic, payload)
    assert back == ev
    raw = msgpack.unpackb(payload)
    assert [k for k in raw][: len(COMMON_FIELDS)] == list(COMMON_FIELDS)
    assert raw["v"] == SCHEMA_VERSION


def test_binary_array_round_trip():
    data = np.arange(32, dtype=np.float32).reshape(2, 16)
    ev = make_event(n=2, channels=16, data=data.tobytes())
    back = unpack_event(*pack_event(ev))
    np.testing.assert_array_equal(back.array(), data)
    assert back.to_json_dict()["data"][1][0] == 16.0


def test_field_may_not_shadow_common_field():
    with pytest.raises(ValueError, match="collides"):
        EventPacker().pack((0, "d", 0, 0.0, 0, 0, False), {"seq": 3})


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 1}),
    msgpack.packb({k: 0 for k in COMMON_FIELDS} | {"v": 99}),
])
def test_malformed_payloads_raise_schema_error(payload):
    with pytest.raises(SchemaError):
        unpack_event(b"status/x", payload)


@given(st.binary(max_size=64))
def test_random_bytes_never_crash(payload):
    try:
        unpack_event(b"raw/x", payload)
    except SchemaError:
        pass
