"""The serial backend against real pseudo-terminals: pyserial opens the pty's slave exactly
as it opens /dev/ttyACM0, and the test writes protocol bytes into the master.

Correctness only (counts, values, error types and messages), never durations."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pytest
import serial
from conftest import wait_for
from emgd.drivers import serialport
from emgd.drivers.protocol import SampleFormat, encode_emg
from emgd.drivers.registry import open_device
from emgd.drivers.serialport import KNOWN_USB_IDS, SerialDevice, find_band_ports
from emgd.drivers.sim import COUNTER_CHANNEL, SimConfig, SimStream, counter_codes, counter_modulus
from emgd.drivers.urls import SCHEMES, parse_url

from emgd.errors import (
    ConfigError,
    DeviceBusy,
    DeviceError,
    DeviceNotFound,
    DevicePermission,
    DeviceTimeout,
)

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0


class Sink:
    """Stands in for the ring buffer (same ``write`` signature); keeps copies."""

    def __init__(self) -> None:
        self.blocks: list[tuple[np.ndarray, int, int]] = []
        self.lock = threading.Lock()

    def write(self, data: np.ndarray, first_sample: int, t_recv_ns: int) -> None:
        with self.lock:
            self.blocks.append((data.copy(), first_sample, t_recv_ns))

    @property
    def samples(self) -> int:
        with self.lock:
            return sum(b[0].shape[0] for b in self.blocks)

    def indices(self) -> np.ndarray:
        with self.lock:
            return np.concatenate([f + np.arange(d.shape[0]) for d, f, _ in self.blocks])

    def emg(self) -> np.ndarray:
        with self.lock:
            return np.concatenate([d for d, _, _ in self.blocks])


class Pty:
    """A pty whose master the test writes (blocking) and whose slave path emgd opens."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        os.close(slave)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def reader_present(self) -> bool:
        import select

        p = select.poll()
        p.register(self.master, select.POLLOUT)
        return not any(ev & select.POLLHUP for _, ev in p.poll(0))

    def close(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


@pytest.fixture
def pty():
    made: list[Pty] = []

    def make() -> Pty:
        made.append(Pty())
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def devices():
    opened: list[SerialDevice] = []

    def make(url: str) -> SerialDevice:
        dev = open_device(url)
        opened.append(dev)
        return dev

    yield make
    for dev in opened:
        dev.close()


def stream_writer(p: Pty, stream: SimStream, samples: int, chunk: int = 200):
    written = [0]

    def run() -> None:
        for _ in range(samples // chunk):
            data = stream.generate_bytes(chunk)
            p.write(data)
            written[0] += len(data)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, written


# --------------------------------------------------------------------------- streaming


def test_registry_opens_the_serial_backend_with_its_options():
    dev = open_device("serial:/dev/ttyACM9?baud=921600&reconnect=0&timeout=1.5")
    assert isinstance(dev, SerialDevice)
    assert (dev.port, dev.baud, dev.reconnect, dev.first_frame_timeout) == \
        ("/dev/ttyACM9", 921600, False, 1.5)
    assert dev.info.transport == "serial" and dev.info.simulated is False
    dev.close()
    dev.close()  # idempotent, never opened


def test_unknown_option_repeats_the_grammar():
    with pytest.raises(ConfigError) as err:
        open_device("serial:/dev/ttyACM0?speed=9600")
    msg = str(err.value)
    assert "unknown option 'speed'" in msg
    assert SCHEMES["serial"].usage() in msg and "reconnect=BOOL" in msg


def test_one_frame_is_handed_on_without_waiting_for_more_bytes(pty, devices):
    p = pty()
    dev = devices(f"serial:{p.path}?timeout=0")
    sink = Sink()
    dev.start(sink)
    assert wait_for(p.reader_present, WAIT_S)
    codes = np.arange(160, dtype=np.int32).reshape(10, 16)
    t_write = time.monotonic_ns()
    p.write(encode_emg(500, 0, codes, SampleFormat.INT16, 0.25))
    # a fixed-size blocking read would sit on these 352 bytes forever (nothing follows)
    assert wait_for(lambda: sink.samples == 10, WAIT_S)
    data, first, t_recv = sink.blocks[0]
    assert first == 500 and np.array_equal(data, codes * np.float32(0.25))
    assert t_recv >= t_write
    assert dev.stats().link == "up" and dev.stats().frames == 1


@pytest.mark.parametrize("faults", [{}, {"drop": 0.02, "corrupt": 0.02}])
def test_a_simulated_stream_arrives_exactly(pty, devices, faults):
    p = pty()
    stream = SimStream(SimConfig(seed=11, counter=True, **faults))
    dev = devices(f"serial:{p.path}?timeout=0")
    sink = Sink()
    dev.start(sink)
    assert wait_for(p.reader_present, WAIT_S)
    th, written = stream_writer(p, stream, 20_000)
    th.join(WAIT_S)
    assert wait_for(lambda: dev.decoder_stats().bytes_in == written[0], WAIT_S)
    st, inj = dev.decoder_stats(), stream.injected
    assert st.lost_samples == inj.lost_samples and st.gaps == inj.gaps
    assert st.crc_errors + st.malformed == inj.rejects
    assert st.samples == 20_000 - inj.lost_samples - inj.pending_lost
    idx, emg = sink.indices(), sink.emg()
    assert np.array_equal(counter_codes(emg[:, COUNTER_CHANNEL], SampleFormat.INT24),
                          idx % counter_modulus(SampleFormat.INT24))
    if not faults:
        assert np.array_equal(idx, np.arange(20_000)) and st.crc_errors == 0
    else:
        assert inj.dropped and inj.corrupted and st.gaps


# --------------------------------------------------------------------------- unplug


def test_unplug_then_replug_reconnects_and_counts_the_gap(pty, devices, tmp_path):
    link = tmp_path / "band"
    stream = SimStream(SimConfig(seed=2, counter=True))
    first = pty()
    link.symlink_to(first.path)
    dev = devices(f"serial:{link}?timeout=0")
    sink = Sink()
    dev.start(sink)
    assert wait_for(first.reader_present, WAIT_S)
    first.write(stream.generate_bytes(4000))
    assert wait_for(lambda: sink.samples == 4000, WAIT_S)

    first.close()  # the port disappears: the reader's next read fails
    link.unlink()
    assert wait_for(lambda: dev.link == "lost", WAIT_S)
    stream.generate_bytes(3000)  # the band ran on while unplugged: 3000 samples never sent

    second = pty()  # it comes back, as another tty behind the same link
    link.symlink_to(second.path)
    assert wait_for(lambda: dev.link == "up", WAIT_S)
    # "up" is set after the open returned, so pyserial's flush-on-open is behind us
    second.write(stream.generate_bytes(2000))
    assert wait_for(lambda: sink.samples == 6000, WAIT_S)

    st = dev.stats()
    assert st.reconnects == 1 and st.link == "up"
    assert st.gaps == 1 and st.lost_samples == 3000
    idx = sink.indices()
    assert np.array_equal(idx, np.concatenate([np.arange(4000), np.arange(7000, 9000)]))
    assert "SerialException" in (st.last_error or "") or "DeviceNotFound" in (st.last_error or "")


def test_without_reconnect_a_lost_link_ends_the_thread(pty, devices):
    p = pty()
    dev = devices(f"serial:{p.path}?timeout=0&reconnect=0")
    dev.start(Sink())
    assert wait_for(p.reader_present, WAIT_S)
    p.close()
    assert dev.wait(WAIT_S)
    assert dev.stats().link == "lost" and dev.stats().reconnects == 0


def test_stop_interrupts_the_backoff_and_close_is_idempotent(pty, devices, tmp_path):
    p = pty()
    dev = devices(f"serial:{p.path}?timeout=0")
    dev.start(Sink())
    assert wait_for(p.reader_present, WAIT_S)
    p.close()
    assert wait_for(lambda: dev.link == "lost", WAIT_S)
    dev.close()
    assert dev.wait(0)
    dev.close()
    assert dev.stats().link == "closed"


# --------------------------------------------------------------------------- open errors


def test_missing_port_says_what_to_do(devices, tmp_path):
    dev = devices(f"serial:{tmp_path}/ttyACM7")
    with pytest.raises(DeviceNotFound) as err:
        dev.start(Sink())
    msg = str(err.value)
    assert f"no such port {tmp_path}/ttyACM7" in msg and "plugged in" in msg
    assert "emgd sim --pty" in msg
    assert isinstance(err.value, FileNotFoundError) and dev.stats().link == "closed"


def test_a_dangling_link_is_a_missing_port(devices, tmp_path):
    (tmp_path / "band").symlink_to(tmp_path / "gone")
    with pytest.raises(DeviceNotFound, match="a link to a port that is gone"):
        devices(f"serial:{tmp_path}/band").start(Sink())


def test_busy_port_names_the_process_holding_it(pty, devices):
    p = pty()
    first = devices(f"serial:{p.path}?timeout=0")
    first.start(Sink())
    second = devices(f"serial:{p.path}?timeout=0")
    with pytest.raises(DeviceBusy) as err:
        second.start(Sink())
    msg = str(err.value)
    assert f"{p.path} is in use by pid {os.getpid()}" in msg and "this process" in msg
    assert first.stats().link == "up"


def test_busy_port_without_a_visible_holder(monkeypatch):
    monkeypatch.setattr(serialport, "port_holders", lambda path: [])
    err = serialport.open_error("/dev/ttyACM0", serial.SerialException(
        errno.EAGAIN, "Could not exclusively lock port /dev/ttyACM0: [Errno 11]"))
    assert isinstance(err, DeviceBusy) and "in use by another process" in str(err)


def test_a_file_that_is_not_a_tty(devices, tmp_path):
    (tmp_path / "notatty").write_bytes(b"")
    with pytest.raises(DeviceError, match="not a serial port"):
        devices(f"serial:{tmp_path}/notatty").start(Sink())


def test_a_silent_port_times_out_with_advice(pty, devices):
    p = pty()
    p.write(b"\x00garbage, no frames\x00")
    dev = devices(f"serial:{p.path}?timeout=0.3")
    with pytest.raises(DeviceTimeout) as err:
        dev.start(Sink())
    assert f"no band answered on {p.path} within 0.3 s" in str(err.value)
    assert not p.reader_present(), "the port must be closed again after the timeout"


def _open_as(uid: int, gid: int, path: str) -> tuple[str, str]:
    """Open ``path`` through open_port in a forked child running as uid/gid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, try, report, exit without cleanup
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                serialport.open_port(path, 2_000_000).close()
                out = "opened\n"
            except DeviceError as exc:
                out = f"{type(exc).__name__}\n{exc}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    kind, _, msg = text.partition("\n")
    return kind, msg


def test_permission_denied_names_the_group_to_join(pty):
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the pty to dialout and to become 'nobody'")
    try:
        nobody, dialout = pwd.getpwnam("nobody"), grp.getgrnam("dialout")
    except KeyError:
        pytest.skip("no 'nobody' user or 'dialout' group on this system")
    p = pty()
    os.chown(p.path, 0, dialout.gr_gid)
    os.chmod(p.path, 0o660)
    kind, msg = _open_as(nobody.pw_uid, nobody.pw_gid, p.path)
    assert kind == "DevicePermission", msg
    assert "join the 'dialout' group" in msg and "usermod -aG dialout" in msg
    os.chmod(p.path, 0o600)  # owner-only: the advice is the udev rule
    kind, msg = _open_as(nobody.pw_uid, nobody.pw_gid, p.path)
    assert kind == "DevicePermission" and "90-emgd.rules" in msg


def test_permission_error_type_from_errno():
    err = serialport.open_error("/dev/null", serial.SerialException(errno.EACCES, "denied"))
    assert isinstance(err, DevicePermission) and isinstance(err, PermissionError)


# --------------------------------------------------------------------------- finding ports


class FakePortInfo:
    """The attributes pyserial's ListPortInfo has (device, vid, pid)."""

    def __init__(self, device: str, vid: int | None, pid: int | None) -> None:
        self.device, self.vid, self.pid = device, vid, pid


def test_find_band_ports_matches_known_usb_ids():
    ports = [FakePortInfo("/dev/ttyUSB0", 0x0403, 0x6001), FakePortInfo("/dev/ttyS0", None, None),
             FakePortInfo("/dev/ttyACM1", 0x1209, 0x0001)]
    found = find_band_ports(ports=ports)
    assert [(f.device, f.vid, f.pid) for f in found] == [("/dev/ttyACM1", 0x1209, 0x0001)]
    assert find_band_ports() == []  # this machine has no USB band


def test_known_usb_ids_match_the_udev_rule():
    rules = (ROOT / "systemd" / "90-emgd.rules").read_text()
    active = [line for line in rules.splitlines() if not line.lstrip().startswith("#")]
    ids = {(int(v, 16), int(p, 16)) for v, p in re.findall(
        r'ATTRS\{idVendor\}=="([0-9a-f]{4})", ATTRS\{idProduct\}=="([0-9a-f]{4})"',
        "\n".join(active))}
    assert ids and ids == set(KNOWN_USB_IDS)
    assert serialport.UDEV_LINK == "/dev/" + re.search(r'SYMLINK\+="([^"]+)"', rules).group(1)


def test_parse_defaults():
    u = parse_url("serial:/dev/ttyACM0")
    assert u.options == {"baud": 2000000, "reconnect": True, "timeout": 5.0}
