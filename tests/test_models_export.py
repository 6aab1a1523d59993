"""Streaming ONNX step graphs against the offline PyTorch forward, fed in chunks of many sizes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from emgd.models.export import (  # noqa: E402
    GESTURE_TAIL,
    export_gestures_step,
    export_wrist_step,
    gestures_initial_state,
    wrist_initial_state,
)
from emgd.models.torchnets import DiscreteGesturesNet, WristNet  # noqa: E402

pytestmark = pytest.mark.torch

CHUNKS = [1, 3, 7, 2, 13, 1, 1, 25, 5, 4]  # output frames per call


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def emg(n: int, channels: int, seed: int) -> np.ndarray:
    """(n, C) float32, a broadband floor plus channels of different amplitude."""
    rng = np.random.default_rng(seed)
    scale = 2.5 + 60.0 * rng.random(channels)
    return (rng.standard_normal((n, channels)) * scale).astype(np.float32)


def randomized(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def io_names(sess):
    return [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]


@pytest.mark.parametrize("full_size", [False, True])
def test_gestures_step_matches_offline(tmp_path, full_size):
    torch.manual_seed(0)
    net = DiscreteGesturesNet() if full_size else DiscreteGesturesNet(16, 32, 24, 2)
    net = randomized(net)
    sess = session(export_gestures_step(net, tmp_path / "gestures.onnx"))
    assert not net.training
    assert io_names(sess) == (["x", "tail", "h", "c"], ["y", "tail_next", "h_next", "c_next"])
    x = emg(GESTURE_TAIL + 10 * sum(CHUNKS), 16, seed=1)
    with torch.no_grad():
        offline = net(torch.from_numpy(x.T[None].copy()))[0].T.numpy()  # (T, 9)
    state = gestures_initial_state(net, x[:GESTURE_TAIL])
    pos, outputs = GESTURE_TAIL, []
    for k in CHUNKS:
        feed = {"x": x[None, pos: pos + 10 * k], **state}
        y, state["tail"], state["h"], state["c"] = sess.run(None, feed)
        assert y.shape == (1, k, 9)
        outputs.append(y[0])
        pos += 10 * k
    streamed = np.concatenate(outputs)
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, rtol=0, atol=1e-5)


@pytest.mark.parametrize("full_size", [False, True])
def test_wrist_step_matches_offline(tmp_path, full_size):
    torch.manual_seed(0)
    net = WristNet() if full_size else WristNet(16, (32,), 24, 2)
    net = randomized(net)
    sess = session(export_wrist_step(net, tmp_path / "wrist.onnx"))
    assert not net.training
    assert io_names(sess) == (["x", "h", "c"], ["y", "h_next", "c_next"])
    n_frames = sum(CHUNKS)
    x = torch.from_numpy(emg(254 + 40 * (n_frames - 1), 16, seed=2).T[None].copy())
    with torch.no_grad():
        offline = net(x)[0, 0].numpy()
        frames = net.mpf_featurizer(x).permute(0, 4, 1, 2, 3).numpy()  # (1, K, 6, 16, 16) float32
    assert frames.dtype == np.float32 and frames.shape[1] == n_frames
    state, pos, outputs = wrist_initial_state(net), 0, []
    for k in CHUNKS:
        y, state["h"], state["c"] = sess.run(None, {"x": frames[:, pos: pos + k], **state})
        assert y.shape == (1, k, 1)
        outputs.append(y[0, :, 0])
        pos += k
    np.testing.assert_allclose(np.concatenate(outputs), offline, rtol=0, atol=1e-5)


def test_gestures_initial_state_checks_length():
    with pytest.raises(ValueError):
        gestures_initial_state(DiscreteGesturesNet(16, 8, 8, 1), np.zeros((10, 16), np.float32))
