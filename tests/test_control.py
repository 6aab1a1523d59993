"""The control socket end to end against a running daemon, malformed requests included."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest
import zmq

from emgd.client import Subscriber
from emgd.control import RequestError, parse_request, request


def raw_request(endpoint: str, frames: list[bytes], timeout: float = 5.0) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(int(timeout * 1000)), "no reply"
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(linger=0)


@pytest.fixture
def daemon(run_daemon, endpoints):
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        proc = run_daemon("--device", "sim", "--pub", pub, "--ctl", ctl, "--log-level", "info")
        assert sub.recv(timeout=20) is not None, "daemon did not start"
    yield proc, pub, ctl
    rc, _, err = proc.terminate()
    assert rc == 0, err


def test_status_marker_reset(daemon):
    proc, pub, ctl = daemon
    reply = request(ctl, "status")
    assert reply["ok"] is True
    result = reply["result"]
    assert result["device"]["device_id"] == "SIM-0000" and result["device"]["simulated"]
    assert result["status"]["link"] == "up"

    with Subscriber(pub, topics=["marker"]) as sub:
        # the SUB socket needs a moment to join; markers are retried until one arrives
        for _ in range(50):
            reply = request(ctl, "marker", {"text": "block 2"})
            assert reply["ok"], reply
            event = sub.recv(timeout=0.2)
            if event is not None:
                break
        assert event is not None and event["text"] == "block 2" and event["source"] == "ctl"
        assert event.sample == reply["result"]["sample"]

    first = request(ctl, "reset")["result"]["resets"]
    assert request(ctl, "reset")["result"]["resets"] == first + 1


@pytest.mark.parametrize("frames, fragment", [
    ([b"\xc1"], "not msgpack"),
    ([msgpack.packb([1, 2])], "msgpack map"),
    ([msgpack.packb({"args": {}})], "'cmd'"),
    ([msgpack.packb({"cmd": "launch"})], "unknown command 'launch'"),
    ([msgpack.packb({"cmd": "marker", "args": {"text": 5}})], "must be str"),
    ([msgpack.packb({"cmd": "marker", "args": {}})], "missing argument 'text'"),
    ([msgpack.packb({"cmd": "status", "args": {"x": 1}})], "no arguments"),
    ([msgpack.packb({"cmd": "status", "extra": 1})], "unknown request keys"),
    ([b"a", b"b"], "one frame"),
])
def test_malformed_requests_get_error_replies(daemon, frames, fragment):
    _, _, ctl = daemon
    reply = raw_request(ctl, frames)
    assert reply["ok"] is False and fragment in reply["error"]
    assert request(ctl, "status")["ok"] is True  # still serving


def test_emgd_ctl_command_line(daemon):
    _, _, ctl = daemon
    out = subprocess.run([sys.executable, "-m", "emgd", "ctl", "--ctl", ctl, "status"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "SIM-0000" in out.stdout and "link      up" in out.stdout
    out = subprocess.run([sys.executable, "-m", "emgd", "ctl", "--ctl", ctl, "frobnicate"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "unknown command" in out.stderr


def test_ctl_without_daemon_times_out_clearly(endpoints):
    _, ctl = endpoints
    out = subprocess.run([sys.executable, "-m", "emgd", "ctl", "--ctl", ctl, "--timeout",
                          "0.5", "status"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "no reply" in out.stderr


def test_parse_request_unit():
    assert parse_request([msgpack.packb({"cmd": "status"})]) == ("status", {})
    with pytest.raises(RequestError):
        parse_request([msgpack.packb({"cmd": "x", "args": []})])


def test_record_start_stop_over_control(daemon, tmp_path):
    import h5py

    _, _, ctl = daemon
    path = tmp_path / "ctl.h5"
    reply = request(ctl, "record", {"action": "start", "path": str(path)})
    assert reply["ok"], reply
    again = request(ctl, "record", {"action": "start", "path": str(tmp_path / "b.h5")})
    assert not again["ok"] and "already recording" in again["error"]
    assert request(ctl, "marker", {"text": "in the file"})["ok"]
    out = subprocess.run([sys.executable, "-m", "emgd", "ctl", "--ctl", ctl, "record", "stop"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert not request(ctl, "record", {"action": "stop"})["ok"]
    with h5py.File(path, "r") as f:
        rows = f["data"][()]
        assert len(rows) > 0 and bool(f.attrs["closed_cleanly"])
        assert [m.decode() if isinstance(m, bytes) else m
                for m in f["markers"]["text"][()]] == ["in the file"]
    bad = request(ctl, "record", {"action": "pause"})
    assert not bad["ok"] and "start' or 'stop" in bad["error"]


def test_reload_swaps_models_and_keeps_old_ones_on_failure(run_daemon, endpoints, tmp_path):
    pytest.importorskip("torch")
    models = tmp_path / "models"
    out = subprocess.run([sys.executable, "-m", "emgd", "models", "build-random", "--size",
                          "small", "--seed", "1", "--out", str(models)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        proc = run_daemon("--device", "sim", "--models", str(models), "--pub", pub,
                          "--ctl", ctl, "--log-level", "info")
        first = sub.recv(timeout=120)
        assert first is not None, "daemon did not start"
        loaded = request(ctl, "status")["result"]["status"]["models"]["loaded"]
        assert set(loaded) == {"discrete_gestures", "handwriting", "wrist"}

        reply = request(ctl, "reload", timeout=60)
        assert reply["ok"], reply
        assert set(reply["result"]["loaded"]) == set(loaded)

        onnx = sorted(models.glob("*.onnx"))[0]
        onnx.write_bytes(b"not an onnx file")
        reply = request(ctl, "reload", timeout=60)
        assert not reply["ok"] and onnx.name in reply["error"]
        before = request(ctl, "status")["result"]["status"]["samples"]
        for event in sub.events(timeout=10):  # still decoding with the old models
            if event["samples"] > before:
                assert set(event["models"]["loaded"]) == set(loaded)
                break
        else:
            pytest.fail("no progress after a failed reload")
    rc, _, err = proc.terminate()
    assert rc == 0, err
