"""The device base class: one protocol decoder, the counters, and the hand-off to the ring.

A backend only moves bytes. It implements a narrow hook and calls :meth:`Device._on_bytes`
with every chunk it receives (any size, any split) and the ``time.monotonic_ns()`` at which
the chunk arrived; the base class decodes frames, counts errors and gaps, and writes each
EMG block into the sink (``sink.write(data, first_sample, t_recv_ns)``, the ring buffer's
``write``; see docs/internals.md).

Hooks, all optional except ``_run`` for thread-based backends:

- ``_open()``: acquire the transport; runs in the caller of :meth:`Device.start`, so a busy
  port or a missing band raises there (an :class:`emgd.errors.DeviceError`).
- ``_run()``: the I/O loop, in the device's own thread; return when ``self._stop_event`` is
  set or the stream ended (call ``self._end_of_stream()`` for a finite source).
- ``_interrupt()``: unblock a blocking read so ``_run`` sees the stop request.
- ``_close_io()``: release the transport.
- ``_start_io()`` / ``_stop_io()``: replace the thread altogether (e.g. an asyncio backend).

A backend that makes samples itself instead of receiving protocol bytes (replay) calls
:meth:`Device._write_block` with each contiguous block; the base class counts it and hands it
to the sink, bypassing the protocol decoder.

Thread safety: ``_on_bytes`` runs in one thread at a time (the device's); ``stats()``,
``info`` and ``pop_markers()`` may be called from any thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Protocol

import numpy as np

from emgd.drivers.protocol import DecoderStats, Frame, FrameType, StreamDecoder
from emgd.drivers.urls import DeviceUrl
from emgd.errors import DeviceError

log = logging.getLogger(__name__)

LINK_STATES = ("connecting", "up", "lost", "closed")
MARKER_QUEUE = 64
JOIN_TIMEOUT_S = 5.0
FLOW_WAIT_S = 0.001  # unpaced sources: poll for room in the sink


class SampleSink(Protocol):
    """What a device writes EMG into (the ring buffer, or a test's recorder)."""

    def write(self, data: np.ndarray, first_sample: int, t_recv_ns: int) -> None: ...


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What a device is. ``device_id`` is updated from the band's STATUS frames."""

    device_id: str  # the band's serial number ("" until the band has said it)
    name: str
    transport: str
    url: str
    simulated: bool
    scale_uv: float | None  # µV per LSB of the last EMG frame (None before the first)
    firmware: str


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """A snapshot of a device's health. The counters are the protocol decoder's
    (docs/protocol.md); ``malformed`` here includes the decoder's ``truncated``."""

    link: str  # one of LINK_STATES
    frames: int
    crc_errors: int
    malformed: int
    bytes_discarded: int
    gaps: int
    lost_samples: int
    counter_resets: int
    samples: int
    battery: int | None
    simulated: bool
    reconnects: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Marker:
    counter: int  # index of the next EMG sample when the band sent it
    timestamp_us: int
    text: str
    t_recv_ns: int


class Device:
    """Base of every transport. Use as a context manager or call :meth:`close`."""

    transport = "base"
    simulated = False

    def __init__(self, url: DeviceUrl, info: DeviceInfo | None = None) -> None:
        self.url = url
        self._info = info or DeviceInfo(
            device_id="", name=url.scheme, transport=self.transport, url=str(url),
            simulated=self.simulated, scale_uv=None, firmware="",
        )
        self._decoder = StreamDecoder()
        self._lock = threading.Lock()  # decoder + info updates vs. readers of stats/info
        self._sink: SampleSink | None = None
        self._markers: collections.deque[Marker] = collections.deque(maxlen=MARKER_QUEUE)
        self._battery: int | None = None
        self._scale: float | None = None
        self._link = "closed"
        self._direct = [0, 0, 0]  # samples, gaps, lost samples written by _write_block
        self._direct_next: int | None = None
        self._reconnects = 0
        self._last_error: str | None = None
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened = False
        self._closed = False
        #: called with the new link state on every change (from the device's thread);
        #: the daemon uses it to publish ``status`` at once. Must be cheap and not raise.
        self.link_listener: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def info(self) -> DeviceInfo:
        return self._info

    @property
    def link(self) -> str:
        return self._link

    def start(self, sink: SampleSink) -> None:
        """Open the transport (errors raise here) and start streaming into ``sink``."""
        if self._closed:
            raise DeviceError(f"{self._info.url}: device is closed; open a new one")
        if self._thread is not None and self._thread.is_alive():
            raise DeviceError(f"{self._info.url}: already started")
        self._sink = sink
        self._stop_event.clear()
        self._set_link("connecting")
        if not self._opened:
            try:
                self._open()
            except BaseException as exc:
                self._set_link("closed", error=exc)
                raise
            self._opened = True
        self._start_io()

    def stop(self) -> None:
        """Stop streaming (idempotent). ``start`` may be called again."""
        self._stop_event.set()
        self._stop_io()
        if self._link != "lost":
            self._set_link("closed")

    def close(self) -> None:
        """Stop and release the transport (idempotent)."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        if self._opened:
            self._opened = False
            self._close_io()
        self._set_link("closed")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the I/O thread to end (end of stream, error or stop); True if it did."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def stats(self) -> DeviceStats:
        with self._lock:
            s = self._decoder.stats
            samples, gaps, lost = self._direct
            return DeviceStats(
                link=self._link, frames=s.frames, crc_errors=s.crc_errors,
                malformed=s.malformed + s.truncated, bytes_discarded=s.bytes_discarded,
                gaps=s.gaps + gaps, lost_samples=s.lost_samples + lost,
                counter_resets=s.counter_resets, samples=s.samples + samples,
                battery=self._battery, simulated=self._info.simulated,
                reconnects=self._reconnects, last_error=self._last_error,
            )

    def decoder_stats(self) -> DecoderStats:
        """A copy of the protocol decoder's exact counters."""
        with self._lock:
            return self._decoder.stats.snapshot()

    def pop_markers(self) -> list[Marker]:
        """MARKER frames received since the last call (the newest 64 at most)."""
        out = []
        while True:
            try:
                out.append(self._markers.popleft())
            except IndexError:
                return out

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._info.url} link={self._link}>"

    # ------------------------------------------------------------------ for backends
    def _on_bytes(self, chunk: bytes | bytearray | memoryview, t_recv_ns: int) -> None:
        """Decode ``chunk`` (received at ``t_recv_ns``) and hand EMG to the sink."""
        with self._lock:
            frames = self._decoder.feed(chunk)
        if frames:
            self._dispatch(frames, t_recv_ns)

    def _write_block(self, data: np.ndarray, first_sample: int, t_recv_ns: int) -> None:
        """Hand one contiguous EMG block (``(n, channels)`` µV, device indices
        ``first_sample ...``) to the sink without the protocol decoder. For backends that
        make samples themselves (replay). A forward jump in the index counts as a gap."""
        n = int(data.shape[0])
        with self._lock:
            expected = self._direct_next
            if expected is not None and first_sample > expected:
                self._direct[1] += 1
                self._direct[2] += first_sample - expected
            self._direct[0] += n
            self._direct_next = first_sample + n
        sink = self._sink
        if sink is not None:
            sink.write(data, first_sample, t_recv_ns)

    def _end_of_stream(self) -> None:
        """A finite source ended: flush the decoder, mark the link closed."""
        with self._lock:
            frames = self._decoder.finish()
        if frames:
            self._dispatch(frames, time.monotonic_ns())
        self._set_link("closed")

    def _dispatch(self, frames: list[Frame], t_recv_ns: int) -> None:
        sink = self._sink
        for frame in frames:
            if frame.type == FrameType.EMG:
                if frame.scale != self._scale:
                    self._scale = frame.scale
                    self._update_info(scale_uv=frame.scale)
                if sink is not None:
                    sink.write(frame.emg, frame.counter, t_recv_ns)
            elif frame.type == FrameType.STATUS:
                st = frame.status
                self._battery = st.battery
                if st.serial != self._info.device_id or st.firmware != self._info.firmware:
                    self._update_info(device_id=st.serial, firmware=st.firmware)
            elif frame.type == FrameType.MARKER:
                self._markers.append(
                    Marker(frame.counter, frame.timestamp_us, frame.text, t_recv_ns)
                )

    def _update_info(self, **changes: object) -> None:
        with self._lock:
            self._info = replace(self._info, **changes)

    def _set_link(self, state: str, error: BaseException | str | None = None) -> None:
        if error is not None:
            self._last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if state != self._link:
            if state == "lost":
                log.warning("%s: link lost (%s)", self._info.url, self._last_error)
            else:
                log.info("%s: link %s", self._info.url, state)
            self._link = state
            listener = self.link_listener
            if listener is not None:
                listener(state)

    def _wait_for_room(self, n: int) -> bool:
        """Unpaced sources: wait until the sink can take ``n`` samples without lapping a
        reader it watches (a sink without ``free()`` has no flow control). False when
        asked to stop while waiting."""
        free = getattr(self._sink, "free", None)
        if free is None:
            return True
        while free() < n:
            if self._stop_event.wait(FLOW_WAIT_S):
                return False
        return True

    def _note_reconnect(self) -> None:
        self._reconnects += 1

    # ------------------------------------------------------------------ hooks
    def _open(self) -> None:
        """Acquire the transport (caller's thread). Default: nothing to open."""

    def _run(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _run()")

    def _interrupt(self) -> None:
        """Unblock a blocking read in ``_run``. Default: nothing (``_run`` polls)."""

    def _close_io(self) -> None:
        """Release the transport. Default: nothing."""

    def _start_io(self) -> None:
        self._thread = threading.Thread(
            target=self._thread_main, name=f"device-{self.url.scheme}", daemon=True
        )
        self._thread.start()

    def _stop_io(self) -> None:
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        self._interrupt()
        thread.join(JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.error("%s: I/O thread did not stop within %.1f s", self._info.url, JOIN_TIMEOUT_S)

    def _thread_main(self) -> None:
        try:
            self._run()
        except Exception as exc:  # the thread must not die silently: record, mark lost
            log.exception("%s: I/O thread failed", self._info.url)
            self._set_link("lost", error=exc)
