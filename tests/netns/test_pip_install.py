"""`pip install` of a clean copy of the tree, into a fresh venv, gives a working node.

What an operator does with pip (README, "Install on a host"): a venv made from Debian's
/usr/bin/python3 without system site packages, the wheel built from a tree holding only the
files git knows (no .venv, no egg-info, no build/), its dependencies from PyPI. From an empty
directory both commands answer, `check-config` names a rules file that exists inside the venv,
and `run` in the lab's relay namespace answers `P`, having found Debian's python3-nftables by
path (lrkp_tsl/hostdeps.py). The wheel holds the node and nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest

from lrkp_lab import node as daemon
from lrkp_lab.calls import NODE_ARGS, running_node
from lrkp_lab.lab import INTERNAL_IP, Lab
from lrkp_lab.ngcalls import kamailio_ng
from lrkp_tsl.hostdeps import DEBIAN_NFTABLES

ROOT = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"  # Debian's, the one python3-nftables is built for
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def git_files() -> list[str]:
    """What a clone would hold: the files git knows (tracked or new, not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).exists()]


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path
    empty: Path  # a directory with nothing in it, to run the commands from

    def command(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run(
            [str(self.venv / "bin" / name), *args],
            cwd=self.empty,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("pip-install")
    clone = root / "clone"
    for name in git_files():
        target = clone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)
    venv, wheels, empty = root / "venv", root / "wheels", root / "empty"
    empty.mkdir()
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(clone)], check=True)
    (wheel,) = wheels.glob("lrkp_tsl-*.whl")
    subprocess.run([*pip, "install", str(wheel)], check=True, timeout=600)
    yield Installed(venv, wheel, empty)


def test_the_wheel_holds_the_node_only(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = Parser().parsestr(
            wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        )
    shipped = {n for n in names if ".dist-info/" not in n}
    source = {
        name
        for name in git_files()
        if name.startswith("lrkp_tsl/") and (name.endswith(".py") or "/rules/" in name)
    } | {"lrkp_tsl/py.typed"}
    assert shipped == source
    assert {"lrkp_tsl/rules/lrkp.nft", "lrkp_tsl/py.typed"} <= shipped
    assert not any(n.startswith(("lrkp_lab/", "tests/", "bench/")) for n in names)
    # The node's own dependencies, pinned, and nothing else: no extras, no rich.
    requires = metadata.get_all("Requires-Dist") or []
    assert sorted(requires) == sorted(PROJECT["dependencies"])
    assert not any("rich" in r.lower() for r in requires)
    assert metadata["Version"] == PROJECT["version"]


def test_the_commands_work_from_an_empty_directory(installed: Installed) -> None:
    version = PROJECT["version"]
    for name in ("lrkp-tsl", "lrkp-ctl"):
        result = installed.command(name, "--version")
        assert (result.returncode, result.stdout.strip()) == (0, f"{name} {version}"), result
    result = installed.command(
        "lrkp-tsl", "check-config", "--config", "/dev/null", "--internal-ip", str(INTERNAL_IP)
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "kernel.rules" in line)
    rules = Path(line.split()[1])
    assert rules.is_file(), line
    assert rules.is_relative_to(installed.venv), line
    assert list(installed.empty.iterdir()) == []


def test_the_installed_node_answers_p(
    lab: Lab, installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (DEBIAN_NFTABLES / "__init__.py").is_file(), "install Debian's python3-nftables"
    monkeypatch.setattr(daemon, "LRKP_TSL", [str(installed.venv / "bin" / "lrkp-tsl")])
    monkeypatch.chdir(installed.empty)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    ng_address = (str(INTERNAL_IP), 2223)
    ng_flag = f"udp:{ng_address[0]}:{ng_address[1]}"
    with running_node(lab, *NODE_ARGS, "--ng", ng_flag, "--config", "/dev/null") as node:
        cmdline = Path(f"/proc/{node.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(installed.venv).encode() in b" ".join(cmdline)
        # The wheel holds the ng front-end too: the installed node answers an ng ping.
        with kamailio_ng(lab, "installed node", ng_address) as ng:
            assert ng.request({"command": "ping"}) == {"result": "pong"}
        log = node.output()
    assert node.proc.returncode == 0, log  # SIGTERM: a clean stop
    assert f"Debian's python3-nftables, loaded from {DEBIAN_NFTABLES}" in log
    assert "Traceback" not in log


def test_a_missing_nftables_binding_names_the_debian_package(
    installed: Installed, tmp_path: Path
) -> None:
    """Without python3-nftables (an empty directory mounted over it, in a private mount and
    network namespace) `run` exits 2 before touching the kernel and says what to install."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("mounting over the binding needs root, and CI must run this test")
        pytest.skip("mounting over the binding needs root")
    empty = tmp_path / "empty"
    empty.mkdir()
    script = (
        f"mount --bind {empty} {DEBIAN_NFTABLES} && exec {installed.venv}/bin/lrkp-tsl run "
        f"--config /dev/null --internal-ip 10.9.9.9 --state-dir {tmp_path}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--net", "sh", "-c", script],
        cwd=installed.empty,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "apt install python3-nftables" in result.stderr
    assert "Traceback" not in result.stderr
