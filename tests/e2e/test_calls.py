"""Calls through Kamailio (lrkproxy.so, unchanged) and SIPp, relayed by our node.

Tests taking `kamailio_build` run against Debian's 5.6 and the 6.x snapshot; the others
against 5.6 (what only 6.x does is in test_kamailio6.py).

The node runs for real (`lrkp-tsl run`) in the lab's relay namespace(s); media is RTP sent
by Python sockets bound on the SDP ports of each party, to the relay address each party
found in the SDP it received — exactly what a phone does.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import both_ways
from lrkp_lab.kamailio import KamailioBuild, call, kamailio
from lrkp_lab.lab import Lab
from lrkp_lab.node import Node
from lrkp_lab.parties import Peers
from lrkp_lab.sipmedia import endpoint, media_both_ways, parties
from lrkp_tsl.dataplane.nft import TABLE
from tests.e2e.relaynode import IDLE, NODE1, NODE2, conntrack, start_node


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    running = start_node(lab, *NODE1)
    yield running
    running.close()


@pytest.fixture
def node2(lab: Lab) -> Iterator[Node]:
    running = start_node(lab, *NODE2)
    yield running
    running.close()


def test_call_through_kamailio_relayed_by_the_kernel(
    lab: Lab, node: Node, tmp_path: Path, kamailio_build: KamailioBuild
) -> None:
    with (
        kamailio(lab, tmp_path / "kam", ["udp:10.201.1.1:22333"], build=kamailio_build),
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=2500) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        assert caller_sdp.endpoint[0] == callee_sdp.endpoint[0] == "10.201.1.1"
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=20)
        # In the kernel: one conntrack entry for the stream, NATed both ways, counting
        # every packet; and no socket of the node on any relay port.
        table = conntrack(lab, "relay")
        caller_ip, caller_port = made.caller_rtp
        callee_ip, callee_port = made.callee_rtp
        relay_a, relay_b = endpoint(caller_sdp), endpoint(callee_sdp)
        pattern = (
            rf"src={caller_ip} dst={relay_a.ip} sport={caller_port} dport={relay_a.port} "
            rf"packets=20 .*src={callee_ip} dst={relay_b.ip} sport={callee_port} "
            rf"dport={relay_b.port} packets=20"
        )
        assert re.search(pattern, table), table
        sockets = lab.run("relay", "ss", "-Hunap").stdout
        assert not re.search(r":2[01]\d\d\d\s", sockets), sockets
        made.wait_done()
    assert f"[{made.call_id}] relaying" in node.output()


def test_shared_port_mode_gt1(
    lab: Lab, node: Node, tmp_path: Path, kamailio_build: KamailioBuild
) -> None:
    with (
        kamailio(lab, tmp_path / "kam", ["udp:10.201.1.1:22333"], gt=1, build=kamailio_build),
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=2000) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        assert endpoint(caller_sdp) == endpoint(callee_sdp)  # one relay port for both legs
        media_both_ways(lab, made, caller_sdp, callee_sdp)
        made.wait_done()


def test_call_bridged_from_internal_to_external(lab: Lab, node: Node, tmp_path: Path) -> None:
    with (
        kamailio(lab, tmp_path / "kam", ["udp:10.201.1.1:22333"]),
        call(lab, tmp_path / "call", caller="a", callee="x", pause_ms=2000) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        assert caller_sdp.endpoint[0] == "10.201.1.1"  # "ei" on the 200: internal to a
        assert callee_sdp.endpoint[0] == "10.201.2.1"  # "ie" on the INVITE: external to x
        media_both_ways(lab, made, caller_sdp, callee_sdp)
        made.wait_done()


def test_two_nodes_round_robin_both_carry_calls(
    lab: Lab, node: Node, node2: Node, tmp_path: Path
) -> None:
    used = set()
    with kamailio(
        lab, tmp_path / "kam", ["udp:10.201.1.1:22333", "udp:10.201.1.2:22333"], alg=1, children=1
    ):
        for index in range(4):
            with call(
                lab,
                tmp_path / f"call{index}",
                caller="a",
                callee="b",
                caller_rtp_port=30000 + 4 * index,
                callee_rtp_port=32000 + 4 * index,
                pause_ms=1000,
            ) as made:
                caller_sdp, callee_sdp = made.wait_answered()
                used.add(caller_sdp.endpoint[0])
                media_both_ways(lab, made, caller_sdp, callee_sdp, packets=3)
                made.wait_done()
    assert used == {"10.201.1.1", "10.201.1.2"}
    assert "relaying" in node.output() and "relaying" in node2.output()


def test_linear_failover_to_second_node(lab: Lab, node: Node, node2: Node, tmp_path: Path) -> None:
    with kamailio(
        lab, tmp_path / "kam", ["udp:10.201.1.1:22333", "udp:10.201.1.2:22333"], alg=0, children=1
    ):
        with call(lab, tmp_path / "first", caller="a", callee="b", pause_ms=500) as made:
            caller_sdp, _ = made.wait_answered()
            assert caller_sdp.endpoint[0] == "10.201.1.1"  # linear: the first node
            made.wait_done()
        assert node.stop(signal.SIGTERM) == 0
        with call(lab, tmp_path / "second", caller="a", callee="b", pause_ms=1500) as made:
            caller_sdp, callee_sdp = made.wait_answered()
            assert caller_sdp.endpoint[0] == "10.201.1.2"
            media_both_ways(lab, made, caller_sdp, callee_sdp, packets=5)
            made.wait_done()
    assert f"[{made.call_id}] relaying" in node2.output()


def test_call_expires_after_bye_without_d(lab: Lab, node: Node, tmp_path: Path) -> None:
    with (
        kamailio(lab, tmp_path / "kam", ["udp:10.201.1.1:22333"]),
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=1000) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=5)
        made.wait_done()  # BYE sent and answered; Kamailio 5.6 sends no D
    call_id = made.call_id
    assert call_id is not None
    assert call_id in lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout
    node.wait_log(f"[{call_id}] removed", IDLE * 4)
    assert f"[{call_id}] removed: no media for {IDLE:g} s" in node.output()
    assert call_id not in lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout
    relay = endpoint(caller_sdp)
    assert f"dport={relay.port} " not in conntrack(lab, "relay")


@pytest.mark.parametrize("first", ["caller", "callee"])
def test_caller_behind_nat_through_kamailio(
    lab: Lab, node: Node, tmp_path: Path, first: str, kamailio_build: KamailioBuild
) -> None:
    """A phone behind a port-remapping NAT, its private address in the SDP (Kamailio's
    default config: no custom_sdp_ip_avp). The node learns the NAT's address from the
    first packet; every packet, the first of each direction included, is delivered."""
    with (
        kamailio(lab, tmp_path / "kam", ["udp:10.201.1.1:22333"], build=kamailio_build),
        call(lab, tmp_path / "call", caller="c", callee="x", pause_ms=2500) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        with Peers(lab) as peers:
            caller, to_a, callee, to_b = parties(peers, made, caller_sdp, callee_sdp)
            if first == "callee":
                for seq in range(3):  # held until the caller's first packet
                    callee.send(to_b, b"early-%d" % seq)
                caller.send(to_a, b"hello")
                for seq in range(3):
                    assert caller.expect(b"early-%d" % seq) == to_a
                assert callee.expect(b"hello") == to_b
            both_ways(caller, to_a, callee, to_b, 10)
            caller.expect_nothing()
            callee.expect_nothing()
        made.wait_done()
    assert re.search(
        rf"\[{re.escape(made.call_id or '')}\] learned 10\.201\.1\.20:\d+", node.output()
    )
