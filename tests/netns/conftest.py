"""Fixtures for tests that run against the real kernel in a lab of network namespaces.

Without root these tests skip with the reason; under CI (CI=true) a missing root is an
error instead, so a misconfigured CI cannot pass by skipping everything.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from lrkp_lab.calls import KAMAILIO_IP
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, clear_host
from lrkp_lab.parties import PORTS, Peers
from lrkp_tsl.dataplane import DataPlane


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/netns/" in str(item.path) or "tests\\netns\\" in str(item.path):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("netns tests need root, and CI must run them: run CI as root")
        pytest.skip("netns tests need root (network namespaces, nftables, conntrack)")
    with Lab() as running:
        yield running


@pytest.fixture
def dataplane(lab: Lab) -> Iterator[DataPlane]:
    """A started data plane in the relay namespace, removed after the test."""
    with lab.inside("relay"):
        plane = DataPlane()
        plane.start([INTERNAL_IP, EXTERNAL_IP], PORTS, 60)
    try:
        yield plane
    finally:
        plane.shutdown(flush=True)
        lab.run("relay", "conntrack", "-F", check=False)


@pytest.fixture
def peers(lab: Lab) -> Iterator[Peers]:
    with Peers(lab) as made:
        yield made


@pytest.fixture
def nodes(lab: Lab) -> Iterator[list[Node]]:
    """Nodes a test starts in the relay namespace (it appends them); all killed at the end,
    as a crash would, and the relay namespace and the NAT box cleared."""
    started: list[Node] = []
    yield started
    for node in started:
        node.stop(signal.SIGKILL)
    clear_host(lab, "relay")
    lab.run("nat", "conntrack", "-F", check=False)


@pytest.fixture
def kamailio(lab: Lab) -> Iterator[Controller]:
    """A controlling-layer stand-in on Kamailio's address. A test that also takes its
    module's `node` fixture names it first: the node starts before, and stops after."""
    client = Controller(lab, "sip", KAMAILIO_IP)
    yield client
    client.close()
