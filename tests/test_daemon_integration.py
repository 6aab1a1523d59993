"""End to end: `emgd --device sim --raw` in a subprocess, observed through emgd.client."""

from __future__ import annotations

import numpy as np
import pytest

from emgd.client import Subscriber
from emgd.drivers.protocol import SampleFormat
from emgd.drivers.sim import COUNTER_CHANNEL, counter_codes, counter_modulus


def collect_raw(sub: Subscriber, want_samples: int, timeout: float = 60.0):
    blocks, statuses = [], []
    total = 0
    for event in sub.events(timeout=timeout):
        if event.kind == "status":
            statuses.append(event)
        elif event.kind == "raw":
            blocks.append(event)
            total += event["n"]
            if total >= want_samples and statuses:
                break
    return blocks, statuses


def test_sim_raw_counter_channel_is_continuous_and_sigterm_exits_0(run_daemon, endpoints):
    pub, ctl = endpoints
    with Subscriber(pub, topics=["raw", "status"]) as sub:
        daemon = run_daemon("--device", "sim?counter=1&paced=1", "--raw", "--pub", pub,
                            "--ctl", ctl, "--log-level", "info")
        blocks, statuses = collect_raw(sub, 20_000)
        assert sum(b["n"] for b in blocks) >= 20_000, "too few raw samples arrived"
        assert statuses, "no status message arrived"
        rc, _, err = daemon.terminate()
    assert rc == 0, err

    # The subscriber may have joined mid-stream: check continuity from the first block on.
    seqs = [b.seq for b in blocks]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "raw messages were dropped"
    data = np.concatenate([b.array() for b in blocks])
    index = np.concatenate([b.sample + np.arange(b["n"]) for b in blocks])
    assert np.array_equal(np.diff(index), np.ones(len(index) - 1)), "sample index jumps"
    codes = counter_codes(data[:, COUNTER_CHANNEL], SampleFormat.INT24)
    assert np.array_equal(codes, index % counter_modulus(SampleFormat.INT24))
    assert data.shape[1] == 16 and data.dtype == np.float32

    st = statuses[-1]
    assert st.simulated is True and st.device == "SIM-0000"
    assert st["link"] == "up" and st["lost_samples"] == 0 and st["crc_errors"] == 0
    assert all(b.simulated for b in blocks)
    assert all(b.t_pub_ns >= b.t_recv_ns for b in blocks)


def test_status_only_without_raw(run_daemon, endpoints):
    pub, ctl = endpoints
    with Subscriber(pub) as sub:
        daemon = run_daemon("--device", "sim", "--pub", pub, "--ctl", ctl)
        kinds = {e.kind for e in sub.events(timeout=15, count=3)}
        rc, _, err = daemon.terminate()
    assert kinds == {"status"}
    assert rc == 0, err


@pytest.mark.parametrize("args, code, fragment", [
    (["--device", "nonsense"], 2, "unknown scheme"),
    (["--device", "sim?colour=red"], 2, "unknown option 'colour'"),
    (["--pub", "not-an-endpoint"], 2, "ZeroMQ endpoint"),
    (["--log-level", "loud"], 2, "invalid choice"),
])
def test_bad_usage_exits_2_with_a_clear_message(run_daemon, args, code, fragment):
    rc, _, err = run_daemon(*args).wait()
    assert rc == code
    assert fragment in err


def test_bad_config_key_exits_2(run_daemon, tmp_path):
    cfg = tmp_path / "emgd.toml"
    cfg.write_text('device = "sim"\nbogus_key = 1\n')
    rc, _, err = run_daemon("--config", str(cfg)).wait()
    assert rc == 2 and "unknown setting 'bogus_key'" in err
    assert err.count("\n") == 1, "the error should be one line"


def test_endpoint_in_use_exits_1(run_daemon, endpoints):
    pub, ctl = endpoints
    with Subscriber(pub, topics=["status"]) as sub:
        first = run_daemon("--device", "sim", "--pub", pub, "--ctl", ctl)
        assert sub.recv(timeout=15) is not None
        rc, _, err = run_daemon("--device", "sim", "--pub", pub).wait()
        assert rc == 1 and "in use" in err
        assert first.terminate()[0] == 0
