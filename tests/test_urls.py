"""Device URLs and the backend registry."""

from __future__ import annotations

import sys

import pytest

from emgd.drivers import registry
from emgd.drivers.registry import BACKENDS, Backend, device_class, open_device
from emgd.drivers.urls import SCHEMES, parse_url, split_url
from emgd.errors import ConfigError, MissingDependency


def test_examples_parse():
    u = parse_url("sim")
    assert (u.scheme, u.target) == ("sim", None)
    assert u.options["seed"] == 0 and u.options["paced"] is True and u.options["format"] == "int24"
    u = parse_url("sim?seed=1&counter=1&paced=0")
    assert (u.options["seed"], u.options["counter"], u.options["paced"]) == (1, True, False)
    u = parse_url("serial:/dev/ttyACM0?baud=2000000")
    assert (u.scheme, u.target, u.options["baud"]) == ("serial", "/dev/ttyACM0", 2000000)
    assert parse_url("ble").target is None
    assert parse_url("ble:EMG-1234").target == "EMG-1234"
    assert parse_url("ble:AA:BB:CC:DD:EE:FF").target == "AA:BB:CC:DD:EE:FF"
    u = parse_url("replay:/tmp/a%3Fb.h5?speed=4")
    assert (u.target, u.options["speed"]) == ("/tmp/a?b.h5", 4.0)
    assert parse_url("auto").scheme == "auto"
    assert parse_url(" SIM ").scheme == "sim"


def test_booleans_and_bare_flags():
    for text, value in [("1", True), ("yes", True), ("ON", True), ("false", False), ("0", False)]:
        assert parse_url(f"sim?counter={text}").options["counter"] is value
    assert parse_url("sim?counter").options["counter"] is True


def test_options_are_read_only_and_str_round_trips():
    u = parse_url("sim?seed=3&format=int16&drop=0.5")
    with pytest.raises(TypeError):
        u.options["seed"] = 4  # type: ignore[index]
    assert parse_url(str(u)) == u
    assert str(parse_url("sim")) == "sim"


@pytest.mark.parametrize(
    "url, needle",
    [
        ("sim?foo=1", "unknown option 'foo'"),
        ("sim?seed=x", "bad value 'x' for option 'seed'"),
        ("sim?seed=-1", "must be >= 0"),
        ("sim?drop=2", "must be <= 1"),
        ("sim?drop=nan", "finite"),
        ("sim?format=int32", "int16, int24"),
        ("sim?paced=maybe", "boolean"),
        ("sim?seed", "needs a value"),
        ("sim?seed=1&seed=2", "given twice"),
        ("sim:target", "takes no target"),
        ("serial", "needs a PORT"),
        ("replay", "needs a FILE"),
    ],
)
def test_bad_urls_raise_config_error_with_the_grammar(url, needle):
    with pytest.raises(ConfigError) as err:
        parse_url(url)
    message = str(err.value)
    assert needle in message
    assert SCHEMES[split_url(url)[0]].usage() in message  # the scheme's grammar is repeated


def test_unknown_scheme_lists_the_schemes():
    with pytest.raises(ConfigError) as err:
        parse_url("usb:/dev/x")
    for scheme in SCHEMES:
        assert scheme in str(err.value)
    with pytest.raises(ConfigError):
        parse_url("")


def test_every_backend_has_a_grammar_and_every_scheme_but_auto_a_backend():
    assert set(BACKENDS) == set(SCHEMES) - {"auto"}
    assert registry.schemes() == tuple(BACKENDS)


def test_open_sim_returns_a_simulated_device():
    from emgd.drivers.sim import SimDevice

    with open_device("sim?seed=4&serial=SIM-0042") as dev:
        assert isinstance(dev, SimDevice)
        assert dev.info.simulated and dev.info.device_id == "SIM-0042"
        assert dev.stats().link == "closed"


def test_auto_must_be_resolved_first():
    with pytest.raises(ConfigError, match="resolved"):
        open_device("auto")


def test_a_missing_backend_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(BACKENDS, "sim", Backend("emgd.drivers.no_such_backend", "X", {}))
    with pytest.raises(MissingDependency, match="not part of this installation"):
        open_device("sim")


def test_a_missing_optional_dependency_says_what_to_install(monkeypatch, tmp_path):
    (tmp_path / "emgd_fake_backend.py").write_text("import emgd_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "emgd_fake_backend", raising=False)
    monkeypatch.setitem(
        BACKENDS, "sim", Backend("emgd_fake_backend", "X", {"emgd_absent_dependency": "absent-pkg"})
    )
    with pytest.raises(MissingDependency, match="pip install absent-pkg"):
        device_class("sim")


def test_a_backend_without_its_class_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(BACKENDS, "sim", Backend("emgd.drivers.protocol", "NoSuchDevice", {}))
    with pytest.raises(MissingDependency, match="no class NoSuchDevice"):
        open_device("sim")
