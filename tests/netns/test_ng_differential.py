"""lrkp-tsl's ng against Debian's rtpengine 10.5, exchange by exchange (tests/ng_corpus).

rtpengine runs in userspace in the lab's relay namespace (`--table=-1 --config-file=none
--delete-delay=0`, interfaces `internal` and `external` on the relay's two addresses), and
every exchange of the corpus is played to it and to lrkp-tsl, as Kamailio's default config
sends it. Each rewritten SDP is compared by meaning (lrkp_lab/sdpdiff.py: addresses and
port numbers may differ, nothing else); results and warnings must agree. The differences
that remain are listed in each case with why; a new one, or one that went away, fails.

lrkp-tsl's side is the real node on the same namespace's loopback (`lrkp-tsl run --ng
udp:127.0.0.1:2224`, relay ports 20000-20999 beside rtpengine's 30000-30999): every
exchange goes through its ng socket, front-end, engine, store and kernel. (Before the node
served ng, `ours` was the pure front-end in this process, lrkp_lab.ngpeer.FrontEndPeer.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab import ngcorpus, rtpengine
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.ngpeer import NgPeer, UdpNgPeer
from lrkp_lab.node import Node
from lrkp_lab.sdpdiff import unexpected

CASES = ngcorpus.cases()


@pytest.fixture(scope="module")
def theirs(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UdpNgPeer]:
    if not rtpengine.available():
        if os.environ.get("CI"):
            pytest.fail("rtpengine is missing: scripts/install-bench-deps.sh installs it")
        pytest.skip("rtpengine is not installed (scripts/install-bench-deps.sh)")
    log = Path(tmp_path_factory.mktemp("rtpengine")) / "rtpengine.log"
    with rtpengine.Rtpengine(lab, "relay", INTERNAL_IP, EXTERNAL_IP, log) as running:
        peer = running.peer()
        yield peer
        peer.close()


@pytest.fixture(scope="module")
def node(lab: Lab) -> Iterator[tuple[str, int]]:
    """The node serving ng at 127.0.0.1:2224 in the relay namespace, for the module."""
    args = ("--internal-ip", str(INTERNAL_IP), "--external-ip", str(EXTERNAL_IP),
            "--ports", "20000-20999", "--ng", "udp:127.0.0.1:2224", "--flush-on-exit")  # fmt: skip
    running = Node(lab, "relay", *args)
    address = ("127.0.0.1", 2224)
    try:
        wait_for_ng(lab, running, address)
        yield address
    finally:
        running.close()


def wait_for_ng(lab: Lab, running: Node, address: tuple[str, int]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert running.proc.poll() is None, running.output()
        peer = UdpNgPeer("probe", lab.udp_socket("relay", "127.0.0.1", 0), address, 0.3)
        try:
            if peer.request({"command": "ping"}).get("result") == "pong":
                return
        except OSError:
            pass
        finally:
            peer.close()
    raise AssertionError(f"node not answering ng ping:\n{running.output()}")


@pytest.fixture
def ours(lab: Lab, node: tuple[str, int]) -> Iterator[NgPeer]:
    peer = UdpNgPeer("lrkp-tsl", lab.udp_socket("relay", "127.0.0.1", 0), node)
    yield peer
    peer.close()


def test_corpus_is_not_empty() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_same_meaning_as_rtpengine(case: ngcorpus.Case, ours: NgPeer, theirs: UdpNgPeer) -> None:
    mine, other = ngcorpus.play(case, ours), ngcorpus.play(case, theirs)
    found = ngcorpus.differences(mine, other)
    extra, gone = unexpected(found, case.differences)
    assert not extra and not gone, (
        f"{case.name}: differences from rtpengine not in the case: {extra}; "
        f"expected ones that did not happen: {gone}"
    )
