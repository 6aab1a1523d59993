"""The systemd units and the udev rule, checked by systemd's and udev's own tools.

- ``systemd-analyze verify --man=no`` must print nothing for every unit (an unknown key only
  warns and still exits 0, so any output fails the test). verify also checks that
  ExecStart='s program exists; the units name /opt/emgd/bin/emgd, the documented install
  path, which is absent here, so verify runs on a copy whose ExecStart points at an
  executable stand-in in a temp dir — nothing else in the copy changes.
- ``systemd-analyze security --offline=true`` must rate the units 2.5 or better.
- ``udevadm test`` runs the rule inside a private mount namespace (``unshare -m``) with a
  private /dev, /run/udev and rules folders, against the VM's UART ttyS0: a copy of the rule
  whose USB match is replaced by ``KERNEL=="ttyS0"`` shows the rule's actions for real.

Each test is skipped, with the reason, where its tool is missing or not permitted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ["emgd.service", "emgd@.service"]
INSTALLED_EXEC = "/opt/emgd/bin/emgd"
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian: systemd)")


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    rows = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        rows.append((section, key.strip(), value.strip()))
    return rows


def values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in parse_unit(path) if s == section and k == key]


def one(path: Path, key: str, section: str = "Service") -> str:
    found = values(path, key, section)
    assert len(found) == 1, f"{path.name}: {key}= set {len(found)} times"
    return found[0]


def copy_for_verify(unit: str, dest: Path) -> Path:
    """The unit with its ExecStart program replaced by an executable stand-in."""
    stand_in = dest / "bin" / "emgd"
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = (SYSTEMD_DIR / unit).read_text()
    assert f"ExecStart={INSTALLED_EXEC} " in text
    out = dest / unit
    out.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={stand_in} "))
    return out


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=120)


# --------------------------------------------------------------------------- systemd-analyze


@needs_analyze
@pytest.mark.parametrize("unit", UNITS + ["emgd@left.service"])
def test_verify_prints_nothing(unit, tmp_path):
    source = "emgd@.service" if unit.startswith("emgd@") else unit
    path = copy_for_verify(source, tmp_path)
    if unit != source:  # an instance of the template, as `systemctl start emgd@left` loads it
        path = path.rename(tmp_path / unit)
    res = analyze("verify", "--man=no", str(path))
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr


@needs_analyze
def test_verify_harness_catches_a_warning(tmp_path):
    """An unknown key only warns (exit 0): the check above must see the output."""
    path = copy_for_verify("emgd.service", tmp_path)
    path.write_text(path.read_text().replace("[Service]\n", "[Service]\nWatchdogSecs=5\n"))
    res = analyze("verify", "--man=no", str(path))
    assert "WatchdogSecs" in res.stdout + res.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure(unit, tmp_path):
    name = "emgd@left.service" if unit == "emgd@.service" else unit
    path = tmp_path / name
    shutil.copy(SYSTEMD_DIR / unit, path)
    res = analyze("security", "--offline=true", str(path))
    out = res.stdout + res.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert m, out
    assert float(m.group(1)) <= MAX_EXPOSURE, out


# --------------------------------------------------------------------------- what the units say


@pytest.mark.parametrize("unit", UNITS)
def test_unit_contract(unit):
    path = SYSTEMD_DIR / unit
    assert one(path, "Type") == "notify"
    assert one(path, "NotifyAccess") == "main"
    assert float(one(path, "WatchdogSec")) > 0
    assert one(path, "Restart") == "on-failure"
    assert one(path, "RestartPreventExitStatus") == "2"  # config errors: exit 2, no restart
    assert one(path, "DynamicUser") == "yes"
    assert one(path, "SupplementaryGroups") == "dialout"
    config = "%i.toml" if "@" in unit else "emgd.toml"
    assert one(path, "ExecStart") == (
        f"{INSTALLED_EXEC} run --config /etc/emgd/{config} --log-level info")
    assert values(path, "ConfigurationDirectory") == []  # it would chown /etc/emgd
    assert "emgd" in one(path, "StateDirectory").split()
    # Numba's cache lives in the cache directory (site-packages is read-only)
    assert "emgd/numba" in one(path, "CacheDirectory").split()
    assert "NUMBA_CACHE_DIR=%C/emgd/numba" in values(path, "Environment")
    for key, expected in [("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                          ("NoNewPrivileges", "yes"), ("ProtectHome", "yes"),
                          ("DevicePolicy", "closed"), ("SystemCallArchitectures", "native"),
                          ("CapabilityBoundingSet", ""), ("LockPersonality", "yes"),
                          ("RestrictNamespaces", "yes"), ("ProtectKernelTunables", "yes"),
                          ("ProtectKernelModules", "yes"), ("ProtectControlGroups", "yes"),
                          # Numba's LLVM JIT needs W+X memory
                          ("MemoryDenyWriteExecute", "no")]:
        assert one(path, key) == expected, key
    assert set(one(path, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET",
                                                                 "AF_INET6"}
    assert values(path, "DeviceAllow") == ["char-ttyACM rw", "char-ttyUSB rw"]
    assert values(path, "SystemCallFilter")[0] == "@system-service"
    assert one(path, "WantedBy", "Install") == "multi-user.target"


def test_template_matches_the_service():
    """Hardening and behaviour stay in step; only the per-instance keys may differ."""
    per_instance = {"Description", "ExecStart", "StateDirectory", "WorkingDirectory"}
    single = [r for r in parse_unit(SYSTEMD_DIR / "emgd.service") if r[1] not in per_instance]
    template = [r for r in parse_unit(SYSTEMD_DIR / "emgd@.service")
                if r[1] not in per_instance]
    assert single == template
    tpl = SYSTEMD_DIR / "emgd@.service"
    assert "%i" in one(tpl, "Description", "Unit")
    assert one(tpl, "StateDirectory").split() == ["emgd", "emgd/%i"]
    assert one(tpl, "WorkingDirectory") == "%S/emgd/%i"


# --------------------------------------------------------------------------- udev

RULES = SYSTEMD_DIR / "90-emgd.rules"

UDEV_SCRIPT = r"""
set -e
fail() { echo "SETUP-FAILED: $*"; exit 77; }
mount -t tmpfs -o mode=755 tmpfs /dev || fail "mount a private /dev"
mknod -m 600 /dev/ttyS0 c 4 64 || fail "mknod /dev/ttyS0"
mknod -m 666 /dev/null c 1 3 || fail "mknod /dev/null"
mkdir -p /run/udev && mount -t tmpfs tmpfs /run/udev || fail "mount a private /run/udev"
mount --bind "$1" /etc/udev/rules.d || fail "bind the rules folder"
for d in /usr/lib/udev/rules.d /lib/udev/rules.d; do
    [ -d "$d" ] && { mount --bind "$2" "$d" || fail "hide $d"; }
done
set +e
udevadm test --action=add /sys/class/tty/ttyS0 2>&1
echo "RESULT-LINK=$(readlink /dev/emg-band)"
echo "RESULT-NODE=$(stat -c %G:%a /dev/ttyS0)"
"""


def rule_lines(text: str) -> list[str]:
    """Logical lines (continuations joined), comments and blanks dropped."""
    text = text.replace("\\\n", "")
    return [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def ttys0_variant(text: str) -> str:
    """The rules with each band-matching rule's match keys replaced by KERNEL=="ttyS0"."""
    out = []
    for line in rule_lines(text):
        if 'SYMLINK+="emg-band"' in line:
            line = 'KERNEL=="ttyS0", ' + line[line.index('SYMLINK+='):]
        out.append(line)
    return "\n".join(out) + "\n"


def udev_test(rules_text: str, tmp_path: Path) -> str:
    if os.geteuid() != 0:
        pytest.skip("udevadm test in a private mount namespace needs root")
    for tool in ("udevadm", "unshare", "mount", "mknod"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: udev, util-linux)")
    if not Path("/sys/class/tty/ttyS0").exists():
        pytest.skip("no /sys/class/tty/ttyS0 on this machine to run the rule against")
    rules, empty = tmp_path / "rules", tmp_path / "empty"
    rules.mkdir()
    empty.mkdir()
    (rules / RULES.name).write_text(rules_text)
    script = tmp_path / "udev-test.sh"
    script.write_text(UDEV_SCRIPT)
    res = subprocess.run(["unshare", "-m", "sh", str(script), str(rules), str(empty)],
                         capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    if res.returncode == 77 or "unshare failed" in out:
        pytest.skip(f"private mount namespace not permitted here: {out.strip()[-300:]}")
    return out


def rule_complaints(out: str) -> list[str]:
    """udevadm's parse complaints about our file ("FILE:LINE message", no device prefix)."""
    return [ln for ln in out.splitlines()
            if RULES.name + ":" in ln and not re.match(r"^\S+: \S*" + re.escape(RULES.name), ln)]


def test_udev_rule_parses(tmp_path):
    """The rule as shipped: udevadm reads it without a complaint (it exits 0 even then)."""
    out = udev_test(RULES.read_text(), tmp_path)
    assert f"Reading rules file: /etc/udev/rules.d/{RULES.name}" in out, out
    assert rule_complaints(out) == [], out
    assert "RESULT-LINK=\n" in out + "\n"  # ttyS0 is no band: the shipped rule leaves it be


def test_udev_rule_actions_on_a_real_tty(tmp_path):
    out = udev_test(ttys0_variant(RULES.read_text()), tmp_path)
    assert rule_complaints(out) == [], out
    assert "RESULT-LINK=ttyS0" in out, out
    assert "RESULT-NODE=dialout:660" in out, out
    props = dict(ln.split("=", 1) for ln in out.splitlines()
                 if re.match(r"^[A-Z_]+=", ln) and not ln.startswith("RESULT-"))
    assert ":systemd:" in props.get("TAGS", ""), out
    assert props.get("ID_MM_DEVICE_IGNORE") == "1", out
    assert "/dev/emg-band" in props.get("DEVLINKS", "").split(), out


def test_udev_harness_catches_a_typo(tmp_path):
    out = udev_test('KERNEL=="ttyS0", SYMLNK+="emg-band"\n', tmp_path)
    assert rule_complaints(out), out


def test_udev_rule_matches_usb_serial_only():
    lines = [ln for ln in rule_lines(RULES.read_text()) if 'SYMLINK+="emg-band"' in ln]
    assert lines, "no active rule makes /dev/emg-band"
    for line in lines:
        assert 'SUBSYSTEMS=="usb"' in line and 'ATTRS{idVendor}==' in line
        assert 'ATTRS{idProduct}==' in line and 'KERNEL=="ttyACM[0-9]*"' in line
        for action in ('GROUP="dialout"', 'MODE="0660"', 'TAG+="systemd"'):
            assert action in line
