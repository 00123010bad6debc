"""What a front-end asks of the engine, whatever protocol it speaks. Pure.

The node serves two control protocols over one engine and one data plane (README,
"Layout"): Kamailio's lrkproxy (lrkp_tsl/frontends/lrkproxy.py) and rtpengine's ng
(lrkp_tsl/frontends/ng.py). Each front-end turns a datagram into an immediate reply (a
ping, a query, an error, a retransmission) or into one of the operations below, and turns
the engine's `Result` back into reply bytes. The engine knows calls, streams, the store
and the kernel; it never reads a protocol's bytes.

A stream is described in lrkproxy's terms (media.py): two parties, each sending to its
relay endpoint, the kernel relaying `caller -> caller_relay => callee (out of
callee_relay)` and back; RTCP on every relay port + 1 when the stream has it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Final, Protocol

from lrkp_tsl.errors import KernelError, LrkpError, StoreError
from lrkp_tsl.media import CallMedia, Endpoint

if TYPE_CHECKING:
    from lrkp_tsl.session import Call

LRKPROXY: Final = "lrkproxy"
NG: Final = "ng"
PROTOCOLS: Final = (LRKPROXY, NG)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One stream of a call, as the controlling layer describes it.

    `caller`/`callee`: the party's RTP address as its SDP says it (None: unknown, e.g.
    `c=0.0.0.0`: learned from its first packet). With `rtcp`, RTCP legs run on both relay
    endpoints + 1; each party's RTCP address is `caller_rtcp`/`callee_rtcp` if given, else
    its RTP address + 1. Without `rtcp` (rtcp-mux, or not RTP) the stream is RTP legs only.
    `caller_hint`/`callee_hint`: where the party's signalling came from (ng's
    `received-from`), which latching may trust when the SDP address is not reachable.
    """

    caller: Endpoint | None
    caller_relay: Endpoint
    callee: Endpoint | None
    callee_relay: Endpoint
    rtcp: bool = True
    caller_rtcp: Endpoint | None = None
    callee_rtcp: Endpoint | None = None
    caller_hint: IPv4Address | None = None
    callee_hint: IPv4Address | None = None


Stale = tuple[tuple[str, str, str], ...]
"""Why an `End` is stale: (field, what the command names, what the call has now)."""


@dataclass(frozen=True, slots=True)
class Relay:
    """Relay this call as `streams` say (a new call, or a live one moved in place).

    `takes_over`: relay endpoints another call of the same protocol owns are taken from it
    (that call ends: lrkproxy's "newest wins", Kamailio allocated them anew); without it
    they are refused. `reserved`: relay endpoints the call holds beyond its streams' (ports
    the node allocated for streams not relayed yet). `record`: the front-end's own state of
    the call, stored and replicated with it and never read by the engine. `end_at`: end
    the call then (engine time; ng's delete-delay). `fresh`: sides (0 caller, 1 callee)
    whose learned addresses are dropped even where their SDP did not change (a fork).
    """

    call_id: str
    protocol: str
    streams: tuple[StreamSpec, ...]
    takes_over: bool = False
    reserved: frozenset[Endpoint] = frozenset()
    record: str | None = None
    end_at: float | None = None
    fresh: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class End:
    """End this call (nothing happens if there is none).

    `stale(call)` names what the command says that differs from the call as it is now
    (() if nothing does): a command built from an earlier state of the call ends nothing.
    `command`: what the controlling layer sent, as the call's summary names it.
    """

    call_id: str
    protocol: str
    stale: Callable[[Call], Stale] | None = None
    command: str = "D"


Operation = Relay | End


def lrkproxy_relay(media: CallMedia) -> Relay:
    """The operation an lrkproxy `S` asks for: one stream, RTCP on + 1, relay endpoints
    taken from any other lrkproxy call that has them (newest wins: Kamailio allocated
    them anew, so that call is stale)."""
    spec = StreamSpec(media.caller, media.caller_relay, media.callee, media.callee_relay)
    return Relay(media.call_id, LRKPROXY, (spec,), takes_over=True)


class Refused(LrkpError):
    """An operation the engine will not carry out, for good (a resend gets the same)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class Result:
    """What became of an operation: carried out (or nothing to change) when `error` is
    None; `stale`: an `End` that ended nothing (see End). A KernelError or StoreError is
    not final (the same operation may succeed when resent); a `Refused` is."""

    error: KernelError | StoreError | Refused | None = None
    stale: Stale = ()


DONE: Final = Result()

Datagram = tuple[bytes, Hashable, str, bool]
SendNow = Callable[[int, bytes], None]
"""Sends the reply to the batch's datagram `index` at once. A front-end given one replies
to a change as soon as it is in the store and the kernel (what the reply promises), and
leaves that datagram's entry None in what it returns: the client's wait does not include
the bookkeeping after the commit (the call table, conntrack, summaries, logs)."""
"""(data, sender: the retransmission cache key, peer: for logs, with_cookie)."""


class FrontEnd(Protocol):
    """A control protocol's adapter: datagrams in, replies out, the engine in between."""

    protocol: str

    def on_datagrams(
        self, datagrams: Sequence[Datagram], now: float, send: SendNow | None = None
    ) -> list[bytes | None]:
        """Requests that arrived together -> their replies, in order (None: no reply, or
        one sent through `send` already)."""

    def describe(self, call: Call) -> Mapping[str, object]:
        """What this protocol knows of the call that a human wants to see (ng: its tags),
        for summaries and lrkp-ctl; from the call's record."""
