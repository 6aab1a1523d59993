"""Finding bands over BLE: the scan, its result type, and errors for a missing BLE stack.

:func:`find_bands` is what ``emgd scan`` and ``--device auto`` call (re-exported by
:mod:`emgd.drivers.ble`); :func:`scan` is the coroutine the driver uses. A scan passes its
detection callback to the ``BleakScanner`` constructor (BlueZ may report a band's single
advertisement before a later-registered callback would see it) and keeps only
advertisements that look like a band (:func:`emgd.drivers.blegatt.is_band`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from emgd.drivers import blegatt as gatt

from emgd.errors import DeviceError, DevicePermission, EmgdError, MissingDependency

_T = TypeVar("_T")
HINT = ("run 'emgd scan' to list bands in range; without a band, start the simulated one "
        "with 'python -m emgd.drivers.blesim --start-bus' (README: 'Try BLE without a band')")


def bleak_module() -> Any:
    """bleak, or MissingDependency saying what to install."""
    try:
        import bleak
    except ImportError as exc:
        raise MissingDependency("BLE needs the Python package 'bleak': pip install bleak") from exc
    return bleak


def unavailable(exc: BaseException, what: str) -> DeviceError:
    """A typed error for a BLE stack that does not answer (chosen by the D-Bus error name,
    an attribute of the exception, not by its message)."""
    name = str(getattr(exc, "dbus_error", "") or getattr(exc, "type", ""))
    if isinstance(exc, PermissionError) or name.endswith(("AccessDenied", "NotPermitted")):
        return DevicePermission(
            f"{what}: Bluetooth access denied ({exc}); on Debian/Ubuntu add your user to the "
            "'bluetooth' group (sudo usermod -aG bluetooth $USER, then log in again)")
    return DeviceError(
        f"{what}: Bluetooth is not available ({type(exc).__name__}: {exc}); check that "
        "bluetoothd runs, the adapter is powered ('bluetoothctl power on') and not blocked "
        "('rfkill unblock bluetooth')")


@dataclass(frozen=True, slots=True)
class BandAd:
    """A band seen in a scan. ``serial`` is what the advertisement says (None if nothing);
    the Device Information serial number read after connecting is authoritative."""

    name: str
    address: str
    rssi: int | None
    serial: str | None
    adapter: str = ""

    @property
    def url(self) -> str:
        query = f"?adapter={self.adapter}" if self.adapter else ""
        return f"ble:{self.serial or self.address}{query}"

    def matches(self, target: str | None) -> bool:
        """Whether ``target`` (None = any band) is this band's name, address or serial."""
        if target is None:
            return True
        t = target.casefold()
        return t in (self.name.casefold(), self.address.casefold(),
                     (self.serial or "").casefold())


async def scan(timeout: float, adapter: str = "",
               want: Callable[[BandAd], bool] | None = None,
               backend: type | None = None) -> list[tuple[BandAd, Any]]:
    """(ad, BLEDevice) of the bands seen within ``timeout`` s, strongest first. With
    ``want``, returns as soon as a band satisfies it."""
    bleak = bleak_module()
    found: dict[str, tuple[BandAd, Any]] = {}
    hit = asyncio.Event()

    def on_adv(device: Any, adv: Any) -> None:
        name = adv.local_name or device.name or ""
        if not gatt.is_band(list(adv.service_uuids), name):
            return
        ad = BandAd(name, device.address, adv.rssi,
                    gatt.serial_from_adv(dict(adv.service_data), name), adapter)
        found[device.address] = (ad, device)
        if want is not None and want(ad):
            hit.set()

    kwargs: dict[str, Any] = {"backend": backend}
    if adapter:
        kwargs["bluez"] = {"adapter": adapter}
    async with bleak.BleakScanner(on_adv, **kwargs):
        try:
            await asyncio.wait_for(hit.wait(), timeout)
        except TimeoutError:
            pass
    return sorted(found.values(), key=lambda f: -(f[0].rssi if f[0].rssi is not None else -999))


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion, in a worker thread if this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def find_bands(timeout: float = 5.0, adapter: str | None = None,
               backend: type | None = None) -> list[BandAd]:
    """Bands in range after scanning ``timeout`` s, strongest first. Raises
    MissingDependency without bleak, DeviceError/DevicePermission when BLE is unavailable."""
    bleak_module()
    try:
        return [ad for ad, _ in run_sync(scan(timeout, adapter or "", backend=backend))]
    except EmgdError:
        raise
    except Exception as exc:
        raise unavailable(exc, "BLE scan") from exc
