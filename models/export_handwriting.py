"""Streaming step graph for the handwriting network, exported to ONNX.

One call consumes one time-reduction frame (two MPF frames) and runs the rotation MLP, the
time reduction, the input Linear and all conformer blocks once, carrying every block's
caches as explicit state. It reuses the submodules of the offline
:class:`~emgd.models.torchnets.HandwritingNet` (same parameters, same code paths), and the
tests prove that streaming from zero state equals one offline pass from the same MPF frame 0.

ONNX I/O contract (batch 1, all shapes static; L = 15 blocks, D = 64, C = 16 channels for the
reference configuration; ``H = max(window) - 1`` = 15, ``K = kernel - 1`` = 7):

    inputs   x      (1, 2, 6, C, C) float32  MPF frames 2u and 2u+1, offline layout (F, C, C)
             attn   (L, 1, H, D)   float32   per block: its last H post-LayerNorm attention
                                              inputs, oldest first (a block with window W
                                              reads the newest W-1); initial zeros
             conv   (L, 1, K, D)   float32   per block: its last K GLU outputs, oldest first;
                                              initial zeros
             count  (L, 1)         int64     per block: input frames it has received since the
                                              reset; initial zeros
    outputs  y      (1, 1, 100)    float32   log-probabilities (LogSoftmax over the classes)
             valid  (1,)           bool      whether y is an emission; y is unspecified when not
             attn_next, conv_next, count_next: same shapes and dtypes, feed back as the next
                                              call's attn, conv, count

Names and order: inputs ``x, attn, conv, count``; outputs ``y, valid, attn_next, conv_next,
count_next`` (``valid`` sits right after ``y``; the rest follows :mod:`.export`'s convention).
:func:`handwriting_initial_state` returns the initial state (all zeros).

Timing. Count MPF frames from the reset point (frame 0 = the first frame fed after a reset).
Call u gets frames 2u and 2u+1 and returns ``valid`` true exactly when ``2u + 1 = 491 + 8i``
for some i >= 0; y is then emission i, which ends at MPF frame 491 + 8i, i.e. at sample
19853 + 320 i counted from the sample where the MPF stream starts (MPF frame k ends at sample
213 + 40 k). So calls 245, 249, 253, ... (every 4th call, one emission per 320 samples) emit,
and after K MPF frames the stream has emitted ``max(floor((K - 484) / 8), 0)`` emissions, the
offline forward's count (the offline forward raises below K = 492; the stream just emits
nothing yet). A reset at MPF frame R of a longer stream moves the origin to its sample 40 R. The caller owns the pairing: MPF frames arrive one at a time at
50 Hz, the caller buffers an odd frame until its partner arrives (pairs are anchored at frame
0 after each reset) and drops a pending frame when it resets the state. Resetting means
feeding :func:`handwriting_initial_state` again; the outputs are then those of a fresh offline
pass starting at the reset frame (including the reference's per-pass warm-up).

Design. One call per time-reduction frame is the finest granularity the network allows, so
an emission is out on the call that delivers its last MPF frame (no added latency). The
per-block caches are stacked into three tensors rather than 45 (fewer inputs to bind per
call; blocks with a smaller window read the newest W-1 rows of the shared history). The
attention caches hold post-LayerNorm *inputs*, not keys/values: the reference's key/value
tokens mix all W time steps per token (``neuromotor-models.md`` §3.5), so they are rebuilt
from the window on every call.

Every call computes all blocks; a block that receives no input in this call (blocks after a
stride-2 block run at 1/2 and 1/4 rate, and every block's output starts 7 input frames late)
has its results discarded by ``Where`` on its validity flag, and its caches and counter are
left unchanged. The counters never saturate (int64: no overflow in practice). Measured
alternative, not adopted: skipping blocks 5-14 with ONNX ``If`` (``torch.cond``, dynamo
exporter) gave identical outputs at 0.79 ms instead of 1.12 ms p50 per call (ORT, 1 thread),
but its export took 43 s and needs the dynamo exporter; at 25 calls/s the saving is 0.8 % of
a core.

Export uses the legacy exporter (``dynamo=False``, opset 17), as :mod:`.export` does; the step
graph has no ``Unfold`` (the offline graph's obstacle), so it exports. Every exporter call is
followed by ``.eval()`` (a failed export can leave the module in training mode).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .export import _export
from .torch_blocks import ConformerBlock, WindowedAttention
from .torchnets import HandwritingNet

STATE_NAMES = ("attn", "conv", "count")
FRAMES_PER_CALL = 2  # MPF frames per time-reduction frame


def _block_step(
    block: ConformerBlock,
    x: torch.Tensor,
    valid: torch.Tensor,
    attn: torch.Tensor,
    conv: torch.Tensor,
    count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One input frame through one block.

    x (1, 1, D); valid (1,) bool: whether x is a real input frame of this block; attn (1, H, D);
    conv (1, K, D); count (1,) int64. Returns (output, output valid, attn, conv, count) next.
    """
    x = block.ff_block1(x)

    attn_seq = block.attn_block.child  # LN, Unflatten, WindowedAttention, Flatten, Dropout
    mha: WindowedAttention = attn_seq[2]
    w = mha.window_size
    z = attn_seq[0](x)
    history = torch.cat([attn, z], dim=1)  # (1, H + 1, D), time ascending
    tokens = mha.scrambled_tokens(history[:, -w:])[:, None]  # (1, 1, W, D)
    blocked = (torch.arange(w, device=x.device) < (w - 1) - count).reshape(1, w)  # warm-up
    x = attn_seq[4](mha.attend(z, tokens, blocked)) + block.attn_block.weight * x

    conv_seq = block.conv_block.child  # LN, Linear, GLU, TimeConv1d, LN, SiLU, Linear, Dropout
    taps = torch.cat([conv, conv_seq[2](conv_seq[1](conv_seq[0](x)))], dim=1)  # (1, k, D)
    y = conv_seq[3](taps)  # exactly one output for k inputs, whatever the stride
    for layer in conv_seq[4:]:
        y = layer(y)
    x = y + block.conv_block.weight * x  # the residual is the newest input
    x = block.layer_norm(block.ff_block2(x))

    lag = block.kernel_size - 1
    ready = count >= lag
    if block.stride > 1:
        ready = ready & ((count - lag) % block.stride == 0)
    keep = valid.reshape(1, 1, 1)
    attn_next = torch.where(keep, history[:, 1:], attn)
    conv_next = torch.where(keep, taps[:, 1:], conv)
    return x, valid & ready, attn_next, conv_next, count + valid.to(count.dtype)


class HandwritingStep(nn.Module):
    """One streaming step of :class:`HandwritingNet` from MPF frames (module docstring)."""

    def __init__(self, net: HandwritingNet) -> None:
        super().__init__()
        if net.conformer[0].stride != FRAMES_PER_CALL:
            raise ValueError(f"time reduction stride must be {FRAMES_PER_CALL}")
        self.net = net

    def forward(
        self, x: torch.Tensor, attn: torch.Tensor, conv: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        reduction, linear_in, blocks, linear_out, log_softmax = self.net.conformer
        h = linear_in(reduction(self.net.rotation_invariant_mlp.forward_frames(x)))  # (1, 1, D)
        valid = torch.ones(1, dtype=torch.bool, device=x.device)
        attn_next, conv_next, count_next = [], [], []
        for b, block in enumerate(blocks):
            h, valid, a, c, n = _block_step(block, h, valid, attn[b], conv[b], count[b])
            attn_next.append(a)
            conv_next.append(c)
            count_next.append(n)
        y = log_softmax(linear_out(h))
        return (
            y,
            valid,
            torch.stack(attn_next),
            torch.stack(conv_next),
            torch.stack(count_next),
        )


def handwriting_state_shapes(net: HandwritingNet) -> dict[str, tuple[tuple[int, ...], str]]:
    """State name -> (shape, numpy dtype name), in the ONNX input order."""
    blocks = list(net.blocks)
    dim = net.conformer[1].out_features
    history = max(b.attn_block.child[2].window_size for b in blocks) - 1
    kernels = {b.kernel_size for b in blocks}
    if len(kernels) != 1:
        raise ValueError(f"all blocks need the same conv kernel size, got {sorted(kernels)}")
    lag = kernels.pop() - 1
    n = len(blocks)
    return {
        "attn": ((n, 1, history, dim), "float32"),
        "conv": ((n, 1, lag, dim), "float32"),
        "count": ((n, 1), "int64"),
    }


def handwriting_initial_state(net: HandwritingNet) -> dict[str, np.ndarray]:
    """The state at a (re)start: all zeros. Feeding it reproduces a fresh offline pass."""
    return {
        name: np.zeros(shape, dtype)
        for name, (shape, dtype) in handwriting_state_shapes(net).items()
    }


def export_handwriting_step(net: HandwritingNet, path: str | PathLike[str]) -> Path:
    """Export :class:`HandwritingStep` to one self-contained ONNX file (weights embedded)."""
    channels = net.rotation_invariant_mlp.num_channels
    x = torch.zeros(1, FRAMES_PER_CALL, 6, channels, channels)
    state = handwriting_initial_state(net)
    # Static shapes; the attention scale sqrt(D / heads) is traced as a constant.
    return _export(HandwritingStep(net), x, {n: state[n] for n in STATE_NAMES}, path,
                   outputs=("y", "valid"), dynamic=False,
                   quiet_modules=(r"emgd\.models\.torch_blocks",))
