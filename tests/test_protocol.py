"""The wire protocol: round trips, chunking, resynchronisation, exact counters, and the
spec's own test vectors (parsed from docs/protocol.md)."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emgd.drivers.protocol import (
    MAX_FRAME,
    MAX_PAYLOAD,
    SYNC,
    FrameType,
    SampleFormat,
    StreamDecoder,
    decode_imu,
    encode_emg,
    encode_frame,
    encode_imu,
    encode_marker,
    encode_status,
    quantize,
    unpack_int24,
)

SPEC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
FMTS = (SampleFormat.INT16, SampleFormat.INT24)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
u64 = st.integers(0, 2**64 - 1)


def codes_strategy(fmt: SampleFormat, max_n: int | None = None):
    n = st.integers(1, max_n or fmt.max_samples)
    elements = st.one_of(
        st.sampled_from([fmt.code_min, fmt.code_max, -1, 0, 1]),
        st.integers(fmt.code_min, fmt.code_max),
    )
    return n.flatmap(lambda k: hnp.arrays(np.int32, (k, 16), elements=elements))


def decode_all(data: bytes, chunks: list[int] | None = None) -> tuple[list, StreamDecoder]:
    dec = StreamDecoder()
    frames = []
    if chunks is None:
        frames += dec.feed(data)
    else:
        pos = 0
        for size in chunks:
            frames += dec.feed(data[pos : pos + size])
            pos += size
        frames += dec.feed(data[pos:])
    frames += dec.finish()
    return frames, dec


def expected_uv(codes: np.ndarray, scale: float) -> np.ndarray:
    return codes.astype(np.float32) * np.float32(scale)


# ------------------------------------------------------------------ basics


def test_crc_is_zlib_crc32_with_the_documented_check_value():
    assert zlib.crc32(b"123456789") == 0xCBF43926
    frame = encode_marker(0, 0, "x")
    assert struct.unpack("<I", frame[-4:])[0] == zlib.crc32(frame[2:-4])


def test_frame_sizes_match_the_spec():
    codes = np.zeros((10, 16), np.int32)
    assert len(encode_emg(0, 0, codes, SampleFormat.INT24, 1.0)) == 512
    assert len(encode_emg(0, 0, np.zeros((15, 16), np.int32), SampleFormat.INT16, 1.0)) == 512
    assert SampleFormat.INT24.max_samples == 42 and SampleFormat.INT16.max_samples == 63
    big = encode_emg(0, 0, np.zeros((42, 16), np.int32), SampleFormat.INT24, 1.0)
    assert len(big) <= MAX_FRAME


def test_encoders_refuse_bad_input():
    with pytest.raises(ValueError):
        encode_emg(0, 0, np.zeros((43, 16), np.int32), SampleFormat.INT24, 1.0)
    with pytest.raises(ValueError):
        encode_emg(0, 0, np.full((1, 16), 2**15), SampleFormat.INT16, 1.0)
    with pytest.raises(ValueError):
        encode_emg(0, 0, np.zeros((1, 16)), SampleFormat.INT16, 1.0)  # floats
    with pytest.raises(ValueError):
        encode_emg(0, 0, np.zeros((1, 16), np.int32), SampleFormat.INT16, float("nan"))
    with pytest.raises(ValueError):
        encode_frame(FrameType.MARKER, 0, 0, b"x" * (MAX_PAYLOAD + 1))


def test_quantize_rounds_and_clips():
    uv = np.array([[0.0, 0.3, -0.3, 1e9, -1e9, 0.49, 0.51, -0.51]])
    got = quantize(uv, "int16", 1.0)
    assert got.tolist() == [[0, 0, 0, 32767, -32768, 0, 1, -1]]
    assert quantize(np.array([1e12]), SampleFormat.INT24, 1.0)[0] == 2**23 - 1


def test_unpack_int24_sign_extends():
    values = np.array([0, 1, -1, 2**23 - 1, -(2**23), 255, -256, 65536], np.int32)
    raw = values.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
    assert unpack_int24(np.ascontiguousarray(raw)).tolist() == values.tolist()


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt", FMTS)
@SETTINGS
@given(data=st.data(), counter=u64, ts=u64)
def test_emg_round_trip(fmt, data, counter, ts):
    codes = data.draw(codes_strategy(fmt))
    scale = data.draw(st.sampled_from([2.0**-4, 0.25, 0.1, 1.5, 1e-3]))
    frames, dec = decode_all(encode_emg(counter, ts, codes, fmt, scale))
    assert len(frames) == 1
    f = frames[0]
    assert (f.type, f.flags, f.counter, f.timestamp_us, f.fmt) == (1, int(fmt), counter, ts, fmt)
    assert f.scale == np.float32(scale)
    assert f.emg.dtype == np.float32 and f.emg.shape == codes.shape
    assert np.array_equal(f.emg, expected_uv(codes, f.scale))
    assert dec.stats.samples == codes.shape[0] and dec.stats.bytes_discarded == 0


@pytest.mark.parametrize("fmt", FMTS)
@SETTINGS
@given(data=st.data())
def test_chunk_splits_give_the_same_frames(fmt, data):
    n_frames = data.draw(st.integers(1, 8))
    frames_in, counter = [], data.draw(st.integers(0, 2**40))
    for _ in range(n_frames):
        codes = data.draw(codes_strategy(fmt, max_n=12))
        frames_in.append((counter, codes))
        counter += codes.shape[0]
    stream = b"".join(encode_emg(c, c * 500, k, fmt, 0.5) for c, k in frames_in)
    chunks = data.draw(st.lists(st.integers(0, 700), max_size=40))
    whole, _ = decode_all(stream)
    split, dec = decode_all(stream, chunks)
    assert len(split) == len(whole) == n_frames
    for a, b, (c, k) in zip(split, whole, frames_in):
        assert a.counter == b.counter == c
        assert np.array_equal(a.emg, b.emg) and np.array_equal(a.emg, expected_uv(k, 0.5))
    assert dec.stats.gaps == 0 and dec.stats.bytes_discarded == 0


# ------------------------------------------------------------------ damage with exact counters


def sync_positions(data: bytes) -> list[int]:
    out, i = [], data.find(SYNC)
    while i >= 0:
        out.append(i)
        i = data.find(SYNC, i + 1)
    return out


@st.composite
def damaged_stream(draw):
    """Items of a stream (kind, bytes, emg samples) with consecutive EMG counters."""
    fmt = draw(st.sampled_from(FMTS))
    items, counter = [], draw(st.integers(0, 2**32))
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["good", "good", "good", "garbage", "trunc", "flip", "status"]))
        if kind == "garbage":
            items.append(("garbage", draw(st.binary(min_size=1, max_size=300)), 0))
            continue
        if kind == "status":
            frame = encode_status(counter, 0, battery=50, serial="S", firmware="f")
            items.append(("good", frame, 0))
            continue
        codes = draw(codes_strategy(fmt, max_n=6))
        n = codes.shape[0]
        frame = encode_emg(counter, counter * 500, codes, fmt, 1.0)
        counter += n
        if kind == "trunc":
            frame = frame[: draw(st.integers(1, len(frame) - 1))]
        elif kind == "flip":
            pos = draw(st.integers(2, len(frame) - 1))
            bad = bytearray(frame)
            bad[pos] ^= draw(st.integers(1, 255))
            frame = bytes(bad)
        items.append((kind, frame, n))
    return items


@SETTINGS
@given(items=damaged_stream(), chunks=st.lists(st.integers(1, 900), max_size=30))
def test_garbage_truncation_and_flips_give_exact_counters(items, chunks):
    stream = b"".join(b for _, b, _ in items)
    good_spans, pos = [], 0
    for kind, b, _ in items:
        if kind == "good":
            good_spans.append((pos, pos + len(b)))
        pos += len(b)
    frames, dec = decode_all(stream, chunks)
    s = dec.stats
    # every good frame survives, in order
    good = [b for k, b, _ in items if k == "good"]
    assert len(frames) == len(good) and s.frames == len(good)
    assert [f.counter for f in frames] == [struct.unpack_from("<Q", b, 8)[0] for b in good]
    # every sync pattern outside a good frame is one rejected candidate
    inside = sum(1 for p in sync_positions(stream) for a, e in good_spans if a <= p < e)
    assert s.crc_errors + s.malformed + s.truncated == len(sync_positions(stream)) - inside
    # every byte is accounted for
    assert dec.buffered == 0
    assert s.bytes_in == len(stream)
    assert s.bytes_discarded == len(stream) - sum(e - a for a, e in good_spans)
    # gaps: runs of lost EMG frames between good EMG frames
    gaps = lost = pending = 0
    anchored = False
    for kind, _, n in items:
        if n == 0:
            continue
        if kind == "good":
            if anchored and pending:
                gaps, lost = gaps + 1, lost + pending
            anchored, pending = True, 0
        else:
            pending += n
    assert (s.gaps, s.lost_samples, s.counter_resets) == (gaps, lost, 0)


@SETTINGS
@given(data=st.binary(max_size=6000), chunks=st.lists(st.integers(0, 3000), max_size=20))
def test_random_bytes_never_raise_and_the_buffer_stays_bounded(data, chunks):
    dec = StreamDecoder()
    frames, pos = [], 0
    for size in chunks + [len(data)]:
        frames += dec.feed(data[pos : pos + size])
        pos += size
        assert dec.buffered < MAX_FRAME
    frames += dec.finish()
    good_bytes = sum(len(f.payload) + 28 for f in frames)
    assert dec.buffered == 0 and dec.stats.bytes_discarded == len(data) - good_bytes


def test_one_corrupted_frame_is_one_crc_error_one_gap():
    codes = np.full((10, 16), 7, np.int32)  # no A5 5A anywhere in these frames
    frames = [encode_emg(10 * i, 0, codes, SampleFormat.INT24, 1.0) for i in range(5)]
    bad = bytearray(frames[2])
    bad[100] ^= 0x01
    assert b"".join(frames).count(SYNC) == 5
    got, dec = decode_all(b"".join([frames[0], frames[1], bytes(bad), frames[3], frames[4]]))
    s = dec.stats
    assert [f.counter for f in got] == [0, 10, 30, 40]
    assert (s.crc_errors, s.malformed, s.gaps, s.lost_samples) == (1, 0, 1, 10)
    assert s.bytes_discarded == 512 and s.samples == 40 and s.emg_frames == 4


def test_counter_reset_is_counted_not_lost():
    codes = np.zeros((10, 16), np.int32)
    stream = b"".join(encode_emg(c, 0, codes, SampleFormat.INT16, 1.0) for c in (100, 110, 0, 10, 40))
    got, dec = decode_all(stream)
    assert len(got) == 5
    assert (dec.stats.counter_resets, dec.stats.gaps, dec.stats.lost_samples) == (1, 1, 20)


@pytest.mark.parametrize(
    "header_change",
    [
        {"version": 2},
        {"type": 9},
        {"reserved": 1},
        {"flags": 2},
        {"length": MAX_PAYLOAD + 1},
        {"length": 4 + 16 * 3 + 1},
    ],
)
def test_bad_headers_are_malformed_and_the_next_frame_survives(header_change):
    fields = {"version": 1, "type": 1, "flags": 1, "reserved": 0, "length": 4 + 48}
    fields.update(header_change)
    body = struct.pack("<BBBBHQQ", *fields.values(), 0, 0) + b"\x00" * 52
    bad = SYNC + body + struct.pack("<I", zlib.crc32(body))
    good = encode_marker(5, 6, "after")
    got, dec = decode_all(bad + good)
    assert [f.text for f in got] == ["after"]
    assert dec.stats.malformed == 1 and dec.stats.crc_errors == 0


def test_crc_good_frames_with_invalid_contents_are_dropped_whole():
    bad_scale = encode_frame(FrameType.EMG, 0, 0, struct.pack("<f", -1.0) + bytes(32), flags=0)
    bad_status = encode_frame(FrameType.STATUS, 0, 0, bytes([50, 0, 0, 0, 9, 0, 0, 0]))
    good = encode_marker(1, 2, "ok")
    got, dec = decode_all(bad_scale + bad_status + good)
    assert [f.text for f in got] == ["ok"]
    assert dec.stats.malformed == 2 and dec.stats.bytes_discarded == len(bad_scale) + len(bad_status)


def test_header_with_impossible_length_does_not_stall_the_stream():
    bogus = SYNC + struct.pack("<BBBBH", 1, 4, 0, 0, 0xFFFF)  # a 64 KiB marker: rejected now
    good = encode_marker(0, 0, "next")
    dec = StreamDecoder()
    assert [f.text for f in dec.feed(bogus + good)] == ["next"]


def test_status_marker_imu_helpers():
    frame = encode_status(7, 8, battery=None, serial="ÄB-1", firmware="", charging=True,
                          streaming=False, temperature_c=-3.25)
    (f,), _ = decode_all(frame)
    st_ = f.status
    assert (st_.battery, st_.charging, st_.streaming, st_.temperature_c) == (None, True, False, -3.25)
    assert (st_.serial, st_.firmware) == ("ÄB-1", "")
    (m,), _ = decode_all(encode_marker(1, 2, "naïve ✓"))
    assert m.text == "naïve ✓" and m.counter == 1
    imu = np.array([[1, -2, 3, -4, 5, -32768]])
    (i,), _ = decode_all(encode_imu(0, 0, imu, 0.5, 0.25))
    accel, gyro = decode_imu(i)
    assert accel.tolist() == [[0.5, -1.0, 1.5]] and gyro.tolist() == [[-1.0, 1.25, -8192.0]]


# ------------------------------------------------------------------ the spec's vectors


def spec_vectors() -> dict[str, tuple[bytes, dict]]:
    text = SPEC.read_text(encoding="utf-8")
    hexes = dict(re.findall(r"```hex ([\w-]+)\n(.*?)```", text, re.S))
    jsons = dict(re.findall(r"```json ([\w-]+)\n(.*?)```", text, re.S))
    assert hexes.keys() == jsons.keys()
    return {k: (bytes.fromhex(hexes[k]), json.loads(jsons[k])) for k in hexes}


def test_spec_has_the_required_vectors():
    assert {"emg-int16-1", "emg-int24-2", "status", "marker"} <= spec_vectors().keys()


@pytest.mark.parametrize("name", sorted(spec_vectors()))
def test_spec_vector_decodes_as_documented(name):
    raw, want = spec_vectors()[name]
    frames, dec = decode_all(raw)
    assert len(frames) == 1 and dec.stats.bytes_discarded == 0
    f = frames[0]
    assert (f.type, f.flags, f.counter, f.timestamp_us) == (
        want["type"], want["flags"], want["counter"], want["timestamp_us"])
    if f.type == FrameType.EMG:
        codes = np.array(want["codes"])
        fmt = SampleFormat.parse(want["format"])
        assert f.fmt is fmt and f.scale == want["scale"]
        assert np.array_equal(f.emg, expected_uv(codes, want["scale"]))
        assert encode_emg(f.counter, f.timestamp_us, codes, fmt, want["scale"]) == raw
    elif f.type == FrameType.STATUS:
        for key in ("battery", "charging", "streaming", "temperature_c", "serial", "firmware"):
            assert getattr(f.status, key) == want[key]
    elif f.type == FrameType.MARKER:
        assert f.text == want["text"]
        assert encode_marker(f.counter, f.timestamp_us, want["text"]) == raw
    elif f.type == FrameType.IMU:
        codes = np.array(want["codes"])
        accel, gyro = decode_imu(f)
        assert np.array_equal(accel, codes[:, :3].astype(np.float32) * np.float32(want["accel_scale"]))
        assert np.array_equal(gyro, codes[:, 3:].astype(np.float32) * np.float32(want["gyro_scale"]))
