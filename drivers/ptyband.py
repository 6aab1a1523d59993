"""The simulated band on a pseudo-terminal: a virtual serial band for people and tests.

``emgd sim --pty [--link PATH]`` (:mod:`emgd.cli_sim`) runs a :class:`PtyBand`:
``os.openpty()``, both ends raw, the slave's path printed (and optionally symlinked at
``--link``) so that ``emgd --device serial:PATH`` reads it exactly as it reads hardware.
The bytes are :class:`emgd.drivers.sim.SimStream`'s, paced in real time from the
monotonic clock (``due = rate * elapsed - sent``), with the same fault knobs as the
in-process ``sim`` device (drop, corrupt, pause, drift).

Life of a band:

- **Waiting**: the band's clock starts when a reader first opens the port (plus
  ``SETTLE_S``, so pyserial's flush-on-open cannot eat the first frames). Every frame a
  reader could see is therefore accounted for in :attr:`PtyBand.injected`.
- **Streaming**: frames are written whole, without blocking (a stalled reader makes bytes
  queue in :attr:`pending`, up to ``PENDING_MAX``, then they are dropped and counted).
- **Reader gone** (the pty reports hangup when nobody has the slave open): the band runs on,
  its bytes are counted in ``bytes_unread`` and dropped, like a band whose dongle was
  unplugged; when a reader comes back it gets the stream from then on (a counter gap).
- **Pause** (``pause``/``pause_every``): bytes are held, then sent in one burst.
- **Stop** (:meth:`close`): send what is held and queued, then ``END_PADDING`` zero bytes
  (so a receiver resolves every frame candidate still pending in its decoder), wait until
  the reader has taken every byte out of the pty (its input queue stayed empty for
  ``DRAIN_QUIET_S``; ``DRAIN_S`` at most), close the master,
  remove the link (if it still points here) and the announcement
  (:mod:`emgd.drivers.discovery`).

The fault record plus the byte counters are :meth:`PtyBand.summary`, which the CLI prints
as one JSON line on stdout at exit: with ``bytes_unread == bytes_overflow == 0`` the
reader's decoder must report exactly ``injected.lost_samples`` lost samples and
``injected.rejects`` CRC errors + malformed frames.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Any, Self

from emgd.drivers import discovery
from emgd.drivers.protocol import MAX_FRAME
from emgd.drivers.sim import Injected, SimConfig, SimStream

from emgd import SAMPLE_RATE
from emgd.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

PACE_S = 0.002  # the loop's period: frames leave at most this late
SETTLE_S = 0.2  # after a reader opens the port, before the first byte
PENDING_MAX = 1 << 20  # bytes queued for a stalled reader before they are dropped
DRAIN_S = 3.0  # at close, how long to wait for the reader to take the last bytes
DRAIN_QUIET_S = 0.1  # ... once the slave's input queue stayed empty this long
END_PADDING = MAX_FRAME  # zero bytes after the last frame (no sync in them)
WRITE_CHUNK = 65536


@dataclasses.dataclass(slots=True)
class PtyCounters:
    bytes_written: int = 0  # into the pty, for a reader
    bytes_unread: int = 0  # made while no reader had the port open (dropped)
    bytes_overflow: int = 0  # dropped because a reader stopped reading
    reader_connects: int = 0
    samples: int = 0  # samples made since the band's clock started


class PtyBand:
    """A simulated band behind a pty. ``open()``, ``run(stop)``, ``close()``."""

    def __init__(self, config: SimConfig, link: str | None = None, *,
                 announce: bool = True, settle_s: float = SETTLE_S) -> None:
        if not config.paced:
            raise ConfigError("the pty band is always paced in real time (paced=1)")
        self.config = config
        self.stream = SimStream(config)
        self.link = link
        self.path = ""
        self.counters = PtyCounters()
        self.pending = bytearray()
        self._announce = announce
        self._entry: Path | None = None
        self._settle_ns = int(settle_s * 1e9)
        self._master = -1
        self._poll = select.poll()
        self._held: list[bytes] = []
        self._reader = False
        self._reader_since = 0
        self._t0: int | None = None  # the band's clock origin (monotonic ns)
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> str:
        """Create the pty (and link, and announcement); the path a reader should open."""
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)  # raw before any reader: no echo, no line editing of frames
        self.path = os.ttyname(slave)
        os.close(slave)  # the band holds only the master: hangup shows "no reader"
        os.set_blocking(master, False)
        self._master = master
        self._poll.register(master, select.POLLOUT)
        try:
            if self.link:
                self._make_link(self.link)
            if self._announce:
                self._entry = discovery.announce(self.path, self.link, self.config.serial,
                                                 self.config.fmt.name.lower())
        except BaseException:
            self.close()
            raise
        return self.link or self.path

    def _make_link(self, link: str) -> None:
        if os.path.lexists(link) and not os.path.islink(link):
            raise ConfigError(f"--link {link}: exists and is not a symlink; "
                              "choose another path (it is replaced only if it is a link)")
        tmp = f"{link}.{os.getpid()}.tmp"
        try:
            os.symlink(self.path, tmp)
            os.replace(tmp, link)
        except OSError as exc:
            raise DeviceError(f"cannot create the link {link} -> {self.path}: {exc}") from exc

    def close(self) -> None:
        """Flush and drain for a reader still there, then release everything (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._master >= 0 and self._reader_present():
                self._flush_held()
                self.pending += bytes(END_PADDING)
                self._drain()
        finally:
            if self._master >= 0:
                os.close(self._master)
                self._master = -1
            if self.link and os.path.islink(self.link) and os.readlink(self.link) == self.path:
                os.unlink(self.link)
            discovery.withdraw(self._entry)
            self._entry = None

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Stream until ``stop`` is set (the caller then calls :meth:`close`)."""
        while not stop.is_set():
            self.step(time.monotonic_ns())
            if self.pending:
                self._poll.poll(PACE_S * 1000)
            else:
                time.sleep(PACE_S)

    def step(self, now_ns: int) -> None:
        """One pass: notice the reader, make the frames due, write what the pty takes."""
        self._track_reader(now_ns)
        if self._t0 is None:
            if not self._reader or now_ns - self._reader_since < self._settle_ns:
                return
            self._t0 = now_ns
            log.info("%s: streaming (band %s)", self.path, self.config.serial)
        cfg = self.config
        rate = SAMPLE_RATE * (1.0 + cfg.drift_ppm * 1e-6)
        due = int(rate * (now_ns - self._t0) * 1e-9) - self.counters.samples
        n = due - due % cfg.frame
        if n > 0:
            data = self.stream.generate_bytes(n)
            self.counters.samples += n
            if self.stream.paused(self.counters.samples):
                self._held.append(data)
            else:
                self._flush_held()
                self._send(data)
        self._write_pending()

    @property
    def injected(self) -> Injected:
        return self.stream.injected

    @property
    def reader(self) -> bool:
        """Whether a reader had the port open at the last step."""
        return self._reader

    def summary(self) -> dict[str, Any]:
        """What the band did: one JSON-able dict (printed by ``emgd sim --pty`` at exit)."""
        inj = dataclasses.asdict(self.stream.injected)
        inj["rejects"] = self.stream.injected.rejects
        return {"event": "stopped", "path": self.path, "link": self.link,
                "serial": self.config.serial, "injected": inj,
                **dataclasses.asdict(self.counters)}

    # ------------------------------------------------------------------ internals
    def _reader_present(self) -> bool:
        events = self._poll.poll(0)
        return not any(ev & select.POLLHUP for _, ev in events)

    def _track_reader(self, now_ns: int) -> None:
        present = self._reader_present()
        if present == self._reader:
            return
        self._reader = present
        if present:
            self._reader_since = now_ns
            self.counters.reader_connects += 1
            log.info("%s: a reader opened the port", self.path)
        else:
            log.info("%s: the reader went away; the band runs on", self.path)
            self.counters.bytes_unread += len(self.pending)
            self.pending.clear()

    def _flush_held(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._send(data)

    def _send(self, data: bytes) -> None:
        if not self._reader:
            self.counters.bytes_unread += len(data)
            return
        if len(self.pending) + len(data) > PENDING_MAX:
            log.warning("%s: the reader stopped reading; dropping %d queued bytes",
                        self.path, len(self.pending))
            self.counters.bytes_overflow += len(self.pending)
            self.pending.clear()
        self.pending += data

    def _write_pending(self) -> None:
        while self.pending:
            try:
                n = os.write(self._master, self.pending[:WRITE_CHUNK])
            except BlockingIOError:
                return
            except OSError as exc:  # EIO: the slave side is gone for good
                log.info("%s: write failed (%s); dropping %d bytes", self.path, exc,
                         len(self.pending))
                self.counters.bytes_unread += len(self.pending)
                self.pending.clear()
                return
            self.counters.bytes_written += n
            del self.pending[:n]

    def _drain(self) -> None:
        """Write what is queued, then wait until the reader has read it all."""
        deadline = time.monotonic() + DRAIN_S
        while self.pending and time.monotonic() < deadline and self._reader_present():
            self._write_pending()
            if self.pending:
                self._poll.poll(PACE_S * 1000)
        try:
            probe = os.open(self.path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return
        try:  # written bytes reach the slave's queue a little later (the tty flip
            # buffer is pushed by a kernel worker): wait for the queue to stay empty
            quiet_since = None
            while time.monotonic() < deadline:
                now = time.monotonic()
                if _queued(probe) > 0:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= DRAIN_QUIET_S:
                    break
                time.sleep(PACE_S)
        finally:
            os.close(probe)


def _queued(fd: int) -> int:
    """Bytes waiting in a tty's input queue (FIONREAD on the slave side)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
