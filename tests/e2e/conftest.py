"""Fixtures for end-to-end tests: a lab, Kamailio with lrkproxy (or rtpengine), SIPp, stub nodes.

Like tests/netns: without root these tests skip with the reason; under CI (CI=true) a missing
root (or a missing kamailio/sipp) is an error instead, so CI cannot pass by skipping.

`kamailio_build` runs a test once per Kamailio: Debian's 5.6 ("5.6") and the 6.x snapshot
built by scripts/build-kamailio.sh ("6.2"), built on first use into the machine's cache.
A missing source tarball skips the 6.x runs, naming why (the tarball is the workplace's, not
the repository's: see scripts/build-kamailio.sh for where it is looked for); a failed build
always fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from lrkp_lab.kamailio import DEBIAN_KAMAILIO, ROOT, KamailioBuild
from lrkp_lab.lab import Lab, address
from tests.e2e.stub_node import NodeConfig, StubNode

BUILD_SCRIPT = ROOT / "scripts" / "build-kamailio.sh"
NO_TARBALL = 3  # build-kamailio.sh's exit status when there is no source to build

STUB_PORT = 22333


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: runs Kamailio (lrkproxy) and SIPp in the lab (needs root)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path) or "tests\\e2e\\" in str(item.path):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.netns)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run the e2e tests")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        _unavailable("e2e tests need root (network namespaces)")
    for tool in ("kamailio", "sipp"):
        if shutil.which(tool) is None:
            _unavailable(f"e2e tests need {tool} (apt-get install kamailio sip-tester)")
    with Lab() as running:
        yield running


def _stub(lab: Lab, host: str) -> Iterator[StubNode]:
    internal, external = address(host, "int"), address(host, "ext")
    sock = lab.udp_socket(host, internal, STUB_PORT)
    with StubNode(sock, NodeConfig(str(internal), str(external)), max_seconds=300) as node:
        yield node


@pytest.fixture
def stub(lab: Lab) -> Iterator[StubNode]:
    """A stub node in `relay` on 10.201.1.1:22333 (internal 10.201.1.1, external 10.201.2.1)."""
    yield from _stub(lab, "relay")


@pytest.fixture
def stub2(lab: Lab) -> Iterator[StubNode]:
    """A stub node in `relay2` on 10.201.1.2:22333 (internal 10.201.1.2, external 10.201.2.2)."""
    yield from _stub(lab, "relay2")


_snapshot: list[KamailioBuild | str] = []  # the session's answer: a build, or why there is none


def snapshot_build() -> KamailioBuild:
    """The 6.x snapshot, built once per machine (cached outside the clone) on first use."""
    if not _snapshot:
        done = subprocess.run(
            [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1800, check=False
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode == NO_TARBALL:
            # Not an error even in CI: the source is the workplace's, not the repository's,
            # and a clone without it still tests everything else (the skip names why).
            _snapshot.append(f"SKIPPED 6.x: no Kamailio source to build: {done.stderr.strip()}")
        elif done.returncode != 0 or not lines:
            pytest.fail(f"scripts/build-kamailio.sh failed ({done.returncode}):\n{done.stderr}")
        else:
            prefix = Path(lines[-1])
            modules = sorted(prefix.glob("lib*/kamailio/modules/lrkproxy.so"))
            if not modules:
                pytest.fail(f"no lrkproxy.so under {prefix}")
            if not (modules[0].parent / "rtpengine.so").exists():  # the ng tests' module
                pytest.fail(f"no rtpengine.so beside {modules[0]}: rerun {BUILD_SCRIPT}")
            _snapshot.append(
                KamailioBuild(
                    "6.2",
                    str(prefix / "sbin" / "kamailio"),
                    f"{modules[0].parent}/",
                    sends_delete=True,
                )
            )
    found = _snapshot[0]
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture(params=["5.6", "6.2"])
def kamailio_build(request: pytest.FixtureRequest, lab: Lab) -> KamailioBuild:
    """Each Kamailio the e2e suite runs against (pass as `kamailio(..., build=...)`)."""
    return DEBIAN_KAMAILIO if request.param == "5.6" else snapshot_build()


@pytest.fixture
def kamailio6(lab: Lab) -> KamailioBuild:
    """The 6.x snapshot only: for what 5.6 cannot do (D, start_port/end_port)."""
    return snapshot_build()
