"""Small random-weight models whose output layers are scaled so that events happen often.

Shared by the end-to-end event tests: ``build_scaled`` exports the models with
``emgd.models.build`` and returns the identical (scaled) torch networks for the offline side.
"""

from __future__ import annotations

import pytest
import torch

TASKS = ("discrete_gestures", "handwriting", "wrist")


def scale_outputs(task: str, net, gesture_gain: float = 1.0, handwriting_gain: float = 1.0):
    """Scale a freshly made random network's output layer in place (returns it)."""
    with torch.no_grad():
        if task == "discrete_gestures" and gesture_gain != 1.0:
            net.projection.weight.mul_(gesture_gain)
            net.projection.bias.mul_(gesture_gain)
        elif task == "handwriting" and handwriting_gain != 1.0:
            # The small random conformer's output barely moves over time (std ~0.02 around a
            # mean ~0.8 per feature), so argmax would be one label for ever. Centre the output
            # Linear on the features' mean over seeded noise and amplify the rest.
            feats = []
            hook = net.conformer[2].register_forward_hook(lambda m, i, o: feats.append(o))
            net(25.0 * torch.randn(1, 16, 30_000, generator=torch.Generator().manual_seed(0)))
            hook.remove()
            lin = net.conformer[3]
            lin.weight.mul_(handwriting_gain)
            lin.bias.copy_(-lin.weight @ feats[0][0].mean(0))
    return net


def build_scaled(out, seed: int, **gains: float) -> dict:
    """Export small scaled models into ``out``; the same torch networks, in eval mode."""
    build = pytest.importorskip("emgd.models.build")
    if not build.handwriting_available():
        pytest.skip("handwriting exporter missing")
    mp = pytest.MonkeyPatch()
    real = build.make_net
    mp.setattr(build, "make_net", lambda task, size="full", seed=0:
               scale_outputs(task, real(task, size, seed), **gains))
    try:
        build.build_models(out, None, seed=seed, size="small", scale=1.0, highpass_hz=0.0)
    finally:
        mp.undo()
    return {task: scale_outputs(task, build.make_net(task, "small", seed), **gains).eval()
            for task in TASKS}
