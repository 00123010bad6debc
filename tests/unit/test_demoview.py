"""The demo's summary says what each call carried, who was latched where, and how it
ended; a call missing media in either direction is called out (the demo then fails)."""

from __future__ import annotations

from lrkp_lab.demo import CallState, Direction, KernelView, Plan
from lrkp_lab.demoview import summary_lines
from lrkp_tsl.media import Endpoint


def ep(text: str) -> Endpoint:
    ip, port = text.split(":")
    return Endpoint.parse(ip, port)


def nat_call(received_back: int) -> CallState:
    caller_relay, callee_relay = ep("10.201.1.1:20002"), ep("10.201.1.1:20000")
    return CallState(
        Plan(2, "c", "b", 0.0, 3.0, "caller behind NAT"),
        state="removed",
        call_id="1-2@10.201.3.10",
        answered_at=10.0,
        hung_up_at=13.0,
        removed_at=16.5,
        relays=(caller_relay, callee_relay),
        sdp=(ep("10.201.3.10:30008"), ep("10.201.1.11:32008")),
        forward=Direction(150, 150, {callee_relay}),
        backward=Direction(150, received_back, {caller_relay} if received_back else set()),
        latched={caller_relay: ep("10.201.1.20:41000"), callee_relay: ep("10.201.1.11:32008")},
        node_said="no media for 3 s",
    )


def test_summary_of_a_call_with_media_both_ways() -> None:
    lines = summary_lines([nat_call(150)], KernelView({}, queued=2))
    text = "\n".join(lines)
    assert "call 2: c -> b  (caller behind NAT)" in text
    assert "  c -> b     150 RTP packets sent, 150 received (0 lost), from 10.201.1.1:20000" in text
    assert "  b -> c     150 RTP packets sent, 150 received (0 lost), from 10.201.1.1:20002" in text
    assert (
        "c at 10.201.1.20:41000 sends to 10.201.1.1:20002: its SDP said 10.201.3.10:30008" in text
    )
    assert "b at 10.201.1.11:32008 (its SDP address) sends to 10.201.1.1:20000" in text
    assert "c hung up (BYE) after 3.0 s of media" in text
    assert "the node removed it 3.5 s later: no media for 3 s" in text
    assert "verdict    media relayed both ways" in text


def test_summary_calls_out_a_silent_direction() -> None:
    call = nat_call(0)
    assert not call.both_ways
    text = "\n".join(summary_lines([call], None))
    assert "  b -> c     150 RTP packets sent, 0 received (150 lost), from nowhere" in text
    assert "verdict    NO MEDIA in some direction" in text
