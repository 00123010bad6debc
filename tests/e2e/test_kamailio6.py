"""What only Kamailio 5.7+ does, against the 6.x snapshot (scripts/build-kamailio.sh).

- `D` on BYE: the call's kernel state (map elements, conntrack entries) goes at once;
- `D` for a call that never got its `S` (CANCEL before the answer, a 486), with empty
  SNAT/DNAT fields: answered as the module expects (the request + `OK`), nothing changes;
- the `start_port`/`end_port` modparams: inside the node's range they pick the relay ports;
  outside it the node refuses the whole call, loudly (`E relay-port`, a warning naming both
  ranges) and nothing is half-installed;
- the random cookie with its trailing space, and a retransmitted command (its first reply
  lost): answered identically, applied once.

Kamailio talks to the node through a recording forwarder (control_tap.py) where the test
needs the exact bytes on the wire.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import both_ways
from lrkp_lab.kamailio import KamailioBuild, call, kamailio
from lrkp_lab.lab import Lab
from lrkp_lab.node import Node
from lrkp_lab.parties import Peers
from lrkp_lab.sipmedia import media_both_ways, parties
from lrkp_tsl.dataplane.nft import TABLE
from tests.e2e.control_tap import ControlTap
from tests.e2e.relaynode import NODE1, conntrack, start_node
from tests.e2e.stub_node import Request

NODE_URL = "udp:10.201.1.1:22333"
NODE_ADDR = ("10.201.1.1", 22333)
LONG_IDLE = 60.0  # no call here may end by expiry: only `D` ends it


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    running = start_node(lab, *NODE1, idle=LONG_IDLE)
    yield running
    running.close()


def table(lab: Lab) -> str:
    """The node's nft table, without counters (control traffic moves them)."""
    text = lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def relay_flows(lab: Lab) -> list[str]:
    """conntrack entries to a relay port (20000-21999) in the relay namespace."""
    return [
        line
        for line in conntrack(lab, "relay").splitlines()
        if re.search(r"dport=2[01]\d\d\d ", line)
    ]


def fields(data: bytes) -> dict[str, str]:
    return Request(data, ("", 0), 0.0).fields


def test_bye_sends_d_and_the_kernel_state_is_gone_at_once(
    lab: Lab, node: Node, kamailio6: KamailioBuild, tmp_path: Path
) -> None:
    with (
        ControlTap(lab, NODE_ADDR) as tap,
        kamailio(lab, tmp_path / "kam", [tap.url], build=kamailio6),
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=2500) as made,
        Peers(lab) as peers,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        caller, to_a, callee, to_b = parties(peers, made, caller_sdp, callee_sdp)
        both_ways(caller, to_a, callee, to_b, 20)
        (caller_ip, caller_port), (callee_ip, callee_port) = made.caller_rtp, made.callee_rtp
        flow = (
            rf"src={caller_ip} dst={to_a.ip} sport={caller_port} dport={to_a.port} "
            rf"packets=20 .*src={callee_ip} dst={to_b.ip} sport={callee_port} "
            rf"dport={to_b.port} packets=20"
        )
        assert re.search(flow, conntrack(lab, "relay")), conntrack(lab, "relay")
        call_id = made.call_id
        assert call_id is not None and call_id in table(lab)
        assert not tap.commands("D")

        made.wait_done()  # BYE: Kamailio sends D (and waits for its reply) before relaying it
        # At once, no waiting: the D was answered before the BYE went on.
        deletes = tap.commands("D")
        assert len(deletes) == 1, tap.seen
        sent = fields(deletes[0].data)
        assert sent["call_id"] == call_id
        assert (sent["dst_port"], sent["snat_port"]) == (str(to_b.port), str(to_a.port))
        assert [r.data for r in tap.replies("D")] == [deletes[0].data + b"OK"]
        assert call_id not in table(lab)
        assert relay_flows(lab) == []
        assert f"[{call_id}] removed: deleted by the controlling layer (D)" in node.output()

        # A packet after the D is not relayed, either way.
        caller.send(to_a, b"after-bye")
        callee.send(to_b, b"after-bye")
        callee.expect_nothing()
        caller.expect_nothing()
    assert f"[{call_id}] removed: no media" not in node.output()


@pytest.mark.parametrize(
    ("uac", "uas"),
    [
        ("uac_cancel.xml", "uas_cancel.xml"),  # CANCEL before the answer
        ("uac_486.xml", "uas_486.xml"),  # a failure reply
        ("uac_408.xml", "uas_silent.xml"),  # no reply at all: tm's 408, the failure route
    ],
)
def test_d_for_a_call_that_never_got_its_s_changes_nothing(
    lab: Lab, node: Node, kamailio6: KamailioBuild, tmp_path: Path, uac: str, uas: str
) -> None:
    before = table(lab)
    with (
        ControlTap(lab, NODE_ADDR) as tap,
        kamailio(lab, tmp_path / "kam", [tap.url], build=kamailio6) as running,
        call(
            lab, tmp_path / "call", caller="a", callee="b", uac_scenario=uac, uas_scenario=uas
        ) as made,
    ):
        made.wait_done()
        deletes = tap.commands("D")
        assert deletes, f"no D sent:\n{running.log()[-3000:]}"
        call_id = made.call_id
        assert call_id is not None
        for delete in deletes:
            sent = fields(delete.data)
            assert sent["call_id"] == call_id
            # Before an answer the module has no SNAT/DNAT yet: empty fields, double spaces.
            assert sent["snat_ip"] == sent["dnat_ip"] == sent["snat_port"] == ""
            assert sent["dst_port"] != "" and b"  " in delete.data
        assert tap.commands("S") == []
        # Answered as the module expects: the request + OK, once per D, and accepted.
        assert [r.data for r in tap.replies("D")] == [d.data + b"OK" for d in deletes]
        assert tap.replies("E") == []
        log = running.log()
        assert "Rule remove successfully" in log
        assert "does not respond" not in log and "timeout waiting reply" not in log
    # Nothing changed, nothing left behind.
    assert table(lab) == before
    assert relay_flows(lab) == []
    assert call_id not in node.output()


def test_start_and_end_port_from_the_kamailio_cfg_pick_the_relay_ports(
    lab: Lab, node: Node, kamailio6: KamailioBuild, tmp_path: Path
) -> None:
    with (
        kamailio(
            lab, tmp_path / "kam", [NODE_URL], build=kamailio6, start_port=21000, end_port=21096
        ),
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=1500) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        # The first block of the cfg's range (the node's G reply said 20000).
        assert (callee_sdp.port, caller_sdp.port) == (21000, 21002)
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=5)
        made.wait_done()
    assert f"[{made.call_id}] relaying" in node.output()


def test_start_and_end_port_outside_the_node_range_refuse_the_whole_call_loudly(
    lab: Lab, node: Node, kamailio6: KamailioBuild, tmp_path: Path
) -> None:
    before = table(lab)
    with (
        ControlTap(lab, NODE_ADDR) as tap,
        kamailio(
            lab, tmp_path / "kam", [tap.url], build=kamailio6, start_port=30000, end_port=30096
        ),
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=1000) as made,
        Peers(lab) as peers,
    ):
        caller_sdp, callee_sdp = made.wait_answered(timeout=15)
        assert (callee_sdp.port, caller_sdp.port) == (30000, 30002)
        # Every S (Kamailio retries lrkproxy_retr times: the module ignores an E reply)
        # was refused with the reason; none was accepted.
        sets = tap.commands("S")
        refusals = [r.data for r in tap.seen if r.direction == "reply"]
        assert sets and len(refusals) >= len(sets)
        assert tap.replies("S") == []
        for reply in tap.replies("E"):
            assert b" E relay-port dst_port 30000 (RTCP 30001) is outside this node's ports " in (
                reply.data
            )
        assert table(lab) == before
        # No half-relayed call: nothing goes through in either direction.
        caller, to_a, callee, to_b = parties(peers, made, caller_sdp, callee_sdp)
        caller.send(to_a, b"nothing")
        callee.send(to_b, b"nothing")
        callee.expect_nothing()
        caller.expect_nothing()
        made.wait_done()
    output = node.output()
    assert "dst_port 30000 (RTCP 30001) is outside this node's ports 20000-21999" in output
    assert "start_port 20000 and end_port 21996" in output  # the fix, named
    assert f"[{made.call_id}] relaying" not in output
    assert relay_flows(lab) == []


def test_random_cookie_and_a_retransmitted_s_are_answered_alike_and_applied_once(
    lab: Lab, node: Node, kamailio6: KamailioBuild, tmp_path: Path
) -> None:
    with (
        ControlTap(lab, NODE_ADDR, lose_first_reply={"S"}) as tap,
        kamailio(lab, tmp_path / "kam", [tap.url], build=kamailio6, tout=1, retr=3),
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=1500) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered(timeout=15)
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=5)
        made.wait_done()
    # Each S whose first reply was lost is sent again, the same bytes under the same cookie,
    # and gets the same reply (from the node's retransmission cache). While a worker waits,
    # the callee resends its 200 OK, so another worker may send an S of its own (new cookie).
    sets = tap.commands("S")
    by_cookie: dict[bytes, list[bytes]] = {}
    for command in sets:
        by_cookie.setdefault(command.cookie, []).append(command.data)
    assert by_cookie
    for cookie, copies in by_cookie.items():
        assert re.fullmatch(rb"-?[0-9]+_[0-9]+", cookie), cookie
        assert copies[0].startswith(cookie + b" S ")  # the cookie's trailing space
        assert copies == [copies[0]] * 2  # sent twice, byte for byte
        replies = [r for r in tap.replies("S") if r.cookie == cookie]
        assert [r.data for r in replies] == [copies[0] + b"OK"] * 2
        assert [r.forwarded for r in replies] == [False, True]
    # A random start and a random first part: no two commands share a cookie or its prefix.
    sent = list(dict.fromkeys(s.data for s in tap.seen if s.direction == "command"))
    cookies = [data.split(b" ", 1)[0] for data in sent]
    assert len(set(cookies)) == len(sent) >= 3  # P, G (per process), S, D
    assert len({c.split(b"_")[0] for c in cookies}) == len(cookies)
    assert node.output().count(f"[{made.call_id}] relaying") == 1
