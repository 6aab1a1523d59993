"""Dynamic int8 quantisation of a decoder's step graph, with its accuracy delta measured.

ONNX Runtime's ``quantize_dynamic`` stores weights as int8 and quantises activations per call
(``DynamicQuantizeLSTM`` for the LSTMs, ``MatMulInteger`` for MatMuls). The step graph's I/O
contract (``models/README.md``) is unchanged, so the quantised model is an ordinary card
plus graph that any emgd runtime loads. Because activations are quantised per *call*, its
outputs depend on how the stream is cut into calls: the delta is therefore measured the way
the daemon runs the decoder (:func:`stream`), not on one whole-recording call.

    from emgd.models.quantize import quantize_model
    card = quantize_model("models/discrete_gestures.toml", "out")   # out/discrete_gestures-int8.*

The measurement (:func:`compare`) feeds seeded synthetic EMG (:class:`SignalGenerator`) to
the float32 and the int8 decoder and records in the new card's ``[provenance]``:
``quantization``, ``quant_ops`` (the integer ops ORT actually wrote), ``quant_source_sha256``,
``quant_test_data``, ``quant_max_abs_delta`` (logit, rad per frame or log-probability),
``quant_fp32_max_abs`` (the float32 outputs' largest magnitude, for scale) and, for
gestures and handwriting, ``quant_events`` and ``quant_events_identical`` (gesture events of
``emgd.detection.detect_offline`` with the card's threshold and debounce; greedy CTC labels).
With random weights these say little about trained weights: re-run on the real model.

Needs ``onnx`` (the ``convert`` extra); no torch.
"""

from __future__ import annotations

import collections
import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from emgd.drivers.simsignal import SignalGenerator
from onnxruntime.quantization import QuantType, quantize_dynamic

from emgd.decoders import Decoder, load_decoder, mpf_highpass
from emgd.detection import DEBOUNCE_SAMPLES, THRESHOLD, detect_offline, greedy_decode
from emgd.errors import ModelError
from emgd.highpass import HighPass
from emgd.modelcard import ModelCard, file_sha256, load_card, write_card
from emgd.mpf import MpfExtractor
from emgd.vocab import BLANK

DEFAULT_OPS = ("LSTM", "MatMul")  # Conv left in float32: little work, and it sees raw input
INTEGER_OPS = ("DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger",
               "QAttention")
SUFFIX = "-int8"
BLOCK = 40  # samples per pipeline block (one MPF frame)
TEST_SECONDS = 60.0
TEST_SEED = 0


@dataclass(frozen=True)
class QuantCheck:
    """float32 vs int8 on the same stream: outputs compared row by row, events as lists."""

    rows: int
    max_abs_delta: float
    fp32_max_abs: float
    events_fp32: int | None  # None: the task has no discrete events (wrist)
    events_identical: bool | None


def test_signal(seconds: float = TEST_SECONDS, seed: int = TEST_SEED) -> np.ndarray:
    """Seeded synthetic EMG, (n, 16) float32 µV: 2.46 µVrms floor plus bursts."""
    return SignalGenerator(seed).generate(round(seconds * 2000)).astype(np.float32)


def mpf_frames(emg: np.ndarray, card: ModelCard) -> np.ndarray:
    """The card's MPF setting of ``emg`` as the pipeline computes it (shared high-pass first)."""
    hp = mpf_highpass([card])
    x = HighPass(hp[0], card.input.sample_rate, hp[1], card.input.channels).process(emg) \
        if hp else emg
    hw = card.input.mpf_window == 16
    ex = MpfExtractor(handwriting=hw, wrist=not hw)
    frames = []
    for i in range(0, len(x), 4000):
        n_hw, n_wr = ex.push(np.ascontiguousarray(x[i:i + 4000], dtype=np.float32))
        frames.append((ex.out_hw[:n_hw] if hw else ex.out_wrist[:n_wr]).copy())
    return np.concatenate(frames)


def stream(decoder: Decoder, rows: np.ndarray, chunk: int) -> np.ndarray:
    """Feed ``rows`` (samples or frames) ``chunk`` at a time, stepping whenever ready."""
    out = []
    for i in range(0, len(rows), chunk):
        decoder.accept(rows[i:i + chunk])
        while decoder.ready():
            out.append(decoder.step().values.copy())
    width = len(decoder.card.output.labels)
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def decoder_outputs(card_path: str | PathLike[str], emg: np.ndarray) -> np.ndarray:
    """Outputs of a card's decoder on ``emg`` fed at its natural hop (one call per hop)."""
    dec = load_decoder(card_path, verify=False)
    dec.warmup()
    if dec.card.input.kind == "emg":
        return stream(dec, emg, dec.card.timing.hop)
    return stream(dec, mpf_frames(emg, dec.card), 1)


def events(card: ModelCard, outputs: np.ndarray) -> list[Any] | None:
    """Discrete events of a task's outputs (gesture hits, greedy CTC labels); None for wrist."""
    if card.task == "discrete_gestures":
        ev = card.events
        hits = detect_offline(outputs, labels=card.output.labels,
                              threshold=ev.get("threshold", THRESHOLD),
                              debounce_samples=ev.get("debounce_samples", DEBOUNCE_SAMPLES))
        return [(h.name, h.sample) for h in hits]
    if card.task == "handwriting":
        blank = BLANK if card.output.blank is None else card.output.blank
        return greedy_decode(outputs, blank=blank)
    return None


def compare_outputs(card: ModelCard, ref: np.ndarray, got: np.ndarray) -> QuantCheck:
    if ref.shape != got.shape:
        raise ModelError(f"{card.name}: int8 gave {got.shape} outputs, float32 {ref.shape}")
    ev_ref, ev_got = events(card, ref), events(card, got)
    return QuantCheck(
        rows=int(ref.shape[0]),
        max_abs_delta=float(np.abs(got - ref).max()) if ref.size else 0.0,
        fp32_max_abs=float(np.abs(ref).max()) if ref.size else 0.0,
        events_fp32=None if ev_ref is None else len(ev_ref),
        events_identical=None if ev_ref is None else ev_ref == ev_got,
    )


def compare(fp32_card: str | PathLike[str], int8_card: str | PathLike[str],
            emg: np.ndarray) -> QuantCheck:
    """Both decoders on the same EMG, streamed as the daemon does; see :class:`QuantCheck`."""
    card = load_card(fp32_card)
    return compare_outputs(card, decoder_outputs(fp32_card, emg),
                           decoder_outputs(int8_card, emg))


def integer_ops(path: str | PathLike[str]) -> dict[str, int]:
    """Integer (quantised) op types in an ONNX file and how many of each."""
    counts = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {op: counts[op] for op in INTEGER_OPS if counts[op]}


def quantize_graph(src: str | PathLike[str], dst: str | PathLike[str], *,
                   op_types: tuple[str, ...] = DEFAULT_OPS, per_channel: bool = False,
                   reduce_range: bool = False) -> dict[str, int]:
    """``quantize_dynamic`` with int8 weights; returns the integer ops written (never none)."""
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                     op_types_to_quantize=list(op_types), per_channel=per_channel,
                     reduce_range=reduce_range)
    ops = integer_ops(dst)
    if not ops:
        raise ModelError(f"{src}: quantize_dynamic quantised none of {', '.join(op_types)}")
    return ops


def quantize_model(card_path: str | PathLike[str], out_dir: str | PathLike[str], *,
                   op_types: tuple[str, ...] = DEFAULT_OPS, per_channel: bool = False,
                   reduce_range: bool = False, seconds: float = TEST_SECONDS,
                   seed: int = TEST_SEED, force: bool = False) -> Path:
    """Write ``<name>-int8.onnx`` and its card into ``out_dir``; returns the card's path.

    The new card is the old one with the new file, name and description, and the
    quantisation and its measured accuracy delta (module docstring) added to
    ``[provenance]``. Staged in a temporary folder and checked with the runtime's loader;
    nothing is written on error, and existing files are kept unless ``force``.
    """
    card = load_card(card_path)
    if "quantization" in card.provenance:
        raise ModelError(f"{card.path}: already quantised ({card.provenance['quantization']})")
    if card.model.data_file is not None:
        raise ModelError(f"{card.path}: graphs with external data are not supported")
    name = card.name + SUFFIX
    out = Path(out_dir)
    targets = [out / f"{name}.onnx", out / f"{name}.toml"]
    clash = [str(p) for p in targets if p.exists()]
    if clash and not force:
        raise ModelError(f"refusing to overwrite {', '.join(clash)} (use force)")
    with tempfile.TemporaryDirectory(prefix="emgd-quant-") as tmp:
        onnx_path = Path(tmp) / targets[0].name
        ops = quantize_graph(card.onnx_path, onnx_path, op_types=op_types,
                             per_channel=per_channel, reduce_range=reduce_range)
        mode = "per-channel" if per_channel else "per-tensor"
        provenance = {
            **card.provenance,
            "quantization": f"dynamic int8 (ONNX Runtime {ort.__version__}, QInt8 weights, "
                            f"{mode}{', reduce_range' if reduce_range else ''})",
            "quant_ops": ", ".join(f"{op} x{n}" for op, n in ops.items()),
            "quant_source_sha256": card.model.sha256,
        }
        new = dataclasses.replace(
            card, name=name,
            description=f"{card.description} -- dynamic int8 quantisation of {card.model.file}",
            model=dataclasses.replace(card.model, file=onnx_path.name,
                                      sha256=file_sha256(onnx_path)),
            provenance=provenance,
            native=None)  # the int8 graph is the network now: no float weights beside it
        staged = write_card(new, Path(tmp) / targets[1].name)
        check = compare(card.path or card_path, staged, test_signal(seconds, seed))
        provenance.update(_check_provenance(check, seconds, seed))
        staged = write_card(dataclasses.replace(new, provenance=provenance), staged)
        load_decoder(staged)  # the runtime's own loader accepts it
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(onnx_path, targets[0])
        shutil.move(staged, targets[1])  # the card last: a card never names a missing file
    return targets[1]


def _check_provenance(check: QuantCheck, seconds: float, seed: int) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "quant_test_data": f"emgd.drivers.simsignal.SignalGenerator(seed={seed}), {seconds:g} s, "
                           f"streamed one call per hop ({check.rows} outputs)",
        "quant_max_abs_delta": float(f"{check.max_abs_delta:.4g}"),
        "quant_fp32_max_abs": float(f"{check.fp32_max_abs:.4g}"),
    }
    if check.events_identical is not None:
        prov["quant_events"] = check.events_fp32
        prov["quant_events_identical"] = check.events_identical
    return prov


__all__ = ["DEFAULT_OPS", "QuantCheck", "compare", "compare_outputs", "decoder_outputs",
           "events", "integer_ops", "mpf_frames", "quantize_graph", "quantize_model", "stream",
           "test_signal"]
