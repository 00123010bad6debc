"""ng calls: two sides, one per SIP tag, one stream per m= line; relay ports the node
allocates. Pure: every entry point takes `now` and returns a `Change`; the table changes only
when the caller commits it, so a refused kernel change leaves the calls as they were.

The model, and where it follows rtpengine 10.5 (measured against it; tests/ng_corpus):
- A call has two sides. Side 0 sent the first offer (the *caller*), side 1 is the other
  (the *callee*); each has a tag (the callee's is unknown until it answers), an interface
  (`direction`) and, per stream, the relay port pair that side sends to and the party's
  media from its latest SDP. Stream *i* is m= line *i* of the SDPs (RFC 3264 keeps the
  index; a re-offer may add lines, never remove them).
- An offer allocates a pair on each side for every stream that becomes active and has
  none yet; the SDP going to the receiver carries the receiver's pair. A re-offer from the
  same side (hold, resume, a new codec) keeps every pair, as rtpengine does; so does an
  offer from the other side (a re-INVITE from the callee), which lands on the same two
  sides with the roles of sender and receiver swapped.
- An answer with a to-tag the callee side does not have yet takes it; one with another
  to-tag than the callee side's (a fork: 183 from one branch, 200 from another) takes the
  callee side over: the latest answer wins, on the same relay ports, since every branch got
  the same offer SDP. (rtpengine 10.5 creates a second callee side with new ports, on its
  default interface; ports differ, the meaning does not.) The tags of the branches that
  lost are remembered, so the delete Kamailio sends for their 487 is answered quietly.
- A delete with only call-id, or call-id and a tag of the call, ends the whole call (both
  sides: one dialogue per call). A delete whose to-tag is a branch that lost the fork
  leaves the call alone (rtpengine deletes that branch's side, which is the same); one
  with a to-tag the call never saw leaves it alone with a warning, as rtpengine does; one
  for an unknown call is answered with a warning, so the delete on CANCEL and the one on
  the 487 after it are both harmless. `delete-delay` (the request's, else the node's)
  schedules the end instead; a later offer or answer cancels it.
- Ports are released when the call ends, not when a stream is rejected: a re-offer may
  bring the stream back, and the pair is bounded by sdp.MAX_STREAMS per side.

`NgCall.streams()` is the protocol-neutral description the engine relays: per stream, the
two parties' media addresses (RTP and RTCP) and the two relay endpoints. It maps onto the
lrkproxy model (media.CallMedia) stream by stream: caller = side 0's party, caller_relay =
side 0's relay endpoint, callee = side 1's party, callee_relay = side 1's; see
docs/ng-integration.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from ipaddress import IPv4Address

from lrkp_tsl.media import RTCP_PORT_OFFSET, Endpoint
from lrkp_tsl.ng.allocator import PortPool, PortsExhausted
from lrkp_tsl.ng.codec import Answer, Delete, MediaOptions, NgError, Offer
from lrkp_tsl.ng.sdp import ZERO, Media, RelayPorts, Sdp, rewrite

E_UNKNOWN_CALL = "unknown-call"
E_DIALOGUE = "dialogue"
E_BAD_ANSWER = "bad-answer"
E_NO_PORTS = "no-ports"
E_INTERFACE = "interface"

MAX_FORMER_TAGS = 8
"""To-tags of forks a call remembers, so that the losing branches' 487s match quietly."""

NOT_FOUND = "Call-ID not found or tags didn't match"
"""rtpengine's warning (an error with the `fatal` flag) for a delete that matches nothing."""

RAN_OUT_OF_PORTS = "Ran out of ports"
"""rtpengine's error-reason when no relay port is free; Kamailio's rtpengine module then
sends the command to the next node of its set (it compares the reason whole)."""


@dataclass(frozen=True, slots=True)
class Interfaces:
    """The node's addresses as rtpengine's named interfaces; the first is the default."""

    by_name: Mapping[str, IPv4Address]

    def __post_init__(self) -> None:
        if not self.by_name:
            raise ValueError("no interfaces")

    @property
    def default(self) -> str:
        return next(iter(self.by_name))

    def resolve(self, name: str) -> str:
        if name not in self.by_name:
            known = ", ".join(self.by_name)
            raise NgError(
                E_INTERFACE,
                f"direction: no interface named {name!r} (this node has {known}; docs/ng.md)",
            )
        return name


@dataclass(frozen=True, slots=True)
class Party:
    """What one side's latest SDP says about one stream."""

    kind: str
    proto: str
    rtp: Endpoint | None  # None: rejected, or on hold at c=0.0.0.0 (learned from its packets)
    rtcp: Endpoint | None  # a=rtcp, else RTP + 1 (RTP streams only)
    rtcp_mux: bool  # its SDP carries a=rtcp-mux
    direction: str
    rejected: bool


@dataclass(frozen=True, slots=True)
class Side:
    tag: str | None
    interface: str
    ip: IPv4Address
    relay: tuple[int | None, ...]  # per stream: the RTP port of the pair this side sends to
    parties: tuple[Party | None, ...]  # per stream: its latest SDP (None: not seen yet)
    received_from: IPv4Address | None = None
    strict_source: bool = False
    media_handover: bool = False
    former_tags: tuple[str, ...] = ()  # to-tags of forks this side answered before (newest first)


@dataclass(frozen=True, slots=True)
class StreamMedia:
    """One stream as the kernel relays it (protocol-neutral)."""

    index: int
    kind: str
    rtcp: bool  # an RTP stream: RTCP is relayed too
    rtcp_mux: bool  # both parties multiplex: RTCP rides the RTP ports
    caller: Party | None
    callee: Party | None
    caller_relay: Endpoint  # where the caller sends (side 0's pair)
    callee_relay: Endpoint  # where the callee sends (side 1's pair)

    @property
    def ready(self) -> bool:
        """Both parties have described the stream, and neither rejected it."""
        return (
            self.caller is not None
            and self.callee is not None
            and not self.caller.rejected
            and not self.callee.rejected
        )

    def rtcp_relays(self) -> tuple[Endpoint, Endpoint] | None:
        """The relay's RTCP endpoints (caller's, callee's), or None if RTCP needs none."""
        if not self.rtcp or self.rtcp_mux:
            return None
        return self.caller_relay.offset(RTCP_PORT_OFFSET), self.callee_relay.offset(
            RTCP_PORT_OFFSET
        )


@dataclass(frozen=True, slots=True)
class NgCall:
    call_id: str
    created: float
    last_signal: float
    sides: tuple[Side, Side]  # 0: the caller (first offer), 1: the callee
    offer_from: int  # which side sent the latest offer
    offer_streams: int  # m= lines of the latest offer
    answered: bool
    delete_at: float | None = None

    def side_of(self, tag: str) -> int | None:
        for index, side in enumerate(self.sides):
            if side.tag == tag:
                return index
        return None

    def pairs(self) -> list[int]:
        """Every relay pair the call holds (RTP ports; RTCP is each + 1)."""
        return [port for side in self.sides for port in side.relay if port is not None]

    def streams(self) -> tuple[StreamMedia, ...]:
        found = []
        caller, callee = self.sides
        for index in range(len(caller.relay)):
            ours, theirs = caller.relay[index], callee.relay[index]
            if ours is None or theirs is None:
                continue
            one, two = _at(caller.parties, index), _at(callee.parties, index)
            known = one or two
            assert known is not None  # a pair is allocated for a stream an SDP described
            rtp = "RTP/" in known.proto
            found.append(
                StreamMedia(
                    index=index,
                    kind=known.kind,
                    rtcp=rtp,
                    rtcp_mux=rtp
                    and one is not None
                    and two is not None
                    and one.rtcp_mux
                    and two.rtcp_mux,
                    caller=one,
                    callee=two,
                    caller_relay=Endpoint(caller.ip, ours),
                    callee_relay=Endpoint(callee.ip, theirs),
                )
            )
        return tuple(found)


class Outcome(Enum):
    """What a change did (counted, and the start of its log line)."""

    NEW = "new"  # first offer
    UPDATED = "updated"  # re-offer, answer
    FORKED = "forked"  # an answer from another to-tag took the callee side over
    SCHEDULED = "scheduled"  # delete with a delay
    ENDED = "ended"
    UNCHANGED = "unchanged"  # a delete that matched nothing


@dataclass(frozen=True, slots=True)
class Change:
    """A decision: the call before and after (None: none / ended), the SDP to send back,
    and the pairs taken from the pool for it (given back by `abandon`)."""

    call_id: str
    before: NgCall | None
    after: NgCall | None
    outcome: Outcome
    sdp: bytes | None = None
    warnings: tuple[str, ...] = ()
    allocated: tuple[int, ...] = ()
    detail: str = ""


def _at(items: Sequence[Party | None], index: int) -> Party | None:
    return items[index] if index < len(items) else None


class NgCalls:
    """The ng call table. Decisions (`offer`, `answer`, `delete`, `end`) read it and take
    relay pairs from the pool; `commit` or `abandon` must follow each one, before the next
    decision about the same call."""

    def __init__(self, pool: PortPool, interfaces: Interfaces, delete_delay: int = 0) -> None:
        self.pool = pool
        self.interfaces = interfaces
        self.delete_delay = delete_delay
        self._calls: dict[str, NgCall] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[NgCall]:
        return iter(list(self._calls.values()))

    def get(self, call_id: str) -> NgCall | None:
        return self._calls.get(call_id)

    # -- decisions -------------------------------------------------------------------------

    def offer(self, request: Offer, now: float) -> Change:
        call = self._calls.get(request.call_id)
        options = request.options
        if call is None:
            default = self.interfaces.default
            ip = self.interfaces.by_name[default]
            sides = [
                Side(request.from_tag, default, ip, (), ()),
                Side(request.to_tag, default, ip, (), ()),
            ]
            sender = 0
        else:
            sender = self._sender(call, request)
            sides = list(call.sides)
        receiver = 1 - sender
        sides[sender] = replace(
            sides[sender],
            tag=request.from_tag,
            received_from=options.received_from,
            strict_source=options.strict_source,
            media_handover=options.media_handover,
        )
        if request.to_tag is not None and sides[receiver].tag is None:
            sides[receiver] = replace(sides[receiver], tag=request.to_tag)
        self._direction(sides, sender, options)
        sdp = request.sdp
        allocated = self._allocate(sides, sdp)
        try:
            sides[sender] = self._described(sides[sender], sdp, options)
            out = rewrite(
                sdp, sides[receiver].ip, self._ports(sides[receiver], sdp, None), options.rewrite
            )
        except BaseException:
            self._give_back(allocated)
            raise
        after = NgCall(
            call_id=request.call_id,
            created=now if call is None else call.created,
            last_signal=now,
            sides=(sides[0], sides[1]),
            offer_from=sender,
            offer_streams=len(sdp.media),
            answered=False,
        )
        outcome = Outcome.NEW if call is None else Outcome.UPDATED
        return Change(
            request.call_id, call, after, outcome, out, request.warnings, tuple(allocated)
        )

    def answer(self, request: Answer, now: float) -> Change:
        call = self._calls.get(request.call_id)
        if call is None:
            raise NgError(E_UNKNOWN_CALL, "Unknown call-id")
        offerer = call.side_of(request.from_tag)
        if offerer is None or request.to_tag == request.from_tag:
            raise NgError(
                E_DIALOGUE,
                f"Invalid dialogue association: from-tag {request.from_tag!r} did not send an "
                f"offer in this call (its tags: {_tags(call)})",
            )
        answerer = 1 - offerer
        sides = list(call.sides)
        previous = sides[answerer].tag
        forked = previous not in (None, request.to_tag)
        options = request.options
        former = sides[answerer].former_tags
        if forked:
            assert previous is not None
            former = (previous, *former)[:MAX_FORMER_TAGS]
        sides[answerer] = replace(
            sides[answerer],
            tag=request.to_tag,
            former_tags=former,
            received_from=options.received_from,
            strict_source=options.strict_source,
            media_handover=options.media_handover,
        )
        self._direction(sides, answerer, options)
        sdp = request.sdp
        if len(sdp.media) != call.offer_streams:
            raise NgError(
                E_BAD_ANSWER,
                f"answer has {len(sdp.media)} m= lines, the offer had {call.offer_streams} "
                "(RFC 3264 §6: one per offered stream)",
            )
        offered = sides[offerer]
        for media in sdp.media:
            party = _at(offered.parties, media.index)
            if not media.rejected and (party is None or party.rejected):
                raise NgError(
                    E_BAD_ANSWER,
                    f"answer accepts m= line {media.index + 1} ({media.kind}), which the offer "
                    "rejected (port 0)",
                )
        sides[answerer] = self._described(sides[answerer], sdp, options)
        out = rewrite(sdp, offered.ip, self._ports(offered, sdp, offered.parties), options.rewrite)
        after = replace(
            call,
            sides=(sides[0], sides[1]),
            last_signal=now,
            answered=True,
            delete_at=None,
        )
        detail = f" to-tag {previous!r} replaced by {request.to_tag!r}" if forked else ""
        outcome = Outcome.FORKED if forked else Outcome.UPDATED
        return Change(request.call_id, call, after, outcome, out, request.warnings, (), detail)

    def delete(self, request: Delete, now: float) -> Change:
        call = self._calls.get(request.call_id)
        if (
            call is not None
            and request.from_tag is not None
            and any(request.to_tag in side.former_tags for side in call.sides)
        ):
            # The 487 of a branch that lost the fork: rtpengine deletes that branch's side
            # and keeps the call; here it has no side of its own any more.
            detail = f" to-tag {request.to_tag!r} lost the fork"
            return Change(request.call_id, call, call, Outcome.UNCHANGED, detail=detail)
        if call is None or not self._matches(call, request):
            if request.fatal:
                raise NgError(E_UNKNOWN_CALL, NOT_FOUND)
            return Change(request.call_id, call, call, Outcome.UNCHANGED, warnings=(NOT_FOUND,))
        delay = self.delete_delay if request.delay is None else request.delay
        if delay > 0:
            after = replace(call, delete_at=now + delay)
            return Change(request.call_id, call, after, Outcome.SCHEDULED, detail=f" in {delay} s")
        return Change(request.call_id, call, None, Outcome.ENDED)

    def end(self, call_id: str) -> Change | None:
        """End a call for a reason of the engine's (idle, lifetime, operator, delete-delay)."""
        call = self._calls.get(call_id)
        return None if call is None else Change(call_id, call, None, Outcome.ENDED)

    # -- commit ------------------------------------------------------------------------------

    def commit(self, change: Change) -> None:
        """The change is carried out (kernel and store): the table follows."""
        if change.after is None:
            ended = self._calls.pop(change.call_id, None)
            if ended is not None:
                self._give_back(ended.pairs())
            return
        self._calls[change.call_id] = change.after

    def abandon(self, change: Change) -> None:
        """The change was not carried out: give back what it took."""
        self._give_back(change.allocated)

    def adopt(self, call: NgCall) -> None:
        """The call as another decided it (a restarted node's store, a standby's active
        node): the table holds it, and the pool exactly its pairs (those it had before and
        no longer has are given back). ValueError, and nothing changed, if another ng call
        holds one of its pairs (a replay's passing state: the other call's end follows)."""
        before = self._calls.get(call.call_id)
        had = set(before.pairs()) if before is not None else set()
        has = set(call.pairs())
        holding: list[int] = []
        try:
            for port in sorted(has - had):
                self.pool.hold(port)
                holding.append(port)
        except ValueError:  # all or nothing: a pair held for a refused call is held for none
            self._give_back(holding)
            raise
        self._give_back(sorted(had - has))
        self._calls[call.call_id] = call

    def forget(self, call_id: str) -> NgCall | None:
        """The call ended for a reason of the engine's (idle, lifetime, an operator, its
        delete-delay, its active node): its pairs go back. The call, if there was one."""
        ended = self._calls.pop(call_id, None)
        if ended is not None:
            self._give_back(ended.pairs())
        return ended

    # -- helpers -----------------------------------------------------------------------------

    def _sender(self, call: NgCall, request: Offer) -> int:
        sender = call.side_of(request.from_tag)
        if sender is not None:
            other = call.sides[1 - sender].tag
            if request.to_tag is not None and other not in (None, request.to_tag):
                raise NgError(
                    E_DIALOGUE,
                    f"Invalid dialogue association: to-tag {request.to_tag!r} is not the other "
                    f"side of from-tag {request.from_tag!r} (its tags: {_tags(call)})",
                )
            return sender
        if request.to_tag is not None:
            known = call.side_of(request.to_tag)
            if known is not None and call.sides[1 - known].tag is None:
                return 1 - known
        raise NgError(
            E_DIALOGUE,
            f"Invalid dialogue association: from-tag {request.from_tag!r} is not a side of "
            f"this call (its tags: {_tags(call)}); a call has two sides",
        )

    def _direction(self, sides: list[Side], sender: int, options: MediaOptions) -> None:
        if not options.direction:
            return
        for offset, name in enumerate(options.direction):
            index = sender if offset == 0 else 1 - sender
            chosen = self.interfaces.resolve(name)
            sides[index] = replace(
                sides[index], interface=chosen, ip=self.interfaces.by_name[chosen]
            )

    def _allocate(self, sides: list[Side], sdp: Sdp) -> list[int]:
        """A pair on each side for every active stream that has none; all or nothing."""
        count = max(len(sdp.media), len(sides[0].relay), len(sides[1].relay))
        relays = [list(side.relay) + [None] * (count - len(side.relay)) for side in sides]
        allocated: list[int] = []
        try:
            for media in sdp.media:
                if media.rejected:
                    continue
                for relay in relays:
                    if relay[media.index] is None:
                        port = self.pool.allocate()
                        allocated.append(port)
                        relay[media.index] = port
        except PortsExhausted as exc:
            self._give_back(allocated)
            # Exactly rtpengine's words: Kamailio's module then tries the next node of its
            # set (rtpengine.c compares the whole error-reason); the why goes to the log.
            error = NgError(E_NO_PORTS, RAN_OUT_OF_PORTS)
            error.detail = exc.reason
            raise error from None
        for index, relay in enumerate(relays):
            if len(relay) != len(sides[index].relay) or allocated:
                sides[index] = replace(sides[index], relay=tuple(relay))
        return allocated

    @staticmethod
    def _described(side: Side, sdp: Sdp, options: MediaOptions) -> Side:
        parties = list(side.parties) + [None] * max(0, len(sdp.media) - len(side.parties))
        for media in sdp.media:
            parties[media.index] = _party(sdp, media, options)
        return replace(side, parties=tuple(parties))

    @staticmethod
    def _ports(
        side: Side, sdp: Sdp, offered: tuple[Party | None, ...] | None
    ) -> list[RelayPorts | None]:
        """The reader's pair per m= line; in an answer that accepts rtcp-mux for a stream
        whose offer had it, RTCP is announced on the RTP port."""
        ports: list[RelayPorts | None] = []
        for media in sdp.media:
            port = side.relay[media.index] if not media.rejected else None
            if port is None:
                ports.append(None)
                continue
            party = _at(offered, media.index) if offered is not None else None
            muxed = offered is not None and media.rtcp_mux and party is not None and party.rtcp_mux
            ports.append(RelayPorts(port, port if muxed else port + RTCP_PORT_OFFSET))
        return ports

    @staticmethod
    def _matches(call: NgCall, request: Delete) -> bool:
        if request.from_tag is None:
            return True
        caller = call.side_of(request.from_tag)
        if request.to_tag is None:
            return caller is not None
        if call.side_of(request.to_tag) is not None:
            return True
        # rtpengine's last resort: the to-tag never answered, and the from-tag's other side
        # has no tag yet (a call cancelled before any answer).
        return caller is not None and call.sides[1 - caller].tag is None

    def _give_back(self, ports: Sequence[int]) -> None:
        for port in ports:
            self.pool.release(port)


def _party(sdp: Sdp, media: Media, options: MediaOptions) -> Party:
    direction = sdp.direction_of(media)
    if media.rejected:
        return Party(media.kind, media.proto, None, None, media.rtcp_mux, direction, True)
    address = sdp.address(media)
    if address == ZERO:
        return Party(media.kind, media.proto, None, None, media.rtcp_mux, direction, False)
    ip = options.party_ip(address)
    rtp = Endpoint(ip, media.port)
    rtcp = None
    if media.rtcp_port is not None:
        rtcp_ip = options.party_ip(media.rtcp_address or address)
        rtcp = None if rtcp_ip == ZERO else Endpoint(rtcp_ip, media.rtcp_port)
    elif media.is_rtp:
        rtcp = rtp.offset(RTCP_PORT_OFFSET)
    return Party(media.kind, media.proto, rtp, rtcp, media.rtcp_mux, direction, False)


def _tags(call: NgCall) -> str:
    return ", ".join(
        repr(side.tag) if side.tag is not None else "(none yet)" for side in call.sides
    )
