"""Full reference size: every decoder, streamed, equals the offline PyTorch network.

The three networks at their reference sizes with seeded random weights (6 482 953,
4 400 129 and 1 021 284 parameters), 30 s of seeded EMG, fed as the daemon feeds them — raw
samples in chunks of 1, 10, 37, 320 or 4000 (the gesture decoder takes them directly; for
wrist and handwriting they go through the causal high-pass and the shared incremental MPF,
whose frames feed the decoder) — through ONNX Runtime and through emgd's native kernels.
The offline side is each whole network's forward on the whole high-passed recording (its
own float64 torch MPF included). Handwriting is compared from its first emission (sample
19 853) on. A gap (``reset``) makes the rest equal a fresh offline run from the gap.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_decoders import recording

from emgd.decoders import load_decoder
from emgd.highpass import HighPass
from emgd.modelcard import load_card
from emgd.mpf import MpfExtractor

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

TASKS = ("discrete_gestures", "wrist", "handwriting")
CHUNKS = [1, 10, 37, 320, 4000]
TOL = 1e-4
N = 60_000  # 30 s
GAP = 16_000  # the reset point of the gap test (8 s): 22 s remain, 7 handwriting emissions


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    from emgd.models.build import build_models, handwriting_available, make_net

    if not handwriting_available():
        pytest.skip("handwriting exporter missing")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full")
    cards = {b.task: b.card for b in build_models(out, TASKS, size="full", seed=0)}
    nets = {t: make_net(t, "full", 0) for t in TASKS}
    x = recording(N, seed=4)
    return cards, nets, x


def offline(nets, task: str, x: np.ndarray) -> np.ndarray:
    """The whole network on the whole (high-passed) recording, as (rows, outputs)."""
    xt = torch.from_numpy(np.ascontiguousarray(HighPass(40.0).process(x).T[None]))
    with torch.no_grad():
        y = nets[task](xt)[0]
    return y.numpy() if task == "handwriting" else y.T.numpy()


@pytest.fixture(scope="module")
def reference(full):
    _, nets, x = full
    return {t: offline(nets, t, x) for t in TASKS}, {t: offline(nets, t, x[GAP:]) for t in TASKS}


def stream(dec, x: np.ndarray, chunk: int) -> np.ndarray:
    """Feed raw µV samples in ``chunk``-sample pieces as the pipeline does; all outputs."""
    rows = []
    card = dec.card
    if card.input.kind == "mpf":
        hp = HighPass(card.input.highpass_hz) if card.input.highpass_hz else None
        ex = MpfExtractor(handwriting=card.task == "handwriting", wrist=card.task == "wrist",
                          max_push=max(chunk, 40))
    for i in range(0, len(x), chunk):
        piece = x[i:i + chunk]
        if card.input.kind == "emg":
            dec.accept(piece)
        else:
            n_hw, n_wr = ex.push(hp.process(piece) if hp else piece)
            frames = ex.out_hw[:n_hw] if card.task == "handwriting" else ex.out_wrist[:n_wr]
            if len(frames):
                dec.accept(frames)
        while dec.ready():
            out = dec.step()
            assert out.first == sum(len(r) for r in rows)
            rows.append(out.values.copy())
    return np.concatenate(rows)


def check(name: str, got: np.ndarray, ref: np.ndarray, tol: float = TOL) -> None:
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    diff = float(np.abs(got - ref).max())
    print(f"max |stream - offline| {name}: {diff:.3g}")
    assert diff < tol


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("backend", ["onnx", "native-int16"])
@pytest.mark.parametrize("task", TASKS)
def test_full_size_stream_equals_offline(full, reference, task, backend, chunk):
    cards, _, x = full
    dec = load_decoder(cards[task], backend=backend, capacity=4000)
    want = "native-float32" if task == "handwriting" and backend != "onnx" else backend
    assert dec.backend == want
    got = stream(dec, x, chunk)
    ref = reference[0][task]
    if task == "handwriting":  # E emissions, the first ending at sample 19853
        assert len(ref) == (N - 19854) // 320 + 1
    check(f"{task} {backend}, chunks of {chunk}", got, ref)


@pytest.mark.parametrize("task", ["discrete_gestures", "wrist"])
def test_full_size_float32_kernel(full, reference, task):
    cards, _, x = full
    got = stream(load_decoder(cards[task], backend="native-float32", capacity=4000), x, 37)
    check(f"{task} native-float32", got, reference[0][task], tol=1e-5)


@pytest.mark.parametrize("backend", ["onnx", "native-int16"])
@pytest.mark.parametrize("task", TASKS)
def test_full_size_gap_restarts_like_a_fresh_run(full, reference, task, backend):
    cards, _, x = full
    dec = load_decoder(cards[task], backend=backend, capacity=4000)
    stream(dec, x[:GAP], 320)
    dec.reset()  # what the pipeline does at a gap
    check(f"{task} {backend} after a gap", stream(dec, x[GAP:], 320), reference[1][task])


def test_full_size_parameter_counts_and_cards(full):
    cards, nets, _ = full
    counts = {t: sum(p.numel() for p in nets[t].parameters()) for t in TASKS}
    assert counts == {"discrete_gestures": 6_482_953, "wrist": 4_400_129,
                      "handwriting": 1_021_284}
    native = {t: load_card(cards[t]).native for t in TASKS}
    assert native["discrete_gestures"].int16_events_identical is True
    assert 0 < native["discrete_gestures"].int16_max_abs_delta < TOL
    assert 0 < native["wrist"].int16_max_abs_delta < TOL
    assert native["handwriting"].kernel == "handwriting_conformer"
