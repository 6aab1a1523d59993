"""``emgd models``: list, info, import (reference-layout checkpoints, tampered ones), build-random."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from emgd.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def user_dir(tmp_path, monkeypatch):
    """Keep the user model folder inside the test."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "emgd" / "models"


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("random")
    assert main(["models", "build-random", "--size", "small", "--seed", "1", "--out", str(out),
                 "--task", "discrete_gestures", "--task", "wrist"]) == 0
    return out


@pytest.mark.torch
def test_build_random_list_and_info(small_models, capsys):
    assert sorted(p.name for p in small_models.iterdir()) == [
        "discrete_gestures.native.npz", "discrete_gestures.onnx", "discrete_gestures.toml",
        "wrist.native.npz", "wrist.onnx", "wrist.toml"]
    capsys.readouterr()
    assert main(["models", "list", "--models", str(small_models)]) == 0
    listed = capsys.readouterr().out
    assert "discrete_gestures" in listed and "wrist" in listed and "random" in listed
    assert main(["models", "info", "wrist", "--models", str(small_models), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["check"] == "ok" and info["task"] == "wrist"
    assert info["provenance"]["seed"] == 1 and info["input"]["highpass_hz"] == 40.0
    assert main(["models", "info", str(small_models / "discrete_gestures.onnx")]) == 0
    text = capsys.readouterr().out
    assert "check      ok" in text
    assert "native     gestures_lstm kernel, weights discrete_gestures.native.npz" in text


@pytest.mark.torch
def test_build_random_refuses_to_overwrite(small_models, capsys):
    before = (small_models / "wrist.toml").read_bytes()
    assert main(["models", "build-random", "--size", "small", "--out", str(small_models),
                 "--task", "wrist"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (small_models / "wrist.toml").read_bytes() == before


@pytest.mark.torch
def test_info_reports_a_tampered_graph(small_models, tmp_path, capsys):
    for name in ("wrist.onnx", "wrist.toml"):
        (tmp_path / name).write_bytes((small_models / name).read_bytes())
    with open(tmp_path / "wrist.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["models", "info", str(tmp_path / "wrist.toml")]) == 1
    assert "sha256" in capsys.readouterr().out


def test_info_unknown_name(capsys, tmp_path):
    assert main(["models", "info", "nosuchmodel", "--models", str(tmp_path)]) == 1
    assert "no model named 'nosuchmodel'" in capsys.readouterr().err


def test_list_missing_folder(capsys, tmp_path):
    assert main(["models", "list", "--models", str(tmp_path / "absent")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_list_shows_invalid_cards(capsys, tmp_path):
    (tmp_path / "broken.toml").write_text("task = [\n")
    assert main(["models", "list", "--models", str(tmp_path)]) == 0
    assert "INVALID" in capsys.readouterr().out


def test_import_without_torch_names_the_extra(tmp_path):
    """A fresh interpreter where torch cannot be imported."""
    code = ("import sys; sys.modules['torch'] = None; from emgd.cli import main; "
            f"sys.exit(main(['models', 'import', 'x.ckpt', '--out', {str(tmp_path / 'o')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 1
    assert "pip install 'emgd[convert]'" in res.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- import


@pytest.fixture(scope="module")
def ckpt_tools():
    pytest.importorskip("torch")
    return pytest.importorskip("test_models_checkpoint")  # writes reference-layout checkpoints


@pytest.mark.torch
def test_import_reference_checkpoint(ckpt_tools, tmp_path, user_dir, capsys):
    import torch

    ckpt = tmp_path / "model_checkpoint.ckpt"
    net = ckpt_tools.write_checkpoint(ckpt, "wrist")
    assert main(["models", "import", str(ckpt), "--scale", "2.5"]) == 0
    assert sorted(p.name for p in user_dir.iterdir()) == ["wrist.native.npz", "wrist.onnx",
                                                          "wrist.toml"]
    capsys.readouterr()
    assert main(["models", "info", "wrist", "--json"]) == 0  # found in the user folder
    info = json.loads(capsys.readouterr().out)
    assert info["check"] == "ok"
    assert info["licence"] == "CC-BY-NC-4.0"
    assert info["input"]["scale"] == 2.5 and "9 q1" in info["input"]["scale_note"]
    assert info["provenance"]["source"] == "checkpoint"
    assert info["provenance"]["checkpoint"] == "model_checkpoint.ckpt"
    assert info["provenance"]["pytorch_lightning_version"] == "1.8.6"
    # the imported graph computes the checkpoint's network
    from emgd.decoders import load_decoder

    dec = load_decoder(user_dir / "wrist.toml")
    frames = np.random.default_rng(0).standard_normal((5, 6, 16, 16)).astype(np.float32)
    frames = (frames + frames.transpose(0, 1, 3, 2)) / 2
    dec.accept(frames)
    got = dec.step().values
    shifted = frames.copy()
    idx = np.arange(16)
    shifted[:, :, idx, idx] += np.float32(4 * np.log(2.5))  # the card's scale, in MPF terms
    with torch.no_grad():
        ref, _ = net.head_frames(torch.from_numpy(shifted[None]))
    np.testing.assert_allclose(got, ref[0].numpy(), rtol=0, atol=1e-5)


def _drop(key):
    return lambda sd, mods: sd.pop(key)


def _reshape(key):
    def mutate(sd, mods):
        sd[key] = sd[key][:-1].clone()
    return mutate


@pytest.mark.torch
@pytest.mark.parametrize("mutate,needle", [
    (_drop("network.linear_out.bias"), "missing keys: linear_out.bias"),
    (_reshape("network.lstm.weight_hh_l1"), "lstm.weight_hh_l1: shape"),
])
def test_tampered_checkpoint_writes_nothing(ckpt_tools, tmp_path, mutate, needle, capsys):
    ckpt = tmp_path / "model_checkpoint.ckpt"
    ckpt_tools.write_checkpoint(ckpt, "wrist", mutate=mutate)
    out = tmp_path / "out"
    assert main(["models", "import", str(ckpt), "--out", str(out)]) == 1
    assert needle in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.torch
def test_unexpected_network_class_writes_nothing(ckpt_tools, tmp_path, capsys):
    """Wrist weights, but hyper_parameters['network'] pickled as the gesture architecture."""
    extra = {}

    def mutate(sd, mods):
        extra["network"] = ckpt_tools.define(mods["generic_neuromotor_interface.networks"],
                                             "DiscreteGesturesArchitecture")

    ckpt = tmp_path / "model_checkpoint.ckpt"
    ckpt_tools.write_checkpoint(ckpt, "wrist", mutate=mutate, extra_hparams=extra)
    out = tmp_path / "out"
    assert main(["models", "import", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "DiscreteGesturesArchitecture" in err and "wrist" in err
    assert not out.exists()


@pytest.mark.torch
def test_wrong_task_writes_nothing(ckpt_tools, tmp_path, capsys):
    ckpt = tmp_path / "model_checkpoint.ckpt"
    ckpt_tools.write_checkpoint(ckpt, "wrist")
    out = tmp_path / "out"
    assert main(["models", "import", str(ckpt), "--task", "discrete_gestures",
                 "--out", str(out)]) == 1
    assert "discrete_gestures" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.torch
def test_not_a_checkpoint_writes_nothing(tmp_path, capsys):
    pytest.importorskip("torch")
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    assert main(["models", "import", str(bad), "--out", str(out)]) == 1
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_quantize_writes_an_int8_copy_with_its_delta(tmp_path):
    pytest.importorskip("torch")
    import subprocess
    import sys

    out = tmp_path / "m"
    run = [sys.executable, "-m", "emgd", "models"]
    built = subprocess.run(run + ["build-random", "--size", "small", "--task", "wrist",
                                  "--out", str(out)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr
    card = next(out.glob("*.toml"))
    q = subprocess.run(run + ["quantize", str(card)], capture_output=True, text=True,
                       timeout=600)
    assert q.returncode == 0, q.stderr
    assert "dynamic int8" in q.stdout and "quant_" in q.stdout
    from emgd.modelcard import load_card

    new = load_card(next(p for p in out.glob("*.toml") if p != card))
    assert "quantization" in new.provenance and new.name.endswith("-int8")
    assert load_card(card).native is not None
    assert new.native is None  # the int8 graph is the network: it runs in ONNX Runtime
    again = subprocess.run(run + ["quantize", str(card)], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 1 and "overwrite" in again.stderr
