"""A lock-free ring buffer of EMG samples: one writer, any number of readers.

The ring holds, per sample, one row of ``channels`` float32 values, the int64 device
sample index and the int64 host receive time (``time.monotonic_ns()``). Everything is
preallocated; :meth:`RingBuffer.write` and :meth:`Reader.read` allocate no array memory
(they create a few short-lived numpy view objects, nothing proportional to the data).

Positions
---------
A *position* counts samples written since the ring was made (0, 1, 2, ...; a Python
int, so it never wraps). Sample at position ``p`` lives in slot ``p % capacity``. The
device sample index is stored next to it and is independent of the position: a jump
in the device index (a link gap) is visible to readers as a discontinuity in
``index_out``, while a jump in positions (this reader was lapped) is reported as
``ReadResult.lost``.

Two counters
------------
The writer keeps two counters, both Python ints held in plain attributes:

``_claimed``
    stored *before* the writer touches any slot: every sample at a position below
    ``_claimed - capacity`` may have been (or may be being) overwritten.
``_written``
    stored *after* the copy has finished: every sample below ``_written`` is complete.

``write(n samples)``: ``_claimed = w + n``; copy data, indices, times; ``_written = w + n``.

``read()``: ``w = _written``; ``c = _claimed``; copy positions
``[max(cursor, c - capacity), min(w, ... + len(out)))``; then ``c2 = _claimed`` again.
If ``c2 - capacity`` is above the first copied position, the writer lapped the reader
*while* it copied: the copy may be torn, it is discarded and the read retried from
``c2 - capacity`` (seqlock style). Everything the reader skips counts as lost, so for
every reader ``received + lost == written`` exactly once it has caught up.

Why this is correct without locks (the memory-ordering argument)
----------------------------------------------------------------
This relies on CPython *with* the GIL (3.11 here; a free-threaded 3.13t build would
need real atomics and fences, and is not supported by this module):

1. Storing or loading an attribute is a single bytecode operation executed while
   holding the GIL, so another thread sees either the old or the new int object,
   never a mix. Python ints are immutable.
2. Numpy copies are *not* atomic. ``raw_array_assign_array`` (numpy
   ``_core/src/multiarray/array_assign_array.c``) calls
   ``NPY_BEGIN_THREADS_THRESHOLDED(nitems)``, which releases the GIL for copies of more
   than 500 elements (a 40-sample block of 16 channels is 640): writer and reader may
   then really copy at the same time on two cores. Small copies keep the GIL and are
   atomic with respect to other Python threads, but the design does not count on it.
3. Every release and re-acquisition of the GIL is a mutex/condition-variable
   operation, i.e. a full memory barrier. Code that runs between two GIL hand-overs of
   one thread is seen by other threads in program order at the hand-over points.
   Therefore: a reader that loads ``_claimed`` after its copy and sees value ``c2``
   knows the writer has not started to store into any slot holding a position
   ``>= c2 - capacity`` (the writer stores ``_claimed`` *before* it can release the GIL
   inside its copy, and it cannot store into those slots before advancing
   ``_claimed`` again). Symmetrically, a reader that loads ``_written == w`` sees all
   stores of the copy that preceded it (the copy ends, the GIL is re-taken if it was
   dropped, then ``_written`` is stored).
4. The only window in which writer and reader truly overlap is inside numpy copies
   with the GIL released; for those, point 3 guarantees that a reader which validates
   ``c2 - capacity <= first copied position`` read slots the writer did not touch
   during the copy. A reader that fails the check throws the copy away.

A single-sample write claims and publishes in the same way, so a torn row (half old,
half new channels) is impossible to return. The writer never waits for readers and
never learns they exist: readers hold their own cursors. Only one thread may write.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

__all__ = ["ReadResult", "Reader", "RingBuffer"]

_MAX_RETRIES = 16  # torn copies before a read gives up and returns n=0 (lost still counted)


class ReadResult(NamedTuple):
    """Outcome of one :meth:`Reader.read`."""

    n: int
    """Samples copied into ``out[:n]``, ``index_out[:n]``, ``trecv_out[:n]``."""
    lost: int
    """Samples overwritten before this reader got them (skipped just before ``start``)."""
    start: int
    """Ring position of ``out[0]`` (positions count samples written to the ring)."""


class RingBuffer:
    """Preallocated ring of ``capacity`` samples × ``channels``; one writer thread.

    >>> ring = RingBuffer(capacity=8, channels=2)
    >>> ring.write(np.ones((3, 2), np.float32), first_sample=100, t_recv_ns=5)
    >>> r = ring.reader(start="oldest")
    >>> r.read_new(10)[3]
    ReadResult(n=3, lost=0, start=0)
    """

    __slots__ = ("capacity", "channels", "_data", "_index", "_trecv", "_ramp",
                 "_claimed", "_written")

    def __init__(self, capacity: int = 2**16, channels: int = 16) -> None:
        if int(capacity) < 1 or int(channels) < 1:
            raise ValueError(f"capacity and channels must be >= 1, got {capacity}, {channels}")
        self.capacity = int(capacity)
        self.channels = int(channels)
        self._data = np.zeros((self.capacity, self.channels), dtype=np.float32)
        self._index = np.zeros(self.capacity, dtype=np.int64)
        self._trecv = np.zeros(self.capacity, dtype=np.int64)
        self._ramp = np.arange(self.capacity, dtype=np.int64)  # for filling indices
        self._claimed = 0
        self._written = 0

    @property
    def written(self) -> int:
        """Total samples ever written (complete ones), a never-wrapping Python int."""
        return self._written

    def write(self, data: np.ndarray, first_sample: int, t_recv_ns: int) -> None:
        """Append ``data`` (n, channels); device indices ``first_sample ... + n - 1``.

        Never blocks. If ``n > capacity`` only the newest ``capacity`` rows are stored,
        but all ``n`` are counted (readers see the rest as lost). Only one thread may
        call this. Any dtype that casts to float32 with ``same_kind`` is accepted.
        """
        if data.ndim != 2 or data.shape[1] != self.channels:
            raise ValueError(f"data must have shape (n, {self.channels}), got {data.shape}")
        if not np.can_cast(data.dtype, np.float32, "same_kind"):
            raise TypeError(f"cannot store {data.dtype} samples as float32")
        n = data.shape[0]
        if n == 0:
            return
        cap = self.capacity
        w = self._written
        m = n if n < cap else cap
        skip = n - m  # rows of data that are counted but never stored
        self._claimed = w + n  # (1) claim: slots of positions < w + n - cap are now in flux
        pos = (w + skip) % cap
        k1 = min(m, cap - pos)
        base = first_sample + skip
        np.copyto(self._data[pos:pos + k1], data[skip:skip + k1], casting="same_kind")
        np.add(self._ramp[:k1], base, out=self._index[pos:pos + k1])
        self._trecv[pos:pos + k1] = t_recv_ns
        if k1 < m:  # wrapped
            k2 = m - k1
            np.copyto(self._data[:k2], data[skip + k1:], casting="same_kind")
            np.add(self._ramp[:k2], base + k1, out=self._index[:k2])
            self._trecv[:k2] = t_recv_ns
        self._written = w + n  # (2) publish, after the copy

    def reader(self, start: Literal["now", "oldest"] = "now") -> Reader:
        """A new reader; ``"now"``: only samples written from now on; ``"oldest"``:
        from the oldest sample still held."""
        if start == "now":
            return Reader(self, self._written)
        if start == "oldest":
            return Reader(self, max(0, self._written - self.capacity))
        raise ValueError(f"start must be 'now' or 'oldest', got {start!r}")


class Reader:
    """One cursor into a :class:`RingBuffer`. Use each reader from one thread only."""

    __slots__ = ("_ring", "_cursor", "lost_total", "received_total", "torn_retries")

    def __init__(self, ring: RingBuffer, cursor: int) -> None:
        self._ring = ring
        self._cursor = cursor
        self.lost_total = 0  # samples overwritten before this reader got them
        self.received_total = 0  # samples returned by read()
        self.torn_retries = 0  # copies discarded because the writer lapped us mid-copy

    @property
    def position(self) -> int:
        """Ring position of the next sample this reader will return (if not lost)."""
        return self._cursor

    def lag(self) -> int:
        """Samples written that this reader has neither read nor counted as lost.
        May exceed ``capacity``: the excess will be reported as lost by the next read."""
        return self._ring._written - self._cursor

    def available(self) -> int:
        """Samples a read could return right now (at most ``capacity``)."""
        ring = self._ring
        w = ring._written
        return max(0, w - max(self._cursor, ring._claimed - ring.capacity))

    def read(self, out: np.ndarray, index_out: np.ndarray, trecv_out: np.ndarray) -> ReadResult:
        """Copy up to ``len(out)`` samples into the caller's arrays, oldest first.

        ``out`` is (m, channels) float32, ``index_out`` and ``trecv_out`` are (m,) int64
        (longer arrays are fine; the shortest length bounds the read). Returns how many
        were copied, how many were lost (overwritten) just before them, and the ring
        position of ``out[0]``. A result may have ``n == 0`` and ``lost > 0``. Rows past
        ``n`` may have been scribbled on (a copy discarded as torn); they mean nothing.
        """
        ring = self._ring
        cap = ring.capacity
        m = min(out.shape[0], index_out.shape[0], trecv_out.shape[0])
        cursor = self._cursor
        start = cursor
        n = 0
        for _ in range(_MAX_RETRIES):
            w = ring._written  # load order: _written first, then _claimed (>= _written)
            oldest = ring._claimed - cap
            if start < oldest:
                start = oldest if oldest < w else w  # never move the cursor past _written
            end = min(w, start + m)
            if end <= start:
                break
            self._copy(start, end, out, index_out, trecv_out)
            oldest = ring._claimed - cap  # re-check: lapped while copying?
            if oldest <= start:
                n = end - start
                break
            self.torn_retries += 1
            start = oldest if oldest < w else w
        lost = start - cursor
        self._cursor = start + n
        self.lost_total += lost
        self.received_total += n
        return ReadResult(n, lost, start)

    def _copy(self, start: int, end: int, out: np.ndarray, index_out: np.ndarray,
              trecv_out: np.ndarray) -> None:
        ring = self._ring
        cap = ring.capacity
        pos = start % cap
        k = end - start
        k1 = min(k, cap - pos)
        np.copyto(out[:k1], ring._data[pos:pos + k1])
        np.copyto(index_out[:k1], ring._index[pos:pos + k1])
        np.copyto(trecv_out[:k1], ring._trecv[pos:pos + k1])
        if k1 < k:
            k2 = k - k1
            np.copyto(out[k1:k], ring._data[:k2])
            np.copyto(index_out[k1:k], ring._index[:k2])
            np.copyto(trecv_out[k1:k], ring._trecv[:k2])

    def read_new(self, max_n: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, ReadResult]:
        """Allocating convenience (tests, tools; not for the hot path): read up to
        ``max_n`` samples (default: capacity) into fresh arrays, trimmed to ``n``."""
        ring = self._ring
        m = ring.capacity if max_n is None else int(max_n)
        out = np.empty((m, ring.channels), dtype=np.float32)
        index_out = np.empty(m, dtype=np.int64)
        trecv_out = np.empty(m, dtype=np.int64)
        res = self.read(out, index_out, trecv_out)
        return out[:res.n], index_out[:res.n], trecv_out[:res.n], res
