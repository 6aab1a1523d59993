"""The BLE GATT layout helpers: control commands, frame sizing, advertisement parsing."""

from __future__ import annotations

import pytest
from emgd.drivers import blegatt as gatt
from emgd.drivers.blesim import split_frames
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.sim import SimConfig, SimStream


def test_uuids_are_distinct_lowercase_128_bit():
    uuids = [gatt.SERVICE, gatt.EMG_CHAR, gatt.CONTROL_CHAR, gatt.BATTERY_SERVICE,
             gatt.BATTERY_LEVEL, gatt.DEVICE_INFO_SERVICE, gatt.SERIAL_NUMBER,
             gatt.FIRMWARE_REVISION]
    assert len(set(uuids)) == len(uuids)
    assert all(len(u) == 36 and u == u.lower() for u in uuids)
    assert gatt.SERIAL_NUMBER == "00002a25-0000-1000-8000-00805f9b34fb"


def test_control_commands_round_trip_and_bad_ones_are_refused():
    assert gatt.encode_start("int24", 10) == bytes.fromhex("01010a")
    assert gatt.decode_command(bytes.fromhex("01010a")) == (gatt.CMD_START, SampleFormat.INT24, 10)
    assert gatt.decode_command(gatt.encode_stop()) == (gatt.CMD_STOP, None, 0)
    for bad in (b"", b"\x03", bytes.fromhex("010200"), bytes.fromhex("01012b"), b"\x02\x00"):
        with pytest.raises(ValueError):
            gatt.decode_command(bad)
    with pytest.raises(ValueError):
        gatt.encode_start("int16", 64)
    state = gatt.StreamState(True, SampleFormat.INT16, 15)
    assert gatt.decode_state(state.encode()) == state


@pytest.mark.parametrize("fmt, mtu, n", [
    ("int24", 517, 10), ("int24", 515, 10), ("int24", 514, 9), ("int16", 517, 15),
    ("int24", 23, 1), ("int16", 2000, 15)])
def test_a_frame_fits_one_notification(fmt, mtu, n):
    assert gatt.samples_per_notification(fmt, mtu) == n
    if n > 1:
        assert gatt.frame_bytes(fmt, n) <= min(mtu - 3, gatt.MAX_VALUE)
    assert gatt.frame_bytes("int24", 10) == 512


def test_the_serial_number_comes_from_service_data_or_the_name():
    data = {gatt.SERVICE: gatt.encode_service_data("SIM-7", 200)}
    assert gatt.serial_from_adv(data, "whatever") == "SIM-7"
    assert gatt.serial_from_adv({}, "emgd-band SIM-8") == "SIM-8"
    assert gatt.serial_from_adv({}, "other") is None
    assert gatt.is_band([gatt.SERVICE.upper()], None) and gatt.is_band([], "emgd-band X")
    assert not gatt.is_band(["0000180f-0000-1000-8000-00805f9b34fb"], "watch")


def test_split_frames_gives_whole_frames_one_per_notification():
    data = SimStream(SimConfig()).generate_bytes(4000)
    frames = split_frames(data)
    assert b"".join(frames) == data
    assert {len(f) for f in frames if f[3] == 1} == {512} and len(frames) == 402
