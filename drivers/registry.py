"""The table of device backends, imported lazily (python-can's ``BACKENDS`` habit).

``open_device(url)`` parses the URL (:mod:`emgd.drivers.urls`), imports only the backend
that its scheme names, and constructs the device; nothing is opened until
``device.start(sink)``. So bleak is never imported for a serial run, and a backend whose
optional dependency is missing fails with :class:`emgd.errors.MissingDependency` saying
what to install, not with a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

from emgd.drivers.urls import DeviceUrl, parse_url
from emgd.errors import ConfigError, MissingDependency

if TYPE_CHECKING:
    from emgd.drivers.base import Device


class Backend(NamedTuple):
    module: str
    cls: str
    # third-party modules the backend needs, mapped to the pip requirement that provides them
    requires: dict[str, str]


BACKENDS: dict[str, Backend] = {
    "sim": Backend("emgd.drivers.sim", "SimDevice", {}),
    "serial": Backend("emgd.drivers.serialport", "SerialDevice", {"serial": "pyserial"}),
    "ble": Backend("emgd.drivers.ble", "BleDevice", {"bleak": "bleak"}),
    "replay": Backend("emgd.drivers.replay", "ReplayDevice", {"h5py": "h5py"}),
}


def schemes() -> tuple[str, ...]:
    """The schemes ``open_device`` accepts (``auto`` is resolved by the daemon first)."""
    return tuple(BACKENDS)


def device_class(scheme: str) -> type[Device]:
    """Import the backend of ``scheme`` and return its class."""
    backend = BACKENDS.get(scheme)
    if backend is None:
        if scheme == "auto":
            raise ConfigError(
                "device 'auto' must be resolved to a concrete URL before opening "
                f"(one of: {', '.join(BACKENDS)})"
            )
        raise ConfigError(f"unknown device scheme {scheme!r}; known schemes: {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(backend.module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in backend.requires:
            raise MissingDependency(
                f"the {scheme!r} device needs the Python package {backend.requires[missing]!r}, "
                f"which is not installed: pip install {backend.requires[missing]}"
            ) from exc
        if exc.name and backend.module.startswith(exc.name):
            raise MissingDependency(
                f"the {scheme!r} device backend ({backend.module}) is not part of this "
                "installation of emgd; reinstall emgd or use another device "
                f"({', '.join(s for s in BACKENDS if s != scheme)})"
            ) from exc
        raise MissingDependency(
            f"the {scheme!r} device backend could not be imported: {exc}"
        ) from exc
    try:
        return getattr(module, backend.cls)
    except AttributeError as exc:
        raise MissingDependency(
            f"the {scheme!r} device backend {backend.module} has no class {backend.cls}; "
            "this installation of emgd is incomplete"
        ) from exc


def open_device(url: str | DeviceUrl) -> Device:
    """A device for ``url`` (parsed and validated), not yet started."""
    parsed = url if isinstance(url, DeviceUrl) else parse_url(url)
    return device_class(parsed.scheme)(parsed)

