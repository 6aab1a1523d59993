"""A band on a serial port or USB CDC-ACM dongle (pyserial, one reader thread).

URL grammar (options in :data:`emgd.drivers.urls.SCHEMES`)::

    serial:PORT[?baud=N&reconnect=BOOL&timeout=S]

    PORT       a device path: /dev/ttyACM0, /dev/emg-band (the udev link), /dev/pts/N
               or the --link of `emgd sim --pty`
    baud       baud rate (default 2000000; int24 at 2 kHz needs >= 2 Mbaud, CDC-ACM ignores it)
    reconnect  after the port fails (unplugged), reopen it with backoff (default 1)
    timeout    seconds to wait at start for the band's first good frame; 0 = do not wait

Reading: the thread blocks in ``read(1)`` (woken at once by the first byte, or every
``READ_TIMEOUT_S`` to see a stop request), stamps ``time.monotonic_ns()``, then takes
whatever else is already waiting (``in_waiting``), so a frame is handed on as soon as
its bytes arrive: no fixed-size read ever holds samples back.

Unplug: a read that fails (pyserial raises on EOF/EIO when the device node vanishes or a
pty's master closes) marks the link ``lost``; the thread then reopens the same path with
exponential backoff and seeded jitter (``BACKOFF_FIRST_S`` doubling to ``BACKOFF_MAX_S``)
until it is back, drops the partial frame held from before, counts a reconnect and marks
the link ``up``. The band's sample counter jumps across the outage, so the decoder counts
the gap (``gaps``, ``lost_samples``) and the pipeline resets its stages there.

Open errors are typed (:mod:`emgd.errors`) and say what to do: a missing port is
:class:`DeviceNotFound`, permission denied :class:`DevicePermission` (naming the group
that owns the device node), a port locked by another process :class:`DeviceBusy` (the port
is opened with an exclusive lock; the holder's pid is named when /proc shows it), and a
port that stays silent for ``timeout`` seconds :class:`DeviceTimeout`.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import random
import stat
import time
import zlib
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import serial
from emgd.drivers.base import Device
from emgd.drivers.urls import SCHEMES, DeviceUrl, parse_url
from serial.tools import list_ports

from emgd.errors import (
    DeviceBusy,
    DeviceError,
    DeviceNotFound,
    DevicePermission,
    DeviceTimeout,
)

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.1  # a blocked read wakes this often to look for a stop request
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 5.0
JITTER = 0.25  # each backoff delay is scaled by a factor in [1 - JITTER, 1 + JITTER]

#: The udev rule (systemd/90-emgd.rules) links the band's port here.
UDEV_LINK = "/dev/emg-band"

#: USB (vendor, product) IDs of bands, as in systemd/90-emgd.rules. 1209:0001 is a
#: PLACEHOLDER (pid.codes' test ID): replace it with your band's IDs in both places.
KNOWN_USB_IDS: Mapping[tuple[int, int], str] = {
    (0x1209, 0x0001): "emgd band, USB CDC-ACM (placeholder pid.codes test ID)",
}

SIM_FIRMWARE_PREFIX = "emgd-sim"


class PortInfo(NamedTuple):
    device: str
    vid: int | None
    pid: int | None
    description: str


# --------------------------------------------------------------------------- opening


def open_port(path: str, baud: int) -> serial.Serial:
    """Open ``path`` for exclusive reading; errors become typed :class:`DeviceError`."""
    try:
        return serial.Serial(path, baud, timeout=READ_TIMEOUT_S, exclusive=True)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise open_error(path, exc) from exc


def open_error(path: str, exc: BaseException) -> DeviceError:
    """The typed error, with advice, for a failed open of ``path``."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOENT, errno.ENXIO, errno.ENODEV) or (
            code is None and not os.path.exists(path)):
        return DeviceNotFound(_not_found_message(path))
    if code in (errno.EACCES, errno.EPERM):
        return DevicePermission(_permission_message(path))
    if code in (errno.EAGAIN, errno.EBUSY) or "exclusively lock" in str(exc):
        return DeviceBusy(_busy_message(path))
    if code == errno.ENOTTY or "Inappropriate ioctl" in str(exc):
        return DeviceError(f"{path} is not a serial port (the OS cannot configure it as a "
                           "terminal); pass the band's tty, e.g. serial:/dev/ttyACM0")
    return DeviceError(f"could not open serial port {path}: {exc}")


def _not_found_message(path: str) -> str:
    present = [p.device for p in list_ports.comports()]
    where = f"serial ports here: {', '.join(sorted(present))}" if present else \
        "no serial ports are present"
    dangling = " (a link to a port that is gone)" if os.path.islink(path) else ""
    return (f"no such port {path}{dangling}; is the band plugged in? ({where}). "
            "`emgd sim --pty` makes a virtual band to try emgd without one.")


def _permission_message(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"permission denied opening {path}"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    mode = stat.S_IMODE(st.st_mode)
    where = f"{path} is {owner}:{group}, mode {mode:04o}"
    if st.st_gid != 0 and mode & 0o060 == 0o060:
        return (f"permission denied opening {where}; join the {group!r} group: "
                f"sudo usermod -aG {group} $USER, then log out and in again "
                "(a service: SupplementaryGroups=" + group + ")")
    return (f"permission denied opening {where}, and its group has no read/write access; "
            "install systemd/90-emgd.rules (it gives the band's port to the 'dialout' group, "
            "mode 0660), then join that group: sudo usermod -aG dialout $USER and log in again")


def _busy_message(path: str) -> str:
    holders = port_holders(path)
    if holders:
        who = ", ".join(f"pid {pid} ({name})" + (" — this process" if pid == os.getpid()
                                                 else "") for pid, name in holders)
        return (f"{path} is in use by {who}; stop that program (or emgd instance) first, "
                "or point this one at another band")
    return (f"{path} is in use by another process; stop it first (`fuser {path}` "
            "shows which), or point emgd at another band")


def port_holders(path: str) -> list[tuple[int, str]]:
    """Processes with ``path`` open, from /proc (only those this user may inspect)."""
    try:
        target = os.path.realpath(path)
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    found.append((pid, _process_name(pid)))
                    break
            except OSError:
                continue
    return found


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        return " ".join(a.decode(errors="replace") for a in args if a)[:120] or "?"
    except OSError:
        return "?"


# --------------------------------------------------------------------------- finding


def find_band_ports(known: Mapping[tuple[int, int], str] = KNOWN_USB_IDS,
                    ports: Iterable[object] | None = None) -> list[PortInfo]:
    """Serial ports whose USB vendor/product IDs are in ``known`` (from pyserial's
    ``list_ports.comports()`` unless ``ports`` is given)."""
    found = []
    for p in list_ports.comports() if ports is None else ports:
        vid, pid = getattr(p, "vid", None), getattr(p, "pid", None)
        if vid is not None and pid is not None and (vid, pid) in known:
            found.append(PortInfo(str(getattr(p, "device", "")), vid, pid, known[(vid, pid)]))
    return sorted(found)


# --------------------------------------------------------------------------- the device


class SerialDevice(Device):
    """The ``serial:PORT`` backend."""

    transport = "serial"

    def __init__(self, url: DeviceUrl | str) -> None:
        parsed = parse_url(url) if isinstance(url, str) else url
        if parsed.scheme != "serial":
            raise DeviceError(f"SerialDevice needs a serial: URL, not {str(parsed)!r}\n"
                              f"usage: {SCHEMES['serial'].grammar()}")
        super().__init__(parsed)
        self.port = str(parsed.target)
        self.baud = int(parsed.options["baud"])  # type: ignore[arg-type]
        self.reconnect = bool(parsed.options["reconnect"])
        self.first_frame_timeout = float(parsed.options["timeout"])  # type: ignore[arg-type]
        self._ser: serial.Serial | None = None
        self._rng = random.Random(zlib.crc32(self.port.encode()))
        self._sim_noted = False
        self._resumed: tuple[int, int, int] | None = None  # (lost, emg frames, t_lost) at reopen

    # ------------------------------------------------------------------ hooks
    def _open(self) -> None:
        self._ser = open_port(self.port, self.baud)
        if self.first_frame_timeout > 0:
            try:
                self._await_first_frame(self.first_frame_timeout)
            except BaseException:
                self._close_port()
                raise

    def _run(self) -> None:
        self._set_link("up")
        while not self._stop_event.is_set():
            try:
                self._read_loop()
            except (serial.SerialException, OSError) as exc:
                if self._stop_event.is_set():
                    break
                t_lost = time.monotonic_ns()
                self._close_port()
                self._set_link("lost", error=exc)
                if not self.reconnect or not self._reopen(t_lost):
                    return

    def _interrupt(self) -> None:
        ser = self._ser
        if ser is not None:
            try:
                ser.cancel_read()
            except (OSError, serial.SerialException):
                pass

    def _close_io(self) -> None:
        self._close_port()

    # ------------------------------------------------------------------ reading
    def _read_chunk(self, ser: serial.Serial) -> tuple[bytes, int]:
        """Block until bytes arrive (or READ_TIMEOUT_S); return them with their arrival
        time. A failed port raises (SerialException or OSError)."""
        first = ser.read(1)
        if not first:
            return b"", 0
        t_recv = time.monotonic_ns()
        waiting = ser.in_waiting
        return (first + ser.read(waiting) if waiting else first), t_recv

    def _read_loop(self) -> None:
        ser = self._ser
        if ser is None:
            raise serial.SerialException("port is not open")
        while not self._stop_event.is_set():
            chunk, t_recv = self._read_chunk(ser)
            if not chunk:
                continue
            self._on_bytes(chunk, t_recv)
            if self._resumed is not None or not self._sim_noted:
                self._after_bytes()

    def _await_first_frame(self, timeout: float) -> None:
        ser = self._ser
        assert ser is not None
        deadline = time.monotonic() + timeout
        while self.decoder_stats().frames == 0:
            if time.monotonic() >= deadline:
                st = self.decoder_stats()
                raise DeviceTimeout(
                    f"no band answered on {self.port} within {timeout:g} s "
                    f"({st.bytes_in} bytes received, no valid emgd frame): is this the "
                    "band's port, is the band switched on and streaming, and is the baud "
                    f"rate right (baud={self.baud})? Raise serial:...?timeout=S to wait longer.")
            try:
                chunk, t_recv = self._read_chunk(ser)
            except (serial.SerialException, OSError) as exc:
                raise DeviceError(f"{self.port} failed while waiting for the band: {exc}") from exc
            if chunk:
                self._on_bytes(chunk, t_recv)

    def _after_bytes(self) -> None:
        """Rare checks after a read: the gap across a reconnect; a simulated band."""
        if self._resumed is not None:
            st = self.decoder_stats()
            lost_before, emg_before, t_lost = self._resumed
            if st.emg_frames > emg_before:
                self._resumed = None
                log.warning("%s: band back after %.2f s; %d samples lost across the gap",
                            self.port, (time.monotonic_ns() - t_lost) / 1e9,
                            st.lost_samples - lost_before)
        if not self._sim_noted and self.info.firmware:
            self._sim_noted = True
            if self.info.firmware.startswith(SIM_FIRMWARE_PREFIX):
                log.warning("%s: the band reports firmware %r: it is emgd's virtual band "
                            "(emgd sim --pty), not a wearer", self.port, self.info.firmware)

    # ------------------------------------------------------------------ reconnecting
    def _reopen(self, t_lost: int) -> bool:
        """Reopen the port with backoff until it is back (True) or stop is requested."""
        delay = BACKOFF_FIRST_S
        last_kind: type | None = None
        while True:
            wait = delay * (1.0 + JITTER * (2.0 * self._rng.random() - 1.0))
            if self._stop_event.wait(wait):
                return False
            try:
                ser = open_port(self.port, self.baud)
            except DeviceError as exc:
                if type(exc) is not last_kind:
                    last_kind = type(exc)
                    log.warning("%s: reconnecting (retrying every <= %.0f s): %s",
                                self.port, BACKOFF_MAX_S, exc)
                self._last_error = f"{type(exc).__name__}: {exc}"
                delay = min(delay * 2.0, BACKOFF_MAX_S)
                continue
            with self._lock:
                self._decoder.discard_buffer()  # a partial frame from before the outage
                lost, emg = self._decoder.stats.lost_samples, self._decoder.stats.emg_frames
            self._ser = ser
            self._resumed = (lost, emg, t_lost)
            self._note_reconnect()
            self._set_link("up")
            return True

    def _close_port(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except (OSError, serial.SerialException):
                pass
