"""A ``pickle_module`` for ``torch.load`` that imports and calls nothing outside an allow-list.

Published Lightning checkpoints pickle the reference package's classes
(``generic_neuromotor_interface.*``), ``functools.partial`` around torch optimizers,
omegaconf and torchmetrics objects. None of that is needed to read the weights, and loading
it with the ordinary unpickler would import (and run) whatever the file names. Here every
global that is not a known tensor/container reconstruction function becomes an inert
:class:`Stub` subclass named after it: building one only records the arguments, items and
state the pickle hands it, so a stub network's ``__dict__`` still shows attributes such as
``slice`` or ``left_context``.

Usage: ``torch.load(path, map_location="cpu", weights_only=False, pickle_module=stub_pickle)``.
torch resolves storage classes (names containing ``Storage``) itself before asking us.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import pickle
from typing import Any, BinaryIO

import numpy as np
import torch
import torch._utils

_TORCH_REBUILDERS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct
    scalar = np.float64(0).__reduce__()[0]
    out: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(core, "_reconstruct")] = reconstruct
        out[(core, "scalar")] = scalar
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    return out


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "slice"): slice,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _codecs.encode,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    **{("torch._utils", name): getattr(torch._utils, name) for name in _TORCH_REBUILDERS},
    **_numpy_globals(),
}


class Stub:
    """Stands in for a class or function the unpickler refused to import.

    ``stub_origin()`` gives ``"module.name"``; ``_stub_args`` / ``_stub_kwargs`` hold what it
    was called with, ``_stub_items`` / ``_stub_list`` what the pickle stored into it (dict or
    list subclasses), ``_stub_state`` a non-dict ``__setstate__`` argument. A dict state
    becomes the instance's attributes, as for an ordinary object.
    """

    _stub_module = ""
    _stub_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = object.__new__(cls)
        obj.__dict__.update(_stub_args=args, _stub_kwargs=kwargs, _stub_items={},
                            _stub_list=[], _stub_state=None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @classmethod
    def stub_origin(cls) -> str:
        return f"{cls._stub_module}.{cls._stub_name}"

    def __setstate__(self, state: Any) -> None:
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:
            if isinstance(part, dict) and all(isinstance(k, str) for k in part):
                self.__dict__.update(part)
            elif part is not None:
                self.__dict__["_stub_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._stub_items[key] = value

    def append(self, value: Any) -> None:
        self._stub_list.append(value)

    def extend(self, values: Any) -> None:
        self._stub_list.extend(values)

    def __repr__(self) -> str:
        return f"<stub {self.stub_origin()}>"


def _allowed_torch_constant(module: str, name: str) -> Any:
    if module != "torch":
        return None
    value = getattr(torch, name, None)
    ok = isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
    return value if ok else None


class Unpickler(pickle.Unpickler):
    """``find_class`` returns allow-listed objects, torch dtypes/layouts, or a Stub subclass."""

    def __init__(self, file: BinaryIO, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._stubs: dict[tuple[str, str], type[Stub]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's default) use Python 2 names such as __builtin__.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in ALLOWED:
            return ALLOWED[key]
        constant = _allowed_torch_constant(module, name)
        if constant is not None:
            return constant
        if key not in self._stubs:
            self._stubs[key] = type(
                name.rpartition(".")[2] or "Stub",
                (Stub,),
                {"_stub_module": module, "_stub_name": name, "__module__": __name__},
            )
        return self._stubs[key]


def load(file: BinaryIO, **kwargs: Any) -> Any:
    """``pickle.load`` with the restricted :class:`Unpickler` (torch's legacy format uses it)."""
    return Unpickler(file, **kwargs).load()
