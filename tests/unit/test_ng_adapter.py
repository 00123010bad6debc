"""The ng front-end: one datagram in, a reply and a change out; never an exception, and a
change the kernel refused gives its ports back (fuzzed)."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl.media import PortRange
from lrkp_tsl.ng.adapter import Counters, NgDecider
from lrkp_tsl.ng.allocator import SharedPortPool
from lrkp_tsl.ng.bencode import Encodable, Value, decode, encode
from lrkp_tsl.ng.callmodel import Interfaces, NgCalls
from lrkp_tsl.ports import PortUse

SDP = (
    b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0\r\n"
)


def pool_of(fe: NgDecider) -> SharedPortPool:
    assert isinstance(fe.calls.pool, SharedPortPool)
    return fe.calls.pool


def front_end() -> NgDecider:
    pool = SharedPortPool(PortUse(PortRange(30000, 30099)))
    interfaces = Interfaces(
        {"internal": IPv4Address("10.0.1.1"), "external": IPv4Address("10.0.2.1")}
    )
    return NgDecider(NgCalls(pool, interfaces), wall_offset=1_000_000.0)


def body(reply: bytes | None) -> dict[bytes, Value]:
    assert reply is not None
    value = decode(reply.partition(b" ")[2])
    assert isinstance(value, dict)
    return value


def send(fe: NgDecider, cookie: bytes, **message: object) -> dict[bytes, Value]:
    decision = fe.decide(cookie + b" " + encode(message), 5.0)  # type: ignore[arg-type]
    return body(fe.carried_out(decision))


def test_a_call_through_the_front_end() -> None:
    fe = front_end()
    offer = send(fe, b"1", command="offer", sdp=SDP, **{"call-id": "c", "from-tag": "a"})
    assert offer[b"result"] == b"ok" and b"m=audio 30096 " in offer[b"sdp"]  # type: ignore[operator]
    answer = send(
        fe, b"2", command="answer", sdp=SDP, **{"call-id": "c", "from-tag": "a", "to-tag": "b"}
    )
    assert answer[b"result"] == b"ok"
    fe.traffic = lambda call_id: Counters(rtp_packets=7)
    query = send(fe, b"3", command="query", **{"call-id": "c"})
    assert query[b"created"] == 1_000_005
    assert query[b"totals"] == {
        b"RTP": {b"packets": 7, b"bytes": 0, b"errors": 0},
        b"RTCP": {b"packets": 0, b"bytes": 0, b"errors": 0},
    }
    tags = query[b"tags"]
    assert isinstance(tags, dict) and set(tags) == {b"a", b"b"}
    assert send(fe, b"4", command="list") == {b"result": b"ok", b"calls": [b"c"]}
    stats = send(fe, b"5", command="statistics")
    assert stats[b"statistics"] == {
        b"currentstatistics": {
            b"sessionsown": 1,
            b"sessionsforeign": 0,
            b"sessionstotal": 1,
            b"transcodedmedia": 0,
        },
        b"totalstatistics": {b"managedsessions": 1, b"rejectedsessions": 0},
    }
    assert send(fe, b"6", command="delete", **{"call-id": "c", "from-tag": "a"}) == {
        b"result": b"ok"
    }
    assert send(fe, b"7", command="ping") == {b"result": b"pong"}
    assert len(pool_of(fe)) == 0


def test_a_failed_change_gives_its_ports_back_and_says_why() -> None:
    fe = front_end()
    decision = fe.decide(
        b"1 " + encode({"command": "offer", "sdp": SDP, "call-id": "c", "from-tag": "a"}), 0.0
    )
    assert decision.change is not None and len(pool_of(fe)) == 2
    reply = fe.failed(decision, "kernel", "netlink said no")
    assert body(reply) == {b"result": b"error", b"error-reason": b"netlink said no"}
    assert len(pool_of(fe)) == 0 and fe.calls.get("c") is None


def test_errors_are_replies_not_exceptions() -> None:
    fe = front_end()
    assert fe.decide(b"garbage", 0.0).reply is None  # no cookie: nobody to answer
    decision = fe.decide(
        b"9 "
        + encode({"command": "answer", "sdp": SDP, "call-id": "x", "from-tag": "a", "to-tag": "b"}),
        0.0,
    )
    assert body(decision.reply) == {b"result": b"error", b"error-reason": b"Unknown call-id"}
    assert decision.error is not None and decision.error.code == "unknown-call"
    assert fe.stats["ng.error.unknown-call"] == 1
    refused: dict[str, Encodable] = {
        "command": "offer",
        "sdp": SDP,
        "call-id": "y",
        "from-tag": "a",
        "ICE": "force",
    }
    assert body(fe.decide(b"10 " + encode(refused), 0.0).reply)[b"result"] == b"error"
    stats = body(fe.decide(b"11 " + encode({"command": "statistics"}), 0.0).reply)
    assert stats[b"statistics"][b"totalstatistics"][b"rejectedsessions"] == 1  # type: ignore[index,call-overload]


def test_list_stops_before_the_reply_outgrows_a_datagram() -> None:
    fe = front_end()
    reply = body(fe.decide(b"1 " + encode({"command": "list", "limit": 5}), 0.0).reply)
    assert reply == {b"result": b"ok", b"calls": []}


commands = st.sampled_from(
    [b"offer", b"answer", b"delete", b"query", b"list", b"ping", b"statistics"]
)
tags = st.sampled_from([b"a", b"b", b"c"])


@given(st.lists(st.tuples(commands, tags, tags, st.booleans()), max_size=12))
@settings(max_examples=200, deadline=None)
def test_any_sequence_leaves_a_consistent_table(
    steps: list[tuple[bytes, bytes, bytes, bool]],
) -> None:
    """Whatever Kamailio (or anyone) sends, in any order, the front-end answers every
    datagram, and the pool holds exactly the pairs of the live calls."""
    fe = front_end()
    for number, (command, from_tag, to_tag, fail) in enumerate(steps):
        message: dict[str, object] = {
            "command": command,
            "call-id": b"c",
            "from-tag": from_tag,
            "to-tag": to_tag,
            "sdp": SDP,
        }
        decision = fe.decide(b"%d " % number + encode(message), float(number))  # type: ignore[arg-type]
        if decision.change is not None:
            reply = fe.failed(decision, "kernel", "no") if fail else fe.carried_out(decision)
        else:
            reply = decision.reply
        assert reply is not None and reply.startswith(b"%d " % number)
        held = sorted(port for call in fe.calls for port in call.pairs())
        assert sorted(pool_of(fe).held()) == held
