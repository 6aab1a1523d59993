"""Decoding rules as streaming, side-effect-free detectors (reference §4.1–4.3).

The caller feeds network outputs with the device sample index each output refers to (the
last sample of its receptive field) and turns the small records returned into events. Nothing
here reads a clock, opens a socket or logs per frame.

- :class:`GestureDetector`: threshold crossings of sigmoid(logits) plus debounce (§4.1);
  :func:`detect_offline` is the same rule written literally on a whole array (the oracle).
- :class:`CtcGreedyDecoder`: streaming greedy CTC (§4.3); :func:`greedy_decode` is the oracle.
- :class:`LineEditor`: emitted labels to ``handwriting`` key events (line text, enter, idle).
- :class:`WristIntegrator`: wrist output to velocity and an integrated, clamped position (§4.2).

Choices that the reference leaves open are documented in ``docs/events.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from emgd.vocab import BACKSPACE, BLANK, ENTER, KEY_NAMES, NUM_KEYS, PAUSE, SHIFT, SPACE

#: Reference gesture output order (``GestureType``).
GESTURES = ("index_press", "index_release", "middle_press", "middle_release", "thumb_click",
            "thumb_down", "thumb_in", "thumb_out", "thumb_up")
#: Reference ``THRESHOLD``.
THRESHOLD = 0.35
#: Reference ``DEBOUNCE`` (0.05 s) in samples at 2 kHz.
DEBOUNCE_SAMPLES = 100
#: Samples between two gesture outputs; output t of a stream starting at s0 ends at s0+20+10t.
GESTURE_STRIDE = 10
GESTURE_FIRST = 20


class FingerState(StrEnum):
    NEUTRAL = "neutral"
    INDEX = "index"
    MIDDLE = "middle"


@dataclass(frozen=True, slots=True)
class GestureHit:
    """One kept detection: gesture ``name`` (label ``index``), probability ``p`` at the
    crossing frame, ``sample`` = last sample of that output's receptive field."""

    name: str
    index: int
    p: float
    sample: int


def is_release(name: str) -> bool:
    """Release gestures (``index_release``, ``middle_release``) debounce only against their
    own kind; every other gesture is a non-release event."""
    return name.endswith("_release")


def _per_gesture(value: float | Mapping[str, float], labels: Sequence[str], what: str,
                 default: float) -> list[float]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(labels))
        if unknown:
            raise ValueError(f"{what} given for unknown gestures {unknown}; known: {list(labels)}")
        return [float(value.get(name, default)) for name in labels]
    return [float(value)] * len(labels)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    """float64 sigmoid; the one function both the streaming and the offline path use."""
    x = np.asarray(logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x))


class _Debouncer:
    """§4.1 debounce: compare each candidate with the last *kept* event."""

    __slots__ = ("releases", "windows", "last_index", "last_sample")

    def __init__(self, labels: Sequence[str], windows: Sequence[float]) -> None:
        self.releases = [is_release(n) for n in labels]
        self.windows = list(windows)
        self.last_index = -1
        self.last_sample = 0

    def keep(self, index: int, sample: int) -> bool:
        last = self.last_index
        if last >= 0 and sample - self.last_sample < self.windows[index]:
            new_rel, last_rel = self.releases[index], self.releases[last]
            if (not new_rel and not last_rel) or (new_rel and last_rel and index == last):
                return False
        self.last_index, self.last_sample = index, sample
        return True


class GestureDetector:
    """Streaming §4.1 detector over the gesture network's logits.

    ``threshold`` and ``debounce_samples`` are one value for all gestures or a mapping from
    gesture name to value (missing names get the reference defaults). The debounce window
    that applies is the one of the *new* event. Δ is measured in device samples and an event
    is dropped when Δ < window (see ``docs/events.md`` for why 100 samples is the exact
    analogue of the reference's Δt < 0.05 s).
    """

    def __init__(self, labels: Sequence[str] = GESTURES,
                 threshold: float | Mapping[str, float] = THRESHOLD,
                 debounce_samples: float | Mapping[str, float] = DEBOUNCE_SAMPLES) -> None:
        self.labels = tuple(labels)
        self._thr = np.array(_per_gesture(threshold, self.labels, "threshold", THRESHOLD))
        windows = _per_gesture(debounce_samples, self.labels, "debounce", DEBOUNCE_SAMPLES)
        self._debounce = _Debouncer(self.labels, windows)
        self._index = {n: i for i, n in enumerate(self.labels)}
        self._press_state = {
            self._index[n]: s for n, s in (("index_press", FingerState.INDEX),
                                           ("middle_press", FingerState.MIDDLE))
            if n in self._index}
        self._release_of = {
            self._index[n]: s for n, s in (("index_release", FingerState.INDEX),
                                           ("middle_release", FingerState.MIDDLE))
            if n in self._index}
        self.finger_state = FingerState.NEUTRAL
        self._prev_below = np.ones(len(self.labels), dtype=bool)  # a restart: "below" before

    def reset(self) -> None:
        """After a gap: the next frame is a first frame, debounce memory and finger state clear."""
        self._prev_below[:] = True
        self._debounce.last_index = -1
        self.finger_state = FingerState.NEUTRAL

    def push(self, logits: np.ndarray, first_sample: int) -> list[GestureHit]:
        """Feed ``logits`` (k, n_labels); output j ends at sample ``first_sample + 10 j``."""
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise ValueError(f"logits must be (k, {len(self.labels)}), got {logits.shape}")
        k = logits.shape[0]
        if k == 0:
            return []
        p = _sigmoid(logits)
        above = p >= self._thr
        below = p < self._thr
        cross = above
        cross[0] &= self._prev_below
        if k > 1:
            cross[1:] &= below[:-1]
        self._prev_below = below[-1].copy()
        if not cross.any():
            return []
        hits = []
        for j, i in zip(*np.nonzero(cross)):  # row-major: frames in time order, labels in order
            hit = self._consider(int(i), float(p[j, i]), first_sample + GESTURE_STRIDE * int(j))
            if hit is not None:
                hits.append(hit)
        return hits

    def _consider(self, index: int, p: float, sample: int) -> GestureHit | None:
        if not self._debounce.keep(index, sample):
            return None
        if index in self._press_state:
            self.finger_state = self._press_state[index]
        elif self._release_of.get(index) == self.finger_state:
            self.finger_state = FingerState.NEUTRAL
        return GestureHit(self.labels[index], index, p, sample)


def detect_offline(logits: np.ndarray, s0: int = 0, labels: Sequence[str] = GESTURES,
                   threshold: float | Mapping[str, float] = THRESHOLD,
                   debounce_samples: float | Mapping[str, float] = DEBOUNCE_SAMPLES,
                   ) -> list[GestureHit]:
    """§4.1 on a whole stream: ``logits`` (T, n_labels), the stream's first sample ``s0``.

    Written literally (per-gesture event lists, merged, stably sorted by sample, debounced)
    as the oracle for :class:`GestureDetector`.
    """
    labels = tuple(labels)
    thr = _per_gesture(threshold, labels, "threshold", THRESHOLD)
    probs = _sigmoid(logits)
    samples = s0 + GESTURE_FIRST + GESTURE_STRIDE * np.arange(probs.shape[0])
    events: list[tuple[int, int, float]] = []
    for i in range(len(labels)):
        p = probs[:, i]
        for t in range(p.shape[0]):
            if (t == 0 and p[0] >= thr[i]) or (t > 0 and p[t - 1] < thr[i] <= p[t]):
                events.append((int(samples[t]), i, float(p[t])))
    events.sort(key=lambda e: e[0])
    window = _per_gesture(debounce_samples, labels, "debounce", DEBOUNCE_SAMPLES)
    kept: list[GestureHit] = []
    for s, i, p in events:
        if kept and s - kept[-1].sample < window[i]:
            a, b = kept[-1].name, labels[i]
            if (not is_release(a) and not is_release(b)) or (is_release(a) and a == b):
                continue
        kept.append(GestureHit(labels[i], i, p, s))
    return kept


# ----------------------------------------------------------------------------- handwriting


@dataclass(frozen=True, slots=True)
class Emitted:
    """A label emitted by greedy CTC at the emission ending at ``sample``."""

    label: int
    sample: int


def greedy_decode(logprobs: np.ndarray, blank: int = BLANK) -> list[int]:
    """Offline greedy CTC (§4.3): argmax per row, collapse repeats, drop blanks."""
    out: list[int] = []
    prev = blank
    for label in np.argmax(logprobs, axis=1).tolist():
        if label != blank and label != prev:
            out.append(label)
        prev = label
    return out


class CtcGreedyDecoder:
    """Streaming greedy CTC with ``prev_label`` carried across calls."""

    def __init__(self, blank: int = BLANK) -> None:
        self.blank = blank
        self.prev_label = blank

    def reset(self) -> None:
        self.prev_label = self.blank

    def push(self, logprobs: np.ndarray, samples: Sequence[int] | np.ndarray) -> list[Emitted]:
        """Feed emissions ``logprobs`` (k, classes) ending at ``samples`` (k,)."""
        if logprobs.ndim != 2 or len(samples) != logprobs.shape[0]:
            raise ValueError(f"need (k, classes) emissions and k samples, got "
                             f"{logprobs.shape} and {len(samples)}")
        out: list[Emitted] = []
        prev, blank = self.prev_label, self.blank
        for label, sample in zip(np.argmax(logprobs, axis=1).tolist(), samples):
            if label != blank and label != prev:
                out.append(Emitted(label, int(sample)))
            prev = label
        self.prev_label = prev
        return out


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One ``handwriting`` event. ``key`` is None (and ``label`` None) for an idle
    finalisation; ``text`` is the line after the key (the finished line when ``final``)."""

    key: str | None
    label: int | None
    text: str
    final: bool
    sample: int


class LineEditor:
    """Applies emitted keys to the current line; enter or ``idle_samples`` of no key after a
    non-empty line finalise it. ``idle_samples=None`` disables idle finalisation."""

    def __init__(self, idle_samples: int | None = None) -> None:
        if idle_samples is not None and idle_samples <= 0:
            raise ValueError(f"idle_samples must be positive or None, got {idle_samples}")
        self.idle_samples = idle_samples
        self.text = ""
        self._last_sample: int | None = None  # sample of the last key of the open line

    def push(self, emitted: Iterable[Emitted]) -> list[KeyEvent]:
        out: list[KeyEvent] = []
        for e in emitted:
            done = self.tick(e.sample)
            if done is not None:
                out.append(done)
            out.append(self._apply(e.label, e.sample))
        return out

    def tick(self, sample: int) -> KeyEvent | None:
        """Idle finalisation if ``idle_samples`` have passed since the last key at ``sample``.

        The record's ``sample`` is the deadline (last key + idle), whatever ``sample`` is.
        """
        if self.idle_samples is None or self._last_sample is None or not self.text:
            return None
        deadline = self._last_sample + self.idle_samples
        if sample < deadline:
            return None
        return self._finish(None, None, deadline)

    def flush(self, sample: int) -> KeyEvent | None:
        """Finalise a non-empty line now (shutdown); None when the line is empty."""
        return self._finish(None, None, sample) if self.text else None

    def _apply(self, label: int, sample: int) -> KeyEvent:
        if not 0 <= label < NUM_KEYS:
            raise ValueError(f"label {label} is not a key")
        if label == ENTER:
            return self._finish("enter", label, sample)
        if label == BACKSPACE:
            self.text = self.text[:-1]
        elif label == SPACE:
            self.text += " "
        elif label not in (SHIFT, PAUSE):
            self.text += KEY_NAMES[label]
        self._last_sample = sample
        return KeyEvent(KEY_NAMES[label], label, self.text, False, sample)

    def _finish(self, key: str | None, label: int | None, sample: int) -> KeyEvent:
        event = KeyEvent(key, label, self.text, True, sample)
        self.text = ""
        self._last_sample = None
        return event


# ----------------------------------------------------------------------------------- wrist


@dataclass(frozen=True, slots=True)
class WristSample:
    """One wrist frame: network ``value`` (rad per frame), ``velocity_deg_s``,
    ``position_rad`` (integrated, gained, clamped, optionally smoothed), ``sample``."""

    value: float
    velocity_deg_s: float
    position_rad: float
    sample: int


class WristIntegrator:
    """Velocity and integrated position from the wrist network's per-frame angle change.

    ``position = clamp(position + gain * value, min_rad, max_rad)``; ``velocity =
    rad2deg(value) * frame_hz`` (no gain). ``smoothing`` s in [0, 1) is an exponential
    moving average ``y = s * y_prev + (1 - s) * x`` applied to the published velocity and
    position only (0 = off). A non-finite value is published as is and does not move the
    position.
    """

    def __init__(self, gain: float = 1.0, min_rad: float = -math.inf, max_rad: float = math.inf,
                 smoothing: float = 0.0, frame_hz: float = 50.0) -> None:
        if not min_rad <= max_rad:
            raise ValueError(f"min_rad {min_rad} must not exceed max_rad {max_rad}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.gain, self.min_rad, self.max_rad = float(gain), float(min_rad), float(max_rad)
        self.smoothing, self.frame_hz = float(smoothing), float(frame_hz)
        self.position = self._clamp(0.0)
        self._vel_avg: float | None = None
        self._pos_avg = self.position

    def _clamp(self, x: float) -> float:
        return min(max(x, self.min_rad), self.max_rad)

    def reset(self) -> None:
        """After a gap: keep the position, restart the velocity average."""
        self._vel_avg = None
        self._pos_avg = self.position

    def recenter(self, position_rad: float = 0.0) -> None:
        """Set the position (clamped) and forget the averages."""
        self.position = self._clamp(float(position_rad))
        self._pos_avg = self.position
        self._vel_avg = None

    def push(self, values: np.ndarray | Sequence[float],
             samples: np.ndarray | Sequence[int]) -> list[WristSample]:
        """Feed network outputs ``values`` (k,) for the frames ending at ``samples`` (k,)."""
        vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
        if len(vals) != len(samples):
            raise ValueError(f"{len(vals)} values but {len(samples)} samples")
        s, hz = self.smoothing, self.frame_hz
        out = []
        for value, sample in zip(vals, samples):
            value = float(value)
            velocity = math.degrees(value) * hz
            position = self.position
            if math.isfinite(value):
                position = self.position = self._clamp(position + self.gain * value)
                if s:
                    if self._vel_avg is not None:
                        velocity = s * self._vel_avg + (1.0 - s) * velocity
                    self._vel_avg = velocity
                    position = self._pos_avg = s * self._pos_avg + (1.0 - s) * position
            elif s:
                position = self._pos_avg
            out.append(WristSample(value, velocity, position, int(sample)))
        return out


__all__ = ["GESTURES", "THRESHOLD", "DEBOUNCE_SAMPLES", "FingerState", "GestureHit",
           "GestureDetector", "detect_offline", "is_release", "Emitted", "greedy_decode",
           "CtcGreedyDecoder", "KeyEvent", "LineEditor", "WristSample", "WristIntegrator"]
