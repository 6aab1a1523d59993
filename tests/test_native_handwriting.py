"""emgd's native (Numba) handwriting kernel against the offline PyTorch network and the graph.

The streaming contract again (``test_decoders.py``): MPF frames fed through a decoder running
``emgd/native_handwriting.py`` in chunks of any size give the offline network's emissions on
the whole stream, within 1e-4: the small configuration in chunks of 1-333 frames, and the full
reference size (random weights) on 24 s of EMG (89 emissions). The kernel's next states equal
the ONNX graph's across a reset, and misshapen or missing sidecar arrays are refused with
errors that name the key.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from emgd.decoders import HandwritingDecoder, load_decoder
from emgd.errors import ModelError
from emgd.highpass import HighPass
from emgd.modelcard import file_sha256, load_card, write_card
from test_decoders import feed, mpf_frames, recording

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

TOL = 1e-4
FULL_FRAMES = 1200  # 214 + 40·1199 samples = 24.1 s of EMG: (1200 - 484) // 8 = 89 emissions


def record(name: str, diff: float) -> None:
    print(f"max |native - reference| {name}: {diff:.3g}")


def offline(net, frames: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net.conformer(net.rotation_invariant_mlp.forward_frames(
            torch.from_numpy(frames[None])))[0].numpy()


def frames_of(n_frames: int, seed: int) -> np.ndarray:
    x = HighPass(40.0).process(recording(214 + 40 * (n_frames - 1), seed=seed))
    frames = mpf_frames(x, "handwriting")
    assert len(frames) == n_frames
    return frames


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from emgd.models.build import build_models, make_net

    out = tmp_path_factory.mktemp("small")
    card = build_models(out, ["handwriting"], size="small", seed=0)[0].card
    frames = frames_of(620, seed=3)  # 17 emissions
    return card, frames, offline(make_net("handwriting", "small", 0), frames)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    from emgd.models.build import build_models, make_net

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full")
    card = build_models(out, ["handwriting"], size="full", seed=0)[0].card
    frames = frames_of(FULL_FRAMES, seed=7)
    return card, frames, offline(make_net("handwriting", "full", 0), frames)


@pytest.mark.parametrize("chunk", [1, 7, 40, 333])
def test_small_streaming_equals_offline(small, chunk):
    card, frames, ref = small
    dec = load_decoder(card, backend="native-float32", capacity=400)
    assert isinstance(dec, HandwritingDecoder) and dec.backend == "native-float32"
    got, _ = feed(dec, frames, chunk)
    assert got.shape == ref.shape == ((len(frames) - 484) // 8, 100)
    diff = float(np.abs(got - ref).max())
    record(f"handwriting small, chunks of {chunk} frames", diff)
    assert diff < TOL
    assert dec.steps == len(frames) // 2 and dec.buffered == len(frames) % 2


def test_full_size_equals_offline(full):
    card, frames, ref = full
    dec = load_decoder(card, backend="native-int16", capacity=400)  # runs float32 weights
    assert dec.backend == "native-float32"
    assert load_card(card).native.int16_max_abs_delta is None
    got, firsts = feed(dec, frames, 40)
    assert got.shape == ref.shape == (89, 100)
    assert firsts[-1] < 89
    diff = float(np.abs(got - ref).max())
    record("handwriting full size, 24 s", diff)
    assert diff < TOL


def _states_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, got in a.items():
        want = b[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if got.dtype.kind == "f":
            assert float(np.abs(got - want).max()) < TOL, name
        else:
            np.testing.assert_array_equal(got, want)


def test_native_equals_the_graph_across_a_reset(full):
    card, frames, _ = full
    native = load_decoder(card, backend="native-float32", capacity=400)
    graph = load_decoder(card, backend="onnx", capacity=400)
    cut = 651  # odd: one frame waits for its partner when the gap comes
    outs = []
    for dec in (native, graph):
        first, _ = feed(dec, frames[:cut], 37)
        before = {k: v.copy() for k, v in dec.state.items()}
        dec.reset()
        second, firsts = feed(dec, frames[cut:], 37)
        assert firsts[0] == 0
        outs.append((first, before, second, dec.state))
    (f1, s1, g1, e1), (f2, s2, g2, e2) = outs
    assert f1.shape == f2.shape == ((cut - 484) // 8, 100)
    assert g1.shape == g2.shape == ((len(frames) - cut - 484) // 8, 100)
    diff = max(float(np.abs(f1 - f2).max()), float(np.abs(g1 - g2).max()))
    record("handwriting full size vs ONNX Runtime, reset at frame 651", diff)
    assert diff < TOL
    _states_close(s1, s2)
    _states_close(e1, e2)
    assert int(e1["count"][0, 0]) == (len(frames) - cut) // 2


# --------------------------------------------------------------------------- refusals


def _tampered(card_path, dest, change) -> str:
    card = load_card(card_path)
    dest.mkdir(parents=True, exist_ok=True)
    for f in (card.onnx_path, card.path):
        shutil.copy(f, dest / f.name)
    with np.load(card.native_path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    npz_path = dest / card.native.file
    with open(npz_path, "wb") as fh:
        np.savez(fh, **arrays)
    new = load_card(dest / card.path.name)
    write_card(dataclasses.replace(new, native=dataclasses.replace(
        new.native, sha256=file_sha256(npz_path))), new.path)
    return str(new.path)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.pop("conformer.2.3.attn_block.child.2.op.in_proj_weight"),
     r"lack 'conformer\.2\.3\.attn_block\.child\.2\.op\.in_proj_weight'"),
    (lambda a: a.pop("block_windows"), "lack 'block_windows'"),
    (lambda a: a.__setitem__("conformer.2.0.conv_block.child.3.net.weight",
                             np.zeros((16, 1, 5), np.float32)),
     r"conformer\.2\.0\.conv_block\.child\.3\.net\.weight has shape \(16, 1, 5\)"),
    (lambda a: a.__setitem__("block_strides", np.ones(3, np.int64)),
     r"block_windows has shape \(15,\), expected \(3\)"),
    (lambda a: a.__setitem__("num_heads", np.array([3], np.int64)),
     "num_heads = 3 does not divide"),
    (lambda a: a.__setitem__("rotation_gather", a["rotation_gather"] + 1000),
     "rotation_gather"),
])
def test_bad_native_arrays_name_the_key(small, tmp_path, change, match):
    card = _tampered(small[0], tmp_path, change)
    load_decoder(card)  # ONNX Runtime does not read the native weights
    with pytest.raises(ModelError, match=match):
        load_decoder(card, backend="native-float32")


def test_other_weights_are_refused(small, tmp_path):
    def perturb(a):  # one of the last block's last biases: moves y, no state
        a["conformer.2.14.ff_block2.child.4.bias"][0] += np.float32(0.5)

    card = _tampered(small[0], tmp_path, perturb)
    with pytest.raises(ModelError, match=r"disagree with the ONNX graph .*: y differs by"):
        load_decoder(card, backend="native-float32")

    def swap_strides(a):  # blocks 4 and 5 swap strides: valid comes on other calls
        a["block_strides"] = a["block_strides"][[0, 1, 2, 3, 5, 4, *range(6, 15)]].copy()

    card = _tampered(small[0], tmp_path / "strides", swap_strides)
    with pytest.raises(ModelError, match=r"disagree with the ONNX graph .*: valid is True on probe call 0"):
        load_decoder(card, backend="native-float32")
