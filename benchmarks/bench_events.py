"""Latency of emgd's events, measured by an out-of-process subscriber; prints JSON.

    python benchmarks/bench_events.py [--seconds 60] [--warmup 5] [--models DIR] [--seed 0]
                                      [--profile-seconds 30] [--out FILE]

- **Models**: the three full-size networks with seeded random weights (``build_models``,
  float32, ORT ``all``), built into a temporary folder, or reused from ``--models DIR``
  (built there when the folder has no cards). No output layer is scaled: with random
  weights the gesture logits wander around the threshold and the simulated band's signal
  makes about 15 gesture events per second (``bench_decoders.py`` saw the same), enough
  for a p99; and ``--outputs`` is on, so ``outputs/<device>`` carries every network output
  block of every decoder (200 + 50 + 6.25 per second, reported per model) as a dense
  latency measure next to the event topics. Handwriting keys are rare with random weights
  (a few per minute: most emissions are the blank or repeat the previous class), so their
  p99 rests on a handful of events; a key is published in the same block right after its
  ``outputs[handwriting]`` message, whose figures are the dense measure for that decoder.
- **Daemon**: ``python -m emgd --device sim --models DIR --outputs --pub ... --ctl ...
  --log-level warning`` as a subprocess (the simulated band paced in real time, default
  settings otherwise: switch interval 0.5 ms, ORT one thread per session).
- **Subscriber**: this process, ``emgd.client.Subscriber`` on every topic. The first
  ``--warmup`` seconds after the first status message are not counted; then ``--seconds``
  are. Per topic (``outputs`` split by ``model``): count, rate, processing latency
  ``t_pub_ns - t_recv_ns`` and delivery latency (receive ``time.monotonic_ns()`` after
  ``recv_multipart`` − ``t_pub_ns``; same host, same clock), p50/p90/p99/max in ms, and the
  holes in ``seq``. Also the daemon's own ``status.latency`` and ``cpu``, its CPU from
  ``/proc`` and the load average before and after.
- **Profile** (``--profile-seconds``, 0 = skip): the same daemon (``emgd.daemon.Daemon``
  with the same settings, same switch interval) run in this process after the subprocess
  has stopped, with timers wrapped around each step (nothing else changed): ring read,
  gesture accept (scale + high-pass) and step (ORT), MPF high-pass and extractor, wrist and
  handwriting steps (ORT), detectors, publish, the whole decoder stage per block, and the
  simulated band's own work in its thread (generate, encode, decode, ring write), which
  competes for the GIL. Per published message the latency is split into *queue* (sample
  arrival → the pipeline starts the block holding it: waiting for the wake-up and for the
  previous block's work) and *in block* (block start → publish: work done in that block
  before the message). Timer overhead is a few hundred ns per call.

Load on the shared 2-core machine moves every figure (±30 %): compare one run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from emgd.client import Subscriber

PCTS = (50, 90, 99)
HZ = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import numba
    import onnxruntime as ort

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__,
            "onnxruntime": ort.__version__, "kernel": platform.release()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stats_ms(ns: list[int] | np.ndarray) -> dict[str, Any]:
    a = np.asarray(ns, dtype=np.float64) / 1e6
    if a.size == 0:
        return {"n": 0}
    p = np.percentile(a, PCTS)
    out = {f"p{q}_ms": round(float(v), 3) for q, v in zip(PCTS, p)}
    out["max_ms"] = round(float(a.max()), 3)
    out["mean_ms"] = round(float(a.mean()), 3)
    return out


def ensure_models(folder: Path | None, seed: int) -> tuple[Path, dict[str, Any]]:
    from emgd.models.build import build_models

    if folder is not None and any(folder.glob("*.toml")):
        return folder, {"dir": str(folder), "built": False}
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="emgd-bench-events-"))
    t0 = time.perf_counter()
    build_models(folder, seed=seed, size="full", force=True)
    return folder, {"dir": str(folder), "built": True, "seed": seed, "size": "full",
                    "build_s": round(time.perf_counter() - t0, 1)}


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime


def topic_key(event: Any) -> str:
    if event.kind == "outputs":
        return f"outputs/{event.device}[{event.fields.get('model')}]"
    return event.topic


# --------------------------------------------------------------------------- subprocess run


def run_daemon(models: Path, seconds: float, warmup: float) -> dict[str, Any]:
    pub = f"tcp://127.0.0.1:{free_port()}"
    ctl = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "emgd", "--device", "sim", "--models", str(models),
           "--outputs", "--pub", pub, "--ctl", ctl, "--log-level", "warning"]
    proc_latency: dict[str, list[int]] = defaultdict(list)
    delivery: dict[str, list[int]] = defaultdict(list)
    statuses: list[dict[str, Any]] = []
    sub = Subscriber(pub, topics=[""])
    t_spawn = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = None
        while first is None:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise SystemExit(f"daemon exited ({proc.returncode}): {err}")
            first = sub.recv(timeout=1.0)
            if first is not None and first.kind != "status":
                first = None
        t_ready = time.monotonic()
        t_start = t_ready + warmup
        while time.monotonic() < t_start:
            sub.recv(timeout=0.1)
        missed0 = dict(sub.missed)
        cpu0, wall0 = proc_cpu_s(proc.pid), time.monotonic()
        deadline = t_start + seconds
        recv = sub.recv
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ev = recv(timeout=left)
            if ev is None:
                continue
            r = sub.last_recv_ns
            key = topic_key(ev)
            proc_latency[key].append(ev.t_pub_ns - ev.t_recv_ns)
            delivery[key].append(r - ev.t_pub_ns)
            if ev.kind == "status":
                statuses.append(ev.fields)
        cpu1, wall1 = proc_cpu_s(proc.pid), time.monotonic()
        missed = {k: v - missed0.get(k, 0) for k, v in sub.missed.items()}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        sub.close()
    topics = {}
    for key in sorted(proc_latency):
        n = len(proc_latency[key])
        topics[key] = {"count": n, "rate_per_s": round(n / seconds, 2),
                       "processing": stats_ms(proc_latency[key]),
                       "delivery": stats_ms(delivery[key]),
                       "missed_seq": missed.get(key.split("[")[0], 0)}
    lat = [s["latency"] for s in statuses if s.get("latency", {}).get("p99_us") is not None]
    last = statuses[-1] if statuses else {}
    return {
        "command": " ".join(cmd),
        "startup_to_first_status_s": round(t_ready - t_spawn, 2),
        "topics": topics,
        "daemon_status": {
            "latency_p50_us_last": lat[-1]["p50_us"] if lat else None,
            "latency_p99_us_last": lat[-1]["p99_us"] if lat else None,
            "latency_p99_us_max_over_run": max(x["p99_us"] for x in lat) if lat else None,
            "cpu_percent_mean": round(float(np.mean([s["cpu"] for s in statuses])), 1)
            if statuses else None,
            "cpu_percent_max": round(float(np.max([s["cpu"] for s in statuses])), 1)
            if statuses else None,
            "rate_hz_min": round(float(np.min([s["rate_hz"] for s in statuses])), 1)
            if statuses else None,
            "gaps": last.get("gaps"), "overrun_samples": last.get("overrun_samples"),
            "pub_dropped": last.get("pub_dropped"), "ring_fill_last": last.get("ring_fill"),
            "warmup_s": (last.get("models") or {}).get("warmup_s"),
        },
        "daemon_cpu_percent_of_one_core_proc": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
        "daemon_exit_code": proc.returncode,
        "daemon_stderr_tail": err[-2000:] if err else "",
    }


# --------------------------------------------------------------------------- profile


class Timers:
    def __init__(self) -> None:
        self.on = False
        self.d: dict[str, list[int]] = defaultdict(list)
        self.cpu: dict[str, list[int]] = defaultdict(list)

    def wrap(self, name: str, fn: Any, thread_cpu: bool = False) -> Any:
        pc, tt, d, c = time.perf_counter_ns, time.thread_time_ns, self.d[name], self.cpu[name]

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            if not self.on:
                return fn(*a, **k)
            t0 = pc()
            c0 = tt() if thread_cpu else 0
            try:
                return fn(*a, **k)
            finally:
                d.append(pc() - t0)
                if thread_cpu:
                    c.append(tt() - c0)
        return timed


def run_profile(models: Path, seconds: float, warmup: float) -> dict[str, Any]:
    from emgd.drivers.sim import SimDevice

    from emgd.config import Settings
    from emgd.daemon import Daemon
    from emgd.ringbuffer import Reader

    timers = Timers()
    settings = Settings(device="sim", models=str(models), outputs=True,
                        pub=f"tcp://127.0.0.1:{free_port()}",
                        ctl=f"tcp://127.0.0.1:{free_port()}", log_level="warning")
    daemon = Daemon(settings)
    events: list[tuple[str, int, int, int]] = []  # key, t_recv, block start, t_pub (approx.)
    blocks: list[tuple[int, int, int, int]] = []  # n, start - t_recv[0], start - t_recv[-1], dur
    state: dict[str, Any] = {"block_start": 0}
    # class-level wrappers (this process only)
    orig_read, orig_produce = Reader.read, SimDevice._produce
    Reader.read = timers.wrap("ring_read", orig_read)  # type: ignore[method-assign]
    SimDevice._produce = timers.wrap("sim_thread_produce", orig_produce,  # type: ignore
                                     thread_cpu=True)
    load = daemon._load_decoders

    def load_instrumented() -> Any:
        stage: Any = load()  # all three decoders (the bench builds them)
        w = timers.wrap
        stage.gesture.accept = w("gesture_accept", stage.gesture.accept)
        stage.gesture.step = w("gesture_step", stage.gesture.step)
        stage.wrist.step = w("wrist_step", stage.wrist.step)
        stage.handwriting.step = w("handwriting_step", stage.handwriting.step)
        stage.wrist.accept = w("wrist_accept", stage.wrist.accept)
        stage.handwriting.accept = w("handwriting_accept", stage.handwriting.accept)
        stage._highpass.process = w("mpf_highpass", stage._highpass.process)
        stage._mpf.push = w("mpf_extract", stage._mpf.push)
        stage._gestures.push = w("detector_gesture", stage._gestures.push)
        stage._wrist.push = w("detector_wrist", stage._wrist.push)
        stage._ctc.push = w("detector_ctc", stage._ctc.push)
        stage._line.push = w("detector_line", stage._line.push)
        process = stage.process

        def process_timed(data: Any, index: Any, t_recv: Any, ctx: Any) -> None:
            if "ctx" not in state:
                state["ctx"] = ctx
                publish = ctx.publish
                timed_publish = w("publish", publish)

                def publish_recorded(kind: str, sample: int, t_recv_ns: int,
                                     fields: dict[str, Any]) -> None:
                    timed_publish(kind, sample, t_recv_ns, fields)
                    if timers.on:
                        key = f"{kind}[{fields['model']}]" if kind == "outputs" else kind
                        events.append((key, t_recv_ns, state["block_start"],
                                       time.monotonic_ns()))
                ctx.publish = publish_recorded
            t0 = time.monotonic_ns()
            state["block_start"] = t0
            process(data, index, t_recv, ctx)
            if timers.on:
                blocks.append((len(index), t0 - int(t_recv[0]), t0 - int(t_recv[-1]),
                               time.monotonic_ns() - t0))
        stage.process = process_timed
        return stage

    daemon._load_decoders = load_instrumented  # type: ignore[method-assign]
    sys.setswitchinterval(settings.switch_interval_ms / 1000.0)  # as Daemon.run does
    cpu0 = c1 = time.process_time()
    try:
        daemon.start()
        time.sleep(warmup)
        timers.on = True
        cpu0, w0 = time.process_time(), time.monotonic()
        time.sleep(seconds)
        timers.on = False
        c1, w1 = time.process_time(), time.monotonic()
    finally:
        daemon.stop()
        Reader.read, SimDevice._produce = orig_read, orig_produce  # type: ignore
    steps = {}
    for name, d in sorted(timers.d.items()):
        if not d:
            continue
        a = np.asarray(d, np.float64)
        steps[name] = {"calls_per_s": round(len(d) / seconds, 1),
                       "p50_us": round(float(np.percentile(a, 50)) / 1e3, 1),
                       "p99_us": round(float(np.percentile(a, 99)) / 1e3, 1),
                       "max_us": round(float(a.max()) / 1e3, 1),
                       "wall_s_per_s": round(float(a.sum()) / 1e9 / seconds, 4)}
        if timers.cpu[name]:
            steps[name]["thread_cpu_s_per_s"] = round(sum(timers.cpu[name]) / 1e9 / seconds, 4)
    b = np.asarray(blocks, np.int64)
    per_event: dict[str, Any] = {}
    by_key: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for key, tr, bs, tp in events:
        by_key[key].append((tr, bs, tp))
    for key, rows in sorted(by_key.items()):
        r = np.asarray(rows, np.int64)
        total, queue, inblock = r[:, 2] - r[:, 0], r[:, 1] - r[:, 0], r[:, 2] - r[:, 1]
        worst = np.argsort(total)[-max(1, len(total) // 100):]  # the slowest 1 %
        per_event[key] = {"count": len(rows), "latency": stats_ms(total),
                          "queue": stats_ms(queue), "in_block": stats_ms(inblock),
                          "slowest_1pct_mean_queue_ms": round(float(queue[worst].mean()) / 1e6, 3),
                          "slowest_1pct_mean_in_block_ms":
                              round(float(inblock[worst].mean()) / 1e6, 3)}
    return {
        "seconds": seconds,
        "note": "in-process Daemon (same settings, no asyncio main loop/control socket); "
                "latency = t_pub - t_recv as stamped, split into queue (arrival -> block "
                "start) and in_block (block start -> publish)",
        "steps": steps,
        "blocks": {"count": len(b), "per_s": round(len(b) / seconds, 1),
                   "samples_p50": float(np.median(b[:, 0])) if len(b) else None,
                   "samples_max": int(b[:, 0].max()) if len(b) else None,
                   "wait_last_sample_to_start": stats_ms(b[:, 2]) if len(b) else None,
                   "wait_first_sample_to_start": stats_ms(b[:, 1]) if len(b) else None,
                   "decoder_stage_duration": stats_ms(b[:, 3]) if len(b) else None},
        "per_message": per_event,
        "process_cpu_percent_of_one_core": round(100 * (c1 - cpu0) / (w1 - w0), 1),
        "threads": sorted(t.name for t in threading.enumerate()),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="seconds after the first status message not counted")
    ap.add_argument("--models", type=Path, help="model folder to reuse (built if empty)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed when building")
    ap.add_argument("--profile-seconds", type=float, default=30.0,
                    help="in-process profile run after the subprocess run (0 = skip)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    t_run = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    models, info = ensure_models(args.models, args.seed)
    result["models"] = info
    result["seconds"] = args.seconds
    result["warmup_s"] = args.warmup
    result["daemon"] = run_daemon(models, args.seconds, args.warmup)
    result["load_average_after_daemon"] = [round(x, 2) for x in os.getloadavg()]
    if args.profile_seconds > 0:
        result["profile"] = run_profile(models, args.profile_seconds, args.warmup)
        result["load_average_after_profile"] = [round(x, 2) for x in os.getloadavg()]
    target = {}
    for key, t in result["daemon"]["topics"].items():
        p99 = t["processing"].get("p99_ms")
        target[key] = {"p99_ms": p99, "meets_5ms": p99 is not None and p99 <= 5.0,
                       "over_2ms_by_ms": None if p99 is None else round(p99 - 2.0, 3)}
    result["target_p99_processing_ms"] = {"at_most": 5.0, "goal": 2.0, "per_topic": target}
    result["run_s"] = round(time.perf_counter() - t_run, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
