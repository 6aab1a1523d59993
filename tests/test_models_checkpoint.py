"""Importing reference-layout Lightning checkpoints whose classes are absent at load time.

Each test writes a checkpoint the way the reference does (§5.3): top-level Lightning keys,
``network.``-prefixed weights, and ``hyper_parameters`` holding pickled instances of classes
from throwaway modules registered in ``sys.modules`` as ``generic_neuromotor_interface.*``,
``omegaconf.*`` and ``torchmetrics.*`` while saving and removed before loading.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")

from emgd.errors import ModelError  # noqa: E402
from emgd.models import reference_layout as rl  # noqa: E402
from emgd.models.checkpoint import import_checkpoint  # noqa: E402
from emgd.models.stub_pickle import Stub  # noqa: E402
from emgd.models.torchnets import DiscreteGesturesNet, HandwritingNet, WristNet  # noqa: E402

pytestmark = pytest.mark.torch

NETS = {"discrete_gestures": DiscreteGesturesNet, "wrist": WristNet, "handwriting": HandwritingNet}
ARCH = {"discrete_gestures": "DiscreteGesturesArchitecture", "wrist": "WristArchitecture",
        "handwriting": "HandwritingArchitecture"}
FOREIGN = ("generic_neuromotor_interface", "generic_neuromotor_interface.networks",
           "generic_neuromotor_interface.handwriting_utils", "omegaconf", "omegaconf.listconfig",
           "torchmetrics", "torchmetrics.classification")


class _Absent:
    """Marker for a module name that was not in sys.modules."""


@contextlib.contextmanager
def foreign_modules():
    """Throwaway stand-ins for the reference package and its dependencies, only while saving."""
    saved = {name: sys.modules.get(name, _Absent) for name in FOREIGN}
    mods = {name: types.ModuleType(name) for name in FOREIGN}
    sys.modules.update(mods)
    try:
        yield mods
    finally:
        for name, old in saved.items():
            if old is _Absent:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def relabel(obj, module: types.ModuleType, name: str):
    """Make obj an instance of a class `module.name` (a subclass of its own class)."""
    cls = type(name, (type(obj),), {"__module__": module.__name__, "__qualname__": name})
    setattr(module, name, cls)
    obj.__class__ = cls
    return obj


def define(module: types.ModuleType, name: str, **attrs):
    cls = type(name, (), {"__module__": module.__name__, "__qualname__": name})
    setattr(module, name, cls)
    obj = cls()
    obj.__dict__.update(attrs)
    return obj


class Evil:
    """Pickles as a call to os.system; the stub unpickler must never run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def write_checkpoint(path, task, *, mutate=None, extra_hparams=None, legacy=False):
    """Save a checkpoint in the reference layout; `mutate(state_dict, mods)` tampers with it."""
    torch.manual_seed(0)
    net = NETS[task]().eval()
    with foreign_modules() as mods:
        nets = mods["generic_neuromotor_interface.networks"]
        if task != "discrete_gestures":
            featurizer = net.mpf_featurizer if task == "wrist" else net.featurizer
            relabel(featurizer, nets, "MultivariatePowerFrequencyFeatures")
            relabel(net.rotation_invariant_mlp, nets, "RotationInvariantMPFMLP")
        relabel(net, nets, ARCH[task])
        if task == "handwriting":
            net.slice = slice(491, -1, 8)  # the reference network carries this attribute
        state_dict = OrderedDict((f"network.{k}", v.clone()) for k, v in net.state_dict().items())
        if mutate is not None:
            mutate(state_dict, mods)
        hparams = {
            "network": net,
            "optimizer": functools.partial(torch.optim.Adam, lr=1e-3, weight_decay=0),
            "metric": define(
                mods["torchmetrics.classification"], "MulticlassAccuracy", num_classes=9
            ),
            "config": define(mods["omegaconf.listconfig"], "ListConfig", content=[1, 2]),
        }
        if task == "handwriting":
            charset = define(mods["generic_neuromotor_interface.handwriting_utils"], "CharacterSet")
            hparams["decoder"] = define(mods["generic_neuromotor_interface.handwriting_utils"],
                                        "CTCGreedyDecoder", charset=charset, prev_label=99)
        hparams.update(extra_hparams or {})
        ckpt = {
            "epoch": 3,
            "global_step": 1200,
            "pytorch-lightning_version": "1.8.6",
            "state_dict": state_dict,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
            "callbacks": {
                "ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.5)}
            },
            "optimizer_states": [
                {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3}]}
            ],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": hparams,
        }
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    assert "generic_neuromotor_interface" not in sys.modules
    return net


@pytest.mark.parametrize("task", rl.TASKS)
def test_import_round_trip(tmp_path, task):
    path = tmp_path / "model_checkpoint.ckpt"
    saved = write_checkpoint(path, task)
    got_task, state_dict, summary = import_checkpoint(path)
    assert got_task == task
    assert list(state_dict) == list(rl.layout(task))
    fresh = NETS[task]()
    fresh.load_state_dict(state_dict, strict=True)
    for k, v in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert summary["pytorch-lightning_version"] == "1.8.6"
    assert summary["network_class"] == f"generic_neuromotor_interface.networks.{ARCH[task]}"
    assert summary["hyper_parameters"]["optimizer"]["class"] == "functools.partial"
    assert "torch.optim.adam.Adam" in str(summary["hyper_parameters"]["optimizer"])
    assert summary["hyper_parameters"]["metric"]["class"].startswith("torchmetrics.")


@pytest.mark.filterwarnings("ignore:Couldn.t retrieve source code")
def test_legacy_serialization_format(tmp_path):
    path = tmp_path / "legacy.ckpt"
    write_checkpoint(path, "wrist", legacy=True)
    assert import_checkpoint(path).task == "wrist"


def test_summary_shows_network_attributes(tmp_path):
    path = tmp_path / "hw.ckpt"
    write_checkpoint(path, "handwriting")
    imported = import_checkpoint(path, task="handwriting")
    net = imported.summary["network"]
    assert net["attributes"]["slice"] == slice(491, -1, 8)
    assert net["modules"]["featurizer"]["class"].endswith("MultivariatePowerFrequencyFeatures")
    assert net["modules"]["featurizer"]["attributes"]["left_context"] == 213
    assert imported.summary["hyper_parameters"]["decoder"]["attributes"]["prev_label"] == 99


def test_pickled_callables_are_never_called(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    write_checkpoint(path, "wrist", extra_hparams={"payload": Evil(marker)})
    imported = import_checkpoint(path)
    assert not marker.exists()
    assert imported.summary["hyper_parameters"]["payload"]["class"] in ("posix.system", "nt.system")


def _drop(key):
    return lambda sd, mods: sd.pop(f"network.{key}")


def _add(key):
    return lambda sd, mods: sd.__setitem__(f"network.{key}", torch.zeros(3))


def _reshape(key, shape):
    return lambda sd, mods: sd.__setitem__(f"network.{key}", torch.zeros(shape))


def _foreign_object(key):
    def mutate(sd, mods):
        sd[f"network.{key}"] = define(mods["generic_neuromotor_interface.networks"], "Sneaky")
    return mutate


def _set(key, value):
    return lambda sd, mods: sd.__setitem__(f"network.{key}", value)


@pytest.mark.parametrize(
    ("task", "mutate", "needle"),
    [
        ("wrist", _drop("linear_out.bias"), "missing keys: linear_out.bias"),
        ("wrist", _add("extra.weight"), "unexpected keys: extra.weight"),
        ("wrist", _reshape("lstm.weight_ih_l0", (2048, 511)),
         "lstm.weight_ih_l0: shape (2048, 511), expected (2048, 512)"),
        ("wrist", _foreign_object("linear_out.weight"),
         "linear_out.weight: expected a tensor, found a stub of "
         "generic_neuromotor_interface.networks.Sneaky"),
        ("wrist", _set("mpf_featurizer.freq_masks", torch.ones(1, 1, 6, 33, 1, 1)),
         "mpf_featurizer.freq_masks: dtype torch.float32, expected uint8"),
        ("wrist", _set("linear_out.bias", torch.tensor([float("nan")])),
         "linear_out.bias: contains NaN"),
        ("handwriting",
         _set("conformer.2.3.attn_block.child.2.attn_mask", torch.zeros(16, 16, dtype=torch.bool)),
         "conformer.2.3.attn_block.child.2.attn_mask: constant buffer differs"),
        ("discrete_gestures", _set("projection.weight", torch.zeros(10, 512)),
         "projection.weight: shape (10, 512), expected (9, 512)"),
    ],
)
def test_tampered_checkpoints_are_refused(tmp_path, task, mutate, needle):
    path = tmp_path / "bad.ckpt"
    write_checkpoint(path, task, mutate=mutate)
    with pytest.raises(ModelError, match=None) as info:
        import_checkpoint(path)
    assert needle in str(info.value)


def test_wrong_task_argument_names_the_keys(tmp_path):
    path = tmp_path / "wrist.ckpt"
    write_checkpoint(path, "wrist")
    needle = "missing keys: conformer.1.bias.*unexpected keys: linear_out.bias"
    with pytest.raises(ModelError, match=needle):
        import_checkpoint(path, task="handwriting")


def test_key_outside_network_prefix_is_refused(tmp_path):
    path = tmp_path / "loss.ckpt"
    write_checkpoint(path, "wrist", mutate=lambda sd, mods: sd.__setitem__("loss.w", torch.ones(1)))
    with pytest.raises(ModelError, match="outside 'network.': loss.w"):
        import_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"this is not a checkpoint\n" * 10, "not a readable PyTorch checkpoint"),
        (b"", "not a readable PyTorch checkpoint"),
    ],
)
def test_not_a_checkpoint(tmp_path, content, needle):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=needle):
        import_checkpoint(path)


def test_other_torch_files_are_refused(tmp_path):
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listing)
    with pytest.raises(ModelError, match="a checkpoint is a dict, this file holds list"):
        import_checkpoint(listing)
    bare = tmp_path / "bare.pt"
    torch.save(WristNet().state_dict(), bare)
    with pytest.raises(ModelError, match="no 'state_dict'"):
        import_checkpoint(bare)
    with pytest.raises(ModelError, match="not found"):
        import_checkpoint(tmp_path / "absent.ckpt")


def test_unknown_key_set_needs_a_task(tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"network.something": torch.zeros(1)}}, path)
    with pytest.raises(ModelError, match="cannot tell the task"):
        import_checkpoint(path)


def test_stub_records_what_it_was_given():
    import io
    import pickle

    from emgd.models import stub_pickle

    with foreign_modules() as mods:
        obj = define(mods["omegaconf"], "DictConfig", answer=42)
        blob = pickle.dumps({"cfg": obj, "part": functools.partial(max, 1, key=abs)}, protocol=2)
    loaded = stub_pickle.load(io.BytesIO(blob))
    assert isinstance(loaded["cfg"], Stub) and loaded["cfg"].answer == 42
    assert type(loaded["cfg"]).stub_origin() == "omegaconf.DictConfig"
    part = loaded["part"]
    assert type(part).stub_origin() == "functools.partial"
    assert part._stub_args[0].stub_origin() == "builtins.max"
