"""End to end, in real processes: `emgd sim --pty` in one, `emgd --device serial:PTY` in
another, observed through emgd.client — exactly as a person would run them.

- a clean link for 10 s of samples: the counter channel is continuous, nothing is lost;
- a faulty link (seeded drops and corruption): after the band stops, the daemon's last
  status reports exactly the losses and rejected frames the band says it injected;
- `--device auto` (the default): no band → the simulated band, loudly, in every event;
  a virtual band announced → that band, `simulated: false`;
- error paths at start: missing, busy and silent ports; an unknown URL option.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.sim import COUNTER_CHANNEL, counter_codes, counter_modulus

from emgd.client import Subscriber

WAIT_S = 60.0


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A private band registry and no system bus, for both processes."""
    return {"XDG_RUNTIME_DIR": str(tmp_path / "run"),
            "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}


class Band:
    """`python -m emgd sim --pty ...` in a subprocess."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "emgd", "sim", "--pty", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **env})
        self.path = self.proc.stdout.readline().strip()
        command = self.proc.stdout.readline().strip()
        assert command == f"emgd --device serial:{self.path}", self.proc.stderr.read()

    def stop(self) -> dict:
        """SIGTERM; the band drains its reader and prints its summary."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=WAIT_S)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def band(env):
    started: list[Band] = []

    def start(*args: str) -> Band:
        started.append(Band(list(args), env))
        return started[-1]

    yield start
    for b in started:
        if b.proc.poll() is None:
            b.proc.kill()
            b.proc.communicate()


def collect(sub: Subscriber, want_samples: int, key: str = "raw"):
    raws, statuses, total = [], [], 0
    for event in sub.events(timeout=WAIT_S):
        if event.kind == "status":
            statuses.append(event)
            if key == "status" and event["samples"] >= want_samples:
                break
        elif event.kind == "raw":
            raws.append(event)
            total += event["n"]
            if total >= want_samples and statuses:
                break
    return raws, statuses


def test_clean_link_10_s_no_sample_lost(band, run_daemon, endpoints, env, tmp_path):
    b = band("--link", str(tmp_path / "band"), "--counter", "--serial", "SIM-0042")
    pub, ctl = endpoints
    with Subscriber(pub, topics=["raw", "status"]) as sub:
        daemon = run_daemon("--device", f"serial:{b.path}", "--raw", "--pub", pub,
                            "--ctl", ctl, "--log-level", "info", env=env)
        raws, statuses = collect(sub, 20_000)
        rc, _, err = daemon.terminate()
    assert rc == 0, err
    summary = b.stop()

    assert sum(r["n"] for r in raws) >= 20_000
    for topic in {r.topic for r in raws}:  # seq counts per topic (the device id may
        seqs = [r.seq for r in raws if r.topic == topic]  # change once the band says it)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "raw messages were dropped"
    assert raws[-1].topic == "raw/SIM-0042"
    data = np.concatenate([r.array() for r in raws])
    index = np.concatenate([r.sample + np.arange(r["n"]) for r in raws])
    assert np.array_equal(np.diff(index), np.ones(len(index) - 1)), "sample index jumps"
    assert np.array_equal(counter_codes(data[:, COUNTER_CHANNEL], SampleFormat.INT24),
                          index % counter_modulus(SampleFormat.INT24))
    last = statuses[-1]
    assert last["link"] == "up" and last["lost_samples"] == 0 and last["crc_errors"] == 0
    assert last["device_stats"]["malformed"] == 0 and last["gaps"] == 0
    assert last.simulated is False and not any(r.simulated for r in raws)
    assert last.device == "SIM-0042"
    assert summary["injected"]["dropped"] == summary["injected"]["corrupted"] == 0
    assert "it is emgd's virtual band" in err  # the daemon says what it is reading


def test_injected_drops_and_corruption_are_reported_exactly(band, run_daemon, endpoints, env):
    b = band("--counter", "--seed", "7", "--drop", "0.01", "--corrupt", "0.01")
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        daemon = run_daemon("--device", f"serial:{b.path}", "--pub", pub, "--ctl", ctl,
                            "--log-level", "info", env=env)
        _, statuses = collect(sub, 10_000, key="status")
        assert statuses and statuses[-1]["samples"] >= 10_000
        summary = b.stop()  # stops making frames, drains the pty into the daemon, exits
        final = None
        for event in sub.events(timeout=WAIT_S):  # the first status after the link is gone
            if event.kind == "status" and event["link"] == "lost":
                final = event
                break
        rc, _, err = daemon.terminate()
    assert rc == 0, err
    assert final is not None, "no status reported the lost link"
    inj = summary["injected"]
    assert inj["dropped"] > 0 and inj["corrupted"] > 0
    assert summary["bytes_unread"] == 0 and summary["bytes_overflow"] == 0
    dev = final["device_stats"]
    assert final["lost_samples"] == inj["lost_samples"]
    assert dev["gaps"] == inj["gaps"]
    assert final["crc_errors"] + dev["malformed"] == inj["rejects"]
    assert final["gap_samples"] == inj["lost_samples"]  # the pipeline saw the same holes


def test_auto_without_a_band_runs_simulated_and_says_so(run_daemon, endpoints, env):
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        daemon = run_daemon("--pub", pub, "--ctl", ctl, "--log-level", "info", env=env)
        events = list(sub.events(timeout=WAIT_S, count=2))
        rc, _, err = daemon.terminate()
    assert rc == 0, err
    assert len(events) == 2 and all(e.simulated is True for e in events)
    assert "running on the SIMULATED band" in err and "no band found" in err


def test_auto_picks_an_announced_virtual_band(band, run_daemon, endpoints, env, tmp_path):
    b = band("--link", str(tmp_path / "band"), "--serial", "SIM-0099")
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        daemon = run_daemon("--device", "auto", "--pub", pub, "--ctl", ctl,
                            "--log-level", "info", env=env)
        events = [e for e in sub.events(timeout=WAIT_S, count=3)]
        rc, _, err = daemon.terminate()
    b.stop()
    assert rc == 0, err
    assert events and all(e.simulated is False for e in events)
    assert events[-1].device == "SIM-0099"
    assert f"serial:{tmp_path / 'band'}" in err and "SIMULATED" not in err


def test_daemon_survives_the_port_going_away_and_coming_back(band, run_daemon, endpoints,
                                                             env, tmp_path):
    link = str(tmp_path / "band")
    first = band("--link", link, "--serial", "SIM-0001")
    pub, ctl = endpoints

    def wait_status(sub: Subscriber, predicate):
        for event in sub.events(timeout=WAIT_S):
            if event.kind == "status" and predicate(event):
                return event
        raise AssertionError("no such status arrived")

    with Subscriber(pub, topics=["status"]) as sub:
        daemon = run_daemon("--device", f"serial:{link}", "--pub", pub, "--ctl", ctl,
                            "--log-level", "info", env=env)
        wait_status(sub, lambda e: e["samples"] >= 2000)
        first.stop()  # unplugged: the pty and its link disappear
        lost = wait_status(sub, lambda e: e["link"] == "lost")
        band("--link", link, "--serial", "SIM-0001")  # plugged in again (a new tty)
        back = wait_status(sub, lambda e: e["link"] == "up" and e["samples"] > lost["samples"])
        rc, _, err = daemon.terminate()
    assert rc == 0, err
    assert back["device_stats"]["reconnects"] == 1
    assert back["device_stats"]["counter_resets"] == 1  # the new band counts from 0 again
    assert "link lost" in err and "reconnecting" in err


# --------------------------------------------------------------------------- errors


def test_missing_port_exits_1(run_daemon, tmp_path):
    rc, _, err = run_daemon("--device", f"serial:{tmp_path}/ttyACM0").wait()
    assert rc == 1 and f"no such port {tmp_path}/ttyACM0" in err and "emgd sim --pty" in err


def test_busy_port_exits_1_and_names_the_holder(band, run_daemon, endpoints, env):
    b = band()
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        first = run_daemon("--device", f"serial:{b.path}", "--pub", pub, "--ctl", ctl, env=env)
        assert sub.recv(timeout=WAIT_S) is not None
        rc, _, err = run_daemon("--device", f"serial:{b.path}", env=env).wait(WAIT_S)
        assert rc == 1 and f"in use by pid {first.proc.pid}" in err
        assert first.terminate()[0] == 0


def test_silent_port_exits_1_after_the_timeout(run_daemon):
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        rc, _, err = run_daemon("--device", f"serial:{path}?timeout=0.5").wait(WAIT_S)
    finally:
        os.close(slave)
        os.close(master)
    assert rc == 1 and f"no band answered on {path} within 0.5 s" in err


def test_unknown_url_option_exits_2_with_the_grammar(run_daemon):
    rc, _, err = run_daemon("--device", "serial:/dev/ttyACM0?speed=9600").wait()
    assert rc == 2 and "unknown option 'speed'" in err
    assert "reconnect=BOOL" in err and "timeout=FLOAT" in err
