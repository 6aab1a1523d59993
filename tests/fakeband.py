"""A band played through bleak's documented backend seams, with injected faults.

``BleakClient(address, backend=FakeBandClient)`` and ``BleakScanner(cb, backend=FakeScanner)``
are bleak's own extension points; ``emgd.drivers.ble`` passes them through
(``BleDevice(client_backend=..., scanner_backend=...)``). Behind them, a :class:`FakeBand`
speaks the GATT layout of ``emgd.drivers.blegatt`` with ``SimStream`` bytes (counter channel
on), one frame per notification, and can:

- lose the link after a given EMG frame, making ``outage_frames`` frames nobody hears
  (the band keeps sampling), then calling bleak's disconnected callback;
- refuse the first ``refuse_after_loss`` connection attempts after a link loss;
- drop chosen notifications (by EMG frame number, 1-based in the order made).

Everything is counted, so tests predict the driver's counters exactly.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, ClassVar

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError
from emgd.drivers import blegatt as gatt
from emgd.drivers.blesim import split_frames
from emgd.drivers.sim import SIM_FIRMWARE, SimConfig, SimStream

LAYOUT = (
    (gatt.SERVICE, ((gatt.EMG_CHAR, ["read", "notify"]), (gatt.CONTROL_CHAR, ["read", "write"]))),
    (gatt.BATTERY_SERVICE, ((gatt.BATTERY_LEVEL, ["read"]),)),
    (gatt.DEVICE_INFO_SERVICE, ((gatt.SERIAL_NUMBER, ["read"]), (gatt.FIRMWARE_REVISION, ["read"]))),
)


class FakeBand:
    """The band's side: its stream, its fault script and its counters."""

    def __init__(self, serial: str = "SIM-F001", address: str = "AA:BB:CC:00:00:01",
                 total_frames: int = 400, pace_s: float = 0.0005) -> None:
        self.serial, self.address = serial, address
        self.name = f"{gatt.NAME_PREFIX} {serial}"
        self.stream = SimStream(SimConfig(serial=serial, counter=True, paced=False))
        self.total_frames = total_frames  # EMG frames the band makes in all, then it idles
        self.pace_s = pace_s
        self.lose_link_after: int | None = None  # EMG frame number after which the link drops
        self.lose_link_now = threading.Event()  # or: drop the link as soon as this is set
        self.outage_frames = 0  # EMG frames made while the link is down
        self.refuse_after_loss = 0  # connection attempts refused after a link loss
        self.unreachable = 0  # connection attempts still to refuse
        self.drop: set[int] = set()  # EMG frame numbers whose notification is lost
        self.advertising = True
        self.made = 0  # EMG frames made
        self.delivered = 0  # EMG frames notified
        self.notifications = 0  # notifications of any frame type
        self.connects = self.refused = self.starts = 0
        self.finished = threading.Event()
        self.streaming = False
        self.client: FakeBandClient | None = None
        self.frame = 10

    def read(self, uuid: str) -> bytes:
        if uuid == gatt.SERIAL_NUMBER:
            return self.serial.encode()
        if uuid == gatt.FIRMWARE_REVISION:
            return SIM_FIRMWARE.encode()
        if uuid == gatt.BATTERY_LEVEL:
            return bytes((100,))  # what the STATUS frames say too
        if uuid == gatt.CONTROL_CHAR:
            return gatt.StreamState(self.streaming, self.stream.config.fmt, self.frame).encode()
        raise BleakError(f"fake band: {uuid} is not readable")

    def write(self, client: FakeBandClient, uuid: str, value: bytes) -> None:
        cmd, _fmt, frame = gatt.decode_command(value)
        if cmd == gatt.CMD_STOP:
            self.streaming = False
            return
        self.frame = min(frame, 10)
        self.streaming = True
        self.starts += 1
        asyncio.get_running_loop().create_task(self._run(client))

    async def _run(self, client: FakeBandClient) -> None:
        while self.streaming and client.is_connected and self.made < self.total_frames:
            for frame in split_frames(self.stream.generate_bytes(self.frame)):
                if frame[3] == 1:  # EMG
                    self.made += 1
                    if self.made in self.drop:
                        continue
                    self.delivered += 1
                self.notifications += 1
                client.notify(frame)
            if self.made == self.lose_link_after or self.lose_link_now.is_set():
                self.lose_link_after = None
                self.lose_link_now.clear()
                self._outage(client)
                return
            await asyncio.sleep(self.pace_s)
        if self.made >= self.total_frames:
            self.finished.set()

    def _outage(self, client: FakeBandClient) -> None:
        for _ in range(self.outage_frames):
            self.stream.generate_bytes(self.frame)
            self.made += 1
        self.streaming = False
        self.unreachable = self.refuse_after_loss
        client.link_lost()


class FakeBandClient(BaseBleakClient):
    """bleak's client interface, played by the FakeBand registered for the address."""

    bands: ClassVar[dict[str, FakeBand]] = {}

    def __init__(self, address_or_ble_device: Any, **kwargs: Any) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=kwargs.get(
            "disconnected_callback"), timeout=kwargs.get("timeout", 10.0))
        self.band = self.bands[self.address]
        self._connected = False
        self._callbacks: dict[str, Any] = {}

    @classmethod
    def serving(cls, *bands: FakeBand) -> type[FakeBandClient]:
        """A subclass that knows ``bands`` (no state shared between tests)."""
        return type("FakeBandClient", (cls,), {"bands": {b.address: b for b in bands}})

    @property
    def name(self) -> str:
        return self.band.name

    @property
    def mtu_size(self) -> int:
        return gatt.MAX_MTU

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        band = self.band
        band.connects += 1
        if band.unreachable > 0:
            band.unreachable -= 1
            band.refused += 1
            raise BleakError(f"fake band {band.address}: out of range")
        self._connected = True
        band.client = self
        self.services = _services()

    async def disconnect(self) -> None:
        self._connected = False
        self.band.streaming = False

    def link_lost(self) -> None:
        self._connected = False
        if self._disconnected_callback is not None:
            self._disconnected_callback()

    def notify(self, frame: bytes) -> None:
        callback = self._callbacks.get(gatt.EMG_CHAR)
        if callback is not None:
            callback(bytearray(frame))

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, **kwargs: Any
                             ) -> bytearray:
        self._check()
        return bytearray(self.band.read(characteristic.uuid))

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any,
                              response: bool) -> None:
        self._check()
        self.band.write(self, characteristic.uuid, bytes(data))

    async def start_notify(self, characteristic: BleakGATTCharacteristic, callback: Any,
                           **kwargs: Any) -> None:
        self._check()
        self._callbacks[characteristic.uuid] = callback

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        self._callbacks.pop(characteristic.uuid, None)

    def _check(self) -> None:
        if not self._connected:
            raise BleakError("fake band: not connected")

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    async def unpair(self) -> None:
        raise NotImplementedError

    async def read_gatt_descriptor(self, descriptor: Any, **kwargs: Any) -> bytearray:
        raise NotImplementedError

    async def write_gatt_descriptor(self, descriptor: Any, data: Any) -> None:
        raise NotImplementedError


def _services() -> BleakGATTServiceCollection:
    coll = BleakGATTServiceCollection()
    handle = 0
    for svc_uuid, chars in LAYOUT:
        handle += 1
        svc = BleakGATTService(None, handle, svc_uuid)
        coll.add_service(svc)
        for uuid, props in chars:
            handle += 1
            coll.add_characteristic(
                BleakGATTCharacteristic(None, handle, uuid, props, lambda: 512, svc))
    return coll


class FakeScanner(BaseBleakScanner):
    """bleak's scanner interface: reports the advertising FakeBands once per start."""

    bands: tuple[FakeBand, ...] = ()

    def __init__(self, detection_callback: Any, service_uuids: Any, scanning_mode: Any = "active",
                 **kwargs: Any) -> None:
        super().__init__(detection_callback, service_uuids)

    @classmethod
    def seeing(cls, *bands: FakeBand) -> type[FakeScanner]:
        return type("FakeScanner", (cls,), {"bands": bands})

    async def start(self) -> None:
        self.seen_devices = {}
        asyncio.get_running_loop().call_soon(self._report)

    def _report(self) -> None:
        for i, band in enumerate(self.bands):
            if not band.advertising:
                continue
            adv = AdvertisementData(band.name, {}, {gatt.SERVICE: gatt.encode_service_data(band.serial, 0)},
                                    [gatt.SERVICE], None, -40 - i, ())
            device = self.create_or_update_device(band.address, band.address, band.name,
                                                  None, adv)
            self.call_detection_callbacks(device, adv)

    async def stop(self) -> None:
        pass


__all__ = ["BLEDevice", "FakeBand", "FakeBandClient", "FakeScanner"]
