"""NAT latching for real: parties behind port-remapping NAT boxes, first packets counted.

The node runs as a daemon in the relay namespace with the default policy (`auto`). The
caller `c` sits behind `nat` (SDP 10.201.3.10, unreachable from the relay; media arrives
from 10.201.1.20:<random port>); the callee `d` behind `nat2` (10.201.4.10, media from
10.201.2.20:<random>); `b` (internal) and `x` (external) are directly reachable; `m` is a
stranger on the external network.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from lrkp_lab.calls import NODE_ARGS, Call, burst, running_node
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab, address
from lrkp_lab.node import Controller, Node
from lrkp_lab.parties import Peers
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.media import Endpoint

CONTROL = (str(INTERNAL_IP), 22333)
GUARD = 5.0  # the rebinding guard interval (lrkp_tsl/dataplane/silence.py GUARD)


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    with running_node(lab, *NODE_ARGS, "--log-level", "debug") as running:
        yield running


def nat_mapping(lab: Lab, box: str, inside: Endpoint) -> Endpoint:
    """The public address the NAT box gave `inside` (from its conntrack table)."""
    table = lab.run(box, "conntrack", "-L", "-p", "udp", check=False).stdout
    for line in table.splitlines():
        if f"src={inside.ip} " in line and f"sport={inside.port} " in line:
            # reply direction: src=<relay> dst=<public ip> sport=.. dport=<public port>
            reply = line.split("src=")[2]
            public_ip = re.search(r"dst=(\S+)", reply)
            public_port = re.search(r"dport=(\d+)", reply)
            assert public_ip and public_port
            return Endpoint.parse(public_ip.group(1), public_port.group(1))
    raise AssertionError(f"no NAT mapping for {inside} in {box}:\n{table}")


def test_caller_behind_nat_first_packets_delivered_both_ways(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("c", 4000), peers("b", 6000)
    caller_rtcp, callee_rtcp = peers("c", 4001), peers("b", 6001)
    call = Call(kamailio, caller, callee, 20000, "nat-1@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 10, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 10, b"B")
    burst(caller_rtcp, call.caller_relay.offset(1), callee_rtcp, call.callee_relay.offset(1),
          3, b"a")  # fmt: skip
    burst(callee_rtcp, call.callee_relay.offset(1), caller_rtcp, call.caller_relay.offset(1),
          3, b"b")  # fmt: skip
    callee.expect_nothing()
    caller.expect_nothing()
    public = nat_mapping(lab, "nat", caller.endpoint)
    assert public.ip == address("nat") and public.port != 4000
    assert f"[nat-1@lab] learned {public} at {call.caller_relay}" in node.output()
    public_rtcp = nat_mapping(lab, "nat", caller_rtcp.endpoint)
    assert f"[nat-1@lab] learned {public_rtcp} at {call.caller_relay.offset(1)}" in node.output()


def test_callee_first_then_caller_nothing_lost(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("c", 4010), peers("x", 6010)
    call = Call(kamailio, caller, callee, 20100, "silent-caller@lab", callee_side="ext")
    for seq in range(3):  # the caller is silent: nowhere to send these yet; held
        callee.send(call.callee_relay, b"early-%d" % seq)
    caller.expect_nothing()
    caller.send(call.caller_relay, b"hello")
    for seq in range(3):
        assert caller.expect(b"early-%d" % seq) == call.caller_relay
    assert callee.expect(b"hello") == call.callee_relay
    burst(callee, call.callee_relay, caller, call.caller_relay, 5, b"B")
    burst(caller, call.caller_relay, callee, call.callee_relay, 5, b"A")


def test_both_behind_nat_both_sending_first(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("c", 4020), peers("d", 6020)
    call = Call(kamailio, caller, callee, 20200, "both-nat@lab", callee_side="ext")
    caller.send(call.caller_relay, b"A-first")
    callee.send(call.callee_relay, b"B-first")
    assert callee.expect(b"A-first") == call.callee_relay
    assert caller.expect(b"B-first") == call.caller_relay
    burst(caller, call.caller_relay, callee, call.callee_relay, 5, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 5, b"B")
    assert f"learned {nat_mapping(lab, 'nat2', callee.endpoint)}" in node.output()


def test_nat_rebinding_relatches_after_the_guard_interval(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("c", 4030), peers("b", 6030)
    call = Call(kamailio, caller, callee, 20300, "rebind@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")
    caller.close()
    rebound = peers("c", 4032)  # the phone's NAT binding changed: a new public port
    rebound.send(call.caller_relay, b"too-soon")
    callee.expect_nothing()  # the latched source spoke < GUARD ago: a stranger
    time.sleep(GUARD + 0.5)
    burst(rebound, call.caller_relay, callee, call.callee_relay, 3, b"A2")
    burst(callee, call.callee_relay, rebound, call.caller_relay, 3, b"B2")
    assert f"[rebind@lab] relearned {nat_mapping(lab, 'nat', rebound.endpoint)}" in node.output()


def test_attacker_gets_nothing_and_the_call_is_unaffected(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    lab.run("m", "ip", "route", "replace", "10.201.1.0/24", "via", str(EXTERNAL_IP))
    try:
        caller, callee = peers("c", 4040), peers("x", 6040)
        call = Call(kamailio, caller, callee, 20400, "attacked@lab", callee_side="ext")
        burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")
        burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")
        attacker = peers("m", 6040)
        for seq in range(20):
            attacker.send(call.caller_relay, b"evil-%d" % seq)
            attacker.send(call.callee_relay, b"evil-%d" % seq)
            caller.send(call.caller_relay, b"A-%d" % seq)
            callee.send(call.callee_relay, b"B-%d" % seq)
            assert callee.expect(b"A-%d" % seq) == call.callee_relay
            assert caller.expect(b"B-%d" % seq) == call.caller_relay
        caller.expect_nothing()
        callee.expect_nothing()
        attacker.expect_nothing()
    finally:
        lab.run("m", "ip", "route", "del", "10.201.1.0/24", check=False)


def test_flood_does_not_break_an_ongoing_call(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("c", 4050), peers("x", 6050)
    call = Call(kamailio, caller, callee, 20500, "flooded@lab", callee_side="ext")
    burst(caller, call.caller_relay, callee, call.callee_relay, 2, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 2, b"B")
    flooder = peers("m", 9999)
    targets = [call.callee_relay, call.callee_relay.offset(1), Endpoint(EXTERNAL_IP, 21000)]
    for round_ in range(20):
        for _ in range(500):  # bounded: 30,000 packets in all
            for target in targets:
                flooder.send(target, b"x" * 160)
        caller.send(call.caller_relay, b"A-%d" % round_)
        callee.send(call.callee_relay, b"B-%d" % round_)
        assert callee.expect(b"A-%d" % round_) == call.callee_relay
        assert caller.expect(b"B-%d" % round_) == call.caller_relay
    counters = lab.run("relay", "nft", "list", "counters", "table", "ip", TABLE).stdout
    overlimit = re.search(r"queue_overlimit \{\s*packets (\d+)", counters)
    assert overlimit and int(overlimit.group(1)) > 0, counters
    flooder.close()
    time.sleep(0.5)
    assert node.proc.poll() is None
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"after")


def test_sdp_ip_set_to_the_public_address(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    """Kamailio with custom_sdp_ip_avp=$si: the SDP carries the NAT's public IP but the
    phone's private port; the NAT remapped the port. Same IP: learned at once."""
    caller, callee = peers("c", 4060), peers("b", 6060)
    call = Call(kamailio, caller, callee, 20600, "custom-ip@lab",
                caller_sdp=Endpoint(address("nat"), 4060))  # fmt: skip
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")


def test_held_packets_expire_when_the_other_party_stays_silent(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("c", 4070), peers("x", 6070)
    call = Call(kamailio, caller, callee, 20700, "never-answers@lab", callee_side="ext")
    for seq in range(3):
        callee.send(call.callee_relay, b"early-%d" % seq)
    time.sleep(2.0 + 1.0)  # the hold timeout, and a margin
    caller.send(call.caller_relay, b"late hello")
    assert callee.expect(b"late hello") == call.callee_relay
    caller.expect_nothing()  # the early packets were dropped, not delivered late
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")
    node.stop()
    assert "packets.hold_dropped=3" in node.output()
