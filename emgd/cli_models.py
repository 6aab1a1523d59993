"""``emgd models``: list, inspect, import and build decoder models (ONNX graph + model card).

    emgd models list [--models DIR]
    emgd models info NAME|PATH [--models DIR] [--json]
    emgd models import CHECKPOINT [--task T] [--scale S] [--highpass HZ] [--out DIR] [--force]
    emgd models build-random [--task T ...] [--size full|small] [--seed N] [--out DIR] [--force]

Models are found in the package's shipped folder (``emgd/models/``), in the user folder
(``$XDG_DATA_HOME/emgd/models``, by default ``~/.local/share/emgd/models``, where ``import``
writes) and in every ``--models DIR``. ``import`` and ``build-random`` need the ``convert``
extra (PyTorch); without it they fail with a message naming ``pip install 'emgd[convert]'``.
They build everything in a temporary folder and move it into place at the end, so an error
writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from emgd.errors import MissingDependency, ModelError

TASKS = ("discrete_gestures", "wrist", "handwriting")
CONVERT_HINT = "pip install 'emgd[convert]'"

EPILOG = """\
examples:
  emgd models list                                  shipped and imported models
  emgd models info wrist                            a card, checked against its graph
  emgd models import wrist/model_checkpoint.ckpt    convert a published checkpoint
  emgd models import ckpt --scale 1e6               if the recordings were in volts
  emgd models build-random --size small --out /tmp/m   random weights (tests, benchmarks)
  emgd models quantize wrist                        an int8 copy, with its measured delta

The scale is the factor from the band's µV to the units the network was trained on
(network input = scale × µV). The reference data's units are not documented (see
models/README.md); 1.0 assumes they are µV.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, inspect, import and build decoder models",
                       description="Decoder models: an ONNX graph plus its model card (TOML).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    q = cmds.add_parser("list", help="models in the model folders")
    q.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="also look in DIR (repeatable)")
    q.set_defaults(func=cmd_list)

    q = cmds.add_parser("info", help="show a model card and check it against its graph")
    q.add_argument("model", metavar="NAME|PATH", help="a model name or a card/ONNX path")
    q.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="also look in DIR (repeatable)")
    q.add_argument("--json", action="store_true", help="print the card as JSON")
    q.set_defaults(func=cmd_info)

    q = cmds.add_parser("import", help="convert a published checkpoint (needs emgd[convert])")
    q.add_argument("checkpoint", metavar="CHECKPOINT", help="model_checkpoint.ckpt")
    q.add_argument("--task", choices=TASKS, help="expected task (default: detected)")
    q.add_argument("--scale", type=float, default=1.0,
                   help="network input = SCALE × µV (default 1.0: the data is taken as µV)")
    q.add_argument("--highpass", type=float, default=40.0, metavar="HZ",
                   help="causal high-pass the runtime applies first (default 40, as the "
                        "reference data was filtered; 0 = off)")
    q.add_argument("--out", metavar="DIR", help=f"output folder (default: {user_models_dir()})")
    q.add_argument("--force", action="store_true", help="replace existing files")
    q.set_defaults(func=cmd_import)

    q = cmds.add_parser("quantize", help="write a dynamic-int8 copy of a model and measure "
                                         "its accuracy delta (needs emgd[convert])")
    q.add_argument("model", metavar="NAME|PATH", help="a model name or a card/ONNX path")
    q.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="also look in DIR (repeatable)")
    q.add_argument("--out", metavar="DIR",
                   help="output folder (default: the model's own folder)")
    q.add_argument("--force", action="store_true", help="replace existing files")
    q.set_defaults(func=cmd_quantize)

    q = cmds.add_parser("build-random", help="random-weight models for tests and benchmarks "
                                             "(needs emgd[convert])")
    q.add_argument("--task", action="append", choices=TASKS, dest="tasks",
                   help="task to build (repeatable; default: all)")
    q.add_argument("--size", choices=("full", "small"), default="full")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--highpass", type=float, default=40.0, metavar="HZ")
    q.add_argument("--out", metavar="DIR", default="emgd-random-models",
                   help="output folder (default: ./emgd-random-models)")
    q.add_argument("--force", action="store_true", help="replace existing files")
    q.set_defaults(func=cmd_build_random)


# --------------------------------------------------------------------------- folders


def shipped_models_dir() -> Path | None:
    spec = importlib.util.find_spec("emgd.models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def user_models_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return Path(base) / "emgd" / "models"


def model_dirs(extra: list[str]) -> list[tuple[str, Path]]:
    dirs = [("shipped", shipped_models_dir()), ("user", user_models_dir())]
    dirs += [("--models", Path(d)) for d in extra]
    return [(kind, d) for kind, d in dirs if d is not None]


def find_cards(extra: list[str]) -> list[tuple[str, Path]]:
    out = []
    for kind, d in model_dirs(extra):
        if kind == "--models" and not d.is_dir():
            raise ModelError(f"--models {d}: no such folder")
        if d.is_dir():
            out += [(kind, p) for p in sorted(d.glob("*.toml"))]
    return out


def resolve(model: str, extra: list[str]) -> Path:
    """A card path from a name, a card path or an ONNX path."""
    path = Path(model)
    if path.suffix in (".toml", ".onnx") and path.exists():
        return path.with_suffix(".toml") if path.suffix == ".onnx" else path
    from emgd.modelcard import load_card

    matches = []
    for _, card_path in find_cards(extra):
        try:
            if load_card(card_path).name == model or card_path.stem == model:
                matches.append(card_path)
        except ModelError:
            if card_path.stem == model:
                matches.append(card_path)
    if not matches:
        raise ModelError(f"no model named {model!r} in "
                         f"{', '.join(str(d) for _, d in model_dirs(extra))}; "
                         "'emgd models list' shows what there is")
    return matches[-1]  # later folders (user, --models) take precedence over shipped


# --------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    from emgd.modelcard import load_card

    cards = find_cards(args.models)
    if not cards:
        print("no models found in " + ", ".join(str(d) for _, d in model_dirs(args.models)))
        return 0
    for kind, path in cards:
        try:
            card = load_card(path)
        except ModelError as exc:
            print(f"{path.stem:<20} INVALID  {exc}")
            continue
        source = card.provenance.get("source", "?")
        print(f"{card.name:<20} {card.task:<18} {source:<11} {card.licence:<14.14} "
              f"[{kind}] {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from emgd.decoders import load_decoder
    from emgd.modelcard import card_to_dict, load_card

    path = resolve(args.model, args.models)
    card = load_card(path)
    problem = None
    try:
        load_decoder(path)
        if card.native is not None:  # the sidecar, and the kernel against the graph
            load_decoder(path, backend="native-int16")
    except ModelError as exc:
        problem = str(exc)
    if args.json:
        data: dict[str, Any] = card_to_dict(card)
        data["card_path"] = str(path)
        data["check"] = problem or "ok"
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        _print_card(card, path)
        ok = "ok: card matches the graph and its sha256" + (
            "; the native kernel matches the graph" if card.native is not None else "")
        print(f"check      {ok if not problem else ''}{problem or ''}")
    return 1 if problem else 0


def _print_card(card: Any, path: Path) -> None:
    inp, t, o = card.input, card.timing, card.output
    kind = "raw EMG" if inp.kind == "emg" else f"MPF frames (W = {inp.mpf_window})"
    hp = f"{inp.highpass_hz:g} Hz (order {inp.highpass_order})" if inp.highpass_hz else "off"
    labels = ", ".join(o.labels[:10]) + (f", … ({len(o.labels)})" if len(o.labels) > 10 else "")
    rows = [
        ("card", str(path)),
        ("name", f"{card.name} ({card.task})"),
        ("about", card.description),
        ("licence", card.licence),
        ("graph", f"{card.onnx_path} sha256 {card.model.sha256[:16]}…"),
        ("input", (f"{kind}, {inp.unit} rows per step{' (fixed)' if inp.fixed else ''}, "
                   f"{inp.channels} channels")),
        ("scale", (f"network input = {inp.scale:g} × {inp.units}"
                   + (f"  ({inp.scale_note})" if inp.scale_note else ""))),
        ("high-pass", hp),
        ("timing", (f"hop {t.hop} samples, left context {t.left_context}, "
                    f"{t.output_rate_hz:g} Hz")),
        ("output", f"{o.kind}: {labels}" + (f"; blank {o.blank}" if o.blank is not None else "")),
        ("state", ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in card.states)),
        ("events", ", ".join(f"{k}={v}" for k, v in card.events.items()) or "-"),
        ("native", _native_line(card)),
        ("provenance", ", ".join(f"{k}={v}" for k, v in card.provenance.items())),
    ]
    for key, value in rows:
        print(f"{key:<10} {value}")


def _native_line(card: Any) -> str:
    n = card.native
    if n is None:
        return "- (runs in ONNX Runtime only)"
    same = {True: "events identical", False: "events CHANGED", None: ""}[n.int16_events_identical]
    delta = (f"; int16 rows vs float32: max |Δ| {n.int16_max_abs_delta:g}"
             f"{', ' + same if same else ''}" if n.int16_max_abs_delta is not None else "")
    return f"{n.kernel} kernel, weights {n.file} sha256 {n.sha256[:16]}…{delta}"


def cmd_import(args: argparse.Namespace) -> int:
    build = _convert_module()
    out = Path(args.out) if args.out else user_models_dir()
    built = build.build_models(out, args.task, checkpoint=args.checkpoint, scale=args.scale,
                               highpass_hz=args.highpass, force=args.force)
    for b in built:
        extra = f" + {b.native.name}" if b.native is not None else ""
        print(f"imported {b.task}: {b.card} + {b.onnx.name}{extra} (scale {args.scale:g}, "
              f"high-pass {args.highpass:g} Hz)")
    return 0


def cmd_build_random(args: argparse.Namespace) -> int:
    build = _convert_module()
    built = build.build_models(args.out, args.tasks, seed=args.seed, size=args.size,
                               highpass_hz=args.highpass, force=args.force)
    for b in built:
        print(f"built {b.task} ({args.size}, seed {args.seed}): {b.card}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("onnx") is None:
        raise MissingDependency(f"quantising needs the onnx package: {CONVERT_HINT}")
    from emgd.modelcard import load_card
    from emgd.models.quantize import quantize_model

    card_path = resolve(args.model, args.models)
    out = Path(args.out) if args.out else card_path.parent
    new = quantize_model(card_path, out, force=args.force)
    prov = load_card(new).provenance
    print(f"wrote {new} ({prov.get('quantization')})")
    for key in sorted(k for k in prov if k.startswith("quant_")):
        print(f"  {key} = {prov[key]}")
    print("int8 changes outputs: use it only where the card says the events are identical "
          "on data you trust (see models/README.md)")
    return 0


def _convert_module() -> Any:
    """``emgd.models.build``, or MissingDependency naming the extra to install."""
    for name in ("torch", "onnx"):
        try:
            __import__(name)
        except ImportError as exc:
            raise MissingDependency(
                f"this command converts models with PyTorch and needs the convert extra "
                f"({name} is not installed): {CONVERT_HINT}") from exc
    return importlib.import_module("emgd.models.build")
