"""The emgd wire protocol: frame layout, encoders and the streaming decoder.

The normative description, with hex test vectors, is ``docs/protocol.md``; this module
implements it and ``tests/test_protocol.py`` checks the two against each other. The
constants and types live in ``protocol_types`` and the encoders in ``protocol_encode``;
all of them are importable from here, the protocol's API.

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

import math
import zlib

import numpy as np

from emgd import N_CHANNELS
from emgd.drivers.protocol_encode import (
    encode_emg,
    encode_frame,
    encode_imu,
    encode_marker,
    encode_status,
    quantize,
)
from emgd.drivers.protocol_types import (
    _2F32,
    _CRC,
    _F32,
    _HDR,
    _STATUS_FIXED,
    _U16,
    CRC_SIZE,
    HEADER_SIZE,
    MAX_FRAME,
    MAX_PAYLOAD,
    OVERHEAD,
    STATUS_UNKNOWN_BATTERY,
    STATUS_UNKNOWN_TEMPERATURE,
    SYNC,
    VERSION,
    DecoderStats,
    Frame,
    FrameType,
    SampleFormat,
    Status,
)

__all__ = [
    "CRC_SIZE",
    "HEADER_SIZE",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "OVERHEAD",
    "STATUS_UNKNOWN_BATTERY",
    "STATUS_UNKNOWN_TEMPERATURE",
    "SYNC",
    "VERSION",
    "DecoderStats",
    "Frame",
    "FrameType",
    "SampleFormat",
    "Status",
    "StreamDecoder",
    "decode_emg_payload",
    "decode_imu",
    "decode_status",
    "encode_emg",
    "encode_frame",
    "encode_imu",
    "encode_marker",
    "encode_status",
    "quantize",
    "unpack_int24",
]


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
