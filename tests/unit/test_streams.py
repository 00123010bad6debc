"""Calls of several streams and of other shapes than lrkproxy's, through the engine's
protocol-neutral operations (operations.py), with the in-memory kernel and store: what an
ng call needs of the engine, whichever front-end asks for it."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

import pytest

from lrkp_tsl.engine import Engine
from lrkp_tsl.kernel import EMPTY
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import Endpoint
from lrkp_tsl.mgmt import session_row
from lrkp_tsl.operations import End, Operation, Refused, Relay, Result, StreamSpec
from lrkp_tsl.records import decode, encode
from lrkp_tsl.session import Verdict
from tests.unit.test_engine import (
    IDLE,
    LIFETIME,
    agree,
    ep,
    make,
    restarted,
    s_command,
    send,
    stored_agree,
)
from tests.unit.test_operator import summaries

INTERNAL, EXTERNAL = "10.0.0.10", "10.0.1.10"
NAT = IPv4Address("10.0.0.99")  # the caller's NAT, where its signalling came from


def run(engine: Engine, op: Operation, now: float = 0.0) -> Result:
    results: list[Result] = []
    batch = engine.batch(now)
    batch.add(op, "test", results.append)
    batch.flush()
    (result,) = results
    return result


def relay(port: int, side: str = INTERNAL) -> Endpoint:
    return ep(f"{side}:{port}")


AUDIO = StreamSpec(ep("10.0.0.21:4000"), relay(39998), ep("10.0.1.31:6000"),
                   relay(39996, EXTERNAL))  # fmt: skip
VIDEO = StreamSpec(ep("10.0.0.21:4002"), relay(39994), ep("10.0.1.31:6002"),
                   relay(39992, EXTERNAL), rtcp=False)  # fmt: skip
PAIRS = frozenset(
    endpoint.offset(delta)
    for endpoint in (relay(39998), relay(39996, EXTERNAL), relay(39994), relay(39992, EXTERNAL))
    for delta in (0, 1)
)


def audio_video(**changes: object) -> Relay:
    op = Relay("av", "ng", (AUDIO, VIDEO), reserved=PAIRS, record='{"tags":["a","b"]}')
    return op if not changes else Relay(**{**_fields(op), **changes})  # type: ignore[arg-type]


def _fields(op: Relay) -> dict[str, object]:
    return {name: getattr(op, name) for name in op.__dataclass_fields__}


def test_each_stream_is_relayed_with_rtcp_only_where_it_has_it() -> None:
    engine, kernel, store = make(Policy.AUTO)
    assert run(engine, audio_video()).error is None
    call = engine.table.get("av")
    assert call is not None and call.protocol == "ng"
    # Audio: RTP and RTCP both ways; video (rtcp-mux): RTP only.
    relays = {(flow.relay, flow.relay_out) for flow in call.view().flows}
    assert relays == {
        (relay(39998), relay(39996, EXTERNAL)), (relay(39996, EXTERNAL), relay(39998)),
        (relay(39999), relay(39997, EXTERNAL)), (relay(39997, EXTERNAL), relay(39999)),
        (relay(39994), relay(39992, EXTERNAL)), (relay(39992, EXTERNAL), relay(39994)),
    }  # fmt: skip
    agree(engine, kernel)
    stored_agree(engine, store)
    # The reserved RTCP ports of the muxed stream are the call's too.
    assert engine.table.owner(relay(39995)) == "av"
    assert run(engine, audio_video()).error is None  # the same again: nothing changes
    assert kernel.calls["change"] == 1


def test_a_stream_whose_party_is_behind_nat_learns_from_its_first_packet() -> None:
    engine, kernel, _store = make(Policy.AUTO)
    nated = StreamSpec(ep("192.168.1.20:4002"), relay(39994), ep("10.0.1.31:6002"),
                       relay(39992, EXTERNAL), rtcp=False)  # fmt: skip
    run(engine, audio_video(streams=(AUDIO, nated)))
    engine.on_packet(1, ep("10.0.0.99:61000"), relay(39994), 1.0)
    assert engine.take_verdicts() == [(1, Verdict.ACCEPT)]
    call = engine.table.get("av")
    assert call is not None
    video = [leg for leg in call.caller if leg.index == 1]
    assert [leg.latched for leg in video] == [ep("10.0.0.99:61000")]
    agree(engine, kernel)


def test_received_from_lets_only_the_nat_teach_an_unreachable_party_at_first() -> None:
    """ng's received-from: the caller's SDP address is private, its signalling came from
    its NAT: only the NAT's address may teach the leg during HINT_GRACE, anyone after."""
    engine, _kernel, _store = make(Policy.AUTO)
    hinted = StreamSpec(ep("192.168.1.20:4000"), relay(39998), ep("10.0.1.31:6000"),
                        relay(39996, EXTERNAL), caller_hint=NAT)  # fmt: skip
    run(engine, Relay("nat", "ng", (hinted,)), 10.0)
    engine.on_packet(1, ep("10.0.0.66:4000"), relay(39998), 10.2)  # a stranger, first
    engine.on_packet(2, ep("10.0.0.99:55316"), relay(39998), 10.3)  # the NAT
    assert engine.take_verdicts() == [(1, Verdict.DROP), (2, Verdict.ACCEPT)]
    call = engine.table.get("nat")
    assert call is not None and call.caller[0].latched == ep("10.0.0.99:55316")
    # RTCP, from wherever after the grace (media from another address than signalling).
    engine.on_packet(3, ep("10.0.0.77:40001"), relay(39999), 11.5)
    assert engine.take_verdicts() == [(3, Verdict.ACCEPT)]
    # Without a hint (lrkproxy, or no received-from), anyone's first packet counts.
    engine2, _kernel2, _store2 = make(Policy.AUTO)
    plain = StreamSpec(hinted.caller, hinted.caller_relay, hinted.callee, hinted.callee_relay)
    run(engine2, Relay("plain", "ng", (plain,)))
    engine2.on_packet(1, ep("10.0.0.66:4000"), relay(39998), 0.2)
    assert engine2.take_verdicts() == [(1, Verdict.ACCEPT)]


def test_a_call_with_no_stream_yet_holds_its_ports_and_waits_past_the_idle_timeout() -> None:
    """An ng offer: nothing in the kernel, the relay ports the node allocated are the
    call's (an lrkproxy S on them is refused), and ringing for minutes does not end it."""
    engine, kernel, store = make(Policy.AUTO)
    assert run(engine, audio_video(streams=())).error is None
    assert kernel.holds() == EMPTY and kernel.calls["change"] == 0
    assert "av" in store.records
    clash = s_command("lrk", relay_port=39994 - 2, callee="10.0.1.31:6000")  # snat = 39994
    reply = send(engine, clash)
    assert reply is not None and reply.startswith(b"1_1 E relay-port relay endpoint")
    assert b"held by ng call 'av', which the node allocated" in reply
    assert "lrk" not in engine.table
    engine.on_timer(IDLE * 3)
    assert "av" in engine.table  # no idle expiry without a stream
    run(engine, audio_video(), IDLE * 3)  # the answer: relayed, the idle clock starts now
    engine.on_timer(IDLE * 3 + IDLE - 1)
    assert "av" in engine.table
    engine.on_timer(IDLE * 4 + 1)
    assert "av" not in engine.table  # no media for a whole idle timeout since the answer
    assert kernel.holds() == EMPTY and store.records == {}
    engine.on_timer(LIFETIME)


def test_one_call_id_one_protocol() -> None:
    engine, _kernel, _store = make(Policy.AUTO)
    run(engine, audio_video(streams=()))
    reply = send(engine, s_command("av"))
    assert reply is not None and reply.startswith(b"1_1 E protocol call 'av' is relayed for")
    reply = send(engine, s_command("av", verb="D", cookie="1_2"))
    assert reply is not None and reply.startswith(b"1_2 E protocol")
    assert "av" in engine.table
    send(engine, s_command("lrk", cookie="1_3"))
    result = run(engine, End("lrk", "ng"))
    assert isinstance(result.error, Refused) and result.error.code == "protocol"
    assert "lrk" in engine.table


def test_a_scheduled_end_ends_the_call_then_and_a_later_relay_cancels_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, _kernel, store = make(Policy.AUTO)
    run(engine, audio_video(end_at=30.0))
    assert engine.next_deadline() == 30.0
    run(engine, audio_video(), 10.0)  # a new offer: no end any more
    engine.on_timer(30.0)
    assert "av" in engine.table
    run(engine, audio_video(end_at=40.0), 20.0)
    caplog.set_level(logging.INFO, "lrkp_tsl.calls")
    engine.on_timer(40.0)
    assert "av" not in engine.table and store.records == {}
    (record,) = summaries(caplog)
    assert "removed: deleted by the controlling layer (delete-delay)" in record.getMessage()


def test_a_multi_stream_call_comes_back_whole_after_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, kernel, store = make(Policy.AUTO)
    run(engine, audio_video(end_at=500.0))
    run(engine, Relay("offered", "ng", (), reserved=frozenset({relay(39990), relay(39991)})))
    before = kernel.holds()
    again = restarted(kernel, store, 50.0)
    assert kernel.holds() == before and kernel.calls["change"] == 1  # intact: no change
    call = again.table.get("av")
    assert call is not None and call.end_at == 500.0 and len(call.streams) == 2
    assert again.table.owner(relay(39991)) == "offered"
    deadline = again.next_deadline()
    assert deadline is not None and deadline <= 500.0
    caplog.set_level(logging.INFO, "lrkp_tsl.calls")
    again.delete("av", 60.0)
    (record,) = summaries(caplog)
    text = record.getMessage()
    assert "learned stream 1 caller 10.0.0.21:4000/10.0.0.21:4001" not in text  # not heard
    assert "learned stream 1 caller -/-, callee -/-; stream 2 caller -, callee -" in text
    assert text.endswith("; ng call")  # no front-end attached here: no tags
    fields = record.call_summary  # type: ignore[attr-defined]
    assert fields["protocol"] == "ng" and len(fields["streams"]) == 2


def test_lrkp_ctl_shows_every_stream_and_the_protocol() -> None:
    engine, _kernel, _store = make(Policy.AUTO)
    run(engine, audio_video())
    call = engine.table.get("av")
    assert call is not None
    row = session_row(engine, call, {}, 5.0)
    assert row["protocol"] == "ng"
    assert [stream["stream"] for stream in row["media_streams"]] == [1, 2]
    video = row["media_streams"][1]["caller"]
    assert video["latching_rtcp"] == "none" and video["relay"] == "10.0.0.10:39994"
    assert row["caller"] == row["media_streams"][0]["caller"]
    offered = Relay("offered", "ng", ())
    run(engine, offered)
    waiting = engine.table.get("offered")
    assert waiting is not None
    row = session_row(engine, waiting, {}, 5.0)
    assert row["caller"] is None and row["media_streams"] == []


def test_a_standby_applies_an_ng_call_like_any_record() -> None:
    """The pair's replication carries records.encode dicts: a multi-stream ng call, and an
    offer with no stream yet, reach the standby's table, kernel and store whole."""
    active, active_kernel, _store = make(Policy.AUTO)
    run(active, audio_video(end_at=90.0))
    run(active, Relay("offered", "ng", (), reserved=frozenset({relay(39990)}), record="{}"))
    standby, standby_kernel, standby_store = make(Policy.AUTO)
    standby.active = False
    for call_id in ("av", "offered"):
        call = active.table.get(call_id)
        assert call is not None
        record = decode(encode(call, None, 1000.0), 1000.0)  # as through Redis
        standby.follow(call_id, record, 5.0)
        assert standby.table.get(call_id) == call
    assert standby_kernel.holds() == active_kernel.holds()
    assert set(standby_store.records) == {"av", "offered"}
    assert standby.table.owner(relay(39990)) == "offered"
    standby.follow("av", None, 6.0)  # it ended on the active node
    assert standby_kernel.holds() == EMPTY and "av" not in standby.table
