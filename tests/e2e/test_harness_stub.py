"""Self-tests of the e2e harness: real Kamailio 5.6 + lrkproxy and SIPp against a stub node.

They pin down what Debian's Kamailio actually sends (the node daemon is tested elsewhere):
- at startup every process sends P, then G, to every node;
- on the SDP answer (183 and again 200) it sends one S with the ten session fields;
- on BYE it sends no D (Debian 12's lrkproxy.so, 5.6.3, has no delete command at all).
"""

from __future__ import annotations

import time
from pathlib import Path

from lrkp_lab.kamailio import Call, Sdp, call, kamailio, parse_message_trace
from lrkp_lab.lab import Lab, address
from tests.e2e.stub_node import NodeConfig, Request, StubNode, reply_to

NODE = "udp:10.201.1.1:22333"
NODE2 = "udp:10.201.1.2:22333"
RELAY_INT, RELAY_EXT = "10.201.1.1", "10.201.2.1"


def _only_s(stub: StubNode, count: int = 1) -> list[Request]:
    got = stub.wait_for("S", count, timeout=5)
    assert len(got) == count, [r.data for r in got]
    return got


def _assert_session_matches(s: Request, made: Call, caller_sdp: Sdp, callee_sdp: Sdp) -> None:
    f = s.fields
    assert (f["src_ip"], int(f["src_port"])) == made.caller_rtp  # the caller's offer
    assert (f["dnat_ip"], int(f["dnat_port"])) == made.callee_rtp  # the callee's answer
    assert (f["dst_ip"], int(f["dst_port"])) == callee_sdp.endpoint  # written into the offer
    assert (f["snat_ip"], int(f["snat_port"])) == caller_sdp.endpoint  # written into answer
    assert f["timeout"] == "60"
    assert f["call_id"] == made.call_id
    assert s.data.endswith(b" ") and s.data.count(b" ") == 12, s.data


def test_stub_replies() -> None:
    config = NodeConfig("10.201.1.1", "10.201.2.1", 20000, 40000, 20000)
    assert reply_to(b"123_4 P", config) == b"123_4 P PONG"
    g = reply_to(b"123_4 G", config)
    assert g is not None and g.startswith(b"123_4 G ") and len(g) == len(b"123_4 G ") + 52
    s = b"1_2 S 1.1.1.1 2.2.2.2 2.2.2.2 3.3.3.3 4000 20000 20002 6000 60 cid "
    assert reply_to(s, config) == s + b"OK"
    assert reply_to(b"1_2 X", config) is None


def test_message_trace_parser() -> None:
    trace = (
        "----------------------------------------------- 2026-01-01 00:00:00.000001\n"
        "UDP message sent (20 bytes):\n\nINVITE sip:b@h SIP/2.0\nCSeq: 1 INVITE\n\n"
        "----------------------------------------------- 2026-01-01 00:00:00.000002\n"
        "UDP message received [30] bytes :\n\nSIP/2.0 200 OK\nCSeq: 1 INVITE\n"
        "Content-Type: application/sdp\n\nv=0\nc=IN IP4 10.0.0.1\nm=audio 4000 RTP/AVP 0\n\n"
    )
    sent, got = parse_message_trace(trace)
    assert (sent.direction, sent.method, sent.status) == ("sent", "INVITE", None)
    assert (got.direction, got.method, got.status) == ("received", "INVITE", 200)
    assert got.sdp is not None and got.sdp.endpoint == ("10.0.0.1", 4000)
    # The dashed line's local time, to the microsecond: ordering across processes.
    assert sent.at is not None and got.at is not None
    assert round(got.at - sent.at, 6) == 0.000001


def test_startup_sends_ping_then_config(lab: Lab, stub: StubNode, tmp_path: Path) -> None:
    with kamailio(lab, tmp_path / "kam", [NODE]):
        pings, configs = stub.received("P"), stub.received("G")
    assert pings and configs
    # Every process pings, and then asks for the config, from its own socket.
    assert {r.sender for r in pings} == {r.sender for r in configs}
    assert len(pings) >= 2
    for g in configs:
        p = next(r for r in pings if r.sender == g.sender)
        assert p.at <= g.at
        assert g.data == g.cookie + b" G"
    assert all(r.sender[0] == str(address("sip", "int")) for r in pings)


def test_call_internal_to_external(lab: Lab, stub: StubNode, tmp_path: Path) -> None:
    with kamailio(lab, tmp_path / "kam", [NODE]) as kam:
        stub.clear()
        with call(lab, tmp_path / "call", caller="a", callee="x", pause_ms=500) as made:
            caller_sdp, callee_sdp = made.wait_answered()
            # "ie" on the INVITE: the callee (external) gets the node's external IP;
            # "ei" on the 200 OK: the caller (internal) gets the node's internal IP.
            assert callee_sdp.ip == RELAY_EXT
            assert caller_sdp.ip == RELAY_INT
            (s,) = _only_s(stub)
            _assert_session_matches(s, made, caller_sdp, callee_sdp)
            assert int(s.fields["snat_port"]) == int(s.fields["dst_port"]) + 2  # gt=0
            made.wait_done()
        # Kamailio 5.6 (Debian 12) sends no D on BYE: its lrkproxy has no delete command.
        time.sleep(1.0)
        assert stub.received("D") == [], kam.log()
        assert [r.command for r in stub.received()] == ["S"]


def test_call_internal_to_internal_uses_internal_ip(
    lab: Lab, stub: StubNode, tmp_path: Path
) -> None:
    with kamailio(lab, tmp_path / "kam", [NODE]):
        stub.clear()
        with call(lab, tmp_path / "call", caller="a", callee="b", pause_ms=200) as made:
            caller_sdp, callee_sdp = made.wait_answered()
            assert callee_sdp.ip == RELAY_INT and caller_sdp.ip == RELAY_INT
            (s,) = _only_s(stub)
            _assert_session_matches(s, made, caller_sdp, callee_sdp)
            made.wait_done()


def test_early_media_183_sends_s_twice(lab: Lab, stub: StubNode, tmp_path: Path) -> None:
    with kamailio(lab, tmp_path / "kam", [NODE]):
        stub.clear()
        with call(lab, tmp_path / "call", uas_scenario="uas_183.xml", pause_ms=200) as made:
            caller_sdp, callee_sdp = made.wait_answered()
            assert made.early_sdp is not None
            assert made.early_sdp.endpoint == caller_sdp.endpoint
            first, second = _only_s(stub, 2)
            assert first.fields == second.fields
            assert first.cookie != second.cookie or first.at != second.at
            _assert_session_matches(second, made, caller_sdp, callee_sdp)
            made.wait_done()


def test_gt1_uses_one_port(lab: Lab, stub: StubNode, tmp_path: Path) -> None:
    with kamailio(lab, tmp_path / "kam", [NODE], gt=1):
        stub.clear()
        with call(lab, tmp_path / "call", pause_ms=200) as made:
            caller_sdp, callee_sdp = made.wait_answered()
            (s,) = _only_s(stub)
            _assert_session_matches(s, made, caller_sdp, callee_sdp)
            assert s.fields["snat_port"] == s.fields["dst_port"]
            assert caller_sdp.port == callee_sdp.port
            made.wait_done()


def test_two_nodes_round_robin(lab: Lab, stub: StubNode, stub2: StubNode, tmp_path: Path) -> None:
    with kamailio(lab, tmp_path / "kam", [NODE, NODE2], alg=1, children=1):
        assert stub.received("G") and stub2.received("G")
        stub.clear()
        stub2.clear()
        for index in range(4):
            with call(lab, tmp_path / f"call{index}", pause_ms=100) as made:
                caller_sdp, callee_sdp = made.wait_answered()
                made.wait_done()
            # The S goes to the node whose addresses were written into the SDPs.
            node = stub if callee_sdp.ip == RELAY_EXT else stub2
            assert callee_sdp.ip in (RELAY_EXT, "10.201.2.2")
            got = [r for r in node.received("S") if r.fields["call_id"] == made.call_id]
            assert len(got) == 1
            _assert_session_matches(got[0], made, caller_sdp, callee_sdp)
    assert len(stub.received("S")) == 2 and len(stub2.received("S")) == 2
