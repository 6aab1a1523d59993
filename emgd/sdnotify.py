"""systemd's notification protocol (sd_notify), spoken without a dependency.

systemd passes a datagram socket in ``NOTIFY_SOCKET`` (a file system path, or ``@name``
for the abstract namespace) and, when ``WatchdogSec=`` is set, the watchdog interval in
``WATCHDOG_USEC`` (with ``WATCHDOG_PID``, the process the interval is meant for). The
service sends newline-separated ``KEY=value`` assignments in one datagram each:

- ``READY=1`` once it serves (emgd: models loaded, kernels warmed, device streaming);
- ``STATUS=...`` a one-line human-readable state, shown by ``systemctl status``;
- ``WATCHDOG=1`` at least once per interval, or systemd kills and restarts it;
- ``RELOADING=1`` (with ``MONOTONIC_USEC=``) and ``STOPPING=1`` around reloads and stops;
- ``EXTEND_TIMEOUT_USEC=`` to ask for more start (or stop) time.

:class:`Notifier` does nothing when ``NOTIFY_SOCKET`` is unset, and never raises on a send
failure: it counts it (``failures``) and logs the first one. :class:`ProgressWatchdog`
pings only while a progress counter advances, and runs on the daemon's asyncio loop —
never in a free-running thread, whose pings would keep a stalled daemon "alive".
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)


class Notifier:
    """A sender of sd_notify messages; a no-op when there is no notification socket."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address``: the ``NOTIFY_SOCKET`` value (``/path`` or ``@abstract``), or None.

        ``watchdog_usec``: the watchdog interval systemd enforces, or None.
        """
        self.address = address or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self.sent = 0
        self.failures = 0
        self._last_status: str | None = None
        self._sock: socket.socket | None = None
        self._target: str | bytes | None = None
        if self.address is not None:
            self._target = _socket_address(self.address)
            if self._target is None:
                log.warning("NOTIFY_SOCKET=%r is not a path or @name: sd_notify disabled",
                            self.address)
                self.address = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog interval is ignored when ``WATCHDOG_PID`` names another process (the
        variables were inherited) or when ``WATCHDOG_USEC`` is not a positive integer.
        """
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw:
            try:
                usec = int(raw)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not an integer: watchdog disabled", raw)
            if pid and pid != str(os.getpid()):
                usec = None
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    # ------------------------------------------------------------------ state
    @property
    def enabled(self) -> bool:
        """True when messages go somewhere (``NOTIFY_SOCKET`` was set and usable)."""
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """The watchdog interval systemd enforces in seconds, or None without one."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 1e6

    # ------------------------------------------------------------------ messages
    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is complete (optionally with a first ``STATUS=``)."""
        if status is not None:
            self._last_status = _one_line(status)
            return self.send("READY=1", f"STATUS={self._last_status}")
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """``STATUS=text``; a text equal to the last one sent is not sent again."""
        line = _one_line(text)
        if line == self._last_status:
            return True
        ok = self.send(f"STATUS={line}")
        if ok:
            self._last_status = line
        return ok

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive (call it only when it really is)."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: a clean stop has begun."""
        extra = [f"STATUS={_one_line(status)}"] if status is not None else []
        return self.send("STOPPING=1", *extra)

    def reloading(self) -> bool:
        """``RELOADING=1`` with the ``MONOTONIC_USEC=`` that systemd ≥ 253 requires.

        Send :meth:`ready` when the reload is done.
        """
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: the current start or stop needs ``seconds`` more."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1e6), 1)}")

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; False (counted) on failure."""
        if not self.enabled:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never stall the event loop
            self._sock.sendto(data, self._target)  # type: ignore[arg-type]
        except OSError as exc:
            self.failures += 1
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            log.log(level, "sd_notify to %s failed (%s); %d failure(s) so far",
                    self.address, errno.errorcode.get(exc.errno or 0, exc), self.failures)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        """Close the socket (idempotent); a later send opens it again."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(address: str) -> str | bytes | None:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    if address.startswith("/"):
        return address
    return None  # vsock: and others are not supported


def _one_line(text: str) -> str:
    return " ".join(text.split())


class ProgressWatchdog:
    """Pings ``WATCHDOG=1`` at half the watchdog interval, only while there is progress.

    ``progress`` returns a counter that the pipeline advances whenever it processed
    samples (``Pipeline.progress``). A ping is due every ``interval_s`` (default: half of
    systemd's interval); when due, it is sent only if the counter changed since the last
    ping. Without progress nothing is sent, and the next :meth:`tick` checks again, so a
    pipeline that resumes is acknowledged at once. A stall longer than systemd's interval
    therefore gets the service killed and restarted (``Restart=on-failure``).

    ``expected`` (optional) says whether progress is expected at all: while it returns
    False (say the band's link is down and the supervisor is reconnecting, which the
    failure policy wants survived), a due ping is sent without progress — proving only
    that the event loop runs. Call :meth:`tick` from the asyncio loop, or ``await run()``.
    """

    def __init__(self, notifier: Notifier, progress: Callable[[], int], *,
                 interval_s: float | None = None,
                 expected: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self._progress = progress
        self._expected = expected
        self._clock = clock
        if interval_s is None:
            full = notifier.watchdog_interval_s
            interval_s = full / 2 if full is not None else None
        self.interval_s = interval_s
        self.pings = 0  # WATCHDOG=1 sent
        self.stalls = 0  # due checks that found no progress (no ping sent)
        self._last = progress()  # the first ping needs progress made after this point
        self._last_ping_at = clock()
        self._due = self._last_ping_at + (interval_s or 0.0)
        self._stalled = False

    @property
    def enabled(self) -> bool:
        """True when systemd asked for a watchdog and notifications are going out."""
        return self.notifier.enabled and self.interval_s is not None

    def tick(self, now: float | None = None) -> bool:
        """Ping if a ping is due and the pipeline progressed; returns True if it pinged."""
        if not self.enabled:
            return False
        now = self._clock() if now is None else now
        if now < self._due:
            return False
        current = self._progress()
        if current == self._last and (self._expected is None or self._expected()):
            self.stalls += 1
            if not self._stalled:
                self._stalled = True
                log.warning("pipeline made no progress for %.1f s: withholding the systemd "
                            "watchdog ping", now - self._last_ping_at)
            return False
        if self._stalled:
            self._stalled = False
            log.info("pipeline progressing again after %.1f s", now - self._last_ping_at)
        self._last = current
        self._last_ping_at = now
        self._due = now + self.interval_s  # type: ignore[operator]
        self.pings += 1
        self.notifier.watchdog()
        return True

    def seconds_to_next(self, now: float | None = None) -> float:
        """How long the caller may sleep before the next :meth:`tick` could ping."""
        if not self.enabled:
            return float("inf")
        now = self._clock() if now is None else now
        # after a stall, look again soon: a resumed pipeline is acknowledged quickly
        return max(self._due - now, self.interval_s / 8)  # type: ignore[operator]

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set (returns at once when the watchdog is disabled)."""
        if not self.enabled:
            return
        while not stop.is_set():
            self.tick()
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.seconds_to_next())
            except TimeoutError:
                pass


def format_status(fields: Mapping[str, Any]) -> str:
    """One ``STATUS=`` line from a ``status/<device>`` payload (``Pipeline.last_status``).

    For example ``running link=up rate=1999.8/s lost=0 gaps=0 p50=210µs p99=480µs``.
    """
    if not fields:
        return "starting"
    lat = fields.get("latency") or {}
    parts = [str(fields.get("state", "running"))]
    if "link" in fields:
        parts.append(f"link={fields['link']}")
    parts.append(f"rate={float(fields.get('rate_hz') or 0.0):.1f}/s")
    for key, name in (("lost_samples", "lost"), ("gaps", "gaps")):
        if key in fields:
            parts.append(f"{name}={fields[key]}")
    for key in ("p50_us", "p99_us"):
        value = lat.get(key)
        parts.append(f"{key[:3]}={'-' if value is None else f'{value:.0f}µs'}")
    return " ".join(parts)


__all__ = ["Notifier", "ProgressWatchdog", "format_status"]
