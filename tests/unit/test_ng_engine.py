"""The ng front-end over the engine (frontends/ng.py), without root: ng datagrams in, the
in-memory kernel and store (tests/fakes.py) as the engine changes them, replies out.

What an ng call gets from the engine is what an lrkproxy call gets: the same kernel path,
store, restart and pair replication; what differs is who allocates the relay ports (the
node) and when the kernel is told (the answer)."""

from __future__ import annotations

import logging
import re
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl.ctl import show_call, show_sessions
from lrkp_tsl.engine import Engine, Settings
from lrkp_tsl.frontends.lrkproxy import LrkproxyFrontEnd
from lrkp_tsl.frontends.ng import NgFrontEnd
from lrkp_tsl.kernel import EMPTY
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import Endpoint, PortRange
from lrkp_tsl.mgmt import session_row
from lrkp_tsl.ng.bencode import Value, decode, encode
from lrkp_tsl.ng.callmodel import Interfaces
from lrkp_tsl.session import Verdict
from tests.fakes import FakeKernel, MemoryStore
from tests.unit.test_engine import IDLE, LIFETIME, LIMITS, NODE, ROUTED, agree, ep, s_command
from tests.unit.test_operator import summaries

INTERNAL, EXTERNAL = IPv4Address("10.0.0.10"), IPv4Address("10.0.1.10")
PORTS = PortRange(20000, 20099)  # lrkproxy's S take the bottom, ng allocates from the top
KAMAILIO = ("10.0.0.5", 5060)
CALLER, CALLEE = "10.0.0.21", "10.0.1.31"  # reachable: trusted from their SDP
PRIVATE = "192.168.1.20"  # a caller behind NAT, its SDP address as its phone wrote it


def sdp(ip: str, *media: str) -> bytes:
    head = f"v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
    return (head + "".join(line + "\r\n" for line in media)).encode()


AUDIO = "m=audio {} RTP/AVP 0"
VIDEO_MUX = ("m=video {} RTP/AVP 96", "a=rtpmap:96 VP8/90000", "a=rtcp-mux")


class Node:
    """An engine with both front-ends, as the daemon builds it, on the fakes."""

    def __init__(
        self,
        kernel: FakeKernel | None = None,
        store: MemoryStore | None = None,
        now: float = 0.0,
        policy: Policy = Policy.AUTO,
    ) -> None:
        self.kernel = kernel or FakeKernel()
        self.store = store or MemoryStore()
        settings = Settings(LIFETIME, IDLE, policy, ROUTED, PORTS)
        self.engine = Engine(settings, self.kernel, self.store)
        self.lrkproxy = LrkproxyFrontEnd(self.engine, NODE, LIMITS)
        interfaces = Interfaces({"internal": INTERNAL, "external": EXTERNAL})
        self.ng = NgFrontEnd(self.engine, interfaces, wall_offset=1_000_000.0)
        self.now = now
        self._cookie = 0
        if store is not None and kernel is not None:  # a restart: load and reconcile
            self.engine.restore(self.store.load(), self.kernel.state(), now)

    def raw(self, data: bytes) -> bytes | None:
        return self.ng.on_datagrams([(data, KAMAILIO, "10.0.0.5:5060", True)], self.now)[0]

    def datagram(self, **message: object) -> bytes:
        self._cookie += 1
        return f"k_{self._cookie} ".encode() + encode(message)  # type: ignore[arg-type]

    def send(self, **message: object) -> dict[str, Value]:
        return reply(self.raw(self.datagram(**message)))

    def offer(
        self, call_id: str = "c", body: bytes | None = None, **keys: object
    ) -> dict[str, Value]:
        keys.setdefault("from-tag", "A")
        keys.setdefault("ICE", "remove")
        keys.setdefault("direction", ["internal", "external"])
        body = body or sdp(CALLER, AUDIO.format(4000))
        return self.send(command="offer", sdp=body, **{"call-id": call_id}, **keys)

    def answer(
        self, call_id: str = "c", body: bytes | None = None, **keys: object
    ) -> dict[str, Value]:
        keys.setdefault("from-tag", "A")
        keys.setdefault("to-tag", "B")
        keys.setdefault("ICE", "remove")
        keys.setdefault("direction", ["external", "internal"])
        body = body or sdp(CALLEE, AUDIO.format(6000))
        return self.send(command="answer", sdp=body, **{"call-id": call_id}, **keys)

    def delete(self, call_id: str = "c", /, **keys: object) -> dict[str, Value]:
        keys.setdefault("from-tag", "A")
        return self.send(command="delete", **{"call-id": call_id}, **keys)


def reply(data: bytes | None) -> dict[str, Value]:
    assert data is not None
    value = decode(data.partition(b" ")[2])
    assert isinstance(value, dict)
    return {key.decode(): item for key, item in value.items()}


def relay_ports(answer: dict[str, Value]) -> list[int]:
    body = answer["sdp"]
    assert isinstance(body, bytes)
    return [int(port) for port in re.findall(rb"^m=\w+ (\d+) ", body, re.M)]


def ok(answer: dict[str, Value]) -> dict[str, Value]:
    assert answer["result"] == b"ok", answer
    return answer


def test_an_offer_installs_nothing_and_the_answer_installs_the_call() -> None:
    node = Node()
    offer = ok(node.offer())
    (callee_side,) = relay_ports(offer)
    assert node.kernel.holds() == EMPTY and node.kernel.calls["change"] == 0
    assert "c" in node.store.records  # the offer is stored: a restart keeps the call
    assert callee_side in (20098, 20096)  # allocated from the top of the range
    answer = ok(node.answer())
    (caller_side,) = relay_ports(answer)
    call = node.engine.table.get("c")
    assert call is not None and call.protocol == "ng"
    (stream,) = call.streams
    assert stream.caller == ep(f"{CALLER}:4000") and stream.callee == ep(f"{CALLEE}:6000")
    assert stream.caller_relay == Endpoint(INTERNAL, caller_side)
    assert stream.callee_relay == Endpoint(EXTERNAL, callee_side)
    # Both parties are reachable: relayed both ways, RTP and RTCP, from the start.
    assert len(call.view().flows) == 4
    agree(node.engine, node.kernel)
    ok(node.delete())
    assert node.kernel.holds() == EMPTY and node.store.records == {}
    assert len(node.engine.table.ports) == 0 and len(node.ng.pool) == 0


def test_each_ready_stream_is_installed_and_a_rejected_one_is_not() -> None:
    node = Node()
    offer_body = sdp(CALLER, AUDIO.format(4000), *(line.format(4002) for line in VIDEO_MUX),
                     "m=text 4004 RTP/AVP 98")  # fmt: skip
    ok(node.offer("c", offer_body))
    answer_body = sdp(CALLEE, AUDIO.format(6000), *(line.format(6002) for line in VIDEO_MUX),
                      "m=text 0 RTP/AVP 98")  # fmt: skip
    ok(node.answer("c", answer_body))
    call = node.engine.table.get("c")
    assert call is not None and len(call.streams) == 2  # the text stream was rejected
    audio, video = call.streams
    assert audio.rtcp and not video.rtcp  # rtcp-mux: RTCP rides the video's RTP ports
    assert len(call.view().flows) == 4 + 2
    # The rejected stream's pairs stay the call's (a re-offer may bring it back).
    assert len(call.reserved) == 3 * 2 * 2
    agree(node.engine, node.kernel)


def test_an_lrkproxy_s_on_ports_the_node_allocated_is_refused() -> None:
    node = Node()
    (port,) = relay_ports(ok(node.offer()))
    # Kamailio's lrkproxy counter wrapped onto the ng call's callee side (external IP).
    clash = (f"1_1 S 10.0.0.21 {EXTERNAL} {EXTERNAL} 10.0.1.31 4000 {port} {port - 8} 6000 "
             "60 lrk ").encode()  # fmt: skip
    refused = node.lrkproxy.on_datagram(clash, KAMAILIO, "kamailio", 1.0)
    assert refused is not None and b"E relay-port" in refused and b"ng call 'c'" in refused
    ok(node.answer())
    refused = node.lrkproxy.on_datagram(clash.replace(b"1_1", b"1_2"), KAMAILIO, "k", 2.0)
    assert refused is not None and b"E relay-port" in refused
    assert (
        "lrk" not in node.engine.table and node.engine.table.owner(Endpoint(EXTERNAL, port)) == "c"
    )


def test_one_call_id_one_protocol() -> None:
    node = Node()
    datagram = s_command("both", relay_port=20000)
    assert node.lrkproxy.on_datagram(datagram, KAMAILIO, "k", 0.0) == datagram + b"OK"
    data = node.datagram(command="offer", sdp=sdp(CALLER, AUDIO.format(4000)),
                         **{"call-id": "both", "from-tag": "A"})  # fmt: skip
    for _ in range(2):  # final: a resend gets the same from the cache
        refused = reply(node.raw(data))
        assert refused["result"] == b"error"
        assert b"relayed for the lrkproxy protocol" in refused["error-reason"]  # type: ignore[operator]
    assert node.engine.stats["ng.error.protocol"] == 1
    assert len(node.ng.pool) == 0  # nothing allocated for it


def test_a_fork_relearns_the_callee_side() -> None:
    """A 183 from one branch, a 200 from another behind the same NAT (same SDP address):
    what the first branch's packets taught the callee legs is forgotten."""
    node = Node()
    ok(node.offer())
    branch = sdp(PRIVATE, AUDIO.format(6000))
    ok(node.answer("c", branch, **{"to-tag": "B1"}))
    call = node.engine.table.get("c")
    assert call is not None
    callee_relay = call.streams[0].callee_relay
    node.engine.on_packet(1, ep("10.0.1.99:7000"), callee_relay, 1.0)  # branch 1's NAT
    assert node.engine.take_verdicts() == [(1, Verdict.ACCEPT)]
    learned = node.engine.table.get("c")
    assert learned is not None and learned.callee[0].latched == ep("10.0.1.99:7000")
    ok(node.answer("c", branch, **{"to-tag": "B2"}))
    forked = node.engine.table.get("c")
    assert forked is not None and forked.callee[0].latched is None  # learned anew
    assert forked.caller[0].latched == ep(f"{CALLER}:4000")  # the caller side kept
    assert node.engine.stats["ng.call.forked"] == 1
    node.engine.on_packet(2, ep("10.0.1.98:7002"), callee_relay, 2.0)  # branch 2's NAT
    assert node.engine.take_verdicts() == [(2, Verdict.ACCEPT)]
    agree(node.engine, node.kernel)


def test_received_from_teaches_the_nat_d_caller_before_anyone_else() -> None:
    node = Node()
    ok(node.offer("c", sdp(PRIVATE, AUDIO.format(4000)), **{"received-from": ["IP4", "10.0.0.99"]}))
    ok(node.answer("c", None, **{"received-from": ["IP4", "10.0.0.5"]}))
    call = node.engine.table.get("c")
    assert call is not None
    relay = call.streams[0].caller_relay
    node.engine.on_packet(1, ep("10.0.0.66:4000"), relay, 0.1)  # a stranger, first
    node.engine.on_packet(2, ep("10.0.0.99:41000"), relay, 0.2)  # the caller's NAT
    assert node.engine.take_verdicts() == [(1, Verdict.DROP), (2, Verdict.ACCEPT)]


def test_retransmissions_are_answered_from_the_cache_and_applied_once() -> None:
    node = Node()
    data = node.datagram(command="offer", sdp=sdp(CALLER, AUDIO.format(4000)),
                         **{"call-id": "c", "from-tag": "A"})  # fmt: skip
    first = node.raw(data)
    assert node.raw(data) == first and node.raw(data) == first
    assert node.engine.stats["retransmissions"] == 2
    assert node.engine.stats["ng.call.new"] == 1 and len(node.ng.pool) == 2


def test_a_kernel_failure_is_not_cached_and_gives_the_ports_back() -> None:
    node = Node()
    ok(node.offer())
    data = node.datagram(command="answer", sdp=sdp(CALLEE, AUDIO.format(6000)),
                         **{"call-id": "c", "from-tag": "A", "to-tag": "B"})  # fmt: skip
    node.kernel.fail_next("change")
    failed = reply(node.raw(data))
    assert failed["result"] == b"error" and failed["error-reason"].startswith(b"injected")  # type: ignore[union-attr]
    call = node.engine.table.get("c")
    assert call is not None and not call.streams  # still the offer
    assert ok(reply(node.raw(data)))  # the resend tries again, and succeeds
    agree(node.engine, node.kernel)


def test_a_new_offer_fails_whole_when_the_store_refuses_it() -> None:
    node = Node()
    node.store.fail_next("put")
    failed = node.offer()
    assert failed["result"] == b"error"
    assert len(node.ng.pool) == 0 and len(node.engine.table.ports) == 0
    assert node.ng.calls.get("c") is None and "c" not in node.engine.table


def test_delete_delay_ends_the_call_by_the_engines_clock(caplog: pytest.LogCaptureFixture) -> None:
    node = Node()
    ok(node.offer())
    ok(node.answer())
    ok(node.delete(**{"delete-delay": 5}))
    assert "c" in node.engine.table and node.kernel.holds() != EMPTY  # media goes on
    node.engine.on_timer(4.9)
    assert "c" in node.engine.table
    caplog.set_level(logging.INFO, "lrkp_tsl.calls")
    node.engine.on_timer(5.0)
    assert "c" not in node.engine.table and node.kernel.holds() == EMPTY
    assert node.ng.calls.get("c") is None and len(node.ng.pool) == 0
    assert len(node.engine.table.ports) == 0
    (record,) = summaries(caplog)
    text = record.getMessage()
    assert "deleted by the controlling layer (delete-delay)" in text
    assert text.endswith("; ng call, tags A/B")


def test_a_new_offer_cancels_a_scheduled_delete() -> None:
    node = Node()
    ok(node.offer())
    ok(node.answer())
    ok(node.delete(**{"delete-delay": 5}))
    node.now = 1.0
    ok(node.offer())  # a re-INVITE: the call goes on (as rtpengine)
    node.engine.on_timer(6.0)
    assert "c" in node.engine.table


def test_a_restart_restores_the_ng_table_and_its_ports() -> None:
    node = Node()
    ok(node.offer("offered"))
    ok(node.offer("answered", sdp(CALLER, AUDIO.format(4100))))
    ok(node.answer("answered"))
    held = sorted(node.ng.pool.held())
    kernel_before = node.kernel.holds()
    again = Node(node.kernel, node.store, now=30.0)
    assert sorted(again.ng.pool.held()) == held  # the pool holds what the calls hold
    assert node.kernel.holds() == kernel_before
    assert again.engine.stats["ng.call.new"] == 0
    # The next commands find their calls: an answer to the offer before the restart, and a
    # new offer gets other ports.
    ok(again.answer("offered"))
    (port,) = relay_ports(ok(again.offer("third", sdp(CALLER, AUDIO.format(4200)))))
    assert port not in held and port - 1 not in held
    query = ok(again.send(command="query", **{"call-id": "answered"}))
    assert query["created"] == 1_000_000  # wall-clock, kept across the restart
    for call_id in ("offered", "answered", "third"):
        ok(again.delete(call_id))
    assert len(again.engine.table.ports) == 0 and len(again.ng.pool) == 0


def test_an_idle_call_ends_in_the_engine_and_leaves_the_ng_table() -> None:
    node = Node()
    ok(node.offer())
    ok(node.answer())
    node.engine.on_timer(IDLE + 1)
    assert "c" not in node.engine.table
    assert node.ng.calls.get("c") is None and len(node.engine.table.ports) == 0
    gone = node.delete()  # Kamailio's BYE later: harmless
    assert gone["result"] == b"ok" and gone["warning"] == b"Call-ID not found or tags didn't match"


def test_an_offer_that_rings_longer_than_the_idle_timeout_is_kept() -> None:
    node = Node()
    ok(node.offer())
    node.engine.on_timer(IDLE * 3)
    node.now = IDLE * 3
    assert ok(node.answer())


def test_a_standby_answers_nothing_and_follows_ng_calls() -> None:
    active = Node()
    ok(active.offer())
    standby = Node()
    standby.engine.active = False
    assert standby.raw(standby.datagram(command="ping")) is None
    assert standby.engine.stats["dropped.standby"] == 1
    call = active.engine.table.get("c")
    assert call is not None
    from lrkp_tsl.records import decode
    from lrkp_tsl.records import encode as encode_record

    standby.engine.follow("c", decode(encode_record(call, None, 0.0), 0.0), 1.0)
    assert standby.ng.calls.get("c") is not None and len(standby.ng.pool) == 2
    standby.engine.promote(2.0)
    standby.now = 2.0
    ok(standby.answer())  # the takeover answers the offer the old active node took
    assert len(standby.engine.table.get("c").view().flows) == 4  # type: ignore[union-attr]


def test_a_draining_node_sends_new_calls_elsewhere_and_serves_its_own() -> None:
    node = Node()
    ok(node.offer("mine"))
    node.engine.draining = True
    limit = node.offer("new", None, supports=["load limit"])
    assert limit == {"result": b"load limit", "message": b"draining"}
    # A client that did not say it knows "load limit" gets rtpengine's error for it.
    refused = node.offer("new")
    assert refused == {"result": b"error", "error-reason": b"Parallel session limit reached"}
    assert "new" not in node.engine.table and len(node.ng.pool) == 2
    ok(node.offer("mine"))  # a re-offer of a call it has
    ok(node.answer("mine"))
    ok(node.delete("mine"))
    assert node.send(command="ping") == {"result": b"pong"}
    node.engine.draining = False
    ok(node.offer("new"))


def test_commands_about_one_call_in_one_read_are_decided_in_order() -> None:
    node = Node()
    offer = node.datagram(command="offer", sdp=sdp(CALLER, AUDIO.format(4000)), ICE="remove",
                          **{"call-id": "c", "from-tag": "A"})  # fmt: skip
    answer = node.datagram(command="answer", sdp=sdp(CALLEE, AUDIO.format(6000)), ICE="remove",
                           **{"call-id": "c", "from-tag": "A", "to-tag": "B"})  # fmt: skip
    other = node.datagram(command="offer", sdp=sdp(CALLER, AUDIO.format(4100)), ICE="remove",
                          **{"call-id": "d", "from-tag": "A"})  # fmt: skip
    replies = node.ng.on_datagrams(
        [(data, KAMAILIO, "k", True) for data in (offer, answer, other)], 0.0
    )
    assert [reply(r)["result"] for r in replies] == [b"ok", b"ok", b"ok"]
    call = node.engine.table.get("c")
    assert call is not None and len(call.streams) == 1
    agree(node.engine, node.kernel)


def test_query_list_and_statistics() -> None:
    node = Node()
    ok(node.offer())
    ok(node.answer())
    listed = ok(node.send(command="list"))
    assert listed["calls"] == [b"c"]
    stats = ok(node.send(command="statistics"))["statistics"]
    assert isinstance(stats, dict)
    current = stats[b"currentstatistics"]
    assert isinstance(current, dict) and current[b"sessionsown"] == 1
    query = ok(node.send(command="query", **{"call-id": "c"}))
    assert set(query["tags"]) == {b"A", b"B"}  # type: ignore[arg-type]


# -- invariant: whatever happens, every port goes back ------------------------------------

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["offer", "answer", "fork", "delete", "delay", "idle", "restart",
                         "fail", "lrkproxy"]),
        st.sampled_from(["c1", "c2", "c3"]),
    ),
    max_size=25,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(ACTIONS)
def test_ports_in_use_are_exactly_the_live_calls(actions: list[tuple[str, str]]) -> None:
    """After any sequence of commands, failures, timers and restarts: PortUse holds each
    live call's relay ports twice at most (its table and, for ng, its pool), the pool
    exactly the pairs of the ng table, and once every call ended nothing at all."""
    node = Node()
    now = 0.0
    for action, call_id in actions:
        now += 1.0
        node.now = now
        if action == "offer":
            node.offer(call_id)
        elif action in ("answer", "fork"):
            node.answer(call_id, None, **{"to-tag": "B2" if action == "fork" else "B"})
        elif action == "delete":
            node.delete(call_id)
        elif action == "delay":
            node.delete(call_id, **{"delete-delay": 2})
        elif action == "idle":
            now += IDLE
            node.engine.on_timer(now)
        elif action == "restart":
            node = Node(node.kernel, node.store, now)
        elif action == "fail":
            node.kernel.fail_next("change")
            node.store.fail_next("put")
            node.answer(call_id)
            node.kernel.clear_failures()
            node.store.clear_failures()
            node.engine.on_timer(now + 1.0)  # the retry
        else:
            port = 20000 + 4 * (int(call_id[1]) - 1)
            node.lrkproxy.on_datagram(s_command(f"l{call_id}", relay_port=port), KAMAILIO,
                                      "k", now)  # fmt: skip
        ng_pairs = sorted(p for call in node.ng.calls for p in call.pairs())
        assert sorted(node.ng.pool.held()) == ng_pairs
        for call in node.ng.calls:
            assert call.call_id in node.engine.table
    for live in list(node.engine.table):
        node.engine.delete(live.call_id, now)
    assert len(node.engine.table) == 0 and len(node.ng.calls) == 0
    assert len(node.engine.table.ports) == 0


def test_lrkp_ctl_prints_an_ng_call_with_its_protocol_tags_and_streams() -> None:
    node = Node()
    body = sdp(CALLER, AUDIO.format(4000), *(line.format(4002) for line in VIDEO_MUX))
    ok(node.offer("c", body))
    ok(
        node.answer(
            "c", sdp(CALLEE, AUDIO.format(6000), *(line.format(6002) for line in VIDEO_MUX))
        )
    )
    ok(node.offer("ringing"))
    rows = []
    for call_id in ("c", "ringing"):
        call = node.engine.table.get(call_id)
        assert call is not None
        row = session_row(node.engine, call, {}, 5.0)
        rows.append(row | {"flows": [], "learning": [], "idle_timeout": IDLE})
    table = show_sessions(rows, {"calls": 2})
    assert "c [ng, tags A/B]" in table and "  stream 2" in table
    assert "ringing [ng, tags A/-]" in table and "(no stream yet)" in table
    shown = show_call(rows[0])
    assert shown.startswith("call c (ng, tags A/B)")
    assert "  stream 2 caller: SDP 10.0.0.21:4002" in shown
    assert "RTCP none (rtcp-mux, or not RTP)" in shown
    assert "no stream relayed yet" in show_call(rows[1])


def test_a_reply_goes_as_soon_as_the_change_is_committed() -> None:
    """With the server's `send`, an offer's, an answer's and a delete's reply go when the
    change is in the store and the kernel, before the engine's bookkeeping (the call table,
    conntrack): what a reply promises holds at the moment it is sent; the batch returns
    None for them, and a resend gets the same bytes from the cache."""
    node = Node()
    seen: list[tuple[int, bytes, bool, bool]] = []
    tables: list[int | None] = []  # the call's streams in the engine's table when sent

    def send(index: int, data: bytes) -> None:
        in_store, call = "c" in node.store.records, node.engine.table.get("c")
        seen.append((index, data, in_store, node.kernel.holds() != EMPTY))
        tables.append(None if call is None else len(call.streams))

    def exchange(datagram: bytes) -> bytes:
        seen.clear()
        replies = node.ng.on_datagrams([(datagram, KAMAILIO, "k", True)], node.now, send)
        assert replies == [None] and len(seen) == 1 and seen[0][0] == 0
        resent = node.raw(datagram)  # a retransmission: answered from the cache
        assert resent == seen[0][1]
        return seen[0][1]

    offer = node.datagram(command="offer", sdp=sdp(CALLER, AUDIO.format(4000)), ICE="remove",
                          direction=["internal", "external"],
                          **{"call-id": "c", "from-tag": "A"})  # fmt: skip
    ok(reply(exchange(offer)))
    assert seen[0][2:] == (True, False)  # stored; the kernel gets nothing until the answer
    assert tables == [None]  # sent before the table took the new call
    answer = node.datagram(command="answer", sdp=sdp(CALLEE, AUDIO.format(6000)), ICE="remove",
                           direction=["external", "internal"],
                           **{"call-id": "c", "from-tag": "A", "to-tag": "B"})  # fmt: skip
    ok(reply(exchange(answer)))
    assert seen[0][2:] == (True, True)
    assert tables[-1] == 0  # the table still had the offer's call, without streams
    call = node.engine.table.get("c")
    assert call is not None and len(call.view().flows) == 4  # the table followed
    agree(node.engine, node.kernel)
    delete = node.datagram(command="delete", **{"call-id": "c", "from-tag": "A"})
    ok(reply(exchange(delete)))
    assert seen[0][2:] == (False, False)
    assert tables[-1] == 1  # the table still had the call
    assert node.engine.table.get("c") is None and len(node.ng.pool) == 0


def test_a_change_the_kernel_refuses_is_not_sent_early() -> None:
    """No early reply for a change that did not commit: the error comes back with the batch
    (not cached: the resend tries again)."""
    node = Node()
    ok(node.offer())
    node.kernel.fail_next("change")
    sent: list[bytes] = []
    answer = node.datagram(command="answer", sdp=sdp(CALLEE, AUDIO.format(6000)), ICE="remove",
                           **{"call-id": "c", "from-tag": "A", "to-tag": "B"})  # fmt: skip
    replies = node.ng.on_datagrams([(answer, KAMAILIO, "k", True)], node.now,
                                   lambda _index, data: sent.append(data))  # fmt: skip
    assert sent == []
    assert reply(replies[0])["result"] == b"error"
    ok(reply(node.raw(answer)))  # tried again, and committed
