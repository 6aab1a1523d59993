"""The PyTorch reference networks against the facts of neuromotor-models.md §2, §3, §5.4."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from emgd.models import reference_layout as rl  # noqa: E402
from emgd.models.torch_blocks import ConformerBlock, TimeReduction, WindowedAttention  # noqa: E402
from emgd.models.torch_mpf import (  # noqa: E402
    MPFFeatures,
    RotationInvariantMLP,
    frequency_masks,
    vectorized_indices,
)
from emgd.models.torchnets import (  # noqa: E402
    DiscreteGesturesNet,
    HandwritingNet,
    ReinhardCompression,
    WristNet,
)

pytestmark = pytest.mark.torch

FULL = {"discrete_gestures": DiscreteGesturesNet, "wrist": WristNet, "handwriting": HandwritingNet}
PARAMS = {"discrete_gestures": 6_482_953, "wrist": 4_400_129, "handwriting": 1_021_284}
ENTRIES = {"discrete_gestures": 20, "wrist": 14, "handwriting": 473}

# §3.2, verbatim.
WRIST_INDICES = [
    0, 1, 2, 3, 13, 14, 15, 17, 18, 19, 20, 30, 31, 34, 35, 36, 37, 47, 51, 52, 53, 54, 68, 69,
    70, 71, 85, 86, 87, 88, 102, 103, 104, 105, 119, 120, 121, 122, 136, 137, 138, 139, 153, 154,
    155, 156, 170, 171, 172, 173, 187, 188, 189, 190, 204, 205, 206, 207, 221, 222, 223, 238, 239,
    255,
]


def tiny_gestures() -> DiscreteGesturesNet:
    return DiscreteGesturesNet(num_channels=4, conv_channels=8, lstm_hidden=6, lstm_layers=2)


def tiny_wrist() -> WristNet:
    return WristNet(num_channels=4, hidden_dims=(8,), lstm_hidden=6, lstm_layers=2,
                    num_adjacent_cov=1)


def tiny_handwriting() -> HandwritingNet:
    return HandwritingNet(num_channels=4, mlp_dim=8, dim=8, ffn_dim=16, num_heads=2,
                          strides=(1, 2), window_sizes=(4, 2), num_classes=5, num_adjacent_cov=2)


def emg(channels: int, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Broadband floor on every channel plus channels of different amplitude (runtime-facts)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, channels, n)) * (1.0 + 20.0 * rng.random((1, channels, 1)))
    return torch.from_numpy(x).to(dtype)


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return net.eval()


# --------------------------------------------------------------------------- layout, counts


@pytest.fixture(scope="module")
def full_nets():
    return {task: cls().eval() for task, cls in FULL.items()}


@pytest.mark.parametrize("task", rl.TASKS)
def test_full_size_parameter_count(full_nets, task):
    net = full_nets[task]
    assert sum(p.numel() for p in net.parameters()) == PARAMS[task]
    assert rl.parameter_count(rl.layout(task)) == PARAMS[task]


@pytest.mark.parametrize("task", rl.TASKS)
def test_state_dict_matches_reference_table(full_nets, task):
    table = rl.layout(task)
    assert len(table) == ENTRIES[task]
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
           for k, v in full_nets[task].state_dict().items()}
    assert got == table


@pytest.mark.parametrize("task", rl.TASKS)
def test_reference_named_state_dict_loads_strict(full_nets, task):
    gen = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
          for k, v in full_nets[task].state_dict().items()}
    fresh = FULL[task]()
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.state_dict()[next(iter(sd))], sd[next(iter(sd))])


def test_handwriting_bookkeeping(full_nets):
    hw = full_nets["handwriting"]
    assert hw.emission_slice == slice(491, -1, 8)
    assert (hw.left_context, hw.stride) == (19853, 320)
    assert (full_nets["wrist"].left_context, full_nets["wrist"].stride) == (253, 40)
    assert (DiscreteGesturesNet.left_context, DiscreteGesturesNet.stride) == (20, 10)


def test_attention_mask_buffer(full_nets):
    sd = full_nets["handwriting"].state_dict()
    for b, w in enumerate(rl.HW_WINDOWS):
        mask = sd[f"conformer.2.{b}.attn_block.child.2.attn_mask"]
        assert mask.dtype == torch.bool
        assert torch.equal(mask, torch.ones(w, w).triu(1).flip(1).bool())


# --------------------------------------------------------------------------- output lengths


@pytest.mark.parametrize("n", [21, 30, 31, 500, 1234])
def test_gestures_output_length(full_nets, n):
    with torch.no_grad():
        y = full_nets["discrete_gestures"](emg(16, n))
    assert y.shape == (1, 9, (n - 21) // 10 + 1)


@pytest.mark.parametrize("n", [254, 293, 294, 500, 1001])
def test_wrist_output_length(full_nets, n):
    with torch.no_grad():
        y = full_nets["wrist"](emg(16, n))
    assert y.shape == (1, 1, (n - 254) // 40 + 1)


@pytest.mark.parametrize("n", [19854, 20173, 20174, 21000])
def test_handwriting_output_length(full_nets, n):
    with torch.no_grad():
        y = full_nets["handwriting"](emg(16, n))
    assert y.shape == (1, (n - 19854) // 320 + 1, 100)
    assert torch.allclose(y.exp().sum(-1), torch.ones(()), atol=1e-5)


def test_output_length_formulas(full_nets):
    for n in list(range(19000, 23000, 37)) + [19853, 19854, 19854 + 319, 19854 + 320, 100_000]:
        assert full_nets["handwriting"].output_length(n) == max((n - 19854) // 320 + 1, 0)
        assert full_nets["wrist"].output_length(n) == (n - 254) // 40 + 1
        assert full_nets["discrete_gestures"].output_length(n) == (n - 21) // 10 + 1


@pytest.mark.parametrize(("task", "n"), [("wrist", 253), ("handwriting", 19853)])
def test_too_short_input_raises(full_nets, task, n):
    with pytest.raises((ValueError, RuntimeError)):
        full_nets[task](emg(16, n))


# --------------------------------------------------------------------------- MPF


def test_frequency_masks_match_band_table():
    masks = frequency_masks()
    assert masks.shape == (1, 1, 6, 33, 1, 1) and masks.dtype == torch.uint8
    bins = [np.flatnonzero(row).tolist() for row in masks.reshape(6, 33).numpy()]
    assert bins == [[1], [1, 2, 3], [4, 5, 6, 7], list(range(8, 13)),
                    list(range(13, 23)), list(range(23, 33))]


def test_window_is_symmetric_hann():
    w = MPFFeatures(200).window
    assert w[0] == 0 and w[63] == 0
    assert math.isclose(float(torch.linalg.vector_norm(w)), 4.860555648803711, rel_tol=1e-7)


@pytest.mark.parametrize("window_length", [160, 200])
def test_mpf_left_context(window_length):
    mpf = MPFFeatures(window_length)
    assert mpf.left_context == {160: 213, 200: 253}[window_length]
    assert mpf(emg(3, mpf.left_context + 1)).shape == (1, 6, 3, 3, 1)
    with pytest.raises(ValueError):
        mpf(emg(3, mpf.left_context))


def naive_mpf(x: np.ndarray, window_length: int) -> np.ndarray:
    """§2 step by step with explicit sums (float64), for one batch item: (C, N) -> (6, C, C, K)."""
    c, n = x.shape
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(64) / 63)
    g = np.sqrt(np.sum(w**2))
    n_stft = (n - 64) // 10 + 1
    dft = np.exp(-2j * np.pi * np.outer(np.arange(33), np.arange(64)) / 64)
    spec = np.stack([[dft @ (w * x[ch, 10 * t: 10 * t + 64]) / g for t in range(n_stft)]
                     for ch in range(c)])  # (C, T, 33)
    wn = window_length // 10
    k_frames = (n_stft - wn) // 4 + 1
    freqs = np.abs(np.fft.fftfreq(64, 1 / 2000)[:33])
    edges = [(0, 50), (30, 100), (100, 225), (225, 375), (375, 700), (700, 1000)]
    out = np.zeros((6, c, c, k_frames))
    for k in range(k_frames):
        y = spec[:, 4 * k: 4 * k + wn, :]  # (C, W, 33)
        power = np.abs(np.einsum("cwf,dwf->fcd", y, y.conj()) / wn) ** 2
        for b, (lo, hi) in enumerate(edges):
            sel = (freqs > lo) & (freqs <= hi)
            lam, vec = np.linalg.eigh(power[sel].mean(axis=0))
            with np.errstate(divide="ignore", invalid="ignore"):
                logs = np.nan_to_num(np.log(lam), nan=0.0, neginf=0.0)
            out[b, :, :, k] = (vec * logs) @ vec.T
    return out


@pytest.mark.parametrize("window_length", [160, 200])
def test_mpf_matches_naive_definition(window_length):
    x = emg(3, 380, seed=3, dtype=torch.float64)
    got = MPFFeatures(window_length)(x)[0].numpy()
    np.testing.assert_allclose(got, naive_mpf(x[0].numpy(), window_length), atol=1e-9, rtol=1e-9)


def test_mpf_dtype_follows_input_and_zero_input_gives_zero():
    mpf = MPFFeatures(200)
    assert mpf(emg(2, 300)).dtype == torch.float32
    assert mpf(emg(2, 300, dtype=torch.float64)).dtype == torch.float64
    assert torch.count_nonzero(mpf(torch.zeros(1, 2, 300))) == 0


# --------------------------------------------------------------------------- rotation MLP


def test_wrist_vectorized_indices_equal_document():
    assert vectorized_indices(16, 3) == WRIST_INDICES


def test_handwriting_vectorized_indices_are_full_upper_triangle():
    assert vectorized_indices(16, 8) == [i * 16 + j for i in range(16) for j in range(i, 16)]
    assert len(vectorized_indices(16, 8)) == 136


@pytest.mark.parametrize("channels", [1, 2, 5, 16])
def test_invalid_adjacent_cov(channels):
    vectorized_indices(channels, channels // 2)
    with pytest.raises(ValueError):
        vectorized_indices(channels, channels // 2 + 1)


def test_rotation_mlp_matches_rolls_then_vectorize():
    """§3.3 literally: roll by -1, 0, 1; vectorize; band-major; LeakyReLU per layer; mean."""
    torch.manual_seed(0)
    mlp = RotationInvariantMLP(16, 6, (7, 5), num_adjacent_cov=3).double().eval()
    m = torch.randn(2, 6, 16, 16, 4, dtype=torch.float64)
    m = m + m.transpose(2, 3)
    idx = torch.tensor(WRIST_INDICES)
    per_rotation = []
    for o in (-1, 0, 1):
        r = torch.roll(m, shifts=(o, o), dims=(2, 3)).permute(0, 4, 1, 2, 3)  # (B, K, F, C, C)
        h = r.reshape(2, 4, 6, 256)[..., idx].reshape(2, 4, 6 * 64)
        for layer in mlp.fully_connected_layers:
            h = torch.nn.functional.leaky_relu(layer(h), 0.01)
        per_rotation.append(h)
    expected = torch.stack(per_rotation).mean(0).transpose(1, 2)
    torch.testing.assert_close(mlp(m), expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- conformer quirks


def test_time_reduction_pairs_anchored_at_zero():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    y = TimeReduction(2)(x)
    assert y.shape == (2, 3, 6)
    assert torch.equal(y[:, 1], torch.cat([x[:, 2], x[:, 3]], dim=-1))


def test_residual_weights_skip_path_and_conv_residual_is_newest_input():
    block = randomize(ConformerBlock(8, 16, 8, 2, 2, 4, dropout=0.0).double())
    x = torch.randn(1, 20, 8, dtype=torch.float64)
    with torch.no_grad():
        block.ff_block1.child[4].weight.zero_()
        block.ff_block1.child[4].bias.zero_()
        torch.testing.assert_close(block.ff_block1(x), 0.5 * x)
        block.conv_block.child[6].weight.zero_()
        block.conv_block.child[6].bias.zero_()
        y = block.conv_block(x)
    assert y.shape[1] == (20 - 8) // 2 + 1 == block.output_length(20)
    torch.testing.assert_close(y, x[:, 7::2])


def reference_style_attention(att: WindowedAttention, x: torch.Tensor) -> torch.Tensor:
    """Straight from §3.5: explicit windows, kv = win.T read as (W, D), torch's own MHA forward."""
    n, t, _, d = x.shape
    w, h = att.window_size, att.num_heads
    z = torch.cat([torch.zeros(n, w - 1, d, dtype=x.dtype), x.reshape(n, t, d)], dim=1)
    wins = torch.stack([z[:, i: i + w] for i in range(t)], dim=1)  # (N, T, W, D)
    kv = wins.transpose(-1, -2).reshape(n * t, w, d)
    q = wins[:, :, -1:].reshape(n * t, 1, d)
    rows = att.attn_mask[torch.arange(t).clamp(max=w - 1)]  # (T, W)
    mask = rows.unsqueeze(0).expand(n, t, w).reshape(n * t, 1, 1, w).expand(n * t, h, 1, w)
    out, _ = att.op(q, kv, kv, attn_mask=mask.reshape(n * t * h, 1, w), need_weights=False)
    return out.reshape(n, t, 1, d)


@pytest.mark.parametrize("window", [4, 16])
def test_windowed_attention_matches_torch_mha_with_scrambled_kv(window):
    att = randomize(WindowedAttention(8, 2, window).double(), seed=window)
    x = torch.randn(2, 21, 1, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(att(x), reference_style_attention(att, x), rtol=0, atol=1e-12)


def test_scrambled_layout_differs_from_time_ordered_keys():
    att = randomize(WindowedAttention(8, 2, 4).double())
    x = torch.randn(1, 10, 1, 8, dtype=torch.float64)
    z = torch.nn.functional.pad(x.reshape(1, 10, 8), (0, 0, 3, 0))
    time_ordered = torch.stack([z[:, i: i + 4] for i in range(10)], dim=1)
    with torch.no_grad():
        rows = att.attn_mask[torch.arange(10).clamp(max=3)]
        plain = att.attend(x.reshape(1, 10, 8), time_ordered, rows)
        assert (att(x).reshape(1, 10, 8) - plain).abs().max() > 1e-3


def test_reinhard_compression():
    x = torch.tensor([-64.0, -32.0, 0.0, 32.0, 1e6])
    expected = torch.tensor([-64 * 64 / 96, -32.0, 0.0, 32.0, 64 * 1e6 / (32 + 1e6)])
    torch.testing.assert_close(ReinhardCompression()(x), expected)


# --------------------------------------------------------------------------- prefix consistency


@pytest.mark.parametrize(
    ("make", "n", "cut"),
    [(tiny_gestures, 400, [21, 57, 250]), (tiny_wrist, 900, [254, 400, 777]),
     (tiny_handwriting, 3200, [1374, 1533, 2500])],
)
def test_prefix_of_output_is_output_of_prefix(make, n, cut):
    net = randomize(make().double())
    x = emg(4, n, seed=5, dtype=torch.float64)
    with torch.no_grad():
        full = net(x)
        time_axis = 1 if isinstance(net, HandwritingNet) else 2
        for m in cut:
            part = net(x[:, :, :m])
            length = net.output_length(m)
            assert part.shape[time_axis] == length > 0
            torch.testing.assert_close(part, full.narrow(time_axis, 0, length), rtol=0, atol=1e-12)


def test_tiny_handwriting_lengths():
    net = tiny_handwriting().eval()
    assert (net.left_context, net.stride) == (213 + 40 * 29, 160)
    for n in (1373, 1374, 1533, 1534, 2000):
        expected = max((n - 1374) // 160 + 1, 0)
        assert net.output_length(n) == expected
        if expected:
            with torch.no_grad():
                assert net(emg(4, n)).shape == (1, expected, 5)


def test_mpf_uses_exact_hann_but_honours_a_different_loaded_window():
    mpf = MPFFeatures(200)
    x = emg(2, 254, dtype=torch.float64)
    base = mpf(x)
    with torch.no_grad():
        mpf.window.copy_(torch.hann_window(64, periodic=False, dtype=torch.float64).float())
    torch.testing.assert_close(mpf(x), base, rtol=0, atol=0)
    with torch.no_grad():
        mpf.window.fill_(1.0)
    assert (mpf(x) - base).abs().max() > 1e-3
