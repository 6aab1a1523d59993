"""The one-way data flow, enforced: which emgd modules may import which.

- drivers import nothing of the pipeline, features, decoders, publisher or CLI;
- features and decoders import no drivers, sockets (zmq) or CLI;
- only the CLI configures logging; torch only under emgd.models conversion code;
- bleak and pyserial only in their transport modules; no import cycles in the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"emgd": "emgd", "drivers": "emgd.drivers", "models": "emgd.models"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports_of(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = set()
    for node in ast.walk(tree):  # imports only for type checkers are not runtime edges
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


MODULES = modules()
GRAPH = {m: imports_of(p, m) for m, p in MODULES.items()}


def _hits(module: str, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(i for i in GRAPH[module]
                  if any(i == p or i.startswith(p + ".") for p in prefixes))


PIPELINE_SIDE = ("emgd.pipeline", "emgd.daemon", "emgd.publisher", "emgd.cli", "emgd.client",
                 "emgd.decoders", "emgd.detection", "emgd.mpf", "emgd.events", "zmq")


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("emgd.drivers")])
def test_drivers_import_nothing_downstream(module):
    assert _hits(module, PIPELINE_SIDE) == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[1:2] and
                                    m.split(".")[1].startswith(("mpf", "decoders", "detection",
                                                                "modelcard", "highpass",
                                                                "onnxsession", "vocab",
                                                                "stages"))])
def test_features_and_decoders_import_no_io(module):
    assert _hits(module, ("emgd.drivers", "zmq", "emgd.cli", "emgd.daemon",
                          "emgd.publisher", "serial", "bleak", "torch")) == []


@pytest.mark.parametrize("module", list(MODULES))
def test_only_the_cli_configures_logging(module):
    if module == "emgd.cli":
        return
    source = MODULES[module].read_text()
    assert "logging.basicConfig" not in source and ".addHandler(" not in source


@pytest.mark.parametrize("module", list(MODULES))
def test_heavy_optional_imports_stay_in_their_modules(module):
    if not module.startswith("emgd.drivers.ble"):
        assert _hits(module, ("bleak", "dbus_fast")) == [] or module.startswith(
            "emgd.drivers.blesim")
    if not module.startswith("emgd.drivers.serial"):
        assert _hits(module, ("serial",)) == []
    if not module.startswith("emgd.models"):
        assert _hits(module, ("torch", "onnx", "onnxscript")) == []


def test_no_import_cycles():
    internal = {m: {i for i in GRAPH[m] if i in MODULES and i != m} for m in MODULES}
    # a module's parent package __init__ is imported implicitly; ignore that edge
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in internal[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if not state.get(nxt):
                visit(nxt, stack + [node])
        state[node] = 2

    for m in internal:
        if not state.get(m):
            visit(m, [])


def test_nothing_named_bare_drivers_or_models_is_imported():
    for module in MODULES:
        bad = _hits(module, ("drivers", "models"))
        assert bad == [], f"{module} imports {bad}; use emgd.drivers / emgd.models"
