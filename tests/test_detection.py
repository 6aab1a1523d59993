"""The decoding rules (reference §4.1–4.3) as streaming detectors, against hand-worked cases.

Gesture output t of a stream that starts at sample s0 ends at s0 + 20 + 10 t, so with
s0 = 1000 output t is stamped 1020 + 10 t; 50 ms = 100 samples = 10 outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emgd.detection import (GESTURES, CtcGreedyDecoder, Emitted, FingerState, GestureDetector,
                            LineEditor, WristIntegrator, detect_offline, greedy_decode)
from emgd.vocab import BACKSPACE, BLANK, ENTER, PAUSE, SHIFT, str_to_labels

S0 = 1000
FIRST = S0 + 20
G = {name: i for i, name in enumerate(GESTURES)}
LO, HI = 0.1, 0.9


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def frames(n: int, **tracks: list[float]) -> np.ndarray:
    """(n, 9) logits, probability LO everywhere except the given per-gesture tracks."""
    probs = np.full((n, len(GESTURES)), LO)
    for name, track in tracks.items():
        probs[: len(track), G[name]] = track
    return np.vectorize(logit)(probs)


def detect(logits: np.ndarray, **kw) -> list[tuple[str, int]]:
    hits = GestureDetector(**kw).push(logits, FIRST)
    assert hits == detect_offline(logits, S0, **kw)
    return [(h.name, h.sample) for h in hits]


def at(t: int) -> int:
    return FIRST + 10 * t


# ----------------------------------------------------------------------------- gestures


def test_upward_crossings_only():
    track = [0.1, 0.2, 0.5, 0.6] + [0.2] * 8 + [0.4] + [0.34] * 10 + [0.36]
    hits = GestureDetector().push(frames(len(track), index_press=track), FIRST)
    assert [(h.name, h.sample) for h in hits] == [
        ("index_press", at(2)), ("index_press", at(12)), ("index_press", at(23))]
    assert [round(h.p, 12) for h in hits] == [0.5, 0.4, 0.36]  # p at the crossing frame
    assert all(h.index == G["index_press"] for h in hits)


def test_threshold_is_inclusive():
    x = logit(0.35)  # find the smallest float64 logit whose sigmoid is >= 0.35
    while 1 / (1 + math.exp(-x)) >= 0.35:
        x = np.nextafter(x, -np.inf)
    below, on = x, np.nextafter(x, np.inf)
    logits = frames(3)
    logits[:, G["thumb_up"]] = [below, on, below]
    assert detect(logits) == [("thumb_up", at(1))]


def test_first_frame_rule():
    assert detect(frames(3, thumb_in=[0.5, 0.6, 0.7])) == [("thumb_in", at(0))]
    assert detect(frames(3, thumb_in=[0.3, 0.6, 0.7])) == [("thumb_in", at(1))]


def test_first_frame_rule_again_after_reset():
    det = GestureDetector()
    assert [h.sample for h in det.push(frames(2, thumb_in=[0.1, 0.6]), FIRST)] == [at(1)]
    assert det.push(frames(1, thumb_in=[0.7]), at(2)) == []  # still above: no new edge
    det.reset()
    assert [h.sample for h in det.push(frames(1, thumb_in=[0.7]), 50_020)] == [50_020]


def test_crossing_across_call_boundaries():
    det = GestureDetector()
    track = [0.1, 0.5] + [0.2] * 10 + [0.8]
    hits = [h for t, p in enumerate(track)
            for h in det.push(frames(1, middle_press=[p]), at(t))]
    assert [h.sample for h in hits] == [at(1), at(12)]


def test_same_frame_events_in_label_order():
    # a release and a non-release in the same frame: both kept, label order.
    assert detect(frames(2, thumb_up=[0.1, 0.9], index_release=[0.1, 0.9])) == [
        ("index_release", at(1)), ("thumb_up", at(1))]
    # two non-releases in the same frame (delta 0): the later label is debounced away.
    assert detect(frames(2, thumb_click=[0.1, 0.9], index_press=[0.1, 0.9])) == [
        ("index_press", at(1))]


def test_debounce_two_non_release_events():
    at30ms = [LO] * 6 + [HI]
    assert detect(frames(7, index_press=[HI], thumb_click=at30ms)) == [("index_press", at(0))]
    at50ms = [LO] * 10 + [HI]  # delta = 100 samples = 50 ms exactly: not < 50 ms, kept
    assert detect(frames(11, index_press=[HI], thumb_click=at50ms)) == [
        ("index_press", at(0)), ("thumb_click", at(10))]
    at45ms = [LO] * 9 + [HI]
    assert detect(frames(10, index_press=[HI], thumb_click=at45ms)) == [("index_press", at(0))]


def test_debounce_same_release_twice():
    track = [HI, LO, LO, HI]  # index_release at 0 and 15 ms
    assert detect(frames(4, index_release=track)) == [("index_release", at(0))]


def test_debounce_different_releases_both_kept():
    hits = detect(frames(4, index_release=[HI], middle_release=[LO, LO, LO, HI]))
    assert hits == [("index_release", at(0)), ("middle_release", at(3))]


def test_debounce_press_then_release_both_kept():
    hits = detect(frames(4, index_press=[HI], index_release=[LO, LO, LO, HI]))
    assert hits == [("index_press", at(0)), ("index_release", at(3))]


def test_debounce_against_last_kept_not_last_candidate():
    # index_press at 0 (kept); thumb_click at 30 ms (dropped: 30 ms after index_press);
    # thumb_down at 60 ms is 30 ms after the dropped candidate but 60 ms after the last kept
    # event, so it is kept.
    logits = frames(13, index_press=[HI], thumb_click=[LO] * 6 + [HI],
                    thumb_down=[LO] * 12 + [HI])
    assert detect(logits) == [("index_press", at(0)), ("thumb_down", at(12))]


def test_debounce_against_last_kept_of_any_kind():
    # index_release at 0, index_press at 15 ms, index_release at 30 ms: the last kept event
    # before the second release is the press (a different kind), so the release is kept.
    logits = frames(7, index_release=[HI, LO, LO, LO, LO, LO, HI],
                    index_press=[LO, LO, LO, HI])
    assert detect(logits) == [("index_release", at(0)), ("index_press", at(3)),
                              ("index_release", at(6))]


def test_per_gesture_threshold_and_debounce():
    up = frames(4, thumb_up=[0.3, 0.1, 0.1, 0.3])
    assert detect(up) == []                                     # 0.3 < 0.35
    low = {"thumb_up": 0.25}
    assert detect(up, threshold=low) == [("thumb_up", at(0))]   # second one 15 ms later
    short = {"thumb_up": 20}
    assert detect(up, threshold=low, debounce_samples=short) == [
        ("thumb_up", at(0)), ("thumb_up", at(3))]
    # the window of the *new* event applies: thumb_down (100) is dropped 10 ms after thumb_up
    both = frames(4, thumb_up=[0.3, 0.1, 0.1, 0.3], thumb_down=[LO, LO, HI])
    assert detect(both, threshold=low, debounce_samples=short) == [
        ("thumb_up", at(0)), ("thumb_up", at(3))]
    with pytest.raises(ValueError, match="unknown"):
        GestureDetector(threshold={"pinky_press": 0.5})


def test_finger_state():
    det = GestureDetector()
    assert det.finger_state == FingerState.NEUTRAL
    steps = [("index_press", "index"), ("middle_release", "index"), ("thumb_click", "index"),
             ("index_release", "neutral"), ("middle_press", "middle"),
             ("index_press", "index"), ("index_release", "neutral"),
             ("middle_press", "middle")]
    for t, (name, state) in enumerate(steps):
        det.push(frames(1), at(20 * t))             # everything below the threshold
        hits = det.push(frames(1, **{name: [HI]}), at(20 * t + 10))
        assert [h.name for h in hits] == [name]
        assert det.finger_state == state
    det.reset()
    assert det.finger_state == FingerState.NEUTRAL


def test_shape_checked():
    with pytest.raises(ValueError):
        GestureDetector().push(np.zeros((3, 8)), FIRST)
    assert GestureDetector().push(np.zeros((0, 9)), FIRST) == []


# Logits drawn near the threshold (logit(0.35) = -0.619) so that crossings are frequent.
_logit_values = st.sampled_from([-3.0, -0.7, -0.62, -0.619, -0.6, 0.0, 2.0])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 60))
def test_streaming_equals_offline_in_any_split(data, n):
    logits = np.array(data.draw(st.lists(st.lists(_logit_values, min_size=9, max_size=9),
                                         min_size=n, max_size=n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    det, hits = GestureDetector(), []
    for a, b in zip([0, *cuts], [*cuts, n]):
        hits += det.push(logits[a:b], FIRST + 10 * a)
    assert hits == detect_offline(logits, S0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_reset_between_streams_equals_offline_per_stream(seed):
    rng = np.random.default_rng(seed)
    det, hits, expected, s0 = GestureDetector(), [], [], 0
    for _ in range(3):
        logits = rng.normal(-0.8, 1.0, (int(rng.integers(1, 40)), 9))
        det.reset()
        for a in range(0, len(logits), 7):
            hits += det.push(logits[a:a + 7], s0 + 20 + 10 * a)
        expected += detect_offline(logits, s0)
        s0 += 20 + 10 * len(logits) + int(rng.integers(0, 300))  # a gap
    assert hits == expected


# ---------------------------------------------------------------------------- greedy CTC


def emissions(labels: list[int]) -> np.ndarray:
    """Log-probabilities whose argmax per row is the given label."""
    out = np.full((len(labels), 100), math.log(0.2 / 99))
    out[np.arange(len(labels)), labels] = math.log(0.8)
    return out


def test_greedy_blank_repeats():
    seq = [BLANK, 3, 3, BLANK, 3, 4, 4, BLANK, BLANK, 5, 4]
    assert greedy_decode(emissions(seq)) == [3, 3, 4, 5, 4]
    samples = [19853 + 320 * i for i in range(len(seq))]
    got = CtcGreedyDecoder().push(emissions(seq), samples)
    assert got == [Emitted(3, samples[1]), Emitted(3, samples[4]), Emitted(4, samples[5]),
                   Emitted(5, samples[9]), Emitted(4, samples[10])]


def test_prev_label_carried_across_calls_and_reset():
    dec = CtcGreedyDecoder()
    assert [e.label for e in dec.push(emissions([3]), [0])] == [3]
    assert dec.push(emissions([3]), [320]) == []          # a repeat, not a new key
    assert dec.push(emissions([BLANK]), [640]) == []
    assert [e.label for e in dec.push(emissions([3]), [960])] == [3]  # blank between: again
    dec.reset()
    assert dec.prev_label == BLANK
    assert [e.label for e in dec.push(emissions([3]), [1280])] == [3]
    with pytest.raises(ValueError):
        dec.push(emissions([1, 2]), [0])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), seq=st.lists(st.sampled_from([BLANK, BLANK, 0, 1, 2, 96]), max_size=40))
def test_ctc_streaming_equals_offline_in_any_split(data, seq):
    n = len(seq)
    logp = emissions(seq) if n else np.zeros((0, 100))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n))) if n > 1 else []
    dec, got = CtcGreedyDecoder(), []
    for a, b in zip([0, *cuts], [*cuts, n]):
        got += dec.push(logp[a:b], list(range(a, b)))
    assert [e.label for e in got] == greedy_decode(logp)
    for e in got:  # each label is stamped with the emission that produced it
        assert seq[e.sample] == e.label and (e.sample == 0 or seq[e.sample - 1] != e.label)


# --------------------------------------------------------------------------- line editor


def keys(text: str, start: int = 0, step: int = 320) -> list[Emitted]:
    return [Emitted(label, start + step * i) for i, label in enumerate(str_to_labels(text))]


def test_line_editing():
    ed = LineEditor()
    events = ed.push(keys("hi→ x←⇧🤏!"))
    assert [(e.key, e.text, e.final) for e in events] == [
        ("h", "h", False), ("i", "hi", False), ("_", "hi_", False), ("space", "hi_ ", False),
        ("x", "hi_ x", False), ("backspace", "hi_ ", False), ("shift", "hi_ ", False),
        ("pause", "hi_ ", False), ("!", "hi_ !", False)]
    assert [e.label for e in events][-4:] == [BACKSPACE, SHIFT, PAUSE, 62]


def test_backspace_on_empty_line():
    events = LineEditor().push([Emitted(BACKSPACE, 5), Emitted(BACKSPACE, 6)])
    assert [(e.key, e.text, e.final, e.sample) for e in events] == [
        ("backspace", "", False, 5), ("backspace", "", False, 6)]


def test_enter_finalises_and_starts_a_new_line():
    ed = LineEditor()
    events = ed.push(keys("ok\nno"))
    assert [(e.key, e.text, e.final) for e in events] == [
        ("o", "o", False), ("k", "ok", False), ("enter", "ok", True),
        ("n", "n", False), ("o", "no", False)]
    assert ed.text == "no"
    assert ed.push([Emitted(ENTER, 9999)])[0].text == "no" and ed.text == ""


def test_idle_finalisation():
    ed = LineEditor(idle_samples=2000)
    ed.push(keys("ab", start=100))                  # keys at 100 and 420
    assert ed.tick(2419) is None
    done = ed.tick(2500)
    assert (done.key, done.label, done.text, done.final, done.sample) == (None, None, "ab",
                                                                          True, 2420)
    assert ed.tick(9000) is None and ed.text == ""  # once only
    ed.push([Emitted(0, 10_000), Emitted(BACKSPACE, 10_320)])
    assert ed.tick(20_000) is None                  # an empty line is not finalised


def test_idle_deadline_passed_between_ticks():
    ed = LineEditor(idle_samples=1000)
    ed.push([Emitted(0, 0)])
    events = ed.push([Emitted(1, 5000)])            # no tick in between: finalise first
    assert [(e.key, e.text, e.final, e.sample) for e in events] == [
        (None, "a", True, 1000), ("b", "b", False, 5000)]
    assert ed.flush(6000).text == "b" and ed.flush(6001) is None
    assert LineEditor().tick(10**9) is None         # idle finalisation off by default
    with pytest.raises(ValueError):
        LineEditor(idle_samples=0)


# --------------------------------------------------------------------------------- wrist


def test_wrist_velocity_and_integration():
    values = np.array([0.01, -0.02, 0.005, 0.0], dtype=np.float32)
    samples = 253 + 40 * np.arange(4)
    out = WristIntegrator().push(values, samples)
    assert [w.value for w in out] == values.tolist()
    assert [w.velocity_deg_s for w in out] == (np.rad2deg(values.astype(float)) * 50).tolist()
    np.testing.assert_allclose([w.position_rad for w in out], np.cumsum(values.astype(float)))
    assert [w.sample for w in out] == samples.tolist()
    doubled = WristIntegrator(gain=2.0).push(values, samples)
    np.testing.assert_allclose([w.position_rad for w in doubled], 2 * np.cumsum(values))
    assert [w.velocity_deg_s for w in doubled] == [w.velocity_deg_s for w in out]


def test_wrist_clamping_has_no_windup():
    wr = WristIntegrator(min_rad=-0.1, max_rad=0.1)
    got = [w.position_rad for w in wr.push([0.08, 0.08, 0.08, -0.05], [0, 40, 80, 120])]
    assert got == pytest.approx([0.08, 0.1, 0.1, 0.05])
    assert wr.push([-1.0], [160])[0].position_rad == -0.1
    with pytest.raises(ValueError):
        WristIntegrator(min_rad=1.0, max_rad=0.0)


def test_wrist_reset_keeps_position_recenter_clears_it():
    wr = WristIntegrator()
    wr.push([0.1, 0.2], [0, 40])
    wr.reset()
    assert wr.push([0.05], [1000])[0].position_rad == pytest.approx(0.35)
    wr.recenter()
    assert wr.push([0.05], [1040])[0].position_rad == pytest.approx(0.05)
    wr.recenter(0.5)
    assert wr.position == 0.5


def test_wrist_smoothing():
    wr = WristIntegrator(smoothing=0.5)
    out = wr.push([0.02, 0.0, 0.0], [0, 40, 80])
    v0 = math.degrees(0.02) * 50
    assert [w.value for w in out] == [0.02, 0.0, 0.0]              # value never smoothed
    assert [w.velocity_deg_s for w in out] == pytest.approx([v0, v0 / 2, v0 / 4])
    assert [w.position_rad for w in out] == pytest.approx([0.01, 0.015, 0.0175])
    assert wr.position == pytest.approx(0.02)                       # integrator unsmoothed
    with pytest.raises(ValueError):
        WristIntegrator(smoothing=1.0)


def test_wrist_non_finite_value_does_not_move_position():
    out = WristIntegrator().push([0.1, math.nan, 0.1], [0, 40, 80])
    assert math.isnan(out[1].value) and math.isnan(out[1].velocity_deg_s)
    assert [out[1].position_rad, out[2].position_rad] == pytest.approx([0.1, 0.2])
