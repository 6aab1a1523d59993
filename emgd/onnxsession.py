"""ONNX Runtime sessions for model cards: open one (after checking the files' sha256) and
check the graph's inputs and outputs against the card.

Used by :func:`emgd.decoders.load_decoder`; both functions are re-exported from
``emgd.decoders``. Every refusal is a :class:`~emgd.errors.ModelError` naming the tensor or
the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort

from emgd.errors import ModelError
from emgd.modelcard import ModelCard, file_sha256

_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(bool)": "bool"}
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def open_session(card: ModelCard, *, threads: int = 1, optimization: str | None = None,
                 verify: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for the card's graph (sha256 checked first)."""
    path = card.onnx_path
    files: list[tuple[Path, str | None, str]] = [(path, card.model.sha256, "model.sha256")]
    if card.data_path is not None:
        files.append((card.data_path, card.model.data_sha256, "model.data_sha256"))
    for file, expected, key in files:
        if not file.is_file():
            raise ModelError(f"model file {file} (named by {card.path}) does not exist")
        if verify:
            actual = file_sha256(file)
            if actual != expected:
                raise ModelError(
                    f"{file}: sha256 {actual} does not match the card's {key} {expected} "
                    f"({card.path}); the file was changed after it was imported: re-run "
                    "'emgd models import' (or 'emgd models build-random') to regenerate both")
    level = optimization or card.model.graph_optimization
    if level not in _LEVELS:
        raise ModelError(f"graph optimisation level {level!r} is not one of "
                         f"{', '.join(_LEVELS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _LEVELS[level]
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def check_graph(card: ModelCard, session: ort.InferenceSession) -> None:
    """Refuse a graph whose inputs/outputs do not match the card; the error names the tensor."""
    where = f"{card.onnx_path} vs {card.path}"
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    states = {s.name: s for s in card.states}
    expected_in = {"x", *states}
    expected_out = {"y", *(f"{n}_next" for n in states)}
    if card.output.valid is not None:
        expected_out.add(card.output.valid)
    for name in sorted(expected_in - inputs.keys()):
        what = "x" if name == "x" else f"state {name!r} declared in the card"
        raise ModelError(f"{where}: {what} is not an input of the graph "
                         f"(inputs: {', '.join(inputs)})")
    for name in sorted(inputs.keys() - expected_in):
        raise ModelError(f"{where}: graph input {name!r} is not declared in the card's "
                         "[[state]] tables")
    for name in sorted(expected_out - outputs.keys()):
        raise ModelError(f"{where}: tensor {name!r} is not an output of the graph "
                         f"(outputs: {', '.join(outputs)})")
    for name in sorted(outputs.keys() - expected_out):
        raise ModelError(f"{where}: graph output {name!r} is not declared in the card")
    for s in card.states:
        for arg in (inputs[s.name], outputs[f"{s.name}_next"]):
            _check_tensor(where, arg, s.dtype, s.shape, f"state {s.name!r}")
    inp = card.input
    x = inputs["x"]
    time_dim = inp.unit if inp.fixed else None
    _check_tensor(where, x, "float32", (1, time_dim, *inp.row_shape), "x")
    if not inp.fixed and isinstance(x.shape[1], int):
        raise ModelError(f"{where}: x has a fixed time length {x.shape[1]} but the card's "
                         "input.fixed = false (set fixed = true and unit to match)")
    y = outputs["y"]
    _check_tensor(where, y, "float32", (1, None, len(card.output.labels)), "y")
    if card.output.valid is not None:
        _check_tensor(where, outputs[card.output.valid], "bool", (None,),
                      f"valid output {card.output.valid!r}")


def _check_tensor(where: str, arg: Any, dtype: str, shape: tuple[int | None, ...],
                  what: str) -> None:
    got_dtype = _ORT_TYPES.get(arg.type, arg.type)
    if got_dtype != dtype:
        raise ModelError(f"{where}: {what}: tensor {arg.name!r} has dtype {got_dtype}, the "
                         f"card says {dtype}")
    got = list(arg.shape)
    bad = len(got) != len(shape) or any(
        isinstance(g, int) and want is not None and g != want for g, want in zip(got, shape))
    if bad:
        want = tuple("?" if w is None else w for w in shape)
        raise ModelError(f"{where}: {what}: tensor {arg.name!r} has shape {tuple(got)}, the "
                         f"card says {want}")
