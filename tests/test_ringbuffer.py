"""Ring buffer: model-based test against a plain list, seqlock re-check, and a real
writer thread racing a fast and a lapped reader."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from emgd.ringbuffer import ReadResult, Reader, RingBuffer

CH = 3


def _rows(first_pos: int, n: int) -> np.ndarray:
    """Row p holds p*CH + channel: every sample and channel distinct, exact in float32."""
    pos = np.arange(first_pos, first_pos + n, dtype=np.float64)[:, None]
    return (pos * CH + np.arange(CH)).astype(np.float32)


class RingModel(RuleBasedStateMachine):
    """Random writes (also larger than the ring) and reads against a list model."""

    @initialize(cap=st.sampled_from([1, 2, 7, 16]))
    def setup(self, cap: int) -> None:
        self.cap = cap
        self.ring = RingBuffer(capacity=cap, channels=CH)
        self.model: list[tuple[int, int]] = []  # per position: (device index, t_recv)
        self.next_index = 1000
        self.t = 0
        self.readers: list[tuple[Reader, list[int]]] = []  # reader, [cursor, received, lost]
        self._add(self.ring.reader(start="oldest"), 0)

    def _add(self, reader: Reader, cursor: int) -> None:
        self.readers.append((reader, [cursor, 0, 0]))

    @rule(n=st.integers(0, 40), gap=st.integers(0, 3), dt=st.integers(0, 10**6))
    def write(self, n: int, gap: int, dt: int) -> None:
        self.next_index += gap  # a link gap between blocks
        self.t += dt
        pos = len(self.model)
        self.ring.write(_rows(pos, n), self.next_index, self.t)
        self.model.extend((self.next_index + i, self.t) for i in range(n))
        self.next_index += n

    @precondition(lambda self: len(self.readers) < 4)
    @rule(oldest=st.booleans())
    def add_reader(self, oldest: bool) -> None:
        w = len(self.model)
        if oldest:
            self._add(self.ring.reader(start="oldest"), max(0, w - self.cap))
        else:
            self._add(self.ring.reader(start="now"), w)

    @rule(which=st.integers(0, 3), m=st.integers(0, 40))
    def read(self, which: int, m: int) -> None:
        reader, state = self.readers[which % len(self.readers)]
        cursor = state[0]
        w = len(self.model)
        lost = max(0, (w - self.cap) - cursor)
        start = cursor + lost
        n = min(m, w - start)
        out = np.full((m, CH), np.nan, np.float32)
        idx = np.full(m, -1, np.int64)
        tr = np.full(m, -1, np.int64)
        res = reader.read(out, idx, tr)
        assert res == ReadResult(n, lost, start)
        np.testing.assert_array_equal(out[:n], _rows(start, n))
        assert idx[:n].tolist() == [i for i, _ in self.model[start:start + n]]
        assert tr[:n].tolist() == [t for _, t in self.model[start:start + n]]
        assert np.isnan(out[n:]).all() and (idx[n:] == -1).all()  # nothing beyond n touched
        state[0] = start + n
        state[1] += n
        state[2] += lost

    @invariant()
    def counters(self) -> None:
        w = len(self.model)
        assert self.ring.written == w
        for reader, (cursor, received, lost) in getattr(self, "readers", []):
            assert reader.position == cursor
            assert reader.lag() == w - cursor
            assert reader.available() == w - max(cursor, w - self.cap)
            assert reader.lost_total == lost and reader.received_total == received


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_write_larger_than_capacity_keeps_newest_and_counts_all() -> None:
    ring = RingBuffer(capacity=5, channels=CH)
    reader = ring.reader(start="now")
    ring.write(_rows(0, 12), first_sample=50, t_recv_ns=7)
    assert ring.written == 12
    data, idx, tr, res = reader.read_new()
    assert res == ReadResult(5, 7, 7)
    np.testing.assert_array_equal(data, _rows(7, 5))
    assert idx.tolist() == [57, 58, 59, 60, 61] and tr.tolist() == [7] * 5
    assert reader.lost_total + reader.received_total == ring.written


def test_overrun_during_copy_is_detected_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer laps the reader between its counter check and the end of its copy
    (simulated by writing from inside the copy): the torn copy must be discarded."""
    ring = RingBuffer(capacity=8, channels=CH)
    ring.write(_rows(0, 8), 0, 0)
    reader = ring.reader(start="oldest")
    real_copy = Reader._copy
    calls = []

    def racing_copy(self, start, end, out, index_out, trecv_out):  # type: ignore[no-untyped-def]
        if not calls:
            ring.write(_rows(8, 3), 8, 1)  # overwrites slots of positions 0..2 mid-read
        calls.append((start, end))
        real_copy(self, start, end, out, index_out, trecv_out)

    monkeypatch.setattr(Reader, "_copy", racing_copy)
    data, idx, tr, res = reader.read_new(8)
    assert calls[0] == (0, 8) and calls[1][0] == 3
    assert res == ReadResult(8, 3, 3)
    np.testing.assert_array_equal(data, _rows(3, 8))
    assert idx.tolist() == list(range(3, 11))
    assert reader.torn_retries == 1 and reader.lost_total == 3


def test_rejects_bad_input_without_claiming() -> None:
    ring = RingBuffer(capacity=4, channels=CH)
    with pytest.raises(ValueError):
        ring.write(np.zeros((2, CH + 1), np.float32), 0, 0)
    with pytest.raises(TypeError):
        ring.write(np.zeros((2, CH), np.complex64), 0, 0)
    with pytest.raises(ValueError):
        ring.reader(start="newest")  # type: ignore[arg-type]
    assert ring.written == 0 and ring._claimed == 0
    assert ring.reader().read_new()[3] == ReadResult(0, 0, 0)


# ---------------------------------------------------------------- real threads
CH16 = 16
MOD = 1 << 16  # every channel of a row carries (device index) % MOD: torn rows show
OFFSET = 10_000  # device index = ring position + OFFSET (no link gaps in this test)


def _check_reader(reader: Reader, out: np.ndarray, idx: np.ndarray, tr: np.ndarray,
                  done: threading.Event, errors: list[BaseException], slow: bool) -> None:
    try:
        expected = reader.position + OFFSET
        while True:
            finished = done.is_set()  # read once more after the writer has finished
            res = reader.read(out, idx, tr)
            n = res.n
            if n:
                i = idx[:n]
                assert i[0] == expected + res.lost, (i[0], expected, res.lost)
                assert n == 1 or (np.diff(i) == 1).all()
                assert (out[:n] == (i % MOD).astype(np.float32)[:, None]).all(), "torn row"
                lag = i - tr[:n]  # t_recv_ns carries the block's first index
                assert ((lag >= 0) & (lag < 1000)).all(), "torn index/time"
                expected = int(i[-1]) + 1
            else:
                expected += res.lost
            if finished and n == 0 and res.lost == 0:
                return
            if slow:
                time.sleep(0.002)
    except BaseException as exc:  # re-raised by the test thread
        errors.append(exc)
        done.set()


def test_threads_writer_fast_reader_and_lapped_reader() -> None:
    cap = 4096
    ring = RingBuffer(capacity=cap, channels=CH16)
    table = (np.arange(MOD + 2048) % MOD).astype(np.float32)[:, None].repeat(CH16, axis=1)
    rng = np.random.default_rng(7)
    sizes = rng.choice([1, 10, 40, 320, 1000], size=4096)
    done = threading.Event()
    errors: list[BaseException] = []
    fast, slow = ring.reader(), ring.reader()
    threads = [
        threading.Thread(target=_check_reader, args=(
            r, np.empty((m, CH16), np.float32), np.empty(m, np.int64), np.empty(m, np.int64),
            done, errors, is_slow))
        for r, m, is_slow in ((fast, cap, False), (slow, 256, True))
    ]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads much more than the default 5 ms
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 1.5
        pos = 0
        k = 0
        while pos < 3_000_000 and time.monotonic() < deadline and not done.is_set():
            n = int(sizes[k % sizes.size])
            k += 1
            first = pos + OFFSET
            ring.write(table[first % MOD:first % MOD + n], first, first)
            pos += n
        done.set()
        for t in threads:
            t.join(timeout=10)
    finally:
        sys.setswitchinterval(old_interval)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads)
    for r in (fast, slow):
        assert r.received_total + r.lost_total == ring.written
    assert slow.lost_total > 0, "the slow reader was meant to be lapped"
    print(f"written={ring.written} fast lost={fast.lost_total} slow lost={slow.lost_total} "
          f"torn retries fast={fast.torn_retries} slow={slow.torn_retries}")
