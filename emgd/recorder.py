"""Recording: a second reader of the ring writes an HDF5 file in the public dataset's layout.

:class:`Recorder` runs in its own thread. It reads the ring with its own cursor (the
pipeline never waits for it), stamps every sample with Unix time from the pipeline's clock
and appends to a resizable compound dataset ``data`` (``time`` f8, ``emg`` f4 × 16, plus
``sample_index`` i8), so ``h5py.File(path)["data"]["emg"]`` is what the reference code
reads. Markers and the events emgd published go to ``markers`` and ``events``. Every
dataset and attribute is described in ``docs/recording.md``.

Durability
----------
The file is written in HDF5's default (earliest-compatible) format, not SWMR. Every
``flush_interval_s`` (0.5 s) the staged rows, markers and events are appended and
``File.flush()`` writes HDF5's metadata, so a SIGKILL leaves a file that plain
``h5py.File(path, "r")`` opens and that holds everything up to the last flush (measured:
rows on disk == rows at the last flush, in 48 of 48 kills at random moments). SWMR
(``libver="latest"``) was measured too and rejected: after a SIGKILL such a file carries
the "open for write" consistency flag and opens only with ``swmr=True`` or after
``h5clear``, which the reference code does not do. The flush is not an ``fsync``: the OS
keeps the pages after the process dies; a power cut is not covered.

Clean stop (:meth:`Recorder.stop`): reads the ring up to the last sample written when
``stop`` was called, appends it with every queued event, and closes the file.

Disk full and other errors end the recording, never the daemon: the message is kept in
:attr:`Recorder.error` and the thread returns; the ring's writer never waits for any
reader. A full disk must not reach HDF5 itself: with HDF5 2.0 / h5py 3.16, closing a file
after a write failed with ENOSPC segfaults (measured; so does interpreter exit with the file
still open). The recorder therefore keeps ``RESERVE_BYTES`` (4 MiB, about 25 s) allocated
past HDF5's end of file with ``posix_fallocate`` and renews it before it runs low; when the
renewal fails (:class:`DiskFull`) the file is closed properly inside the reserve, with
``attrs["error"]`` set, and the unused reserve is truncated away.

Files are created with mode 0600 (sEMG is biometric data). File creation, the layout and
the disk reserve live in :mod:`emgd.h5layout` (its public names are re-exported here).

Time column: ``clock.unix_time(index)`` per sample, vectorised (``clock.unix_times`` when
the clock has it, else ``times_ns`` relative to ``unix_time`` of the block's first sample),
forced non-decreasing (the reference asserts ``diff(time) >= 0``; a clock re-anchor that
steps back is flattened). The clock is the pipeline's: pass ``clock_horizon`` (the device
index up to which the pipeline has updated the clock) so a sample is stamped only once its
time is final, i.e. equal to the ``t`` its events carry.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import h5py
import numpy as np

from emgd.h5layout import (
    CHUNK_ROWS,  # noqa: F401 - re-exported
    DATA_DTYPE,
    EVENT_DTYPE,
    FORMAT,
    FORMAT_VERSION,
    FREE_TASK,
    MARKER_DTYPE,
    RESERVE_BYTES,  # noqa: F401 - re-exported
    DiskFull,
    DiskReserve,
    RecordingError,
    create_file,
    create_layout,
    event_sample_and_t,
    extend,
    write_device_info,
)
from emgd.ringbuffer import RingBuffer

if TYPE_CHECKING:
    from emgd.drivers.base import DeviceInfo

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5
POLL_S = 0.02  # the thread reads the ring this often
STAGE_ROWS = 16384  # rows read but not yet appended (written early when full)
MAX_QUEUED = 65536  # events/markers waiting for the writer; more are counted and dropped


class RecorderClock(Protocol):
    """What the recorder needs of :class:`emgd.clock.ClockMap` (or a replay's clock)."""

    def unix_time(self, index: int) -> float: ...

    def times_ns(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray: ...


class Recorder:
    """Writes the ring's samples, markers and events to ``path`` (see module docstring).

    ``device_info`` is a :class:`~emgd.drivers.base.DeviceInfo` or a callable returning the
    current one (the band reports its serial number after connecting); its fields become
    root attributes, rewritten at each flush when they change. ``start="now"`` records from
    the next sample written; ``"oldest"`` from the oldest still in the ring.
    """

    def __init__(self, path: str | os.PathLike[str], ring: RingBuffer, clock: RecorderClock,
                 device_info: DeviceInfo | Callable[[], DeviceInfo], *,
                 task: str = FREE_TASK, start: str = "now", overwrite: bool = False,
                 flush_interval_s: float = FLUSH_INTERVAL_S,
                 clock_horizon: Callable[[], int | None] | None = None,
                 skip_kinds: Iterable[str] = ("raw",)) -> None:
        if start not in ("now", "oldest"):
            raise ValueError(f"start must be 'now' or 'oldest', got {start!r}")
        if not 0 < flush_interval_s <= 1.0:
            raise ValueError(f"flush_interval_s must be in (0, 1], got {flush_interval_s}")
        self.path = os.fspath(path)
        self.task = task
        self._ring = ring
        self._clock = clock
        self._info = device_info if callable(device_info) else (lambda: device_info)
        self._start = start
        self._overwrite = overwrite
        self._flush_ns = int(flush_interval_s * 1e9)
        self._horizon = clock_horizon
        self._skip = tuple(f"{k}/".encode() for k in skip_kinds)
        self._events: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._markers: collections.deque[tuple[str, int | None]] = collections.deque()
        self._stop_event = threading.Event()
        self._stop_target: int | None = None
        self._thread: threading.Thread | None = None
        self._file: h5py.File | None = None
        #: why the recording ended early (None while fine or after a clean stop)
        self.error: str | None = None
        self.samples = 0  # rows in the file's `data`
        self.lost = 0  # samples overwritten in the ring before the recorder read them
        self.gaps = 0  # jumps in the device index (samples lost on the link)
        self.events = 0
        self.markers = 0
        self.dropped = 0  # events/markers not queued (queue full or recording ended)
        self.flushes = 0

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        """Create the file (errors raise here as :class:`RecordingError`) and start."""
        if self._thread is not None:
            raise RecordingError(f"{self.path}: recorder already started")
        self._file, self._fd = create_file(self.path, self._overwrite)
        self._disk = DiskReserve(self.path, self._fd)
        try:
            self._layout(self._file)
            self._disk.ensure_room(self._file)
        except BaseException:
            self._file.close()
            os.close(self._fd)
            raise
        self._reader = self._ring.reader(start=self._start)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._main, name="recorder", daemon=True)
        self._thread.start()
        log.info("recording to %s", self.path)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Record up to the last sample written now, append queued events, close.
        Idempotent; returns once the file is closed (or ``timeout`` s passed)."""
        if self._stop_target is None:
            self._stop_target = self._ring.written
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("recorder did not finish %s within %s s", self.path, timeout)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def add_event(self, topic: bytes | str, payload: bytes) -> None:
        """Queue one published event (its msgpack payload, as sent). Never blocks; safe
        from any thread. Kinds in ``skip_kinds`` (default: ``raw``) are ignored."""
        if isinstance(topic, str):
            topic = topic.encode()
        if self._skip and topic.startswith(self._skip):
            return
        if len(self._events) >= MAX_QUEUED or self.error is not None or self._stop_event.is_set():
            self.dropped += 1
            return
        self._events.append((topic, bytes(payload)))

    def add_marker(self, text: str, sample: int | None = None) -> None:
        """Queue a marker at device ``sample`` (default: the newest sample recorded)."""
        if len(self._markers) >= MAX_QUEUED or self.error is not None:
            self.dropped += 1
            return
        self._markers.append((str(text), None if sample is None else int(sample)))

    def lag(self) -> int:
        """Samples in the ring this recorder has not read yet (0 before start / after stop)."""
        reader = getattr(self, "_reader", None)
        return reader.lag() if reader is not None and self.running else 0

    def status(self) -> dict[str, Any]:
        """For the daemon's ``status`` message."""
        return {"recording": self.running, "path": self.path, "samples": self.samples,
                "lost": self.lost, "gaps": self.gaps, "events": self.events,
                "dropped": self.dropped, "error": self.error}

    # ------------------------------------------------------------------ file layout
    def _layout(self, f: h5py.File) -> None:
        create_layout(f, self.task)
        self._written_info: object = None
        self._write_info(f)
        self._write_counts(f)

    def _write_info(self, f: h5py.File) -> None:
        info = self._info()
        if info == self._written_info:
            return
        write_device_info(f, info)
        self._written_info = info

    def _write_counts(self, f: h5py.File) -> None:
        a = f.attrs
        a["samples"] = self.samples
        a["ring_lost_samples"] = self.lost
        a["gaps"] = self.gaps
        a["events_dropped"] = self.dropped

    # ------------------------------------------------------------------ thread
    def _main(self) -> None:
        f = self._file
        assert f is not None
        try:
            try:
                self._loop(f)
            except DiskFull as exc:  # the reserve still holds room: close the file properly
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("recording to %s stopped: %s", self.path, self.error)
                f.attrs["error"] = self.error
            self._write_counts(f)
            f.attrs["closed_cleanly"] = True
            f.close()
            self._disk.trim()
            log.info("recording %s closed: %d samples, %d events", self.path, self.samples,
                     self.events)
        except Exception as exc:  # noqa: BLE001 - HDF5 I/O error or bug: end the recording only
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            log.error("recording to %s stopped: %s", self.path, self.error)
            # Not closed: with HDF5 2.0 / h5py 3.16, closing a file whose write failed with
            # ENOSPC segfaults. The reserve makes that case unreachable; what is on disk
            # stays readable up to the last flush.
        finally:
            os.close(self._fd)

    def _loop(self, f: h5py.File) -> None:
        stage = np.zeros(STAGE_ROWS, DATA_DTYPE)
        self._st_time, self._st_emg, self._st_index = stage["time"], stage["emg"], stage["sample_index"]
        self._stage = stage
        self._trecv = np.empty(STAGE_ROWS, np.int64)
        self._ns = np.empty(STAGE_ROWS, np.int64)
        self._staged = 0  # rows in the stage
        self._stamped = 0  # of which have their time
        self._last_time = -math.inf
        self._next_index: int | None = None
        next_flush = time.monotonic_ns() + self._flush_ns
        while True:
            stopping = self._stop_event.wait(POLL_S)
            self._pump(final=stopping)
            now = time.monotonic_ns()
            if stopping or now >= next_flush:
                self._append(f, final=stopping)
                self._disk.ensure_room(f)
                self._write_queued(f)
                self._write_info(f)
                self._write_counts(f)
                f.flush()
                self.flushes += 1
                next_flush = now + self._flush_ns
            if stopping:
                return

    def _pump(self, final: bool) -> None:
        """Read what the ring holds (up to the stop target when stopping) into the stage."""
        reader = self._reader
        target = self._stop_target
        while True:
            free = STAGE_ROWS - self._staged
            if final and target is not None:
                free = min(free, target - reader.position)
            if free <= 0:
                if self._staged < STAGE_ROWS:
                    return
                self._append(self._file, final)  # stage full: write now, flush later
                if self._staged == STAGE_ROWS:
                    return  # nothing stampable yet (clock horizon): read again later
                continue
            k = self._staged
            res = reader.read(self._st_emg[k:k + free], self._st_index[k:k + free],
                              self._trecv[k:k + free])
            self.lost += res.lost
            if res.n == 0:
                return
            idx = self._st_index[k:k + res.n]
            first = int(idx[0])
            if self._next_index is not None and first != self._next_index:
                self.gaps += 1
            self.gaps += int(np.count_nonzero(np.diff(idx) != 1))
            self._next_index = int(idx[-1]) + 1
            self._staged = k + res.n

    def _append(self, f: h5py.File | None, final: bool) -> None:
        """Stamp the staged rows whose clock is final and append them to ``data``."""
        assert f is not None
        self._stamp(final)
        n = self._stamped
        if n == 0:
            return
        self._disk.ensure_room(f)
        data = f["data"]
        n0 = data.shape[0]
        data.resize((n0 + n,))
        data[n0:n0 + n] = self._stage[:n]
        if self.samples == 0:
            f.attrs["start_time"] = float(self._st_time[0])
        self.samples = n0 + n
        rest = self._staged - n
        if rest:
            self._stage[:rest] = self._stage[n:self._staged]
        self._staged, self._stamped = rest, 0

    def _stamp(self, final: bool) -> None:
        a, b = self._stamped, self._staged
        if self._horizon is not None and not final and b > a:
            h = self._horizon()
            if h is None:
                return
            b = a + int(np.searchsorted(self._st_index[a:b], h, side="left"))
        if b <= a:
            return
        t = self._st_time[a:b]
        self._unix_times(self._st_index[a:b], t)
        np.maximum.accumulate(t, out=t)
        if t[0] < self._last_time:
            np.maximum(t, self._last_time, out=t)
        self._last_time = float(t[-1])
        self._stamped = b

    def _unix_times(self, index: np.ndarray, out: np.ndarray) -> None:
        clock = self._clock
        vectorised = getattr(clock, "unix_times", None)
        if vectorised is not None:
            vectorised(index, out)
            return
        ns = self._ns[:index.shape[0]]
        clock.times_ns(index, ns)
        np.subtract(ns, ns[0], out=ns)
        np.multiply(ns, 1e-9, out=out)
        np.add(out, clock.unix_time(int(index[0])), out=out)

    def _write_queued(self, f: h5py.File) -> None:
        markers = _drain(self._markers)
        if markers:
            rows = np.empty(len(markers), MARKER_DTYPE)
            default = (self._next_index - 1) if self._next_index is not None else 0
            samples = np.array([default if s is None else s for _, s in markers], np.int64)
            rows["sample"] = samples
            times = np.empty(len(markers), np.float64)
            self._unix_times(samples, times)
            rows["time"] = times
            rows["text"] = [text for text, _ in markers]
            extend(f["markers"], rows)
            self.markers += len(markers)
        events = _drain(self._events)
        if events:
            rows = np.empty(len(events), EVENT_DTYPE)
            for i, (topic, payload) in enumerate(events):
                rows[i] = (*event_sample_and_t(payload), topic.decode("utf-8", "replace"),
                           np.frombuffer(payload, np.uint8))
            extend(f["events"], rows)
            self.events += len(events)


def _drain(queue: collections.deque) -> list:
    out = []
    while True:
        try:
            out.append(queue.popleft())
        except IndexError:
            return out


__all__ = ["Recorder", "RecordingError", "DATA_DTYPE", "EVENT_DTYPE", "MARKER_DTYPE",
           "FORMAT", "FORMAT_VERSION", "FREE_TASK"]
