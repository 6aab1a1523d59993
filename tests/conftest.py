"""Shared fixtures: free ports, a daemon in a subprocess, real ZeroMQ subscribers.

Sockets are closed with linger=0; receives always have timeouts; nothing sleeps and hopes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--hardware", action="store_true", default=False,
                     help="run tests that need a real band")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--hardware"):
        return
    skip = pytest.mark.skip(reason="needs a real band: run with --hardware")
    for item in items:
        if "hardware" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def endpoints() -> tuple[str, str]:
    """A (pub, ctl) pair of free loopback endpoints."""
    return f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


class DaemonProcess:
    """`python -m emgd ...` in a subprocess, stopped with SIGTERM at the end."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env.pop("EMGD_CONFIG", None)
        full_env.update(env or {})
        self.args = [sys.executable, "-m", "emgd", *args]
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=full_env, text=True)

    def terminate(self, timeout: float = 10.0) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"daemon did not exit within {timeout}s after SIGTERM:\n{err}")
        return self.proc.returncode, out, err

    def wait(self, timeout: float = 20.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


@pytest.fixture
def run_daemon() -> Iterator:
    started: list[DaemonProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(list(args), env)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.communicate()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll a condition (for state that has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
