"""The ng front-end: rtpengine's ng datagrams (Kamailio's and OpenSIPS's `rtpengine`
modules) in, their replies out, the engine in between. Pure (no sockets, no clock).

The ng core (lrkp_tsl/ng/) decides: `NgDecider` parses a datagram and says what it does
to the ng calls (callmodel.NgCalls: sides by tag, streams by m= line, relay ports the node
allocates from the range lrkproxy calls use). This module maps each decision to the
engine's operations and settles it once the engine applied it:

- a decision that changes no call (ping, query, list, statistics, a delete that matches
  nothing, an error) is answered at once;
- an offer, an answer and a delete with a delay become a `Relay` of the call's streams
  that both parties described and neither rejected (an offer for a new call: none, so the
  kernel gets nothing until the answer), with the ports the call holds (`reserved`: no
  lrkproxy `S` may take them), the call as text (`record`: ng/record.py, stored and
  replicated with it) and its scheduled end (`end_at`); an answer from another to-tag (a
  fork) drops what the callee side had learned (`fresh`): the new branch is elsewhere;
- a delete becomes an `End`.
The reply prepared with the decision goes out once the engine committed the change (store,
kernel): at once when the server gave a `send` (before the engine's bookkeeping), else
with the batch's replies; if the kernel or the store refused it, the decision is abandoned
(its ports given back) and the reply is an error that is not cached, so the resend tries
again. One decision per Call-ID at a time: a second command about a call waiting in the
batch flushes it first, so each is decided against the call as the earlier one left it.

The ng table follows the engine's call table (`CallTable.watchers`) for what this front-end
did not decide itself: calls loaded at a restart, followed from a pair's active node, or
ended by the engine (idle, lifetime, `lrkp-ctl delete`, their delete-delay). So a
restarted node, or a standby that takes over, answers the next answer or delete of a call
it never saw an offer of. One Call-ID, one protocol: a command about a call relayed for
lrkproxy is refused (and an lrkproxy `S` or `D` about an ng call).

Also here: the retransmission cache (an ng reply carries SDP: up to 64 MiB, 30 s), and
`lrkp-ctl drain`: a draining node answers an offer for a call it does not have with
`result: load limit` (`Parallel session limit reached` to a client that did not send
`supports: ["load limit"]`), which makes Kamailio's module send it to the next node of its
set; offers for its calls, answers and deletes are served as usual.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from ipaddress import IPv4Address
from typing import Final

from lrkp_tsl.engine import Engine
from lrkp_tsl.errors import KernelError, StoreError
from lrkp_tsl.media import RTCP_PORT_OFFSET, Endpoint
from lrkp_tsl.ng import codec
from lrkp_tsl.ng.adapter import Counters, Decision, NgDecider
from lrkp_tsl.ng.allocator import SharedPortPool
from lrkp_tsl.ng.callmodel import Change, Interfaces, NgCall, NgCalls, Outcome, StreamMedia
from lrkp_tsl.ng.codec import NgError, Offer, Request
from lrkp_tsl.ng.record import RecordError, from_json, to_json
from lrkp_tsl.operations import (
    NG,
    Datagram,
    End,
    Operation,
    Refused,
    Relay,
    Result,
    SendNow,
    StreamSpec,
)
from lrkp_tsl.retransmit import RetransmitCache
from lrkp_tsl.session import Call

log = logging.getLogger("lrkp_tsl.ng")

# Kamailio's rtpengine module resends for rtpengine_retr x rtpengine_tout_ms (5 x 1 s); a
# reply carries SDP (a few KiB, at most a datagram): 64 MiB holds 30 s of ~4,000 calls/s.
RETRANSMIT_AGE: Final = 30.0
RETRANSMIT_BYTES: Final = 64 << 20

LOAD_LIMIT: Final = "load limit"
"""The result that sends Kamailio's rtpengine module to the next node of its set (it says
it understands it with `supports: ["load limit"]`)."""
SESSION_LIMIT: Final = "Parallel session limit reached"
"""rtpengine's error-reason for the same, to a client that did not say so; Kamailio's
module tries the next node on it too (it compares the reason whole)."""


def _spec(stream: StreamMedia, call: NgCall) -> StreamSpec:
    """A ready stream in the engine's terms: side 0 is the caller, side 1 the callee."""
    caller, callee = stream.caller, stream.callee
    assert caller is not None and callee is not None
    rtcp = stream.rtcp_relays() is not None
    return StreamSpec(
        caller.rtp,
        stream.caller_relay,
        callee.rtp,
        stream.callee_relay,
        rtcp,
        caller.rtcp if rtcp else None,
        callee.rtcp if rtcp else None,
        call.sides[0].received_from,
        call.sides[1].received_from,
    )


def reserved(call: NgCall) -> frozenset[Endpoint]:
    """Every relay endpoint of every pair the call holds (RTP and RTCP, on its side's
    address), relayed or not yet."""
    return frozenset(
        endpoint
        for side in call.sides
        for port in side.relay
        if port is not None
        for endpoint in _pair(side.ip, port)
    )


@functools.lru_cache(maxsize=1 << 16)
def _pair(ip: IPv4Address, port: int) -> tuple[Endpoint, Endpoint]:
    """A relay pair's RTP and RTCP endpoints, made once: each offer and answer of a call
    reserves them again."""
    return Endpoint(ip, port), Endpoint(ip, port + RTCP_PORT_OFFSET)


class NgFrontEnd:
    """Serves ng through `engine` (which it attaches itself to), with relay ports from the
    engine's own record of the ports in use (`engine.table.ports`)."""

    protocol = NG

    def __init__(
        self,
        engine: Engine,
        interfaces: Interfaces,
        *,
        delete_delay: int = 0,
        wall_offset: float = 0.0,
    ) -> None:
        self.engine = engine
        self.stats = engine.stats
        self.wall_offset = wall_offset
        self.pool = SharedPortPool(engine.table.ports)
        self.calls = NgCalls(self.pool, interfaces, delete_delay)
        self.decider = NgDecider(self.calls, self._traffic, engine.stats, wall_offset)
        self.cache = RetransmitCache(RETRANSMIT_BYTES, RETRANSMIT_AGE)
        self._deciding: set[str] = set()  # Call-IDs whose decision the engine applies now
        engine.attach(self)
        engine.table.watchers.append(self._applied)

    # -- what the engine asks of a front-end -----------------------------------------------

    def describe(self, call: Call) -> Mapping[str, object]:
        ng = self.calls.get(call.call_id)
        if ng is None:
            return {}
        return {"tags": [side.tag or "-" for side in ng.sides]}

    def on_datagrams(
        self, datagrams: Sequence[Datagram], now: float, send: SendNow | None = None
    ) -> list[bytes | None]:
        replies: list[bytes | None] = [None] * len(datagrams)
        sent: set[int] = set()  # replied to through `send`, once committed
        batch = self.engine.batch(now)
        for index, (data, sender, peer, _with_cookie) in enumerate(datagrams):
            if not self.engine.active:
                self.stats["dropped.standby"] += 1
                continue
            cached = self.cache.lookup(sender, data, now)
            if cached is not None:
                self.stats["retransmissions"] += 1
                log.debug("ng retransmission from %s answered from cache", peer)
                replies[index] = cached
                continue
            read = self.decider.parse(data)
            if isinstance(read, Decision):
                replies[index] = self._final(read, sender, data, peer, now)
                continue
            call_id = getattr(read, "call_id", None)
            if call_id is not None and (batch.touches(call_id) or call_id in self._deciding):
                batch.flush()  # decided against the call as the earlier command leaves it
            early = self._before_deciding(read, call_id)
            if early is not None and early.error is None:  # load limit: not cached
                replies[index] = early.reply
                continue
            if early is not None:
                replies[index] = self._final(early, sender, data, peer, now)
                continue
            decision = self.decider.decide_request(read, now)
            if decision.change is None:
                replies[index] = self._final(decision, sender, data, peer, now)
                continue
            assert call_id is not None
            self._deciding.add(call_id)
            done = partial(self._settle, replies, sent, index, decision, sender, data, peer,
                           now)  # fmt: skip
            committed = None
            if send is not None and decision.reply is not None:
                committed = partial(self._committed, send, sent, index, decision, sender,
                                    data, now)  # fmt: skip
            batch.add(self._operation(decision.change), peer, done, committed)
        batch.flush()
        return replies

    # -- internals --------------------------------------------------------------------------

    def _before_deciding(self, request: Request, call_id: str | None) -> Decision | None:
        """What is answered before the call model is asked: a Call-ID the engine relays
        for another protocol (refused), or a new call's offer to a draining node."""
        if call_id is None:
            return None
        call = self.engine.table.get(call_id)
        if call is not None and call.protocol != NG:
            error = NgError(
                "protocol",
                f"call-id {call_id!r} is relayed for the {call.protocol} protocol: "
                "one Call-ID, one protocol",
            )
            return self.decider.refuse(request, error)
        if self.engine.draining and isinstance(request, Offer) and call is None:
            self.stats["drain.offer_refused"] += 1
            if request.load_limit:
                body = {"result": LOAD_LIMIT, "message": "draining"}
            else:  # rtpengine's words for a client that knows no load limit
                body = {"result": "error", "error-reason": SESSION_LIMIT}
            return Decision(request, codec.reply(request.cookie, body))  # not cached
        return None

    def _operation(self, change: Change) -> Operation:
        after = change.after
        if after is None:
            return End(change.call_id, NG, command="ng delete")
        streams = tuple(_spec(stream, after) for stream in after.streams() if stream.ready)
        fresh = frozenset({1 - after.offer_from}) if change.outcome is Outcome.FORKED else None
        return Relay(
            change.call_id,
            NG,
            streams,
            reserved=reserved(after),
            record=to_json(after, self.wall_offset),
            end_at=after.delete_at,
            fresh=fresh or frozenset(),
        )

    def _final(
        self, decision: Decision, sender: Hashable, data: bytes, peer: str, now: float
    ) -> bytes | None:
        """The reply to a decision that changes nothing: it is what a resend gets too."""
        if decision.error is not None:
            self._log_error(decision, peer, now)
        reply = decision.reply
        if reply is not None:
            self.cache.store(sender, data, reply, now)
        return reply

    def _committed(
        self,
        send: SendNow,
        sent: set[int],
        index: int,
        decision: Decision,
        sender: Hashable,
        data: bytes,
        now: float,
    ) -> None:
        """The change is in the store and the kernel: its reply goes now (and is what a
        resend gets). The ng table takes the change in `_settle`, before any other datagram
        is read."""
        reply = decision.reply
        assert reply is not None
        self.cache.store(sender, data, reply, now)
        sent.add(index)
        send(index, reply)

    def _settle(
        self,
        replies: list[bytes | None],
        sent: set[int],
        index: int,
        decision: Decision,
        sender: Hashable,
        data: bytes,
        peer: str,
        now: float,
        result: Result,
    ) -> None:
        """The engine applied (or did not apply) the decision's change: its reply."""
        change = decision.change
        assert change is not None
        self._deciding.discard(change.call_id)
        error = result.error
        if error is None:
            reply = self.decider.carried_out(decision)
            if index in sent:
                return  # sent, and cached, by `_committed`
            if reply is not None:
                self.cache.store(sender, data, reply, now)
            replies[index] = reply
            return
        reply = self.decider.failed(decision, _code(error), error.reason)
        if isinstance(error, Refused):  # for good: a resend gets the same
            self._log_error(decision, peer, now)
            if reply is not None:
                self.cache.store(sender, data, reply, now)
        else:
            log.error("ng %s from %s not applied: %s", _command(decision), peer, error)
        replies[index] = reply

    def _log_error(self, decision: Decision, peer: str, now: float) -> None:
        error = decision.error
        assert error is not None
        call_id = getattr(decision.request, "call_id", None)
        where = f"[{call_id}] " if call_id else ""
        detail = f" ({error.detail})" if error.detail else ""
        self.engine.note_remote(now, "ng errors", "%sng %s from %s answered with an error: "
                                "%s%s", where, _command(decision), peer, error.reason,
                                detail)  # fmt: skip

    def _traffic(self, call_id: str) -> Counters:
        rtp, rtcp = self.engine.carried(call_id)
        return Counters(
            rtp.caller_packets + rtp.callee_packets,
            rtp.caller_bytes + rtp.callee_bytes,
            rtcp.caller_packets + rtcp.callee_packets,
            rtcp.caller_bytes + rtcp.callee_bytes,
        )

    def _applied(self, before: Call | None, after: Call | None) -> None:
        """The engine's table changed a call (CallTable.watchers): the ng table follows what
        this front-end did not decide (its own decisions settle in `_settle`)."""
        call = after if after is not None else before
        assert call is not None
        if call.protocol != NG and (before is None or before.protocol != NG):
            return
        call_id = call.call_id
        if call_id in self._deciding:
            return
        if after is None or after.protocol != NG:
            self.calls.forget(call_id)
            return
        if before is not None and before.record is after.record:
            known = self.calls.get(call_id)
            if known is not None and known.delete_at == after.end_at:
                return  # a learned address, a repair: the ng call is as it was
        if after.record is None:
            log.error("[%s] ng call without its record: ng commands will not find it", call_id)
            self.calls.forget(call_id)
            return
        try:
            ng = from_json(after.record, self.wall_offset, after.end_at)
        except RecordError as error:
            log.error("[%s] ng call record unreadable (%s): ng commands will not find it; "
                      "it is relayed until it ends by itself", call_id, error)  # fmt: skip
            self.calls.forget(call_id)
            return
        try:
            self.calls.adopt(replace(ng, call_id=call_id))
        except ValueError as error:
            log.error("[%s] ng call's relay ports: %s", call_id, error)


def _code(error: KernelError | StoreError | Refused) -> str:
    return error.code


def _command(decision: Decision) -> str:
    request = decision.request
    if request is None:
        return "request"
    return type(request).__name__.lower()
