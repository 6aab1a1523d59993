"""Subscribe to emgd's events from Python.

>>> from emgd.client import Subscriber
>>> with Subscriber("tcp://127.0.0.1:7400", topics=["gesture", "status"]) as sub:
...     for event in sub.events(timeout=10):
...         print(event.topic, event.fields)

A PUB socket drops messages for slow or late subscribers by design. The subscriber
tracks ``seq`` per topic and counts the holes in :attr:`Subscriber.missed`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import zmq

from emgd.events import Event, SchemaError, unpack_event

DEFAULT_PUB = "tcp://127.0.0.1:7400"


class Subscriber:
    """A SUB socket connected to the daemon's event endpoint, yielding :class:`Event`."""

    def __init__(self, endpoint: str = DEFAULT_PUB, topics: Iterable[str] = ("",), *,
                 context: zmq.Context | None = None, rcvhwm: int = 100000) -> None:
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        topics = list(topics) or [""]
        for topic in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise ValueError(f"cannot connect to {endpoint!r}: {exc}") from exc
        self._last_seq: dict[str, int] = {}
        #: messages lost per topic (holes in ``seq``) since this subscriber started
        self.missed: dict[str, int] = {}
        #: messages that did not follow the schema (skipped)
        self.malformed = 0
        #: host monotonic ns at which the last event was received
        self.last_recv_ns = 0

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when ``timeout`` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(wait_ms):
                return None
            parts = self._sock.recv_multipart()
            self.last_recv_ns = time.monotonic_ns()
            if len(parts) != 2:
                self.malformed += 1
                continue
            try:
                event = unpack_event(parts[0], parts[1])
            except SchemaError:
                self.malformed += 1
                continue
            self._track(event)
            return event

    def events(self, timeout: float | None = None, count: int | None = None) -> Iterator[Event]:
        """Yield events until ``count`` were yielded or ``timeout`` s passed in total."""
        deadline = None if timeout is None else time.monotonic() + timeout
        got = 0
        while count is None or got < count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            event = self.recv(left)
            if event is None:
                return
            got += 1
            yield event

    def _track(self, event: Event) -> None:
        topic = event.topic
        last = self._last_seq.get(topic)
        if last is not None and event.seq > last + 1:
            self.missed[topic] = self.missed.get(topic, 0) + event.seq - last - 1
        self._last_seq[topic] = event.seq

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Subscriber", "Event", "DEFAULT_PUB"]
