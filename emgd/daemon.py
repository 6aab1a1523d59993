"""The daemon: one device, its ring, its pipeline thread, signals and the status line.

The main thread runs an asyncio loop (signals, the terminal status line; later the
control socket, BLE and sd_notify). The device writes into the ring from its own thread;
the pipeline thread reads it and publishes. Shutdown order on SIGINT/SIGTERM: stop the
device (no new samples), let the pipeline drain the ring and publish a last status,
close the sockets, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from emgd import SAMPLE_RATE
from emgd.config import Settings
from emgd.control import ControlServer
from emgd.ctlcommands import control_handlers
from emgd.errors import EmgdError, ModelError
from emgd.stages import DecoderStage, EventOptions, find_model_cards
from emgd.pipeline import NotifyingSink, Pipeline, RawStage, Stage
from emgd.ringbuffer import RingBuffer
from emgd.sdnotify import Notifier, ProgressWatchdog, format_status

#: The daemon speaks sd_notify (READY, STATUS, WATCHDOG, STOPPING); tests check for this.
SD_NOTIFY = True
#: The daemon records (--record, emgd ctl record) and replays with the recording's time base.
RECORDING = True

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 1.5


def resolve_device_url(url: str) -> str:
    """``auto`` (``auto?timeout=S``): look for a band (:mod:`emgd.drivers.discovery`);
    none found → the simulated band, said loudly. Any other URL is returned unchanged."""
    return _resolve(url)[0]


def _resolve(url: str) -> tuple[str, str | None]:
    """(concrete URL, fallback reason or None)."""
    from emgd.drivers.urls import split_url

    if split_url(url.strip())[0] != "auto":
        return url, None
    from emgd.drivers.discovery import resolve_auto

    found = resolve_auto(url)
    if not found.fallback:
        log.info("device auto: %s → %s", found.reason, found.url)
        return found.url, None
    log.warning("%s (device auto): running on the SIMULATED band; every event "
                "says simulated=true. Pass --device ble or --device serial:PATH for a real band.",
                found.reason)
    return found.url, found.reason


class Daemon:
    """Owns the device, ring and pipeline for one band."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device: Any = None
        self.pipeline: Pipeline | None = None
        self.control: ControlServer | None = None
        self.decoders: DecoderStage | None = None
        self.sink: NotifyingSink | None = None
        self.recorder: Any = None
        self._last_recording: dict[str, Any] | None = None
        self._stop: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the device, bind the sockets and start streaming (raises EmgdError)."""
        from emgd.drivers.registry import open_device

        url, fallback = _resolve(self.settings.device)
        self.device = open_device(url)
        info = self.device.info
        ring = RingBuffer(capacity=int(self.settings.ring_seconds * SAMPLE_RATE))
        sink = NotifyingSink(ring)
        stages: list[Stage] = []
        if self.settings.raw:
            stages.append(RawStage())
        self.decoders = self._load_decoders()
        if self.decoders is not None:
            stages.append(self.decoders)
        fallback_id = _fallback_id(url)
        recorded_clock = getattr(self.device, "recorded_clock", None)
        self.sink = sink
        self.pipeline = Pipeline(
            sink=sink, device_id=lambda: self.device.info.device_id or fallback_id,
            simulated=info.simulated,
            stats=lambda: dataclasses.asdict(self.device.stats()),
            pub_endpoint=self.settings.pub, pub_hwm=self.settings.pub_hwm, stages=stages,
            status_interval_s=self.settings.status_interval_s,
            pop_markers=self.device.pop_markers,
            clock=recorded_clock() if recorded_clock is not None else None,
            device_id_known=lambda: bool(self.device.info.device_id))
        self.pipeline.status_sources["recording"] = self.recording_status
        if fallback is not None:
            self.pipeline.extra_status.update(fallback=True, fallback_reason=fallback)
        if self.decoders is not None:
            self.pipeline.status_sources["models"] = self.decoders.describe
        self.pipeline.start()
        self.pipeline.ready.wait()
        if self.pipeline.error is not None:
            self.device.close()
            raise self.pipeline.error
        try:
            self.control = ControlServer(self.settings.ctl, control_handlers(self))
        except EmgdError:
            self.stop()
            raise
        self.device.link_listener = lambda _state: self.pipeline.request_status()
        if self.settings.record:
            try:
                self.start_recording(self.settings.record, start="oldest")
            except EmgdError:
                self.stop()
                raise
        self.device.start(sink)
        log.info("emgd streaming from %s (%s) → %s%s", self.device.info.device_id, url,
                 self.pipeline.endpoint, " [SIMULATED]" if info.simulated else "")

    def stop(self) -> None:
        """Stop the device, drain the ring, close everything. Idempotent."""
        if self.device is not None:
            try:
                self.device.stop()
            finally:
                self.device.close()
        if self.control is not None:
            self.control.close()
        if self.pipeline is not None and self.pipeline.is_alive():
            self.pipeline.stop()
            self.pipeline.join(STOP_TIMEOUT_S)
            if self.pipeline.is_alive():
                log.error("pipeline did not stop within %.1f s", STOP_TIMEOUT_S)
        self.stop_recording()  # after the pipeline: its last events reach the file

    # ------------------------------------------------------------------ models
    def _load_decoders(self) -> DecoderStage | None:
        """Load one model per task and warm it up (before READY); None without models."""
        s = self.settings
        if s.models == "none":
            log.warning("models = none: running without decoders (status and raw only)")
            return None
        if s.models:
            folders = [Path(s.models)]
            if not folders[0].is_dir():
                raise ModelError(f"models folder {s.models} does not exist")
        else:
            from emgd.cli_models import shipped_models_dir, user_models_dir

            folders = [d for d in (shipped_models_dir(), user_models_dir()) if d is not None]
        cards = find_model_cards(folders)
        if not cards:
            log.warning("no models found in %s: running without decoders (status and raw "
                        "only); 'emgd models --help' tells how to import or build some",
                        ", ".join(str(f) for f in folders))
            return None
        rng = s.wrist_range_rad or float("inf")
        stage = DecoderStage(cards, EventOptions(
            outputs=s.outputs, idle_s=s.handwriting_idle_s, wrist_gain=s.wrist_gain,
            wrist_min_rad=-rng, wrist_max_rad=rng, wrist_smoothing=s.wrist_smoothing,
            gesture_batch_hops=s.gesture_batch_hops, decoder_backend=s.decoder_backend,
            gesture_threshold=tuple(sorted(s.gesture_threshold.items())),
            gesture_debounce_ms=tuple(sorted(s.gesture_debounce_ms.items()))))
        seconds = stage.warmup()
        log.info("models loaded and warmed up in %.2f s: %s (backends: %s)", seconds,
                 ", ".join(f"{t}={p.name}" for t, p in cards.items()),
                 ", ".join(f"{t}={d.backend}" for t, d in stage.decoders.items()))
        return stage

    def reload_models(self) -> dict[str, Any]:
        """Load and warm the models again, then swap them in at the next sample.

        Runs the loading outside the pipeline thread; on any error the running models stay
        and the error propagates (the control reply says why)."""
        new = self._load_decoders()
        old = self.decoders
        assert self.pipeline is not None
        pipeline = self.pipeline
        pipeline.submit(lambda _ctx: pipeline.replace_stage(old, new)).result(timeout=10)
        self.decoders = new
        if new is not None:
            pipeline.status_sources["models"] = new.describe
        else:
            pipeline.status_sources.pop("models", None)
        pipeline.request_status()
        return {"loaded": new.describe()["loaded"] if new is not None else {}}

    # ------------------------------------------------------------------ recording
    def start_recording(self, path: str, start: str = "now") -> dict[str, Any]:
        """Start writing the ring (and every published event) to an HDF5 file."""
        from emgd.recorder import Recorder

        if self.recorder is not None and self.recorder.running:
            raise EmgdError(f"already recording to {self.recorder.path}; stop it first")
        assert self.pipeline is not None and self.sink is not None
        pipeline = self.pipeline
        rec = Recorder(path, self.sink.ring, pipeline.clock, lambda: self.device.info,
                       start=start, clock_horizon=lambda: pipeline.clock_index)
        rec.start()
        self.recorder = rec
        self.sink.lag_sources.append(rec.lag)
        pipeline.event_tap = rec.add_event
        pipeline.marker_sink = rec.add_marker
        pipeline.request_status()
        log.info("recording to %s", path)
        return {"path": str(path)}

    def stop_recording(self) -> dict[str, Any] | None:
        """Stop the recording (every sample received so far is written). Idempotent."""
        rec = self.recorder
        if rec is None:
            return None
        if self.pipeline is not None:
            self.pipeline.event_tap = None
            self.pipeline.marker_sink = None
        rec.stop()
        if self.sink is not None and rec.lag in self.sink.lag_sources:
            self.sink.lag_sources.remove(rec.lag)
        self.recorder = None
        self._last_recording = rec.status()
        if self.pipeline is not None:
            self.pipeline.request_status()
        log.info("recording stopped: %s", rec.path)
        return self._last_recording

    def recording_status(self) -> dict[str, Any] | None:
        rec = self.recorder
        if rec is not None:
            return rec.status()
        return self._last_recording

    # ------------------------------------------------------------------ main loop
    def run(self, status_line: bool) -> int:
        """Run until SIGINT/SIGTERM; returns the exit code."""
        sys.setswitchinterval(self.settings.switch_interval_ms / 1000.0)
        self._notifier = Notifier.from_env()
        try:
            if not self._start_interruptibly():
                return 0  # SIGINT/SIGTERM while starting (e.g. during a BLE connect)
            return asyncio.run(self._main(status_line))
        finally:
            self.stop()
            self._notifier.close()
            if status_line:
                sys.stderr.write("\n")

    def _start_interruptibly(self) -> bool:
        """``start()`` with SIGINT/SIGTERM turned into a clean stop; False if interrupted."""
        def interrupt(_signum: int, _frame: Any) -> None:
            raise _StartInterrupted

        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()  # device open, sockets bound, kernels/models warm: then READY
            return True
        except _StartInterrupted:
            log.warning("stopped while starting")
            return False
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def _main(self, status_line: bool) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        assert self.pipeline is not None
        pipeline = self.pipeline
        notifier = self._notifier
        notifier.ready(status=format_status(pipeline.last_status))
        watchdog = ProgressWatchdog(notifier, lambda: pipeline.progress,
                                    expected=lambda: self.device.link == "up")
        wd_task = asyncio.create_task(watchdog.run(self._stop))
        ctl_task = asyncio.create_task(self.control.serve(self._stop))
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=0.5)
                except TimeoutError:
                    pass
                if pipeline.error is not None:
                    raise EmgdError(f"pipeline failed: {pipeline.error}")
                notifier.status(format_status(pipeline.last_status))
                if status_line:
                    self._print_status_line()
            notifier.stopping(status="stopping")
        finally:
            self._stop.set()
            await wd_task
            await ctl_task
        return 0

    def _print_status_line(self) -> None:
        st = self.pipeline.last_status if self.pipeline else {}
        if not st:
            return
        lat = st.get("latency", {})
        p99 = lat.get("p99_us")
        sim = " SIMULATED" if self.device.info.simulated else ""
        line = (f"\r{self.device.info.device_id}{sim} link={st.get('link', '?')} "
                f"rate={st.get('rate_hz', 0):7.1f}/s samples={st.get('samples', 0)} "
                f"lost={st.get('lost_samples', 0)} crc={st.get('crc_errors', 0)} "
                f"gaps={st.get('gaps', 0)} cpu={st.get('cpu', 0):4.1f}% "
                f"p99={'-' if p99 is None else f'{p99:.0f}µs'}  ")
        sys.stderr.write(line)
        sys.stderr.flush()


class _StartInterrupted(Exception):
    """SIGINT/SIGTERM arrived while the daemon was starting."""


def _fallback_id(url: str) -> str:
    """A device id until the band has reported its serial number (first STATUS frame)."""
    scheme, _, rest = url.partition(":")
    tail = rest.split("?")[0].rstrip("/").rpartition("/")[2]
    return f"{scheme.split('?')[0]}-{tail}" if tail else scheme.split("?")[0]


__all__ = ["Daemon", "resolve_device_url"]
