"""What the Debian package is made of, checked without building it (the build, install and
purge are tests/netns/test_debian_package.py): one version everywhere, and a shipped
configuration that stops the node until the operator sets internal_ip."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

import lrkp_tsl
from lrkp_tsl import config
from lrkp_tsl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "packaging" / "debian"


def shipped_config() -> str:
    """/etc/lrkp-tsl/lrkp-tsl.toml as debian/rules makes it."""
    return subprocess.run(
        ["sed", "-E", "-f", str(DEBIAN / "conffile.sed"), str(ROOT / "examples/lrkp-tsl.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_one_version_in_pyproject_the_package_and_the_changelog() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    top = (DEBIAN / "changelog").read_text().splitlines()[0]
    found = re.match(r"lrkp-tsl \(([^)]+)\) ", top)
    assert found, top
    assert found[1] == version == lrkp_tsl.__version__


def test_the_shipped_config_is_refused_until_internal_ip_is_set(tmp_path: Path) -> None:
    path = tmp_path / "lrkp-tsl.toml"
    path.write_text(shipped_config())
    with pytest.raises(ConfigError, match="internal_ip is required"):
        config.from_mapping(config.read(path, {}), source=str(path))
    # Every other key it sets is valid: with internal_ip given, the node would run.
    values = config.read(path, {"internal_ip": "192.0.2.10"})
    assert config.from_mapping(values, source=str(path)).internal_ip.exploded == "192.0.2.10"


def test_the_shipped_config_says_what_to_do_and_keeps_the_examples_comments() -> None:
    text = shipped_config()
    assert "systemctl enable --now lrkp-tsl" in text.split("\n\n")[0]
    assert "--config examples/" not in text  # it names itself, not the example it came from
    example = (ROOT / "examples/lrkp-tsl.toml").read_text()
    assert text.count("\n") > example.count("\n")  # nothing dropped, a header added
    for key in ("internal_ip", "external_ip", "control", "allow"):
        assert re.search(rf"^# {key} = ", text, re.M), key
        assert not re.search(rf"^{key} = ", text, re.M), key


def test_every_subpackage_of_the_node_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages by name: a new one left out installs a node that
    cannot import it (the .deb and pip installs failed so with lrkp_tsl.frontends)."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "lrkp_tsl").rglob("__init__.py")
    }
    assert found == listed
