"""A band over Bluetooth LE, with bleak.

URL grammar (options in :data:`emgd.drivers.urls.SCHEMES`)::

    ble[:NAME-OR-ADDRESS-OR-SERIAL][?adapter=hci0&timeout=10&reconnect=1&format=int24]

``ble`` takes the first band found; a target matches a band's advertised name, its address
or the serial number it advertises. GATT layout: :mod:`emgd.drivers.blegatt` and
``docs/protocol.md``.

The device runs its own asyncio loop in its own thread (bleak works in any thread's loop),
so it does not depend on who calls :meth:`Device.start`. ``_open()`` scans (with the
detection callback given to the ``BleakScanner`` constructor), connects and reads the
Device Information serial number, so ``info.device_id`` is the band's serial number — its
identity, not its address — before streaming starts. ``_start_io()`` subscribes to the EMG
characteristic and writes START. A notification is timestamped and handed to
``Device._on_bytes`` on the loop; nothing else happens there.

Link loss (bleak's disconnected callback): the link state becomes ``lost``, the daemon and
its sockets carry on, and the session reconnects with exponential backoff and full jitter
(:class:`Backoff`); a band that answers with another serial number is refused. On resume
the band's sample counter shows the gap, which the base class counts exactly (``gaps``,
``lost_samples``) and this driver logs once.

Test seam: ``BleDevice(url, client_backend=..., scanner_backend=...)`` passes bleak's
documented ``backend=`` arguments through (module defaults :data:`CLIENT_BACKEND` and
:data:`SCANNER_BACKEND`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from emgd.drivers import blegatt as gatt
from emgd.drivers.base import Device, DeviceInfo
from emgd.drivers.blescan import HINT, BandAd, find_bands, scan, unavailable
from emgd.drivers.blescan import bleak_module as _bleak
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.urls import DeviceUrl, parse_url

from emgd.errors import DeviceError, DeviceNotFound, EmgdError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0
COMMAND_TIMEOUT_S = 3.0
CLIENT_BACKEND: type | None = None  # bleak's platform backend
SCANNER_BACKEND: type | None = None
_T = TypeVar("_T")


def _retryable() -> tuple[type[BaseException], ...]:
    from bleak.exc import BleakError
    from dbus_fast.errors import DBusError

    return (BleakError, DBusError, EmgdError, TimeoutError, OSError, EOFError)


def _process_rng() -> random.Random:
    """Jitter exists to spread the retries of several daemons (and bands): seeded per
    process, reproducible for a given pid."""
    return random.Random(os.getpid())


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt k waits uniform(0, min(cap, base·2^k))
    but at least ``floor``. Attempts restart at 0 after each successful reconnection."""

    base: float = 0.5
    cap: float = 30.0
    floor: float = 0.1
    rng: random.Random = field(default_factory=_process_rng)

    def delay(self, attempt: int) -> float:
        return max(self.floor, self.rng.uniform(0.0, min(self.cap, self.base * 2.0**attempt)))


class BleDevice(Device):
    """A band over BLE (the ``ble`` URL scheme)."""

    transport = "ble"

    def __init__(self, url: DeviceUrl | str = "ble", *, client_backend: type | None = None,
                 scanner_backend: type | None = None, backoff: Backoff | None = None) -> None:
        parsed = parse_url(url) if isinstance(url, str) else url
        super().__init__(parsed, DeviceInfo(
            device_id="", name="BLE band", transport="ble", url=str(parsed), simulated=False,
            scale_uv=None, firmware=""))
        opts = parsed.options
        self.adapter = str(opts["adapter"])
        self.scan_timeout = float(opts["timeout"])  # type: ignore[arg-type]
        self.reconnect = bool(opts["reconnect"])
        self.fmt = SampleFormat.parse(str(opts["format"]))
        self.backoff = backoff or Backoff()
        self._client_backend = client_backend or CLIENT_BACKEND
        self._scanner_backend = scanner_backend or SCANNER_BACKEND
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._session: concurrent.futures.Future[None] | None = None
        self._client: Any = None
        self._ble_device: Any = None
        self._down: asyncio.Event | None = None
        self._resume: tuple[int, int, int] | None = None  # lost, emg frames, t_lost_ns
        self.address = ""
        self.mtu: int | None = None
        self.state: gatt.StreamState | None = None
        self.notifications = 0
        self.attempts = 0  # reconnection attempts, all outages together
        self.delays: list[float] = []  # backoff delays waited (the last 32)
        self.last_gap_samples: int | None = None

    # ------------------------------------------------------------------ loop plumbing
    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise DeviceNotFound(f"{self.url}: no answer within {timeout:.0f} s; {HINT}") from None

    def _open(self) -> None:
        _bleak()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever,
                                             name="device-ble", daemon=True)
        self._loop_thread.start()
        try:
            self._call(self._find_and_connect(first=True),
                       self.scan_timeout + CONNECT_TIMEOUT_S + 5.0)
        except EmgdError:
            self._close_io()
            raise
        except Exception as exc:
            self._close_io()
            raise DeviceError(f"{self.url}: could not connect to the band "
                              f"({type(exc).__name__}: {exc}); {HINT}") from exc
        except BaseException:
            self._close_io()
            raise

    def _start_io(self) -> None:
        assert self._loop is not None
        self._session = asyncio.run_coroutine_threadsafe(self._run_session(), self._loop)

    def _stop_io(self) -> None:
        session, loop = self._session, self._loop
        if session is None or loop is None:
            return
        loop.call_soon_threadsafe(session.cancel)
        try:
            session.result(COMMAND_TIMEOUT_S + 2.0)
        except (concurrent.futures.CancelledError, concurrent.futures.TimeoutError):
            pass
        except Exception:
            log.exception("%s: BLE session failed", self.url)
        self._session = None

    def _close_io(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        if self._client is not None:
            try:
                self._call(self._disconnect(), COMMAND_TIMEOUT_S + 2.0)
            except Exception as exc:  # noqa: BLE001 (closing: report, never raise)
                log.warning("%s: disconnect failed: %s", self.url, exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        if not thread.is_alive():
            loop.close()
        self._loop = self._loop_thread = None

    # ------------------------------------------------------------------ connection
    async def _find_and_connect(self, first: bool) -> None:
        target = self.url.target if first else None
        device = None if first else self._ble_device
        if device is not None:
            try:
                await self._connect(device)
                return
            except _retryable() as exc:
                log.info("%s: direct reconnect failed (%s); scanning", self.url, exc)
        if first:
            def want(ad: BandAd) -> bool:
                return ad.matches(target)
        else:  # the same band: its serial number, or its address if it advertises none
            def want(ad: BandAd) -> bool:
                return ad.serial == self.info.device_id or (
                    ad.serial is None and ad.address == self.address)
        try:
            seen = await scan(self.scan_timeout, self.adapter, want, self._scanner_backend)
        except EmgdError:
            raise
        except Exception as exc:
            if first:
                raise unavailable(exc, str(self.url)) from exc
            raise
        match = [dev for ad, dev in seen if want(ad)]
        if not match:
            what = f"band {target!r}" if target else "band"
            raise DeviceNotFound(
                f"{self.url}: no {what} found within {self.scan_timeout:g} s"
                f"{' on ' + self.adapter if self.adapter else ''}; {HINT}")
        await self._connect(match[0])

    async def _connect(self, device: Any) -> None:
        bleak = _bleak()
        kwargs: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_S, "backend": self._client_backend}
        if self.adapter:
            kwargs["bluez"] = {"adapter": self.adapter}
        down = asyncio.Event()
        client = bleak.BleakClient(device, disconnected_callback=lambda _c: down.set(), **kwargs)
        await client.connect()
        try:
            serial = (await client.read_gatt_char(gatt.SERIAL_NUMBER)).decode().strip()
            if self.info.device_id and serial != self.info.device_id:
                raise DeviceNotFound(f"{self.url}: {client.address} is band {serial!r}, "
                                     f"not {self.info.device_id!r}")
            firmware = (await client.read_gatt_char(gatt.FIRMWARE_REVISION)).decode().strip()
            self._battery = (await client.read_gatt_char(gatt.BATTERY_LEVEL))[0]
        except BaseException:
            await client.disconnect()
            raise
        self.mtu = await self._request_mtu(client)
        self._client, self._ble_device, self._down = client, device, down
        self.address = client.address
        self._update_info(device_id=serial, firmware=firmware,
                          name=getattr(device, "name", None) or f"BLE band {serial}")
        log.info("%s: connected to %s (%s), serial %s, MTU %s", self.url, self.info.name,
                 self.address, serial, self.mtu or "unknown")

    async def _request_mtu(self, client: Any) -> int | None:
        """The ATT MTU. The OS negotiates it (BlueZ, WinRT and CoreBluetooth ask the
        largest); on BlueZ bleak learns it only through ``_acquire_mtu`` (its documented
        workaround). None when it cannot be learnt: the band then clamps the frame size."""
        acquire = getattr(getattr(client, "_backend", None), "_acquire_mtu", None)
        if acquire is not None:
            errors: tuple[type[BaseException], ...] = (*_retryable(), AssertionError,
                                                       StopIteration)
            try:
                await acquire()
            except errors as exc:
                log.debug("%s: MTU not available (%s)", self.url, exc)
                return None
        with warnings.catch_warnings():  # bleak warns when it only knows the default
            warnings.simplefilter("ignore")
            mtu = int(client.mtu_size)
        return mtu if mtu > gatt.DEFAULT_MTU else None

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            await client.disconnect()

    # ------------------------------------------------------------------ streaming
    async def _run_session(self) -> None:
        try:
            while not self._stop_event.is_set():
                connected = self._client is not None and self._client.is_connected
                if not connected and not await self._reconnect():
                    return
                try:
                    await self._begin()
                except _retryable() as exc:
                    self._set_link("lost", error=exc)
                    await self._disconnect()
                    continue
                assert self._down is not None
                await self._down.wait()
                self._lost("the band disconnected")
                if not self.reconnect:
                    return
        except asyncio.CancelledError:
            await self._end()
            raise

    async def _begin(self) -> None:
        client = self._client
        await client.start_notify(gatt.EMG_CHAR, self._on_notify)
        frame = gatt.samples_per_notification(self.fmt, self.mtu or gatt.MAX_MTU)
        await client.write_gatt_char(gatt.CONTROL_CHAR, gatt.encode_start(self.fmt, frame),
                                     response=True)
        try:
            self.state = gatt.decode_state(await client.read_gatt_char(gatt.CONTROL_CHAR))
        except ValueError as exc:  # the stream itself is what counts
            log.warning("%s: unreadable control state: %s", self.url, exc)
            self.state = None
        self._set_link("up")
        if self._resume is not None:
            self._note_reconnect()

    async def _reconnect(self) -> bool:
        """Back off and reconnect until connected (True) or told to stop (False)."""
        attempt = 0
        while self.reconnect and not self._stop_event.is_set():
            delay = self.backoff.delay(attempt)
            attempt += 1
            self.attempts += 1
            self.delays = [*self.delays[-31:], delay]
            await asyncio.sleep(delay)
            try:
                await self._find_and_connect(first=False)
                return True
            except _retryable() as exc:
                self._set_link("lost", error=exc)
                log.info("%s: reconnect attempt %d failed: %s", self.url, attempt, exc)
        return False

    def _lost(self, why: str) -> None:
        with self._lock:
            self._decoder.discard_buffer()
            s = self._decoder.stats
            self._resume = (s.lost_samples, s.emg_frames, time.monotonic_ns())
        self._client = None
        self._set_link("lost", error=why)

    async def _end(self) -> None:
        """Stop streaming (on stop/close): STOP and unsubscribe, best effort."""
        client = self._client
        if client is None or not client.is_connected:
            return
        errors: tuple[type[BaseException], ...] = (*_retryable(), asyncio.CancelledError)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                await client.write_gatt_char(gatt.CONTROL_CHAR, gatt.encode_stop(), response=True)
                await client.stop_notify(gatt.EMG_CHAR)
        except errors as exc:
            log.info("%s: stopping the stream: %s", self.url, exc)

    def _on_notify(self, _char: Any, data: bytearray) -> None:
        t = time.monotonic_ns()
        self.notifications += 1
        self._on_bytes(data, t)
        if self._resume is not None:
            self._report_resume(t)

    def _report_resume(self, t: int) -> None:
        lost0, emg0, t_lost = self._resume  # type: ignore[misc]
        s = self._decoder.stats
        if s.emg_frames > emg0:
            self._resume = None
            self.last_gap_samples = s.lost_samples - lost0
            log.warning("%s: stream resumed after %.1f s; gap of %d samples", self.url,
                        (t - t_lost) / 1e9, self.last_gap_samples)


__all__ = ["Backoff", "BandAd", "BleDevice", "find_bands", "scan"]
