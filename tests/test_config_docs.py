"""docs/configuration.md and systemd/emgd.toml list every setting of emgd.config.Settings.

A key added to the dataclasses without its documentation fails here; so does an example
config that no longer loads or no longer shows the defaults.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from emgd.config import Settings, describe, load_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "systemd" / "emgd.toml"
DOCS = ROOT / "docs" / "configuration.md"
KEYS = [key for key, _, _ in describe()]


def env_name(key: str) -> str:
    return "EMGD_" + key.upper().replace(".", "__")


def example_keys() -> dict[str, bool]:
    """dotted key → True if set, False if only shown commented out (``# key = ...``)."""
    found: dict[str, bool] = {}
    table = ""
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"^\s*#?\s*\[([A-Za-z0-9_.]+)\]\s*$", line)
        if header:
            table = header.group(1) + "."
            continue
        m = re.match(r"^\s*(#\s*)?([A-Za-z0-9_]+)\s*=", line)
        if m:
            key = table + m.group(2)
            found[key] = found.get(key, False) or m.group(1) is None
    return found


@pytest.mark.parametrize("key", KEYS)
def test_example_config_lists_key(key):
    assert key in example_keys(), f"{key} missing from {EXAMPLE.relative_to(ROOT)}"


def test_example_config_has_no_stale_keys():
    stale = set(example_keys()) - set(KEYS)
    assert not stale, f"{EXAMPLE.name} lists keys that Settings does not have: {stale}"


def test_example_config_loads_to_the_defaults():
    assert load_settings(EXAMPLE, environ={}) == Settings()


def test_example_config_values_are_the_defaults():
    """Each key that is set shows the built-in default (not just some valid value)."""
    data = tomllib.loads(EXAMPLE.read_text())
    for key, _, default in describe():
        node = data
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if node != {}:
            assert node == default, f"{key} = {node!r} in {EXAMPLE.name}; default {default!r}"


@pytest.mark.parametrize("key, type_name, default", describe())
def test_docs_describe_key(key, type_name, default):
    rows = [ln for ln in DOCS.read_text().splitlines() if ln.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"{DOCS.name}: no (or several) table rows for {key}"
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 5, rows[0]  # key | type | default | environment | meaning
    _, doc_type, doc_default, doc_env, meaning = cells
    expected_type = re.sub(r"\bstr\b", "string", type_name)  # "str | None" → "string | None"
    assert doc_type == expected_type, f"{key}: type {doc_type!r}, expected {expected_type!r}"
    toml_default = {True: "true", False: "false"}.get(default, None) \
        if isinstance(default, bool) else (f'"{default}"' if isinstance(default, str)
                                           else repr(default))
    assert doc_default == f"`{toml_default}`", f"{key}: default {doc_default}"
    assert doc_env == f"`{env_name(key)}`"
    assert meaning, f"{key}: no meaning given"


def test_docs_state_the_precedence():
    text = DOCS.read_text()
    order = [text.index(word) for word in
             ("built-in defaults", "TOML file", "environment variables", "command-line flags")]
    assert order == sorted(order)
