"""sd_notify against a real AF_UNIX datagram socket, as systemd would receive it.

The receiver is bound either to a path or in the abstract namespace (``@name``), exactly
the two forms systemd puts in ``NOTIFY_SOCKET``. No mock of the socket layer anywhere.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from emgd.sdnotify import Notifier, ProgressWatchdog, format_status

RECV_TIMEOUT_S = 5.0


class Receiver:
    """The systemd side: a bound AF_UNIX/SOCK_DGRAM socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        target = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.sock.bind(target)

    def recv(self, timeout: float = RECV_TIMEOUT_S) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        """Everything already delivered (AF_UNIX datagrams arrive within sendto)."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request, tmp_path):
    if request.param == "path":
        rx = Receiver(str(tmp_path / "notify.sock"))
    else:
        rx = Receiver(f"@emgd-test-{uuid.uuid4().hex}")
    yield rx
    rx.close()


def env_for(rx: Receiver, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": rx.address, **extra}


# --------------------------------------------------------------------------- Notifier


def test_without_notify_socket_everything_is_a_noop():
    n = Notifier.from_env({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert n.status("x") is False and n.reloading() is False
    assert (n.sent, n.failures) == (0, 0)
    n.close()


def test_messages_arrive(receiver):
    n = Notifier.from_env(env_for(receiver))
    assert n.enabled
    assert n.ready()
    assert receiver.recv() == "READY=1"
    assert n.status("running rate=2000.0/s")
    assert receiver.recv() == "STATUS=running rate=2000.0/s"
    assert n.watchdog()
    assert receiver.recv() == "WATCHDOG=1"
    assert n.extend_timeout(2.5)
    assert receiver.recv() == "EXTEND_TIMEOUT_USEC=2500000"
    before = time.monotonic_ns() // 1000
    assert n.reloading()
    key, mono = receiver.recv().split("\n")
    assert key == "RELOADING=1"
    assert mono.startswith("MONOTONIC_USEC=") and int(mono.split("=")[1]) >= before
    assert n.stopping(status="stopping: SIGTERM")
    assert receiver.recv() == "STOPPING=1\nSTATUS=stopping: SIGTERM"
    assert (n.sent, n.failures) == (6, 0)
    n.close()
    n.close()


def test_ready_with_status_is_one_datagram(receiver):
    n = Notifier.from_env(env_for(receiver))
    n.ready(status="running\nrate=1999.9/s")
    assert receiver.recv() == "READY=1\nSTATUS=running rate=1999.9/s"
    n.close()


def test_repeated_status_is_sent_once(receiver):
    n = Notifier.from_env(env_for(receiver))
    n.status("a")
    n.status("a")
    n.status("b")
    assert receiver.pending() == ["STATUS=a", "STATUS=b"]
    n.close()


def test_send_failure_is_counted_not_raised(tmp_path):
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert n.ready() is False
    assert n.watchdog() is False
    assert (n.sent, n.failures) == (0, 2)
    n.close()


def test_receiver_gone_after_start(tmp_path):
    rx = Receiver(str(tmp_path / "notify.sock"))
    n = Notifier(rx.address)
    assert n.ready() and rx.recv() == "READY=1"
    rx.close()
    os.unlink(rx.address)
    assert n.watchdog() is False and n.failures == 1
    n.close()


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "500000"}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({}, None),
])
def test_watchdog_interval_from_env(receiver, env, expected):
    n = Notifier.from_env(env_for(receiver, **env))
    assert n.watchdog_interval_s == expected


def test_unsupported_address_disables():
    n = Notifier("vsock:2:1234")
    assert not n.enabled and n.ready() is False and n.failures == 0


# --------------------------------------------------------------------------- watchdog


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


def test_pings_only_when_progress_was_made(receiver):
    n = Notifier.from_env(env_for(receiver, WATCHDOG_USEC="1000000"))
    counter, t = Counter(), [100.0]
    wd = ProgressWatchdog(n, counter, clock=lambda: t[0])
    assert wd.enabled and wd.interval_s == 0.5  # half of systemd's interval

    assert wd.tick(100.6) is False  # due, but no progress since construction
    assert receiver.pending() == []
    counter.value = 3
    assert wd.tick(100.7) is True  # progress: ping at once
    assert receiver.pending() == ["WATCHDOG=1"]
    counter.value = 4
    assert wd.tick(100.9) is False  # progress, but not due yet (next at 101.2)
    assert wd.tick(101.2) is True
    assert receiver.pending() == ["WATCHDOG=1"]

    # the pipeline stalls: no ping, however often and however late we ask
    for now in (101.7, 101.8, 102.5, 105.0, 200.0):
        assert wd.tick(now) is False
    assert receiver.pending() == []
    assert wd.stalls == 1 + 5 and wd.pings == 2  # the first due tick stalled too
    counter.value = 5  # it resumes: acknowledged at the next tick
    assert wd.tick(200.01) is True
    assert receiver.pending() == ["WATCHDOG=1"]
    n.close()


def test_counter_that_changes_in_any_way_counts_as_progress(receiver):
    n = Notifier.from_env(env_for(receiver, WATCHDOG_USEC="1000000"))
    counter = Counter()
    wd = ProgressWatchdog(n, counter, clock=lambda: 0.0)
    counter.value = -1  # a restarted pipeline's counter: still a change
    assert wd.tick(1.0) is True
    n.close()


def test_no_progress_expected_still_pings(receiver):
    n = Notifier.from_env(env_for(receiver, WATCHDOG_USEC="1000000"))
    link_up = [False]
    wd = ProgressWatchdog(n, Counter(), expected=lambda: link_up[0], clock=lambda: 0.0)
    assert wd.tick(0.5) is True  # reconnecting: no samples, yet the loop is alive
    link_up[0] = True
    assert wd.tick(1.0) is False  # link up again but no progress: withheld
    assert receiver.pending() == ["WATCHDOG=1"]
    n.close()


def test_watchdog_disabled_without_interval(receiver):
    n = Notifier.from_env(env_for(receiver))  # no WATCHDOG_USEC
    counter = Counter()
    wd = ProgressWatchdog(n, counter)
    counter.value = 1
    assert not wd.enabled and wd.tick(1e9) is False
    asyncio.run(asyncio.wait_for(wd.run(asyncio.Event()), timeout=RECV_TIMEOUT_S))
    assert receiver.pending() == []
    n.close()


def test_explicit_interval_overrides_systemds_half(receiver):
    n = Notifier.from_env(env_for(receiver, WATCHDOG_USEC="1000000"))
    wd = ProgressWatchdog(n, Counter(), interval_s=0.1)
    assert wd.interval_s == 0.1
    n.close()


def test_run_on_the_event_loop_pings_while_progressing_then_stops(receiver):
    n = Notifier.from_env(env_for(receiver, WATCHDOG_USEC="40000"))  # ping due every 20 ms
    counter = Counter()
    wd = ProgressWatchdog(n, counter)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(wd.run(stop))
        # progressing: pings arrive
        while wd.pings < 3:
            counter.value += 1
            await asyncio.sleep(0.005)
        # stalled: once a due check has found no progress, no ping can follow
        stalls = wd.stalls
        while wd.stalls == stalls:
            await asyncio.sleep(0.005)
        receiver.pending()
        pings, stalls = wd.pings, wd.stalls
        while wd.stalls < stalls + 5:  # the loop looked five more times...
            await asyncio.sleep(0.005)
        assert wd.pings == pings  # ...and sent nothing
        assert receiver.pending() == []
        counter.value += 1  # resumed
        while wd.pings == pings:
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(task, timeout=RECV_TIMEOUT_S)

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert receiver.pending() == ["WATCHDOG=1"]
    n.close()


# --------------------------------------------------------------------------- STATUS text


def test_format_status():
    fields = {"state": "running", "link": "up", "rate_hz": 1999.84, "lost_samples": 0,
              "gaps": 2, "latency": {"p50_us": 210.4, "p99_us": 480.6}}
    assert format_status(fields) == ("running link=up rate=1999.8/s lost=0 gaps=2 "
                                     "p50=210µs p99=481µs")
    assert format_status({"state": "running", "rate_hz": 0.0,
                          "latency": {"p50_us": None, "p99_us": None}}) == \
        "running rate=0.0/s p50=- p99=-"
    assert format_status({}) == "starting"


# --------------------------------------------------------------------------- the daemon


def _daemon_wired() -> str | None:
    """Why the daemon tests cannot run, or None when emgd.daemon speaks sd_notify."""
    try:
        import emgd.daemon
    except ImportError as exc:
        return f"emgd.daemon does not import ({exc})"
    if not getattr(emgd.daemon, "SD_NOTIFY", False):
        return "emgd.daemon does not speak sd_notify yet (no emgd.daemon.SD_NOTIFY)"
    return None


_NOT_WIRED = _daemon_wired()
wired = pytest.mark.skipif(_NOT_WIRED is not None, reason=_NOT_WIRED or "")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(rx: Receiver, tmp_path, device: str = "sim") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EMGD_", "NOTIFY_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=rx.address, WATCHDOG_USEC="500000",
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    cmd = [sys.executable, "-m", "emgd", "--device", device,
           "--pub", f"tcp://127.0.0.1:{free_port()}", "--ctl", f"tcp://127.0.0.1:{free_port()}",
           "--log-level", "info"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def collect_until(rx: Receiver, proc: subprocess.Popen, done, timeout: float) -> list[str]:
    """Datagrams (split into assignments) until done(assignments) or the timeout."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.poll() is not None else ""
            pytest.fail(f"waited in vain; got {got!r}; exit={proc.poll()} output:\n{out}")
        try:
            got.extend(rx.recv(timeout=min(left, 1.0)).split("\n"))
        except TimeoutError:
            pass
    return got


@wired
def test_daemon_ready_status_watchdog_stopping(tmp_path):
    rx = Receiver(str(tmp_path / "notify.sock"))
    proc = start_daemon(rx, tmp_path)
    try:
        # READY=1 after warm-up (generous: a cold start compiles Numba kernels)
        before = collect_until(rx, proc, lambda g: "READY=1" in g, timeout=240)
        assert "WATCHDOG=1" not in before, "watchdog pings before READY=1"
        after = collect_until(
            rx, proc,
            lambda g: g.count("WATCHDOG=1") >= 3 and any(
                a.startswith("STATUS=") and "rate=" in a
                and float(a.split("rate=")[1].split("/")[0]) > 0 for a in g),
            timeout=60)
        status = [a for a in before + after if a.startswith("STATUS=") and "rate=" in a]
        assert any(float(s.split("rate=")[1].split("/")[0]) > 0 for s in status), status
        proc.send_signal(signal.SIGTERM)
        collect_until(rx, proc, lambda g: "STOPPING=1" in g, timeout=30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        rx.close()


@wired
def test_daemon_watchdog_pings_stop_while_the_pipeline_is_stalled(tmp_path):
    """A link that stalls (the band holds its bytes for 2 s, link still up): no progress,
    so no WATCHDOG=1 — systemd would restart a daemon stalled for longer than WatchdogSec."""
    rx = Receiver(str(tmp_path / "notify.sock"))
    proc = start_daemon(rx, tmp_path, device="sim?pause=2&pause_every=3")
    try:
        collect_until(rx, proc, lambda g: "READY=1" in g, timeout=240)
        pings: list[float] = []
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            try:
                msg = rx.recv(timeout=0.1)
            except TimeoutError:
                continue
            if "WATCHDOG=1" in msg.split("\n"):
                pings.append(time.monotonic())
        assert len(pings) >= 4, pings  # it does ping while samples flow
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        # interval 0.25 s while flowing; a 2 s stall leaves a hole of well over 1 s
        assert max(gaps) > 1.2, gaps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        rx.close()
