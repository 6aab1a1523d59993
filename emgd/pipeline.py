"""The pipeline thread of one device: ring reader → clock → stages → PUB socket.

One thread per device owns everything downstream of the ring: its ring reader, the clock
mapping, the processing stages (features, decoders, detectors) and its own ZeroMQ PUB
socket. It never blocks on a subscriber and never allocates per hop on the raw path
beyond the bytes handed to ZeroMQ.

Gaps: a jump in the device sample index (samples lost on the link) or a ring overrun
(this reader fell behind) ends a *segment*. Stages are reset at a segment boundary and
the gap is counted and published in ``status``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np

from emgd import N_CHANNELS, SAMPLE_RATE
from emgd.clock import ClockMap
from emgd.publisher import Publisher
from emgd.ringbuffer import RingBuffer

log = logging.getLogger(__name__)

READ_BLOCK = 400  # samples per ring read (200 ms): bounds per-iteration work
LATENCY_WINDOW = 4096  # processing-latency samples kept for p50/p99


class NotifyingSink:
    """What a device writes into: the ring, plus a wake-up for the pipeline thread."""

    def __init__(self, ring: RingBuffer) -> None:
        self.ring = ring
        self.wakeup = threading.Event()
        #: lag() of every reader that must not be lapped (pipeline, recorder): an unpaced
        #: source (replay) waits on free() instead of overrunning them
        self.lag_sources: list[Callable[[], int]] = []

    def free(self) -> int:
        """Samples that can be written before the slowest watched reader is lapped."""
        lags = [lag() for lag in list(self.lag_sources)]
        return self.ring.capacity - (max(lags) if lags else 0)

    def write(self, data: np.ndarray, first_sample: int, t_recv_ns: int) -> None:
        self.ring.write(data, first_sample, t_recv_ns)
        self.wakeup.set()


class Stage(Protocol):
    """A processing step fed with contiguous samples (see docs/internals.md)."""

    def process(self, data: np.ndarray, index: np.ndarray, t_recv: np.ndarray,
                ctx: PipelineContext) -> None: ...

    def reset(self) -> None: ...


class PipelineContext:
    """What stages may use to publish: the device identity, clock and publisher."""

    def __init__(self, device_id: str, simulated: bool, clock: ClockMap,
                 publisher: Publisher) -> None:
        self.device_id = device_id
        self.simulated = simulated
        self.clock = clock
        self.publisher = publisher
        self.latencies = np.zeros(LATENCY_WINDOW, dtype=np.int64)
        self.n_latencies = 0

    def publish(self, kind: str, sample: int, t_recv_ns: int, fields: dict[str, Any]) -> None:
        self.publisher.publish(kind, self.device_id, sample, self.clock.unix_time(sample),
                               t_recv_ns, self.simulated, fields)
        self.latencies[self.n_latencies % LATENCY_WINDOW] = time.monotonic_ns() - t_recv_ns
        self.n_latencies += 1


class RawStage:
    """Publishes each contiguous block on ``raw/<device>`` (opt-in with ``--raw``)."""

    def process(self, data: np.ndarray, index: np.ndarray, t_recv: np.ndarray,
                ctx: PipelineContext) -> None:
        ctx.publish("raw", int(index[0]), int(t_recv[-1]),
                    {"n": int(data.shape[0]), "channels": N_CHANNELS, "data": data.tobytes()})

    def reset(self) -> None:
        pass


class Pipeline(threading.Thread):
    """Reads the ring, runs the stages and publishes; ``status`` at a fixed interval."""

    def __init__(self, *, sink: NotifyingSink, device_id: Callable[[], str], simulated: bool,
                 stats: Callable[[], dict[str, Any]], pub_endpoint: str, pub_hwm: int,
                 stages: list[Stage], status_interval_s: float = 1.0,
                 pop_markers: Callable[[], list[Any]] | None = None,
                 clock: Any = None,
                 device_id_known: Callable[[], bool] | None = None) -> None:
        super().__init__(name="pipeline", daemon=True)
        self._sink = sink
        self._device_id = device_id
        self._simulated = simulated
        self._device_stats = stats
        self._pub_endpoint = pub_endpoint
        self._pub_hwm = pub_hwm
        self._stages = stages
        self._id_final = False
        self._id_is_final = device_id_known or (lambda: True)
        self._pop_markers = pop_markers
        self._status_interval_ns = int(status_interval_s * 1e9)
        self._stop_event = threading.Event()
        self._status_now = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.endpoint: str | None = None
        #: device index → time; a replay passes the recording's own time base
        self.clock = clock if clock is not None else ClockMap(rate=float(SAMPLE_RATE))
        #: one past the last index the clock has been updated with (recorder horizon)
        self.clock_index: int | None = None
        #: called with (topic, payload) for every published message (the recorder)
        self.event_tap: Callable[[bytes, bytes], None] | None = None
        #: called with (text, sample) for every marker (the recorder)
        self.marker_sink: Callable[[str, int], None] | None = None
        # counters, written by this thread only, read by anyone
        self.samples = 0
        self.segments = 0
        self.gaps = 0
        self.gap_samples = 0
        self.overrun_samples = 0
        self.progress = 0  # increments whenever samples were processed (watchdog)
        self.resets = 0
        self.last_status: dict[str, Any] = {}
        self.extra_status: dict[str, Any] = {}
        #: key → callable evaluated at every status message (e.g. the recorder's state)
        self.status_sources: dict[str, Callable[[], Any]] = {}
        self._next_index: int | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[PipelineContext], Any], Future]] = (
            queue.SimpleQueue())

    # ------------------------------------------------------------------ control
    def submit(self, fn: Callable[[PipelineContext], Any]) -> Future:
        """Run ``fn(ctx)`` in the pipeline thread between two reads; a Future of its result."""
        future: Future = Future()
        self._commands.put((fn, future))
        self._sink.wakeup.set()
        return future

    @property
    def last_sample(self) -> int:
        """Device index of the last sample processed (-1 before the first)."""
        return -1 if self._next_index is None else self._next_index - 1

    def publish_marker(self, ctx: PipelineContext, text: str, source: str) -> dict[str, Any]:
        """Publish ``marker/<device>`` at the last processed sample (pipeline thread)."""
        sample = max(self.last_sample, 0)
        ctx.publish("marker", sample, time.monotonic_ns(), {"text": text, "source": source})
        if self.marker_sink is not None:
            self.marker_sink(text, sample)
        return {"sample": sample, "text": text}

    def replace_stage(self, old: Stage | None, new: Stage | None) -> None:
        """Swap one stage for another between two reads (pipeline thread only).

        The new stage starts fresh at the next sample (its own segment start), so no
        sample is lost and the other stages are untouched."""
        if new is not None:
            new.reset()
        if old is not None and old in self._stages:
            i = self._stages.index(old)
            if new is None:
                del self._stages[i]
            else:
                self._stages[i] = new
        elif new is not None:
            self._stages.append(new)

    def reset_stages(self, ctx: PipelineContext | None = None) -> None:
        """Reset every stage's state (decoders, detectors) at the next sample."""
        self.resets += 1
        self._end_segment()
    def stop(self) -> None:
        self._stop_event.set()
        self._sink.wakeup.set()

    def request_status(self) -> None:
        """Publish a status message as soon as possible (a state changed)."""
        self._status_now.set()
        self._sink.wakeup.set()

    # ------------------------------------------------------------------ thread body
    def run(self) -> None:
        try:
            publisher = Publisher(self._pub_endpoint, hwm=self._pub_hwm)
        except BaseException as exc:  # reported to the daemon, which exits non-zero
            self.error = exc
            self.ready.set()
            return
        self.endpoint = publisher.endpoint
        publisher.tap = self._tap
        ctx = PipelineContext(self._device_id(), self._simulated, self.clock, publisher)
        self._ctx = ctx
        self.ready.set()
        try:
            self._loop(ctx)
        except BaseException as exc:  # a bug: make it visible, never die silently
            log.exception("pipeline thread failed")
            self.error = exc
        finally:
            publisher.close()

    def _loop(self, ctx: PipelineContext) -> None:
        reader = self._reader = self._sink.ring.reader(start="oldest")
        self._sink.lag_sources.append(reader.lag)
        data = np.empty((READ_BLOCK, N_CHANNELS), dtype=np.float32)
        index = np.empty(READ_BLOCK, dtype=np.int64)
        t_recv = np.empty(READ_BLOCK, dtype=np.int64)
        wakeup = self._sink.wakeup
        next_status = time.monotonic_ns()
        self._status_state = _RateMeter()
        while True:
            stopping = self._stop_event.is_set()
            wakeup.wait(0.05)
            wakeup.clear()
            while True:  # drain everything available
                res = reader.read(data, index, t_recv)
                if res.lost:
                    self.overrun_samples += res.lost
                    self._end_segment()
                if res.n == 0:
                    break
                self._consume(data[:res.n], index[:res.n], t_recv[:res.n], ctx)
            self._run_commands(ctx)
            now = time.monotonic_ns()
            if now >= next_status or self._status_now.is_set():
                self._status_now.clear()
                self._band_markers(ctx)
                self._publish_status(ctx, now)
                next_status = now + self._status_interval_ns
            if stopping:
                self._publish_status(ctx, time.monotonic_ns(), state="stopping")
                self._fail_commands()
                return

    def _band_markers(self, ctx: PipelineContext) -> None:
        """Publish MARKER frames the band sent (at most one status interval late)."""
        if self._pop_markers is None:
            return
        for marker in self._pop_markers():
            ctx.publish("marker", int(marker.counter), int(marker.t_recv_ns),
                        {"text": marker.text, "source": "band"})
            if self.marker_sink is not None:
                self.marker_sink(marker.text, int(marker.counter))

    def _run_commands(self, ctx: PipelineContext) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(ctx))
            except BaseException as exc:  # handed to the caller, never kills the loop
                future.set_exception(exc)

    def _fail_commands(self) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the pipeline is stopping"))

    def _consume(self, data: np.ndarray, index: np.ndarray, t_recv: np.ndarray,
                 ctx: PipelineContext) -> None:
        n = data.shape[0]
        if self._next_index is not None and index[0] != self._next_index:
            self._gap(int(index[0]) - self._next_index)
        if int(index[-1]) - int(index[0]) != n - 1:  # a gap inside this read: split it
            breaks = np.flatnonzero(np.diff(index) != 1) + 1
            start = 0
            for stop in (*breaks.tolist(), n):
                if start:
                    self._gap(int(index[start]) - int(index[start - 1]) - 1)
                self._run_stages(data[start:stop], index[start:stop], t_recv[start:stop], ctx)
                start = stop
        else:
            self._run_stages(data, index, t_recv, ctx)
        self._next_index = int(index[-1]) + 1

    def _tap(self, topic: bytes, payload: bytes) -> None:
        tap = self.event_tap
        if tap is not None:
            tap(topic, payload)

    def _run_stages(self, data: np.ndarray, index: np.ndarray, t_recv: np.ndarray,
                    ctx: PipelineContext) -> None:
        self.clock.update(int(index[0]), int(index.shape[0]), int(t_recv[-1]))
        self.clock_index = int(index[-1]) + 1
        if not self._id_final:  # until the band has said its serial number
            ctx.device_id = self._device_id()
            self._id_final = self._id_is_final()
        for stage in self._stages:
            stage.process(data, index, t_recv, ctx)
        self.samples += int(index.shape[0])
        self.progress += 1

    def _gap(self, lost: int) -> None:
        self.gaps += 1
        if lost > 0:
            self.gap_samples += lost
        self._end_segment()
        self.clock.reset()

    def _end_segment(self) -> None:
        self.segments += 1
        self._next_index = None
        for stage in self._stages:
            stage.reset()

    # ------------------------------------------------------------------ status
    def _publish_status(self, ctx: PipelineContext, now: int, state: str = "running") -> None:
        ctx.device_id = self._device_id()  # the band's serial number, once it has said it
        dev = dict(self._device_stats())
        rate = self._status_state.rate(self.samples, now)
        k = min(ctx.n_latencies, LATENCY_WINDOW)
        if k:
            lat = np.percentile(ctx.latencies[:k], [50, 99]) / 1000.0
            latency = {"p50_us": float(lat[0]), "p99_us": float(lat[1])}
        else:
            latency = {"p50_us": None, "p99_us": None}
        ring = self._sink.ring
        fields: dict[str, Any] = {
            "state": state,
            "rate_hz": rate,
            "nominal_rate_hz": float(SAMPLE_RATE),
            "samples": self.samples,
            "gaps": self.gaps,
            "gap_samples": self.gap_samples,
            "overrun_samples": self.overrun_samples,
            "ring_fill": self._reader.lag() / ring.capacity,
            "latency": latency,
            "cpu": self._status_state.cpu(now),
            "pub_sent": ctx.publisher.sent,
            "pub_dropped": ctx.publisher.dropped,
            "drift_ppm": float(self.clock.drift_ppm),
            "device_stats": dev,
        }
        fields["resets"] = self.resets
        for key in ("link", "battery", "frames", "crc_errors", "lost_samples"):
            if key in dev:
                fields[key] = dev[key]
        fields.update(self.extra_status)
        for key, source in list(self.status_sources.items()):
            fields[key] = source()
        self.last_status = fields
        sample = self._next_index - 1 if self._next_index else 0
        ctx.publisher.publish("status", ctx.device_id, max(sample, 0),
                              self.clock.unix_time(max(sample, 0)), now, self._simulated,
                              fields)


class _RateMeter:
    """Achieved sample rate and process CPU share between two status messages."""

    def __init__(self) -> None:
        self._t = time.monotonic_ns()
        self._n = 0
        self._cpu_t = time.monotonic_ns()
        self._cpu = time.process_time()

    def rate(self, samples: int, now: int) -> float:
        dt = (now - self._t) / 1e9
        value = (samples - self._n) / dt if dt > 0 else 0.0
        self._t, self._n = now, samples
        return value

    def cpu(self, now: int) -> float:
        """Process CPU use since the last call, in percent of one core."""
        cpu = time.process_time()
        dt = (now - self._cpu_t) / 1e9
        value = 100.0 * (cpu - self._cpu) / dt if dt > 0 else 0.0
        self._cpu_t, self._cpu = now, cpu
        return value


__all__ = ["Pipeline", "PipelineContext", "NotifyingSink", "RawStage", "Stage"]
