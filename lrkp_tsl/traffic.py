"""What each call carried, each way, from conntrack's own counters. Pure.

A stream has one conntrack entry whose original direction is its first sender's, so an
entry's counters are split into "sent by the caller" and "sent by the callee" by which
party that first sender is. The kernel counts; the node only adds up:

- entries that ended while the call lived (expired, or deleted when a leg re-latched)
  report their counters in their DESTROY event: `on_ended` keeps them;
- entries still live are read when they are needed (`lrkp-ctl`, or just before a call's
  entries are deleted at its end) and added by `total`.

So a call's figures are exact while no event is lost (a full socket buffer loses some;
the node says so in its log). Bytes are IP bytes as conntrack counts them: the UDP
payload plus 28 bytes of IPv4 and UDP headers per packet.

The same counters say which legs were *heard*: a party that sent on a stream. A party the
node trusts at its SDP address (reachable, or `strict`) is relayed to from the start, before
it sends anything, so its address alone says nothing: a party that never sent RTCP is
reported as not heard on RTCP, never as learned at its SDP address + 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lrkp_tsl.kernel import Counters, StreamKey
from lrkp_tsl.latching import Rule
from lrkp_tsl.media import Endpoint, Stream
from lrkp_tsl.operations import LRKPROXY
from lrkp_tsl.session import Call, Leg

# (side, stream index, kind) of a leg that sent at least one packet: ("caller", 0, RTCP)
Heard = frozenset[tuple[str, int, Stream]]


@dataclass(slots=True)
class Tally:
    """Packets and bytes sent by each party (and relayed to the other)."""

    caller_packets: int = 0
    caller_bytes: int = 0
    callee_packets: int = 0
    callee_bytes: int = 0

    def add(self, caller_sent: bool, counters: Counters) -> None:
        if caller_sent:
            self.caller_packets += counters.packets_orig
            self.caller_bytes += counters.bytes_orig
            self.callee_packets += counters.packets_reply
            self.callee_bytes += counters.bytes_reply
        else:
            self.callee_packets += counters.packets_orig
            self.callee_bytes += counters.bytes_orig
            self.caller_packets += counters.packets_reply
            self.caller_bytes += counters.bytes_reply

    def copy(self) -> Tally:
        return Tally(self.caller_packets, self.caller_bytes, self.callee_packets, self.callee_bytes)

    def as_dict(self) -> dict[str, int]:
        return {
            "caller_to_callee_packets": self.caller_packets,
            "caller_to_callee_bytes": self.caller_bytes,
            "callee_to_caller_packets": self.callee_packets,
            "callee_to_caller_bytes": self.callee_bytes,
        }


def caller_sent(call: Call, key: StreamKey) -> bool:
    """Whether the entry keyed `key` (its original direction) was started by the caller.

    By the relay endpoint it was sent to; in shared-port mode (both parties on one relay
    port) by its sender.
    """
    sender, relay = key
    to_caller_side = any(leg.relay == relay for leg in call.caller)
    to_callee_side = any(leg.relay == relay for leg in call.callee)
    if to_caller_side != to_callee_side:
        return to_caller_side
    return not any(leg.latched == sender for leg in call.callee)


def leg_of(call: Call, key: StreamKey) -> tuple[str, Leg] | None:
    """("caller" | "callee", leg) of the leg whose latched address sends on `key`."""
    sender, relay = key
    for side, legs in (("caller", call.caller), ("callee", call.callee)):
        for leg in legs:
            if leg.relay == relay and leg.latched == sender:
                return side, leg
    return None


def senders(call: Call, key: StreamKey, counters: Counters) -> set[tuple[str, int, Stream]]:
    """The legs that sent on the entry keyed `key`: its original direction's sender (the
    leg latched there), and the same stream's leg on the other side if a reply came."""
    found = leg_of(call, key)
    if found is None:
        return set()
    side, leg = found
    heard = set()
    if counters.packets_orig:
        heard.add((side, leg.index, leg.stream))
    if counters.packets_reply:
        heard.add(("callee" if side == "caller" else "caller", leg.index, leg.stream))
    return heard


def _kind(call: Call, key: StreamKey) -> Stream | None:
    """RTP or RTCP: which kind of stream the entry keyed `key` carries (by relay endpoint)."""
    relay = key[1]
    return next((leg.stream for leg in call.legs() if leg.relay == relay), None)


def learned_from_a_packet(leg: Leg) -> bool:
    """A latched address no packet could have been needed for is only trusted: the SDP
    address of a leg that may be relayed to before it sends (rules `exact`, `same-ip`).
    Any other latched address was taught by the party's own packet."""
    if leg.latched is None:
        return False
    return leg.rule is Rule.ANYWHERE or leg.latched != leg.sdp


class Traffic:
    """Per call: the counters of its entries that already ended, and who sent on them."""

    def __init__(self) -> None:
        self._ended: dict[str, Tally] = {}
        self._ended_rtcp: dict[str, Tally] = {}  # of `_ended`, what RTCP entries carried
        self._started: dict[str, set[StreamKey]] = {}
        self._heard: dict[str, set[tuple[str, int, Stream]]] = {}

    def on_started(self, call_id: str, key: StreamKey) -> None:
        self._started.setdefault(call_id, set()).add(key)

    def on_ended(self, call: Call, key: StreamKey, counters: Counters) -> None:
        """An entry of `call` ended. Counted if it started while this call owned it, or is
        a key of the call now (an entry that predates a restart): never another call's
        entry on relay ports this call took over."""
        started = self._started.get(call.call_id)
        current = call.view().keys()
        if started is not None and key in started:
            started.discard(key)
        elif key not in current:
            return
        tally = self._ended.setdefault(call.call_id, Tally())
        tally.add(caller_sent(call, key), counters)
        if _kind(call, key) is Stream.RTCP:
            self._ended_rtcp.setdefault(call.call_id, Tally()).add(caller_sent(call, key), counters)
        if heard := senders(call, key, counters):
            self._heard.setdefault(call.call_id, set()).update(heard)

    def heard(self, call: Call, live: Iterable[tuple[StreamKey, Counters]]) -> Heard:
        """The legs of `call` that sent a packet: on entries that ended, on the live entries
        given, or by the packet they were learned from."""
        found = set(self._heard.get(call.call_id, ()))
        for key, counters in live:
            found |= senders(call, key, counters)
        for side, legs in (("caller", call.caller), ("callee", call.callee)):
            found.update(
                (side, leg.index, leg.stream) for leg in legs if learned_from_a_packet(leg)
            )
        return frozenset(found)

    def total(self, call: Call, live: Iterable[tuple[StreamKey, Counters]]) -> Tally:
        """What ended, plus the live entries given (the caller found them for this call)."""
        tally = self._ended.get(call.call_id, Tally()).copy()
        for key, counters in live:
            tally.add(caller_sent(call, key), counters)
        return tally

    def by_kind(
        self, call: Call, live: Iterable[tuple[StreamKey, Counters]]
    ) -> tuple[Tally, Tally]:
        """`total`, split: (what RTP streams carried, what RTCP streams carried)."""
        live = list(live)
        total = self.total(call, live)
        rtcp = self._ended_rtcp.get(call.call_id, Tally()).copy()
        for key, counters in live:
            if _kind(call, key) is Stream.RTCP:
                rtcp.add(caller_sent(call, key), counters)
        rtp = Tally(
            total.caller_packets - rtcp.caller_packets,
            total.caller_bytes - rtcp.caller_bytes,
            total.callee_packets - rtcp.callee_packets,
            total.callee_bytes - rtcp.callee_bytes,
        )
        return rtp, rtcp

    def drop(self, call_id: str) -> None:
        self._ended.pop(call_id, None)
        self._ended_rtcp.pop(call_id, None)
        self._started.pop(call_id, None)
        self._heard.pop(call_id, None)


def live_of(call: Call, entries: Mapping[StreamKey, Counters]) -> list[tuple[StreamKey, Counters]]:
    """The entries among `entries` (by original tuple) that belong to `call`'s flows."""
    keys = call.view().keys()
    return [(key, counters) for key, counters in entries.items() if key in keys]


def _addresses(side: str, legs: Iterable[Leg], heard: Heard) -> list[str | None]:
    """[RTP, RTCP] addresses the party was heard from (None: it sent nothing there)."""
    return [
        str(leg.latched)
        if leg.latched is not None and (side, leg.index, leg.stream) in heard
        else None
        for leg in legs
    ]


def _learned(side: str, legs: Iterable[Leg], heard: Heard) -> str:
    return "/".join(address or "-" for address in _addresses(side, legs, heard))


def _of(legs: tuple[Leg, ...], index: int) -> list[Leg]:
    return [leg for leg in legs if leg.index == index]


def call_summary(
    call: Call,
    reason: str,
    detail: str,
    tally: Tally,
    duration: float,
    heard: Heard,
    about: Mapping[str, object] | None = None,
) -> tuple[str, dict[str, object]]:
    """The one line logged when a call ends, as text, and as fields for a JSON log.

    Text: `[Call-ID] removed: <why>; lasted 12.3 s; caller->callee 600 packets 103200
    bytes, callee->caller ...; learned caller IP:RTP/IP:RTCP, callee ...` ("-": the party
    sent nothing on that stream, whatever address it was relayed to). A call of several
    streams says it per stream (`learned stream 1 caller ..., callee ...; stream 2 ...`),
    and a call that is not lrkproxy's ends with its protocol and what its front-end says
    of it (`about`: ng's tags).
    """
    count = len(call.streams)
    if count == 1:
        learned = (
            f"learned caller {_learned('caller', _of(call.caller, 0), heard)}, "
            f"callee {_learned('callee', _of(call.callee, 0), heard)}"
        )
    else:
        learned = "learned " + (
            "; ".join(
                f"stream {index + 1} caller {_learned('caller', _of(call.caller, index), heard)}"
                f", callee {_learned('callee', _of(call.callee, index), heard)}"
                for index in range(count)
            )
            or "nothing: no stream was relayed"
        )
    text = (
        f"[{call.call_id}] removed: {detail}; lasted {duration:.1f} s; "
        f"caller->callee {tally.caller_packets} packets {tally.caller_bytes} bytes, "
        f"callee->caller {tally.callee_packets} packets {tally.callee_bytes} bytes; {learned}"
    )
    if call.protocol != LRKPROXY:
        extra = "".join(f", {name} {_shown(value)}" for name, value in (about or {}).items())
        text += f"; {call.protocol} call{extra}"
    fields: dict[str, object] = {
        "event": "call_ended",
        "call_id": call.call_id,
        "protocol": call.protocol,
        "reason": reason,
        "detail": detail,
        "duration": round(duration, 3),
        **tally.as_dict(),
        "caller_sdp": _sdp(call.streams[0].caller) if count else None,
        "callee_sdp": _sdp(call.streams[0].callee) if count else None,
        "caller_learned": _addresses("caller", _of(call.caller, 0), heard),
        "callee_learned": _addresses("callee", _of(call.callee, 0), heard),
    }
    if count != 1 or call.protocol != LRKPROXY:
        fields["streams"] = [
            {
                "caller_sdp": _sdp(spec.caller),
                "callee_sdp": _sdp(spec.callee),
                "caller_learned": _addresses("caller", _of(call.caller, index), heard),
                "callee_learned": _addresses("callee", _of(call.callee, index), heard),
            }
            for index, spec in enumerate(call.streams)
        ]
        fields.update(about or {})
    return text, fields


def _sdp(endpoint: Endpoint | None) -> str | None:
    return None if endpoint is None else str(endpoint)


def _shown(value: object) -> str:
    if isinstance(value, list | tuple):
        return "/".join(str(item) for item in value)
    return str(value)
