"""The Debian package: built as `make deb` builds it, installed for real, run, purged.

scripts/build-deb.sh builds lrkp-tsl_<version>_<arch>.deb with debhelper and dh-virtualenv
from a clean copy of the tree (cached outside the clone per hash of its inputs) and fails on
any lintian error. Here the package is installed with apt as an operator would: the commands
are on PATH, the unit is where systemd looks and systemd accepts it, the configuration is a
conffile that stops the node until internal_ip is set, nothing is enabled or started. The
packaged node then runs in the lab's relay namespace with its default rules file, state
directory and lock directory, and answers `P`; it is stopped with SIGTERM, which leaves its
table and queue rule in the kernel as every stop does. Purging (run in that namespace, where
the prerm's `lrkp-tsl flush` acts) removes every file the package and its node added (a
scan of /etc, /usr, /var/lib and /run finds nothing left) and the node's kernel state.

This installs a package on the machine that runs the tests (and purges it after): it refuses
to touch a machine where lrkp-tsl is already installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lrkp_lab import node as daemon
from lrkp_lab.calls import CONTROL, KAMAILIO_IP, NODE_ARGS
from lrkp_lab.lab import INTERNAL_IP, Lab
from lrkp_lab.ngcalls import kamailio_ng
from lrkp_lab.node import Controller, Node
from lrkp_tsl import config, lock
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.dataplane.queue import XT_COMMENT

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build-deb.sh"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PACKAGE = "lrkp-tsl"
CONFFILE = config.DEFAULT_CONFIG
STATE_DIR = Path(str(config.Config.__dataclass_fields__["state_dir"].default))
UNIT = Path("/lib/systemd/system/lrkp-tsl.service")
DROP_IN = Path("/usr/share/lrkp-tsl/lrkp-tsl.service.d/pair.conf")
# Where anything the package or its node adds would be; /run/netns holds the labs.
SCANNED = ("/etc", "/usr", "/var/lib", "/run")
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300"]
# The packaged node stops as the unit stops it: its kernel state stays (no --flush-on-exit).
NG = (str(INTERNAL_IP), 2223)
PACKAGED_NODE_ARGS = (
    *(arg for arg in NODE_ARGS if arg != "--flush-on-exit"),
    "--ng",
    f"udp:{NG[0]}:{NG[1]}",
)


def need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def installed_status() -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True, text=True
    )
    return result.stdout if result.returncode == 0 else ""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result


def named_lrkp() -> set[str]:
    """Every path under SCANNED whose name holds 'lrkp' (the labs' namespaces aside)."""
    found = run("find", *SCANNED, "-xdev", "-name", "*lrkp*", "-not", "-path", "/run/netns/*")
    return set(found.stdout.split())


def kernel_state(lab: Lab) -> dict[str, bool]:
    """Whether the node's table and queue rule are in the relay namespace."""
    table = lab.run("relay", "nft", "list", "table", "ip", TABLE, check=False)
    raw = lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-S", "PREROUTING", check=False)
    return {"table": table.returncode == 0, "queue rule": XT_COMMENT in raw.stdout}


def held(path: Path) -> bool:
    """Whether a running node (of another test run, in another namespace) holds this lock."""
    with path.open("rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
        return False


@pytest.fixture(scope="module")
def deb() -> Path:
    need(os.geteuid() == 0, "building and installing the package needs root")
    for tool in ("dpkg-buildpackage", "dh_virtualenv", "lintian"):
        need(
            shutil.which(tool) is not None,
            f"{tool} is missing: scripts/install-system-deps.sh installs it",
        )
    built = run(str(BUILD))
    return Path(built.stdout.strip())


@dataclass(frozen=True)
class Installed:
    output: str  # what apt and the maintainer scripts printed
    before: set[str]  # named_lrkp() before the install


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Installed]:
    """apt install ./lrkp-tsl_*.deb. Purged at the end whatever happens."""
    need(
        "installed" not in installed_status(),
        f"{PACKAGE} is installed on this machine: this test installs and purges it, so it "
        "leaves an existing installation alone",
    )
    before = named_lrkp()
    try:
        result = run(*APT, "install", str(deb))
        yield Installed(result.stdout + result.stderr, before)
    finally:
        if installed_status():
            run(*APT, "purge", PACKAGE, check=False)


def test_the_package_is_built_and_lintian_clean(deb: Path) -> None:
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert deb.name == f"lrkp-tsl_{VERSION}_{arch}.deb"
    assert not deb.is_relative_to(ROOT)  # cached outside the clone
    lintian = (deb.parent / "lintian.txt").read_text()
    assert not re.search(r"^E: ", lintian, re.M), lintian
    # A warning must be explained in docs/packaging.md (overrides carry their own reason).
    explained = (ROOT / "docs" / "packaging.md").read_text()
    for tag in re.findall(r"^W: \S+ (\S+)", lintian, re.M):
        assert f"`{tag}`" in explained, f"lintian warning {tag} is not explained"
    fields = run("dpkg-deb", "-f", str(deb), "Depends").stdout
    for dependency in ("python3-nftables", "libnftables1", "libnetfilter-queue1", "iptables"):
        assert dependency in fields
    minor = run("/usr/bin/python3", "-c", "import sys; print(sys.version_info[1])").stdout
    assert f"python3 (<< 3.{int(minor) + 1})" in fields
    contents = run("dpkg-deb", "-c", str(deb)).stdout
    for absent in ("lrkp_lab", "/tests/", "__pycache__", ".pyc", "/pip/", "/opt/"):
        assert absent not in contents, absent


def test_installed_as_debian_and_systemd_expect(installed: Installed) -> None:
    for command in ("lrkp-tsl", "lrkp-ctl"):
        assert shutil.which(command) == f"/usr/bin/{command}"
        assert run(command, "--version").stdout.strip() == f"{command} {VERSION}"
    # Installing starts nothing and enables nothing: the shipped configuration has no
    # internal_ip, and the postinst says what to do.
    assert "has no internal_ip yet" in installed.output
    assert "systemctl enable --now lrkp-tsl" in installed.output
    assert not list(Path("/etc/systemd/system").glob("*.wants/lrkp-tsl.service"))
    # The conffile: a commented example that the node refuses until internal_ip is set.
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", PACKAGE).stdout
    assert str(CONFFILE) in conffiles
    refused = run("lrkp-tsl", "check-config", check=False)
    assert refused.returncode == 2 and "internal_ip is required" in refused.stderr
    # The unit: where systemd looks, running the installed command, accepted by systemd.
    assert UNIT.is_file()
    exec_start = next(
        line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")
    )
    assert exec_start.split()[0] == "ExecStart=/usr/bin/lrkp-tsl"
    verify = run("systemd-analyze", "verify", str(UNIT), check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    assert DROP_IN.is_file()
    # The rules file: one copy in /usr/share/lrkp-tsl, and the node's default names it.
    shown = run("lrkp-tsl", "check-config", "--config", "/dev/null", "--internal-ip", "10.9.9.9")
    rules = next(line for line in shown.stdout.splitlines() if "kernel.rules" in line).split()[1]
    assert rules == "/usr/share/lrkp-tsl/lrkp.nft"
    assert STATE_DIR.is_dir() and STATE_DIR.stat().st_mode & 0o777 == 0o750
    # Byte-code compiled at install, so the node (root) never writes under /usr.
    assert list(Path("/usr/lib/lrkp-tsl").rglob("cli.*.pyc"))


def test_the_packaged_node_answers_p(
    lab: Lab, installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The installed command, the shipped conffile (flags set what it leaves out), the
    default rules file, state directory and lock directory. Stopped by SIGTERM, it leaves
    its kernel state for the purge to remove."""
    monkeypatch.setattr(daemon, "LRKP_TSL", ["/usr/bin/lrkp-tsl"])
    node = Node(lab, "relay", *PACKAGED_NODE_ARGS, state=STATE_DIR)
    kamailio = Controller(lab, "sip", KAMAILIO_IP)
    try:
        node.wait_ready(CONTROL, kamailio)
        assert kamailio.command(b"P", CONTROL) == b"P PONG"
        # The package ships the ng front-end too (lrkp_tsl.frontends, lrkp_tsl.ng).
        with kamailio_ng(lab, "packaged node", NG) as ng:
            assert ng.request({"command": "ping"}) == {"result": "pong"}
    finally:
        kamailio.close()
        node.stop()
    log = node.output()
    assert node.proc.returncode == 0, log
    assert "Debian's python3-nftables, loaded from" in log  # the venv has no copy of its own
    assert "Traceback" not in log
    assert (STATE_DIR / "calls.sqlite3").is_file()
    assert list(lock.DEFAULT_DIRECTORY.glob("netns-*.lock"))


def test_purge_removes_everything(lab: Lab, installed: Installed) -> None:
    """Purged in the relay namespace, where the packaged node ran: the prerm stops the node
    and flushes what it left in that namespace's kernel."""
    with contextlib.suppress(FileNotFoundError):
        CONFFILE.write_text(CONFFILE.read_text() + "# edited by the operator\n")
    # The packaged node's lock (and any other no node holds) must go; a lock held by a node
    # running elsewhere (another test run, in its own namespace) must stay.
    locks = lock.DEFAULT_DIRECTORY
    free = {path for path in locks.glob("*.lock") if not held(path)}
    assert free, "the packaged node left its lock file: the purge is to remove it"
    assert kernel_state(lab) == {"table": True, "queue rule": True}, "the node left nothing"
    try:
        purged = run("ip", "netns", "exec", lab.ns("relay"), *APT, "purge", PACKAGE)
    finally:
        after = kernel_state(lab)
        lab.run("relay", "nft", "delete", "table", "ip", TABLE, check=False)
        lab.run("relay", "conntrack", "-F", check=False)
    assert "warning" not in (purged.stdout + purged.stderr).lower(), purged
    assert "lrkp-tsl flush: removed table ip lrkp" in purged.stdout, purged.stdout
    assert after == {"table": False, "queue rule": False}
    assert installed_status() == ""
    for path in (CONFFILE.parent, STATE_DIR, Path("/usr/lib/lrkp-tsl"), DROP_IN.parents[1]):
        assert not path.exists(), path
    assert [path for path in free if path.exists() and not held(path)] == []
    # Nothing else named lrkp appeared anywhere (/run/lrkp-tsl stays while others use it).
    assert named_lrkp() - installed.before <= {str(locks)}
