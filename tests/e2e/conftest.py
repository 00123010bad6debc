"""Fixtures for end-to-end tests: a lab, Debian's Kamailio with lrkproxy, SIPp, stub nodes.

Like tests/netns: without root these tests skip with the reason; under CI (CI=true) a missing
root (or a missing kamailio/sipp) is an error instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from lrkp_tsl.lab import Lab, address
from tests.e2e.stub_node import NodeConfig, StubNode

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


def _unavailable(reason: str) -> None:
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
