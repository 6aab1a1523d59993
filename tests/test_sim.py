"""The simulated band and the device base class, through the real byte path.

Correctness only: counts and values, never durations."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from emgd import SAMPLE_RATE
from emgd.drivers.base import Device
from emgd.drivers.protocol import SampleFormat, encode_emg, encode_marker, encode_status
from emgd.drivers.registry import open_device
from emgd.drivers.sim import (
    COUNTER_CHANNEL,
    SCALE_UV,
    SimConfig,
    SimDevice,
    SimStream,
    counter_codes,
    counter_modulus,
)
from emgd.drivers.simsignal import NOISE_FLOOR_UV, SignalGenerator
from emgd.drivers.urls import parse_url
from emgd.errors import ConfigError, DeviceError

WAIT_S = 60.0  # generous upper bound for a thread to finish; tests never assert durations


class RecordingSink:
    """Stands in for the ring buffer: same write signature, keeps copies."""

    def __init__(self) -> None:
        self.data: list[np.ndarray] = []
        self.first: list[int] = []
        self.t_recv: list[int] = []
        self.lock = threading.Lock()

    def write(self, data: np.ndarray, first_sample: int, t_recv_ns: int) -> None:
        with self.lock:
            self.data.append(data.copy())
            self.first.append(first_sample)
            self.t_recv.append(t_recv_ns)

    @property
    def samples(self) -> int:
        with self.lock:
            return sum(d.shape[0] for d in self.data)

    def indices(self) -> np.ndarray:
        return np.concatenate([np.arange(f, f + d.shape[0]) for f, d in zip(self.first, self.data)])

    def emg(self) -> np.ndarray:
        return np.concatenate(self.data)


def run_unpaced(url: str) -> tuple[SimDevice, RecordingSink]:
    dev = open_device(url)
    sink = RecordingSink()
    dev.start(sink)
    assert dev.wait(WAIT_S), "simulator did not reach its limit"
    return dev, sink


# ------------------------------------------------------------------ signal


def test_signal_does_not_depend_on_block_size():
    n = 5000
    ref = SignalGenerator(seed=5, bursts_per_s=4).generate(n)
    for block in (1, 7, 333):
        gen = SignalGenerator(seed=5, bursts_per_s=4)
        parts = [gen.generate(min(block, n - i)) for i in range(0, n, block)]
        assert np.array_equal(np.concatenate(parts), ref), block


def test_noise_floor_rms_without_bursts():
    x = SignalGenerator(seed=1, bursts_per_s=0).generate(100_000)
    rms = np.sqrt(np.mean(x**2, axis=0))
    assert np.all(np.abs(rms - NOISE_FLOOR_UV) < 0.05 * NOISE_FLOOR_UV)
    assert abs(np.mean(x)) < 0.05


def test_bursts_are_plausible_semg():
    gen = SignalGenerator(seed=2, bursts_per_s=2)
    x = gen.generate(40_000)  # 20 s
    rms = np.sqrt(np.mean(x**2, axis=0))
    assert np.all(rms > NOISE_FLOOR_UV) and np.max(np.abs(x)) < 5000
    # activity is band-limited: little power below ~10 Hz (no drift, no DC)
    spec = np.abs(np.fft.rfft(x - x.mean(0), axis=0)) ** 2
    freqs = np.fft.rfftfreq(x.shape[0], 1 / SAMPLE_RATE)
    assert spec[freqs < 10].sum() < 0.02 * spec.sum()
    # spatially smooth: neighbouring electrodes correlate more than opposite ones
    c = np.corrcoef(x.T)
    assert np.mean([c[i, (i + 1) % 16] for i in range(16)]) > np.mean(
        [c[i, (i + 8) % 16] for i in range(16)]) + 0.1


def test_different_seeds_differ():
    assert not np.array_equal(SignalGenerator(1).generate(100), SignalGenerator(2).generate(100))


# ------------------------------------------------------------------ bytes


def test_same_seed_same_bytes_whatever_the_request_sizes():
    cfg = SimConfig.from_url("sim?seed=9&drop=0.1&corrupt=0.1&counter=1")
    ref = SimStream(cfg).generate_bytes(3000)
    for step in (1, 7, 333):
        s = SimStream(cfg)
        got = b"".join(s.generate_bytes(min(step, 3000 - i)) for i in range(0, 3000, step))
        assert got == ref, step
    assert SimStream(SimConfig.from_url("sim?seed=10")).generate_bytes(100) != ref[:100]


def test_frame_option_must_fit_the_format():
    with pytest.raises(ConfigError, match="at most 42"):
        SimDevice(parse_url("sim?frame=50"))
    assert SimDevice(parse_url("sim?frame=50&format=int16")).config.frame == 50


def test_pause_windows():
    s = SimStream(SimConfig.from_url("sim?pause=0.1&pause_every=1"))
    paused = [s.paused(i) for i in range(0, 3 * SAMPLE_RATE, 10)]
    assert sum(paused) == 2 * 20  # two windows of 0.1 s in 3 s (none at t = 0)
    assert not s.paused(0) and s.paused(SAMPLE_RATE) and not s.paused(SAMPLE_RATE + 200)


# ------------------------------------------------------------------ through the device


@pytest.mark.parametrize("fmt", ["int24", "int16"])
def test_counter_channel_survives_the_full_byte_path(fmt):
    dev, sink = run_unpaced(f"sim?paced=0&counter=1&limit=20000&format={fmt}&seed=3")
    assert dev.stats().link == "closed"
    idx = sink.indices()
    assert np.array_equal(idx, np.arange(20000))  # contiguous, no loss, no duplicate
    f = SampleFormat.parse(fmt)
    codes = counter_codes(sink.emg()[:, COUNTER_CHANNEL], f)
    assert np.array_equal(codes, idx % counter_modulus(f))
    s = dev.stats()
    assert (s.samples, s.gaps, s.lost_samples, s.crc_errors, s.bytes_discarded) == (20000, 0, 0, 0, 0)
    assert dev.info.scale_uv == SCALE_UV[f]


def test_counter_modulus_wraps_exactly():
    cfg = SimConfig.from_url("sim?counter=1&format=int16&frame=63")
    s = SimStream(cfg)
    s.position = s._clock = 2**15 - 30  # start just before the wrap
    from emgd.drivers.protocol import StreamDecoder

    frames = StreamDecoder().feed(s.generate_bytes(63))
    emg = frames[-1].emg
    codes = counter_codes(emg[:, COUNTER_CHANNEL], SampleFormat.INT16)
    first = frames[-1].counter
    assert np.array_equal(codes, np.arange(first, first + 63) % 2**15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_injected_faults_equal_decoder_counts_exactly(seed):
    url = f"sim?paced=0&counter=1&limit=40000&drop=0.03&corrupt=0.03&seed={seed}"
    dev, sink = run_unpaced(url)
    inj = dev.injected
    s = dev.decoder_stats()
    assert inj.dropped > 20 and inj.corrupted > 20  # the faults really happened
    assert s.gaps == inj.gaps and s.lost_samples == inj.lost_samples
    assert s.crc_errors + s.malformed + s.truncated == inj.rejects
    assert s.frames == inj.frames - inj.dropped - inj.corrupted
    assert s.bytes_discarded == inj.corrupted_bytes
    assert s.counter_resets == 0
    # and what reached the sink is exactly the surviving samples, counter channel intact
    idx = sink.indices()
    assert len(idx) == s.samples == 40000 - inj.lost_samples - inj.pending_lost
    assert np.all(np.diff(idx) > 0)
    codes = counter_codes(sink.emg()[:, COUNTER_CHANNEL], SampleFormat.INT24)
    assert np.array_equal(codes, idx % 2**23)


def test_paused_link_holds_bytes_then_delivers_them_all():
    dev, sink = run_unpaced("sim?paced=0&counter=1&limit=8000&pause=0.2&pause_every=1")
    assert np.array_equal(sink.indices(), np.arange(8000))
    # the stalls show as samples that share one arrival time with later ones
    assert len(set(sink.t_recv)) < len(sink.t_recv)


def test_paced_mode_delivers_about_real_time():
    dev = open_device("sim?counter=1")
    sink = RecordingSink()
    t0 = time.monotonic_ns()
    dev.start(sink)
    while sink.samples < 1000:  # bounded by the pytest timeout, never asserted
        time.sleep(0.01)
    dev.stop()
    elapsed_s = (time.monotonic_ns() - t0) * 1e-9
    got = sink.samples
    assert 0 < got <= SAMPLE_RATE * elapsed_s + 10
    assert got >= 0.3 * SAMPLE_RATE * elapsed_s  # generous: the machine may be loaded
    assert np.array_equal(sink.indices(), np.arange(got))
    assert dev.stats().link == "closed" and dev.stats().battery == 100


def test_status_frames_reach_the_device():
    dev, _ = run_unpaced("sim?paced=0&limit=6000&serial=BAND-7")
    assert dev.stats().battery == 100 and dev.info.device_id == "BAND-7"
    assert dev.injected.frames - dev.injected.emg_frames == 3  # at 0 s, 1 s, 2 s


# ------------------------------------------------------------------ the base class


class BytesDevice(Device):
    """A minimal backend: plays a byte string in small chunks, then ends."""

    transport = "test"

    def __init__(self, data: bytes, fail: bool = False) -> None:
        super().__init__(parse_url("sim"))
        self.data = data
        self.fail = fail

    def _run(self) -> None:
        self._set_link("up")
        for i in range(0, len(self.data), 37):
            self._on_bytes(self.data[i : i + 37], time.monotonic_ns())
        if self.fail:
            raise OSError("cable pulled")
        self._end_of_stream()


def test_base_class_routes_frames():
    codes = np.arange(32).reshape(2, 16)
    data = (
        encode_status(0, 0, battery=42, serial="AB-1", firmware="9.9")
        + encode_marker(0, 5, "go")
        + encode_emg(0, 0, codes, SampleFormat.INT16, 0.5)
        + b"\x00garbage"
        + encode_emg(2, 0, codes, SampleFormat.INT16, 0.5)
    )
    sink = RecordingSink()
    with BytesDevice(data) as dev:
        assert dev.info.device_id == ""
        dev.start(sink)
        assert dev.wait(WAIT_S)
        assert dev.info.device_id == "AB-1" and dev.info.firmware == "9.9"
        assert dev.info.scale_uv == 0.5
        s = dev.stats()
        assert (s.battery, s.frames, s.samples, s.bytes_discarded, s.link) == (42, 4, 4, 8, "closed")
        assert [m.text for m in dev.pop_markers()] == ["go"] and dev.pop_markers() == []
        assert sink.first == [0, 2] and np.array_equal(sink.data[0], codes * np.float32(0.5))


def test_backend_failure_marks_the_link_lost():
    dev = BytesDevice(encode_marker(0, 0, "x"), fail=True)
    dev.start(RecordingSink())
    assert dev.wait(WAIT_S)
    s = dev.stats()
    assert s.link == "lost" and "cable pulled" in s.last_error
    dev.close()
    assert dev.stats().link == "closed"


def test_lifecycle_is_idempotent_and_guarded():
    dev = SimDevice(parse_url("sim?paced=0"))
    sink = RecordingSink()
    dev.start(sink)
    with pytest.raises(DeviceError, match="already started"):
        dev.start(sink)
    dev.stop()
    dev.stop()
    first = sink.samples
    dev.start(sink)  # restart after stop continues the stream
    while sink.samples <= first:
        time.sleep(0.001)
    dev.close()
    dev.close()
    assert np.all(np.diff(sink.indices()) == 1)
    with pytest.raises(DeviceError, match="closed"):
        dev.start(sink)
