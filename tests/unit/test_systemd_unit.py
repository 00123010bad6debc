"""packaging/lrkp-tsl.service: systemd's own checker accepts it, and it says what the docs say.

One unit file for both installs: the Debian package ships it as it is (/usr/bin/lrkp-tsl), a
checkout install rewrites the path with the `sed` command docs/systemd.md gives
(/usr/local/bin). The pair drop-in (packaging/lrkp-tsl.service.d/pair.conf) is checked on
top of it. `systemd-analyze verify` checks that the commands exist, so it runs against a
scratch root holding the host's unit directory and stand-ins for the commands (the host is
not changed). It exits 0 even for unknown keys or unparsable values ("ignoring"), so any
output fails the test too.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lrkp_tsl import cli, config, lock

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "lrkp-tsl.service"
DROP_IN = ROOT / "packaging" / "lrkp-tsl.service.d" / "pair.conf"
SYSTEMD_DOC = ROOT / "docs" / "systemd.md"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def parse(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def unit() -> configparser.RawConfigParser:
    return parse(UNIT.read_text())


def drop_in() -> configparser.RawConfigParser:
    return parse(DROP_IN.read_text())


def checkout_unit() -> str:
    """The unit as docs/systemd.md's checkout install writes it (its own sed command)."""
    found = re.search(r"sed '([^']+)' packaging/lrkp-tsl\.service > (\S+)", SYSTEMD_DOC.read_text())
    assert found, "docs/systemd.md: the checkout install's sed command is missing"
    assert found[2] == f"/etc/systemd/system/{UNIT.name}"
    return subprocess.run(
        ["sed", found[1], str(UNIT)], capture_output=True, text=True, check=True
    ).stdout


def command(line: str) -> list[str]:
    return line.split()


def install(root: Path, text: str) -> None:
    """The unit into root's /etc/systemd/system, and a stand-in for each command it runs."""
    service = parse(text)["Service"]
    for key in ("ExecStartPre", "ExecStart"):
        program = root / command(service[key])[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/system" / UNIT.name).write_text(text)


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not SYSTEM_UNITS.is_dir():
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: scripts/install-system-deps.sh installs it")
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    install(root, UNIT.read_text())
    return root


def verify(root: Path) -> str:
    """What systemd-analyze verify says about the unit (with its drop-ins) in `root`."""
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", f"/etc/systemd/system/{UNIT.name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_systemd_analyze_verify_accepts_the_unit(scratch_root: Path) -> None:
    assert verify(scratch_root) == ""


def test_the_checkout_install_of_the_unit_is_accepted(scratch_root: Path) -> None:
    text = checkout_unit()
    service = parse(text)["Service"]
    for key in ("ExecStartPre", "ExecStart"):
        assert command(service[key])[0] == "/usr/local/bin/lrkp-tsl", service[key]
        assert command(service[key])[1:] == command(unit()["Service"][key])[1:]
    install(scratch_root, text)
    assert verify(scratch_root) == ""


def test_the_pair_drop_in_is_accepted_and_read(scratch_root: Path) -> None:
    directory = scratch_root / "etc/systemd/system" / f"{UNIT.name}.d"
    directory.mkdir()
    shutil.copy(DROP_IN, directory / DROP_IN.name)
    assert verify(scratch_root) == ""
    # The same check sees a bad value in the drop-in: it is read, not ignored.
    (directory / DROP_IN.name).write_text(DROP_IN.read_text() + "Restart=sometimes\n")
    assert "sometimes" in verify(scratch_root)


def test_the_pair_drop_in_orders_the_node_after_redis_and_keepalived() -> None:
    parsed = drop_in()
    for key in ("After", "Wants"):
        assert set(parsed["Unit"][key].split()) == {"redis-server.service", "keepalived.service"}
    assert parsed["Service"]["SupplementaryGroups"] == "redis"
    # Documented where an operator looks, with the path the package ships it at.
    doc = SYSTEMD_DOC.read_text()
    assert "/usr/share/lrkp-tsl/lrkp-tsl.service.d/pair.conf" in doc
    assert "/etc/systemd/system/lrkp-tsl.service.d/pair.conf" in doc
    assert "packaging/lrkp-tsl.service.d/pair.conf" in doc


def test_the_checker_catches_a_broken_unit(scratch_root: Path) -> None:
    """The test above can fail: a bad value is reported (on stderr, exit code 0)."""
    broken = scratch_root / "etc/systemd/system" / UNIT.name
    broken.write_text(broken.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={scratch_root}", f"/etc/systemd/system/{UNIT.name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "sometimes" in result.stderr


def test_unit_runs_the_node_with_the_default_config_and_directories() -> None:
    parsed = unit()
    service = parsed["Service"]
    path = str(config.DEFAULT_CONFIG)
    assert command(service["ExecStart"])[1:] == ["run", "--config", path]
    assert command(service["ExecStartPre"])[1:] == ["check-config", "--config", path]
    assert f"/etc/{service['ConfigurationDirectory']}/" in path
    default_state = config.Config.__dataclass_fields__["state_dir"].default
    assert Path("/var/lib") / service["StateDirectory"] == default_state
    assert Path("/run") / service["RuntimeDirectory"] == lock.DEFAULT_DIRECTORY
    assert service["RuntimeDirectoryPreserve"] == "yes"
    assert "nftables.service" in parsed["Unit"]["After"].split()
    assert service["Restart"] == "on-failure"
    # A bad configuration (or another node in the namespace): a restart would not fix it.
    assert int(service["RestartPreventExitStatus"]) == cli.EXIT_CONFIG
