"""The virtual serial band: a SimStream on a real pty, read by the real serial backend.

Pacing is checked by driving ``PtyBand.step(now_ns)`` with chosen clock values; the
threaded tests assert counts and values, never durations (one lower bound on a stall)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for
from emgd.drivers import discovery
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.ptyband import SETTLE_S, PtyBand
from emgd.drivers.registry import open_device
from emgd.drivers.sim import COUNTER_CHANNEL, SimConfig, counter_codes, counter_modulus
from test_serialport import Sink

from emgd import SAMPLE_RATE

WAIT_S = 30.0


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    """A private announcement registry for every test."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path / "run" / "emgd" / "bands"


class BandThread:
    """A PtyBand running in a thread; ``stop()`` ends the loop and closes the band there."""

    def __init__(self, band: PtyBand) -> None:
        self.band = band
        self.path = band.open()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self.band.run(self._stop)
        finally:
            self.band.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive()


@pytest.fixture
def bands():
    started: list[BandThread] = []

    def start(config: SimConfig, link: str | None = None) -> BandThread:
        started.append(BandThread(PtyBand(config, link)))
        return started[-1]

    yield start
    for b in started:
        b.stop()


def check_counter(sink: Sink, fmt: SampleFormat = SampleFormat.INT24) -> np.ndarray:
    idx = sink.indices()
    codes = counter_codes(sink.emg()[:, COUNTER_CHANNEL], fmt)
    assert np.array_equal(codes, idx % counter_modulus(fmt))
    return idx


def test_band_streams_to_a_reader_and_cleans_up(bands, tmp_path, runtime_dir):
    link = tmp_path / "band"
    bt = bands(SimConfig(seed=5, counter=True), str(link))
    band = bt.band
    assert bt.path == str(link) and os.readlink(link) == band.path
    [entry] = runtime_dir.glob("*.json")
    record = json.loads(entry.read_text())
    assert record["path"] == band.path and record["pid"] == os.getpid()
    assert record["url"] == f"serial:{link}" and record["serial"] == "SIM-0000"
    assert not band.reader and band.counters.samples == 0  # waits for a reader

    dev = open_device(f"serial:{link}")
    sink = Sink()
    dev.start(sink)  # waits for the first frame (timeout=5 by default)
    assert wait_for(lambda: sink.samples >= 4000, WAIT_S)
    bt.stop()  # flush, pad, drain, close: the reader gets every byte written
    assert wait_for(lambda: dev.link == "lost", WAIT_S)
    st = dev.decoder_stats()
    dev.close()
    c = band.counters
    assert c.bytes_unread == 0 and c.bytes_overflow == 0 and c.reader_connects == 1
    assert st.bytes_in == c.bytes_written
    assert st.samples == c.samples and st.lost_samples == 0 and st.crc_errors == 0
    assert np.array_equal(check_counter(sink), np.arange(c.samples))
    assert not link.exists() and not list(runtime_dir.glob("*.json"))


def test_injected_faults_are_what_the_reader_counts(bands):
    bt = bands(SimConfig(seed=9, counter=True, drop=0.03, corrupt=0.03))
    dev = open_device(f"serial:{bt.path}")
    sink = Sink()
    dev.start(sink)
    assert wait_for(lambda: dev.decoder_stats().samples >= 4000, WAIT_S)
    bt.stop()
    assert wait_for(lambda: dev.link == "lost", WAIT_S)
    st, inj = dev.decoder_stats(), bt.band.injected
    dev.close()
    assert inj.dropped and inj.corrupted and bt.band.counters.bytes_unread == 0
    assert (st.lost_samples, st.gaps) == (inj.lost_samples, inj.gaps)
    assert st.crc_errors + st.malformed == inj.rejects
    check_counter(sink)


def test_the_band_survives_its_reader_leaving_and_coming_back(bands):
    bt = bands(SimConfig(seed=1, counter=True))
    band = bt.band
    first = open_device(f"serial:{bt.path}")
    sink1 = Sink()
    first.start(sink1)
    assert wait_for(lambda: sink1.samples >= 1000, WAIT_S)
    first.close()
    assert wait_for(lambda: band.counters.bytes_unread > 20_000, WAIT_S)  # ran on, unread

    second = open_device(f"serial:{bt.path}")
    sink2 = Sink()
    second.start(sink2)
    assert wait_for(lambda: sink2.samples >= 1000, WAIT_S)
    second.close()
    assert band.counters.reader_connects == 2
    before, after = check_counter(sink1), check_counter(sink2)
    assert after[0] > before[-1] + 200  # the new reader joined the running stream later on


def test_pause_holds_bytes_then_bursts_without_loss(bands):
    bt = bands(SimConfig(seed=3, counter=True, pause=0.4, pause_every=0.5))
    dev = open_device(f"serial:{bt.path}")
    sink = Sink()
    dev.start(sink)
    assert wait_for(lambda: sink.samples >= 2400, WAIT_S)  # past the first stall
    dev.close()
    idx = check_counter(sink)
    assert np.array_equal(idx, np.arange(idx.shape[0]))
    t_recv = np.array([t for _, _, t in sink.blocks])
    assert np.diff(t_recv).max() >= 0.3e9  # a stall, then the held frames in one burst


@pytest.mark.parametrize("ppm", [0.0, 10_000.0, -2_500.0])
def test_pacing_follows_the_clock_with_drift(ppm):
    band = PtyBand(SimConfig(seed=0, drift_ppm=ppm, frame=10), announce=False)
    path = band.open()
    reader = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        t = 10**12
        band.step(t)  # sees the reader
        assert band.reader and band.counters.samples == 0
        t0 = t + int(SETTLE_S * 1e9)
        band.step(t0)  # clock starts
        for seconds in (0.5, 1.0, 3.0):
            band.step(t0 + int(seconds * 1e9))
            due = int(SAMPLE_RATE * (1 + ppm * 1e-6) * seconds)
            assert band.counters.samples == due - due % 10
            while os.read(reader, 65536) if _readable(reader) else b"":
                pass
    finally:
        os.close(reader)
        band.close()


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_no_reader_no_stream():
    band = PtyBand(SimConfig(), announce=False)
    band.open()
    try:
        for k in range(5):
            band.step(10**12 + k * 10**9)
        assert not band.reader and band.counters.samples == 0
        assert band.counters.bytes_written == band.counters.bytes_unread == 0
    finally:
        band.close()
        band.close()


def test_link_refuses_to_replace_a_regular_file(tmp_path, runtime_dir):
    from emgd.errors import ConfigError

    target = tmp_path / "file"
    target.write_text("keep me")
    band = PtyBand(SimConfig(), str(target))
    with pytest.raises(ConfigError, match="not a symlink"):
        band.open()
    assert target.read_text() == "keep me" and not list(runtime_dir.glob("*.json"))


# --------------------------------------------------------------------------- the command


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "emgd", "sim", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_prints_the_path_and_cleans_up_on_a_signal(tmp_path, runtime_dir, sig):
    link = tmp_path / "band"
    proc = start_cli("--pty", "--link", str(link), "--seed", "4", "--serial", "SIM-0042")
    try:
        assert proc.stdout.readline().strip() == str(link)
        assert proc.stdout.readline().strip() == f"emgd --device serial:{link}"
        assert link.is_symlink() and Path(os.readlink(link)).is_char_device()
        [entry] = runtime_dir.glob("SIM-0042.*.json")
        assert json.loads(entry.read_text())["pid"] == proc.pid
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["event"] == "stopped" and summary["serial"] == "SIM-0042"
    assert summary["injected"]["frames"] == 0  # no reader: the band never started
    assert not link.exists() and not entry.exists()


@pytest.mark.parametrize("args, fragment", [
    ([], "needs --pty"),
    (["--pty", "--drop", "2"], "bad value 2.0 for --drop"),
    (["--pty", "--format", "int32"], "invalid choice"),
])
def test_cli_usage_errors_exit_2(args, fragment):
    proc = start_cli(*args)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 2 and fragment in err


def test_announcement_is_listed_by_discovery_while_the_band_runs(bands, tmp_path):
    bands(SimConfig(serial="SIM-0007"), str(tmp_path / "band"))
    found = discovery.announced_bands()
    assert [f.url for f in found] == [f"serial:{tmp_path / 'band'}"]
    assert "SIM-0007" in found[0].description
