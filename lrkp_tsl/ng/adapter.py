"""The ng front-end: a datagram in; a reply, and the call change to carry out, out. Pure.

This is what the engine calls for each ng datagram (docs/ng-integration.md): `decide` parses
it (codec.py), asks the call table (callmodel.py) and returns a `Decision`. A decision with
a `change` must be carried out by the engine (store, kernel: the change's `before` and
`after` media) and then settled with `carried_out` (the reply prepared in the decision is
then the answer) or with `failed` (the change is abandoned, its ports given back, and the
reply is an error with the reason). A decision without a change is answered at once
(ping, query, list, statistics, a delete that matched nothing, every error).

Replies to requests that were carried out or refused for good are what a retransmission
must get again: the engine caches them (lrkp_tsl/retransmit.py, keyed by sender, cookie and
digest); a failure of the kernel or the store is not final and not cached, so Kamailio's
resend tries again, as with lrkproxy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from lrkp_tsl.media import Endpoint
from lrkp_tsl.ng import codec
from lrkp_tsl.ng.bencode import Encodable
from lrkp_tsl.ng.callmodel import Change, NgCall, NgCalls, Outcome
from lrkp_tsl.ng.codec import (
    Answer,
    Delete,
    ListCalls,
    NgError,
    Offer,
    Ping,
    Query,
    Request,
    Statistics,
)

MAX_REPLY: Final = 65000
"""A reply must fit one UDP datagram; `list` stops adding Call-IDs before it would not."""


@dataclass(frozen=True, slots=True)
class Counters:
    """A call's media counters (packets, bytes) for `query`; the engine supplies them."""

    rtp_packets: int = 0
    rtp_bytes: int = 0
    rtcp_packets: int = 0
    rtcp_bytes: int = 0


Traffic = Callable[[str], Counters]


@dataclass(slots=True)
class Decision:
    """One datagram's outcome: `reply` to send (None: nothing, no cookie), and the `change`
    to carry out first, if any."""

    request: Request | None
    reply: bytes | None
    change: Change | None = None
    error: NgError | None = None


@dataclass(slots=True)
class NgDecider:
    calls: NgCalls
    traffic: Traffic = field(default=lambda call_id: Counters())
    stats: Counter[str] = field(default_factory=Counter)
    wall_offset: float = 0.0  # engine time + this = Unix time (query's timestamps)

    def decide(self, data: bytes, now: float) -> Decision:
        """`parse`, then `decide_request`."""
        read = self.parse(data)
        return read if isinstance(read, Decision) else self.decide_request(read, now)

    def parse(self, data: bytes) -> Request | Decision:
        """The request, or the decision to refuse it (a reply, no change)."""
        try:
            request = codec.parse(data)
        except NgError as error:
            return self.refuse(None, error)
        self.stats[f"ng.request.{type(request).__name__.lower()}"] += 1
        return request

    def decide_request(self, request: Request, now: float) -> Decision:
        """What `request` does to the calls as they are now (see the module docstring)."""
        try:
            return self._decide(request, now)
        except NgError as error:
            return self.refuse(request, error)

    def refuse(self, request: Request | None, error: NgError) -> Decision:
        """`result: error` for `request` (None: it could not be read), counted."""
        if request is not None:
            error.cookie = request.cookie
        self.stats[f"ng.error.{error.code}"] += 1
        if isinstance(request, Offer) or error.command == "offer":
            self.stats["ng.offer.refused"] += 1
        return Decision(request, codec.reply_error(error), error=error)

    def carried_out(self, decision: Decision) -> bytes | None:
        """The change is in the store and the kernel: commit it; the prepared reply."""
        if decision.change is not None:
            self.calls.commit(decision.change)
            self.stats[f"ng.call.{decision.change.outcome.value}"] += 1
        return decision.reply

    def failed(self, decision: Decision, code: str, reason: str) -> bytes | None:
        """The change was not carried out (kernel or store): give back its ports, answer
        with the reason (not final: a resend tries again)."""
        assert decision.change is not None and decision.request is not None
        self.calls.abandon(decision.change)
        error = NgError(code, reason, decision.request.cookie)
        decision.error = error
        self.stats[f"ng.error.{code}"] += 1
        return codec.reply_error(error)

    # -- per command ---------------------------------------------------------------------------

    def _decide(self, request: Request, now: float) -> Decision:
        if isinstance(request, Ping):
            return Decision(request, codec.reply_pong(request))
        if isinstance(request, Offer):
            change = self.calls.offer(request, now)
        elif isinstance(request, Answer):
            change = self.calls.answer(request, now)
        elif isinstance(request, Delete):
            change = self.calls.delete(request, now)
        elif isinstance(request, Query):
            return Decision(request, self._query(request))
        elif isinstance(request, ListCalls):
            return Decision(request, self._list(request))
        else:
            assert isinstance(request, Statistics)
            return Decision(request, self._statistics(request))
        fields: dict[str, Encodable] = {}
        if change.sdp is not None:
            fields["sdp"] = change.sdp
        reply = codec.reply_ok(request.cookie, change.warnings, **fields)
        if change.outcome is Outcome.UNCHANGED:
            return Decision(request, reply)
        return Decision(request, reply, change)

    def _query(self, request: Query) -> bytes:
        call = self.calls.get(request.call_id)
        if call is None:
            raise NgError("unknown-call", "Unknown call-id")
        counters = self.traffic(call.call_id)
        totals = {
            "RTP": {"packets": counters.rtp_packets, "bytes": counters.rtp_bytes, "errors": 0},
            "RTCP": {"packets": counters.rtcp_packets, "bytes": counters.rtcp_bytes, "errors": 0},
        }
        fields: dict[str, Encodable] = {
            "created": int(call.created + self.wall_offset),
            "last signal": int(call.last_signal + self.wall_offset),
            "tags": _tags(call),
            "totals": totals,
        }
        return codec.reply_ok(request.cookie, (), **fields)

    def _list(self, request: ListCalls) -> bytes:
        ids: list[Encodable] = []
        size = len(request.cookie) + 64
        for call in self.calls:
            if len(ids) >= request.limit or size + len(call.call_id) + 8 > MAX_REPLY:
                break
            ids.append(call.call_id)
            size += len(call.call_id) + 8
        return codec.reply_ok(request.cookie, calls=ids)

    def _statistics(self, request: Statistics) -> bytes:
        live = len(self.calls)
        current: dict[str, Encodable] = {
            "sessionsown": live,
            "sessionsforeign": 0,
            "sessionstotal": live,
            "transcodedmedia": 0,
        }
        total: dict[str, Encodable] = {
            "managedsessions": self.stats["ng.call.new"],
            "rejectedsessions": self.stats["ng.offer.refused"],
        }
        return codec.reply_ok(
            request.cookie,
            statistics={"currentstatistics": current, "totalstatistics": total},
        )


def _endpoint(endpoint: Endpoint | None) -> dict[str, Encodable]:
    if endpoint is None:
        return {}
    return {"family": "IPv4", "address": str(endpoint.ip), "port": endpoint.port}


def _tags(call: NgCall) -> dict[str, Encodable]:
    """rtpengine's `tags` dictionary: per side, its streams and relay ports."""
    tags: dict[str, Encodable] = {}
    streams = call.streams()
    for index, side in enumerate(call.sides):
        other = call.sides[1 - index].tag
        medias: list[Encodable] = []
        for stream in streams:
            party = stream.caller if index == 0 else stream.callee
            relay = stream.caller_relay if index == 0 else stream.callee_relay
            entries: list[Encodable] = [
                {
                    "local port": relay.port,
                    "local address": str(relay.ip),
                    "endpoint": _endpoint(party.rtp if party else None),
                    "flags": ["RTP"],
                }
            ]
            rtcp = stream.rtcp_relays()
            if rtcp is not None:
                entries.append(
                    {
                        "local port": rtcp[index].port,
                        "local address": str(rtcp[index].ip),
                        "endpoint": _endpoint(party.rtcp if party else None),
                        "flags": ["RTCP"],
                    }
                )
            medias.append(
                {
                    "index": stream.index + 1,
                    "type": stream.kind,
                    "protocol": party.proto if party else "",
                    "streams": entries,
                    "flags": ["rtcp-mux"] if stream.rtcp_mux else [],
                }
            )
        entry: dict[str, Encodable] = {"tag": side.tag or "", "medias": medias}
        if other is not None:
            entry["in dialogue with"] = other
        tags[side.tag or ""] = entry
    return tags
