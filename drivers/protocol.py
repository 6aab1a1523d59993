"""The emgd wire protocol: frame layout, encoders and the streaming decoder.

The normative description, with hex test vectors, is ``docs/protocol.md``; this module
implements it and ``tests/test_protocol.py`` checks the two against each other.

A frame (all integers little-endian)::

    A5 5A | version u8 | type u8 | flags u8 | reserved u8 | length u16 |
    counter u64 | timestamp_us u64 | payload (length bytes) | crc32 u32

The CRC is zlib's CRC-32 over every byte from ``version`` to the end of the payload.

:class:`StreamDecoder` turns arbitrary byte chunks into :class:`Frame` objects. It never
raises on any input: garbage is skipped and counted, a bad header or CRC makes it skip one
byte past the failed sync and hunt again, so a valid frame after garbage is never lost.
Its counters (:class:`DecoderStats`) are exact; ``docs/protocol.md`` defines each one.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from emgd import N_CHANNELS

SYNC = b"\xa5\x5a"
VERSION = 1
HEADER_SIZE = 24
CRC_SIZE = 4
OVERHEAD = HEADER_SIZE + CRC_SIZE
MAX_PAYLOAD = 2048
MAX_FRAME = OVERHEAD + MAX_PAYLOAD
STATUS_UNKNOWN_BATTERY = 255
STATUS_UNKNOWN_TEMPERATURE = -32768

_HDR = struct.Struct("<BBBBHQQ")  # from `version` to `timestamp`, after the sync
_CRC = struct.Struct("<I")
_F32 = struct.Struct("<f")
_2F32 = struct.Struct("<ff")
_STATUS_FIXED = struct.Struct("<BBh")
_U16 = struct.Struct("<H")
_U64_MAX = 2**64 - 1


class FrameType(IntEnum):
    EMG = 1
    IMU = 2
    STATUS = 3
    MARKER = 4


class SampleFormat(IntEnum):
    """EMG sample format, carried in bit 0 of an EMG frame's ``flags``."""

    INT16 = 0
    INT24 = 1

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self is SampleFormat.INT16 else 3

    @property
    def code_min(self) -> int:
        return -(1 << (8 * self.bytes_per_sample - 1))

    @property
    def code_max(self) -> int:
        return (1 << (8 * self.bytes_per_sample - 1)) - 1

    @property
    def max_samples(self) -> int:
        """Most samples one frame of this format can carry (``length`` <= 2048)."""
        return (MAX_PAYLOAD - 4) // (N_CHANNELS * self.bytes_per_sample)

    @classmethod
    def parse(cls, name: str | int | SampleFormat) -> SampleFormat:
        if isinstance(name, str):
            try:
                return cls[name.upper()]
            except KeyError:
                raise ValueError(f"unknown sample format {name!r}: use int16 or int24") from None
        return cls(name)


@dataclass(frozen=True, slots=True)
class Status:
    """The decoded payload of a STATUS frame."""

    battery: int | None  # percent; None when the band sent 255 (unknown)
    charging: bool
    streaming: bool
    temperature_c: float | None  # None when the band sent -32768 (unknown)
    serial: str
    firmware: str


@dataclass(slots=True)
class Frame:
    """One good frame. EMG frames carry ``emg`` (float32 (n, 16) µV), ``fmt`` and ``scale``;
    STATUS frames carry ``status``; MARKER frames carry ``text``."""

    type: int
    flags: int
    counter: int
    timestamp_us: int
    payload: bytes
    emg: np.ndarray | None = None
    fmt: SampleFormat | None = None
    scale: float | None = None
    status: Status | None = None
    text: str | None = None

    @property
    def n_samples(self) -> int:
        return 0 if self.emg is None else self.emg.shape[0]


@dataclass(slots=True)
class DecoderStats:
    """Exact counters of a :class:`StreamDecoder` (definitions in docs/protocol.md)."""

    bytes_in: int = 0
    frames: int = 0
    emg_frames: int = 0
    samples: int = 0
    crc_errors: int = 0
    malformed: int = 0
    truncated: int = 0
    bytes_discarded: int = 0
    gaps: int = 0
    lost_samples: int = 0
    counter_resets: int = 0

    def snapshot(self) -> DecoderStats:
        return dataclasses.replace(self)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- encoders


def encode_frame(
    ftype: int, counter: int, timestamp_us: int, payload: bytes, flags: int = 0
) -> bytes:
    """One frame around ``payload``. Checks field ranges only, not payload semantics
    (so tests can build well-formed frames with malformed contents)."""
    if not 0 <= counter <= _U64_MAX or not 0 <= timestamp_us <= _U64_MAX:
        raise ValueError("counter and timestamp_us must fit in an unsigned 64-bit integer")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
    body = _HDR.pack(VERSION, ftype, flags, 0, len(payload), counter, timestamp_us) + payload
    return SYNC + body + _CRC.pack(zlib.crc32(body))


def quantize(uv: np.ndarray, fmt: SampleFormat | str, scale: float) -> np.ndarray:
    """µV values to integer codes (round to nearest, clip to the format's range), int32."""
    fmt = SampleFormat.parse(fmt)
    codes = np.rint(np.asarray(uv, dtype=np.float64) / scale)
    np.clip(codes, fmt.code_min, fmt.code_max, out=codes)
    return codes.astype(np.int32)


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")


def encode_emg(
    counter: int,
    timestamp_us: int,
    codes: np.ndarray,
    fmt: SampleFormat | str,
    scale_uv: float,
) -> bytes:
    """An EMG frame of ``codes`` (n, 16) integers; ``scale_uv`` is µV per LSB."""
    fmt = SampleFormat.parse(fmt)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != N_CHANNELS or codes.shape[0] < 1:
        raise ValueError(f"codes must have shape (n>=1, {N_CHANNELS}), got {codes.shape}")
    if codes.shape[0] > fmt.max_samples:
        raise ValueError(f"{fmt.name} frames carry at most {fmt.max_samples} samples")
    if codes.dtype.kind not in "iu":
        raise ValueError("codes must be integers; use quantize() first")
    if codes.min() < fmt.code_min or codes.max() > fmt.code_max:
        raise ValueError(f"codes out of {fmt.name} range")
    _check_scale(scale_uv)
    if fmt is SampleFormat.INT16:
        data = codes.astype("<i2").tobytes()
    else:
        data = codes.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return encode_frame(FrameType.EMG, counter, timestamp_us, _F32.pack(scale_uv) + data, int(fmt))


def encode_imu(
    counter: int, timestamp_us: int, codes: np.ndarray, accel_scale: float, gyro_scale: float
) -> bytes:
    """An IMU frame of ``codes`` (n, 6) int16: ax ay az (g/LSB) gx gy gz (deg/s/LSB)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != 6 or not 1 <= codes.shape[0] <= (MAX_PAYLOAD - 8) // 12:
        raise ValueError(f"codes must have shape (n, 6) with 1 <= n <= 170, got {codes.shape}")
    if codes.min() < -32768 or codes.max() > 32767:
        raise ValueError("IMU codes out of int16 range")
    _check_scale(accel_scale)
    _check_scale(gyro_scale)
    payload = _2F32.pack(accel_scale, gyro_scale) + codes.astype("<i2").tobytes()
    return encode_frame(FrameType.IMU, counter, timestamp_us, payload)


def _lp_utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def encode_status(
    counter: int,
    timestamp_us: int,
    *,
    battery: int | None,
    serial: str,
    firmware: str,
    charging: bool = False,
    streaming: bool = True,
    temperature_c: float | None = None,
) -> bytes:
    """A STATUS frame. ``counter`` is the index of the next EMG sample."""
    batt = STATUS_UNKNOWN_BATTERY if battery is None else int(battery)
    if not 0 <= batt <= 100 and batt != STATUS_UNKNOWN_BATTERY:
        raise ValueError("battery must be 0..100 or None")
    temp = STATUS_UNKNOWN_TEMPERATURE if temperature_c is None else round(temperature_c * 100)
    if not -32768 <= temp <= 32767:
        raise ValueError("temperature out of range")
    flags = (1 if charging else 0) | (2 if streaming else 0)
    payload = _STATUS_FIXED.pack(batt, flags, temp) + _lp_utf8(serial) + _lp_utf8(firmware)
    return encode_frame(FrameType.STATUS, counter, timestamp_us, payload)


def encode_marker(counter: int, timestamp_us: int, text: str) -> bytes:
    """A MARKER frame; ``counter`` is the index of the next EMG sample."""
    return encode_frame(FrameType.MARKER, counter, timestamp_us, text.encode("utf-8"))


# --------------------------------------------------------------------------- payload decoders


def decode_status(payload: bytes) -> Status | None:
    """The fields of a STATUS payload, or None when its structure is invalid."""
    if len(payload) < 8:
        return None
    batt, flags, temp = _STATUS_FIXED.unpack_from(payload, 0)
    if flags & ~3 or (batt > 100 and batt != STATUS_UNKNOWN_BATTERY):
        return None
    strings = []
    pos = 4
    for _ in range(2):
        if pos + 2 > len(payload):
            return None
        (n,) = _U16.unpack_from(payload, pos)
        pos += 2
        if pos + n > len(payload):
            return None
        try:
            strings.append(payload[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            return None
        pos += n
    if pos != len(payload):
        return None
    return Status(
        battery=None if batt == STATUS_UNKNOWN_BATTERY else batt,
        charging=bool(flags & 1),
        streaming=bool(flags & 2),
        temperature_c=None if temp == STATUS_UNKNOWN_TEMPERATURE else temp / 100.0,
        serial=strings[0],
        firmware=strings[1],
    )


def decode_imu(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """(accel in g, gyro in deg/s), each float32 (n, 3), from an IMU frame."""
    accel_scale, gyro_scale = _2F32.unpack_from(frame.payload, 0)
    codes = np.frombuffer(frame.payload, "<i2", offset=8).reshape(-1, 6).astype(np.float32)
    return codes[:, :3] * np.float32(accel_scale), codes[:, 3:] * np.float32(gyro_scale)


def unpack_int24(raw: np.ndarray) -> np.ndarray:
    """Little-endian two's-complement int24 triplets (m, 3) uint8 to int32 (m,)."""
    wide = np.zeros((raw.shape[0], 4), np.uint8)
    wide[:, 1:] = raw
    # the three bytes land in the top of a little-endian int32; an arithmetic shift
    # right by 8 brings them down with the sign extended
    return wide.view("<i4").reshape(-1) >> 8


def decode_emg_payload(payload: bytes, fmt: SampleFormat) -> tuple[np.ndarray, float] | None:
    """(float32 (n, 16) µV, scale) from an EMG payload, or None if the scale is invalid."""
    (scale,) = _F32.unpack_from(payload, 0)
    if not (math.isfinite(scale) and scale > 0):
        return None
    if fmt is SampleFormat.INT16:
        codes = np.frombuffer(payload, "<i2", offset=4)
    else:
        codes = unpack_int24(np.frombuffer(payload, np.uint8, offset=4).reshape(-1, 3))
    emg = codes.reshape(-1, N_CHANNELS).astype(np.float32)
    emg *= np.float32(scale)
    return emg, scale


# --------------------------------------------------------------------------- stream decoder


def _header_ok(typ: int, flags: int, reserved: int, length: int) -> bool:
    if reserved != 0 or length > MAX_PAYLOAD:
        return False
    if typ == FrameType.EMG:
        if flags > 1:
            return False
        block = N_CHANNELS * (3 if flags else 2)
        return length > 4 and (length - 4) % block == 0
    if flags != 0:
        return False
    if typ == FrameType.IMU:
        return length > 8 and (length - 8) % 12 == 0
    if typ == FrameType.STATUS:
        return length >= 8
    return typ == FrameType.MARKER


class StreamDecoder:
    """Frames out of a byte stream fed in arbitrary chunks. Never raises on any input.

    The internal buffer holds at most one incomplete frame (< MAX_FRAME bytes) between
    calls. Call :meth:`finish` at the end of a finite stream (a file) to reject a trailing
    incomplete frame; a live link simply keeps feeding.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._next_counter: int | None = None
        self.stats = DecoderStats()

    @property
    def buffered(self) -> int:
        """Bytes held, waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        self._buf += data
        self.stats.bytes_in += len(data)
        return self._parse(final=False)

    def finish(self) -> list[Frame]:
        """End of stream: a trailing incomplete frame is counted as ``truncated``, any
        frame after its sync is still recovered, and the buffer ends empty."""
        return self._parse(final=True)

    def discard_buffer(self) -> None:
        """Drop a partial frame (e.g. the link was re-opened); counts the bytes as
        discarded. The counter anchor is kept, so the gap across the outage is counted."""
        self.stats.bytes_discarded += len(self._buf)
        self._buf.clear()

    def _reject(self, pos: int) -> int:
        self.stats.bytes_discarded += 1
        return pos + 1

    def _parse(self, final: bool) -> list[Frame]:
        buf = self._buf
        stats = self.stats
        n = len(buf)
        out: list[Frame] = []
        pos = 0
        with memoryview(buf) as mv:
            while pos < n:
                j = buf.find(SYNC, pos)
                if j < 0:
                    # keep a trailing A5: it may be the first half of the next sync
                    keep = n - 1 if (not final and buf[n - 1] == 0xA5) else n
                    stats.bytes_discarded += keep - pos
                    pos = keep
                    break
                stats.bytes_discarded += j - pos
                pos = j
                if n - pos < HEADER_SIZE:
                    if not final:
                        break
                    stats.truncated += 1
                    pos = self._reject(pos)
                    continue
                ver, typ, flags, res, length, counter, ts = _HDR.unpack_from(buf, pos + 2)
                if ver != VERSION or not _header_ok(typ, flags, res, length):
                    stats.malformed += 1
                    pos = self._reject(pos)
                    continue
                end = pos + HEADER_SIZE + length + CRC_SIZE
                if end > n:
                    if not final:
                        break
                    stats.truncated += 1
                    pos = self._reject(pos)
                    continue
                if zlib.crc32(mv[pos + 2 : end - CRC_SIZE]) != _CRC.unpack_from(buf, end - 4)[0]:
                    stats.crc_errors += 1
                    pos = self._reject(pos)
                    continue
                payload = bytes(mv[pos + HEADER_SIZE : end - CRC_SIZE])
                frame = self._build(typ, flags, counter, ts, payload)
                if frame is None:  # CRC good, contents invalid: drop the whole frame
                    stats.malformed += 1
                    stats.bytes_discarded += end - pos
                else:
                    out.append(frame)
                pos = end
        if pos:
            del buf[:pos]
        return out

    def _build(self, typ: int, flags: int, counter: int, ts: int, payload: bytes) -> Frame | None:
        stats = self.stats
        if typ == FrameType.EMG:
            fmt = SampleFormat(flags)
            decoded = decode_emg_payload(payload, fmt)
            if decoded is None:
                return None
            emg, scale = decoded
            n = emg.shape[0]
            expected = self._next_counter
            if expected is not None and counter != expected:
                if counter > expected:
                    stats.gaps += 1
                    stats.lost_samples += counter - expected
                else:
                    stats.counter_resets += 1
            self._next_counter = counter + n
            stats.frames += 1
            stats.emg_frames += 1
            stats.samples += n
            return Frame(typ, flags, counter, ts, payload, emg, fmt, scale)
        frame = Frame(typ, flags, counter, ts, payload)
        if typ == FrameType.STATUS:
            frame.status = decode_status(payload)
            if frame.status is None:
                return None
        elif typ == FrameType.MARKER:
            frame.text = payload.decode("utf-8", errors="replace")
        stats.frames += 1
        return frame
