"""The reference state_dict layouts (``neuromotor-models.md`` §5.4), written out from the document.

Pure Python (no torch): the checkpoint importer validates against these tables, and the tests
check that the PyTorch networks of :mod:`emgd.models.torchnets` produce exactly them. Keys are
without the Lightning ``network.`` prefix; values are ``(shape, dtype)`` with dtype one of
``"float32"``, ``"uint8"``, ``"bool"``.
"""

from __future__ import annotations

from typing import Literal

Task = Literal["discrete_gestures", "wrist", "handwriting"]
TASKS: tuple[Task, ...] = ("discrete_gestures", "wrist", "handwriting")
Layout = dict[str, tuple[tuple[int, ...], str]]

HW_STRIDES: tuple[int, ...] = (1, 1, 1, 1, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1)
HW_WINDOWS: tuple[int, ...] = (16,) * 10 + (8,) * 5

F32 = "float32"


def _lstm(prefix: str, layers: int, hidden: int, inputs: int) -> Layout:
    out: Layout = {}
    for i in range(layers):
        out[f"{prefix}.weight_ih_l{i}"] = ((4 * hidden, inputs if i == 0 else hidden), F32)
        out[f"{prefix}.weight_hh_l{i}"] = ((4 * hidden, hidden), F32)
        out[f"{prefix}.bias_ih_l{i}"] = ((4 * hidden,), F32)
        out[f"{prefix}.bias_hh_l{i}"] = ((4 * hidden,), F32)
    return out


def _linear(prefix: str, out_dim: int, in_dim: int) -> Layout:
    return {f"{prefix}.weight": ((out_dim, in_dim), F32), f"{prefix}.bias": ((out_dim,), F32)}


def _norm(prefix: str, dim: int) -> Layout:
    return {f"{prefix}.weight": ((dim,), F32), f"{prefix}.bias": ((dim,), F32)}


def _mpf(prefix: str) -> Layout:
    return {
        f"{prefix}.window": ((64,), F32),
        f"{prefix}.freq_masks": ((1, 1, 6, 33, 1, 1), "uint8"),
    }


def discrete_gestures_layout() -> Layout:
    return {
        "conv_layer.weight": ((512, 16, 21), F32),
        "conv_layer.bias": ((512,), F32),
        **_norm("post_conv_layer_norm", 512),
        **_lstm("lstm", 3, 512, 512),
        **_norm("post_lstm_layer_norm", 512),
        **_linear("projection", 9, 512),
    }


def wrist_layout() -> Layout:
    return {
        **_mpf("mpf_featurizer"),
        **_linear("rotation_invariant_mlp.fully_connected_layers.0", 512, 384),
        **_lstm("lstm", 2, 512, 512),
        **_linear("linear_out", 1, 512),
    }


def _ff(prefix: str) -> Layout:
    return {**_norm(f"{prefix}.child.0", 64), **_linear(f"{prefix}.child.1", 128, 64),
            **_linear(f"{prefix}.child.4", 64, 128)}


def handwriting_layout() -> Layout:
    out: Layout = {
        **_mpf("featurizer"),
        **_linear("rotation_invariant_mlp.fully_connected_layers.0", 64, 816),
        **_linear("conformer.1", 64, 128),
    }
    for b, window in enumerate(HW_WINDOWS):
        p = f"conformer.2.{b}"
        out.update(_ff(f"{p}.ff_block1"))
        out.update(_norm(f"{p}.attn_block.child.0", 64))
        out[f"{p}.attn_block.child.2.attn_mask"] = ((window, window), "bool")
        out[f"{p}.attn_block.child.2.op.in_proj_weight"] = ((192, 64), F32)
        out[f"{p}.attn_block.child.2.op.in_proj_bias"] = ((192,), F32)
        out.update(_linear(f"{p}.attn_block.child.2.op.out_proj", 64, 64))
        out.update(_norm(f"{p}.conv_block.child.0", 64))
        out.update(_linear(f"{p}.conv_block.child.1", 128, 64))
        out[f"{p}.conv_block.child.3.net.weight"] = ((64, 1, 8), F32)
        out[f"{p}.conv_block.child.3.net.bias"] = ((64,), F32)
        out.update(_norm(f"{p}.conv_block.child.4", 64))
        out.update(_linear(f"{p}.conv_block.child.6", 64, 64))
        out.update(_ff(f"{p}.ff_block2"))
        out.update(_norm(f"{p}.layer_norm", 64))
    out.update(_linear("conformer.3", 100, 64))
    return out


def layout(task: Task) -> Layout:
    """The expected ``name -> (shape, dtype)`` table of one task's network."""
    builders = {
        "discrete_gestures": discrete_gestures_layout,
        "wrist": wrist_layout,
        "handwriting": handwriting_layout,
    }
    return builders[task]()


def parameter_count(table: Layout) -> int:
    """Number of float32 parameters in a layout (buffers: masks and MPF window excluded)."""
    total = 0
    for name, (shape, dtype) in table.items():
        if dtype == F32 and not name.endswith(".window"):
            n = 1
            for s in shape:
                n *= s
            total += n
    return total
