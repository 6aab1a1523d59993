"""The emgd wire protocol's constants and data types: frame layout, frame and sample types,
:class:`Frame`, :class:`Status` and the decoder's counters (:class:`DecoderStats`).

Shared by the encoders (``emgd.drivers.protocol_encode``) and the decoders; import them
from ``emgd.drivers.protocol``, the protocol's API (``docs/protocol.md``).
"""

from __future__ import annotations

import dataclasses
import struct
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
