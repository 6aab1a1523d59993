"""The PUB socket: one per pipeline thread, created and used in that thread only.

Sends never block: a message that ZeroMQ cannot queue (high-water mark reached) is
dropped and counted (``dropped``); subscribers see the hole through ``seq``, which
counts per topic.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any

import zmq

from emgd.errors import EndpointError
from emgd.events import EventPacker


class Publisher:
    """Binds (or connects, for an in-process hop) a PUB socket and publishes events."""

    def __init__(self, endpoint: str, *, hwm: int = 10000, bind: bool = True,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 200)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        try:
            if bind:
                self._sock.bind(endpoint)
                self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
            else:
                self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise EndpointError(_bind_message(endpoint, exc)) from exc
        self._packer = EventPacker()
        self._seq: dict[bytes, int] = {}
        self.sent = 0
        self.dropped = 0
        #: called with (topic, payload) after each message is packed (e.g. the recorder)
        self.tap: Callable[[bytes, bytes], None] | None = None

    def publish(self, kind: str, device: str, sample: int, t: float, t_recv_ns: int,
                simulated: bool, fields: dict[str, Any]) -> bool:
        """Publish one event; returns False when ZeroMQ dropped it (counted)."""
        topic = f"{kind}/{device}".encode()
        seq = self._seq.get(topic, 0)
        self._seq[topic] = seq + 1
        payload = self._packer.pack(
            (seq, device, sample, t, t_recv_ns, time.monotonic_ns(), simulated), fields)
        if self.tap is not None:
            self.tap(topic, payload)
        try:
            self._sock.send_multipart((topic, payload), flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close()


def _bind_message(endpoint: str, exc: zmq.ZMQError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot bind {endpoint}: the address is in use (is another emgd running?). "
                f"Stop it, or pass another endpoint, e.g. --pub tcp://127.0.0.1:7410")
    if exc.errno == errno.EINVAL or exc.errno == zmq.EPROTONOSUPPORT:
        return f"{endpoint!r} is not a valid ZeroMQ endpoint (example: tcp://127.0.0.1:7400)"
    return f"cannot bind {endpoint}: {exc}"


__all__ = ["Publisher"]
