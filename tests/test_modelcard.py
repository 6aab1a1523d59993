"""Model cards: TOML round trip through the own writer, and validation errors naming the key."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from emgd.errors import ModelError
from emgd.modelcard import (
    InputSpec,
    ModelCard,
    ModelFile,
    OutputSpec,
    Prime,
    StateSpec,
    Timing,
    card_to_dict,
    dumps_toml,
    load_card,
    parse_card,
    write_card,
)

SHA = "ab" * 32


def gestures_card() -> ModelCard:
    return ModelCard(
        name="discrete_gestures", task="discrete_gestures", description="test card",
        licence="CC-BY-NC-4.0",
        model=ModelFile(file="discrete_gestures.onnx", sha256=SHA, opset=17),
        input=InputSpec(kind="emg", unit=10, scale=1.0, scale_note="µV, see §9 q1",
                        highpass_hz=40.0,
                        prime=Prime(state="tail", samples=11, transform="reinhard")),
        timing=Timing(hop=10, left_context=20, output_rate_hz=200.0),
        output=OutputSpec(kind="logits", labels=tuple(f"g{i}" for i in range(9))),
        states=(StateSpec("tail", (1, 11, 16)), StateSpec("h", (3, 1, 512)),
                StateSpec("c", (3, 1, 512))),
        events={"threshold": 0.35, "debounce_samples": 100},
        provenance={"source": "checkpoint", "checkpoint_sha256": SHA, "epoch": 3},
    )


def handwriting_card() -> ModelCard:
    labels = ('"', "\\", "a", "é", "🤏", "tab\there", "<blank>")
    return ModelCard(
        name="handwriting", task="handwriting", description="line1\nline2", licence="x",
        model=ModelFile(file="handwriting.onnx", sha256=SHA, graph_optimization="basic"),
        input=InputSpec(kind="mpf", unit=2, fixed=True, mpf_window=16),
        timing=Timing(hop=320, left_context=19853, output_rate_hz=6.25),
        output=OutputSpec(kind="log_probs", labels=labels, blank=6, valid="valid"),
        states=(StateSpec("attn", (15, 1, 15, 64)), StateSpec("count", (15, 1), "int64")),
        provenance={"source": "random", "seed": 0},
    )


def as_dict(card: ModelCard) -> dict:
    return tomllib.loads(dumps_toml(card_to_dict(card)))


@pytest.mark.parametrize("make", [gestures_card, handwriting_card])
def test_round_trip(tmp_path, make):
    card = make()
    path = write_card(card, tmp_path / "card.toml")
    back = load_card(path)
    assert back == card
    assert back.path == path
    assert back.onnx_path == tmp_path / card.model.file


def test_initial_state_and_timing():
    card = handwriting_card()
    state = card.initial_state()
    assert state["count"].dtype == np.int64 and state["count"].shape == (15, 1)
    assert not state["attn"].any()
    assert card.output_sample(0) == 19853 and card.output_sample(2) == 19853 + 640
    prime = gestures_card().input.prime
    np.testing.assert_allclose(prime.apply(np.array([[32.0, -96.0]])), [[32.0, -48.0]])


def check(data: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        parse_card(data, "card.toml")


def test_unknown_task():
    d = as_dict(gestures_card())
    d["task"] = "typing"
    check(d, r"card\.toml: task: 'typing' is not one of discrete_gestures, wrist, handwriting")


def test_missing_key_is_named():
    d = as_dict(gestures_card())
    del d["timing"]["hop"]
    check(d, r"timing\.hop: missing")


def test_unknown_key_is_named():
    d = as_dict(gestures_card())
    d["input"]["sacle"] = 2.0
    check(d, r"input\.sacle: unknown key")


def test_wrong_type_is_named():
    d = as_dict(gestures_card())
    d["state"][1]["shape"] = [3, 0, 512]
    check(d, r"state\[1\]\.shape: must be a list of positive integers")
    d = as_dict(gestures_card())
    d["input"]["scale"] = "1"
    check(d, r"input\.scale: must be a number")
    d = as_dict(gestures_card())
    d["input"]["fixed"] = 1
    check(d, r"input\.fixed: must be true or false")


def test_scale_must_be_positive():
    d = as_dict(gestures_card())
    d["input"]["scale"] = 0
    check(d, r"input\.scale: must be > 0")


def test_schema_version():
    d = as_dict(gestures_card())
    d["schema"] = 2
    check(d, "schema = 2 is not supported")


def test_bad_sha256():
    d = as_dict(gestures_card())
    d["model"]["sha256"] = "XYZ"
    check(d, r"model\.sha256: must be 64 lower-case hex digits")


def test_model_file_must_sit_next_to_the_card():
    d = as_dict(gestures_card())
    d["model"]["file"] = "../elsewhere.onnx"
    check(d, r"model\.file: must be a file name next to the card")


def test_input_kind_must_fit_the_task():
    d = as_dict(gestures_card())
    d["task"] = "wrist"
    check(d, r"input\.kind: task wrist takes input kind 'mpf'")


def test_mpf_window():
    d = as_dict(handwriting_card())
    d["input"]["mpf_window"] = 18
    check(d, r"input\.mpf_window")


def test_output_rate_must_match_hop():
    d = as_dict(gestures_card())
    d["timing"]["output_rate_hz"] = 100.0
    check(d, r"timing\.output_rate_hz")


def test_blank_out_of_range():
    d = as_dict(handwriting_card())
    d["output"]["blank"] = 7
    check(d, r"output\.blank: 7 is not a label index")


def test_ctc_needs_blank():
    d = as_dict(handwriting_card())
    del d["output"]["blank"]
    check(d, r"output\.blank: log_probs output \(CTC\) needs the blank index")


def test_duplicate_and_reserved_state_names():
    d = as_dict(gestures_card())
    d["state"][2]["name"] = "h"
    check(d, r"state\[2\]\.name: 'h' is declared twice")
    d = as_dict(gestures_card())
    d["state"][2]["name"] = "y"
    check(d, r"state\[2\]\.name: 'y' is reserved")


def test_prime_must_name_a_state_of_the_right_shape():
    d = as_dict(gestures_card())
    d["input"]["prime"]["state"] = "tails"
    check(d, r"input\.prime\.state: 'tails' is not a declared state")
    d = as_dict(gestures_card())
    d["input"]["prime"]["samples"] = 12
    check(d, r"input\.prime: state 'tail' must be float32 \(1, 12, 16\)")


def test_provenance_takes_scalars_only():
    d = as_dict(gestures_card())
    d["provenance"]["nested"] = {"a": 1}
    check(d, r"provenance\.nested: must be a string, number or boolean")


def test_malformed_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("task = \n")
    with pytest.raises(ModelError, match=r"bad\.toml is not valid TOML"):
        load_card(path)


def test_missing_card(tmp_path):
    with pytest.raises(ModelError, match=r"model card not found: .*nope\.toml"):
        load_card(tmp_path / "nope.toml")


def test_writer_escapes_and_orders_tables():
    text = dumps_toml({"a": 'q"\\\x01', "t": {"k": [1, 2.5, True]}, "arr": [{"x": 1}, {"x": 2}],
                       "f": float("inf")})
    assert tomllib.loads(text) == {"a": 'q"\\\x01', "t": {"k": [1, 2.5, True]},
                                   "arr": [{"x": 1}, {"x": 2}], "f": float("inf")}


def test_licence_and_source_are_required():
    d = as_dict(gestures_card())
    d["licence"] = " "
    check(d, r"licence: must not be empty")
    d = as_dict(gestures_card())
    del d["provenance"]["source"]
    check(d, r"provenance\.source: missing")
