"""packaging/lrkp-tsl.service: systemd's own checker accepts it, and it says what the docs say.

`systemd-analyze verify` checks that the commands exist, so it runs against a scratch root
holding the host's unit directory and a stand-in for /usr/local/bin/lrkp-tsl (the host is not
changed). It exits 0 even for unknown keys or unparsable values ("ignoring"), so any output
fails the test too.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lrkp_tsl import cli, config, lock

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "lrkp-tsl.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def command(line: str) -> list[str]:
    return line.split()


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not SYSTEM_UNITS.is_dir():
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: scripts/install-system-deps.sh installs it")
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    service = unit()["Service"]
    for key in ("ExecStartPre", "ExecStart"):
        program = root / command(service[key])[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    return root


def test_systemd_analyze_verify_accepts_the_unit(scratch_root: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={scratch_root}", f"/etc/systemd/system/{UNIT.name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr


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
