"""The simulated BLE band: a GATT server on BlueZ's D-Bus peripheral API (dbus-fast).

It serves the layout of :mod:`emgd.drivers.blegatt` (``docs/protocol.md``, "Bluetooth LE
GATT layout") from a Bluetooth adapter of the *system* bus — in tests and demos the second
adapter (``hci1``) of BlueZoo on a private bus (:mod:`emgd.drivers.blebus`) — so that
``emgd --device ble`` runs end to end on a machine without Bluetooth hardware::

    python -m emgd.drivers.blesim --start-bus      # private bus + BlueZoo + this band
    # prints: export DBUS_SYSTEM_BUS_ADDRESS=...; then in that environment:
    emgd scan --adapter hci0
    emgd --device 'ble?adapter=hci0'

The EMG comes from :class:`emgd.drivers.sim.SimStream` (the same bytes as ``sim``), paced
drift-free (samples due = rate × elapsed − sent). The band's sample clock starts with the
first START command and keeps running while nobody listens: frames made while not
streaming are not sent, so a client that reconnects sees the exact gap. Each notification
carries one frame (10 int24 samples = 512 bytes, 200 per second, plus a STATUS frame per
second). The serial number is the one ``SimConfig.serial`` gives, also in the STATUS frames.

No ``from __future__ import annotations`` here: dbus-fast reads the D-Bus signatures from
the annotations (``-> DBusBytes``), and ``-> None`` must stay the object None.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import struct
import sys
import time
from typing import Annotated, Any

from dbus_fast import BusType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusDict,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt16,
)
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method
from emgd.drivers import blegatt as gatt
from emgd.drivers.sim import SIM_FIRMWARE, SimConfig, SimStream
from emgd.drivers.urls import parse_url

from emgd import SAMPLE_RATE

log = logging.getLogger(__name__)

APP_PATH = "/org/emgd/band"
ADV_PATH = "/org/emgd/band/adv0"
PACE_S = 0.002
ADV_REFRESH_S = 1.0  # BlueZoo only re-reports a known device when its data changes
DEFAULT_SERIAL = "SIM-B001"
_LEN = struct.Struct("<H")
_R = PropertyAccess.READ
_Strings = Annotated[list[str], DBusSignature("as")]


class _Service(ServiceInterface):
    def __init__(self, uuid: str) -> None:
        super().__init__("org.bluez.GattService1")
        self._uuid = uuid

    @dbus_property(access=_R)
    def UUID(self) -> DBusStr:  # D-Bus member names are CamelCase
        return self._uuid

    @dbus_property(access=_R)
    def Primary(self) -> DBusBool:
        return True


class _Characteristic(ServiceInterface):
    """One characteristic: a read callback, a write callback, notifications."""

    def __init__(self, uuid: str, service_path: str, flags: list[str], band: "BleSimBand",
                 value: bytes = b"") -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self._uuid, self._service, self._flags, self._band = uuid, service_path, flags, band
        self._value = value
        self.notifying = False

    @dbus_property(access=_R)
    def UUID(self) -> DBusStr:
        return self._uuid

    @dbus_property(access=_R)
    def Service(self) -> DBusObjectPath:
        return self._service

    @dbus_property(access=_R)
    def Flags(self) -> _Strings:
        return self._flags

    @dbus_property(access=_R)
    def Value(self) -> DBusBytes:
        return self._value

    @dbus_property(access=_R)
    def Notifying(self) -> DBusBool:
        return self.notifying

    @method()
    def ReadValue(self, options: DBusDict) -> DBusBytes:
        return self._band.read(self._uuid, self._value)

    @dbus_property(access=_R)
    def MTU(self) -> DBusUInt16:  # BlueZoo reads it; real BlueZ negotiates its own
        return gatt.MAX_MTU

    @method()
    def WriteValue(self, value: DBusBytes, options: DBusDict) -> None:
        mtu = options.get("mtu")
        self._band.write(self._uuid, bytes(value), mtu.value if mtu else gatt.MAX_MTU)

    @method()
    def StartNotify(self) -> None:
        self.notifying = True
        self._band.notify_changed(self._uuid, True)

    @method()
    def StopNotify(self) -> None:
        self.notifying = False
        self._band.notify_changed(self._uuid, False)

    @method()
    def Confirm(self) -> None:
        pass

    def notify(self, value: bytes) -> None:
        self._value = value
        self.emit_properties_changed({"Value": value})


class _Advertisement(ServiceInterface):
    def __init__(self, name: str, serial: str) -> None:
        super().__init__("org.bluez.LEAdvertisement1")
        self._name, self._serial = name, serial
        self.counter = 0

    def refresh(self) -> None:
        """A new advertisement counter: scanners that already know the band see it again
        (BlueZ reports a known device when its advertised data changes)."""
        self.counter = (self.counter + 1) & 0xFF
        data = gatt.encode_service_data(self._serial, self.counter)
        self.emit_properties_changed({"ServiceData": {gatt.SERVICE: Variant("ay", data)}})

    @dbus_property(access=_R)
    def Type(self) -> DBusStr:
        return "peripheral"

    @dbus_property(access=_R)
    def ServiceUUIDs(self) -> _Strings:
        return [gatt.SERVICE]

    @dbus_property(access=_R)
    def LocalName(self) -> DBusStr:
        return self._name

    @dbus_property(access=_R)
    def Discoverable(self) -> DBusBool:
        return True

    @dbus_property(access=_R)
    def ServiceData(self) -> DBusDict:
        return {gatt.SERVICE: Variant("ay", gatt.encode_service_data(self._serial,
                                                                     self.counter))}

    @method()
    def Release(self) -> None:
        log.info("advertisement released")


def split_frames(data: bytes) -> list[bytes]:
    """Whole protocol frames of ``data`` (a SimStream's output: frames back to back)."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = _LEN.unpack_from(data, pos + 6)
        end = pos + 24 + length + 4
        out.append(data[pos:end])
        pos = end
    return out


class BleSimBand:
    """The simulated band's GATT application and advertisement on one adapter."""

    def __init__(self, config: SimConfig | None = None, adapter: str = "hci1",
                 battery: int = 87) -> None:
        self.config = config or SimConfig(serial=DEFAULT_SERIAL)
        self.adapter = adapter
        self.name = f"{gatt.NAME_PREFIX} {self.config.serial}"
        self.battery = battery
        self.stream = SimStream(self.config)
        self.streaming = False
        self.sent_notifications = 0
        self.skipped_frames = 0  # frames made while nobody was streaming
        self._bus: MessageBus | None = None
        self._pacer: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._chars: dict[str, _Characteristic] = {}
        self._adv: _Advertisement | None = None

    # ------------------------------------------------------------------ GATT callbacks
    def read(self, uuid: str, cached: bytes) -> bytes:
        if uuid == gatt.CONTROL_CHAR:
            cfg = self.stream.config
            return gatt.StreamState(self.streaming, cfg.fmt, cfg.frame).encode()
        if uuid == gatt.BATTERY_LEVEL:
            return bytes((self.battery,))
        if uuid == gatt.SERIAL_NUMBER:
            return self.config.serial.encode()
        if uuid == gatt.FIRMWARE_REVISION:
            return SIM_FIRMWARE.encode()
        return cached

    def write(self, uuid: str, value: bytes, mtu: int) -> None:
        if uuid != gatt.CONTROL_CHAR:
            return
        cmd, fmt, frame = gatt.decode_command(value)  # ValueError → D-Bus error reply
        if cmd == gatt.CMD_STOP or fmt is None:
            self.streaming = False
            return
        frame = min(frame, gatt.samples_per_notification(fmt, mtu))  # fit one notification
        cfg = self.stream.config
        if (fmt, frame) != (cfg.fmt, cfg.frame):
            self._restream(dataclasses.replace(cfg, fmt=fmt, frame=frame))
        self.streaming = True
        if self._pacer is None:
            self._pacer = asyncio.get_running_loop().create_task(self._pace())
        log.info("streaming %s, %d samples per frame", self.stream.config.fmt.name, frame)

    def notify_changed(self, uuid: str, on: bool) -> None:
        log.info("notifications on %s %s", uuid, "on" if on else "off")

    def _restream(self, config: SimConfig) -> None:
        """Another format or frame size: a new stream that continues the sample clock."""
        old = self.stream
        self.stream = SimStream(config)
        skip = old.position - old.position % config.frame
        if skip:
            self.stream.generate_bytes(skip)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, bus_address: str | None = None) -> None:
        """Connect to the system bus (or ``bus_address``), export, register, advertise."""
        self._bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
        self._export()
        adapter_path = f"/org/bluez/{self.adapter}"
        await self._call(adapter_path, "org.bluez.GattManager1", "RegisterApplication",
                         "oa{sv}", [APP_PATH, {}])
        await self._call(adapter_path, "org.bluez.LEAdvertisingManager1",
                         "RegisterAdvertisement", "oa{sv}", [ADV_PATH, {}])
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())
        log.info("advertising %r on %s", self.name, self.adapter)

    async def _refresh(self) -> None:
        assert self._adv is not None
        while True:
            await asyncio.sleep(ADV_REFRESH_S)
            self._adv.refresh()

    def _export(self) -> None:
        assert self._bus is not None
        layout = [
            (gatt.SERVICE, [(gatt.EMG_CHAR, ["read", "notify"]),
                            (gatt.CONTROL_CHAR, ["read", "write"])]),
            (gatt.BATTERY_SERVICE, [(gatt.BATTERY_LEVEL, ["read"])]),
            (gatt.DEVICE_INFO_SERVICE, [(gatt.SERIAL_NUMBER, ["read"]),
                                        (gatt.FIRMWARE_REVISION, ["read"])]),
        ]
        for i, (svc_uuid, chars) in enumerate(layout):
            svc_path = f"{APP_PATH}/service{i}"
            self._bus.export(svc_path, _Service(svc_uuid))
            for j, (uuid, flags) in enumerate(chars):
                char = _Characteristic(uuid, svc_path, flags, self)
                self._chars[uuid] = char
                self._bus.export(f"{svc_path}/char{j}", char)
        self._adv = _Advertisement(self.name, self.config.serial)
        self._bus.export(ADV_PATH, self._adv)

    async def _call(self, path: str, interface: str, member: str, signature: str,
                    body: list[Any]) -> None:
        from dbus_fast import Message, MessageType

        assert self._bus is not None
        reply = await self._bus.call(Message(destination="org.bluez", path=path,
                                             interface=interface, member=member,
                                             signature=signature, body=body))
        if reply is None or reply.message_type == MessageType.ERROR:
            why = f"{reply.error_name} {reply.body}" if reply is not None else "no reply"
            raise RuntimeError(f"{interface}.{member} on {path} failed: {why}")

    async def stop(self) -> None:
        for task in (self._pacer, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._pacer = self._refresher = None
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    # ------------------------------------------------------------------ the stream
    async def _pace(self) -> None:
        emg = self._chars[gatt.EMG_CHAR]
        t0 = time.monotonic_ns()
        sent = 0
        while True:
            frame = self.stream.config.frame
            due = int(SAMPLE_RATE * (time.monotonic_ns() - t0) * 1e-9) - sent
            n = due - due % frame
            if n > 0:
                sent += n
                frames = split_frames(self.stream.generate_bytes(n))
                if self.streaming and emg.notifying:
                    for value in frames:
                        emg.notify(value)
                    self.sent_notifications += len(frames)
                else:
                    self.skipped_frames += len(frames)
            await asyncio.sleep(PACE_S)


# --------------------------------------------------------------------------- command line


async def _serve(args: argparse.Namespace) -> int:
    options = dict(parse_url("sim?" + args.sim).options) if args.sim else {}
    options.setdefault("serial", DEFAULT_SERIAL)
    if args.serial:
        options["serial"] = args.serial
    elif options["serial"] == "SIM-0000":
        options["serial"] = DEFAULT_SERIAL
    band = BleSimBand(SimConfig.from_options(options), adapter=args.adapter)
    await band.start()
    print(f"simulated band {band.name!r} advertising on {args.adapter}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await band.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m emgd.drivers.blesim",
        description="A simulated emgd band over Bluetooth LE (BlueZ D-Bus peripheral API).")
    p.add_argument("--start-bus", action="store_true",
                   help="first start a private system bus with BlueZoo (adapters hci0, hci1) "
                        "and print its address")
    p.add_argument("--adapter", default="hci1", help="adapter the band uses (default: hci1)")
    p.add_argument("--serial", help=f"serial number (default: {DEFAULT_SERIAL})")
    p.add_argument("--sim", default="", metavar="OPTIONS",
                   help="sim URL options, e.g. 'seed=1&counter=1&drop=0.01'")
    args = p.parse_args(argv)
    if not args.start_bus:
        return asyncio.run(_serve(args))
    from emgd.drivers.blebus import PrivateBluez

    with PrivateBluez() as bus:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        print(f"export DBUS_SYSTEM_BUS_ADDRESS='{bus.address}'", flush=True)
        return asyncio.run(_serve(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
