"""The streaming handwriting step (torch and ONNX) against one offline pass of HandwritingNet.

The inputs are random symmetric MPF-like frames fed to both paths from MPF frame 0: the MPF
featurizer is outside the step graph and has its own streaming tests, and the rotation MLP
and everything after it are the same in both paths.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from emgd.models.export_handwriting import (  # noqa: E402
    STATE_NAMES,
    HandwritingStep,
    export_handwriting_step,
    handwriting_initial_state,
)
from emgd.models.torchnets import HandwritingNet  # noqa: E402

pytestmark = pytest.mark.torch

FIRST_END = 491  # MPF frame that emission 0 ends on (neuromotor-models.md §3.9)
EVERY = 8  # MPF frames between emissions
K_FRAMES = 620  # 17 emissions: every block well past its warm-up
CHUNKS = [1, 3, 2, 5, 7, 1, 1, 8, 13, 4, 9]  # MPF frames per delivery, repeated


def randomized(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def mpf_like(k: int, channels: int = 16, seed: int = 1) -> np.ndarray:
    """(1, k, 6, C, C) float64 symmetric frames with magnitudes like log-eigenvalue features."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((1, k, 6, channels, channels)) * 2.0
    return (a + np.swapaxes(a, -1, -2)) / 2


def offline(net, frames: np.ndarray) -> np.ndarray:
    """One offline pass from MPF frames: (1, K, 6, C, C) -> (E, classes)."""
    with torch.no_grad():
        x = torch.from_numpy(frames)
        return net.conformer(net.rotation_invariant_mlp.forward_frames(x))[0].numpy()


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class PairFeeder:
    """What the runtime does: buffer MPF frames into pairs, one ONNX call per pair."""

    def __init__(self, sess, initial: dict[str, np.ndarray]) -> None:
        self.sess, self.initial = sess, initial
        self.reset()

    def reset(self) -> None:
        self.state = {k: v.copy() for k, v in self.initial.items()}
        self.pending: np.ndarray | None = None
        self.frames = 0  # MPF frames since the reset

    def push(self, frames: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """frames (n, 6, C, C) float32 -> [(end MPF frame since reset, log-probs)]."""
        out = []
        for frame in frames:
            self.frames += 1
            if self.pending is None:
                self.pending = frame
                continue
            x = np.stack([self.pending, frame])[None]
            self.pending = None
            y, valid, *nxt = self.sess.run(None, {"x": x, **self.state})
            self.state = dict(zip(STATE_NAMES, nxt))
            if valid[0]:
                out.append((self.frames - 1, y[0, 0]))
        return out


def chunked(frames: np.ndarray, feeder: PairFeeder) -> list[tuple[int, np.ndarray]]:
    out, pos, i = [], 0, 0
    while pos < len(frames):
        k = CHUNKS[i % len(CHUNKS)]
        out += feeder.push(frames[pos: pos + k])
        pos, i = pos + k, i + 1
    return out


def emission_count(k: int) -> int:
    return max((k - 484) // 8, 0)


@pytest.fixture(scope="module")
def net32():
    torch.manual_seed(0)
    return randomized(HandwritingNet())


@pytest.fixture(scope="module")
def exported(net32, tmp_path_factory):
    path = export_handwriting_step(net32, tmp_path_factory.mktemp("hw") / "handwriting.onnx")
    assert not net32.training
    return path, session(path)


def emg(n: int, channels: int = 16, seed: int = 0) -> np.ndarray:
    """(1, C, n) float64: a broadband floor on every channel, channels of different amplitude."""
    rng = np.random.default_rng(seed)
    scale = 2.5 + 60.0 * rng.random((1, channels, 1))
    return rng.standard_normal((1, channels, n)) * scale


def test_torch_step_matches_offline_float64():
    """From raw EMG: the offline forward against its MPF frames streamed through the step."""
    torch.manual_seed(0)
    net = randomized(HandwritingNet()).double()
    n_samples = net.featurizer.left_context + 1 + 40 * (K_FRAMES - 1)
    signal = torch.from_numpy(emg(n_samples))
    with torch.no_grad():
        features = net.featurizer(signal)  # (1, 6, C, C, K), computed once for both paths
        mlp = net.rotation_invariant_mlp(features).transpose(1, 2)  # = net.mlp_frames(signal)
        expected = net.conformer(mlp)[0].numpy()  # = net(signal)
        frames = features.permute(0, 4, 1, 2, 3).numpy()  # (1, K, 6, C, C), per frame (F, C, C)
    assert frames.shape[1] == K_FRAMES
    assert expected.shape == (emission_count(K_FRAMES), 100) == (17, 100)
    assert len(expected) == (n_samples - 19854) // 320 + 1

    step = HandwritingStep(net)
    state = {k: torch.from_numpy(v) for k, v in handwriting_initial_state(net).items()}
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    x = torch.from_numpy(frames)
    emitted, ends = [], []
    with torch.no_grad():
        for u in range(K_FRAMES // 2):
            y, valid, *nxt = step(x[:, 2 * u: 2 * u + 2], *(state[n] for n in STATE_NAMES))
            state = dict(zip(STATE_NAMES, nxt))
            if valid.item():
                emitted.append(y[0, 0].numpy())
                ends.append(2 * u + 1)
            assert len(emitted) == emission_count(2 * u + 2)  # after every call
    assert ends == [FIRST_END + EVERY * i for i in range(len(ends))]
    np.testing.assert_allclose(np.stack(emitted), expected, rtol=0, atol=1e-6)
    seen = [K_FRAMES // 2]  # input frames per block: the previous block's output count
    for block in list(net.blocks)[:-1]:
        seen.append(block.output_length(seen[-1]))
    assert state["count"][:, 0].tolist() == seen


def test_torch_step_generic_configuration():
    """Mixed windows (a block reads the newest W-1 of the shared history) and strides."""
    torch.manual_seed(1)
    net = randomized(HandwritingNet(
        num_channels=4, mlp_dim=8, dim=8, ffn_dim=16, num_heads=2, strides=(1, 2, 1, 2),
        window_sizes=(4, 8, 2, 3), num_classes=5, num_adjacent_cov=2,
    )).double()
    k = 131
    frames = mpf_like(k, channels=4, seed=2)
    expected = offline(net, frames)
    assert len(expected) == (k - net.emission_slice.start - 1) // net.emission_slice.step + 1
    step = HandwritingStep(net)
    state = {n: torch.from_numpy(v) for n, v in handwriting_initial_state(net).items()}
    state = {n: v.double() if v.is_floating_point() else v for n, v in state.items()}
    assert state["attn"].shape == (4, 1, 7, 8)
    x = torch.from_numpy(frames)
    emitted, ends = [], []
    with torch.no_grad():
        for u in range(k // 2):
            y, valid, *nxt = step(x[:, 2 * u: 2 * u + 2], *(state[n] for n in STATE_NAMES))
            state = dict(zip(STATE_NAMES, nxt))
            if valid.item():
                emitted.append(y[0, 0].numpy())
                ends.append(2 * u + 1)
    assert ends == list(range(k))[net.emission_slice][: len(ends)]
    np.testing.assert_allclose(np.stack(emitted), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k", [492, 499, 500, 507, 508, 531])
def test_emission_count_formula(net32, k):
    assert len(offline(net32, mpf_like(k).astype(np.float32))) == emission_count(k)


def test_too_few_frames_for_offline(net32):
    """Below 492 MPF frames (19 854 samples) the offline pass raises; the stream emits nothing."""
    with pytest.raises(RuntimeError):
        offline(net32, mpf_like(491).astype(np.float32))


def test_onnx_contract(net32, exported):
    path, sess = exported
    inputs = [(i.name, i.shape, i.type) for i in sess.get_inputs()]
    outputs = [(o.name, o.shape, o.type) for o in sess.get_outputs()]
    f32, i64 = "tensor(float)", "tensor(int64)"
    assert inputs == [
        ("x", [1, 2, 6, 16, 16], f32),
        ("attn", [15, 1, 15, 64], f32),
        ("conv", [15, 1, 7, 64], f32),
        ("count", [15, 1], i64),
    ]
    assert outputs == [
        ("y", [1, 1, 100], f32),
        ("valid", [1], "tensor(bool)"),
        ("attn_next", [15, 1, 15, 64], f32),
        ("conv_next", [15, 1, 7, 64], f32),
        ("count_next", [15, 1], i64),
    ]
    initial = handwriting_initial_state(net32)
    assert list(initial) == list(STATE_NAMES)
    assert all(not v.any() for v in initial.values())
    # One self-contained file: no external data.
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    model = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_onnx_step_matches_offline(net32, exported, record_property):
    _, sess = exported
    frames = mpf_like(K_FRAMES).astype(np.float32)
    expected = offline(net32, frames)
    feeder = PairFeeder(sess, handwriting_initial_state(net32))
    got = feeder.push(frames[0])  # one TR frame (two MPF frames) per call
    assert [end for end, _ in got] == [FIRST_END + EVERY * i for i in range(len(expected))]
    diff = float(np.abs(np.stack([y for _, y in got]) - expected).max())
    record_property("onnx_vs_offline_max_abs_diff", diff)
    print(f"ONNX float32 vs offline torch float32: max |diff| = {diff:.3g}")
    assert diff < 1e-4


def test_odd_chunks_carry_over(net32, exported):
    """Deliveries of 1, 3, 5, ... frames: the caller's pending frame makes the pairs."""
    _, sess = exported
    frames = mpf_like(K_FRAMES + 1, seed=3).astype(np.float32)[0]  # odd count: one left over
    whole = PairFeeder(sess, handwriting_initial_state(net32))
    by_pairs = whole.push(frames)
    pieces = PairFeeder(sess, handwriting_initial_state(net32))
    by_chunks = chunked(frames, pieces)
    assert pieces.pending is not None and pieces.frames == K_FRAMES + 1
    assert [e for e, _ in by_chunks] == [e for e, _ in by_pairs]
    assert len(by_chunks) == emission_count(K_FRAMES + 1)
    np.testing.assert_array_equal(np.stack([y for _, y in by_chunks]),
                                  np.stack([y for _, y in by_pairs]))


def test_reset_equals_fresh_offline_pass(net32, exported):
    _, sess = exported
    reset_at = 301  # odd: the feeder holds a pending frame that the reset drops
    frames = mpf_like(reset_at + K_FRAMES, seed=4).astype(np.float32)
    expected = offline(net32, frames[:, reset_at:])

    feeder = PairFeeder(sess, handwriting_initial_state(net32))
    chunked(frames[0, :reset_at], feeder)
    assert feeder.pending is not None
    feeder.reset()
    got = chunked(frames[0, reset_at:], feeder)
    assert [e for e, _ in got] == [FIRST_END + EVERY * i for i in range(len(expected))]
    np.testing.assert_allclose(np.stack([y for _, y in got]), expected, rtol=0, atol=1e-4)



def test_step_cost(net32, exported, record_property):
    """Measured, not asserted: ORT, 1 thread, full-size model, one call per TR frame."""
    _, sess = exported
    frames = mpf_like(2 * 600, seed=5).astype(np.float32)
    state = handwriting_initial_state(net32)
    times = []
    for u in range(600):
        feed = {"x": frames[:, 2 * u: 2 * u + 2], **state}
        t0 = time.perf_counter()
        _, _, *nxt = sess.run(None, feed)
        times.append(time.perf_counter() - t0)
        state = dict(zip(STATE_NAMES, nxt))
    us = np.array(times[50:]) * 1e6
    p50, p99 = float(np.median(us)), float(np.percentile(us, 99))
    record_property("step_us_p50", p50)
    record_property("step_us_p99", p99)
    print(f"handwriting ONNX step: p50 {p50:.0f} us, p99 {p99:.0f} us per call (40 ms hop)")
