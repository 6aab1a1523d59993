"""DecoderStage scheduling: handwriting calls that cannot emit are deferred to light blocks.

A handwriting call whose pair of MPF frames cannot complete an emission (the card's timing
says which can) may run in a later block that carries no MPF work, one per block, after that
block's gesture step. Nothing published may change: the stage is fed the same EMG in 10-sample
blocks with deferral (every non-emitting pair waits for the next block) and without it
(``HW_MAX_DEFERRED = -1``: every call in the block of its frames, the former schedule), with
a reset on the way, and every published message (the outputs of every network included, and
its sample and t_recv) must be the same, in the same order.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from emgd import stages
from emgd.stages import DecoderStage, EventOptions, find_model_cards
from scaled_models import build_scaled

pytestmark = pytest.mark.torch

N = 26_000  # handwriting emits from segment sample 19853 on, every 320 samples
RESET_AT = 3_000  # a reset (gap) here moves the origin: 23 000 samples in the second segment
HANDWRITING_GAIN = 300.0


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    build_scaled(out, 2, handwriting_gain=HANDWRITING_GAIN)
    return find_model_cards([out])


class Ctx:
    def __init__(self):
        self.messages = []

    def publish(self, kind, sample, t_recv_ns, fields):
        self.messages.append((kind, sample, t_recv_ns, fields))


def _run(cards, block, monkeypatch, defer=True):
    if not defer:
        monkeypatch.setattr(stages, "HW_MAX_DEFERRED", -1)
    stage = DecoderStage(cards, EventOptions(outputs=True))
    hw = stage.handwriting
    calls = []  # (block start, session calls so far) after each block
    rng = np.random.default_rng(5)
    emg = (25.0 * rng.standard_normal((N, 16))).astype(np.float32)
    emg += (200.0 * np.sin(np.arange(N) / 37.0))[:, None].astype(np.float32)
    index = np.arange(N, dtype=np.int64)
    t_recv = 1_000_000 + 500_000 * index
    ctx = Ctx()
    stage.reset()
    for a in range(0, N, block):
        b = min(a + block, N)
        if a <= RESET_AT < b:  # split the block at the reset point, as the pipeline does
            stage.process(emg[a:RESET_AT], index[a:RESET_AT], t_recv[a:RESET_AT], ctx)
            stage.reset()
            a = RESET_AT
        stage.process(emg[a:b], index[a:b], t_recv[a:b], ctx)
        calls.append((a, hw.steps, hw.buffered))
    monkeypatch.undo()
    return ctx.messages, stage, calls


@pytest.mark.parametrize("block", [10, 40, 250])
def test_deferred_handwriting_calls_change_nothing_published(cards, monkeypatch, block):
    small, stage_small, calls = _run(cards, block, monkeypatch)
    big, stage_big, calls_big = _run(cards, block, monkeypatch, defer=False)
    assert max(p for _, _, p in calls_big) <= 1  # the former schedule: nothing waits
    assert stage_small.deferred_emissions == 0 and stage_big.deferred_emissions == 0
    hw_small = [m for m in small if m[0] == "handwriting" or m[3].get("model") == "handwriting"]
    assert len([m for m in hw_small if m[0] == "outputs"]) == (N - RESET_AT - 19853) // 320 + 1
    assert any(m[0] == "handwriting" for m in small), "no keys: the test would prove little"

    def key(m):
        kind, sample, t, fields = m
        return (kind, sample, t, sorted((k, v) for k, v in fields.items() if k != "data"),
                fields.get("data"))

    assert [key(m) for m in small] == [key(m) for m in big]  # same messages, same order

    # never more than one pair (+ an odd frame) waits after a block; with blocks of 10 or 40
    # samples deferral did happen: calls ran in the block after their frames arrived
    pending = [p for _, _, p in calls]
    assert max(pending) <= 3
    ran_late = sum(1 for (_, s0, p0), (_, s1, _) in itertools.pairwise(calls)
                   if s1 > s0 and p0 >= 2)
    assert ran_late > 0 or block > 40


def test_emits_within_matches_the_valid_output(cards):
    """The predictor agrees with the graph's ``valid`` on every call of a long segment."""
    from emgd.decoders import load_decoder

    dec = load_decoder(cards["handwriting"])
    frames = np.zeros((2, *dec.card.input.row_shape), np.float32)
    for u in range(300):
        expect = dec.emits_within(1)
        dec.accept(frames)
        out = dec.step()
        assert (len(out.values) == 1) == expect, u
        assert expect == (2 * u + 1 >= 491 and (2 * u + 1 - 491) % 8 == 0)
