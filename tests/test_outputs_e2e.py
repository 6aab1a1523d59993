"""`--outputs`: each decoder's per-frame network output on outputs/<device>, as documented."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from emgd.client import Subscriber

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def test_outputs_topic_carries_every_frame_of_each_model(run_daemon, endpoints, tmp_path):
    models = tmp_path / "models"
    built = subprocess.run([sys.executable, "-m", "emgd", "models", "build-random", "--size",
                            "small", "--seed", "5", "--out", str(models)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    pub, ctl = endpoints
    seen: dict[str, list] = {"gesture": [], "wrist": [], "handwriting": []}
    with Subscriber(pub, topics=["outputs"]) as sub:
        # unpaced, 30 s of EMG: handwriting emits from sample 19853 on, every 320 samples.
        # The subscriber may join late (ZeroMQ's slow joiner) and the stream runs much faster
        # than real time, so wait for a few messages of every model, whatever came first.
        proc = run_daemon("--device", "sim?paced=0&limit=60000", "--models", str(models),
                          "--outputs", "--pub", pub, "--ctl", ctl)
        for event in sub.events(timeout=120):
            seen[event["model"]].append(event)
            if all(len(v) >= 2 for v in seen.values()):
                break
        rc, _, err = proc.terminate()
    assert rc == 0, err
    expect = {"gesture": (9, 10), "wrist": (1, 40), "handwriting": (100, 320)}
    for model, events in seen.items():
        assert events, f"no outputs for {model}"
        channels, stride = expect[model]
        for ev in events:
            assert ev["channels"] == channels and ev["stride"] == stride
            assert ev.array().shape == (ev["n"], channels)
        # consecutive blocks continue each other: no frame missing between them
        for a, b in zip(events, events[1:]):
            assert b.sample == a.sample + stride * a["n"]
    hw = seen["handwriting"][0]
    assert hw.sample >= 19853 and (hw.sample - 19853) % 320 == 0  # emission ends
    probs = np.exp(hw.array()).sum(axis=1)
    np.testing.assert_allclose(probs, 1.0, rtol=1e-4)  # log-probabilities
    assert (seen["wrist"][0].sample - 253) % 40 == 0
    assert (seen["gesture"][0].sample - 20) % 10 == 0
