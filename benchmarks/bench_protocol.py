"""Protocol decoder throughput, printed as one JSON object.

    python benchmarks/bench_protocol.py [--seconds 20] [--repeats 15]

The streams are the simulated band's real bytes (``SimStream``: EMG frames of 10 samples
plus a STATUS frame per second), ``--seconds`` of signal each, for int24, int16 and int24
with 1 % of frames corrupted (resynchronisation cost). Each stream is fed to a fresh
``StreamDecoder`` in 512-byte and 4096-byte chunks, ``--repeats`` times. Per repetition the
whole pass is timed with ``time.perf_counter_ns``; the JSON reports the median and p99 of
those pass times as throughput (bytes/s, samples/s), and the median and p99 cost of one
``feed`` call. ``realtime_ratio`` is throughput over the stream's own real-time byte rate
(one band at 2000 samples/s); the issue's target is >= 50 on one core. Single thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from emgd import SAMPLE_RATE
from emgd.drivers.protocol import StreamDecoder
from emgd.drivers.sim import SimConfig, SimStream

try:  # run as a script, the script's folder is on sys.path already
    from _common import command_line, machine, median_p99, print_json
except ModuleNotFoundError:  # imported from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import command_line, machine, median_p99, print_json

STREAMS = {
    "int24": "sim?format=int24&frame=10",
    "int16": "sim?format=int16&frame=10",
    "int24_corrupt_1pct": "sim?format=int24&frame=10&corrupt=0.01",
}
CHUNKS = (512, 4096)


def bench(stream: bytes, chunk: int, repeats: int, samples: int, seconds: float) -> dict:
    clock = time.perf_counter_ns
    pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    passes = np.empty(repeats, np.int64)
    feeds: list[np.ndarray] = []
    for r in range(repeats + 1):  # the first pass warms up and is not counted
        dec = StreamDecoder()
        per_feed = np.empty(len(pieces), np.int64)
        t_start = clock()
        for i, piece in enumerate(pieces):
            t0 = clock()
            dec.feed(piece)
            per_feed[i] = clock() - t0
        elapsed = clock() - t_start
        if dec.stats.samples != samples:
            raise RuntimeError(f"decoded {dec.stats.samples} of {samples} samples")
        if r:
            passes[r - 1] = elapsed
            feeds.append(per_feed)
    feed_ns = np.concatenate(feeds)
    realtime_bps = len(stream) / seconds

    def rates(ns: float) -> dict[str, float]:
        bps = len(stream) / (ns * 1e-9)
        return {"bytes_per_s": bps, "samples_per_s": samples / (ns * 1e-9),
                "realtime_ratio": bps / realtime_bps}

    return {
        "chunk_bytes": chunk,
        "median": rates(float(np.median(passes))),
        "p99": rates(float(np.percentile(passes, 99))),  # the slow tail of pass times
        "feed_call_ns": median_p99(feed_ns),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="signal per stream")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    n = int(args.seconds * SAMPLE_RATE)
    results = []
    for name, url in STREAMS.items():
        sim = SimStream(SimConfig.from_url(url))
        stream = sim.generate_bytes(n)
        samples = n - sim.injected.lost_samples - sim.injected.pending_lost
        for chunk in CHUNKS:
            row = {"stream": name, "url": url, "stream_bytes": len(stream),
                   "realtime_bytes_per_s": len(stream) / args.seconds}
            row.update(bench(stream, chunk, args.repeats, samples, args.seconds))
            results.append(row)
    print_json({
        "benchmark": "protocol",
        "command": command_line(),
        "machine": machine(),
        "seconds_of_signal": args.seconds,
        "repeats": args.repeats,
        "timer": "time.perf_counter_ns",
        "target_realtime_ratio": 50,
        "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
