"""The recorder: every sample, mode 0600, markers/events, SIGKILL and disk-full behaviour."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from emgd.clock import ClockMap
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.sim import COUNTER_CHANNEL, SimDevice, counter_codes, counter_modulus
from emgd.events import EventPacker
from emgd.recorder import DATA_DTYPE, Recorder, RecordingError
from emgd.ringbuffer import RingBuffer

N60 = 120_000  # 60 s at 2 kHz


def record_sim(path, n=N60, **kwargs):
    """Record ``n`` samples of the unpaced simulated band with the counter channel."""
    ring = RingBuffer(capacity=1 << 17)
    dev = SimDevice(f"sim?paced=0&limit={n}&counter=1")
    rec = Recorder(path, ring, ClockMap(), lambda: dev.info, **kwargs)
    rec.start()
    with dev:
        dev.start(ring)
        assert dev.wait(60)
    rec.stop()
    return rec, ring


def assert_counter_continuous(data, rows):
    index = data["sample_index"]
    assert np.array_equal(index, np.arange(rows))
    codes = counter_codes(data["emg"][:, COUNTER_CHANNEL], SampleFormat.INT24)
    assert np.array_equal(codes, index % counter_modulus(SampleFormat.INT24))


def test_sixty_seconds_every_sample_monotonic_time_mode_0600(tmp_path):
    path = tmp_path / "session.h5"
    rec, ring = record_sim(path)
    assert rec.error is None and rec.lost == 0 and rec.gaps == 0
    assert ring.written == N60 and rec.samples == N60
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert data.dtype == DATA_DTYPE and data.shape == (N60,)
        rows = data[()]
        assert_counter_continuous(rows, N60)
        assert np.all(np.diff(rows["time"]) >= 0)
        assert abs(np.median(np.diff(rows["time"])) - 1 / 2000) < 1e-6
        assert data.attrs["task"] == "free" and data.attrs["emg_units"] == "uV"
        a = f.attrs
        assert a["format"] == "emgd-recording" and a["device_id"] == "SIM-0000"
        assert bool(a["simulated"]) and a["transport"] == "sim" and a["scale_uv"] == 2.0**-4
        assert a["samples"] == N60 and bool(a["closed_cleanly"])
        assert a["start_time"] == rows["time"][0]
        # the reference's reader: fields by name, (N, 16) float32
        assert f["data"]["emg"].shape == (N60, 16) and f["data"]["emg"].dtype == np.float32


def test_recorded_samples_are_the_ring_contents(tmp_path):
    ring = RingBuffer(capacity=1 << 16)
    rng = np.random.default_rng(7)
    block = rng.normal(0, 50, (37, 16)).astype(np.float32)
    rec = Recorder(tmp_path / "r.h5", ring, ClockMap(), _info())
    rec.start()
    sent = []
    for k in range(300):  # a gap of 5 samples after block 100
        first = k * 37 + (5 if k > 100 else 0)
        ring.write(block + k, first, 0)
        sent.append((block + k, first))
    rec.stop()
    with h5py.File(tmp_path / "r.h5") as f:
        rows = f["data"][()]
    assert np.array_equal(rows["emg"], np.concatenate([b for b, _ in sent]))
    assert np.array_equal(rows["sample_index"],
                          np.concatenate([np.arange(s, s + 37) for _, s in sent]))
    assert rec.gaps == 1


def test_existing_file_is_refused_and_overwrite_makes_it_0600(tmp_path):
    path = tmp_path / "x.h5"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    ring = RingBuffer(capacity=1024)
    with pytest.raises(RecordingError, match="exists"):
        Recorder(path, ring, ClockMap(), _info()).start()
    rec = Recorder(path, ring, ClockMap(), _info(), overwrite=True)
    rec.start()
    rec.stop()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    link = tmp_path / "link.h5"
    link.symlink_to(tmp_path / "elsewhere.h5")
    with pytest.raises(RecordingError):
        Recorder(link, ring, ClockMap(), _info(), overwrite=True).start()
    assert not (tmp_path / "elsewhere.h5").exists()


def test_events_and_markers_are_stored(tmp_path):
    ring = RingBuffer(capacity=4096)
    clock = ClockMap()
    rec = Recorder(tmp_path / "e.h5", ring, clock, _info())
    rec.start()
    ring.write(np.zeros((100, 16), np.float32), 0, 0)
    packer = EventPacker()
    payloads = []
    for k in range(5):
        p = packer.pack((k, "SIM-0000", 10 * k, 1.7e9 + k, 1, 2, True), {"name": "thumb_up"})
        payloads.append(p)
        rec.add_event(b"gesture/SIM-0000", p)
    rec.add_event("raw/SIM-0000", packer.pack((0, "SIM-0000", 0, 0.0, 1, 2, True), {}))
    rec.add_event(b"odd/x", b"\xc1not msgpack")
    rec.add_marker("start of block", sample=42)
    rec.stop()
    with h5py.File(tmp_path / "e.h5") as f:
        ev = f["events"][()]
        mk = f["markers"][()]
    assert [t.decode() for t in ev["topic"]] == ["gesture/SIM-0000"] * 5 + ["odd/x"]
    assert [bytes(p) for p in ev["payload"][:5]] == payloads
    assert list(ev["sample"]) == [0, 10, 20, 30, 40, -1]
    assert list(ev["t"][:5]) == [1.7e9 + k for k in range(5)] and np.isnan(ev["t"][5])
    assert mk["sample"].tolist() == [42] and mk["text"][0].decode() == "start of block"
    assert abs(mk["time"][0] - clock.unix_time(42)) < 1e-6


def test_write_error_ends_the_recording_only(tmp_path, monkeypatch):
    """The failure path with an injected ENOSPC (the real disk-full test is below)."""
    ring = RingBuffer(capacity=1 << 16)
    rec = Recorder(tmp_path / "f.h5", ring, ClockMap(), _info())
    calls = []

    def failing_append(self, f, final):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Recorder, "_append", failing_append)
    rec.start()
    ring.write(np.zeros((4000, 16), np.float32), 0, 0)
    rec._thread.join(5)
    assert not rec.running and "No space left" in rec.error
    ring.write(np.zeros((4000, 16), np.float32), 4000, 0)  # the writer is unaffected
    rec.add_event(b"gesture/x", b"\x80")
    assert rec.dropped == 1
    rec.stop()
    assert ring.written == 8000 and calls


DISK_FULL_SCRIPT = textwrap.dedent("""
    import json, sys, h5py, numpy as np
    from emgd.clock import ClockMap
    from emgd.drivers.sim import SimDevice
    from emgd.recorder import Recorder
    from emgd.ringbuffer import RingBuffer
    ring = RingBuffer(capacity=1 << 17)
    dev = SimDevice("sim?paced=0&limit=120000&counter=1")
    other = ring.reader()  # the pipeline's reader stands in for "the daemon keeps decoding"
    rec = Recorder(sys.argv[1], ring, ClockMap(), lambda: dev.info)
    rec.start()
    dev.start(ring)
    dev.wait(60)
    rec._thread.join(30)
    error, running = rec.error, rec.running
    rec.stop()
    got = other.read_new(1 << 17)[3]
    with h5py.File(sys.argv[1], "r") as f:
        rows = f["data"]["sample_index"]
        contiguous = bool(np.array_equal(rows, np.arange(len(rows))))
        stored_error = str(f.attrs.get("error", ""))
    print(json.dumps({"error": error, "running": running, "written": ring.written,
                      "other": got.n, "samples": rec.samples, "rows": len(rows),
                      "contiguous": contiguous, "stored_error": stored_error}))
""")


def test_disk_full_stops_the_recording_not_the_stream(tmp_path):
    """A real full disk: a 6 MB tmpfs (the 60 s recording needs 9.6 MB), mounted in a
    private mount namespace. The file must be closed properly and hold what was written."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    cmd = (f"mount -t tmpfs -o size=6m tmpfs {mnt} && "
           f"{sys.executable} -c {_quote(DISK_FULL_SCRIPT)} {mnt}/full.h5")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] and result["error"].startswith("DiskFull")
    assert result["stored_error"] == result["error"]
    assert result["running"] is False
    assert result["written"] == 120_000 and result["other"] == 120_000
    assert 0 < result["rows"] == result["samples"] < 120_000 and result["contiguous"]


SIGKILL_SCRIPT = textwrap.dedent("""
    import sys
    from emgd.clock import ClockMap
    from emgd.drivers.sim import SimDevice
    from emgd.recorder import Recorder
    from emgd.ringbuffer import RingBuffer
    ring = RingBuffer(capacity=1 << 16)
    dev = SimDevice("sim?paced=1&counter=1")
    rec = Recorder(sys.argv[1], ring, ClockMap(), lambda: dev.info)
    rec.start()
    dev.start(ring)
    while True:  # the samples the band has put into the ring so far, every 20 ms
        print(ring.written, flush=True)
        dev.wait(0.02)
""")


def test_sigkill_leaves_a_readable_file_missing_at_most_one_second(tmp_path):
    """Define "produced" as the last ring count the child printed before it died (it prints
    every 20 ms, so at most ~40 samples more were produced): the file must hold every
    sample up to that count minus 2000 (1 s), with no hole before its end."""
    path = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-c", SIGKILL_SCRIPT, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        for line in proc.stdout:  # ~3 s of paced streaming
            seen = int(line)
            if seen >= 6000:
                break
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read().split()
        produced = int(rest[-1]) if rest else seen
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    with h5py.File(path, "r") as f:  # plain open, as the reference code does
        rows = f["data"][()]
        assert not bool(f.attrs["closed_cleanly"])
    n = rows.shape[0]
    assert produced - 2000 <= n <= produced + 200, (n, produced)
    assert_counter_continuous(rows, n)
    assert np.all(np.diff(rows["time"]) >= 0)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _info():
    from emgd.drivers.base import DeviceInfo
    return DeviceInfo(device_id="TEST-1", name="test", transport="test", url="test",
                      simulated=True, scale_uv=None, firmware="")
