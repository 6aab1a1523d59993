"""The three reference networks in PyTorch, with the reference parameter names.

Offline oracles and the source of ONNX exports; the facts are ``neuromotor-models.md`` §3
(layer order, quirks) and §5.4 (names and shapes). A reference ``state_dict`` with the
``network.`` prefix removed loads into the default (full-size) configuration with
``strict=True``; smaller configurations run the same code and exist for fast tests.

All three take raw EMG (B, 16, N) in the units stored in the HDF5 files and start every call
from zero state, as the reference does. ``left_context`` and ``stride`` are in samples:
output t covers samples ``[stride*t, stride*t + left_context]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .reference_layout import HW_STRIDES, HW_WINDOWS
from .torch_blocks import ConformerBlock, TimeReduction
from .torch_mpf import MPFFeatures, RotationInvariantMLP

GESTURE_KERNEL = 21
GESTURE_STRIDE = 10


class ReinhardCompression(nn.Module):
    """``y = range * x / (midpoint + |x|)``, always on (train and eval)."""

    def __init__(self, range_: float = 64.0, midpoint: float = 32.0) -> None:
        super().__init__()
        self.range = range_
        self.midpoint = midpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.range * x / (self.midpoint + x.abs())


def _lstm(inputs: int, hidden: int, layers: int, dropout: float) -> nn.LSTM:
    return nn.LSTM(inputs, hidden, num_layers=layers, batch_first=True,
                   dropout=dropout if layers > 1 else 0.0)


class DiscreteGesturesNet(nn.Module):
    """(B, C, N) raw EMG -> (B, 9, floor((N - 21) / 10) + 1) logits (one sigmoid each), 200 Hz."""

    left_context = GESTURE_KERNEL - 1
    stride = GESTURE_STRIDE

    def __init__(
        self,
        num_channels: int = 16,
        conv_channels: int = 512,
        lstm_hidden: int = 512,
        lstm_layers: int = 3,
        output_channels: int = 9,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.compression = ReinhardCompression(64.0, 32.0)
        self.conv_layer = nn.Conv1d(
            num_channels, conv_channels, GESTURE_KERNEL, stride=GESTURE_STRIDE
        )
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.post_conv_layer_norm = nn.LayerNorm(conv_channels)
        self.lstm = _lstm(conv_channels, lstm_hidden, lstm_layers, dropout)
        self.post_lstm_layer_norm = nn.LayerNorm(lstm_hidden)
        self.projection = nn.Linear(lstm_hidden, output_channels)

    def output_length(self, n: int) -> int:
        return (n - GESTURE_KERNEL) // GESTURE_STRIDE + 1 if n >= GESTURE_KERNEL else 0

    def conv_features(self, compressed: torch.Tensor) -> torch.Tensor:
        """Compressed EMG (B, C, N) -> post-conv features (B, T, conv_channels)."""
        h = self.dropout(self.relu(self.conv_layer(compressed)))
        return self.post_conv_layer_norm(h.transpose(1, 2))

    def head(self, lstm_out: torch.Tensor) -> torch.Tensor:
        """LSTM output (B, T, H) -> logits (B, T, 9)."""
        return self.projection(self.post_lstm_layer_norm(lstm_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.conv_features(self.compression(x)))  # zero state, as the reference
        return self.head(out).transpose(1, 2)


class WristNet(nn.Module):
    """(B, C, N) raw EMG -> (B, 1, floor((N - 254) / 40) + 1): flexion change (rad) per frame."""

    def __init__(
        self,
        num_channels: int = 16,
        hidden_dims: Sequence[int] = (512,),
        lstm_hidden: int = 512,
        lstm_layers: int = 2,
        output_dim: int = 1,
        num_adjacent_cov: int = 3,
    ) -> None:
        super().__init__()
        self.mpf_featurizer = MPFFeatures(window_length=200)
        self.rotation_invariant_mlp = RotationInvariantMLP(
            num_channels, 6, hidden_dims, (-1, 0, 1), num_adjacent_cov
        )
        self.lstm = _lstm(hidden_dims[-1], lstm_hidden, lstm_layers, 0.0)
        self.activation = nn.LeakyReLU(0.01)
        self.linear_out = nn.Linear(lstm_hidden, output_dim)
        self.left_context = self.mpf_featurizer.left_context
        self.stride = self.mpf_featurizer.stride

    def output_length(self, n: int) -> int:
        return self.mpf_featurizer.num_frames(n)

    def head_frames(
        self, frames: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """MPF frames (B, K, 6, C, C), optional LSTM (h, c) -> ((B, K, output_dim), (h, c))."""
        out, new_state = self.lstm(self.rotation_invariant_mlp.forward_frames(frames), state)
        return self.linear_out(self.activation(out)), new_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = self.mpf_featurizer(x).permute(0, 4, 1, 2, 3)
        y, _ = self.head_frames(frames)
        return y.transpose(1, 2)


class HandwritingNet(nn.Module):
    """(B, C, N) raw EMG -> (B, E, 100) CTC log-probabilities, E = floor((N - 19854) / 320) + 1.

    The reference ``forward`` returns ``(emissions, slice(491, -1, 8))``; this one returns the
    emissions only (the slice is :attr:`emission_slice`). The training-only ``specaug`` and
    dropout are not applied in eval mode; ``specaug`` is not implemented (inference oracle).
    ``conformer`` is ``Sequential(TimeReduction, Linear, Sequential(blocks), Linear, LogSoftmax)``
    as in the reference, so block b's parameters are ``conformer.2.<b>.*``.
    """

    def __init__(
        self,
        num_channels: int = 16,
        mlp_dim: int = 64,
        dim: int = 64,
        ffn_dim: int = 128,
        num_heads: int = 4,
        strides: Sequence[int] = HW_STRIDES,
        window_sizes: Sequence[int] = HW_WINDOWS,
        num_classes: int = 100,
        num_adjacent_cov: int = 8,
        kernel_size: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(strides) != len(window_sizes):
            raise ValueError("strides and window_sizes need one entry per block")
        self.featurizer = MPFFeatures(window_length=160)
        self.rotation_invariant_mlp = RotationInvariantMLP(
            num_channels, 6, (mlp_dim,), (-1, 0, 1), num_adjacent_cov
        )
        blocks = [
            ConformerBlock(dim, ffn_dim, kernel_size, s, num_heads, w, dropout)
            for s, w in zip(strides, window_sizes)
        ]
        reduction = TimeReduction(2)
        self.conformer = nn.Sequential(
            reduction,
            nn.Linear(2 * mlp_dim, dim),
            nn.Sequential(*blocks),
            nn.Linear(dim, num_classes),
            nn.LogSoftmax(dim=-1),
        )
        left, stride = reduction.extra_left_context, reduction.stride
        for block in blocks:
            left += block.extra_left_context * stride
            stride *= block.stride
        self.emission_slice = slice(left, -1, stride)  # in MPF frames, as the reference's `slice`
        self.left_context = self.featurizer.left_context + self.featurizer.stride * left
        self.stride = self.featurizer.stride * stride

    @property
    def blocks(self) -> nn.Sequential:
        return self.conformer[2]

    def output_length(self, n: int) -> int:
        t = self.featurizer.num_frames(n) // self.conformer[0].stride
        for block in self.blocks:
            t = block.output_length(t)
        return t

    def mlp_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Raw EMG (B, C, N) -> rotation-MLP output (B, K, mlp_dim) at 50 Hz."""
        return self.rotation_invariant_mlp(self.featurizer(x)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conformer(self.mlp_frames(x))
