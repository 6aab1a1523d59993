"""Decoders streaming vs the offline PyTorch networks, side by side in one run; prints JSON.

    python benchmarks/bench_decoders.py [--seconds 30] [--seed 0] [--data-seed 0]
                                        [--repeat 2] [--out FILE]

Full-size networks with seeded random weights (``build_models``), seeded synthetic EMG
(``SignalGenerator``: 2.46 µVrms floor plus bursts), one thread everywhere.

- **Streaming** (what the daemon does), per variant: 40-sample blocks; the shared MPF
  (card high-pass, then ``MpfExtractor`` with both settings) once per block; gestures fed 10
  samples at a time and stepped at every 10-sample hop; wrist stepped per MPF frame;
  handwriting per pair of frames. ``step()`` is timed for per-hop p50/p99;
  ``time.process_time`` around the whole loop and around each part (MPF, gestures, wrist,
  handwriting) gives CPU seconds per second of EMG.
- **Offline**: each PyTorch network's whole-recording forward on the high-passed EMG
  (float32, eval, no grad, ``torch.set_num_threads(1)``), same weights, same data; the
  high-pass (Numba, run once for all three) is counted in the offline total.
- Ratios streaming / offline per decoder and total. The shared MPF is split half to wrist,
  half to handwriting for the per-decoder ratios (each offline network computes its own).
- Variants: ORT graph optimisation ``basic`` vs ``all``; dynamic int8 (``models/quantize.py``:
  LSTM and MatMul ops, QInt8 weights) of all three graphs, and a mix (gestures and wrist int8,
  handwriting float32). Each is compared to float32/``all`` on the same stream: max abs
  output delta, gesture events (``detect_offline``) and greedy CTC labels identical or not,
  and the same for the offline PyTorch outputs (the float32 floor).
- Gesture events with random weights: the logits wander near the threshold, so events are
  many (about 15 per second) and hang on tiny differences. A second gesture graph with the
  output bias moved so that about one event per second crosses the threshold is quantised
  and checked the same way (``events_model``). Multiplying the projection weights instead
  would scale the int8 error and the logit slope alike and change nothing (measured).
- ``native_int16`` (the daemon's default, ``decoder_backend = "native-int16"``) and ``native_float32``:
  all three run in emgd's Numba kernels (``emgd/native.py``, ``emgd/native_handwriting.py``),
  the gesture and wrist LSTM matrices as int16 rows + float32 scales, or float32 (the
  handwriting kernel is always float32). Their outputs are
  also compared with the offline PyTorch forward (``accuracy_vs_offline_pytorch``).
- ``fp32_all_gestures_block40``: the gesture decoder fed whole 40-sample blocks (4 hops per
  session call): cheaper per hop, but an output waits up to 15 ms longer.

Run-to-run noise on a shared 2-core machine is about ±30 %: compare figures of one run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import onnx
import onnxruntime as ort
import torch
from emgd.models.build import build_models, make_net
from emgd.models.quantize import (
    compare_outputs,
    decoder_outputs,
    events,
    quantize_model,
    test_signal,
)
from onnx import numpy_helper

from emgd.decoders import load_decoder, mpf_highpass
from emgd.detection import THRESHOLD, detect_offline
from emgd.highpass import HighPass
from emgd.modelcard import file_sha256, load_card, write_card
from emgd.mpf import MpfExtractor
from emgd.mpf import warmup as mpf_warmup

try:  # run as a script, the script's folder is on sys.path already
    from _common import command_line, cpu_model, dumps, stats_us
except ModuleNotFoundError:  # imported from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import command_line, cpu_model, dumps, stats_us

TASKS = ("discrete_gestures", "wrist", "handwriting")
SHORT = {"discrete_gestures": "gestures", "wrist": "wrist", "handwriting": "handwriting"}
BLOCK = 40
RATE = 2000.0
TARGET_RATIO = 1.5
EVENTS_PER_S = 1.0  # the events model's target event rate


# --------------------------------------------------------------------------- streaming


def stream_pass(cards: dict[str, Path], level: str, emg: np.ndarray, chunk: int = 10,
                kernel: str = "onnx") -> dict:
    """One streaming pass of all three decoders; latencies (ns), CPU (ns) and outputs.

    ``chunk``: samples per gesture ``accept`` (10: a step per hop; 40: four hops per call).
    ``kernel``: the decoders' backend (``onnx``, or emgd's ``native-int16``/``native-float32``
    Numba kernels)."""
    decs = {t: load_decoder(cards[t], optimization=level, backend=kernel) for t in TASKS}
    for d in decs.values():
        d.warmup()
    g, w, h = decs["discrete_gestures"], decs["wrist"], decs["handwriting"]
    hz, order = mpf_highpass([w.card, h.card]) or (0.0, 0)
    hp = HighPass(hz, RATE, order) if hz else None
    ex = MpfExtractor()
    fbuf = np.empty((BLOCK, 16), np.float32)
    n = len(emg) - len(emg) % BLOCK
    outs = {t: np.zeros((n // decs[t].card.timing.hop + 1, len(decs[t].card.output.labels)),
                        np.float32) for t in TASKS}
    lat: dict[str, list[int]] = {t: [] for t in TASKS}
    cpu = dict.fromkeys(("mpf", *TASKS), 0)
    pt, pc = time.process_time_ns, time.perf_counter_ns
    c_start, w_start = pt(), pc()
    for start in range(0, n, BLOCK):
        block = emg[start:start + BLOCK]
        c0 = pt()
        n_hw, n_wr = ex.push(hp.process(block, out=fbuf) if hp else block)
        c1 = pt()
        for k in range(0, BLOCK, chunk):
            g.accept(block[k:k + chunk])
            if g.ready():
                t0 = pc()
                out = g.step()
                lat["discrete_gestures"].append(pc() - t0)
                outs["discrete_gestures"][out.first:out.first + len(out.values)] = out.values
        c2 = pt()
        if n_wr:
            w.accept(ex.out_wrist[:n_wr])
            t0 = pc()
            out = w.step()
            lat["wrist"].append(pc() - t0)
            outs["wrist"][out.first:out.first + len(out.values)] = out.values
        c3 = pt()
        if n_hw:
            h.accept(ex.out_hw[:n_hw])
            if h.ready():
                t0 = pc()
                out = h.step()
                lat["handwriting"].append(pc() - t0)
                outs["handwriting"][out.first:out.first + len(out.values)] = out.values
        c4 = pt()
        cpu["mpf"] += c1 - c0
        cpu["discrete_gestures"] += c2 - c1
        cpu["wrist"] += c3 - c2
        cpu["handwriting"] += c4 - c3
    cpu_total, wall = pt() - c_start, pc() - w_start
    emitted = {t: decs[t].emitted for t in TASKS}
    return {"lat": lat, "cpu": cpu, "cpu_total": cpu_total, "wall": wall, "seconds": n / RATE,
            "outputs": {t: outs[t][:emitted[t]] for t in TASKS}}


# --------------------------------------------------------------------------- offline


def offline_pass(nets: dict, emg: np.ndarray, hz: float) -> dict:
    """Whole-recording PyTorch forwards (1 thread); CPU ns per part and the outputs."""
    cpu, outs = {}, {}
    c0 = time.process_time_ns()
    x = HighPass(hz, RATE).process(emg) if hz else emg
    cpu["highpass"] = time.process_time_ns() - c0
    xt = torch.from_numpy(np.ascontiguousarray(x.T[None]))
    with torch.inference_mode():
        for t in TASKS:
            c0 = time.process_time_ns()
            y = nets[t](xt)
            cpu[t] = time.process_time_ns() - c0
            outs[t] = y[0].numpy() if t == "handwriting" else y[0].T.numpy()
    return {"cpu": cpu, "outputs": outs}


# --------------------------------------------------------------------------- accuracy


def event_diff(card, ref: np.ndarray, got: np.ndarray) -> dict:
    """Events of two output streams: identical, and how many have no partner within ±1 hop."""
    a, b = events(card, ref), events(card, got)
    if a is None:
        return {}
    out = {"events_ref": len(a), "events": len(b), "events_identical": a == b}
    if card.task == "discrete_gestures":
        hop = card.timing.hop
        def unmatched(x: list, y: list) -> int:
            return sum(not any(n == m and abs(s - t) <= hop for m, t in y) for n, s in x)
        out["unmatched_within_1_hop"] = unmatched(a, b) + unmatched(b, a)
    return out


def accuracy(card, ref: np.ndarray, got: np.ndarray) -> dict:
    chk = compare_outputs(card, ref, got)
    out = {"max_abs_delta": float(f"{chk.max_abs_delta:.4g}"),
           "mean_abs_delta": float(f"{float(np.abs(got - ref).mean()):.4g}"),
           "ref_max_abs": float(f"{chk.fp32_max_abs:.4g}"), "rows": chk.rows}
    if card.task == "wrist":  # the cursor integrates the outputs: how far it drifts apart
        drift = np.abs(np.cumsum(got[:, 0], dtype=np.float64) - np.cumsum(ref[:, 0],
                                                                         dtype=np.float64))
        out["integrated_drift_max_rad"] = float(f"{float(drift.max()):.4g}")
        out["integrated_ref_range_rad"] = float(f"{float(np.ptp(np.cumsum(ref[:, 0]))):.4g}")
    return {**out, **event_diff(card, ref, got)}


def events_model(fp32_card: Path, logits: np.ndarray, floor_logits: np.ndarray, tmp: Path,
                 emg: np.ndarray, data_seed: int, native_logits: np.ndarray) -> dict:
    """Gesture graph with the output bias moved to ~1 event/s, quantised and checked."""
    card = load_card(fp32_card)
    model = onnx.load(str(card.onnx_path))
    init = {i.name: i for i in model.graph.initializer}
    if "net.projection.bias" not in init:
        raise RuntimeError("gesture graph has no initializer net.projection.bias")
    bias = numpy_helper.to_array(init["net.projection.bias"])
    pre = logits - bias
    seconds = len(emg) / RATE
    thr = float(np.log(THRESHOLD / (1.0 - THRESHOLD)))
    candidates = []
    for q in (0.99, 0.995, 0.998, 0.999, 0.9995):
        new_bias = (thr - np.quantile(pre, q, axis=0)).astype(np.float32)
        rate = len(detect_offline(pre + new_bias)) / seconds
        candidates.append((abs(np.log((rate + 1e-9) / EVENTS_PER_S)), q, new_bias, rate))
    _, q, new_bias, rate = min(candidates, key=lambda c: c[0])
    init["net.projection.bias"].CopyFrom(numpy_helper.from_array(new_bias,
                                                                  "net.projection.bias"))
    folder = tmp / "events_model"
    folder.mkdir()
    path = folder / "discrete_gestures_events.onnx"
    onnx.save(model, str(path))
    new = dataclasses.replace(
        card, name="discrete_gestures_events",
        model=dataclasses.replace(card.model, file=path.name, sha256=file_sha256(path)),
        provenance={**card.provenance, "events_bias_quantile": q})
    fp32 = write_card(new, folder / "discrete_gestures_events.toml")
    int8_path = quantize_model(fp32, folder / "int8", seconds=seconds, seed=data_seed)
    int8 = load_card(int8_path)
    floor_card = load_card(fp32)
    shifted_ref, shifted_floor = pre + new_bias, floor_logits - bias + new_bias
    int8_logits = decoder_outputs(int8_path, emg)
    return {
        "bias": "per gesture: logit threshold minus the q-quantile of that gesture's logit "
                "without bias on this data (weights unchanged)",
        "quantile": q, "events_per_s_fp32": round(rate, 3),
        "int8_vs_fp32_streamed": {k: v for k, v in int8.provenance.items()
                                  if k.startswith("quant")},
        "int8_vs_fp32_events": event_diff(floor_card, shifted_ref, int8_logits),
        "native_int16_vs_fp32_events": event_diff(floor_card, shifted_ref,
                                                   native_logits - bias + new_bias),
        "fp32_basic_vs_all_post_hoc_shift": event_diff(floor_card, shifted_ref, shifted_floor),
    }


# --------------------------------------------------------------------------- run


def summarise(passes: list[dict], offline: list[dict], seconds: float) -> dict:
    lat = {t: stats_us([x for p in passes for x in p["lat"][t]], "p50_us") for t in TASKS}
    med = lambda xs: float(np.median(xs))
    cpu = {SHORT[t]: med([p["cpu"][t] for p in passes]) / 1e9 / seconds for t in TASKS}
    cpu["mpf"] = med([p["cpu"]["mpf"] for p in passes]) / 1e9 / seconds
    total = med([p["cpu_total"] for p in passes]) / 1e9 / seconds
    off = {SHORT[t]: med([o["cpu"][t] for o in offline]) / 1e9 / seconds for t in TASKS}
    off_hp = med([o["cpu"]["highpass"] for o in offline]) / 1e9 / seconds
    off_total = sum(off.values()) + off_hp
    with_mpf = {"gestures": cpu["gestures"], "wrist": cpu["wrist"] + cpu["mpf"] / 2,
                "handwriting": cpu["handwriting"] + cpu["mpf"] / 2}
    return {
        "per_hop": {SHORT[t]: lat[t] for t in TASKS},
        "cpu_s_per_s": {k: round(v, 4) for k, v in cpu.items()} | {"total": round(total, 4)},
        "cpu_s_per_s_each_repeat": [round(p["cpu_total"] / 1e9 / seconds, 4) for p in passes],
        "ratio_streaming_over_offline": {
            **{k: round(with_mpf[k] / off[k], 3) for k in with_mpf},
            "total": round(total / off_total, 3)},
        "meets_1_5x_target": total / off_total <= TARGET_RATIO,
        "_off_total": off_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="EMG seconds (>= 10)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--data-seed", type=int, default=0, help="SignalGenerator seed")
    parser.add_argument("--repeat", type=int, default=2, help="passes per variant")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    t_run = time.perf_counter()
    result: dict = {
        "command": command_line(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "numpy": np.__version__,
                    "numba": numba.__version__, "onnxruntime": ort.__version__,
                    "onnx": onnx.__version__, "torch": torch.__version__},
        "threads": "ORT intra/inter 1, torch 1",
        "seeds": {"weights": args.seed, "data": args.data_seed},
    }
    emg = test_signal(args.seconds, args.data_seed)
    n = len(emg) - len(emg) % BLOCK
    emg = emg[:n]
    seconds = n / RATE
    result["data"] = {"source": f"emgd.drivers.simsignal.SignalGenerator(seed={args.data_seed})",
                      "seconds": seconds, "rms_uv": round(float(emg.std()), 2),
                      "block_samples": BLOCK}
    with tempfile.TemporaryDirectory(prefix="bench-decoders-") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        fp32 = {b.task: b.card for b in build_models(tmp / "fp32", TASKS, seed=args.seed)}
        result["build_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        int8 = {t: quantize_model(fp32[t], tmp / "int8", seconds=seconds, seed=args.data_seed)
                for t in TASKS}
        result["quantize_model_s"] = round(time.perf_counter() - t0, 2)
        result["quantize_model_provenance"] = {
            SHORT[t]: {k: v for k, v in load_card(int8[t]).provenance.items()
                       if k.startswith("quant")} for t in TASKS}
        variants = {  # name: (cards, ORT level, samples per gesture accept, backend)
            "fp32_all": (fp32, "all", 10, "onnx"),
            "native_int16": (fp32, "all", 10, "native-int16"),  # the daemon's default
            "native_float32": (fp32, "all", 10, "native-float32"),
            "fp32_basic": (fp32, "basic", 10, "onnx"),
            "int8_all": (int8, "all", 10, "onnx"),
            "int8_basic": (int8, "basic", 10, "onnx"),
            "int8_gestures_wrist_all": ({**int8, "handwriting": fp32["handwriting"]}, "all", 10,
                                        "onnx"),
            "fp32_all_gestures_block40": (fp32, "all", 40, "onnx"),
        }
        nets = {t: make_net(t, "full", args.seed) for t in TASKS}
        hz = load_card(fp32["discrete_gestures"]).input.highpass_hz
        mpf_warmup()
        offline_pass(nets, emg[:40_000], hz)  # first-call allocations, oneDNN set-up
        passes: dict[str, list[dict]] = {v: [] for v in variants}
        offline: list[dict] = []
        for _ in range(args.repeat):  # interleaved, so drifting load hits all alike
            offline.append(offline_pass(nets, emg, hz))
            for name, (cards, level, chunk, kernel) in variants.items():
                passes[name].append(stream_pass(cards, level, emg, chunk, kernel))
        off_cpu = {SHORT[t]: round(float(np.median([o["cpu"][t] for o in offline])) / 1e9
                                   / seconds, 4) for t in TASKS}
        off_cpu["highpass"] = round(float(np.median([o["cpu"]["highpass"] for o in offline]))
                                    / 1e9 / seconds, 4)
        summaries = {v: summarise(passes[v], offline, seconds) for v in variants}
        off_total = summaries["fp32_all"].pop("_off_total")
        for s in summaries.values():
            s.pop("_off_total", None)
        off_cpu["total"] = round(off_total, 4)
        result["offline_pytorch_cpu_s_per_s"] = off_cpu
        result["streaming"] = summaries
        result["streaming"]["fp32_all_gestures_block40"]["note"] = (
            "gestures per_hop here is per session call of 4 hops (40 samples); an output "
            "waits up to 15 ms longer than with one call per hop")
        cards = {t: load_card(fp32[t]) for t in TASKS}
        ref = passes["fp32_all"][0]["outputs"]
        acc = {"offline_pytorch": {SHORT[t]: accuracy(cards[t], ref[t],
                                                      offline[0]["outputs"][t])
                                   for t in TASKS}}
        for v in variants:
            if v != "fp32_all":
                got = passes[v][0]["outputs"]
                acc[v] = {SHORT[t]: accuracy(cards[t], ref[t], got[t]) for t in TASKS}
        result["accuracy_vs_fp32_all_streaming"] = acc
        result["accuracy_vs_offline_pytorch"] = {
            v: {SHORT[t]: accuracy(cards[t], offline[0]["outputs"][t], passes[v][0]["outputs"][t])
                for t in TASKS} for v in ("fp32_all", "native_int16", "native_float32")}
        result["events_model"] = events_model(
            fp32["discrete_gestures"], ref["discrete_gestures"],
            passes["fp32_basic"][0]["outputs"]["discrete_gestures"], tmp, emg, args.data_seed,
            passes["native_int16"][0]["outputs"]["discrete_gestures"])
    result["target"] = {
        "ratio_at_most": TARGET_RATIO,
        "default_variant": "native_int16 (decoder_backend = \"native-int16\", one call per hop)",
        **{f"{v}_meets": s["meets_1_5x_target"] for v, s in summaries.items()}}
    result["run_s"] = round(time.perf_counter() - t_run, 1)
    text = dumps(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
