"""ng calls: sides by tag, streams by m= line, relay pairs from the shared pool; re-offers,
re-INVITEs from the callee, forks, CANCEL and delete as rtpengine handles them."""

from __future__ import annotations

import re
from ipaddress import IPv4Address

import pytest

from lrkp_tsl.media import Endpoint, PortRange
from lrkp_tsl.ng.allocator import SharedPortPool
from lrkp_tsl.ng.bencode import encode
from lrkp_tsl.ng.callmodel import Change, Interfaces, NgCalls, Outcome
from lrkp_tsl.ng.codec import Answer, Delete, NgError, Offer, parse
from lrkp_tsl.ports import PortUse

INTERNAL, EXTERNAL = IPv4Address("10.0.1.1"), IPv4Address("10.0.2.1")
A_IP, B_IP = "192.0.2.10", "198.51.100.20"


def body(ip: str, *media: str, extra: str = "") -> bytes:
    head = f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n{extra}"
    return (head + "".join(line + "\r\n" for line in media)).encode()


AUDIO_A = body(A_IP, "m=audio 4000 RTP/AVP 0 101", "a=rtpmap:101 telephone-event/8000")
AUDIO_B = body(B_IP, "m=audio 5000 RTP/AVP 0 101", "a=rtpmap:101 telephone-event/8000")


class World:
    """A call table on a small range, driven with ng dictionaries as Kamailio sends them."""

    def __init__(self, ports: tuple[int, int] = (30000, 30099), delete_delay: int = 0) -> None:
        self.use = PortUse(PortRange(*ports))
        self.pool = SharedPortPool(self.use)
        self.calls = NgCalls(
            self.pool, Interfaces({"internal": INTERNAL, "external": EXTERNAL}), delete_delay
        )
        self.now = 100.0

    def propose(self, command: str, /, **keys: object) -> Change:
        """The decision, not committed."""
        message = {"command": command, "call-id": "call-1", **keys}
        if command in ("offer", "answer"):
            message.setdefault("replace", ["origin", "session-connection"])
            message.setdefault("ICE", "remove")
        request = parse(b"1_2_3 " + encode(message))  # type: ignore[arg-type]
        if isinstance(request, Offer):
            return self.calls.offer(request, self.now)
        if isinstance(request, Answer):
            return self.calls.answer(request, self.now)
        assert isinstance(request, Delete)
        return self.calls.delete(request, self.now)

    def send(self, command: str, /, **keys: object) -> Change:
        change = self.propose(command, **keys)
        self.calls.commit(change)
        return change

    def offer(self, sdp: bytes = AUDIO_A, /, **keys: object) -> Change:
        keys.setdefault("from-tag", "A")
        return self.send("offer", sdp=sdp, **keys)

    def answer(self, sdp: bytes = AUDIO_B, /, **keys: object) -> Change:
        keys.setdefault("from-tag", "A")
        keys.setdefault("to-tag", "B")
        return self.send("answer", sdp=sdp, **keys)


def ports(sdp: bytes | None) -> list[int]:
    assert sdp is not None
    return [int(p) for p in re.findall(rb"^m=\w+ (\d+) ", sdp, re.M)]


def address(sdp: bytes | None) -> str:
    assert sdp is not None
    found = re.search(rb"^c=IN IP4 (\S+)", sdp, re.M)
    assert found is not None
    return found.group(1).decode()


def test_offer_and_answer_relay_each_party_through_its_own_side() -> None:
    world = World()
    offer = world.offer(direction=["internal", "external"])
    assert offer.outcome is Outcome.NEW
    assert address(offer.sdp) == str(EXTERNAL)  # the callee reads it: its side's address
    answer = world.answer()
    assert address(answer.sdp) == str(INTERNAL)  # remembered from the offer's direction
    call = world.calls.get("call-1")
    assert call is not None and [s.tag for s in call.sides] == ["A", "B"]
    (stream,) = call.streams()
    assert stream.ready
    assert stream.caller is not None and stream.callee is not None
    assert stream.caller.rtp == Endpoint(IPv4Address(A_IP), 4000)
    assert stream.caller.rtcp == Endpoint(IPv4Address(A_IP), 4001)
    assert stream.callee.rtp == Endpoint(IPv4Address(B_IP), 5000)
    # The callee was told the callee side's pair; the caller is told the caller side's.
    assert stream.callee_relay == Endpoint(EXTERNAL, ports(offer.sdp)[0])
    assert stream.caller_relay == Endpoint(INTERNAL, ports(answer.sdp)[0])
    assert stream.rtcp_relays() == (stream.caller_relay.offset(1), stream.callee_relay.offset(1))
    assert len(world.pool) == 2 and len(world.use) == 4


def test_reoffer_from_the_same_side_keeps_ports() -> None:
    world = World()
    first = world.offer()
    world.answer()
    hold = world.offer(body(A_IP, "m=audio 4002 RTP/AVP 0", "a=sendonly"), **{"to-tag": "B"})
    assert ports(hold.sdp) == ports(first.sdp)
    assert hold.outcome is Outcome.UPDATED and hold.allocated == ()
    world.answer(body(B_IP, "m=audio 5000 RTP/AVP 0", "a=recvonly"))
    call = world.calls.get("call-1")
    assert call is not None
    stream = call.streams()[0]
    assert stream.caller is not None and stream.caller.direction == "sendonly"
    assert stream.caller.rtp == Endpoint(IPv4Address(A_IP), 4002)  # a new port is taken
    assert len(world.pool) == 2


def test_reinvite_from_the_callee_lands_on_the_same_sides() -> None:
    world = World()
    first_offer = world.offer(direction=["internal", "external"])
    first_answer = world.answer()
    reinvite = world.offer(
        body(B_IP, "m=audio 5000 RTP/AVP 0", "a=sendonly"), **{"from-tag": "B", "to-tag": "A"}
    )
    assert ports(reinvite.sdp) == ports(first_answer.sdp)  # A hears of A's pair again
    assert address(reinvite.sdp) == str(INTERNAL)
    reply = world.answer(
        body(A_IP, "m=audio 4000 RTP/AVP 0", "a=recvonly"), **{"from-tag": "B", "to-tag": "A"}
    )
    assert ports(reply.sdp) == ports(first_offer.sdp)
    call = world.calls.get("call-1")
    assert call is not None and call.offer_from == 1 and len(world.pool) == 2


def test_fork_the_latest_answer_takes_the_callee_side_on_the_same_ports() -> None:
    world = World()
    world.offer()
    early = world.answer(**{"to-tag": "B1"})
    final = world.answer(body("198.51.100.99", "m=audio 7000 RTP/AVP 0"), **{"to-tag": "B2"})
    assert final.outcome is Outcome.FORKED and "'B1' replaced by 'B2'" in final.detail
    assert ports(final.sdp) == ports(early.sdp)
    call = world.calls.get("call-1")
    assert call is not None and call.sides[1].tag == "B2"
    stream = call.streams()[0]
    assert stream.callee is not None and stream.callee.rtp == Endpoint(
        IPv4Address("198.51.100.99"), 7000
    )
    # The 487 of the branch that lost: its to-tag is no side's any more.
    lost = world.send("delete", **{"from-tag": "A", "to-tag": "B1"})
    assert lost.outcome is Outcome.UNCHANGED and lost.warnings == ()
    assert "'B1' lost the fork" in lost.detail
    stranger = world.send("delete", **{"from-tag": "A", "to-tag": "B9"})
    assert stranger.outcome is Outcome.UNCHANGED and stranger.warnings
    assert world.calls.get("call-1") is not None
    bye = world.send("delete", **{"from-tag": "A"})
    assert bye.outcome is Outcome.ENDED
    assert world.calls.get("call-1") is None and len(world.use) == 0


def test_cancel_then_487_is_harmless() -> None:
    world = World()
    world.offer()
    cancel = world.send("delete", **{"from-tag": "A"})
    assert cancel.outcome is Outcome.ENDED
    again = world.send("delete", **{"from-tag": "A", "to-tag": "B"})
    assert again.outcome is Outcome.UNCHANGED
    assert again.warnings == ("Call-ID not found or tags didn't match",)
    assert len(world.use) == 0
    with pytest.raises(NgError, match="Call-ID not found"):
        world.send("delete", **{"from-tag": "A", "flags": ["fatal"]})


def test_delete_before_any_answer_by_the_487s_tags_ends_the_call() -> None:
    """rtpengine's last resort: the to-tag never answered, the callee side has no tag."""
    world = World()
    world.offer()
    assert world.send("delete", **{"from-tag": "A", "to-tag": "B"}).outcome is Outcome.ENDED


def test_delete_by_call_id_alone_or_by_the_callees_tag() -> None:
    world = World()
    world.offer()
    world.answer()
    assert world.propose("delete", **{"from-tag": "B", "to-tag": "A"}).outcome is Outcome.ENDED
    assert world.send("delete").outcome is Outcome.ENDED


def test_delete_delay_schedules_and_a_new_signal_cancels_it() -> None:
    world = World(delete_delay=30)
    world.offer()
    world.answer()
    scheduled = world.send("delete", **{"from-tag": "A"})
    assert scheduled.outcome is Outcome.SCHEDULED and scheduled.after is not None
    assert scheduled.after.delete_at == world.now + 30
    world.answer()
    call = world.calls.get("call-1")
    assert call is not None and call.delete_at is None
    now = world.send("delete", **{"from-tag": "A", "delete-delay": 0})
    assert now.outcome is Outcome.ENDED
    ended = world.calls.end("call-1")
    assert ended is None  # already gone


def test_engine_ends_a_call() -> None:
    world = World()
    world.offer()
    change = world.calls.end("call-1")
    assert change is not None and change.after is None
    world.calls.commit(change)
    assert len(world.use) == 0


def test_answer_errors() -> None:
    world = World()
    with pytest.raises(NgError, match="Unknown call-id"):
        world.answer()
    world.offer()
    with pytest.raises(NgError, match="Invalid dialogue association: from-tag 'X'"):
        world.answer(**{"from-tag": "X"})
    with pytest.raises(NgError, match="answer has 2 m= lines, the offer had 1"):
        world.answer(body(B_IP, "m=audio 5000 RTP/AVP 0", "m=video 5002 RTP/AVP 96"))
    world.offer(body(A_IP, "m=audio 4000 RTP/AVP 0", "m=video 0 RTP/AVP 96"))
    with pytest.raises(NgError, match="accepts m= line 2 \\(video\\), which the offer rejected"):
        world.answer(body(B_IP, "m=audio 5000 RTP/AVP 0", "m=video 5002 RTP/AVP 96"))


def test_offer_from_a_third_tag_is_refused() -> None:
    world = World()
    world.offer()
    world.answer()
    with pytest.raises(NgError, match="from-tag 'C' is not a side of this call"):
        world.offer(**{"from-tag": "C"})
    with pytest.raises(NgError, match="to-tag 'Z' is not the other side"):
        world.offer(**{"to-tag": "Z"})


def test_audio_and_video_each_have_pairs_and_a_new_stream_gets_new_ones() -> None:
    world = World()
    offer = world.offer(body(A_IP, "m=audio 4000 RTP/AVP 0", "m=video 0 RTP/AVP 96"))
    assert ports(offer.sdp)[1] == 0 and len(offer.allocated) == 2
    world.answer(body(B_IP, "m=audio 5000 RTP/AVP 0", "m=video 0 RTP/AVP 96"))
    video = world.offer(
        body(A_IP, "m=audio 4000 RTP/AVP 0", "m=video 4002 RTP/AVP 96"), **{"to-tag": "B"}
    )
    assert len(video.allocated) == 2 and ports(video.sdp)[0] == ports(offer.sdp)[0]
    assert len(set(ports(video.sdp))) == 2
    world.answer(body(B_IP, "m=audio 5000 RTP/AVP 0", "m=video 0 RTP/AVP 96"))  # rejected
    call = world.calls.get("call-1")
    assert call is not None
    audio, rejected = call.streams()
    assert audio.ready and not rejected.ready
    assert rejected.callee is not None and rejected.callee.rejected
    assert len(world.pool) == 4


def test_rtcp_mux_offered_and_accepted_rides_the_rtp_port() -> None:
    world = World()
    offer = world.offer(body(A_IP, "m=audio 4000 RTP/AVP 0", "a=rtcp-mux"))
    assert offer.sdp is not None
    assert b"a=rtcp:%d\r\n" % (ports(offer.sdp)[0] + 1) in offer.sdp  # in case it is refused
    answer = world.answer(body(B_IP, "m=audio 5000 RTP/AVP 0", "a=rtcp-mux"))
    assert answer.sdp is not None and b"a=rtcp:%d\r\n" % ports(answer.sdp)[0] in answer.sdp
    call = world.calls.get("call-1")
    assert call is not None
    stream = call.streams()[0]
    assert stream.rtcp_mux and stream.rtcp_relays() is None
    refused = World()
    refused.offer(body(A_IP, "m=audio 4000 RTP/AVP 0", "a=rtcp-mux"))
    plain = refused.answer()
    assert plain.sdp is not None and b"a=rtcp:%d\r\n" % (ports(plain.sdp)[0] + 1) in plain.sdp


def test_hold_at_zero_address_has_no_rtp_endpoint_but_is_not_rejected() -> None:
    world = World()
    world.offer(body("0.0.0.0", "m=audio 4000 RTP/AVP 0"))
    call = world.calls.get("call-1")
    assert call is not None
    party = call.sides[0].parties[0]
    assert party is not None and party.rtp is None and not party.rejected


def test_sip_source_address_uses_received_from() -> None:
    world = World()
    world.offer(flags=["SIP-source-address"], **{"received-from": ["IP4", "203.0.113.9"]})
    call = world.calls.get("call-1")
    assert call is not None
    party = call.sides[0].parties[0]
    assert party is not None and party.rtp == Endpoint(IPv4Address("203.0.113.9"), 4000)
    assert call.sides[0].received_from == IPv4Address("203.0.113.9")


def test_unknown_interface_is_refused() -> None:
    world = World()
    with pytest.raises(
        NgError, match="no interface named 'pub' \\(this node has internal, external"
    ):
        world.offer(direction=["pub", "priv"])
    assert len(world.use) == 0


def test_running_out_of_ports_takes_nothing() -> None:
    world = World(ports=(30000, 30005))  # three pairs
    with pytest.raises(NgError, match="Ran out of ports") as caught:
        world.offer(body(A_IP, "m=audio 4000 RTP/AVP 0", "m=video 4002 RTP/AVP 96"))
    assert caught.value.code == "no-ports"
    # Exactly rtpengine's words, or Kamailio does not try the next node (rtpengine.c).
    assert caught.value.reason == "Ran out of ports"
    assert "every pair of 30000-30005 is held" in caught.value.detail
    assert len(world.use) == 0  # all or nothing


def test_abandon_gives_back_what_a_decision_took() -> None:
    world = World()
    change = world.propose("offer", sdp=AUDIO_A, **{"from-tag": "A"})
    assert len(world.pool) == 2
    world.calls.abandon(change)
    assert len(world.pool) == 0 and world.calls.get("call-1") is None


def test_ng_pairs_avoid_lrkproxy_ports_and_count_for_g() -> None:
    world = World(ports=(30000, 30007))
    world.use.take((30006, 30007))  # an lrkproxy call's ports (Kamailio allocated them)
    offer = world.offer()
    assert set(offer.allocated) == {30004, 30002}  # top down, skipping the held pair
    assert world.use.highest() == 30007
