"""The lrkproxy front-end: Kamailio's `lrkproxy` module's datagrams in, its replies out.
Pure (no sockets, no clock).

It owns everything that is lrkproxy's and not the relay's (protocol.py is the codec):
- the retransmission cache (retransmit.py): Kamailio resends the same datagram, and a
  resend gets the first copy's reply, never a second application;
- what needs no call: `P` (answered with an empty datagram while the node is drained, so
  that lrkproxy picks another node of its set), `G` (where Kamailio should allocate next:
  ports.py), malformed requests;
- admission (admission.py): what an `S` may ask of this node;
- the mapping of `S` and `D` to the engine's operations (operations.py): an `S` relays
  one stream, RTCP on + 1, and takes its relay ports from any other lrkproxy call (newest
  wins); a `D` ends its call unless it names another state of the call than its latest
  `S` (a stale `D`, answered `OK` and applied to nothing);
- the replies: `OK` once the engine committed the change, `E <code> <reason>` when it
  could not (a kernel or store failure is not cached: Kamailio's resend tries again).

Counters go to the engine's (`command.<set|delete|ping|config>.<result>`, `error.<code>`,
`refused.<code>`, `request.<type>`, `retransmissions`, `dropped.*`): metrics.py reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Final

from lrkp_tsl import admission, protocol
from lrkp_tsl.admission import NodeLimits, Refusal
from lrkp_tsl.engine import Engine
from lrkp_tsl.operations import (
    LRKPROXY,
    Datagram,
    End,
    Refused,
    Result,
    SendNow,
    Stale,
    lrkproxy_relay,
)
from lrkp_tsl.protocol import (
    DeleteSession,
    GetConfig,
    NodeConfig,
    Ping,
    ProtocolError,
    SetSession,
)
from lrkp_tsl.retransmit import RetransmitCache
from lrkp_tsl.session import Call

log = logging.getLogger("lrkp_tsl.engine")

# Kamailio retransmits for lrkproxy_retr x lrkproxy_tout (5 x 1 s by default).
RETRANSMIT_AGE: Final = 30.0
RETRANSMIT_BYTES: Final = 16 << 20  # ~25,000 S replies: 30 s of 800 commands/s


def _command(request: SetSession | DeleteSession) -> str:
    """The command's name in `command.<name>.<result>` stats (metrics.py labels)."""
    return "set" if isinstance(request, SetSession) else "delete"


def _stale(request: DeleteSession, call: Call) -> Stale:
    """The fields in which a `D` differs from its call's current `S` (field, the D's value,
    the call's): a D built from an earlier state of the call (before a re-INVITE moved
    it), which must not end the call as it is now."""
    if len(call.streams) != 1:
        return ()
    spec = call.streams[0]
    if spec.caller is None or spec.callee is None:
        return ()
    current = protocol.fields_of(spec.caller, spec.caller_relay, spec.callee, spec.callee_relay)
    return tuple((name, value, current[name]) for name, value in request.given
                 if current[name] != value)  # fmt: skip


class LrkproxyFrontEnd:
    """Serves lrkproxy through `engine` (which it attaches itself to). `node`: what `G`
    reports (its ports and addresses); `limits`: what an `S` may ask (admission.py)."""

    protocol = LRKPROXY

    def __init__(self, engine: Engine, node: NodeConfig, limits: NodeLimits) -> None:
        self.engine = engine
        self.node = node
        self.limits = limits
        self.stats = engine.stats
        self.cache = RetransmitCache(RETRANSMIT_BYTES, RETRANSMIT_AGE)
        engine.attach(self)

    def describe(self, call: Call) -> Mapping[str, object]:
        """Nothing beyond the call itself: an `S` carries addresses only."""
        return {}

    def node_config(self) -> NodeConfig:
        """The `G` reply: where Kamailio should allocate next (ports.py)."""
        ports = self.engine.table.ports
        return replace(
            self.node,
            end_port=ports.last_block(),
            current_port=ports.next_block(),
        )

    def on_datagram(
        self, data: bytes, sender: Hashable, peer: str, now: float, *, with_cookie: bool = True
    ) -> bytes | None:
        """One request from the controlling layer; the reply (None: nothing to send).

        `sender` keys the retransmission cache (the UDP address); `peer` is for logs.
        A datagram longer than any request is dropped unread and unanswered, and so is
        everything while this node is a standby (the active node answers).
        """
        return self.on_datagrams([(data, sender, peer, with_cookie)], now)[0]

    def on_datagrams(
        self, datagrams: Sequence[Datagram], now: float, send: SendNow | None = None
    ) -> list[bytes | None]:
        """Requests that arrived together -> their replies, in order (group commit: the
        engine's `Batch` says how they are applied together). With `send`, an `OK` goes
        as soon as its change is in the store and the kernel."""
        replies: list[bytes | None] = [None] * len(datagrams)
        sent: set[int] = set()
        batch = self.engine.batch(now)
        for index, (data, sender, peer, with_cookie) in enumerate(datagrams):
            early, request = self._receive(data, sender, peer, now, with_cookie)
            if request is None:
                replies[index] = early
                continue
            done = partial(self._settle, replies, sent, index, request, sender, data, peer,
                           with_cookie, now)  # fmt: skip
            committed = None
            if send is not None:
                committed = partial(self._committed, send, sent, index, request, sender,
                                    data, with_cookie, now)  # fmt: skip
            if isinstance(request, SetSession):
                batch.add(lrkproxy_relay(request.media), peer, done, committed)
            else:
                stale = partial(_stale, request) if request.given else None
                batch.add(End(request.call_id, LRKPROXY, stale), peer, done, committed)
        batch.flush()
        return replies

    def _receive(
        self, data: bytes, sender: Hashable, peer: str, now: float, with_cookie: bool
    ) -> tuple[bytes | None, SetSession | DeleteSession | None]:
        """(reply, None) for a datagram answered without a change; else (None, request)."""
        if not self.engine.active:
            self.stats["dropped.standby"] += 1
            return None, None
        if len(data) > protocol.MAX_REQUEST_SIZE:
            self.stats["dropped.too_long"] += 1
            self.engine.note_remote(now, "oversized datagrams", "dropped %d bytes from %s: "
                                    "longer than any request", len(data), peer)  # fmt: skip
            return None, None
        if with_cookie:
            cached = self.cache.lookup(sender, data, now)
            if cached is not None:
                self.stats["retransmissions"] += 1
                log.debug("retransmission from %s answered from cache", peer)
                return cached, None
        reply, request = self._parse(data, peer, now, with_cookie)
        if request is None and reply and with_cookie:  # not a draining node's empty answer
            self.cache.store(sender, data, reply, now)
        return reply, request

    def _parse(
        self, data: bytes, peer: str, now: float, with_cookie: bool
    ) -> tuple[bytes | None, SetSession | DeleteSession | None]:
        """The reply to a request that changes nothing (final), or the request to apply."""
        try:
            request = protocol.parse_request(data, with_cookie=with_cookie)
        except ProtocolError as error:
            self.stats[f"error.{error.code}"] += 1
            self.stats["command.unparsed.error"] += 1
            self.engine.note_remote(now, "bad requests", "bad request from %s: %s", peer, error)
            return protocol.reply_error(error), None
        self.stats[f"request.{type(request).__name__}"] += 1
        if isinstance(request, Ping):
            if self.engine.draining:
                # An empty datagram: lrkproxy disables the node at once and picks another
                # node of the set for new calls; S and D still come (docs/lrkp-ctl.md).
                self.stats["drain.ping_refused"] += 1
                self.stats["command.ping.drained"] += 1
                return b"", None
            self.stats["command.ping.ok"] += 1
            return protocol.reply_pong(request), None
        if isinstance(request, GetConfig):
            self.stats["command.config.ok"] += 1
            return protocol.reply_config(request, self.node_config()), None
        if isinstance(request, SetSession):
            try:
                admission.check(request.media, self.limits)
            except Refusal as refusal:
                return self._refuse(request, refusal.code, refusal.reason, peer, now), None
        if not protocol.acknowledgeable(request):
            log.warning(
                "%s from %s is %d bytes: Kamailio cannot accept a reply that long",
                type(request).__name__,
                peer,
                len(request.raw),
            )
        return None, request

    def _refuse(
        self, request: SetSession | DeleteSession, code: str, reason: str, peer: str, now: float
    ) -> bytes:
        """`E <code> <reason>` for a command this node will not carry out (final)."""
        self.stats[f"refused.{code}"] += 1
        self.stats[f"command.{_command(request)}.refused"] += 1
        if isinstance(request, SetSession):
            call_id, verb = request.media.call_id, "S"
        else:
            call_id, verb = request.call_id, "D"
        self.engine.note_remote(now, "refused commands", "[%s] %s from %s refused: %s",
                                call_id, verb, peer, reason)  # fmt: skip
        return protocol.reply_refused(request, code, reason)

    def _committed(
        self,
        send: SendNow,
        sent: set[int],
        index: int,
        request: SetSession | DeleteSession,
        sender: Hashable,
        data: bytes,
        with_cookie: bool,
        now: float,
    ) -> None:
        """The change is in the store and the kernel: `OK` now (a change is never stale)."""
        reply = protocol.reply_ok(request)
        if with_cookie:
            self.cache.store(sender, data, reply, now)
        sent.add(index)
        send(index, reply)

    def _settle(
        self,
        replies: list[bytes | None],
        sent: set[int],
        index: int,
        request: SetSession | DeleteSession,
        sender: Hashable,
        data: bytes,
        peer: str,
        with_cookie: bool,
        now: float,
        result: Result,
    ) -> None:
        """The engine applied (or could not apply) the command: its reply.

        `OK`, or the refusal of a change the kernel or the store did not take (not final:
        Kamailio's retransmission tries it again), or a refusal for good (cached)."""
        failure = result.error
        if isinstance(failure, Refused):
            reply = self._refuse(request, failure.code, failure.reason, peer, now)
            if with_cookie:
                self.cache.store(sender, data, reply, now)
            replies[index] = reply
            return
        if failure is not None:
            self.stats[f"error.{failure.code}"] += 1
            self.stats[f"command.{_command(request)}.failed"] += 1
            log.error("%s from %s not applied: %s", type(request).__name__, peer, failure)
            replies[index] = protocol.reply_refused(request, failure.code, failure.reason)
            return
        self.stats[f"command.{_command(request)}.{'stale' if result.stale else 'ok'}"] += 1
        if index in sent:
            return  # `OK` sent, and cached, by `_committed`
        if result.stale and isinstance(request, DeleteSession):
            named = ", ".join(f"{name} {value}" for name, value, _ in result.stale)
            current = ", ".join(f"{name} {value}" for name, _, value in result.stale)
            self.engine.note_remote(now, "stale deletes", "[%s] D from %s ignored: it names "
                                    "%s, the call is at %s now (a D from before a later S of "
                                    "the call)", request.call_id, peer, named,
                                    current)  # fmt: skip
        reply = protocol.reply_ok(request)
        if with_cookie:
            self.cache.store(sender, data, reply, now)
        replies[index] = reply
