"""MPF cost, measured side by side in one run; prints JSON.

    python benchmarks/bench_mpf.py [--seconds 60] [--compile]

- ``numba_incremental``: `emgd.mpf.MpfExtractor` fed 40 samples per push, both settings on;
  one push = one 40-sample hop producing one handwriting and one wrist frame.
- ``numba_stft_only``: a 10-sample push that completes an STFT frame but no MPF frame.
- ``numpy_recompute``: the naive streaming baseline: every 40 samples, recompute both windows
  (the last 214 and 254 samples of a raw ring) with the NumPy reference (float64 ``eigh``).
- ``offline_reference``: `emgd.mpf_reference.mpf_offline` over the whole signal, per second of
  EMG (both settings).
- ``--compile``: first-start compile time of the kernels with an empty Numba cache and with
  a warm one, each in a fresh subprocess (``NUMBA_CACHE_DIR`` pointed at a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from emgd.mpf import MpfExtractor, warmup
from emgd.mpf_reference import HANDWRITING, WRIST, mpf_offline

try:  # run as a script, the script's folder is on sys.path already
    from _common import command_line, cpu_model, print_json, stats_us
except ModuleNotFoundError:  # imported from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import command_line, cpu_model, print_json, stats_us

HOP = 40
HOP_US = 1e6 * HOP / 2000.0  # 20 000 µs of EMG per hop


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    """White 2.46 µVrms floor plus band-limited bursts on six channels (float32, µV)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 2000)
    x = 2.46 * rng.standard_normal((n, 16))
    t = np.arange(n)
    for ch in rng.choice(16, size=6, replace=False):
        noise = rng.standard_normal(n)
        band = np.convolve(noise, np.ones(4) / 4, "same") - np.convolve(noise, np.ones(20) / 20,
                                                                           "same")
        env = sum(rng.uniform(10, 100) * np.exp(-0.5 * ((t - c) / 300.0) ** 2)
                  for c in rng.uniform(0, n, size=max(1, n // 4000)))
        x[:, ch] += env * band / band.std()
    return x.astype(np.float32)


def bench_incremental(x: np.ndarray) -> tuple[dict, dict]:
    ex = MpfExtractor()
    ex.push(x[:400])  # past the left context: every following hop emits both settings
    hops, stft = [], []
    for start in range(400, len(x) - HOP + 1, HOP):
        t0 = time.perf_counter_ns()
        n_hw, n_wr = ex.push(x[start:start + HOP])
        hops.append(time.perf_counter_ns() - t0)
        assert n_hw == n_wr == 1
    ex = MpfExtractor()
    ex.push(x[:273])  # an STFT frame completes at stream samples 63, 73, ...; MPF ones at 253+40k
    for start in range(273, 273 + 40 * 200, 40):
        t0 = time.perf_counter_ns()
        n_hw, n_wr = ex.push(x[start:start + 10])  # completes STFT frame, no MPF frame
        stft.append(time.perf_counter_ns() - t0)
        assert n_hw == n_wr == 0
        ex.push(x[start + 10:start + 40])
    return stats_us(hops), stats_us(stft)


def bench_recompute(x: np.ndarray, n_hops: int) -> dict:
    span_hw, span_wr = HANDWRITING.left_context + 1, WRIST.left_context + 1
    ring = np.zeros((span_wr, 16), np.float32)
    times = []
    for end in range(span_wr, span_wr + HOP * n_hops, HOP):
        t0 = time.perf_counter_ns()
        ring[:-HOP] = ring[HOP:]  # a real ring would avoid this copy; it is small here
        ring[-HOP:] = x[end - HOP:end]
        hw = mpf_offline(ring[-span_hw:], HANDWRITING)
        wr = mpf_offline(ring, WRIST)
        times.append(time.perf_counter_ns() - t0)
        assert len(hw) == len(wr) == 1
    return stats_us(times[1:])


def bench_offline(x: np.ndarray) -> dict:
    seconds = len(x) / 2000.0
    t0 = time.perf_counter()
    mpf_offline(x, HANDWRITING)
    mpf_offline(x, WRIST)
    elapsed = time.perf_counter() - t0
    return {"cpu_s_per_s_of_emg": round(elapsed / seconds, 4), "emg_seconds": seconds}


def compile_times() -> dict:
    code = "from emgd.mpf import warmup; print(warmup())"
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("empty_cache_s", "warm_cache_s"):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                 capture_output=True, text=True)
            out[label] = round(float(res.stdout.strip()), 3)
            out[label.replace("_s", "_process_s")] = round(time.perf_counter() - t0, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="EMG seconds per measure")
    parser.add_argument("--compile", action="store_true", help="also measure compile times")
    args = parser.parse_args()
    result: dict = {"command": command_line(),
                    "machine": {"cpu": cpu_model(),
                                "cores": os.cpu_count(), "python": platform.python_version(),
                                "numpy": np.__version__}}
    result["warmup_s"] = round(warmup(), 3)
    x = signal(args.seconds)
    inc, stft = bench_incremental(x)
    base = bench_recompute(x, n_hops=min(500, len(x) // HOP - 10))
    result["numba_incremental_per_hop_both_settings"] = inc
    result["numba_stft_only_per_10_samples"] = stft
    result["numpy_recompute_per_hop_both_settings"] = base
    result["offline_reference_both_settings"] = bench_offline(x[:20_000])
    result["speedup_median"] = round(base["median_us"] / inc["median_us"], 1)
    result["percent_of_one_core_median"] = round(100 * inc["median_us"] / HOP_US, 2)
    result["percent_of_one_core_p99"] = round(100 * inc["p99_us"] / HOP_US, 2)
    result["targets"] = {"speedup_at_least_10x": result["speedup_median"] >= 10,
                         "under_200_us_per_hop_median": inc["median_us"] < 200}
    if args.compile:
        result["compile"] = compile_times()
    print_json(result)


if __name__ == "__main__":
    main()
