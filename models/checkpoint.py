"""Import a published Lightning checkpoint of the reference networks without their package.

The checkpoint (``neuromotor-models.md`` §5.3) is a ``torch.save`` dict whose ``state_dict``
holds the weights under the ``network.`` prefix and whose ``hyper_parameters`` pickle the
reference classes. It is read with :mod:`emgd.models.stub_pickle`, which imports and calls
nothing outside an allow-list; the state_dict is then checked key by key, shape by shape and
dtype by dtype against :mod:`emgd.models.reference_layout` before anything is returned, so a
caller that writes converted weights never writes a partial or mismatched model.

    task, state_dict, summary = import_checkpoint("model_checkpoint.ckpt")
    net = {"wrist": WristNet, ...}[task]()
    net.load_state_dict(state_dict, strict=True)
"""

from __future__ import annotations

import math
import warnings
from os import PathLike
from typing import Any, NamedTuple

import torch

from emgd.errors import ModelError

from . import stub_pickle
from .reference_layout import TASKS, Task, layout
from .stub_pickle import Stub
from .torch_blocks import warmup_mask
from .torch_mpf import frequency_masks, hann_window

PREFIX = "network."
NETWORK_CLASSES: dict[str, Task] = {
    "DiscreteGesturesArchitecture": "discrete_gestures",
    "WristArchitecture": "wrist",
    "HandwritingArchitecture": "handwriting",
}
_MARKERS: dict[Task, str] = {
    "discrete_gestures": "conv_layer.weight",
    "wrist": "mpf_featurizer.window",
    "handwriting": "featurizer.window",
}
_SUMMARY_DEPTH = 8
_MAX_PROBLEMS = 12


class CheckpointImport(NamedTuple):
    task: Task
    state_dict: dict[str, torch.Tensor]  # reference names without the "network." prefix
    summary: dict[str, Any]  # Lightning metadata and the pickled network's attributes


def import_checkpoint(path: str | PathLike[str], task: Task | None = None) -> CheckpointImport:
    """Read, validate and return the weights of a reference Lightning checkpoint.

    ``task`` is detected from the key set when not given. Raises :class:`ModelError` naming
    the offending keys for a file that is not a checkpoint, a missing or extra key, a wrong
    shape or dtype, a non-tensor value, non-finite weights, or altered constant buffers.
    """
    ckpt = load_checkpoint_file(path)
    raw = ckpt.get("state_dict")
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: no 'state_dict' dict; keys are {sorted(map(str, ckpt))[:10]}")
    unprefixed = {k.removeprefix(PREFIX) if isinstance(k, str) else k: v for k, v in raw.items()}
    foreign = [k for k in raw if not (isinstance(k, str) and k.startswith(PREFIX))]
    if foreign:
        raise ModelError(f"{path}: state_dict keys outside '{PREFIX}': {_names(foreign)}")
    hparams = ckpt.get("hyper_parameters")
    network = _get(hparams, "network")
    if task is None:
        task = detect_task(unprefixed.keys())
    elif task not in TASKS:
        raise ModelError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    state_dict = validate_state_dict(unprefixed, task)
    _check_network_class(network, task)
    return CheckpointImport(task, state_dict, _summary(ckpt, hparams, network))


def load_checkpoint_file(path: str | PathLike[str]) -> dict[Any, Any]:
    """``torch.load`` with the stub unpickler; anything that is not a dict is a ModelError."""
    try:
        with warnings.catch_warnings():  # the legacy format's module-source check sees only stubs
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            ckpt = torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=stub_pickle
            )
    except FileNotFoundError as exc:
        raise ModelError(f"checkpoint not found: {path}") from exc
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise ModelError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            "expected the model_checkpoint.ckpt of a reference model tar"
        ) from exc
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: a checkpoint is a dict, this file holds {_kind(ckpt)}")
    return ckpt


def detect_task(keys: Any) -> Task:
    """The task whose marker key is present (exactly one must be)."""
    keys = set(keys)
    found = [task for task, marker in _MARKERS.items() if marker in keys]
    if len(found) != 1:
        markers = ", ".join(f"{m} ({t})" for t, m in _MARKERS.items())
        raise ModelError(
            f"cannot tell the task from the state_dict (expected exactly one of {markers}); "
            "pass task= explicitly"
        )
    return found[0]


def validate_state_dict(state_dict: dict[Any, Any], task: Task) -> dict[str, torch.Tensor]:
    """Check names, types, shapes, dtypes, finiteness and constant buffers against §5.4."""
    table = layout(task)
    problems: list[str] = []
    missing = [k for k in table if k not in state_dict]
    extra = [k for k in state_dict if k not in table]
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_names(extra)}")
    for key, (shape, dtype) in table.items():
        if key in state_dict:
            problem = _check_entry(key, state_dict[key], shape, dtype)
            if problem:
                problems.append(problem)
    if problems:
        shown = "; ".join(problems[:_MAX_PROBLEMS])
        hidden = len(problems) - _MAX_PROBLEMS
        more = f" (and {hidden} more)" if hidden > 0 else ""
        raise ModelError(f"checkpoint does not match the reference {task} network: {shown}{more}")
    return {k: state_dict[k] for k in table}


def _check_entry(key: str, value: Any, shape: tuple[int, ...], dtype: str) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"{key}: expected a tensor, found {_kind(value)}"
    if tuple(value.shape) != shape:
        return f"{key}: shape {tuple(value.shape)}, expected {shape}"
    if str(value.dtype).removeprefix("torch.") != dtype:
        return f"{key}: dtype {value.dtype}, expected {dtype}"
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        return f"{key}: contains NaN or infinite values"
    expected = _constant_buffer(key, shape)
    if expected is not None:
        same = (torch.allclose(value, expected, rtol=0, atol=1e-6) if value.is_floating_point()
                else torch.equal(value, expected))
        if not same:
            return f"{key}: constant buffer differs from the reference definition"
    return None


def _constant_buffer(key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    if key.endswith(".window"):
        return hann_window()
    if key.endswith(".freq_masks"):
        return frequency_masks()
    if key.endswith(".attn_mask"):
        return warmup_mask(shape[0])
    return None


def _check_network_class(network: Any, task: Task) -> None:
    if isinstance(network, Stub):
        named = NETWORK_CLASSES.get(type(network)._stub_name)
        if named is not None and named != task:
            raise ModelError(
                f"hyper_parameters['network'] is a {type(network).stub_origin()} "
                f"({named}) but the weights were read as {task}"
            )


# --------------------------------------------------------------------------- summary


def _summary(ckpt: dict[Any, Any], hparams: Any, network: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: _plain(ckpt.get(key), 1)
        for key in ("pytorch-lightning_version", "epoch", "global_step", "hparams_name")
    }
    out["top_level_keys"] = sorted(str(k) for k in ckpt)
    is_stub = isinstance(network, Stub)
    out["network_class"] = type(network).stub_origin() if is_stub else _kind(network)
    out["network"] = _plain(network, 0)
    rest = _items(hparams)
    out["hyper_parameters"] = {str(k): _plain(v, 0) for k, v in rest.items() if k != "network"}
    return out


def _plain(obj: Any, depth: int) -> Any:
    """A readable, torch-free rendering: stubs become dicts of class, arguments and attributes."""
    if obj is None or isinstance(obj, (bool, int, str, slice)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, type) and issubclass(obj, Stub):
        return f"<{obj.stub_origin()}>"
    if isinstance(obj, torch.Tensor):
        return f"tensor({str(obj.dtype).removeprefix('torch.')}, {list(obj.shape)})"
    if depth >= _SUMMARY_DEPTH:
        return f"<{_kind(obj)}>"
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, Stub):
        return _plain_stub(obj, depth)
    return repr(obj)[:200]


def _plain_stub(obj: Stub, depth: int) -> dict[str, Any]:
    d = obj.__dict__
    out: dict[str, Any] = {"class": type(obj).stub_origin()}
    for name in ("args", "kwargs", "items", "list", "state"):
        value = d.get(f"_stub_{name}")
        if value:
            out[name] = _plain(value, depth + 1)
    attrs = {k: _plain(v, depth + 1) for k, v in d.items() if not k.startswith("_")}
    if attrs:
        out["attributes"] = attrs
    modules = d.get("_modules")
    if isinstance(modules, dict) and modules:
        out["modules"] = {str(k): _plain(v, depth + 1) for k, v in modules.items()}
    return out


def _items(obj: Any) -> dict[Any, Any]:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, Stub):  # a dict subclass (AttributeDict, DictConfig) read as a stub
        attrs = {k: v for k, v in obj.__dict__.items() if not k.startswith("_")}
        return {**obj._stub_items, **attrs}
    return {}


def _get(obj: Any, key: str) -> Any:
    return _items(obj).get(key)


def _kind(obj: Any) -> str:
    return f"a stub of {type(obj).stub_origin()}" if isinstance(obj, Stub) else type(obj).__name__


def _names(keys: list[Any], limit: int = 8) -> str:
    shown = ", ".join(map(str, sorted(keys, key=str)[:limit]))
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
