"""BLE end to end, with no radio: bleak's real BlueZ backend against BlueZoo.

A private D-Bus system bus runs BlueZoo with two adapters (emgd.drivers.blebus); the
simulated band (``python -m emgd.drivers.blesim``) serves the GATT layout on ``hci1``; the
daemon (``python -m emgd --device ble?adapter=hci0``) finds, connects and streams, with
``DBUS_SYSTEM_BUS_ADDRESS`` pointing at the private bus. Skipped where dbus-daemon, busctl
or bluezoo is missing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from emgd.drivers.blebus import BAND_ADDRESS, PrivateBluez, missing_tools
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.sim import COUNTER_CHANNEL, counter_codes, counter_modulus

from emgd.client import Subscriber

pytest.importorskip("bleak", reason="BLE tests need bleak")
pytest.importorskip("dbus_fast", reason="the simulated BLE band needs dbus-fast")
if missing_tools():
    pytest.skip(f"BlueZoo BLE tests need: {', '.join(missing_tools())}", allow_module_level=True)

pytestmark = pytest.mark.slow
SERIAL = "SIM-B0E2"
WANT_SAMPLES = 10 * 2000  # at least 10 s of EMG at 2000 samples/s
BAND_PATH = f"/org/bluez/hci0/dev_{BAND_ADDRESS.replace(':', '_')}"


@pytest.fixture
def bluez() -> Iterator[PrivateBluez]:
    with PrivateBluez() as bus:
        yield bus


@pytest.fixture
def ble_band(bluez: PrivateBluez) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "emgd.drivers.blesim", "--serial", SERIAL, "--sim", "counter=1"],
        env=bluez.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once registered and advertising
    if "advertising" not in line:
        proc.kill()
        raise AssertionError(f"simulated BLE band did not start: {line}{proc.communicate()[1]}")
    yield proc
    proc.terminate()
    proc.communicate(timeout=10)


def scan_json(bluez: PrivateBluez, timeout: float) -> tuple[int, list[dict], str]:
    res = subprocess.run([sys.executable, "-m", "emgd", "scan", "--adapter", "hci0",
                          "--timeout", str(timeout), "--json"], env=bluez.env(),
                         capture_output=True, text=True, timeout=60, check=False)
    return res.returncode, json.loads(res.stdout or "null"), res.stderr


def test_daemon_streams_10s_from_the_ble_band_then_a_forced_disconnect_is_link_lost(
        bluez, ble_band, run_daemon, endpoints):
    pub, ctl = endpoints
    env = {"DBUS_SYSTEM_BUS_ADDRESS": bluez.address}
    with Subscriber(pub, topics=["raw", "status"]) as sub:
        daemon = run_daemon("--device", "ble?adapter=hci0", "--raw", "--pub", pub, "--ctl", ctl,
                            "--log-level", "info", env=env)
        blocks, statuses, total = [], [], 0
        for event in sub.events(timeout=60):
            if event.kind == "status":
                statuses.append(event)
            elif event.kind == "raw":
                blocks.append(event)
                total += event["n"]
                if total >= WANT_SAMPLES + 2000 and len(statuses) >= 10:
                    break
        assert total >= WANT_SAMPLES, f"only {total} samples arrived"
        assert daemon.proc.poll() is None

        res = bluez.busctl("call", "org.bluez", BAND_PATH, "org.bluez.Device1", "Disconnect")
        assert res.returncode == 0, res.stderr
        lost = next((e for e in sub.events(timeout=15)
                     if e.kind == "status" and e["link"] == "lost"), None)
        assert lost is not None, "no status with link=lost after the forced disconnect"
        assert daemon.proc.poll() is None, "the daemon must outlive the link"
        rc, _, err = daemon.terminate()
    assert rc == 0, err

    # every sample, in order, no message lost between daemon and subscriber
    seqs = [b.seq for b in blocks]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    index = np.concatenate([b.sample + np.arange(b["n"]) for b in blocks])
    assert np.array_equal(np.diff(index), np.ones(len(index) - 1))
    data = np.concatenate([b.array() for b in blocks])
    codes = counter_codes(data[:, COUNTER_CHANNEL], SampleFormat.INT24)
    assert np.array_equal(codes, index % counter_modulus(SampleFormat.INT24))

    st = statuses[-1]
    assert st.device == SERIAL and st.simulated is False
    assert st["link"] == "up" and st["gaps"] == 0 and st["lost_samples"] == 0
    assert st["crc_errors"] == 0 and st["device_stats"]["malformed"] == 0
    rates = [s["rate_hz"] for s in statuses[2:]]
    print(f"\nBLE e2e: {total} samples, {len(blocks)} raw blocks, median rate "
          f"{statistics.median(rates):.1f}/s, gaps {st['gaps']}, daemon cpu "
          f"{statistics.median(s['cpu'] for s in statuses[2:]):.1f}%")
    assert abs(statistics.median(rates) - 2000) < 200, rates  # the band paces itself at 2 kHz
    assert lost.device == SERIAL and "disconnected" in lost["device_stats"]["last_error"]
    assert "link lost" in err


def test_scan_lists_the_band_and_its_url_opens_it(bluez, ble_band, run_daemon, endpoints):
    rc, bands, err = scan_json(bluez, 5)
    assert rc == 0, err
    assert [(b["name"], b["address"], b["serial"]) for b in bands] == [
        (f"emgd-band {SERIAL}", BAND_ADDRESS, SERIAL)]
    assert isinstance(bands[0]["rssi"], int) and bands[0]["url"] == f"ble:{SERIAL}?adapter=hci0"
    # the band is known to BlueZ now; a second scan (the daemon's) must still find it
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        daemon = run_daemon("--device", bands[0]["url"], "--pub", pub, "--ctl", ctl,
                            env={"DBUS_SYSTEM_BUS_ADDRESS": bluez.address})
        up = next((e for e in sub.events(timeout=30) if e["link"] == "up"), None)
        rc, _, err = daemon.terminate()
    assert up is not None and up.device == SERIAL, err
    assert rc == 0, err


def test_no_band_within_the_timeout(bluez, run_daemon, endpoints):
    rc, bands, err = scan_json(bluez, 1.5)
    assert (rc, bands) == (1, []) and "no band found" in err
    pub, ctl = endpoints
    rc, _, err = run_daemon("--device", "ble?adapter=hci0&timeout=1.5", "--pub", pub,
                            "--ctl", ctl, env={"DBUS_SYSTEM_BUS_ADDRESS": bluez.address}
                            ).wait(60)
    assert rc == 1
    assert "no band found within 1.5 s on hci0" in err and "emgd scan" in err


def test_no_bluetooth_at_all_is_a_clear_error(tmp_path, run_daemon, endpoints):
    env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path / 'none'}"}
    res = subprocess.run([sys.executable, "-m", "emgd", "scan", "--timeout", "1"],
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 1 and "Bluetooth is not available" in res.stderr
    pub, ctl = endpoints
    rc, _, err = run_daemon("--device", "ble?timeout=1", "--pub", pub, "--ctl", ctl,
                            env=env).wait(60)
    assert rc == 1 and "Bluetooth is not available" in err and "bluetoothctl power on" in err
