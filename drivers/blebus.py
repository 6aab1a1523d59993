"""A private Bluetooth stack for machines without Bluetooth: a D-Bus system bus + BlueZoo.

BlueZoo (PyPI ``bluezoo``) implements BlueZ's ``org.bluez`` D-Bus API without a kernel or
radio. :class:`PrivateBluez` starts a private ``dbus-daemon`` (configured as a *system*
bus, listening on a socket in a temporary folder) and ``bluezoo`` on it with two powered
adapters: ``hci0`` for emgd and ``hci1`` for the simulated band
(:mod:`emgd.drivers.blesim`). Programs reach it through ``DBUS_SYSTEM_BUS_ADDRESS``, the
variable that bleak and dbus-fast read for the system bus; nothing else on the machine is
touched::

    with PrivateBluez() as bus:
        env = {"DBUS_SYSTEM_BUS_ADDRESS": bus.address}

Nothing here imports bleak or dbus-fast: the processes are started with ``subprocess`` and
readiness is checked with ``busctl``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

from emgd.errors import DeviceError, MissingDependency

log = logging.getLogger(__name__)

HOST_ADDRESS = "00:11:22:33:44:01"  # hci0: emgd's adapter
BAND_ADDRESS = "00:11:22:33:44:02"  # hci1: the simulated band's adapter
START_TIMEOUT_S = 15.0

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


def missing_tools() -> list[str]:
    """The programs PrivateBluez needs that are not installed (empty when all are)."""
    out = [tool for tool in ("dbus-daemon", "busctl") if shutil.which(tool) is None]
    if _bluezoo_command() is None:
        out.append("bluezoo (pip install bluezoo)")
    return out


def _bluezoo_command() -> list[str] | None:
    exe = shutil.which("bluezoo")
    if exe is not None:
        return [exe]
    try:
        import importlib.util

        if importlib.util.find_spec("bluezoo") is not None:
            return [sys.executable, "-c",
                    "import sys; from bluezoo.bluezoo import main; sys.exit(main())"]
    except (ImportError, ValueError):
        pass
    return None


class PrivateBluez:
    """A private system bus with BlueZoo on it; a context manager. ``address`` is the bus
    address to put in ``DBUS_SYSTEM_BUS_ADDRESS``."""

    def __init__(self, adapters: tuple[str, ...] = (HOST_ADDRESS, BAND_ADDRESS),
                 scan_interval_s: int = 1) -> None:
        self.adapters = adapters
        self.scan_interval_s = scan_interval_s
        self.address = ""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        """``os.environ`` with ``DBUS_SYSTEM_BUS_ADDRESS`` pointing at this bus."""
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def start(self) -> Self:
        missing = missing_tools()
        if missing:
            raise MissingDependency("the private Bluetooth stack needs: " + ", ".join(missing))
        self._tmp = tempfile.TemporaryDirectory(prefix="emgd-bluez-")
        folder = Path(self._tmp.name)
        conf = folder / "bus.conf"
        conf.write_text(_BUS_CONFIG.format(socket=folder / "system_bus_socket"))
        try:
            self._start_bus(conf)
            self._start_bluezoo(folder)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_bus(self, conf: Path) -> None:
        proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise DeviceError(f"dbus-daemon did not start: {err.strip()}")
        self.address = line

    def _start_bluezoo(self, folder: Path) -> None:
        cmd = [*(_bluezoo_command() or []), "--auto-enable",
               f"--scan-interval={self.scan_interval_s}"]
        for addr in self.adapters:
            cmd += ["-a", addr]
        log_path = folder / "bluezoo.log"
        with open(log_path, "wb") as logf:
            self._procs.append(subprocess.Popen(cmd, env=self.env(), stdout=logf,
                                                stderr=subprocess.STDOUT))
        deadline = time.monotonic() + START_TIMEOUT_S
        last = f"/org/bluez/hci{len(self.adapters) - 1}"
        while time.monotonic() < deadline:
            if self._procs[-1].poll() is not None:
                raise DeviceError(f"bluezoo exited: {log_path.read_text()[-2000:]}")
            if self._adapter_powered(last):
                return
            time.sleep(0.1)
        raise DeviceError(f"bluezoo did not come up within {START_TIMEOUT_S:g} s")

    def _adapter_powered(self, path: str) -> bool:
        res = subprocess.run(
            ["busctl", f"--address={self.address}", "get-property", "org.bluez", path,
             "org.bluez.Adapter1", "Powered"], capture_output=True, text=True, check=False)
        return res.returncode == 0 and res.stdout.strip() == "b true"

    def busctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``busctl --address=<this bus> ARGS`` (for tests: forced disconnects)."""
        return subprocess.run(["busctl", f"--address={self.address}", *args],
                              capture_output=True, text=True, timeout=10, check=False)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
