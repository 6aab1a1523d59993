"""The band's Bluetooth LE GATT layout, shared by the driver and the simulated band.

Normative description: ``docs/protocol.md``, section "Bluetooth LE GATT layout". In short:

- the **emgd service** (primary, 128-bit UUID :data:`SERVICE`) has
  - the **EMG characteristic** (:data:`EMG_CHAR`, notify + read): each notification is one
    or more whole protocol frames (``docs/protocol.md``); frames never span notifications;
  - the **control characteristic** (:data:`CONTROL_CHAR`, write + read): commands below;
    reading it returns the stream state (:func:`decode_state`);
- the standard **Battery Service** (0x180F) with Battery Level (0x2A19, u8 percent);
- the standard **Device Information Service** (0x180A) with Serial Number String (0x2A25),
  the band's identity in emgd, and Firmware Revision String (0x2A26).

The band advertises the emgd service UUID, a local name ``emgd-band SERIAL`` (prefix
:data:`NAME_PREFIX`), and service data under :data:`SERVICE`: one byte of advertisement
counter (it changes whenever the band refreshes its advertisement; receivers ignore it),
then the serial number (UTF-8), so a scan lists serial numbers without connecting
(:func:`encode_service_data`, :func:`serial_from_adv`).

Nothing here imports bleak or dbus-fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from emgd.drivers.protocol import SampleFormat

_BASE = "-7c2b-4f5e-9d1a-656d67640000"  # "emgd" in the node bytes
SERVICE = "e3a10001" + _BASE
EMG_CHAR = "e3a10002" + _BASE
CONTROL_CHAR = "e3a10003" + _BASE


def sig_uuid(short: int) -> str:
    """A 16-bit Bluetooth SIG UUID in its 128-bit form."""
    return f"0000{short:04x}-0000-1000-8000-00805f9b34fb"


BATTERY_SERVICE = sig_uuid(0x180F)
BATTERY_LEVEL = sig_uuid(0x2A19)
DEVICE_INFO_SERVICE = sig_uuid(0x180A)
SERIAL_NUMBER = sig_uuid(0x2A25)
FIRMWARE_REVISION = sig_uuid(0x2A26)

NAME_PREFIX = "emgd-band"

# Control characteristic commands (first byte of a write).
CMD_START = 0x01  # + u8 sample format (0 int16, 1 int24) + u8 samples per frame
CMD_STOP = 0x02

#: The largest ATT MTU (BlueZ and the core spec allow up to 517); a notification carries
#: MTU - 3 bytes, and an attribute value is at most 512 bytes.
MAX_MTU = 517
MAX_VALUE = 512
DEFAULT_MTU = 23
FRAME_OVERHEAD = 28 + 4  # frame header + CRC, plus the EMG payload's scale


def encode_start(fmt: SampleFormat | str, samples_per_frame: int) -> bytes:
    fmt = SampleFormat.parse(fmt)
    if not 1 <= samples_per_frame <= fmt.max_samples:
        raise ValueError(f"samples_per_frame must be 1..{fmt.max_samples} for {fmt.name}")
    return bytes((CMD_START, int(fmt), samples_per_frame))


def encode_stop() -> bytes:
    return bytes((CMD_STOP,))


@dataclass(frozen=True, slots=True)
class StreamState:
    """What the control characteristic reads: streaming flag, format, samples per frame."""

    streaming: bool
    fmt: SampleFormat
    samples_per_frame: int

    def encode(self) -> bytes:
        return bytes((int(self.streaming), int(self.fmt), self.samples_per_frame))


def decode_state(value: bytes | bytearray) -> StreamState:
    if len(value) != 3 or value[0] > 1 or value[1] > 1 or value[2] == 0:
        raise ValueError(f"bad control state {bytes(value).hex()}")
    return StreamState(bool(value[0]), SampleFormat(value[1]), value[2])


def decode_command(value: bytes | bytearray) -> tuple[int, SampleFormat | None, int]:
    """(command, format, samples per frame) of a control write; ValueError if malformed."""
    if len(value) == 1 and value[0] == CMD_STOP:
        return CMD_STOP, None, 0
    if len(value) == 3 and value[0] == CMD_START and value[1] in (0, 1):
        fmt = SampleFormat(value[1])
        if 1 <= value[2] <= fmt.max_samples:
            return CMD_START, fmt, value[2]
    raise ValueError(f"bad control command {bytes(value).hex()}")


def frame_bytes(fmt: SampleFormat | str, samples_per_frame: int) -> int:
    """Size of one EMG frame on the air."""
    return FRAME_OVERHEAD + samples_per_frame * 16 * SampleFormat.parse(fmt).bytes_per_sample


def samples_per_notification(fmt: SampleFormat | str, mtu: int) -> int:
    """The most samples one EMG frame may carry so that it fits one notification at
    ``mtu`` (and one attribute value), at least 1."""
    fmt = SampleFormat.parse(fmt)
    room = min(mtu - 3, MAX_VALUE) - FRAME_OVERHEAD
    return max(1, min(fmt.max_samples, room // (16 * fmt.bytes_per_sample)))


def encode_service_data(serial: str, counter: int) -> bytes:
    return bytes((counter & 0xFF,)) + serial.encode("utf-8")


def serial_from_adv(service_data: dict[str, bytes], name: str | None) -> str | None:
    """The serial number an advertisement carries (service data under :data:`SERVICE`),
    or, failing that, the part of an ``emgd-band SERIAL`` name after the prefix; None if
    neither. A hint for listing and matching: the connected band's Device Information
    serial number is what identifies it."""
    raw = service_data.get(SERVICE)
    if raw and len(raw) > 1:
        try:
            return bytes(raw[1:]).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if name and name.startswith(NAME_PREFIX + " "):
        return name[len(NAME_PREFIX) + 1:].strip() or None
    return None


def is_band(service_uuids: list[str], name: str | None) -> bool:
    """Whether an advertisement looks like an emgd band."""
    return SERVICE in (u.lower() for u in service_uuids) or bool(
        name and name.startswith(NAME_PREFIX))
