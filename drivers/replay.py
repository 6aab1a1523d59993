"""Replay: an HDF5 recording played as if it were a band.

URL: ``replay:FILE[?speed=1&start=0&end=0&loop=0]`` (options in
:data:`emgd.drivers.urls.SCHEMES`):

``speed``  1 = real time, 4 = four times faster, 0 = as fast as the sink takes it.
``start``, ``end``  Unix seconds, like the partitions of the reference's corpus CSV: rows
          ``[searchsorted(time, start), searchsorted(time, end))`` are played (0 = the file's
          start / end).
``loop``   start again after the last row; the device index and ``t`` keep increasing.

Files: emgd recordings (``emgd.recorder``) and the public dataset's files. ``data`` is read
by field name: ``emg`` (16 channels, required), ``time`` (float64 Unix s, required) and
``sample_index`` (optional; else the row number is the device index). Other fields
(``wrist_angles``) are ignored. Samples are written into the sink with their device index,
so a gap in a recording replays as a gap. Pacing is drift-free from the monotonic clock:
the device index due is ``first + speed * rate * elapsed``. Unpaced replay waits for room
when the sink has ``free()`` (samples it can take before a reader would be lapped).

Time base: :attr:`ReplayDevice.clock` (:class:`ReplayClock`) maps a device index to the
recording's own ``time`` column, with the interface of :class:`emgd.clock.ClockMap` that the
pipeline uses, so events keep the recording's time base. :meth:`ReplayDevice.recorded_clock`
returns it (the daemon's hook).

``prompts`` and ``stages`` (pandas "fixed" format, see
reference/neuromotor-models.md §1.3) are read with h5py alone: numeric columns as arrays;
string columns are pickles, which are never unpickled: their strings are read from the
pickle's opcodes by :mod:`pickletools` (a parser that executes nothing), and a column whose
opcodes are not exactly a list of strings is left out (named in ``Table.skipped``).
"""

from __future__ import annotations

import logging
import math
import os
import pickletools
import time
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from emgd import N_CHANNELS, SAMPLE_RATE
from emgd.drivers.base import Device, DeviceInfo
from emgd.drivers.urls import DeviceUrl, parse_url
from emgd.errors import DeviceError, DeviceNotFound

log = logging.getLogger(__name__)

READ_ROWS = 4000  # rows per h5py read (2 s of EMG)
PACE_S = 0.005  # sleep between paced deliveries


# ---------------------------------------------------------------------- time base
class ReplayClock:
    """Device index → the recording's Unix time; a drop-in for the pipeline's ClockMap.

    Indices present in the recording map to their ``time`` exactly; others (inside a gap,
    before the first) are extrapolated at the nominal rate from the nearest earlier row.
    On loop ``m`` index ``i + m * span`` maps to ``time(i) + m * span_s``. ``update`` and
    ``reset`` do nothing: the recording already holds the times."""

    def __init__(self, rate: float = float(SAMPLE_RATE)) -> None:
        self.rate = float(rate)
        self.drift_ppm = 0.0
        # (index, time, span, span_s) replaced as one tuple, so a reader never mixes two loads
        self._table = (np.zeros(1, np.int64), np.zeros(1, np.float64), 1 << 62, 0.0)

    def load(self, index: np.ndarray, times: np.ndarray, loop: bool) -> None:
        first, last = int(index[0]), int(index[-1])
        span = last - first + 1 if loop else 1 << 62
        span_s = float(times[-1] - times[0]) + 1.0 / self.rate if loop else 0.0
        self._table = (np.ascontiguousarray(index, np.int64),
                       np.ascontiguousarray(times, np.float64), span, span_s)

    def update(self, first_sample: int, n: int, t_recv_ns: int) -> None:
        """ClockMap's observation hook: nothing to estimate."""

    def reset(self) -> None:
        """ClockMap's gap hook: the recording's times stay valid across gaps."""

    def unix_times(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        index, times, span, span_s = self._table
        lap = np.maximum((indices - index[0]) // span, 0)
        local = indices - lap * span
        j = np.searchsorted(index, local, side="right") - 1
        np.clip(j, 0, index.shape[0] - 1, out=j)
        np.subtract(local, index[j], out=local)
        np.multiply(local, 1.0 / self.rate, out=out, casting="unsafe")
        out += times[j]
        if span_s:
            out += lap * span_s
        return out

    def unix_time(self, index: int) -> float:
        out = np.empty(1, np.float64)
        return float(self.unix_times(np.array([index], np.int64), out)[0])


# ---------------------------------------------------------------------- pandas tables
@dataclass(frozen=True)
class Table:
    """A pandas "fixed" DataFrame read without pandas: columns in the frame's order."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # columns that could not be read without unpickling
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]


def read_pandas_fixed(group: h5py.Group) -> Table:
    """Read a DataFrame written by ``DataFrame.to_hdf(path, key)`` (format "fixed")."""
    if _text(group.attrs.get("pandas_type", b"")) != "frame":
        raise ValueError(f"{group.name} is not a pandas frame (pandas_type != 'frame')")
    order = [_text(x) for x in group["axis0"][()]]
    index = np.asarray(group["axis1"][()])
    rows = index.shape[0]
    found: dict[str, np.ndarray] = {}
    k = 0
    while f"block{k}_items" in group:
        items = [_text(x) for x in group[f"block{k}_items"][()]]
        node = group[f"block{k}_values"]
        values = _block_values(node, rows, len(items))
        if values is not None:
            for j, name in enumerate(items):
                found[name] = values[:, j]
        k += 1
    columns = {name: found[name] for name in order if name in found}
    skipped = tuple(name for name in order if name not in found)
    return Table(columns, skipped, index)


def _block_values(node: h5py.Dataset, rows: int, ncols: int) -> np.ndarray | None:
    """A block's values as (rows, ncols), or None when they cannot be read safely."""
    transposed = node.attrs.get("transposed", True)
    transposed = bool(transposed) if isinstance(transposed, (bool, np.bool_, int, np.integer)) else True
    if node.dtype.kind in "fiub":
        arr = np.asarray(node[()])
        shape = (rows, ncols) if transposed else (ncols, rows)
        if arr.shape != shape:
            return None
        return arr if transposed else arr.T
    if h5py.check_vlen_dtype(node.dtype) is not None and node.shape == (1,):
        strings = _pickled_strings(bytes(np.asarray(node[0], np.uint8)))
        if strings is None or len(strings) != rows * ncols:
            return None
        arr = np.array(strings, dtype=str)
        return arr.reshape(rows, ncols) if transposed else arr.reshape(ncols, rows).T
    return None


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_GET_OPS = {"BINGET", "LONG_BINGET", "GET"}
_PUT_OPS = {"BINPUT", "LONG_BINPUT", "PUT"}


def _pickled_strings(blob: bytes) -> list[str] | None:
    """The strings of a pickled numpy object array of str, read from the opcodes (nothing
    is executed). The array's items are the list after the last ``EMPTY_LIST``; any item
    that is not a string (or a memo reference to one) makes the result None."""
    try:
        ops = list(pickletools.genops(blob))
    except Exception:  # noqa: BLE001 - a malformed pickle is just unreadable
        return None
    memo: dict[int, str | None] = {}
    last: str | None = None
    items: list[str] | None = None
    for op, arg, _ in ops:
        name = op.name
        if name in _STRING_OPS:
            last = arg
            if items is not None:
                items.append(arg)
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in _PUT_OPS:
            memo[int(arg)] = last
        elif name in _GET_OPS:
            value = memo.get(int(arg))
            if items is not None:
                if value is None:
                    return None
                items.append(value)
            last = value
            continue
        elif name == "EMPTY_LIST":
            items = []
        elif items is not None and name not in ("MARK", "APPENDS", "APPEND", "FRAME"):
            if name in ("TUPLE", "STOP"):
                return items
            return None
        last = None
    return None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


# ---------------------------------------------------------------------- the device
@dataclass(frozen=True)
class _Meta:
    rows: int
    has_index: bool
    device_id: str
    simulated: bool
    firmware: str
    scale_uv: float | None
    task: str
    emgd: bool


class ReplayDevice(Device):
    """The ``replay`` URL scheme. Metadata and ``prompts`` are read in the constructor
    (the file is opened and closed); samples are read while streaming."""

    transport = "replay"
    simulated = False

    def __init__(self, url: DeviceUrl | str) -> None:
        parsed = parse_url(url) if isinstance(url, str) else url
        if parsed.scheme != "replay" or not parsed.target:
            raise DeviceError(f"not a replay URL: {parsed}")
        self.path = os.path.expanduser(parsed.target)
        opts = parsed.options
        self.speed = float(opts["speed"])  # type: ignore[arg-type]
        self.loop = bool(opts["loop"])
        self.start_time = float(opts["start"])  # type: ignore[arg-type]
        self.end_time = float(opts["end"])  # type: ignore[arg-type]
        meta, self.prompts, self.stages = _read_meta(self.path)
        self.meta = meta
        self.task = meta.task
        stem = os.path.splitext(os.path.basename(self.path))[0]
        info = DeviceInfo(
            device_id=meta.device_id or stem, name=f"replay of {os.path.basename(self.path)}",
            transport="replay", url=str(parsed), simulated=meta.simulated,
            scale_uv=meta.scale_uv, firmware=meta.firmware,
        )
        super().__init__(parsed, info)
        self.clock = ReplayClock()
        self._file: h5py.File | None = None
        self.sent = 0  # rows written into the sink (all loops)
        self.loops = 0  # completed passes (with loop=1)

    def recorded_clock(self) -> ReplayClock:
        """The time base the pipeline must use instead of its ClockMap."""
        return self.clock

    # ------------------------------------------------------------------ hooks
    def _open(self) -> None:
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DeviceError(f"replay: cannot open {self.path}: {exc}") from exc
        data = self._file["data"]
        times = np.asarray(data.fields("time")[()], np.float64)
        r0 = int(np.searchsorted(times, self.start_time, "left")) if self.start_time else 0
        r1 = int(np.searchsorted(times, self.end_time, "left")) if self.end_time else len(times)
        if r1 <= r0:
            self._file.close()
            raise DeviceError(f"replay: start={self.start_time} end={self.end_time} selects no "
                              f"samples of {self.path} (its time runs from {times[0]:.3f} "
                              f"to {times[-1]:.3f})")
        if self.meta.has_index:
            index = np.asarray(data.fields("sample_index")[r0:r1], np.int64)
        else:
            index = np.arange(r0, r1, dtype=np.int64)
        self._r0, self._rows = r0, r1 - r0
        self._index = index
        self._span = int(index[-1]) - int(index[0]) + 1
        self.clock.load(index, times[r0:r1], self.loop)
        self._cache = np.zeros((0, N_CHANNELS), np.float32)
        self._cache_at = 0

    def _close_io(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _run(self) -> None:
        self._set_link("up")
        index, n = self._index, self._rows
        first = int(index[0])
        rate = float(SAMPLE_RATE) * self.speed
        row, lap = 0, 0
        t0 = time.monotonic_ns()
        while not self._stop_event.is_set():
            if rate > 0:
                due = first + int(rate * (time.monotonic_ns() - t0) * 1e-9) - lap * self._span
                upto = min(n, int(np.searchsorted(index, due, "left")))
            else:
                upto = min(n, row + READ_ROWS)
                if not self._wait_for_room(upto - row):
                    break
            if upto > row:
                self._emit(row, upto, lap)
                row = upto
            if row >= n:
                if not self.loop:
                    self._end_of_stream()
                    return
                row, lap = 0, lap + 1
                self.loops += 1
                continue
            if rate > 0:
                self._stop_event.wait(PACE_S)

    def _emit(self, a: int, b: int, lap: int) -> None:
        """Write rows [a, b) of the selected range into the sink, split at index gaps."""
        t_recv = time.monotonic_ns()
        offset = lap * self._span
        while a < b:
            c = min(b, a + READ_ROWS)
            emg = self._rows_emg(a, c)
            idx = self._index[a:c]
            breaks = np.flatnonzero(np.diff(idx) != 1) + 1
            s = 0
            for e in (*breaks.tolist(), c - a):
                self._write_block(emg[s:e], int(idx[s]) + offset, t_recv)
                s = e
            self.sent += c - a
            a = c

    def _rows_emg(self, a: int, b: int) -> np.ndarray:
        """EMG of rows [a, b) (b - a <= READ_ROWS) from a cache of READ_ROWS rows."""
        at, cache = self._cache_at, self._cache
        if not (at <= a and b <= at + cache.shape[0]):
            assert self._file is not None
            stop = min(self._rows, a + READ_ROWS)
            raw = self._file["data"].fields("emg")[self._r0 + a:self._r0 + stop]
            self._cache = cache = np.ascontiguousarray(raw, np.float32)
            self._cache_at = at = a
        return cache[a - at:b - at]


def _read_meta(path: str) -> tuple[_Meta, Table | None, Table | None]:
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError as exc:
        raise DeviceNotFound(f"replay: no such file: {path}") from exc
    except OSError as exc:
        raise DeviceError(f"replay: {path} is not a readable HDF5 file: {exc}") from exc
    with f:
        data = f.get("data")
        names = getattr(getattr(data, "dtype", None), "names", None) or ()
        if not isinstance(data, h5py.Dataset) or data.ndim != 1 or "emg" not in names \
                or "time" not in names:
            raise DeviceError(f"replay: {path} has no 1-D compound dataset 'data' with "
                              "fields 'emg' and 'time' (the public dataset's layout)")
        emg_shape = data.dtype.fields["emg"][0].shape
        if emg_shape != (N_CHANNELS,):
            raise DeviceError(f"replay: {path}: data['emg'] has shape {emg_shape} per row, "
                              f"expected ({N_CHANNELS},)")
        if data.shape[0] == 0:
            raise DeviceError(f"replay: {path} holds no samples")
        a = f.attrs
        emgd_file = _text(a.get("format", "")) == "emgd-recording"
        scale = a.get("scale_uv")
        meta = _Meta(
            rows=int(data.shape[0]), has_index="sample_index" in names,
            device_id=_text(a.get("device_id", "")), simulated=bool(a.get("simulated", False)),
            firmware=_text(a.get("firmware", "")),
            scale_uv=None if scale is None or math.isnan(float(scale)) else float(scale),
            task=_text(data.attrs.get("task", "")), emgd=emgd_file,
        )
        prompts = _table(f, "prompts")
        stages = _table(f, "stages")
    return meta, prompts, stages


def _table(f: h5py.File, key: str) -> Table | None:
    group = f.get(key)
    if not isinstance(group, h5py.Group):
        return None
    try:
        return read_pandas_fixed(group)
    except (KeyError, ValueError, OSError) as exc:
        log.warning("replay: %s/%s is not a readable pandas frame (%s); ignored",
                    f.filename, key, exc)
        return None


__all__ = ["ReplayClock", "ReplayDevice", "Table", "read_pandas_fixed"]
