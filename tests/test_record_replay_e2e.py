"""Record and replay through the daemon (`python -m emgd ... --record FILE`, `replay:FILE`).

Activates once emgd/daemon.py sets ``RECORDING = True`` (the daemon wires the recorder and
the replay time base). Ring: 30 s by default, so unpaced runs stay below 60,000 samples.
"""

from __future__ import annotations

import os
import subprocess
import sys
import stat

import h5py
import numpy as np
import pytest

import emgd.daemon
from emgd.client import Subscriber
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.sim import COUNTER_CHANNEL, counter_codes, counter_modulus
from emgd.events import unpack_event

pytestmark = pytest.mark.skipif(not hasattr(emgd.daemon, "RECORDING"),
                                reason="daemon not wired for recording yet")

N = 120_000  # 60 s: more than the 30 s ring, so flow control and the recorder are exercised
TIMING = ("t_recv_ns", "t_pub_ns")


def wait_until_processed(sub, n, timeout=60.0):
    """Status messages until the pipeline has processed ``n`` samples; returns the last."""
    last = None
    for event in sub.events(timeout=timeout):
        if event.kind == "status":
            last = event
            if event["samples"] >= n:
                return event
    raise AssertionError(f"pipeline did not reach {n} samples; last status: {last}")


def stored_events(path):
    """The recording's events, status excluded (its rates and latencies are host facts),
    as comparable tuples."""
    out = []
    with h5py.File(path, "r") as f:
        for row in f["events"][()]:
            ev = unpack_event(row["topic"], bytes(row["payload"]))
            if ev.kind == "status":
                continue
            fields = {k: v for k, v in ev.fields.items() if k not in TIMING}
            out.append((ev.topic, ev.sample, ev.t, ev.simulated, sorted(fields.items())))
    return out


def assert_same_events(got, want):
    """Same topics, samples and discrete fields (gesture names, keys, text); floats equal to
    float32 precision and times to 2 µs. Decoder outputs are not bit-identical when the
    samples arrive in other chunkings (ONNX Runtime batches a different number of hops per
    call: differences ~1e-8), and the live clock's Unix times differ from the recorded time
    column by rounding (~0.3 µs)."""
    # per topic in publication order (topics interleave differently with other chunkings)
    got = sorted(got, key=lambda e: e[0])
    want = sorted(want, key=lambda e: e[0])
    assert len(got) == len(want)
    for (topic, sample, t, sim, fields), (topic2, sample2, t2, sim2, fields2) in zip(got, want):
        assert (topic, sample, sim) == (topic2, sample2, sim2)
        assert t == pytest.approx(t2, abs=2e-6)
        assert [k for k, _ in fields] == [k for k, _ in fields2]
        for (key, value), (_, value2) in zip(fields, fields2):
            if isinstance(value, float):
                assert value == pytest.approx(value2, rel=1e-5, abs=1e-6), (topic, sample, key)
            else:
                assert value == value2, (topic, sample, key)


def record(run_daemon, endpoints, path, device, extra=()):
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        daemon = run_daemon("--device", device, "--record", str(path), "--pub", pub,
                            "--ctl", ctl, *extra)
        wait_until_processed(sub, N)
        rc, _, err = daemon.terminate()
    assert rc == 0, err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Small random-weight models (needs the convert extra), or 'none' without torch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "none"
    out = tmp_path_factory.mktemp("models")
    built = subprocess.run([sys.executable, "-m", "emgd", "models", "build-random", "--size",
                            "small", "--seed", "4", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    return str(out)


@pytest.fixture
def recording(run_daemon, endpoints, tmp_path, models):
    path = tmp_path / "session.h5"
    record(run_daemon, endpoints, path, f"sim?paced=0&limit={N}&counter=1",
           ("--models", models))
    return path


def test_record_flag_writes_every_sample_mode_0600(recording):
    assert stat.S_IMODE(os.stat(recording).st_mode) == 0o600
    with h5py.File(recording, "r") as f:
        rows = f["data"][()]
        assert bool(f.attrs["closed_cleanly"]) and f.attrs["device_id"] == "SIM-0000"
    assert rows.shape == (N,)
    assert np.array_equal(rows["sample_index"], np.arange(N))
    codes = counter_codes(rows["emg"][:, COUNTER_CHANNEL], SampleFormat.INT24)
    assert np.array_equal(codes, rows["sample_index"] % counter_modulus(SampleFormat.INT24))
    assert np.all(np.diff(rows["time"]) >= 0)


def test_replay_unpaced_gives_identical_samples_and_events(recording, run_daemon, endpoints,
                                                           tmp_path, models):
    pub, ctl = endpoints  # free again: the recording daemon has exited
    again = tmp_path / "again.h5"
    with Subscriber(pub, topics=["status"]) as sub:
        daemon = run_daemon("--device", f"replay:{recording}?speed=0", "--record", str(again),
                            "--pub", pub, "--ctl", ctl, "--models", models)
        wait_until_processed(sub, N)
        rc, _, err = daemon.terminate()
    assert rc == 0, err
    with h5py.File(recording, "r") as f1, h5py.File(again, "r") as f2:
        a, b = f1["data"][()], f2["data"][()]
        assert bool(f2.attrs["simulated"]) and f2.attrs["device_id"] == "SIM-0000"
    assert np.array_equal(a["emg"], b["emg"])
    assert np.array_equal(a["sample_index"], b["sample_index"])
    assert np.array_equal(a["time"], b["time"])  # the replay kept the recording's time base
    events = stored_events(recording)
    if models != "none":  # the decoders published: wrist alone gives 50 events per second
        assert sum(1 for e in events if e[0].startswith("wrist/")) >= (N - 254) // 40
    assert_same_events(stored_events(again), events)


def test_replay_publishes_the_recordings_samples_and_times(recording, run_daemon, endpoints):
    """Paced fast enough to finish quickly, slow enough for a subscriber to see it."""
    pub, ctl = endpoints
    with h5py.File(recording, "r") as f:
        a = f["data"][()]
    with Subscriber(pub, topics=["raw", "status"]) as sub:
        daemon = run_daemon("--device", f"replay:{recording}?speed=10", "--raw",
                            "--pub", pub, "--ctl", ctl)
        raw = []
        for event in sub.events(timeout=60):
            if event.kind == "raw":
                raw.append(event)
            elif event.kind == "status" and event["samples"] >= N:
                break
        rc, _, err = daemon.terminate()
    assert rc == 0, err
    assert raw, "no raw event arrived"
    for event in raw:  # what the replay published: the recording's samples and times
        k = event.sample
        assert event.t == a["time"][k] and event.simulated
        assert np.array_equal(event.array().reshape(-1, 16), a["emg"][k:k + event["n"]])


def test_a_file_in_the_public_layout_replays_through_the_daemon(run_daemon, endpoints,
                                                                tmp_path):
    from test_replay import write_public_file

    path = tmp_path / "discrete_gestures_user_002_dataset_000.hdf5"
    rows, _ = write_public_file(path, n=20_000)
    pub, ctl = endpoints
    with Subscriber(pub, topics=["raw", "status"]) as sub:
        daemon = run_daemon("--device", f"replay:{path}?speed=0", "--raw", "--pub", pub,
                            "--ctl", ctl)
        raw, status = [], None
        for event in sub.events(timeout=60):
            if event.kind == "raw":
                raw.append(event)
            elif event.kind == "status" and event["samples"] >= len(rows):
                status = event
                break
        rc, _, err = daemon.terminate()
    assert rc == 0, err
    assert status is not None and status.simulated is False
    assert status.device == "discrete_gestures_user_002_dataset_000"
    for event in raw:
        assert event.t == rows["time"][event.sample]


def test_sigterm_keeps_every_sample_received(run_daemon, endpoints, tmp_path):
    path = tmp_path / "paced.h5"
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        daemon = run_daemon("--device", "sim?counter=1", "--record", str(path), "--pub", pub,
                            "--ctl", ctl)
        wait_until_processed(sub, 4000)
        rc, _, err = daemon.terminate()
        final = None
        for event in sub.events(timeout=5):
            if event.kind == "status" and event["state"] == "stopping":
                final = event
                break
    assert rc == 0, err
    with h5py.File(path, "r") as f:
        rows = f["data"][()]
    assert np.array_equal(rows["sample_index"], np.arange(len(rows)))
    if final is not None:  # the pipeline's count after draining the ring
        assert len(rows) == final["samples"]
    assert len(rows) >= 4000
