"""Split brain: both nodes of a pair active at once, then one again.

What happens (README, "Split brain"), checked here with Kamailio and media:
- while the nodes cannot hear each other, keepalived makes both MASTER: each holds the
  VIPs, answers the commands and relays the packets that reach it (whichever node the
  neighbours' ARP caches point at), by its own map elements only;
- when they hear each other again, the node with the higher VRRP priority keeps the VIPs
  and sends gratuitous ARPs; the other becomes standby, makes its Redis a replica of the
  winner's and reloads the winner's table: the calls only it had (set up on it during the
  split) are removed there, logged in one line; their packets now reach the winner, which
  drops them (no elements): lost, never relayed to another call;
- nothing the winner had is lost (as long as the split is shorter than the idle timeout:
  a call whose media went to the other node meanwhile has none on the winner).
- With the Redis link still up (only VRRP lost), both nodes say SPLIT BRAIN.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import Stream, burst
from lrkp_lab.kamailio import call, kamailio
from lrkp_lab.lab import Lab
from lrkp_lab.pairlab import INTERNAL_VIP, heal_split, mac, neighbour_mac, split, vip_holders
from lrkp_lab.pairnodes import CONTROL, RATE, Members, flows, running_pair
from lrkp_lab.parties import Peers
from lrkp_lab.sipmedia import parties
from lrkp_lab.waiting import wait_for


@pytest.fixture
def members(lab: Lab) -> Iterator[Members]:
    with running_pair(lab, idle=60) as made:
        yield made


def after(stream: Stream, moment: float) -> int:
    return sum(1 for at in stream.arrivals.values() if at > moment)


def test_a_split_brain_keeps_the_winners_calls_and_crosses_none(
    lab: Lab, members: Members, peers: Peers, tmp_path: Path
) -> None:
    relay, relay2 = members.nodes["relay"], members.nodes["relay2"]
    with (
        kamailio(lab, tmp_path / "kam", [f"udp:{CONTROL[0]}:{CONTROL[1]}"]),
        call(lab, tmp_path / "a", caller="c", callee="b", pause_ms=120_000) as first,
        contextlib.ExitStack() as streams,  # stopped also when an assertion fails
    ):
        # Call A, before the split: on relay, replicated to relay2.
        c, to_c, b, to_b = parties(peers, first, *first.wait_answered(20.0))
        burst(c, to_c, b, to_b, 1, b"hello")
        a_out = streams.enter_context(Stream(c, to_c, b, b"A", RATE))
        a_back = streams.enter_context(Stream(b, to_b, c, b"a", RATE))
        wait_for("the standby holds A", lambda: members.pair_status("relay2")["calls"] == 1)

        # The link between the nodes is cut: both become MASTER.
        split(lab)
        wait_for("both hold the VIPs", lambda: len(vip_holders(lab)) == 2, 5.0)
        relay2.wait_log("active: this node holds the relay addresses; 1 calls", 2.0)
        # relay2's gratuitous ARPs took every neighbour (Kamailio, A's parties): relay
        # still holds the VIPs but hears nothing.
        relay2_mac = mac(lab, "relay2", "int0")
        wait_for("Kamailio reaches relay2",
                 lambda: neighbour_mac(lab, "sip", INTERNAL_VIP) == relay2_mac, 5.0)  # fmt: skip
        with call(lab, tmp_path / "b", caller="a", callee="x", caller_rtp_port=30100,
                  callee_rtp_port=32100, pause_ms=120_000) as second:  # fmt: skip
            a, to_a, x, to_x = parties(peers, second, *second.wait_answered(20.0))
            burst(a, to_a, x, to_x, 1, b"B-hello")
            b_out = streams.enter_context(Stream(a, to_a, x, b"B", RATE))
            b_back = streams.enter_context(Stream(x, to_x, a, b"b", RATE))
            time.sleep(1.0)
            assert f"[{second.call_id}] relaying" in relay2.output()
            assert f"[{second.call_id}]" not in relay.output()  # B exists on relay2 only
            assert after(a_out, time.monotonic() - 0.5) > 0  # A goes on, through relay2

            # VRRP hears both again: relay (priority 150) keeps the VIPs, relay2 follows.
            healed = time.monotonic()
            heal_split(lab)
            wait_for("relay alone holds the VIPs", lambda: vip_holders(lab) == ["relay"], 5.0)
            relay2.wait_log("standby: the relay addresses are elsewhere", 2.0)
            relay2.wait_log("calls of this node are not on the active node: removed", 5.0)
            wait_for(  # relay's gratuitous ARPs reach every neighbour
                "the neighbours at relay",
                lambda: neighbour_mac(lab, "a", INTERNAL_VIP) not in (None, relay2_mac),
                5.0,
            )
            time.sleep(2.0)
            streams.close()
    print(
        f"A (relay's): lost {len(a_out.lost())}/{len(a_back.lost())} of "
        f"{len(a_out.sent)}/{len(a_back.sent)}, longest gap "
        f"{max(a_out.longest_gap(), a_back.longest_gap()):.3f} s; B (set up on relay2 "
        f"during the split): {after(b_out, healed + 1.0)}/{after(b_back, healed + 1.0)} "
        "packets after the heal"
    )
    # Nothing crossed: every party heard only its own call, from its own relay address.
    for stream in (a_out, a_back, b_out, b_back):
        assert stream.foreign == []
    assert a_out.sources == {to_b} and a_back.sources == {to_c}
    # The winner lost no call: A went on through relay2 during the split, and through
    # relay again after it (a few packets in each switch of the neighbours' ARP).
    assert after(a_out, healed + 1.0) > 0 and after(a_back, healed + 1.0) > 0
    assert max(a_out.longest_gap(), a_back.longest_gap()) < 1.0
    # B was only relay2's: gone with the heal, its packets dropped by relay.
    assert after(b_out, healed + 1.0) == 0 and after(b_back, healed + 1.0) == 0
    assert f"[{second.call_id}] removed" in relay2.output()
    wait_for("the standby in sync again", lambda: members.pair_status("relay2")["in_sync"])
    assert members.ctl("relay", "ping")["calls"] == members.ctl("relay2", "ping")["calls"] == 1
    assert flows(lab, "relay") == flows(lab, "relay2")


def test_both_nodes_say_split_brain_when_only_vrrp_is_lost(lab: Lab, members: Members) -> None:
    split(lab, vrrp_only=True)  # Redis still crosses: each sees the other's
    try:
        wait_for("both hold the VIPs", lambda: len(vip_holders(lab)) == 2, 5.0)
        for host in ("relay", "relay2"):
            members.nodes[host].wait_log("SPLIT BRAIN: the peer node is active too", 5.0)
            status = members.pair_status(host)
            assert status["role"] == "active" and status["split_brain"], status
            assert members.metrics(host)["lrkp_pair_in_sync"] == 0
    finally:
        heal_split(lab)
    wait_for("relay alone holds the VIPs", lambda: vip_holders(lab) == ["relay"], 5.0)
    wait_for("in sync again", lambda: members.pair_status("relay")["in_sync"], 15.0)
    assert not members.pair_status("relay")["split_brain"]
    assert members.pair_status("relay2")["role"] == "standby"
