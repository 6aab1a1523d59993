"""DecoderStage's gesture detector settings: card defaults, per-gesture config overrides."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from emgd.detection import GESTURES
from emgd.errors import ConfigError
from emgd.stages import DecoderStage, EventOptions


def card(threshold=0.35, debounce=100):
    return SimpleNamespace(name="g", output=SimpleNamespace(labels=list(GESTURES)),
                           input=SimpleNamespace(sample_rate=2000),
                           events={"threshold": threshold, "debounce_samples": debounce})


def crossings(detector, p_thumb_click):
    logits = np.full((len(p_thumb_click), 9), -10.0)
    p = np.asarray(p_thumb_click)
    logits[:, GESTURES.index("thumb_click")] = np.log(p / (1 - p))
    return [(h.name, h.sample) for h in detector.push(logits, 20)]


def test_card_threshold_and_config_override():
    ramp = [0.1, 0.4, 0.1, 0.6]
    plain = DecoderStage._gesture_detector(card(debounce=0), EventOptions())
    assert crossings(plain, ramp) == [("thumb_click", 30), ("thumb_click", 50)]
    override = EventOptions(gesture_threshold=(("thumb_click", 0.5),))
    assert crossings(DecoderStage._gesture_detector(card(debounce=0), override), ramp) == [
        ("thumb_click", 50)]


def test_debounce_override_in_ms():
    ramp = [0.1, 0.6, 0.1, 0.6]  # crossings 20 samples (10 ms) apart
    det = DecoderStage._gesture_detector(card(debounce=0), EventOptions())
    assert len(crossings(det, ramp)) == 2
    det = DecoderStage._gesture_detector(
        card(debounce=0), EventOptions(gesture_debounce_ms=(("thumb_click", 50.0),)))
    assert len(crossings(det, ramp)) == 1


def test_unknown_gesture_name_is_a_config_error():
    with pytest.raises(ConfigError, match="thumb_clik"):
        DecoderStage._gesture_detector(card(), EventOptions(gesture_threshold=(("thumb_clik",
                                                                                 0.5),)))
