"""Calls through Kamailio's `rtpengine` module (rtpengine's ng protocol), end to end.

Every test runs for each Kamailio (Debian's 5.6 and the 6.x snapshot: `kamailio_build`) and
each relay under test (`relay`):

    rtpengine   Debian's rtpengine 10.5 in userspace: the reference these tests were built
                and validated against, so they say what a correct ng relay does;
    node        lrkp-tsl with `--ng udp:10.201.1.1:2223`: skipped, naming why, until
                `lrkp-tsl run --help` offers `--ng`; from then on it runs as it is.

Kamailio runs examples/kamailio-rtpengine.cfg (the file docs/ng.md describes), talking to
the relay through a recording forwarder (control_tap.py), so each test also sees the exact
commands the module sent and what the relay answered. Media is RTP sent by Python sockets
bound on the SDP ports of each party, to the relay address each party found in the SDP it
received, exactly what a phone does.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from lrkp_lab import ngrelay, rtpengine
from lrkp_lab.calls import both_ways, burst
from lrkp_lab.kamailio import KamailioBuild, Sdp, SipMessage, call, ng_kamailio
from lrkp_lab.lab import Lab
from lrkp_lab.ngrelay import NG_ADDRESS, NgRelay
from lrkp_lab.parties import Peers
from lrkp_lab.sipmedia import endpoint, media_both_ways, parties
from lrkp_tsl.dataplane.nft import TABLE
from tests.e2e.control_tap import ControlTap, Seen
from tests.e2e.relaynode import conntrack

NODE_NOT_YET = (
    "the node does not serve ng yet: `lrkp-tsl run --help` has no --ng (issue 20's engine "
    "wiring); this variant runs as soon as it does"
)
USERSPACE = "rtpengine relays in userspace here (--table=-1: no kernel module): no conntrack NAT"
RELAY_INT, RELAY_EXT = "10.201.1.1", "10.201.2.1"
NAT_PUBLIC = "10.201.1.20"  # the NAT box in front of caller c (10.201.3.10)


@pytest.fixture(params=["rtpengine", "node"])
def relay(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[NgRelay]:
    if request.param == "rtpengine":
        if not rtpengine.available():
            if os.environ.get("CI"):
                pytest.fail("rtpengine is missing: scripts/install-bench-deps.sh installs it")
            pytest.skip("rtpengine is not installed (scripts/install-bench-deps.sh)")
        with ngrelay.running_rtpengine(lab, tmp_path / "rtpengine") as running:
            yield running
    else:
        if not ngrelay.node_serves_ng():
            pytest.skip(NODE_NOT_YET)
        with ngrelay.running_node(lab, tmp_path / "node") as running:
            yield running


@contextlib.contextmanager
def kamailio_to(
    lab: Lab,
    tmp_path: Path,
    build: KamailioBuild,
    lose_first_reply: Collection[str] = (),
) -> Iterator[ControlTap]:
    """Kamailio (examples/kamailio-rtpengine.cfg) whose ng commands go through a tap to the
    relay; on the way out, every reply the relay gave must be a success."""
    with (
        ControlTap(lab, NG_ADDRESS, lose_first_reply=lose_first_reply) as tap,
        ng_kamailio(lab, tmp_path / "kam", [tap.url], build=build) as running,
    ):
        yield tap
        failed = [
            (s.message or {}).get("error-reason", s.data[:200])
            for s in tap.seen
            if s.direction == "reply" and (s.message or {}).get("result") not in ("ok", "pong")
        ]
        assert not failed, f"the relay refused: {failed}\n{running.log()[-3000:]}"


def ng(seen: Seen) -> dict[str, Any]:
    message = seen.message
    assert message is not None, seen.data[:200]
    return message


def distinct(seen: list[Seen]) -> list[Seen]:
    """Commands once per content: a UA's retransmitted 200 makes Kamailio send the same
    `answer` again under a new cookie (a lost reply is tested on its own)."""
    unique: dict[bytes, Seen] = {}
    for s in seen:
        unique.setdefault(s.data.partition(b" ")[2], s)
    return list(unique.values())


def by_cookie(seen: list[Seen]) -> list[Seen]:
    """Commands once per cookie: a command sent again (its reply lost) counts once."""
    unique: dict[bytes, Seen] = {}
    for s in seen:
        unique.setdefault(s.cookie, s)
    return list(unique.values())


def tag(message: SipMessage, header: str) -> str:
    found = re.search(r";\s*tag=([^;>\s]+)", message.header(header) or "")
    assert found, message.text
    return found.group(1)


def first(messages: list[SipMessage], method: str, status: int | None = None) -> SipMessage:
    return next(m for m in messages if m.method == method and m.status == status)


def relay_flows(lab: Lab, relay: NgRelay) -> list[str]:
    """conntrack entries to one of the relay's ports in its namespace."""
    low, high = relay.ports
    return [
        line
        for line in conntrack(lab, "relay").splitlines()
        if (found := re.search(r"dport=(\d+) ", line)) and low <= int(found.group(1)) <= high
    ]


def nft_table(lab: Lab) -> str:
    return lab.run("relay", "nft", "list", "table", "ip", TABLE, check=False).stdout


def assert_rewritten(sdp: Sdp, relay: NgRelay, relay_ip: str, origin: str) -> None:
    """The relay's address in o= (version kept) and c=, a relay port in m=, its a=rtcp, and
    every other line of the party's SDP as it was written."""
    assert sdp.ip == relay_ip, sdp.text
    assert sdp.origin == f"{origin} IN IP4 {relay_ip}", sdp.text
    assert relay.ports[0] <= sdp.port <= relay.ports[1], sdp.text
    for line in (
        f"m=audio {sdp.port} RTP/AVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        f"a=rtcp:{sdp.port + 1}",
    ):
        assert re.search(rf"^{re.escape(line)}\r?$", sdp.text, re.MULTILINE), (line, sdp.text)


def test_call_with_media_both_ways(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """Internal caller, external callee: each side is given the relay's address on its own
    network, and every packet arrives, both ways, from the address the receiver was given."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build),
        call(lab, tmp_path / "call", caller="a", callee="x", pause_ms=2500) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        assert_rewritten(caller_sdp, relay, RELAY_INT, "callee 53655765 2353687637")
        assert_rewritten(callee_sdp, relay, RELAY_EXT, "caller 53655765 2353687637")
        assert "a=sendrecv" in caller_sdp.text and "a=sendrecv" in callee_sdp.text
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=20)
        assert made.call_id in relay.calls()
        made.wait_done()
    assert made.call_id not in relay.calls()


def test_media_is_carried_by_kernel_conntrack_nat(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """One conntrack entry per stream, NATed both ways, counting every packet, and no
    socket of the relay on any of its relay ports: the kernel, not a process, relays."""
    if not relay.kernel:
        pytest.skip(USERSPACE)
    with (
        kamailio_to(lab, tmp_path, kamailio_build),
        call(lab, tmp_path / "call", caller="a", callee="x", pause_ms=2500) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=20)
        (caller_ip, caller_port), (callee_ip, callee_port) = made.caller_rtp, made.callee_rtp
        to_a, to_b = endpoint(caller_sdp), endpoint(callee_sdp)
        flow = (
            rf"src={caller_ip} dst={to_a.ip} sport={caller_port} dport={to_a.port} "
            rf"packets=20 .*src={callee_ip} dst={to_b.ip} sport={callee_port} "
            rf"dport={to_b.port} packets=20"
        )
        assert re.search(flow, conntrack(lab, "relay")), conntrack(lab, "relay")
        sockets = lab.run("relay", "ss", "-Hunap").stdout
        bound = [int(port) for port in re.findall(r":(\d+)\s", sockets)]
        assert not [p for p in bound if relay.ports[0] <= p <= relay.ports[1]], sockets
        made.wait_done()


def test_caller_behind_a_port_remapping_nat(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """Caller c's SDP says 10.201.3.10 (its LAN); its packets come from the NAT box with a
    remapped port. The config flags it (SIP-source-address); the relay learns the NAT's
    port from the first packet, and both ways flow through the NAT."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build) as tap,
        call(lab, tmp_path / "call", caller="c", callee="x", pause_ms=2500) as made,
        Peers(lab) as peers,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        caller, to_a, callee, to_b = parties(peers, made, caller_sdp, callee_sdp)
        caller.send(to_a, b"hello")  # a phone behind NAT speaks first: symmetric RTP
        assert callee.expect(b"hello") == to_b
        both_ways(callee, to_b, caller, to_a, 10, b"B", b"A")  # the callee first
        caller.expect_nothing()
        callee.expect_nothing()
        offer = ng(tap.commands("offer")[0])
        assert "c=IN IP4 10.201.3.10" in offer["sdp"]
        assert offer["received-from"] == ["IP4", NAT_PUBLIC]
        assert offer["flags"] == ["SIP-source-address"]
        made.wait_done()


def test_hold_and_resume_keep_the_relay_ports(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """re-INVITEs (a=sendonly, then a=sendrecv) are re-offers: the relay keeps the call's
    ports on both sides, passes the direction attributes through, and the media goes on."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build) as tap,
        call(
            lab,
            tmp_path / "call",
            caller="a",
            callee="b",
            pause_ms=2000,
            uac_scenario="uac_hold.xml",
            uas_scenario="uas_hold.xml",
        ) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=5)

        answers, offers = made.wait_answers(2)
        hold_offer, hold_answer = offers[1], answers[1]
        assert re.search(r"^a=sendonly\r?$", hold_offer.text, re.MULTILINE), hold_offer.text
        assert re.search(r"^a=recvonly\r?$", hold_answer.text, re.MULTILINE), hold_answer.text
        assert hold_offer.endpoint == callee_sdp.endpoint
        assert hold_answer.endpoint == caller_sdp.endpoint
        assert hold_offer.origin == f"caller 53655765 2353687638 IN IP4 {RELAY_INT}"
        with Peers(lab) as peers:  # on hold: the caller still sends (sendonly)
            caller, to_a, callee, to_b = parties(peers, made, caller_sdp, callee_sdp)
            burst(caller, to_a, callee, to_b, 5, b"held")

        answers, offers = made.wait_answers(3)
        resume_offer, resume_answer = offers[2], answers[2]
        assert re.search(r"^a=sendrecv\r?$", resume_offer.text, re.MULTILINE)
        assert re.search(r"^a=sendrecv\r?$", resume_answer.text, re.MULTILINE)
        assert resume_offer.endpoint == callee_sdp.endpoint
        assert resume_answer.endpoint == caller_sdp.endpoint
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=5)
        made.wait_done()
        assert [ng(s)["command"] for s in distinct(tap.commands_seen())].count("offer") == 3
    assert made.call_id not in relay.calls()


def test_two_concurrent_calls_are_kept_apart(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """Two live calls at once (a -> x, b -> m): each gets its own relay ports, and every
    packet reaches its own call's other party only."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build),
        call(lab, tmp_path / "one", caller="a", callee="x", pause_ms=3000) as one,
        call(lab, tmp_path / "two", caller="b", callee="m", pause_ms=3000) as two,
        Peers(lab) as peers,
    ):
        one_a, one_b = (endpoint(sdp) for sdp in one.wait_answered())
        two_a, two_b = (endpoint(sdp) for sdp in two.wait_answered())
        assert one_a != two_a and one_b != two_b
        a, x = peers("a", one.caller_rtp[1]), peers("x", one.callee_rtp[1])
        b, m = peers("b", two.caller_rtp[1]), peers("m", two.callee_rtp[1])
        for seq in range(10):
            a.send(one_a, b"one-A-%d" % seq)
            b.send(two_a, b"two-A-%d" % seq)
            assert x.expect(b"one-A-%d" % seq) == one_b
            assert m.expect(b"two-A-%d" % seq) == two_b
            x.send(one_b, b"one-B-%d" % seq)
            m.send(two_b, b"two-B-%d" % seq)
            assert a.expect(b"one-B-%d" % seq) == one_a
            assert b.expect(b"two-B-%d" % seq) == two_a
        for party in (a, b, x, m):
            party.expect_nothing()
        assert {one.call_id, two.call_id} <= set(relay.calls())
        one.wait_done()
        two.wait_done()
    assert not {one.call_id, two.call_id} & set(relay.calls())


def test_bye_ends_the_call_and_nothing_is_relayed_after(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """The module sends `delete` (call-id and from-tag only) and waits for its reply before
    it relays the BYE; from then on nothing is relayed, either way, and nothing is left."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build) as tap,
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=2000) as made,
        Peers(lab) as peers,
    ):
        caller_sdp, callee_sdp = made.wait_answered()
        caller, to_a, callee, to_b = parties(peers, made, caller_sdp, callee_sdp)
        both_ways(caller, to_a, callee, to_b, 10)
        assert not tap.commands("delete")

        made.wait_done()
        (delete,) = distinct(tap.commands("delete"))
        sent = ng(delete)
        invite = first(made.caller.messages(), "INVITE")
        assert sent["call-id"] == made.call_id
        assert sent["from-tag"] == tag(invite, "From")
        assert "to-tag" not in sent and "sdp" not in sent
        replies = tap.ng_replies("delete")
        assert replies and ng(replies[0])["result"] == "ok"
        bye = first(made.callee.received(), "BYE")
        assert bye.at is not None and replies[0].at < bye.at  # answered before the BYE went on
        assert made.call_id not in relay.calls()
        if relay.kernel:  # before the packets below (each would make a conntrack entry)
            assert relay_flows(lab, relay) == []
            assert str(made.call_id) not in nft_table(lab)

        caller.send(to_a, b"after-bye")
        callee.send(to_b, b"after-bye")
        callee.expect_nothing()
        caller.expect_nothing()


def test_cancel_leaves_no_state(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """A call cancelled while ringing: one `offer`, no `answer`; `delete` on the CANCEL and
    again when the 487 ends the INVITE (failure_route: the second finds nothing and must be
    harmless); nothing left."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build) as tap,
        call(
            lab,
            tmp_path / "call",
            caller="a",
            callee="b",
            uac_scenario="uac_cancel.xml",
            uas_scenario="uas_cancel.xml",
        ) as made,
    ):
        made.wait_done()
        assert len(distinct(tap.commands("offer"))) == 1
        assert tap.commands("answer") == []
        deletes = by_cookie(tap.commands("delete"))  # the same bytes twice: not a retry
        assert len(deletes) == 2, [d.data for d in deletes]
        invite = first(made.caller.messages(), "INVITE")
        for delete in deletes:  # the CANCEL's; the INVITE's, in failure_route
            sent = ng(delete)
            assert sent["call-id"] == made.call_id
            assert sent["from-tag"] == tag(invite, "From") and "to-tag" not in sent
            assert sent["received-from"] == ["IP4", "10.201.1.10"]  # both: the caller's
        cancel_200 = first(made.caller.received(), "CANCEL", 200)
        ended = first(made.caller.received(), "INVITE", 487)
        replies = tap.ng_replies("delete")
        assert [ng(r)["result"] for r in replies] == ["ok", "ok"]
        assert cancel_200.at is not None and ended.at is not None
        assert replies[0].at < cancel_200.at and replies[1].at < ended.at
    assert made.call_id not in relay.calls()
    if relay.kernel:
        assert relay_flows(lab, relay) == []
        assert str(made.call_id) not in nft_table(lab)


@pytest.mark.parametrize(
    ("uac", "uas", "status"),
    [
        ("uac_486.xml", "uas_486.xml", 486),  # the callee refuses
        ("uac_408.xml", "uas_silent.xml", 408),  # no reply at all: tm's own 408 after fr_timer
    ],
    ids=["refused", "unanswered"],
)
def test_a_failed_call_leaves_no_state(
    lab: Lab,
    relay: NgRelay,
    kamailio_build: KamailioBuild,
    tmp_path: Path,
    uac: str,
    uas: str,
    status: int,
) -> None:
    """An INVITE that fails (a refusal, or no reply at all) ends in failure_route, which
    sends one `delete` before the failure reaches the caller; nothing is left."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build) as tap,
        call(
            lab, tmp_path / "call", caller="a", callee="b", uac_scenario=uac, uas_scenario=uas
        ) as made,
    ):
        made.wait_done()
        assert len(by_cookie(tap.commands("offer"))) == 1
        assert tap.commands("answer") == []
        (delete,) = by_cookie(tap.commands("delete"))
        assert ng(delete)["call-id"] == made.call_id
        (reply,) = tap.ng_replies("delete")
        failure = first(made.caller.received(), "INVITE", status)
        assert failure.at is not None and reply.at < failure.at
    assert made.call_id not in relay.calls()
    if relay.kernel:
        assert relay_flows(lab, relay) == []


def test_without_an_answering_relay_the_call_is_rejected(
    lab: Lab, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """The config's safeguard: when the relay does not answer (or refuses the offer), the
    INVITE gets 503 from Kamailio and never reaches the callee with an SDP the relay did not
    rewrite: no call ever looks relayed while its media goes around the relay."""
    silent = "udp:10.201.1.1:2999"  # nothing listens there
    with (
        ng_kamailio(lab, tmp_path / "kam", [silent], build=kamailio_build) as running,
        call(
            lab,
            tmp_path / "call",
            caller="a",
            callee="x",
            uac_scenario="uac_503.xml",
            uas_scenario="uas_silent.xml",
        ) as made,
    ):
        assert made.caller.wait() == 0, made.caller.diagnostics()
        assert made.callee.received() == []
        assert "media relay refused or did not answer the offer" in running.log()


def test_what_the_module_sends(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """What the relay must expect from Kamailio's module (issue 20), for a NAT'd caller:
    one `ping` at start; `received-from` on every command (the NAT's address, not the
    SDP's); `direction` following the sender; `answer` with from-tag = From tag and to-tag =
    To tag; `delete` with call-id and from-tag only; nothing for ACK, 1xx or the BYE's 200."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build) as tap,
        call(lab, tmp_path / "call", caller="c", callee="x", pause_ms=500) as made,
    ):
        made.wait_done()
        commands = distinct(tap.commands_seen())
    names = [ng(c)["command"] for c in commands]
    assert names == ["ping", "offer", "answer", "delete"], names
    ping, offer, answer, delete = (ng(c) for c in commands)
    invite = first(made.caller.messages(), "INVITE")
    ok = first(made.caller.received(), "INVITE", 200)
    assert ping == {"command": "ping"}

    assert offer["call-id"] == made.call_id
    assert offer["from-tag"] == tag(invite, "From") and "to-tag" not in offer
    assert offer["received-from"] == ["IP4", NAT_PUBLIC]
    assert "c=IN IP4 10.201.3.10" in offer["sdp"]
    assert offer["direction"] == ["internal", "external"]  # from c's network to x's
    assert offer["replace"] == ["origin", "session-connection"]
    assert offer["ICE"] == "remove"
    assert offer["flags"] == ["SIP-source-address"]
    assert offer["supports"] == ["load limit"]

    assert answer["from-tag"] == tag(ok, "From") == offer["from-tag"]
    assert answer["to-tag"] == tag(ok, "To")
    assert answer["received-from"] == ["IP4", "10.201.2.10"]
    assert answer["direction"] == ["external", "internal"]  # the sender is now x
    assert "flags" not in answer  # x is not behind NAT

    assert delete["call-id"] == made.call_id and delete["from-tag"] == offer["from-tag"]
    assert "to-tag" not in delete and "sdp" not in delete
    assert delete["received-from"] == ["IP4", NAT_PUBLIC]

    # Version differences the relay must take in stride.
    if kamailio_build.name == "5.6":
        assert all("sip-message-type" not in ng(c) for c in commands)
    else:
        assert [ng(c).get("sip-message-type") for c in commands] == [
            None,
            "sip_request",
            "sip_reply",
            "sip_request",
        ]
    cookies = [c.cookie for c in commands]
    assert len(set(cookies)) == len(cookies)
    assert all(re.fullmatch(rb"-?\d+_\d+_\d+", cookie) for cookie in cookies), cookies


def test_a_command_whose_reply_was_lost_is_sent_again_and_answered_alike(
    lab: Lab, relay: NgRelay, kamailio_build: KamailioBuild, tmp_path: Path
) -> None:
    """The first reply to every offer, answer and delete is lost: the module sends the same
    bytes under the same cookie after rtpengine_tout_ms, and the relay answers the copy
    exactly as the original (from its cache: the call is set up once)."""
    with (
        kamailio_to(lab, tmp_path, kamailio_build, {"offer", "answer", "delete"}) as tap,
        call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=1500) as made,
    ):
        caller_sdp, callee_sdp = made.wait_answered(timeout=15)
        media_both_ways(lab, made, caller_sdp, callee_sdp, packets=5)
        made.wait_done()
        sent: dict[bytes, list[bytes]] = {}
        for command in tap.commands_seen():
            sent.setdefault(command.cookie, []).append(command.data)
        by_name = {name: tap.commands(name) for name in ("offer", "answer", "delete")}
        for name, commands in by_name.items():
            assert commands, name
            for command in commands:
                copies = sent[command.cookie]
                assert copies == [copies[0]] * 2, (name, copies)  # twice, byte for byte
                replies = [r for r in tap.ng_replies(name) if r.cookie == command.cookie]
                assert [r.data for r in replies] == [replies[0].data] * 2, (name, replies)
                assert [r.forwarded for r in replies] == [False, True]
    assert made.call_id not in relay.calls()
