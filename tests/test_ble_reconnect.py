"""BLE driver faults through bleak's documented backend seams (``backend=``), no radio.

A FakeBand (tests/fakeband.py) plays the band behind ``BleakClient(..., backend=...)`` and
``BleakScanner(..., backend=...)``: link loss mid-stream, refused reconnections, dropped
notifications. The counter channel and the fault script give the exact expected gaps.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from emgd.drivers import ble
from emgd.drivers.ble import Backoff, BleDevice
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.sim import COUNTER_CHANNEL, counter_codes, counter_modulus

from emgd.errors import DeviceNotFound
from tests.conftest import wait_for
from tests.fakeband import FakeBand, FakeBandClient, FakeScanner

SAMPLES_PER_FRAME = 10


class Recorder:
    """A sink that keeps every block (device index, data)."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, np.ndarray]] = []
        self.lock = threading.Lock()

    def write(self, data: np.ndarray, first_sample: int, t_recv_ns: int) -> None:
        with self.lock:
            self.blocks.append((first_sample, data.copy()))

    def samples(self) -> int:
        with self.lock:
            return sum(len(d) for _, d in self.blocks)

    def jumps(self) -> list[tuple[int, int]]:
        """(expected index, index received) at every discontinuity."""
        out, expected = [], None
        for first, data in self.blocks:
            if expected is not None and first != expected:
                out.append((expected, first))
            expected = first + len(data)
        return out

    def check_counter_channel(self) -> None:
        for first, data in self.blocks:
            index = first + np.arange(len(data))
            codes = counter_codes(data[:, COUNTER_CHANNEL], SampleFormat.INT24)
            assert np.array_equal(codes, index % counter_modulus(SampleFormat.INT24))


def make_device(band: FakeBand, url: str = "ble?timeout=0.3", seed: int = 7) -> BleDevice:
    backoff = Backoff(base=0.01, cap=0.05, floor=0.002, rng=random.Random(seed))
    return BleDevice(url, client_backend=FakeBandClient.serving(band),
                     scanner_backend=FakeScanner.seeing(band), backoff=backoff)


def run_to_end(device: BleDevice, band: FakeBand, sink: Recorder) -> None:
    device.start(sink)
    assert band.finished.wait(30), f"the band did not finish (made {band.made})"
    assert wait_for(lambda: sink.samples() == band.delivered * SAMPLES_PER_FRAME, 10)


def test_clean_stream_identifies_the_band_by_serial_number():
    band = FakeBand(serial="SIM-F042", total_frames=200)
    sink = Recorder()
    with make_device(band) as device:
        device.start(sink)
        # info is complete when start() returns: the daemon names topics after it
        assert device.info.device_id == "SIM-F042" and device.info.transport == "ble"
        assert band.finished.wait(30)
        assert wait_for(lambda: sink.samples() == 200 * SAMPLES_PER_FRAME)
        st = device.stats()
        assert device.notifications == band.notifications
        assert device.state is not None and device.state.samples_per_frame == 10
        assert device.mtu == 517 and st.battery == 100
    assert (st.link, st.gaps, st.lost_samples, st.crc_errors) == ("up", 0, 0, 0)
    assert st.samples == 2000 and sink.jumps() == []
    sink.check_counter_channel()
    assert band.streaming is False, "close() did not send STOP"


def test_dropped_notifications_are_counted_exactly():
    band = FakeBand(total_frames=300)
    band.drop = {20, 21, 22, 100, 250}  # three runs of lost frames
    sink = Recorder()
    with make_device(band) as device:
        run_to_end(device, band, sink)
        st = device.stats()
    assert st.gaps == 3 and st.lost_samples == 5 * SAMPLES_PER_FRAME
    assert sink.jumps() == [(190, 220), (990, 1000), (2490, 2500)]
    assert st.samples == (300 - 5) * SAMPLES_PER_FRAME
    assert device.notifications == band.notifications
    sink.check_counter_channel()


def test_link_loss_mid_stream_reconnects_after_backoff_and_reports_the_exact_gap():
    band = FakeBand(total_frames=400)
    band.lose_link_after, band.outage_frames, band.refuse_after_loss = 150, 37, 3
    band.drop = {300}
    links: list[str] = []
    sink = Recorder()
    device = make_device(band)
    device.link_listener = links.append
    with device:
        run_to_end(device, band, sink)
        st = device.stats()
        delays, attempts = list(device.delays), device.attempts
        assert device.link == "up"
    # lost → up, once; the same band (serial checked again) and the same sink
    assert links[:4] == ["connecting", "up", "lost", "up"] and links.count("lost") == 1
    assert st.reconnects == 1 and band.refused == 3 and band.starts == 2
    # each attempt: the last device directly, then a scan; 3 refusals → the second attempt
    assert attempts == 2
    expected = Backoff(base=0.01, cap=0.05, floor=0.002, rng=random.Random(7))
    assert delays == [expected.delay(k) for k in range(attempts)]
    assert all(0.002 <= d <= 0.05 for d in delays)
    # the gap: exactly the frames made while the link was down, and the dropped one
    assert device.last_gap_samples == 37 * SAMPLES_PER_FRAME
    assert sink.jumps() == [(1500, 1870), (2990, 3000)]
    assert st.gaps == 2 and st.lost_samples == (37 + 1) * SAMPLES_PER_FRAME
    assert st.samples == band.delivered * SAMPLES_PER_FRAME == (400 - 38) * SAMPLES_PER_FRAME
    sink.check_counter_channel()


def test_without_reconnect_the_link_stays_lost():
    band = FakeBand(total_frames=400)
    band.lose_link_after, band.outage_frames = 50, 5
    sink = Recorder()
    with make_device(band, "ble?timeout=0.3&reconnect=0") as device:
        device.start(sink)
        assert wait_for(lambda: device.link == "lost", 10)
        assert band.connects == 1 and device.attempts == 0
        assert "disconnected" in (device.stats().last_error or "")
    assert sink.samples() == 50 * SAMPLES_PER_FRAME


def test_another_band_at_the_address_is_refused_on_reconnect():
    band = FakeBand(serial="SIM-F001", total_frames=4000, pace_s=0.002)
    band.outage_frames = 2
    sink = Recorder()
    with make_device(band) as device:
        device.start(sink)
        assert wait_for(lambda: sink.samples() > 0, 10)
        band.serial = "SIM-OTHER"  # a different band now answers at that address
        band.lose_link_now.set()
        assert wait_for(lambda: device.attempts >= 3, 10)
        assert device.link == "lost" and device.info.device_id == "SIM-F001"
        band.serial = "SIM-F001"
        assert wait_for(lambda: device.link == "up", 10)
    assert device.stats().reconnects == 1


def test_a_target_picks_the_band_by_serial_name_or_address():
    a = FakeBand(serial="SIM-A", address="AA:00:00:00:00:0A", total_frames=10)
    b = FakeBand(serial="SIM-B", address="AA:00:00:00:00:0B", total_frames=10)
    for target in ("SIM-B", "emgd-band SIM-B", "aa:00:00:00:00:0b"):
        device = BleDevice(f"ble:{target}?timeout=0.3", client_backend=FakeBandClient.serving(a, b),
                           scanner_backend=FakeScanner.seeing(a, b))
        with device:
            device.start(Recorder())
            assert device.info.device_id == "SIM-B" and device.address == b.address


def test_no_band_within_the_timeout_is_device_not_found():
    band = FakeBand()
    band.advertising = False
    device = make_device(band, "ble?timeout=0.2")
    with pytest.raises(DeviceNotFound, match="emgd scan") as info:
        device.start(Recorder())
    assert "blesim" in str(info.value) and device.link == "closed"
    device.close()
    with pytest.raises(DeviceNotFound, match="no band 'SIM-NOPE'"):
        make_device(FakeBand(), "ble:SIM-NOPE?timeout=0.2").start(Recorder())


def test_find_bands_lists_name_address_rssi_and_serial():
    a = FakeBand(serial="SIM-A", address="AA:00:00:00:00:0A")
    b = FakeBand(serial="SIM-B", address="AA:00:00:00:00:0B")
    found = ble.find_bands(0.2, backend=FakeScanner.seeing(a, b))
    assert [(f.name, f.address, f.rssi, f.serial) for f in found] == [
        ("emgd-band SIM-A", a.address, -40, "SIM-A"), ("emgd-band SIM-B", b.address, -41, "SIM-B")]
    assert found[0].url == "ble:SIM-A"


def test_the_daemon_and_its_subscribers_outlive_a_link_loss(monkeypatch, endpoints):
    """The real daemon in-process, its BLE device played by a FakeBand (module defaults
    CLIENT_BACKEND/SCANNER_BACKEND): one socket and one subscriber from start to end."""
    from emgd.client import Subscriber
    from emgd.config import load_settings
    from emgd.daemon import Daemon

    band = FakeBand(serial="SIM-F0D0", total_frames=10**9, pace_s=0.005)
    band.outage_frames, band.refuse_after_loss = 50, 2
    monkeypatch.setattr(ble, "CLIENT_BACKEND", FakeBandClient.serving(band))
    monkeypatch.setattr(ble, "SCANNER_BACKEND", FakeScanner.seeing(band))
    pub, ctl = endpoints
    daemon = Daemon(load_settings(None, environ={}, overrides={
        "device": "ble?timeout=0.5", "raw": True, "pub": pub, "ctl": ctl,
        "status_interval_s": 0.2}))
    raw, links, status = [], [], None
    with Subscriber(pub, topics=["raw", "status"]) as sub:
        daemon.start()
        try:
            for event in sub.events(timeout=60):
                if event.kind == "raw":
                    raw.append(event)
                    if len(raw) == 20:
                        band.lose_link_now.set()
                elif event.kind == "status":
                    links.append(event["link"])
                    status = event
                    if "lost" in links and event["link"] == "up" and event["gaps"] == 1 \
                            and len(raw) > 40:
                        break
        finally:
            daemon.stop()
    assert "lost" in links and links[-1] == "up"
    assert [e.seq for e in raw] == list(range(raw[0].seq, raw[0].seq + len(raw))), \
        "the subscriber lost messages"
    starts = np.array([e.sample for e in raw])
    ends = starts + np.array([e["n"] for e in raw])
    jumps = [(int(e), int(s)) for e, s in zip(ends[:-1], starts[1:]) if e != s]
    assert len(jumps) == 1 and jumps[0][1] - jumps[0][0] == 50 * SAMPLES_PER_FRAME
    assert status is not None and status.device == "SIM-F0D0"
    assert status["gaps"] == 1 and status["gap_samples"] == 500
    assert status["lost_samples"] == 500 and status["device_stats"]["reconnects"] == 1
    assert band.refused == 2 and band.starts == 2
