"""The simulated band: synthetic sEMG as real protocol bytes, through the real decoder path.

URL: ``sim[?option=value&...]`` (options and defaults in :data:`emgd.drivers.urls.SCHEMES`):
``seed``, ``paced``, ``counter``, ``format`` (int16|int24), ``frame`` (samples per frame),
``serial``, ``bursts`` (per second; 0 = noise floor only), ``limit`` (samples, rounded down
to whole frames, then end of stream), and the fault knobs ``drop``, ``corrupt``, ``pause``,
``pause_every``, ``drift_ppm``.

:class:`SimStream` makes the bytes without threads (the serial pty simulator reuses it):
signal (:mod:`emgd.drivers.simsignal`) → quantise → EMG frames, a STATUS frame at every
whole second of device time (first one before sample 0) → faults. :class:`SimDevice` paces
a SimStream in its own thread and feeds the bytes to ``Device._on_bytes`` exactly as a
hardware backend does.

Counter channel (``counter=1``): channel 15 carries the sample index instead of signal. Its
code is ``index mod 2**23`` (int24) or ``index mod 2**15`` (int16); the scales are powers of
two, so a test recovers the code exactly with ``round(uv / scale)`` and compares it with
``index % counter_modulus(fmt)`` (see :func:`counter_codes`).

Faults use their own seeded generator; every injected fault is recorded in
:class:`Injected`, which predicts the decoder's counters exactly. The first EMG frame and
anything before it are never faulted, so the decoder can anchor its counter.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from emgd import N_CHANNELS, SAMPLE_RATE, __version__
from emgd.drivers.base import Device, DeviceInfo
from emgd.drivers.protocol import (
    SYNC,
    SampleFormat,
    encode_emg,
    encode_status,
    quantize,
)
from emgd.drivers.simsignal import SignalGenerator
from emgd.drivers.urls import SCHEMES, DeviceUrl, parse_url
from emgd.errors import ConfigError

COUNTER_CHANNEL = N_CHANNELS - 1
SCALE_UV = {SampleFormat.INT24: 2.0**-4, SampleFormat.INT16: 2.0**-2}  # µV per LSB
SIM_FIRMWARE = f"emgd-sim {__version__}"
PACE_S = 0.003  # sleep between bursts in paced mode
UNPACED_BLOCK_FRAMES = 100
DELIVERY_CHUNK = 4096  # bytes per _on_bytes call, like a serial read
US_PER_SAMPLE = 1_000_000 // SAMPLE_RATE


def counter_modulus(fmt: SampleFormat) -> int:
    return 2**23 if fmt is SampleFormat.INT24 else 2**15


def counter_codes(uv: np.ndarray, fmt: SampleFormat) -> np.ndarray:
    """The counter channel's codes from its µV values (int64), for comparison with
    ``index % counter_modulus(fmt)``."""
    return np.rint(np.asarray(uv, np.float64) / SCALE_UV[fmt]).astype(np.int64)


@dataclass(frozen=True, slots=True)
class SimConfig:
    seed: int = 0
    paced: bool = True
    counter: bool = False
    fmt: SampleFormat = SampleFormat.INT24
    frame: int = 10
    serial: str = "SIM-0000"
    bursts: float = 1.0
    limit: int = 0
    drop: float = 0.0
    corrupt: float = 0.0
    pause: float = 0.0
    pause_every: float = 0.0
    drift_ppm: float = 0.0

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> SimConfig:
        fields = dict(options)
        fields["fmt"] = SampleFormat.parse(str(fields.pop("format", "int24")))
        cfg = cls(**fields)  # type: ignore[arg-type]
        if cfg.frame > cfg.fmt.max_samples:
            raise ConfigError(
                f"sim: frame={cfg.frame} does not fit one {cfg.fmt.name.lower()} frame "
                f"(at most {cfg.fmt.max_samples} samples)\nusage: {SCHEMES['sim'].grammar()}"
            )
        return cfg

    @classmethod
    def from_url(cls, url: str) -> SimConfig:
        return cls.from_options(parse_url(url).options)

    @property
    def scale_uv(self) -> float:
        return SCALE_UV[self.fmt]

    @property
    def samples_limit(self) -> int:
        """``limit`` rounded down to whole frames (0 = no limit)."""
        return self.limit - self.limit % self.frame


@dataclass(slots=True)
class Injected:
    """Ground truth of what the simulated link did to the frames."""

    frames: int = 0  # frames made (EMG and STATUS)
    emg_frames: int = 0
    dropped: int = 0  # frames removed from the stream
    corrupted: int = 0  # frames delivered with one byte (after the sync) XOR-ed
    corrupted_bytes: int = 0  # total length of the corrupted frames
    false_syncs: int = 0  # A5 5A patterns inside corrupted frames (after their own sync)
    gaps: int = 0  # runs of lost EMG frames followed by a delivered EMG frame
    lost_samples: int = 0  # samples of those runs
    pending_lost: int = 0  # lost samples after the last delivered EMG frame

    @property
    def rejects(self) -> int:
        """What the decoder must count as crc_errors + malformed + truncated."""
        return self.corrupted + self.false_syncs


class SimStream:
    """Protocol bytes of the simulated band, without threads or clocks."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.signal = SignalGenerator(config.seed, config.bursts)
        self._fault_rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(3,)))
        self._faulty = config.drop > 0 or config.corrupt > 0
        self.injected = Injected()
        self.position = 0  # device sample index of the next sample to make
        self._clock = 0  # samples elapsed on the band's clock (>= position)
        self._next_status = 0
        self._anchored = False

    def generate_bytes(self, n_samples: int) -> bytes:
        """Advance the band's clock by ``n_samples`` and return the bytes of every frame
        completed meanwhile (a partial frame waits for the next call)."""
        cfg = self.config
        self._clock += n_samples
        n_frames = (self._clock - self.position) // cfg.frame
        if n_frames <= 0:
            return b""
        n = n_frames * cfg.frame
        codes = quantize(self.signal.generate(n), cfg.fmt, cfg.scale_uv)
        if cfg.counter:
            index = np.arange(self.position, self.position + n, dtype=np.int64)
            codes[:, COUNTER_CHANNEL] = index % counter_modulus(cfg.fmt)
        out = []
        for k in range(n_frames):
            counter = self.position + k * cfg.frame
            ts = counter * US_PER_SAMPLE
            if counter >= self._next_status:
                out.append(self._fault(self._status(counter, ts), 0))
                self._next_status += SAMPLE_RATE
            frame = encode_emg(
                counter, ts, codes[k * cfg.frame : (k + 1) * cfg.frame], cfg.fmt, cfg.scale_uv
            )
            out.append(self._fault(frame, cfg.frame))
        self.position += n
        return b"".join(out)

    def paused(self, sample_index: int) -> bool:
        """Whether the link is stalled at ``sample_index`` (device time): from every
        ``pause_every`` seconds on, for ``pause`` seconds."""
        cfg = self.config
        if cfg.pause <= 0 or cfg.pause_every <= 0:
            return False
        t = sample_index / SAMPLE_RATE
        k = int(t // cfg.pause_every)
        return k >= 1 and t - k * cfg.pause_every < cfg.pause

    def _status(self, counter: int, ts: int) -> bytes:
        battery = max(0, 100 - counter // (60 * SAMPLE_RATE))  # 1 % per minute
        return encode_status(
            counter, ts, battery=battery, serial=self.config.serial, firmware=SIM_FIRMWARE,
            streaming=True, temperature_c=31.5,
        )

    def _fault(self, frame: bytes, n_samples: int) -> bytes:
        inj = self.injected
        inj.frames += 1
        inj.emg_frames += n_samples > 0
        if self._faulty and self._anchored:
            u_drop, u_corrupt = self._fault_rng.random(2)
            if u_drop < self.config.drop:
                inj.dropped += 1
                inj.pending_lost += n_samples
                return b""
            if u_corrupt < self.config.corrupt:
                pos = int(self._fault_rng.integers(2, len(frame)))
                mask = int(self._fault_rng.integers(1, 256))
                bad = bytearray(frame)
                bad[pos] ^= mask
                inj.corrupted += 1
                inj.corrupted_bytes += len(bad)
                inj.false_syncs += bytes(bad[1:]).count(SYNC)
                inj.pending_lost += n_samples
                return bytes(bad)
        if n_samples:
            self._anchored = True
            if inj.pending_lost:
                inj.gaps += 1
                inj.lost_samples += inj.pending_lost
                inj.pending_lost = 0
        return frame


class SimDevice(Device):
    """The simulated band behind the ``sim`` URL scheme."""

    transport = "sim"
    simulated = True

    def __init__(self, url: DeviceUrl | str = "sim") -> None:
        parsed = parse_url(url) if isinstance(url, str) else url
        self.config = SimConfig.from_options(parsed.options)
        info = DeviceInfo(
            device_id=self.config.serial, name="emgd simulated band", transport="sim",
            url=str(parsed), simulated=True, scale_uv=self.config.scale_uv,
            firmware=SIM_FIRMWARE,
        )
        super().__init__(parsed, info)
        self.stream = SimStream(self.config)
        self._held: list[bytes] = []
        self.sent = 0  # samples handed to the link (made, not necessarily delivered)

    @property
    def injected(self) -> Injected:
        return self.stream.injected

    def _run(self) -> None:
        self._set_link("up")
        cfg = self.config
        limit = cfg.samples_limit
        if cfg.paced:
            rate = SAMPLE_RATE * (1.0 + cfg.drift_ppm * 1e-6)
            t0 = time.monotonic_ns()
            while not self._stop_event.is_set():
                due = int(rate * (time.monotonic_ns() - t0) * 1e-9) - self.sent
                n = due - due % cfg.frame
                if limit:
                    n = min(n, limit - self.sent)
                if n > 0:
                    self._produce(n)
                if limit and self.sent >= limit:
                    break
                self._stop_event.wait(PACE_S)
        else:
            block = UNPACED_BLOCK_FRAMES * cfg.frame
            while not self._stop_event.is_set() and not (limit and self.sent >= limit):
                n = min(block, limit - self.sent) if limit else block
                if not self._wait_for_room(n):  # never lap the pipeline or the recorder
                    break
                self._produce(n)
        if limit and self.sent >= limit:
            self._flush_held()
            self._end_of_stream()

    def _produce(self, n: int) -> None:
        data = self.stream.generate_bytes(n)
        self.sent += n
        if self.stream.paused(self.sent):
            self._held.append(data)
            return
        self._flush_held()
        self._deliver(data)

    def _flush_held(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        t_recv = time.monotonic_ns()
        with memoryview(data) as mv:
            for i in range(0, len(data), DELIVERY_CHUNK):
                self._on_bytes(mv[i : i + DELIVERY_CHUNK], t_recv)
