"""An active/standby pair keeps live calls through the loss of a node.

relay (10.201.1.1) and relay2 (10.201.1.2) share the VIPs 10.201.1.100 (internal) and
10.201.2.100 (external) with keepalived (VRRPv3, advert 0.1 s, nopreempt); each runs its
own redis-server and node. The node on relay holds the VIPs first: it is active, and the
node on relay2 follows it through Redis. Kamailio (Debian's, lrkproxy.so) points at the
control VIP. The failure: SIGKILL the active's daemon and keepalived, and take its links
down, mid-call.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import Stream, burst
from lrkp_lab.kamailio import call, kamailio
from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.pairlab import INTERNAL_VIP
from lrkp_lab.pairnodes import (
    CONTROL,
    IDLE,
    RATE,
    Members,
    flows,
    running_pair,
    wait_same_flows,
)
from lrkp_lab.parties import Peers
from lrkp_lab.sipmedia import parties
from lrkp_lab.waiting import wait_for
from lrkp_tsl.media import Endpoint


@pytest.fixture
def members(lab: Lab) -> Iterator[Members]:
    with running_pair(lab) as made:
        yield made


def take_over(members: Members) -> float:
    """Kill the active node as a crash would; seconds until relay2 holds the VIPs."""
    members.nodes["relay"].proc.send_signal(signal.SIGKILL)
    crashed = time.monotonic()
    members.keepalived.crash("relay")
    return members.keepalived.wait_holder("relay2", 2.0) - crashed


def a_new_call_is_relayed_by(node: Node, lab: Lab, peers: Peers, workdir: Path) -> None:
    """A call a -> x through Kamailio: set up on `node`, and relayed by it both ways."""
    with call(lab, workdir, caller="a", callee="x", caller_rtp_port=30100,
              callee_rtp_port=32100, pause_ms=1000) as second:  # fmt: skip
        party_a, to_a, party_x, to_x = parties(peers, second, *second.wait_answered())
        burst(party_a, to_a, party_x, to_x, 3, b"A2")
        burst(party_x, to_x, party_a, to_a, 3, b"B2")
        second.wait_done()
    assert f"[{second.call_id}] relaying" in node.output()


def test_a_call_survives_the_loss_of_the_active_node(
    lab: Lab, members: Members, peers: Peers, tmp_path: Path
) -> None:
    with (
        kamailio(lab, tmp_path / "kam", [f"udp:{CONTROL[0]}:{CONTROL[1]}"]),
        call(lab, tmp_path / "call", caller="c", callee="b", pause_ms=25000) as made,
    ):
        caller, to_a, callee, to_b = parties(peers, made, *made.wait_answered())
        assert to_a.ip == INTERNAL_VIP and to_b.ip == INTERNAL_VIP
        burst(caller, to_a, callee, to_b, 1, b"hello")  # the NAT'd caller is learned...
        wait_same_flows(lab, 2.0)  # ...and the standby holds its learned flows too
        forward = Stream(caller, to_a, callee, b"A", RATE).start()
        backward = Stream(callee, to_b, caller, b"B", RATE).start()
        time.sleep(1.0)
        take_over(members)
        time.sleep(2.0)
        forward.stop()
        backward.stop()
        for stream in (forward, backward):
            gap = stream.longest_gap()
            print(
                f"{stream.tag!r}: gap {gap:.3f} s, lost {len(stream.lost())} of {len(stream.sent)}"
            )
            assert gap < 1.0, f"media resumed after {gap:.3f} s"
            assert len(stream.lost()) <= gap * RATE + 2, (len(stream.lost()), gap)
            assert stream.foreign == []
        assert forward.sources == {to_b} and backward.sources == {to_a}  # the same relay
        new_active = members.nodes["relay2"]
        new_active.wait_log("active: this node holds the relay addresses", 2.0)

        # A new call through Kamailio is set up and relayed by the new active node.
        a_new_call_is_relayed_by(new_active, lab, peers, tmp_path / "call2")

        # The call from before the takeover is managed: D (Kamailio 5.7+) removes it.
        stand_in = Controller(lab, "sip", "10.201.1.5")
        try:
            # As Kamailio 5.7+ sends it for a call it knows only by Call-ID.
            body = ("D " + " " * 8 + f"60 {made.call_id} ").encode()
            assert stand_in.command(body, CONTROL) == body + b"OK"
        finally:
            stand_in.close()
        caller.send(to_a, b"after D")
        callee.expect_nothing()

    # The old active comes back (links, keepalived, node): standby, in sync with the active.
    members.keepalived.recover("relay")
    returning = members.start_node("relay", state=members.nodes["relay"].state)
    synced = returning.wait_log("following: the active node's table loaded", 5.0)
    assert wait_same_flows(lab, 1.0) < 1.0
    members.keepalived.wait_holder("relay2", 0.1)  # nopreempt: relay stays backup
    assert "active: this node holds" not in returning.output().split("node up")[-1]
    print(f"returning node in sync {synced:.3f} s after its start")


def test_a_thousand_live_calls_relay_after_a_takeover(
    lab: Lab, members: Members, peers: Peers
) -> None:
    stand_in = Controller(lab, "sip", "10.201.1.5")
    try:
        for index in range(1000):
            port = 20000 + 2 * index  # gt=1: one relay endpoint per call
            body = set_command("S", "10.201.1.10", str(INTERNAL_VIP), str(INTERNAL_VIP),
                               "10.201.1.11", 4000, port, port, 6000,
                               f"many-{index}@lab")  # fmt: skip
            assert stand_in.command(body, CONTROL) == body + b"OK"
    finally:
        stand_in.close()
    wait_same_flows(lab, 5.0)
    assert len(flows(lab, "relay2")) == 4000
    take_over(members)
    caller, callee = peers("a", 4000), peers("b", 6000)
    # relay2 holds the VIPs; host a sends to relay2 once keepalived's gratuitous ARP has
    # reached it (a packet sent before goes to the dead node's MAC: lost, as on a real
    # network during a takeover). Bounded wait for that, on call 0; then every sampled call
    # must deliver its first packet.
    first = Endpoint(INTERNAL_VIP, 20000)
    deadline = time.monotonic() + 3.0
    while True:
        caller.send(first, b"probe")
        got = callee.receive(0.2)
        if got is not None:
            assert got == (b"probe", first)
            break
        assert time.monotonic() < deadline, "nothing relayed within 3 s of the takeover"
    while (late := callee.receive(0.3)) is not None:  # an earlier probe, delayed
        assert late == (b"probe", first)
    for index in range(0, 1000, 20):  # a sample of 50 calls
        relay = Endpoint(INTERNAL_VIP, 20000 + 2 * index)
        caller.send(relay, b"call-%d" % index)
        assert callee.expect(b"call-%d" % index) == relay
    # Calls from before the takeover still end by themselves (no media for IDLE).
    members.nodes["relay2"].wait_log("removed: no media for 5 s", IDLE + 15)


def calls_held(members: Members, host: str) -> int:
    return int(members.ctl(host, "ping")["calls"])


@pytest.mark.parametrize("examples", [False, True], ids=["lab-configs", "shipped-examples"])
def test_a_takeover_keeps_every_call_until_its_own_idle_timeout(
    lab: Lab, peers: Peers, tmp_path: Path, examples: bool
) -> None:
    """Issue 19's bar: a NAT'd caller with media and 300 calls without media yet (ringing,
    or before their first packet), all through Kamailio; the new active still holds all
    301 twelve seconds after the takeover (their idle timeout is 60 s), media resumed
    within a second, and a new call is relayed. `examples`: Redis and keepalived run the
    files of examples/ as shipped, only addresses, interfaces and paths filled in."""
    with (
        running_pair(lab, idle=60, examples=examples) as members,
        kamailio(lab, tmp_path / "kam", [f"udp:{CONTROL[0]}:{CONTROL[1]}"], children=4),
        call(
            lab,
            tmp_path / "quiet",
            caller="a",
            callee="x",
            caller_rtp_port=30200,
            callee_rtp_port=32200,
            pause_ms=120_000,
            count=300,
            rate=50,
        ) as quiet,  # fmt: skip
        call(lab, tmp_path / "media", caller="c", callee="b", pause_ms=120_000) as made,
    ):
        caller, to_a, callee, to_b = parties(peers, made, *made.wait_answered(20.0))
        burst(caller, to_a, callee, to_b, 1, b"hello")  # the NAT'd caller is learned
        forward = Stream(caller, to_a, callee, b"A", RATE).start()
        backward = Stream(callee, to_b, caller, b"B", RATE).start()
        wait_for("301 calls on the active", lambda: calls_held(members, "relay") == 301, 30.0)
        wait_for(
            "the standby in sync with 301 calls",
            lambda: (status := members.pair_status("relay2"))["in_sync"] and status["calls"] == 301,
            10.0,
        )
        took = take_over(members)
        taken = time.monotonic()
        new_active = members.nodes["relay2"]
        new_active.wait_log("active: this node holds the relay addresses; 301 calls", 2.0)
        time.sleep(max(0.0, taken + 12.0 - time.monotonic()))
        held = calls_held(members, "relay2")
        forward.stop()
        backward.stop()
        assert held == 301, new_active.output()[-3000:]
        assert "removed: no media" not in new_active.output()
        for stream in (forward, backward):
            gap = stream.longest_gap()
            print(f"{stream.tag!r}: VIPs moved {took:.3f} s, gap {gap:.3f} s, lost "
                  f"{len(stream.lost())} of {len(stream.sent)}")  # fmt: skip
            assert gap < 1.0, f"media resumed after {gap:.3f} s"
            assert stream.foreign == []
        assert forward.sources == {to_b} and backward.sources == {to_a}

        # A new call through Kamailio is set up and relayed by the new active node (SIPp
        # of the 300 calls is stopped first: a and x are the new call's parties; Kamailio
        # 5.6 sends no D, so their calls stay on the node).
        quiet.stop()
        a_new_call_is_relayed_by(new_active, lab, peers, tmp_path / "new")
