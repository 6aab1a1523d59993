"""Ring buffer cost per write and per read, printed as one JSON object.

    python benchmarks/bench_ring.py [--iterations 20000] [--capacity 65536]

For each block size (10, 40 and 320 samples × 16 channels) one writer call is followed by
one reader call of the same size, each timed alone with ``time.perf_counter_ns`` (a
monotonic clock); median and p99 are reported. Throughput is measured separately by an
untimed loop of write+read pairs; ``realtime_ratio`` is that throughput over one band's
2000 samples/s. Single thread: this is the cost of the code path, not of contention.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from emgd import N_CHANNELS, SAMPLE_RATE
from emgd.ringbuffer import RingBuffer

try:  # run as a script, the script's folder is on sys.path already
    from _common import command_line, machine, median_p99, print_json
except ModuleNotFoundError:  # imported from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import command_line, machine, median_p99, print_json

BLOCKS = (10, 40, 320)


def bench_block(block: int, iterations: int, capacity: int) -> dict[str, object]:
    ring = RingBuffer(capacity=capacity, channels=N_CHANNELS)
    reader = ring.reader()
    data = np.random.default_rng(0).standard_normal((block, N_CHANNELS)).astype(np.float32)
    out = np.empty((block, N_CHANNELS), np.float32)
    idx = np.empty(block, np.int64)
    tr = np.empty(block, np.int64)
    t_write = np.empty(iterations, np.int64)
    t_read = np.empty(iterations, np.int64)
    clock = time.perf_counter_ns
    first = 0
    for _ in range(1000):  # warm-up, also wraps the ring for small capacities
        ring.write(data, first, 0)
        reader.read(out, idx, tr)
        first += block
    for i in range(iterations):
        t0 = clock()
        ring.write(data, first, t0)
        t1 = clock()
        res = reader.read(out, idx, tr)
        t2 = clock()
        t_write[i] = t1 - t0
        t_read[i] = t2 - t1
        first += block
        if res.n != block:
            raise RuntimeError(f"read {res.n} of {block} samples")
    loops = iterations
    t0 = clock()
    for _ in range(loops):
        ring.write(data, first, 0)
        reader.read(out, idx, tr)
        first += block
    elapsed = clock() - t0
    sps = loops * block / (elapsed * 1e-9)
    return {
        "block": block,
        "write_ns": median_p99(t_write),
        "read_ns": median_p99(t_read),
        "samples_per_s": sps,
        "realtime_ratio": sps / SAMPLE_RATE,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--capacity", type=int, default=2**16)
    args = parser.parse_args(argv)
    results = [bench_block(b, args.iterations, args.capacity) for b in BLOCKS]
    print_json({
        "benchmark": "ring",
        "command": command_line(),
        "machine": machine(switch_interval_s=sys.getswitchinterval()),
        "channels": N_CHANNELS,
        "capacity": args.capacity,
        "iterations": args.iterations,
        "timer": "time.perf_counter_ns",
        "realtime_samples_per_s": SAMPLE_RATE,
        "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
