"""emgd's native (Numba) gesture and wrist kernels: small configurations and refusals.

The full-size comparisons (30 s, chunks of 1 to 4000 samples, every backend) are in
``test_streaming_full_size.py``. Here: small configurations against the offline networks,
the reset rule (after a reset the outputs equal a fresh offline run from there), the int16
rounding bound, and the load-time checks: sha256, missing or misshapen arrays, and weights
that are not the graph's.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from test_decoders import feed, mpf_frames, recording

from emgd.decoders import load_decoder
from emgd.errors import ModelError
from emgd.highpass import HighPass
from emgd.modelcard import file_sha256, load_card, write_card
from emgd.native import quantize_rows

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

TOL = 1e-4


def record(name: str, diff: float) -> None:
    print(f"max |native - offline| {name}: {diff:.3g}")


# --------------------------------------------------------------------------- small


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from emgd.models.build import build_models, make_net

    out = tmp_path_factory.mktemp("small")
    cards = {b.task: b.card for b in build_models(out, ["discrete_gestures", "wrist"],
                                                    size="small", seed=0)}
    nets = {t: make_net(t, "small", 0) for t in cards}
    return cards, nets


def _offline_gestures(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(HighPass(40.0).process(x).T[None].copy()))[0].T.numpy()


@pytest.mark.parametrize("kernel", ["native-int16", "native-float32"])
def test_reset_equals_a_fresh_offline_run(small, kernel):
    cards, nets = small
    x = recording(8000, seed=5)
    dec = load_decoder(cards["discrete_gestures"], backend=kernel)
    feed(dec, x[:3333], 40)
    dec.reset()  # a gap: the rest is a new segment
    got, firsts = feed(dec, x[3333:], 37)
    assert firsts[0] == 0
    ref = _offline_gestures(nets["discrete_gestures"], x[3333:])
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) < TOL


def test_small_wrist_and_batched_steps(small):
    cards, nets = small
    x = HighPass(40.0).process(recording(12_000, seed=6))
    frames = mpf_frames(x, "wrist")
    with torch.no_grad():
        ref, _ = nets["wrist"].head_frames(torch.from_numpy(frames[None]))
    for chunk in (1, 7, 50):
        got, _ = feed(load_decoder(cards["wrist"], backend="native-int16"), frames, chunk)
        assert float(np.abs(got - ref[0].numpy()).max()) < TOL


def test_int16_rows_are_within_half_a_step():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 300)) * rng.uniform(0.01, 3, (64, 1))).astype(np.float32)
    w[3] = 0.0  # an all-zero row keeps scale 1 and codes 0
    q, scale = quantize_rows(w)
    assert q.dtype == np.int16 and scale.dtype == np.float32
    err = np.abs(q.astype(np.float64) * scale[:, None] - w)
    peak = np.abs(w).max(axis=1)
    # half a step, plus the float32 rounding of the scale (q · scale · 2^-24 <= 0.004 steps)
    assert np.all(err <= peak[:, None] / 65534 * 1.005)
    assert np.all(np.abs(q).max(axis=1)[peak > 0] == 32767)
    assert not q[3].any()


# --------------------------------------------------------------------------- refusals


def _copy(card_path, dest):
    """A model folder copy; returns the new card path."""
    card = load_card(card_path)
    dest.mkdir(parents=True, exist_ok=True)
    for f in (card.onnx_path, card.native_path, card.path):
        shutil.copy(f, dest / f.name)
    return dest / card.path.name


def _rewrite_npz(card_path, change):
    card = load_card(card_path)
    with np.load(card.native_path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    with open(card.native_path, "wb") as fh:
        np.savez(fh, **arrays)
    new = dataclasses.replace(card, native=dataclasses.replace(
        card.native, sha256=file_sha256(card.native_path)))
    write_card(new, card_path)


def test_changed_weights_file_is_refused(small, tmp_path):
    card = _copy(small[0]["discrete_gestures"], tmp_path)
    with open(load_card(card).native_path, "ab") as fh:
        fh.write(b"\0")
    load_decoder(card)  # ONNX Runtime does not read the native weights
    with pytest.raises(ModelError, match="native.sha256"):
        load_decoder(card, backend="native-int16")


@pytest.mark.parametrize("change,match", [
    (lambda a: a.pop("lstm.weight_hh_l1"), "lack 'lstm.weight_hh_l1'"),
    (lambda a: a.__setitem__("projection.bias", np.zeros(4, np.float32)),
     r"projection.bias has shape \(4,\)"),
    (lambda a: a.__setitem__("conv_layer.bias", a["conv_layer.bias"].astype(np.float64)),
     "conv_layer.bias has dtype float64"),
    (lambda a: a["post_conv_layer_norm.weight"].__setitem__(0, np.nan), "NaN or inf"),
])
def test_bad_native_arrays_name_the_key(small, tmp_path, change, match):
    card = _copy(small[0]["discrete_gestures"], tmp_path)
    _rewrite_npz(card, change)
    with pytest.raises(ModelError, match=match):
        load_decoder(card, backend="native-float32")


def test_weights_of_another_network_are_refused(small, tmp_path):
    from emgd.models.build import build_models

    other = build_models(tmp_path / "other", ["wrist"], size="small", seed=9)[0].card
    card = _copy(small[0]["wrist"], tmp_path / "m")
    shutil.copy(load_card(other).native_path, load_card(card).native_path)
    c = load_card(card)
    write_card(dataclasses.replace(c, native=dataclasses.replace(
        c.native, sha256=file_sha256(c.native_path))), card)
    with pytest.raises(ModelError, match="disagree with the ONNX graph"):
        load_decoder(card, backend="native-int16")
    assert load_decoder(card, backend="onnx").backend == "onnx"


def test_missing_weights_file(small, tmp_path):
    card = _copy(small[0]["wrist"], tmp_path)
    load_card(card).native_path.unlink()
    with pytest.raises(ModelError, match="do not exist"):
        load_decoder(card, backend="native-int16")


def test_config_knows_the_same_backends():
    from emgd import config, decoders

    assert config.DECODER_BACKENDS == decoders.DECODER_BACKENDS


def test_unknown_kernel_setting(small):
    with pytest.raises(ModelError, match="decoder backend must be one of"):
        load_decoder(small[0]["wrist"], backend="int8")
