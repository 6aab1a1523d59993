"""Settings: defaults < file < environment < flags; bad keys and values are clear errors."""

from __future__ import annotations

import pytest

from emgd.config import Settings, describe, load_settings
from emgd.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "emgd.toml"
    path.write_text(text)
    return path


def test_defaults():
    s = load_settings(environ={})
    assert s == Settings()
    assert s.device == "auto" and s.pub == "tcp://127.0.0.1:7400" and s.raw is False


def test_precedence_file_env_flags(tmp_path):
    cfg = write(tmp_path, 'device = "sim"\npub = "tcp://127.0.0.1:7500"\nraw = true\n')
    s = load_settings(cfg, environ={})
    assert (s.device, s.pub, s.raw) == ("sim", "tcp://127.0.0.1:7500", True)
    s = load_settings(cfg, environ={"EMGD_PUB": "tcp://127.0.0.1:7600", "EMGD_RAW": "0"})
    assert (s.device, s.pub, s.raw) == ("sim", "tcp://127.0.0.1:7600", False)
    s = load_settings(cfg, environ={"EMGD_PUB": "tcp://127.0.0.1:7600"},
                      overrides={"pub": "tcp://127.0.0.1:7700"})
    assert s.pub == "tcp://127.0.0.1:7700"


def test_unrelated_environment_is_ignored():
    s = load_settings(environ={"PATH": "/bin", "EMGD_CONFIG": "/nowhere.toml"})
    assert s == Settings()


@pytest.mark.parametrize("text, fragment", [
    ('devise = "sim"\n', "unknown setting 'devise'"),
    ('raw = "yes"\n', "bad value for 'raw'"),
    ('ring_seconds = 0.1\n', "ring_seconds"),
    ('log_level = "loud"\n', "log_level"),
    ('pub = "localhost"\n', "ZeroMQ endpoint"),
    ('device = [1, 2]\n', "bad value for 'device'"),
    ('this is not toml', "not valid TOML"),
])
def test_bad_file_values_name_the_key(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_settings(write(tmp_path, text), environ={})


def test_unknown_key_lists_known_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "colour = 1\n"), environ={})
    assert "device" in str(info.value) and "pub" in str(info.value)


def test_bad_environment_value_names_the_source():
    with pytest.raises(ConfigError, match="environment"):
        load_settings(environ={"EMGD_RAW": "perhaps"})
    with pytest.raises(ConfigError, match="unknown setting 'nonsense'"):
        load_settings(environ={"EMGD_NONSENSE": "1"})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(AttributeError):
        s.device = "sim"  # type: ignore[misc]


def test_describe_lists_every_field():
    keys = [k for k, _, _ in describe()]
    assert "device" in keys and "pub" in keys and len(keys) == len(set(keys))


def test_per_gesture_tables_merge_key_by_key(tmp_path):
    cfg = write(tmp_path, "gesture_threshold = { thumb_click = 0.5, thumb_up = 0.4 }\n")
    s = load_settings(cfg, environ={"EMGD_GESTURE_THRESHOLD__THUMB_UP": "0.45",
                                    "EMGD_GESTURE_DEBOUNCE_MS__INDEX_RELEASE": "80"})
    assert s.gesture_threshold == {"thumb_click": 0.5, "thumb_up": 0.45}
    assert s.gesture_debounce_ms == {"index_release": 80.0}


@pytest.mark.parametrize("text, fragment", [
    ("gesture_threshold = { thumb_click = 1.5 }\n", "gesture_threshold.thumb_click"),
    ('gesture_threshold = { thumb_click = "high" }\n', "gesture_threshold.thumb_click"),
    ("gesture_debounce_ms = { index_release = -1 }\n", "gesture_debounce_ms.index_release"),
    ("gesture_threshold = 0.4\n", "gesture_threshold"),
])
def test_bad_per_gesture_values(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(write(tmp_path, text), environ={})
