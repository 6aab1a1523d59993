"""Decoder stages of the pipeline: features → decoders → detectors → events.

One :class:`DecoderStage` owns everything model-related of one device: the (optional)
high-pass for the MPF decoders, the shared incremental MPF extractor, the three decoders
and their detectors. It is a pipeline :class:`~emgd.pipeline.Stage`: fed contiguous
samples, reset at every segment boundary (gap, overrun, ``emgd ctl reset``).

Sample indices: a segment starts at device index ``s0`` (the first sample after a reset).
A decoder's output ``j`` ends at segment sample ``card.output_sample(j)``, i.e. at device
index ``s0 + card.output_sample(j)``; that is the event's ``sample``, and the arrival time
of that sample is its ``t_recv_ns``.

Order of work in one block (``process``): the gesture step and its events first; then the
MPF extractor, the wrist step and the handwriting step when frames completed (every 40
samples, so with 10-sample blocks one block in four). A handwriting call (one pair of MPF
frames) emits only on every 4th call (``HandwritingDecoder.emits_within`` knows which from
the card's timing); the others publish nothing, so they need not run in the already heavy
frame block: they wait in the decoder's buffer and run one per *light* block (a block with no
MPF frames), after that block's gesture events. A call that can emit, more than
``HW_MAX_DEFERRED`` new calls, or any call when one still waits from an earlier frame block
(no light block came: large blocks) runs at once with everything before it, so emissions come
no later than without deferral; calls always run in order, and a reset drops what waits with
the rest of the buffer. Published messages are the same either way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emgd.decoders import Decoder, load_decoder, mpf_highpass
from emgd.detection import CtcGreedyDecoder, GestureDetector, LineEditor, WristIntegrator
from emgd.errors import ConfigError, ModelError
from emgd.modelcard import load_card
from emgd.vocab import key_name

log = logging.getLogger(__name__)

TASKS = ("discrete_gestures", "handwriting", "wrist")
MPF_CHUNK = 2000  # samples per MpfExtractor.push
# Handwriting calls that cannot emit may wait for a light block (no MPF frames): at most this
# many new ones per frame block, and only when none still waits from before.
HW_MAX_DEFERRED = 1


@dataclass(frozen=True)
class EventOptions:
    """Detector settings from the config (card values are the defaults)."""

    outputs: bool = False  # publish per-frame network outputs on outputs/<device>
    idle_s: float = 0.0  # handwriting: finalise a line after this idle time (0 = never)
    wrist_gain: float = 1.0
    wrist_min_rad: float = -np.inf
    wrist_max_rad: float = np.inf
    wrist_smoothing: float = 0.0
    gesture_batch_hops: int = 1  # gesture hops per session call (CPU vs latency)
    decoder_backend: str = "native-int16"  # emgd's Numba kernels, or "onnx"
    gesture_threshold: tuple[tuple[str, float], ...] = ()  # per-gesture overrides
    gesture_debounce_ms: tuple[tuple[str, float], ...] = ()


def find_model_cards(folders: list[Path]) -> dict[str, Path]:
    """One card per task from the folders; a later folder overrides an earlier one."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            try:
                card = load_card(path)
            except ModelError:
                continue  # not a model card (or a broken one: reported when loaded by name)
            if card.task in found and found[card.task].parent == folder:
                raise ModelError(f"two {card.task} models in {folder}: {found[card.task].name} "
                                 f"and {path.name}; keep one, or point --models at a folder "
                                 "with one model per task")
            found[card.task] = path
    return found


class DecoderStage:
    """Runs the loaded decoders on contiguous samples and publishes their events."""

    def __init__(self, cards: dict[str, Path], options: EventOptions = EventOptions()) -> None:
        t_load = time.monotonic()
        self.options = options
        self.decoders: dict[str, Decoder] = {}
        for task in TASKS:
            if task in cards:
                self.decoders[task] = load_decoder(cards[task], backend=options.decoder_backend)
        self.gesture = self.decoders.get("discrete_gestures")
        self.wrist = self.decoders.get("wrist")
        self.handwriting = self.decoders.get("handwriting")
        mpf_cards = [d.card for d in (self.wrist, self.handwriting) if d is not None]
        self._mpf = None
        self._highpass = None
        if mpf_cards:
            from emgd.mpf import MpfExtractor

            self._mpf = MpfExtractor(handwriting=self.handwriting is not None,
                                     wrist=self.wrist is not None, max_push=MPF_CHUNK)
            hp = mpf_highpass(mpf_cards)
            if hp is not None:
                from emgd.highpass import HighPass

                self._highpass = HighPass(hp[0], order=hp[1])
                self._hp_out = np.empty((MPF_CHUNK, 16), dtype=np.float32)
        if self.gesture is not None:
            self._gestures = self._gesture_detector(self.gesture.card, options)
            # rows (samples) to gather before one session call: 1 hop = lowest latency
            self._gesture_batch = self.gesture.unit * max(1, options.gesture_batch_hops)
        if self.handwriting is not None:
            blank = self.handwriting.card.output.blank
            self._ctc = CtcGreedyDecoder(blank=99 if blank is None else blank)
            idle = int(options.idle_s * 2000) if options.idle_s > 0 else None
            self._line = LineEditor(idle_samples=idle)
        if self.wrist is not None:
            self._wrist = WristIntegrator(gain=options.wrist_gain, min_rad=options.wrist_min_rad,
                                          max_rad=options.wrist_max_rad,
                                          smoothing=options.wrist_smoothing)
        self._s0: int | None = None
        self._mpf_base = 0
        self._mpf_frames = False
        self.deferred_emissions = 0  # deferred handwriting calls that emitted (should stay 0)
        self.load_s = time.monotonic() - t_load  # sessions, native weights, kernel checks
        self.warmup_s = 0.0
        self.events = 0

    @staticmethod
    def _gesture_detector(card: Any, options: EventOptions) -> GestureDetector:
        """Card defaults, then the config's per-gesture overrides (names checked)."""
        labels = list(card.output.labels)
        rate = card.input.sample_rate
        unknown = sorted({n for n, _ in options.gesture_threshold + options.gesture_debounce_ms}
                         - set(labels))
        if unknown:
            raise ConfigError(f"gesture_threshold / gesture_debounce_ms name unknown gestures "
                              f"{unknown}; the model {card.name!r} knows {labels}")
        threshold = {n: float(card.events.get("threshold", 0.35)) for n in labels}
        threshold.update(dict(options.gesture_threshold))
        debounce = {n: float(card.events.get("debounce_samples", 100)) for n in labels}
        debounce.update({n: ms * rate / 1000.0 for n, ms in options.gesture_debounce_ms})
        return GestureDetector(labels, threshold=threshold, debounce_samples=debounce)

    # ------------------------------------------------------------------ set-up
    def warmup(self) -> float:
        """Compile/load the Numba kernels and run each decoder once; returns the seconds
        taken since construction began (loading, the kernels' checks and this warm-up)."""
        t0 = time.monotonic()
        if self._mpf is not None:
            from emgd.mpf import warmup as mpf_warmup

            mpf_warmup()
        if self._highpass is not None:
            self._highpass.process(np.zeros((10, 16), np.float32))
            self._highpass.reset()
        for decoder in self.decoders.values():
            decoder.warmup()
        self.warmup_s = self.load_s + time.monotonic() - t0
        return self.warmup_s

    def describe(self) -> dict[str, Any]:
        """For ``status``: which model runs each task, warm-up time, finger state."""
        out: dict[str, Any] = {
            "loaded": {task: {"name": d.card.name, "licence": d.card.licence,
                              "source": d.card.provenance.get("source"),
                              "backend": d.backend}
                       for task, d in self.decoders.items()},
            "warmup_s": round(self.warmup_s, 3),
            "events": self.events,
        }
        if self.gesture is not None:
            out["finger"] = str(self._gestures.finger_state)
        if self.handwriting is not None:
            out["line"] = self._line.text
        return out

    # ------------------------------------------------------------------ Stage protocol
    def reset(self) -> None:
        self._s0 = None
        for decoder in self.decoders.values():
            decoder.reset()
        if self._mpf is not None:
            self._mpf.reset()
            self._mpf_base = self._mpf.samples_seen
        if self._highpass is not None:
            self._highpass.reset()
        if self.gesture is not None:
            self._gestures.reset()
        if self.handwriting is not None:
            self._ctc.reset()
        if self.wrist is not None:
            self._wrist.reset()

    def process(self, data: np.ndarray, index: np.ndarray, t_recv: np.ndarray, ctx: Any) -> None:
        if self._s0 is None:
            self._s0 = int(index[0])
        if self.gesture is not None:
            self.gesture.accept(data)
            if self.gesture.buffered >= self._gesture_batch:
                self._gesture_step(index, t_recv, ctx)
        if self._mpf is not None:
            self._mpf_frames = False
            for a in range(0, data.shape[0], MPF_CHUNK):
                self._mpf_push(data[a:a + MPF_CHUNK], index, t_recv, ctx)
            if (not self._mpf_frames and self.handwriting is not None
                    and self.handwriting.ready()):
                # a light block (gesture work only): one deferred handwriting call
                self._handwriting_step(index, t_recv, ctx, max_units=1)
        if self.handwriting is not None and self.options.idle_s > 0:
            self._idle(int(index[-1]), int(t_recv[-1]), ctx)

    # ------------------------------------------------------------------ per decoder
    def _t_recv(self, sample: int, index: np.ndarray, t_recv: np.ndarray) -> int:
        k = sample - int(index[0])
        return int(t_recv[min(max(k, 0), len(t_recv) - 1)])

    def _gesture_step(self, index: np.ndarray, t_recv: np.ndarray, ctx: Any) -> None:
        dec = self.gesture
        out = dec.step()
        if len(out.values) == 0:
            return
        first_sample = self._s0 + dec.output_sample(out.first)
        if self.options.outputs:
            self._publish_outputs(ctx, "gesture", out.values, first_sample, dec.card.timing.hop,
                                  index, t_recv)
        for hit in self._gestures.push(out.values, first_sample):
            ctx.publish("gesture", hit.sample, self._t_recv(hit.sample, index, t_recv),
                        {"name": hit.name, "p": float(hit.p)})
            self.events += 1

    def _mpf_push(self, x: np.ndarray, index: np.ndarray, t_recv: np.ndarray, ctx: Any) -> None:
        if self._highpass is not None:
            x = self._highpass.process(x, out=self._hp_out[:x.shape[0]])
        n_hw, n_wr = self._mpf.push(x)
        if n_hw or n_wr:
            self._mpf_frames = True
        if n_wr and self.wrist is not None:
            self.wrist.accept(self._mpf.out_wrist[:n_wr])
            self._wrist_step(index, t_recv, ctx)
        if n_hw and self.handwriting is not None:
            dec = self.handwriting
            backlog = dec.ready()  # deferred calls no light block has run yet
            if dec.buffered + n_hw > dec.capacity:
                self._handwriting_step(index, t_recv, ctx)  # make room: run the backlog
            dec.accept(self._mpf.out_hw[:n_hw])
            units = dec.buffered // dec.unit
            if backlog or units > HW_MAX_DEFERRED or dec.emits_within(units):
                self._handwriting_step(index, t_recv, ctx)
            # else: no call can emit yet; they run one per light block (process), in order

    def _output_samples(self, dec: Decoder, out: Any) -> np.ndarray:
        """Device index of the last sample of each new output row (outputs are ``hop`` apart)."""
        first = self._s0 + dec.output_sample(out.first)
        return first + dec.card.timing.hop * np.arange(len(out.values), dtype=np.int64)

    def _wrist_step(self, index: np.ndarray, t_recv: np.ndarray, ctx: Any) -> None:
        dec = self.wrist
        out = dec.step()
        if len(out.values) == 0:
            return
        samples = self._output_samples(dec, out)
        if self.options.outputs:
            self._publish_outputs(ctx, "wrist", out.values, int(samples[0]),
                                  dec.card.timing.hop, index, t_recv)
        for w in self._wrist.push(out.values[:, 0], samples):
            ctx.publish("wrist", w.sample, self._t_recv(w.sample, index, t_recv),
                        {"value": float(w.value), "velocity": float(w.velocity_deg_s),
                         "position": float(w.position_rad)})
            self.events += 1

    def _handwriting_step(self, index: np.ndarray, t_recv: np.ndarray, ctx: Any,
                          max_units: int | None = None) -> None:
        dec = self.handwriting
        out = dec.step(max_units)
        if len(out.values) == 0:
            return
        if max_units is not None:  # a deferred call emitted: emits_within() was wrong
            self.deferred_emissions += 1
        samples = self._output_samples(dec, out)
        if self.options.outputs:
            self._publish_outputs(ctx, "handwriting", out.values, int(samples[0]),
                                  dec.card.timing.hop, index, t_recv)
        emitted = self._ctc.push(out.values, samples)
        for key in self._line.push(emitted):
            self._publish_key(key, index, t_recv, ctx)

    def _idle(self, sample: int, t_recv_ns: int, ctx: Any) -> None:
        key = self._line.tick(sample)
        if key is not None:
            ctx.publish("handwriting", key.sample, t_recv_ns, _key_fields(key))
            self.events += 1

    def _publish_key(self, key: Any, index: np.ndarray, t_recv: np.ndarray, ctx: Any) -> None:
        ctx.publish("handwriting", key.sample, self._t_recv(key.sample, index, t_recv),
                    _key_fields(key))
        self.events += 1

    def _publish_outputs(self, ctx: Any, model: str, values: np.ndarray, first_sample: int,
                         stride: int, index: np.ndarray, t_recv: np.ndarray) -> None:
        v = np.ascontiguousarray(values, dtype="<f4")
        ctx.publish("outputs", first_sample,
                    self._t_recv(first_sample + stride * (len(v) - 1), index, t_recv),
                    {"model": model, "n": int(v.shape[0]), "channels": int(v.shape[1]),
                     "stride": int(stride), "data": v.tobytes()})


def _key_fields(key: Any) -> dict[str, Any]:
    return {"key": key.key, "text": key.text, "final": bool(key.final)}


__all__ = ["DecoderStage", "EventOptions", "TASKS", "find_model_cards", "key_name"]
