"""The emgd wire protocol's encoders: :func:`encode_frame` and one per frame type, and
:func:`quantize` (µV to integer codes). Import them from ``emgd.drivers.protocol``.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from emgd import N_CHANNELS
from emgd.drivers.protocol_types import (
    _2F32,
    _CRC,
    _F32,
    _HDR,
    _STATUS_FIXED,
    _U16,
    _U64_MAX,
    MAX_PAYLOAD,
    STATUS_UNKNOWN_BATTERY,
    STATUS_UNKNOWN_TEMPERATURE,
    SYNC,
    VERSION,
    FrameType,
    SampleFormat,
)


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
