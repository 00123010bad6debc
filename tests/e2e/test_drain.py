"""`lrkp-ctl drain` with Debian's Kamailio (lrkproxy.so, unchanged) and two nodes in one set.

A draining node answers `P` with an empty datagram, which lrkproxy takes as "does not
respond, disable it" at once: the next offer goes to the other node of the set. `S` and `D`
of calls already bound to the draining node still reach it and are served, so a live call
keeps relaying until it ends (docs/lrkp-ctl.md, "Drain").
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import Stream
from lrkp_lab.kamailio import KamailioBuild, call, kamailio
from lrkp_lab.lab import Lab
from lrkp_lab.node import Node
from lrkp_lab.parties import Peers
from lrkp_lab.sipmedia import endpoint
from tests.e2e.relaynode import NODE1, NODE2, start_node

CTL = (sys.executable, "-m", "lrkp_tsl.ctl")


@pytest.fixture
def nodes(lab: Lab) -> Iterator[tuple[Node, Node]]:
    first = start_node(lab, *NODE1)
    try:
        second = start_node(lab, *NODE2)
        try:
            yield first, second
        finally:
            second.close()
    finally:
        first.close()


def ctl(lab: Lab, host: str, *args: str) -> str:
    result = lab.run(host, *CTL, *args, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


# Per Kamailio: how many P a new offer sends the draining node (5.6 tests it as the chosen
# node, then again in its loop over disabled nodes; 6.x compiled that loop out), and where
# the first call after `undrain` goes (5.6 re-pings disabled nodes at every offer; 6.x in
# linear mode only when no node of the set is enabled, so node 2 keeps the calls).
PINGS_PER_OFFER = {"5.6": 2, "6.2": 1}
AFTER_UNDRAIN = {"5.6": "10.201.1.1", "6.2": "10.201.1.2"}


def test_drained_node_gets_no_new_call_and_its_live_call_keeps_relaying(
    lab: Lab, nodes: tuple[Node, Node], tmp_path: Path, kamailio_build: KamailioBuild
) -> None:
    node1, node2 = nodes
    version = kamailio_build.name
    sockets = ["udp:10.201.1.1:22333", "udp:10.201.1.2:22333"]
    with (
        kamailio(lab, tmp_path / "kam", sockets, alg=0, children=1, build=kamailio_build) as kam,
        call(lab, tmp_path / "live", caller="a", callee="x", pause_ms=9000) as live,
        Peers(lab) as peers,
    ):
        caller_sdp, callee_sdp = live.wait_answered()
        assert caller_sdp.endpoint[0] == "10.201.1.1"  # linear: the first node
        caller = peers("a", live.caller_rtp[1])
        callee = peers("x", live.callee_rtp[1])
        forward = Stream(caller, endpoint(caller_sdp), callee, b"A").start()
        backward = Stream(callee, endpoint(callee_sdp), caller, b"B").start()
        try:
            time.sleep(0.5)
            ctl(lab, "relay", "drain")
            assert json.loads(ctl(lab, "relay", "ping", "--json"))["draining"] is True

            # A new call: Kamailio's P to node 1 gets an empty datagram, so it disables
            # node 1 and takes node 2.
            with call(
                lab, tmp_path / "new", caller="b", callee="m",
                caller_rtp_port=30100, callee_rtp_port=32100, pause_ms=500,
            ) as new:  # fmt: skip
                new_caller_sdp, new_callee_sdp = new.wait_answered()
                assert new_caller_sdp.endpoint[0] == "10.201.1.2"
                assert new_callee_sdp.endpoint[0] == "10.201.2.2"
                new.wait_done()
            after_new = (len(forward.sent), len(backward.sent))
            time.sleep(1.0)  # the live call's media goes on meanwhile
        finally:
            forward.stop()
            backward.stop()
        # The live call on the drained node relayed every packet, both ways, throughout.
        # A drain that touched the live call would cut it: every packet from then on lost.
        # An isolated drop is the lab's (a loaded 2-core host drops the odd veth packet; the
        # same happens to tests that never drain), so up to 2% is tolerated.
        for stream, mark in zip((forward, backward), after_new, strict=True):
            assert len(stream.arrivals) > 50
            assert len(stream.lost()) <= len(stream.sent) // 50, stream.lost()
            assert any(seq >= mark for seq in stream.arrivals)  # relaying after the new call
        assert forward.sources == {endpoint(callee_sdp)}
        live.wait_done()
        assert "does not respond, disable it" in kam.log()
        stats = json.loads(ctl(lab, "relay", "stats", "--json"))
        # One P per test of the node, none retransmitted: the empty answer disabled it at
        # once.
        assert stats["counters"]["drain.ping_refused"] == PINGS_PER_OFFER[version]
        assert stats["gauges"]["draining"] == 1

        # Undrained: node 1 answers P again; whether Kamailio asks it depends on the version.
        ctl(lab, "relay", "undrain")
        with call(
            lab, tmp_path / "after", caller="b", callee="m",
            caller_rtp_port=30200, callee_rtp_port=32200, pause_ms=300,
        ) as after:  # fmt: skip
            after_caller_sdp, _ = after.wait_answered()
            assert after_caller_sdp.endpoint[0] == AFTER_UNDRAIN[version]
            after.wait_done()
    assert f"[{new.call_id}]" not in node1.output()
    assert f"[{new.call_id}] relaying" in node2.output()
    assert f"[{live.call_id}] relaying" in node1.output()
    after_node = node1 if AFTER_UNDRAIN[version] == "10.201.1.1" else node2
    assert f"[{after.call_id}] relaying" in after_node.output()


def test_draining_the_only_node_of_a_set_moves_no_call(
    lab: Lab, tmp_path: Path, kamailio_build: KamailioBuild
) -> None:
    """lrkproxy never tests a lone node it has enabled ("1 proxy, nothing to calculate"):
    it never sees the drained node's empty answer to `P`, and new calls keep coming. The
    node serves them (docs/lrkp-ctl.md, "Drain")."""
    node = start_node(lab, *NODE1)
    try:
        with kamailio(
            lab, tmp_path / "kam", ["udp:10.201.1.1:22333"], alg=0, children=1,
            build=kamailio_build,
        ) as kam:  # fmt: skip
            ctl(lab, "relay", "drain")
            with call(
                lab, tmp_path / "new", caller="b", callee="m",
                caller_rtp_port=30300, callee_rtp_port=32300, pause_ms=300,
            ) as new:  # fmt: skip
                caller_sdp, _callee_sdp = new.wait_answered()
                assert caller_sdp.endpoint[0] == "10.201.1.1"  # the drained node, still
                new.wait_done()
            assert "does not respond" not in kam.log()
        stats = json.loads(ctl(lab, "relay", "stats", "--json"))
        assert stats["gauges"]["draining"] == 1
        assert stats["counters"].get("drain.ping_refused", 0) == 0  # never asked
        assert f"[{new.call_id}] relaying" in node.output()
    finally:
        node.close()
