"""Streaming step graphs for the gesture and wrist networks, exported to ONNX.

A step module takes new input and the carried state and returns output and the next state;
it reuses the offline network's submodules (same parameters, same code), so the streaming
graph and :mod:`emgd.models.torchnets` cannot drift apart. ONNX I/O convention: inputs ``x``
then one input per state tensor; outputs ``y`` then ``<state>_next`` in the same order.

Gestures (``x`` = new raw EMG, time-major, in the HDF5 units; k >= 1):

    x (1, 10k, 16), tail (1, 11, 16), h (L, 1, 512), c (L, 1, 512)
    -> y (1, k, 9) logits, tail_next, h_next, c_next

``tail`` holds the last 11 *compressed* samples. To reproduce the offline output from
sample 0, start with ``tail = 64*s/(32+|s|)`` of samples 0..10 (:func:`gestures_initial_state`)
and zero h, c, then feed samples from index 11 on in multiples of 10: step output j is then
offline output j (covering samples 10j ... 10j+20).

Wrist (``x`` = MPF frames, float32, time-major; MPF itself runs outside ONNX):

    x (1, k, 6, 16, 16), h (L, 1, 512), c (L, 1, 512) -> y (1, k, 1), h_next, c_next

Zero h, c at the first frame reproduce the offline forward from sample 0.

Export uses the legacy exporter (``dynamo=False``, opset 17); a failed export can leave the
module in training mode (runtime-facts), so every exporter call is followed by ``.eval()``.
"""

from __future__ import annotations

import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .torchnets import GESTURE_KERNEL, GESTURE_STRIDE, DiscreteGesturesNet, WristNet

OPSET = 17
GESTURE_TAIL = GESTURE_KERNEL - GESTURE_STRIDE  # 11 compressed samples


class GesturesStep(nn.Module):
    """One streaming step of :class:`DiscreteGesturesNet` (see the module docstring)."""

    def __init__(self, net: DiscreteGesturesNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, x: torch.Tensor, tail: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        buf = torch.cat([tail, self.net.compression(x)], dim=1)  # (1, 11 + 10k, C)
        out, (h_next, c_next) = self.net.lstm(self.net.conv_features(buf.transpose(1, 2)), (h, c))
        return self.net.head(out), buf[:, -GESTURE_TAIL:], h_next, c_next


class WristStep(nn.Module):
    """One streaming step of :class:`WristNet`'s head (MPF frames in)."""

    def __init__(self, net: WristNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, (h_next, c_next) = self.net.head_frames(x, (h, c))
        return y, h_next, c_next


def _lstm_state(lstm: nn.LSTM) -> tuple[np.ndarray, np.ndarray]:
    shape = (lstm.num_layers, 1, lstm.hidden_size)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def gestures_initial_state(net: DiscreteGesturesNet, first: np.ndarray) -> dict[str, np.ndarray]:
    """State to reproduce the offline forward; ``first`` = samples 0..10 (11, C)."""
    if first.shape[0] != GESTURE_TAIL:
        raise ValueError(f"need the first {GESTURE_TAIL} samples, got {first.shape[0]}")
    f = first.astype(np.float32)
    tail = (np.float32(64.0) * f / (np.float32(32.0) + np.abs(f)))[None]
    h, c = _lstm_state(net.lstm)
    return {"tail": tail.astype(np.float32), "h": h, "c": c}


def wrist_initial_state(net: WristNet) -> dict[str, np.ndarray]:
    h, c = _lstm_state(net.lstm)
    return {"h": h, "c": c}


def export_gestures_step(net: DiscreteGesturesNet, path: str | PathLike[str]) -> Path:
    channels = net.conv_layer.in_channels
    state = gestures_initial_state(net, np.zeros((GESTURE_TAIL, channels), np.float32))
    x = torch.zeros(1, 2 * GESTURE_STRIDE, channels)
    return _export(GesturesStep(net), x, state, path)


def export_wrist_step(net: WristNet, path: str | PathLike[str]) -> Path:
    channels = net.rotation_invariant_mlp.num_channels
    x = torch.zeros(1, 2, 6, channels, channels)
    return _export(WristStep(net), x, wrist_initial_state(net), path)


def _export(
    step: nn.Module, x: torch.Tensor, state: dict[str, np.ndarray], path: str | PathLike[str],
    *, outputs: tuple[str, ...] = ("y",), dynamic: bool = True,
    quiet_modules: tuple[str, ...] = (),
) -> Path:
    """Legacy export of a step graph: inputs ``x`` + state, outputs ``outputs`` + ``*_next``.

    ``quiet_modules``: further modules whose TracerWarnings are known not to apply.
    """
    path = Path(path)
    names = list(state)
    args = (x, *(torch.from_numpy(state[n]) for n in names))
    step.eval()
    try:
        with warnings.catch_warnings():
            _silence_known_export_warnings()
            for module in quiet_modules:
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                        module=module)
            torch.onnx.export(
                step,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["x", *names],
                output_names=[*outputs, *(f"{n}_next" for n in names)],
                dynamic_axes={"x": {1: "time"}, "y": {1: "frames"}} if dynamic else None,
            )
    finally:
        step.eval()  # a failed legacy export leaves the module in training mode
    return path


def _silence_known_export_warnings() -> None:
    """Warnings that do not apply here: batch is 1 and h/c are graph inputs."""
    warnings.filterwarnings(
        "ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.modules\.rnn"
    )
    for message in (
        "Exporting a model to ONNX with a batch_size other than 1",
        "You are using the legacy TorchScript-based ONNX export",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", message="The feature will be removed")
