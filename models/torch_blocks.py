"""PyTorch blocks of the reference handwriting conformer (``neuromotor-models.md`` §3.4-3.6).

Tensors are NTC (batch, time, channels). Module and child names mirror the reference so a
reference ``state_dict`` loads with ``strict=True``; children with no parameters (activations,
dropout, reshapes) sit at the same indices as in the reference so the numbering matches.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class TimeReduction(nn.Module):
    """Concatenate non-overlapping groups of ``stride`` frames: (N, T, C) -> (N, T // s, s*C).

    Output u is ``[x[s*u], ..., x[s*u + s - 1]]`` (pairs anchored at frame 0; a trailing
    incomplete group is dropped). ``extra_left_context = s - 1``.
    """

    def __init__(self, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.extra_left_context = stride - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        u = t // self.stride
        return x[:, : u * self.stride].reshape(n, u, self.stride * c)


class Residual(nn.Module):
    """``y = child(x) + weight * x[:, skip_start::skip_stride]``: the weight scales the skip."""

    def __init__(
        self, child: nn.Sequential, weight: float = 1.0, skip_start: int = 0, skip_stride: int = 1
    ) -> None:
        super().__init__()
        self.child = child
        self.weight = weight
        self.skip_start = skip_start
        self.skip_stride = skip_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x[:, self.skip_start :: self.skip_stride]
        return self.child(x) + self.weight * skip


class TimeConv1d(nn.Module):
    """Valid (unpadded) 1-D convolution on NTC tensors; the conv is ``net``, as in the reference."""

    def __init__(self, channels: int, kernel_size: int, stride: int, groups: int) -> None:
        super().__init__()
        self.net = nn.Conv1d(channels, channels, kernel_size, stride=stride, groups=groups)
        self.extra_left_context = kernel_size - 1
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.transpose(1, 2)).transpose(1, 2)


def warmup_mask(window_size: int) -> torch.Tensor:
    """``ones(W, W).triu(1).flip(1)`` as bool: row r blocks tokens 0 ... W-2-r (True = blocked)."""
    return torch.ones(window_size, window_size).triu(1).flip(1).bool()


class WindowedAttention(nn.Module):
    """Causal windowed multi-head attention with the reference's key/value layout (§3.5).

    Input and output are (N, T, 1, D). Each output t attends from the query ``z[t]`` over W
    key/value tokens built from the zero-padded window ``[z[t-W+1], ..., z[t]]`` (W x D, time
    ascending) **read as its transpose**: the (D, W) channel-by-time block reshaped row-major
    to (W, D). Token a therefore holds channel groups, not a time step. The first W-1 outputs
    of each call use row t of ``attn_mask`` (warm-up anchored at output index 0 of the call).

    ``op`` is an ``nn.MultiheadAttention`` that only holds the parameters (packed [q; k; v]
    ``in_proj`` and ``out_proj``); :meth:`attend` does the arithmetic so a streaming step
    can call it with its own cached windows.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.extra_left_context = 0
        self.stride = 1
        self.op = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.register_buffer("attn_mask", warmup_mask(window_size))

    @staticmethod
    def scrambled_tokens(windows: torch.Tensor) -> torch.Tensor:
        """(..., W, D) time-ascending windows -> (..., W, D) reference key/value tokens."""
        *lead, w, d = windows.shape
        return windows.transpose(-1, -2).reshape(*lead, w, d)

    def attend(
        self, query: torch.Tensor, tokens: torch.Tensor, blocked: torch.Tensor
    ) -> torch.Tensor:
        """query (N, T, D), tokens (N, T, W, D), blocked (T, W) bool -> (N, T, D)."""
        n, t, d = query.shape
        h = self.num_heads
        wq, wk, wv = self.op.in_proj_weight.chunk(3)
        bq, bk, bv = self.op.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq).reshape(n, t, h, d // h)
        k = F.linear(tokens, wk, bk).reshape(n, t, -1, h, d // h)
        v = F.linear(tokens, wv, bv).reshape(n, t, -1, h, d // h)
        scores = torch.einsum("nthe,ntwhe->nthw", q, k) / math.sqrt(d // h)
        scores = scores.masked_fill(blocked[None, :, None, :], float("-inf"))
        weights = F.dropout(scores.softmax(dim=-1), self.op.dropout, self.training)
        out = torch.einsum("nthw,ntwhe->nthe", weights, v).reshape(n, t, d)
        return self.op.out_proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _, d = x.shape
        w = self.window_size
        z = x.reshape(n, t, d)
        windows = F.pad(z, (0, 0, w - 1, 0)).unfold(1, w, 1)  # (N, T, D, W): win_t transposed
        tokens = windows.reshape(n, t, w, d)  # the scrambled layout, see scrambled_tokens
        rows = torch.arange(t, device=x.device).clamp(max=w - 1)
        return self.attend(z, tokens, self.attn_mask[rows]).reshape(n, t, 1, d)


def _feed_forward(dim: int, ffn_dim: int, dropout: float) -> Residual:
    child = nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, ffn_dim),
        nn.SiLU(),
        nn.Dropout(dropout),
        nn.Linear(ffn_dim, dim),
        nn.Dropout(dropout),
    )
    return Residual(child, weight=0.5)


class ConformerBlock(nn.Module):
    """One reference conformer block (§3.6); time length T -> floor((T - k) / s) + 1."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        kernel_size: int,
        stride: int,
        num_heads: int,
        window_size: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.extra_left_context = kernel_size - 1
        self.ff_block1 = _feed_forward(dim, ffn_dim, dropout)
        attn = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Unflatten(-1, (1, dim)),
            WindowedAttention(dim, num_heads, window_size, dropout),
            nn.Flatten(-2),
            nn.Dropout(dropout),
        )
        self.attn_block = Residual(attn)
        conv = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, 2 * dim),
            nn.GLU(dim=-1),
            TimeConv1d(dim, kernel_size, stride, groups=dim),
            nn.LayerNorm(dim),
            nn.SiLU(),
            nn.Linear(dim, dim),
            nn.Dropout(dropout),
        )
        self.conv_block = Residual(conv, skip_start=kernel_size - 1, skip_stride=stride)
        self.ff_block2 = _feed_forward(dim, ffn_dim, dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def output_length(self, t: int) -> int:
        return (t - self.kernel_size) // self.stride + 1 if t >= self.kernel_size else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ff_block1(x)
        x = self.attn_block(x)
        x = self.conv_block(x)
        x = self.ff_block2(x)
        return self.layer_norm(x)
