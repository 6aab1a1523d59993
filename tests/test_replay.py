"""Replay: emgd recordings and files in the public dataset's layout, through a real ring."""

from __future__ import annotations

import pickle
import time

import h5py
import numpy as np
import pytest

from emgd.clock import ClockMap
from emgd.drivers.registry import open_device
from emgd.drivers.replay import ReplayDevice, read_pandas_fixed
from emgd.drivers.sim import SimDevice
from emgd.errors import DeviceError, DeviceNotFound
from emgd.recorder import Recorder
from emgd.ringbuffer import RingBuffer

N60 = 120_000


def record_sim(path, n):
    ring = RingBuffer(capacity=1 << 17)
    dev = SimDevice(f"sim?paced=0&limit={n}&counter=1")
    rec = Recorder(path, ring, ClockMap(), lambda: dev.info)
    rec.start()
    with dev:
        dev.start(ring)
        assert dev.wait(60)
    rec.stop()
    assert rec.error is None


def replay_all(url, capacity=1 << 17):
    ring = RingBuffer(capacity=capacity)
    dev = open_device(url)
    with dev:
        dev.start(ring)
        assert dev.wait(60)
    emg, index, _, res = ring.reader("oldest").read_new(capacity)
    assert res.lost == 0
    return dev, emg, index


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "session.h5"
    record_sim(path, N60)
    return path


def test_recording_replays_unpaced_to_identical_samples_indices_and_times(session):
    dev, emg, index = replay_all(f"replay:{session}?speed=0")
    with h5py.File(session) as f:
        rows = f["data"][()]
    assert np.array_equal(emg, rows["emg"]) and np.array_equal(index, rows["sample_index"])
    times = np.empty(len(index))
    dev.clock.unix_times(index, times)
    assert np.array_equal(times, rows["time"])  # t keeps the recording's time base
    assert dev.clock.unix_time(int(index[777])) == rows["time"][777]
    assert dev.info.device_id == "SIM-0000" and dev.info.simulated is True
    assert dev.stats().samples == N60 and dev.stats().gaps == 0
    assert dev.recorded_clock() is dev.clock


def test_start_end_select_rows_like_the_reference_partitions(session):
    with h5py.File(session) as f:
        t = f["data"]["time"]
    start, end = float(t[10_000]) - 1e-7, float(t[30_000]) - 1e-7
    lo, hi = np.searchsorted(t, [start, end])
    _, _, index = replay_all(f"replay:{session}?speed=0&start={start!r}&end={end!r}")
    assert np.array_equal(index, np.arange(lo, hi))
    with pytest.raises(DeviceError, match="selects no samples"):
        replay_all(f"replay:{session}?speed=0&start={float(t[-1]) + 10!r}")


def test_paced_replay_follows_the_monotonic_clock(tmp_path):
    path = tmp_path / "short.h5"
    record_sim(path, 4000)  # 2 s
    t0 = time.monotonic()
    _, _, index = replay_all(f"replay:{path}?speed=8")  # 0.25 s
    elapsed = time.monotonic() - t0
    assert len(index) == 4000 and 0.2 <= elapsed < 2.0


def test_loop_continues_the_index_and_the_time(tmp_path):
    path = tmp_path / "loop.h5"
    record_sim(path, 1000)
    ring = RingBuffer(capacity=1 << 14)
    dev = ReplayDevice(f"replay:{path}?speed=10&loop=1")  # 0.05 s per pass
    reader = ring.reader("oldest")
    with dev:
        dev.start(ring)
        deadline = time.monotonic() + 10
        while ring.written < 3500 and time.monotonic() < deadline:
            time.sleep(0.001)
    _, index, _, res = reader.read_new(3500)
    assert res.lost == 0 and np.array_equal(index, np.arange(3500))
    t = np.empty(3500)
    dev.clock.unix_times(index, t)
    assert np.all(np.diff(t) > 0)
    assert abs(t[1000] - t[999] - 1 / 2000) < 1e-3  # the seam is one sample period


def test_gaps_in_a_recording_replay_as_gaps(tmp_path):
    path = tmp_path / "gappy.h5"
    rows = np.zeros(3000, [("time", "<f8"), ("emg", "<f4", (16,)), ("sample_index", "<i8")])
    rows["sample_index"] = np.r_[np.arange(1000), np.arange(1500, 3500)]
    rows["time"] = 1.7e9 + rows["sample_index"] / 2000
    rows["emg"] = np.arange(3000, dtype=np.float32)[:, None]
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=rows)
    dev, emg, index = replay_all(f"replay:{path}?speed=0")
    assert np.array_equal(index, rows["sample_index"]) and np.array_equal(emg, rows["emg"])
    st = dev.stats()
    assert st.gaps == 1 and st.lost_samples == 500
    assert dev.clock.unix_time(1200) == pytest.approx(1.7e9 + 1200 / 2000, abs=1e-6)


# ---------------------------------------------------------------------- the public layout
GESTURES = ["index_press", "index_release", "thumb_up", "index_press"]


def write_pandas_fixed(group, columns, protocol=5):
    """A DataFrame as pandas' "fixed" format writes it (reference §1.3): numeric block
    values transposed to (rows, ncols); object blocks as a one-element VLARRAY holding a
    pickle of the transposed numpy object array."""
    names = list(columns)
    rows = len(next(iter(columns.values())))
    group.attrs["pandas_type"] = b"frame"
    group.attrs["pandas_version"] = b"0.15.2"
    group.create_dataset("axis0", data=np.array([n.encode() for n in names]))
    group.create_dataset("axis1", data=np.arange(rows, dtype=np.int64))
    strings = [n for n in names if isinstance(columns[n][0], str)]
    floats = [n for n in names if n not in strings]
    blocks = [(strings, None), (floats, np.float64)]  # pandas does not fix the numbering
    for k, (items, dtype) in enumerate(blocks):
        group.create_dataset(f"block{k}_items", data=np.array([n.encode() for n in items]))
        if dtype is None:
            values = np.array([columns[n] for n in items], dtype=object).T
            blob = np.frombuffer(pickle.dumps(values, protocol=protocol), np.uint8)
            ds = group.create_dataset(f"block{k}_values", shape=(1,),
                                      dtype=h5py.vlen_dtype(np.uint8))
            ds[0] = blob
            ds.attrs["CLASS"] = b"VLARRAY"
            ds.attrs["PSEUDOATOM"] = b"object"
        else:
            ds = group.create_dataset(f"block{k}_values",
                                      data=np.array([columns[n] for n in items], dtype).T)
        ds.attrs["transposed"] = True


def write_public_file(path, n=6000, with_gap=True):
    """The public dataset's layout: fields emg then time, attrs task, prompts, stages."""
    rng = np.random.default_rng(3)
    rows = np.zeros(n, [("emg", "<f4", (16,)), ("time", "<f8")])
    rows["emg"] = rng.normal(0, 30, (n, 16)).astype(np.float32)
    dt = np.full(n, 1 / 2000)
    if with_gap:
        dt[n // 2] = 0.01  # a timestamp gap, rows stay contiguous (as in real DG files)
    rows["time"] = 1634051788.822377 + np.cumsum(dt) - dt[0]
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=rows).attrs["task"] = "discrete_gestures"
        prompt_times = rows["time"][[500, 1500, 2500, 4500]]
        write_pandas_fixed(f.create_group("prompts"),
                           {"name": GESTURES, "time": prompt_times})
        write_pandas_fixed(f.create_group("stages"),
                           {"start": [rows["time"][0]], "end": [rows["time"][-1]],
                            "name": ["static_arm_in_front"],
                            "posture": ["seated-on-surface"]}, protocol=2)
    return rows, prompt_times


def test_a_file_in_the_public_layout_replays(tmp_path):
    path = tmp_path / "discrete_gestures_user_002_dataset_000.hdf5"
    rows, prompt_times = write_public_file(path)
    dev, emg, index = replay_all(f"replay:{path}?speed=0")
    assert np.array_equal(emg, rows["emg"]) and np.array_equal(index, np.arange(len(rows)))
    assert dev.info.device_id == "discrete_gestures_user_002_dataset_000"
    assert dev.info.simulated is False and dev.task == "discrete_gestures"
    t = np.empty(len(index))
    dev.clock.unix_times(index, t)
    assert np.array_equal(t, rows["time"])  # the timestamp gap is kept
    assert np.array_equal(dev.prompts["time"], prompt_times)
    assert dev.prompts["name"].tolist() == GESTURES and dev.prompts.skipped == ()
    assert list(dev.prompts.columns) == ["name", "time"] and len(dev.prompts) == 4
    assert dev.stages["name"].tolist() == ["static_arm_in_front"]
    assert dev.stages["posture"].tolist() == ["seated-on-surface"]
    assert dev.stages["end"][0] == rows["time"][-1]


def test_string_columns_that_are_not_plain_strings_are_skipped_not_unpickled(tmp_path):
    path = tmp_path / "odd.hdf5"
    with h5py.File(path, "w") as f:
        g = f.create_group("prompts")
        write_pandas_fixed(g, {"name": ["a", "b"], "time": [1.0, 2.0]})
        del g["block0_values"]
        evil = pickle.dumps(np.array([print, "b"], dtype=object).reshape(2, 1))
        ds = g.create_dataset("block0_values", shape=(1,), dtype=h5py.vlen_dtype(np.uint8))
        ds[0] = np.frombuffer(evil, np.uint8)
        table = read_pandas_fixed(g)
    assert table.skipped == ("name",) and table["time"].tolist() == [1.0, 2.0]


def test_bad_files_raise_device_errors(tmp_path):
    with pytest.raises(DeviceNotFound):
        ReplayDevice(f"replay:{tmp_path}/missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DeviceError, match="not a readable HDF5"):
        ReplayDevice(f"replay:{tmp_path}/text.h5")
    with h5py.File(tmp_path / "noemg.h5", "w") as f:
        f.create_dataset("data", data=np.zeros(3, [("time", "<f8")]))
    with pytest.raises(DeviceError, match="fields 'emg' and 'time'"):
        ReplayDevice(f"replay:{tmp_path}/noemg.h5")


def test_unpaced_replay_waits_for_room_in_a_flow_controlled_sink(tmp_path):
    path = tmp_path / "flow.h5"
    record_sim(path, 20_000)
    ring = RingBuffer(capacity=8192)
    reader = ring.reader("oldest")

    class Sink:
        def write(self, data, first_sample, t_recv_ns):
            ring.write(data, first_sample, t_recv_ns)

        def free(self):
            return ring.capacity - reader.lag()

    dev = ReplayDevice(f"replay:{path}?speed=0")
    got = []
    with dev:
        dev.start(Sink())
        deadline = time.monotonic() + 20
        while sum(len(g) for g in got) < 20_000 and time.monotonic() < deadline:
            _, index, _, res = reader.read_new(1000)
            assert res.lost == 0
            got.append(index)
            time.sleep(0.001)
    assert np.array_equal(np.concatenate(got), np.arange(20_000))
