"""Finding a band for ``--device auto``, and the registry of virtual (pty) bands.

``resolve_auto("auto?timeout=S")`` looks, in this order, and takes the first band found:

1. the udev link ``/dev/emg-band`` (systemd/90-emgd.rules makes it for a plugged-in band);
2. serial ports whose USB vendor/product IDs are in
   :data:`emgd.drivers.serialport.KNOWN_USB_IDS` (the IDs of the udev rule);
3. virtual bands announced by ``emgd sim --pty`` on this machine (newest first): someone
   started one on purpose, so it wins over a scan of the air;
4. a band over BLE, through ``emgd.drivers.ble.find_bands(timeout)``, only when that
   module imports and a D-Bus system bus answers; bounded by ``timeout`` (default 2 s)
   plus one second, whatever the BLE stack does;
5. none: the simulated band (``sim``), with ``fallback=True`` and the reason.

Virtual band registry: a running ``emgd sim --pty`` writes one JSON file per band into
:func:`bands_dir` and removes it when it exits::

    <bands_dir>/<serial>.<pid>.json
    {"v": 1, "path": "/dev/pts/3", "link": "/tmp/band" or null, "pid": 1234,
     "serial": "SIM-0000", "format": "int24", "url": "serial:/tmp/band"}

``bands_dir()`` is ``$XDG_RUNTIME_DIR/emgd/bands`` (``/run/user/<uid>/...`` in a desktop
session), else ``/tmp/emgd-<uid>/bands``; it is created mode 0700, and a folder owned by
another user is ignored. (Not an ``EMGD_*`` variable: those are daemon settings.)
An entry is used only if its pid is alive and its pty path is still a character device;
stale entries (a band killed with SIGKILL) are ignored and, when they are ours, removed.
The registry is per user: a daemon running as another user (a system service) does not
see a user's virtual bands.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import re
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from emgd.drivers.urls import DeviceUrl, parse_url

from emgd.errors import ConfigError, EmgdError

log = logging.getLogger(__name__)

ANNOUNCE_VERSION = 1
BLE_GRACE_S = 1.0  # the BLE search is abandoned this long after its own timeout
DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"


@dataclass(frozen=True, slots=True)
class Found:
    """A band that ``auto`` could use."""

    url: str  # what to open, e.g. "serial:/dev/emg-band"
    source: str  # "udev-link", "usb-id", "virtual" or "ble"
    description: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """What ``auto`` resolved to."""

    url: str
    fallback: bool  # True: no band found, running on the simulated band
    reason: str
    found: tuple[Found, ...] = ()


# --------------------------------------------------------------------------- registry


def bands_dir() -> Path:
    """Where virtual bands are announced (see the module docstring)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "emgd" / "bands"
    return Path(f"/tmp/emgd-{os.getuid()}") / "bands"


def _safe_dir(path: Path, create: bool) -> bool:
    """Whether ``path`` and the folder above it (``emgd`` or ``emgd-<uid>``) are ours:
    folders, owned by this user, writable by nobody else."""
    if create:
        os.makedirs(path.parent.parent, mode=0o700, exist_ok=True)  # $XDG_RUNTIME_DIR, /tmp
    for folder in (path.parent, path):
        if create:
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                pass
        try:
            st = os.lstat(folder)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return False
    return True


def _entry_name(serial: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", serial or "band") + f".{os.getpid()}.json"


def announce(path: str, link: str | None, serial: str, fmt: str) -> Path | None:
    """Write this process's announcement of a virtual band; its path, or None when the
    registry folder is unusable (the band still works, ``auto`` just cannot see it)."""
    folder = bands_dir()
    try:
        if not _safe_dir(folder, create=True):
            log.warning("not announcing the virtual band: %s is not a folder owned by you",
                        folder)
            return None
        entry = folder / _entry_name(serial)
        record = {"v": ANNOUNCE_VERSION, "path": path, "link": link, "pid": os.getpid(),
                  "serial": serial, "format": fmt, "url": f"serial:{link or path}"}
        tmp = entry.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, entry)  # readers never see half a file
        return entry
    except OSError as exc:
        log.warning("not announcing the virtual band in %s: %s", folder, exc)
        return None


def withdraw(entry: Path | None) -> None:
    """Remove an announcement (idempotent)."""
    if entry is not None:
        try:
            entry.unlink()
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def announced_bands(folder: Path | None = None) -> list[Found]:
    """Live virtual bands, newest announcement first; stale entries are skipped."""
    folder = bands_dir() if folder is None else folder
    if not _safe_dir(folder, create=False):
        return []
    entries = []
    for entry in folder.glob("*.json"):
        try:
            record = json.loads(entry.read_text())
            pid, path = int(record["pid"]), str(record["path"])
            link = record.get("link")
            mtime = entry.stat().st_mtime_ns
        except (OSError, ValueError, KeyError, TypeError):
            log.debug("ignoring unreadable band announcement %s", entry)
            continue
        if not _pid_alive(pid) or not _is_char_device(path):
            log.debug("ignoring stale band announcement %s (pid %d, %s)", entry, pid, path)
            _remove_stale(entry)
            continue
        use = link if link and os.path.realpath(link) == os.path.realpath(path) else path
        entries.append((mtime, Found(f"serial:{use}", "virtual",
                                     f"virtual band {record.get('serial', '?')} "
                                     f"(emgd sim --pty, pid {pid}) on {use}")))
    entries.sort(key=lambda e: e[0], reverse=True)
    return [f for _, f in entries]


def _remove_stale(entry: Path) -> None:
    try:
        if entry.stat().st_uid == os.getuid():
            entry.unlink()
    except OSError:
        pass


# --------------------------------------------------------------------------- serial


def serial_bands(udev_link: str | None = None) -> list[Found]:
    """The udev link, then ports with known USB IDs (pyserial is imported here only)."""
    from emgd.drivers import serialport

    link = serialport.UDEV_LINK if udev_link is None else udev_link
    found = []
    if _is_char_device(link):
        found.append(Found(f"serial:{link}", "udev-link", f"udev link {link}"))
    real = {os.path.realpath(f.url[len("serial:"):]) for f in found}
    for port in serialport.find_band_ports():
        if os.path.realpath(port.device) not in real:
            found.append(Found(f"serial:{port.device}", "usb-id",
                               f"{port.description} ({port.vid:04x}:{port.pid:04x}) "
                               f"on {port.device}"))
    return found


# --------------------------------------------------------------------------- BLE


def system_bus_reachable() -> bool:
    """Whether a D-Bus system bus answers on one of its unix socket addresses."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS
    for part in address.split(";"):
        transport, _, params = part.partition(":")
        keys = dict(kv.partition("=")[::2] for kv in params.split(",") if kv)
        if transport != "unix":
            return True  # a transport we do not probe: let the BLE stack decide
        target = keys.get("path") or ("\0" + keys["abstract"] if "abstract" in keys else None)
        if target is None:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(target)
                return True
            except OSError:
                continue
    return False


def _as_found(item: object) -> Found:
    url = getattr(item, "url", None)
    if url is None:
        text = str(getattr(item, "address", None) or getattr(item, "name", None) or item)
        url = text if text.startswith("ble") else f"ble:{text}"
    return Found(str(url), "ble", f"BLE band {getattr(item, 'name', None) or url}")


def ble_bands(timeout: float) -> list[Found]:
    """Bands over BLE within ``timeout`` s (+ BLE_GRACE_S); [] when BLE is unavailable."""
    if not system_bus_reachable():
        log.info("device auto: no D-Bus system bus, not looking for BLE bands")
        return []
    try:
        module = importlib.import_module("emgd.drivers.ble")
        find = module.find_bands
    except (ImportError, AttributeError) as exc:
        log.info("device auto: BLE search unavailable (%s)", exc)
        return []
    result: list[Found] = []

    def search() -> None:
        try:
            items = find(timeout)
            if inspect.isawaitable(items):
                items = asyncio.run(asyncio.wait_for(items, timeout + BLE_GRACE_S))
            result.extend(_as_found(i) for i in items or ())
        except (EmgdError, OSError, TimeoutError) as exc:
            log.info("device auto: no BLE band (%s: %s)", type(exc).__name__, exc)
        except Exception:  # a bug in the BLE stack must not stop the fallback
            log.exception("device auto: the BLE search failed")

    worker = threading.Thread(target=search, name="auto-ble", daemon=True)
    worker.start()
    worker.join(timeout + BLE_GRACE_S)
    if worker.is_alive():
        log.warning("device auto: the BLE search did not finish within %.1f s; ignoring it",
                    timeout + BLE_GRACE_S)
        return []
    return list(result)


# --------------------------------------------------------------------------- auto


def find_bands(timeout: float = 2.0, *, ble: bool = True, everything: bool = False,
               udev_link: str | None = None) -> list[Found]:
    """Bands in preference order. BLE is searched only when nothing else was found,
    unless ``everything``; never with ``ble=False``."""
    found = serial_bands(udev_link) + announced_bands()
    if ble and (everything or not found):
        found += ble_bands(timeout)
    return found


def resolve_auto(url: str | DeviceUrl = "auto", *, udev_link: str | None = None) -> Resolution:
    """The concrete device URL for an ``auto`` URL (see the module docstring)."""
    parsed = parse_url(url) if isinstance(url, str) else url
    if parsed.scheme != "auto":
        raise ConfigError(f"resolve_auto needs an auto URL, not {str(parsed)!r}")
    timeout = float(parsed.options["timeout"])  # type: ignore[arg-type]
    found = find_bands(timeout, udev_link=udev_link)
    if found:
        best = found[0]
        return Resolution(best.url, False, f"found {best.description}", tuple(found))
    return Resolution("sim", True,
                      f"no band found (udev link, known USB IDs, virtual bands, BLE within "
                      f"{timeout:g} s)")
