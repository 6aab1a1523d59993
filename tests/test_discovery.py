"""``--device auto``: the virtual band registry, serial and BLE discovery, the fallback.

BLE: this machine has no Bluetooth and the BLE driver is someone else's module, so the
``emgd.drivers.ble`` seam (``find_bands(timeout)``) is played by small stand-in modules;
the D-Bus reachability check runs against real unix sockets."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import types

import pytest
from emgd.drivers import discovery, serialport
from emgd.drivers.discovery import (
    Found,
    announce,
    announced_bands,
    bands_dir,
    ble_bands,
    resolve_auto,
    system_bus_reachable,
    withdraw,
)
from emgd.drivers.urls import SCHEMES

from emgd.daemon import resolve_device_url
from emgd.errors import ConfigError, DeviceError, MissingDependency


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real registry, udev link, USB port or system bus leaks into a test."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    monkeypatch.setattr(serialport, "UDEV_LINK", str(tmp_path / "emg-band"))
    monkeypatch.setattr(serialport.list_ports, "comports", lambda *a, **k: [])


@pytest.fixture
def pty_path():
    master, slave = os.openpty()
    path = os.ttyname(slave)
    yield path
    os.close(slave)
    os.close(master)


@pytest.fixture
def bus(tmp_path, monkeypatch):
    """A listening unix socket standing where the system bus would be."""
    path = tmp_path / "bus"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={path}")
    yield path
    srv.close()


@pytest.fixture
def fake_ble(monkeypatch):
    """Install a stand-in ``emgd.drivers.ble`` whose find_bands does ``behaviour``."""
    calls: list[float] = []

    def install(behaviour):
        module = types.ModuleType("emgd.drivers.ble")

        def find_bands(timeout):
            calls.append(timeout)
            return behaviour(timeout)

        module.find_bands = find_bands
        monkeypatch.setitem(sys.modules, "emgd.drivers.ble", module)
        return calls

    return install


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- registry


def test_bands_dir_follows_xdg_runtime_dir(tmp_path, monkeypatch):
    assert bands_dir() == tmp_path / "run" / "emgd" / "bands"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert str(bands_dir()) == f"/tmp/emgd-{os.getuid()}/bands"


def test_announce_list_withdraw(pty_path):
    entry = announce(pty_path, None, "SIM/01 x", "int24")
    assert entry is not None and entry.name == f"SIM_01_x.{os.getpid()}.json"
    assert oct(bands_dir().stat().st_mode & 0o777) == "0o700"
    record = json.loads(entry.read_text())
    assert record == {"v": 1, "path": pty_path, "link": None, "pid": os.getpid(),
                      "serial": "SIM/01 x", "format": "int24", "url": f"serial:{pty_path}"}
    assert announced_bands() == [Found(f"serial:{pty_path}", "virtual",
                                       f"virtual band SIM/01 x (emgd sim --pty, pid "
                                       f"{os.getpid()}) on {pty_path}")]
    withdraw(entry)
    withdraw(entry)
    assert announced_bands() == []


def test_stale_and_broken_entries_are_ignored(pty_path, tmp_path):
    folder = bands_dir()
    folder.mkdir(parents=True, mode=0o700)
    dead = folder / "DEAD.1.json"
    dead.write_text(json.dumps({"pid": dead_pid(), "path": pty_path}))
    gone = folder / "GONE.2.json"
    gone.write_text(json.dumps({"pid": os.getpid(), "path": str(tmp_path / "no-pty")}))
    (folder / "BROKEN.3.json").write_text("{not json")
    (folder / "PARTIAL.4.json").write_text(json.dumps({"path": pty_path}))
    regular = tmp_path / "regular"
    regular.write_text("")
    (folder / "FILE.5.json").write_text(json.dumps({"pid": os.getpid(), "path": str(regular)}))
    assert announced_bands() == []
    assert not dead.exists() and not gone.exists()  # stale entries of ours are removed


def test_newest_announcement_first_and_links_preferred(pty_path, tmp_path):
    master, slave = os.openpty()
    try:
        other = os.ttyname(slave)
        link = tmp_path / "band"
        link.symlink_to(other)
        old = announce(pty_path, None, "OLD", "int24")
        new = announce(other, str(link), "NEW", "int16")
        os.utime(old, ns=(10**18, 10**18))
        os.utime(new, ns=(2 * 10**18, 2 * 10**18))
        assert [f.url for f in announced_bands()] == [f"serial:{link}", f"serial:{pty_path}"]
        link.unlink()  # the link is gone: the pty path itself is announced
        assert announced_bands()[0].url == f"serial:{other}"
    finally:
        os.close(slave)
        os.close(master)


def test_a_registry_folder_of_another_user_is_not_trusted(pty_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the folder")
    announce(pty_path, None, "SIM", "int24")
    os.chown(bands_dir(), 65534, 65534)
    assert announced_bands() == []
    assert announce(pty_path, None, "SIM", "int24") is None


# --------------------------------------------------------------------------- serial


def test_udev_link_then_known_usb_ids(pty_path, monkeypatch):
    assert discovery.serial_bands() == []
    os.symlink(pty_path, serialport.UDEV_LINK)

    class Port:
        device, vid, pid = "/dev/ttyACM3", 0x1209, 0x0001

    class Same:
        device, vid, pid = pty_path, 0x1209, 0x0001

    monkeypatch.setattr(serialport.list_ports, "comports", lambda *a, **k: [Port, Same])
    found = discovery.serial_bands()
    assert [(f.url, f.source) for f in found] == [
        (f"serial:{serialport.UDEV_LINK}", "udev-link"), ("serial:/dev/ttyACM3", "usb-id")]
    assert "1209:0001" in found[1].description


# --------------------------------------------------------------------------- BLE


def test_system_bus_reachability(bus, tmp_path, monkeypatch):
    assert system_bus_reachable()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none;unix:path={bus}")
    assert system_bus_reachable()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    assert not system_bus_reachable()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:abstract=emgd-test-no-such-bus")
    assert not system_bus_reachable()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "tcp:host=localhost,port=1")
    assert system_bus_reachable()  # not probed: the BLE stack decides


def test_no_system_bus_means_no_ble_search(fake_ble):
    calls = fake_ble(lambda timeout: ["EMG-1"])
    assert ble_bands(1.0) == [] and calls == []


@pytest.mark.parametrize("result, urls", [
    (["EMG-1234"], ["ble:EMG-1234"]),
    (["ble:AA:BB:CC:DD:EE:FF"], ["ble:AA:BB:CC:DD:EE:FF"]),
    ([types.SimpleNamespace(address="AA:BB:CC:DD:EE:01", name="EMG-9")],
     ["ble:AA:BB:CC:DD:EE:01"]),
    ([types.SimpleNamespace(url="ble:EMG-7?adapter=hci0", name="EMG-7")],
     ["ble:EMG-7?adapter=hci0"]),
    ([], []),
    (None, []),
])
def test_ble_results_become_urls(bus, fake_ble, result, urls):
    calls = fake_ble(lambda timeout: result)
    assert [f.url for f in ble_bands(1.5)] == urls and calls == [1.5]


def test_an_async_find_bands_is_awaited(bus, fake_ble):
    async def find(timeout):
        return ["EMG-A"]

    fake_ble(find)
    assert [f.url for f in ble_bands(1.0)] == ["ble:EMG-A"]


@pytest.mark.parametrize("exc", [DeviceError("adapter off"), MissingDependency("pip install bleak"),
                                 TimeoutError("scan"), RuntimeError("bug in the BLE stack")])
def test_ble_errors_mean_no_ble_band(bus, fake_ble, exc, caplog):
    def fail(timeout):
        raise exc

    fake_ble(fail)
    assert ble_bands(1.0) == []


def test_a_hanging_ble_search_is_abandoned(bus, fake_ble, monkeypatch):
    monkeypatch.setattr(discovery, "BLE_GRACE_S", 0.05)
    release = threading.Event()
    fake_ble(lambda timeout: release.wait(30) and ["EMG-LATE"])
    try:
        assert ble_bands(0.05) == []
    finally:
        release.set()


def test_a_missing_ble_module_means_no_ble_band(bus, monkeypatch):
    monkeypatch.setitem(sys.modules, "emgd.drivers.ble", None)  # import raises ImportError
    assert ble_bands(0.1) == []


# --------------------------------------------------------------------------- auto


def test_nothing_found_falls_back_to_the_simulated_band(bus, fake_ble):
    calls = fake_ble(lambda timeout: [])
    res = resolve_auto("auto?timeout=0.25")
    assert (res.url, res.fallback, res.found) == ("sim", True, ())
    assert "no band found" in res.reason and "0.25 s" in res.reason
    assert calls == [0.25]


def test_preference_udev_link_then_virtual_then_ble(pty_path, bus, fake_ble):
    calls = fake_ble(lambda timeout: ["EMG-1"])
    assert resolve_auto().url == "ble:EMG-1" and calls == [2.0]
    entry = announce(pty_path, None, "SIM-0000", "int24")
    res = resolve_auto()
    assert (res.url, res.fallback) == (f"serial:{pty_path}", False)
    assert "virtual band SIM-0000" in res.reason and calls == [2.0]  # BLE not searched
    os.symlink(pty_path, serialport.UDEV_LINK)
    res = resolve_auto()
    assert res.url == f"serial:{serialport.UDEV_LINK}"
    assert [f.source for f in res.found] == ["udev-link", "virtual"]
    withdraw(entry)


def test_everything_lists_ble_too(pty_path, bus, fake_ble):
    fake_ble(lambda timeout: ["EMG-1"])
    announce(pty_path, None, "SIM-0000", "int24")
    assert [f.source for f in discovery.find_bands(everything=True)] == ["virtual", "ble"]
    assert [f.source for f in discovery.find_bands(ble=False, everything=True)] == ["virtual"]


def test_auto_url_options_are_checked():
    with pytest.raises(ConfigError) as err:
        resolve_auto("auto?scan=1")
    assert "unknown option 'scan'" in str(err.value) and SCHEMES["auto"].usage() in str(err.value)
    with pytest.raises(ConfigError, match="must be >= 0"):
        resolve_auto("auto?timeout=-1")
    with pytest.raises(ConfigError, match="needs an auto URL"):
        resolve_auto("sim")


def test_daemon_resolution_is_loud_on_fallback(caplog, pty_path):
    assert resolve_device_url("serial:/dev/ttyACM0") == "serial:/dev/ttyACM0"
    assert resolve_device_url("sim?seed=2") == "sim?seed=2"
    with caplog.at_level(logging.INFO, logger="emgd.daemon"):
        assert resolve_device_url("auto") == "sim"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "SIMULATED" in warning.getMessage() and "no band found" in warning.getMessage()
    caplog.clear()
    announce(pty_path, None, "SIM-0000", "int24")
    with caplog.at_level(logging.INFO, logger="emgd.daemon"):
        assert resolve_device_url("auto?timeout=0") == f"serial:{pty_path}"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
