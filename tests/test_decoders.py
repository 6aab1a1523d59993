"""Streaming decoders against the offline PyTorch networks, in chunks of any size.

The defining test of the streaming contract (DESIGN.md): a recording fed through a decoder
in chunks of 1, 7, 10, 40, 333 or 2000 samples (or MPF frames) gives the offline network's
outputs on the whole recording. Small configurations with seeded random weights, built by
``models/build.py`` exactly as ``emgd models build-random`` does. The card/graph mismatch
tests use a toy graph written with ``onnx.helper`` and need no torch.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from emgd.decoders import (
    GestureDecoder,
    HandwritingDecoder,
    MpfDecoder,
    load_decoder,
    mpf_highpass,
)
from emgd.errors import ModelError
from emgd.highpass import HighPass
from emgd.modelcard import (
    InputSpec,
    ModelCard,
    ModelFile,
    OutputSpec,
    StateSpec,
    Timing,
    file_sha256,
    load_card,
    write_card,
)
from emgd.mpf import MpfExtractor

CHUNKS = [1, 7, 10, 40, 333, 2000]
TOL = 1e-4


def recording(n: int, seed: int = 0, channels: int = 16) -> np.ndarray:
    """(n, C) float32 µV: a 2.46 µV broadband floor, DC offsets and bursts of activity."""
    rng = np.random.default_rng(seed)
    x = 2.46 * rng.standard_normal((n, channels))
    x += rng.uniform(-200, 200, channels)  # electrode offsets (the high-pass removes them)
    t = np.arange(n)
    for _ in range(max(1, n // 1500)):
        start, length = rng.integers(0, n), rng.integers(200, 1500)
        env = np.exp(-0.5 * ((t - start - length / 2) / (length / 4)) ** 2)
        amp = rng.uniform(5, 70, channels)
        x += env[:, None] * amp * rng.standard_normal((n, channels))
    return x.astype(np.float32)


def feed(decoder, data: np.ndarray, chunk: int) -> tuple[np.ndarray, list[int]]:
    """Stream ``data`` in ``chunk``-row pieces; returns the outputs and each step's first."""
    rows, firsts = [], []
    for i in range(0, len(data), chunk):
        decoder.accept(data[i: i + chunk])
        while decoder.ready():
            out = decoder.step()
            assert out.first == sum(len(r) for r in rows)
            firsts.append(out.first)
            rows.append(out.values.copy())
    width = len(decoder.card.output.labels)
    return (np.concatenate(rows) if rows else np.zeros((0, width), np.float32)), firsts


def variant(card_path, tmp_path, **inp) -> str:
    """A copy of a card (and its graph) with some [input] keys changed."""
    card = load_card(card_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(card.onnx_path, tmp_path / card.model.file)
    if card.native_path is not None:
        shutil.copy(card.native_path, tmp_path / card.native.file)
    new = dataclasses.replace(card, input=dataclasses.replace(card.input, **inp))
    return str(write_card(new, tmp_path / card_path.name))


def record(name: str, diff: float) -> None:
    """Shown with ``pytest -s``: the measured difference, not only that it is below TOL."""
    print(f"max |streaming - offline| {name}: {diff:.3g}")


# --------------------------------------------------------------------------- real networks


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("torch")
    from emgd.models.build import build_models, handwriting_available

    out = tmp_path_factory.mktemp("models")
    tasks = ["discrete_gestures", "wrist"] + (["handwriting"] if handwriting_available() else [])
    return {b.task: b.card for b in build_models(out, tasks, size="small", seed=0,
                                                  highpass_hz=40.0)}


@pytest.fixture(scope="module")
def nets():
    pytest.importorskip("torch")
    from emgd.models.build import make_net

    return {t: make_net(t, "small", seed=0) for t in ("discrete_gestures", "wrist",
                                                      "handwriting")}


@pytest.fixture(scope="module")
def gesture_case(nets):
    import torch

    x = recording(6000, seed=1)  # 3 s
    cases = {}
    for scale, hz in ((1.0, 40.0), (2.0, 0.0)):
        net_in = x * np.float32(scale)
        if hz:
            net_in = HighPass(hz).process(net_in)
        with torch.no_grad():
            cases[scale, hz] = nets["discrete_gestures"](
                torch.from_numpy(net_in.T[None].copy()))[0].T.numpy()
    return x, cases


@pytest.mark.torch
@pytest.mark.parametrize("scale,hz", [(1.0, 40.0), (2.0, 0.0)])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_gestures_streaming_equals_offline(built, gesture_case, tmp_path, chunk, scale, hz):
    x, offline = gesture_case
    card = built["discrete_gestures"]
    if (scale, hz) != (1.0, 40.0):
        card = variant(card, tmp_path, scale=scale, highpass_hz=hz)
    dec = load_decoder(card)
    assert isinstance(dec, GestureDecoder)
    streamed, firsts = feed(dec, x, chunk)
    ref = offline[scale, hz]
    assert streamed.shape == ref.shape == ((len(x) - 21) // 10 + 1, 9)
    if chunk >= 10:  # every step with a whole hop ran all buffered hops in one call
        assert dec.steps == len(firsts)
    diff = float(np.abs(streamed - ref).max())
    record(f"gestures scale={scale} highpass={hz}", diff)
    assert diff < TOL
    assert dec.output_sample(0) == 20 and dec.output_sample(5) == 70


def mpf_frames(x: np.ndarray, setting: str) -> np.ndarray:
    """MPF frames of one setting from the Numba extractor, as the pipeline computes them."""
    ex = MpfExtractor(handwriting=setting == "handwriting", wrist=setting == "wrist")
    frames = []
    for i in range(0, len(x), 4000):
        n_hw, n_wr = ex.push(x[i: i + 4000])
        if setting == "wrist":
            frames.append(ex.out_wrist[:n_wr].copy())
        else:
            frames.append(ex.out_hw[:n_hw].copy())
    return np.concatenate(frames)


@pytest.fixture(scope="module")
def wrist_case(nets):
    import torch

    x = HighPass(40.0).process(recording(20254, seed=2))  # 10 s -> 501 frames
    frames = mpf_frames(x, "wrist")
    net = nets["wrist"]
    with torch.no_grad():
        head, _ = net.head_frames(torch.from_numpy(frames[None]))
        whole = net(torch.from_numpy(x.T[None].copy()))[0, 0].numpy()
    return x, frames, head[0].numpy(), whole


@pytest.mark.torch
@pytest.mark.parametrize("chunk", CHUNKS)
def test_wrist_streaming_equals_offline(built, wrist_case, chunk):
    _, frames, head, whole = wrist_case
    dec = load_decoder(built["wrist"], capacity=2000)
    assert isinstance(dec, MpfDecoder) and not isinstance(dec, HandwritingDecoder)
    streamed, _ = feed(dec, frames, chunk)
    assert streamed.shape == head.shape == (len(frames), 1)
    diff = float(np.abs(streamed - head).max())
    record("wrist (same MPF frames)", diff)
    assert diff < TOL
    # end to end: the offline network computes its own (torch, float64) MPF from the EMG
    diff = float(np.abs(streamed[:, 0] - whole).max())
    record("wrist (offline net incl. torch MPF)", diff)
    assert diff < TOL
    assert dec.output_sample(0) == 253 and dec.output_sample(2) == 333


@pytest.mark.torch
def test_wrist_scale_is_applied_to_the_frames(built, nets, wrist_case, tmp_path):
    x, frames, _, _ = wrist_case
    scaled = mpf_frames(x * np.float32(3.0), "wrist")
    plain = load_decoder(built["wrist"], capacity=1000)
    ref, _ = feed(plain, scaled, 1000)
    dec = load_decoder(variant(built["wrist"], tmp_path, scale=3.0), capacity=1000)
    got, _ = feed(dec, frames, 1000)
    diff = float(np.abs(got - ref).max())
    record("wrist scale 3 (diagonal shift vs MPF of scaled EMG)", diff)
    assert diff < TOL


@pytest.fixture(scope="module")
def handwriting_case(nets):
    import torch

    x = HighPass(40.0).process(recording(214 + 40 * 619, seed=3))  # 620 frames, 17 emissions
    frames = mpf_frames(x, "handwriting")
    net = nets["handwriting"]
    with torch.no_grad():
        offline = net.conformer(net.rotation_invariant_mlp.forward_frames(
            torch.from_numpy(frames[None])))[0].numpy()
    return frames, offline


@pytest.mark.torch
@pytest.mark.parametrize("chunk", CHUNKS)
def test_handwriting_streaming_equals_offline(built, handwriting_case, chunk):
    if "handwriting" not in built:
        pytest.skip("emgd.models.export_handwriting (the streaming handwriting step) is missing")
    frames, offline = handwriting_case
    dec = load_decoder(built["handwriting"], capacity=2000)
    assert isinstance(dec, HandwritingDecoder)
    streamed, _ = feed(dec, frames, chunk)
    assert streamed.shape == offline.shape == ((len(frames) - 484) // 8, 100)
    diff = float(np.abs(streamed - offline).max())
    record("handwriting", diff)
    assert diff < TOL
    assert dec.buffered == len(frames) % 2  # an odd frame waits for its partner
    assert dec.output_sample(0) == 19853 and dec.output_sample(1) == 19853 + 320


@pytest.mark.torch
def test_reset_and_warmup_restore_the_initial_state(built, gesture_case):
    x, offline = gesture_case
    dec = load_decoder(built["discrete_gestures"])
    dec.warmup()
    first, _ = feed(dec, x[:2000], 333)
    dec.accept(x[2000:2005])  # a partial hop is pending when the gap comes
    dec.reset()
    again, _ = feed(dec, x, 333)  # same chunking as before: bit-identical
    np.testing.assert_array_equal(again[:len(first)], first)
    assert float(np.abs(again - offline[1.0, 40.0]).max()) < TOL


@pytest.mark.torch
def test_accept_refuses_to_overflow(built):
    dec = load_decoder(built["discrete_gestures"], capacity=100)
    assert dec.capacity == 110  # capacity plus one hop (a partial hop may be left over)
    dec.accept(np.zeros((121, 16), np.float32))  # 11 prime the tail, 110 are buffered
    with pytest.raises(ValueError, match="overflow"):
        dec.accept(np.zeros((1, 16), np.float32))
    assert dec.step().values.shape == (11, 9)
    dec.accept(np.zeros((110, 16), np.float32))


@pytest.mark.torch
def test_mpf_highpass_must_agree(built, tmp_path):
    cards = [load_card(built["wrist"]), load_card(built["discrete_gestures"])]
    assert mpf_highpass(cards) == (40.0, 4)
    other = load_card(variant(built["wrist"], tmp_path, highpass_hz=0.0))
    assert mpf_highpass([other]) is None
    with pytest.raises(ModelError, match="disagree"):
        mpf_highpass([cards[0], other])


# --------------------------------------------------------------------------- toy graph


@pytest.fixture
def toy(tmp_path):
    """An MPF-kind graph: y[t] = acc + sum(x[t]); acc_next = acc + sum(x). State ``acc``."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "k", 6, 16, 16])
    acc = helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "k", 1])
    acc_next = helper.make_tensor_value_info("acc_next", TensorProto.FLOAT, [1, 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [2, 3, 4])
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["s3"], keepdims=1),  # (1, k, 1, 1, 1)
        helper.make_node("Squeeze", ["s3", "sq"], ["s"]),  # (1, k)
        helper.make_node("CumSum", ["s", "one"], ["cs"]),  # running sum over k
        helper.make_node("Add", ["cs", "acc"], ["ya"]),
        helper.make_node("Unsqueeze", ["ya", "two"], ["y"]),
        helper.make_node("ReduceSum", ["s", "one_axes"], ["tot"], keepdims=1),  # (1, 1)
        helper.make_node("Add", ["acc", "tot"], ["acc_next"]),
    ]
    inits = [axes, helper.make_tensor("sq", TensorProto.INT64, [3], [2, 3, 4]),
             helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("one_axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("two", TensorProto.INT64, [1], [2])]
    graph = helper.make_graph(nodes, "toy", [x, acc], [y, acc_next], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "toy.onnx")
    card = ModelCard(
        name="toy", task="wrist", description="toy", licence="test",
        model=ModelFile(file="toy.onnx", sha256=file_sha256(tmp_path / "toy.onnx")),
        input=InputSpec(kind="mpf", unit=1, mpf_window=20),
        timing=Timing(hop=40, left_context=253, output_rate_hz=50.0),
        output=OutputSpec(kind="value", labels=("v",)),
        states=(StateSpec("acc", (1, 1)),),
        provenance={"source": "test"},
    )
    return tmp_path, card


def write(tmp_path, card) -> str:
    return str(write_card(card, tmp_path / "toy.toml"))


def test_toy_carries_state(toy):
    tmp_path, card = toy
    dec = load_decoder(write(tmp_path, card))
    frames = np.random.default_rng(0).standard_normal((9, 6, 16, 16)).astype(np.float32)
    got, _ = feed(dec, frames, 2)
    expected = np.cumsum(frames.reshape(9, -1).astype(np.float64).sum(1))
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-3)
    dec.reset()
    again, _ = feed(dec, frames, 2)
    np.testing.assert_array_equal(again, got)


@pytest.mark.parametrize("change,match", [
    ({"states": (StateSpec("accu", (1, 1)),)}, "'accu'"),
    ({"states": (StateSpec("acc", (1, 2)),)}, r"state 'acc'.*shape"),
    ({"states": (StateSpec("acc", (1, 1), "int64"),)}, r"state 'acc'.*dtype"),
    ({"states": ()}, "graph input 'acc'"),
    ({"output": OutputSpec(kind="value", labels=("a", "b"))}, r"tensor 'y'.*shape"),
    ({"output": OutputSpec(kind="value", labels=("v",), valid="valid")}, "'valid'"),
])
def test_graph_mismatch_names_the_tensor(toy, change, match):
    tmp_path, card = toy
    with pytest.raises(ModelError, match=match):
        load_decoder(write(tmp_path, dataclasses.replace(card, **change)))


def test_input_mismatch_names_x(toy):
    tmp_path, card = toy
    bad = dataclasses.replace(card, input=dataclasses.replace(card.input, channels=8))
    with pytest.raises(ModelError, match="'x'"):
        load_decoder(write(tmp_path, bad))


def test_wrong_sha256_tells_to_reimport(toy):
    tmp_path, card = toy
    bad = dataclasses.replace(card, model=dataclasses.replace(card.model, sha256="0" * 64))
    with pytest.raises(ModelError, match=r"toy\.onnx.*sha256.*re-run 'emgd models import'"):
        load_decoder(write(tmp_path, bad))


def test_tampered_file_is_refused(toy):
    tmp_path, card = toy
    path = write(tmp_path, card)
    with open(tmp_path / "toy.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        load_decoder(path)


def test_missing_model_file(toy):
    tmp_path, card = toy
    path = write(tmp_path, card)
    (tmp_path / "toy.onnx").unlink()
    with pytest.raises(ModelError, match=r"toy\.onnx.*does not exist"):
        load_decoder(path)


def test_mpf_decoder_checks_frame_shape(toy):
    tmp_path, card = toy
    dec = load_decoder(write(tmp_path, card))
    with pytest.raises(ValueError, match="frames must have shape"):
        dec.accept(np.zeros((2, 6, 16, 15), np.float32))
