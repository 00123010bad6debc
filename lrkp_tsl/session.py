"""Calls and their lifecycle: what `S`, `D`, first packets, media activity and time do.

Pure: no I/O, no clock. Every entry point takes `now` and returns `Sync` actions (the
kernel state of one call before and after); the table changes only when the caller reports
an action as applied (`applied`). A kernel failure therefore leaves the table as it was,
and the table never claims a call the kernel does not relay.

Rules:
- Calls are keyed by Call-ID. An `S` for a live call with other addresses (183 then 200,
  a re-INVITE's answer) moves it in place, keeping what was learned for unchanged legs;
  an identical `S` changes nothing.
- Relay ports belong to one call. An `S` whose relay ports belong to another live call
  replaces that call: Kamailio allocated them anew, so the older call is stale (newest
  wins, and the reason is logged).
- When a call ends by time (idle, maximum lifetime) is the engine's business (engine.py):
  this table only turns "end it" into the kernel change (`on_expire`).
- Each leg (one party, one stream) has a latched address, learned from its first packet
  as the latching policy allows (latching.py). A stream's two flows exist in the kernel
  once both of its legs are latched; until then the call's relay endpoints are *learning*
  and packets from unknown sources reach `on_packet`.
- A latched leg is re-learned from a new source only if its rule accepts the source and
  the latched source has been silent for the guard interval (NAT rebinding); otherwise
  the packet is a stranger's and is dropped.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from ipaddress import IPv4Address, IPv4Network

from lrkp_tsl.errors import MediaError
from lrkp_tsl.kernel import EMPTY, KernelView, StreamKey
from lrkp_tsl.latching import HINT_GRACE, Policy, Rule, initial, start
from lrkp_tsl.media import (
    RTCP_PORT_OFFSET,
    CallMedia,
    Endpoint,
    Flow,
    InstalledFlow,
    PortRange,
    Stream,
)
from lrkp_tsl.operations import LRKPROXY, Refused, Relay, StreamSpec, lrkproxy_relay
from lrkp_tsl.ports import PortUse

# Refusal codes (operations.Refused): another protocol's call; relay endpoints of a call
# that may not be taken over.
PROTOCOL = "protocol"
RELAY_PORT = "relay-port"

__all__ = [
    "EMPTY",
    "Call",
    "CallTable",
    "KernelView",
    "Leg",
    "PacketDecision",
    "PacketEvent",
    "Reason",
    "Sync",
    "Verdict",
    "rebuild",
]


@dataclass(frozen=True, slots=True)
class Leg:
    """One party's side of one stream: its RTP, or its RTCP."""

    stream: Stream
    sdp: Endpoint | None  # the address in the SDP (None: unknown, learned from a packet)
    relay: Endpoint  # the relay endpoint this party sends to and hears from
    rule: Rule
    latched: Endpoint | None  # the address flows use; None until learned
    index: int = 0  # which stream of the call (the m= line)
    anchor: IPv4Address | None = None  # the IP a SAME_IP rule accepts, if not the SDP's
    # When the leg was set up (engine time; not stored): an anchored leg accepts anyone
    # HINT_GRACE after it (latching.start).
    since: float = field(default=0.0, compare=False)

    def accepts(self, source: Endpoint, now: float | None) -> bool:
        """Whether `source` may speak for this leg (its rule; an anchored leg, once its
        anchor had HINT_GRACE to speak, accepts anyone)."""
        if self.rule.accepts(source, self.sdp, self.anchor):
            return True
        return (
            self.anchor is not None
            and self.latched is None
            and now is not None
            and now - self.since >= HINT_GRACE
        )


@dataclass(frozen=True, slots=True)
class Call:
    """A relayed call: its streams as the controlling layer described them, and per party
    the legs of every stream (RTP, then RTCP if the stream has it), `caller` and `callee`
    aligned: the legs at one position are the two ends of one direction pair.

    `protocol` is the front-end that owns the call; `record` its own state of the call
    (stored and replicated, never read here); `end_at` when the call ends if nothing else
    ends it first; `reserved` relay endpoints it owns beyond its legs' (operations.Relay).
    """

    call_id: str
    streams: tuple[StreamSpec, ...]
    idle_timeout: float
    started: float
    caller: tuple[Leg, ...]
    callee: tuple[Leg, ...]
    protocol: str = LRKPROXY
    record: str | None = None
    end_at: float | None = None
    reserved: frozenset[Endpoint] = frozenset()
    # Computed once (a Call never changes; `replace` starts afresh).
    _view: KernelView | None = field(default=None, init=False, compare=False, repr=False)
    _relays: frozenset[Endpoint] | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def media(self) -> CallMedia | None:
        """The call as an lrkproxy `S` describes it (one stream, every address known, RTCP
        on + 1); None if it is not of that shape."""
        if len(self.streams) != 1:
            return None
        spec = self.streams[0]
        if spec.caller is None or spec.callee is None or not spec.rtcp:
            return None
        return CallMedia(
            self.call_id, spec.caller, spec.caller_relay, spec.callee, spec.callee_relay
        )

    def legs(self) -> Iterator[Leg]:
        yield from self.caller
        yield from self.callee

    def started_at(self, started: float) -> Call:
        """The call as if it had started at `started` (a restart's clocks): its end, if it
        has one, moves with it."""
        end_at = None if self.end_at is None else self.end_at + started - self.started
        return replace(self, started=started, end_at=end_at)

    def view(self) -> KernelView:
        if self._view is None:
            object.__setattr__(self, "_view", self._compute_view())
        assert self._view is not None
        return self._view

    def _compute_view(self) -> KernelView:
        flows = set()
        for a, b in zip(self.caller, self.callee, strict=True):
            if a.latched is not None and b.latched is not None:
                flows.add(Flow(a.stream, a.latched, a.relay, b.latched, b.relay))
                flows.add(Flow(b.stream, b.latched, b.relay, a.latched, a.relay))
        learning = {
            leg.relay for leg in self.legs() if leg.latched is None or leg.rule is not Rule.EXACT
        }
        return KernelView(frozenset(flows), frozenset(learning))

    def relay_endpoints(self) -> frozenset[Endpoint]:
        """Every relay ip:port this call owns: its legs' and the reserved ones."""
        if self._relays is None:
            relays = frozenset(
                [leg.relay for leg in self.caller] + [leg.relay for leg in self.callee]
            )
            if self.reserved:
                relays |= self.reserved
            object.__setattr__(self, "_relays", relays)
        assert self._relays is not None
        return self._relays

    def with_leg(self, old: Leg, new: Leg) -> Call:
        def swap(legs: tuple[Leg, ...]) -> tuple[Leg, ...]:
            return tuple(new if leg is old else leg for leg in legs)

        return replace(self, caller=swap(self.caller), callee=swap(self.callee))


class Reason(Enum):
    """Why a call's kernel state changes: counted, and the start of its log line."""

    RELAYING = "relaying"  # a new call (S)
    UPDATED = "updated"  # S with other addresses for a live call (183 then 200, re-INVITE)
    LEARNED = "learned"  # a leg's address learned from its first packet
    RELEARNED = "relearned"  # a latched leg moved (NAT rebinding)
    REPLACED = "replaced"  # another call's S took its relay ports (newest wins)
    DELETED = "deleted"  # D from the controlling layer
    IDLE = "idle"  # no media for the idle timeout
    LIFETIME = "lifetime"  # reached the maximum lifetime
    ADOPTED = "adopted"  # found in the kernel with no stored record (startup)
    REPLICATED = "replicated"  # a standby following its active node
    OPERATOR = "operator"  # ended by an operator (lrkp-ctl delete)


@dataclass(frozen=True, slots=True)
class Sync:
    """Make the kernel hold `call`'s view instead of `before` (call None: remove it).

    `detail` completes the reason for humans (the call that took the ports, the timeout).
    """

    call_id: str
    before: KernelView
    call: Call | None
    reason: Reason
    detail: str = ""
    # REPLACED: sources the call had latched on the relay endpoints the new call takes.
    # They must not be learned into the new call while they keep sending (port reuse).
    displaced: frozenset[StreamKey] = frozenset()

    @property
    def after(self) -> KernelView:
        return EMPTY if self.call is None else self.call.view()

    def describe(self) -> str:
        """The reason as the log line says it."""
        text = {
            Reason.REPLACED: "relay ports reassigned to call {} (newest wins)",
            Reason.DELETED: "deleted by the controlling layer ({})",
            Reason.IDLE: "no media for {}",
            Reason.LIFETIME: "reached the maximum lifetime of {}",
            Reason.ADOPTED: "adopted from the kernel (no stored record)",
            Reason.OPERATOR: "deleted by an operator (lrkp-ctl delete)",
        }.get(self.reason, self.reason.value + "{}")
        return text.format(self.detail)


Action = Sync


class Verdict(Enum):
    ACCEPT = "accept"  # the packet's flow is in the kernel now: let it through
    HOLD = "hold"  # its sender is latched, but the other party is not yet: keep it
    DROP = "drop"


class PacketEvent(Enum):
    """What a queued first packet turned out to be (counted; learned ones logged)."""

    NONE = "none"  # a known sender whose flow exists by now (raced with its own commit)
    LEARNED = "learned"
    RELEARNED = "relearned"
    HELD = "held"  # a known sender waiting for the other party
    STRANGER = "stranger"  # not allowed to speak for any leg of the call
    NO_CALL = "no-call"  # the relay endpoint belongs to no call (any more)


@dataclass(frozen=True, slots=True)
class PacketDecision:
    verdict: Verdict
    actions: list[Action] = field(default_factory=list)
    event: PacketEvent = PacketEvent.NONE


def _legs_for(
    streams: Sequence[StreamSpec],
    policy: Policy,
    routed: Sequence[IPv4Network],
    now: float,
) -> tuple[tuple[Leg, ...], tuple[Leg, ...]]:
    """Each stream's legs, caller's and callee's aligned: RTP, then RTCP if it has it."""
    caller: list[Leg] = []
    callee: list[Leg] = []
    for index, spec in enumerate(streams):
        for legs, sdp, relay, rtcp, hint in (
            (caller, spec.caller, spec.caller_relay, spec.caller_rtcp, spec.caller_hint),
            (callee, spec.callee, spec.callee_relay, spec.callee_rtcp, spec.callee_hint),
        ):
            if sdp is not None and hint is None:  # every lrkproxy leg: the short way
                rule, latched = initial(policy, sdp, routed)
                anchor = None
            else:
                rule, latched, anchor = start(policy, sdp, routed, hint)
            legs.append(Leg(Stream.RTP, sdp, relay, rule, latched, index, anchor, now))
            if spec.rtcp:
                if rtcp is None and sdp is not None:
                    rtcp = sdp.offset(RTCP_PORT_OFFSET)
                if rtcp is not None and hint is None:
                    rule, latched = initial(policy, rtcp, routed)
                    anchor = None
                else:
                    rule, latched, anchor = start(policy, rtcp, routed, hint)
                legs.append(
                    Leg(
                        Stream.RTCP,
                        rtcp,
                        relay.offset(RTCP_PORT_OFFSET),
                        rule,
                        latched,
                        index,
                        anchor,
                        now,
                    )
                )
    return tuple(caller), tuple(callee)


def _keep_learned(old: tuple[Leg, ...], new: tuple[Leg, ...], fresh: bool) -> tuple[Leg, ...]:
    """Legs whose SDP address, relay endpoint and rule did not change keep what they
    learned (and when they were set up); `fresh`: none does (another party now)."""
    if fresh:
        return new
    before = {(leg.index, leg.stream): leg for leg in old}
    kept = []
    for after in new:
        prior = before.get((after.index, after.stream))
        same = prior is not None and (prior.sdp, prior.relay, prior.rule, prior.anchor) == (
            after.sdp,
            after.relay,
            after.rule,
            after.anchor,
        )
        kept.append(prior if same and prior is not None else after)
    return tuple(kept)


class CallTable:
    def __init__(
        self,
        max_lifetime: float,
        policy: Policy = Policy.STRICT,
        routed: Sequence[IPv4Network] = (),
        ports: PortRange | None = None,
    ) -> None:
        self.max_lifetime = max_lifetime
        self.policy = policy
        self.routed = tuple(routed)
        self._calls: dict[str, Call] = {}
        self._owner: dict[Endpoint, str] = {}  # relay endpoint -> Call-ID
        self.ports = PortUse(ports or PortRange(1, 65535))
        # How many flows and learning endpoints the calls' views hold together: what the
        # kernel's maps and `learning` set should hold at least (the self-healing check
        # compares them with the kernel's element counts without walking the calls).
        self.flow_count = 0
        self.learning_count = 0
        self.protocols: collections.Counter[str] = collections.Counter()  # live calls of each
        # Told of every change the table records, as (before, after): a front-end that keeps
        # its own state of its calls (ng) follows what it did not decide itself (a restart's
        # load, a standby following its active node, an idle call's end).
        self.watchers: list[Callable[[Call | None, Call | None], None]] = []

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._calls

    def __iter__(self) -> Iterator[Call]:
        return iter(list(self._calls.values()))

    def get(self, call_id: str) -> Call | None:
        return self._calls.get(call_id)

    def oldest(self, count: int) -> list[Call]:
        """The `count` calls set up first, without copying the table (a spot check)."""
        return list(itertools.islice(self._calls.values(), count))

    def owner(self, relay: Endpoint) -> str | None:
        """The Call-ID whose relay endpoints include `relay`."""
        return self._owner.get(relay)

    # -- decisions (no state change) ------------------------------------------------------

    def on_set(self, media: CallMedia, idle_timeout: float, now: float) -> list[Action]:
        """`on_relay` for an lrkproxy `S` describing `media`."""
        return self.on_relay(lrkproxy_relay(media), idle_timeout, now)

    def on_relay(self, op: Relay, idle_timeout: float, now: float) -> list[Action]:
        """The changes that make the call what `op` says: [] if it is already; raises
        Refused if it is another protocol's call, or if its relay endpoints belong to a
        call it may not take them from (operations.Relay: `takes_over`)."""
        existing = self._calls.get(op.call_id)
        if existing is not None:
            if existing.protocol != op.protocol:
                raise Refused(
                    PROTOCOL,
                    f"call {op.call_id!r} is relayed for the {existing.protocol} protocol: "
                    f"one Call-ID, one protocol",
                )
            if (
                existing.streams == op.streams
                and existing.record == op.record
                and existing.end_at == op.end_at
                and existing.reserved == op.reserved
                and not op.fresh
            ):
                return []
        caller, callee = _legs_for(op.streams, self.policy, self.routed, now)
        if existing is None:
            call = Call(op.call_id, op.streams, idle_timeout, now, caller, callee, op.protocol,
                        op.record, op.end_at, op.reserved)  # fmt: skip
        else:
            call = Call(
                op.call_id,
                op.streams,
                idle_timeout,
                existing.started,
                _keep_learned(existing.caller, caller, 0 in op.fresh),
                _keep_learned(existing.callee, callee, 1 in op.fresh),
                op.protocol,
                op.record,
                op.end_at,
                op.reserved,
            )
        actions: list[Action] = []
        owners = self.claimed(op.call_id, call.relay_endpoints())
        if owners:
            taken = call.relay_endpoints()
            welcome = {(leg.sdp, leg.relay) for leg in call.legs()}
            for owner in owners:
                old = self._calls[owner]
                if not op.takes_over or old.protocol != op.protocol:
                    endpoint = min(old.relay_endpoints() & taken)
                    raise Refused(
                        RELAY_PORT,
                        f"relay endpoint {endpoint} is held by {old.protocol} call {owner!r}"
                        + ("" if old.protocol == op.protocol else ", which the node allocated"),
                    )
                displaced = frozenset(
                    (leg.latched, leg.relay)
                    for leg in old.legs()
                    if leg.latched is not None and leg.relay in taken
                )
                actions.append(
                    Sync(
                        owner,
                        old.view(),
                        None,
                        Reason.REPLACED,
                        repr(op.call_id),
                        displaced - welcome,
                    )
                )
        if existing is None:
            actions.append(Sync(op.call_id, EMPTY, call, Reason.RELAYING))
        else:
            actions.append(Sync(op.call_id, existing.view(), call, Reason.UPDATED))
        return actions

    def on_delete(self, call_id: str, command: str = "D") -> list[Action]:
        """End a call because the controlling layer said so (`command`: what it sent, for
        the log: lrkproxy's `D`, an ng `delete`)."""
        call = self._calls.get(call_id)
        if call is None:
            return []
        return [Sync(call_id, call.view(), None, Reason.DELETED, command)]

    def on_expire(self, call_id: str, reason: Reason, detail: str = "") -> list[Action]:
        """End a call for a reason the engine decided (idle, lifetime)."""
        call = self._calls.get(call_id)
        if call is None:
            return []
        return [Sync(call_id, call.view(), None, reason, detail)]

    def on_packet(
        self,
        source: Endpoint,
        relay: Endpoint,
        silent: Callable[[Endpoint, Endpoint], bool],
        now: float | None = None,
    ) -> PacketDecision:
        """A packet from `source` to a learning `relay` endpoint reached userspace (at
        `now`, engine time: None for no time, when an anchored leg waits for its anchor).

        `silent(sender, relay)` tells whether a latched sender has sent nothing for the
        guard interval (read from the flow's conntrack entry: dataplane/silence.py); it is
        asked only when a latched leg might be re-learned.
        """
        call_id = self._owner.get(relay)
        call = self._calls.get(call_id) if call_id is not None else None
        if call is None:
            return PacketDecision(Verdict.DROP, event=PacketEvent.NO_CALL)
        candidates = [leg for leg in call.legs() if leg.relay == relay]
        leg = next((c for c in candidates if c.latched == source), None)
        if leg is None:
            leg = self._learner(candidates, source, silent, now)
            if leg is None:
                return PacketDecision(Verdict.DROP, event=PacketEvent.STRANGER)
            relearned = leg.latched is not None
            learned = replace(leg, latched=source)
            call = call.with_leg(leg, learned)
            peer = self._peer(call, learned)
            verdict = Verdict.ACCEPT if peer.latched is not None else Verdict.HOLD
            event, reason = (
                (PacketEvent.RELEARNED, Reason.RELEARNED)
                if relearned
                else (PacketEvent.LEARNED, Reason.LEARNED)
            )
            current = self._calls[call.call_id]
            sync = Sync(call.call_id, current.view(), call, reason, f" {source} at {relay}")
            return PacketDecision(verdict, [sync], event)
        # A known sender: its flows exist, or wait for the other party. Nothing to change.
        if self._peer(call, leg).latched is None:
            return PacketDecision(Verdict.HOLD, event=PacketEvent.HELD)
        return PacketDecision(Verdict.ACCEPT)

    @staticmethod
    def _learner(
        candidates: Iterable[Leg],
        source: Endpoint,
        silent: Callable[[Endpoint, Endpoint], bool],
        now: float | None,
    ) -> Leg | None:
        """The leg `source` may speak for: unlatched legs first (those whose SDP IP is the
        source's first), then latched legs whose sender went silent."""
        allowed = [leg for leg in candidates if leg.accepts(source, now)]
        unlatched = [leg for leg in allowed if leg.latched is None]
        if unlatched:
            unlatched.sort(key=lambda leg: leg.sdp is None or leg.sdp.ip != source.ip)
            return unlatched[0]
        for leg in allowed:
            assert leg.latched is not None
            if silent(leg.latched, leg.relay):
                return leg
        return None

    @staticmethod
    def _peer(call: Call, leg: Leg) -> Leg:
        for mine, theirs in ((call.caller, call.callee), (call.callee, call.caller)):
            for index, candidate in enumerate(mine):
                if candidate is leg:
                    return theirs[index]
        raise ValueError("leg is not part of the call")

    # -- state changes ----------------------------------------------------------------------

    def applied(self, action: Action) -> None:
        """Record that the kernel now holds what `action` asked."""
        call_id, call = action.call_id, action.call
        existing = self._calls.get(call_id)
        # Relay endpoints the call keeps stay owned (and their ports taken) as they are:
        # an update (an ng answer, a re-INVITE) touches only what it adds or drops.
        kept = call.relay_endpoints() if call is not None else frozenset()
        owner = self._owner
        if existing is not None:
            view = existing.view()
            self.flow_count -= len(view.flows)
            self.learning_count -= len(view.learning)
            self.protocols[existing.protocol] -= 1
            released = []
            for endpoint in existing.relay_endpoints() - kept:
                if owner.get(endpoint) == call_id:
                    del owner[endpoint]
                    released.append(endpoint.port)
            self.ports.release(released)
        if call is None:
            self._calls.pop(call_id, None)
        else:
            self._calls[call_id] = call
            self.protocols[call.protocol] += 1
            view = call.view()
            self.flow_count += len(view.flows)
            self.learning_count += len(view.learning)
            taken = []
            for endpoint in kept:
                if owner.get(endpoint) is None:
                    taken.append(endpoint.port)
                owner[endpoint] = call_id
            self.ports.take(taken)
        for watch in self.watchers:
            watch(existing, call)

    def claimed(self, call_id: str, relays: Iterable[Endpoint]) -> list[str]:
        """Call-IDs of calls other than `call_id` owning any of `relays`."""
        return sorted(
            {
                owner
                for endpoint in relays
                if (owner := self._owner.get(endpoint)) not in (None, call_id)
            }
        )


def rebuild(
    flows: Iterable[InstalledFlow], idle_timeout: float, now: float
) -> tuple[list[Call], list[InstalledFlow]]:
    """Rebuild calls from kernel flows grouped by comment (the Call-ID).

    A group becomes a call only if it is exactly the two mirrored flows of an RTP stream
    and of an RTCP stream on the next relay ports; anything else (a missing element, a
    truncated Call-ID shared by two calls, a stray element) is an orphan. Caller and callee
    may come back swapped: a call's kernel state is symmetric, so that changes nothing.
    """
    groups: dict[str, list[InstalledFlow]] = {}
    for flow in flows:
        groups.setdefault(flow.comment, []).append(flow)
    calls: list[Call] = []
    orphans: list[InstalledFlow] = []
    for comment, group in groups.items():
        call = _rebuild_one(comment, group, idle_timeout, now)
        if call is None:
            orphans += group
        else:
            calls.append(call)
    return calls, orphans


def _rebuild_one(
    comment: str, group: list[InstalledFlow], idle_timeout: float, now: float
) -> Call | None:
    if not comment or len(group) != 4:
        return None
    if any(f.target is None or f.relay_out is None for f in group):
        return None
    rtp = min(group, key=lambda f: (f.relay.port, f.sender.port, f.relay.ip, f.sender.ip))
    assert rtp.target is not None and rtp.relay_out is not None
    rtcp_relay = rtp.relay.offset(RTCP_PORT_OFFSET)
    rtcp_out = rtp.relay_out.offset(RTCP_PORT_OFFSET)
    rtcp = next((f for f in group if (f.relay, f.relay_out) == (rtcp_relay, rtcp_out)), None)
    if rtcp is None or rtcp.target is None or rtcp.relay_out is None:
        return None
    expected = {
        (rtp.sender, rtp.relay, rtp.target, rtp.relay_out),
        (rtp.target, rtp.relay_out, rtp.sender, rtp.relay),
        (rtcp.sender, rtcp.relay, rtcp.target, rtcp.relay_out),
        (rtcp.target, rtcp.relay_out, rtcp.sender, rtcp.relay),
    }
    if expected != {(f.sender, f.relay, f.target, f.relay_out) for f in group}:
        return None
    try:
        CallMedia(comment, rtp.sender, rtp.relay, rtp.target, rtp.relay_out)  # checks it
    except MediaError:
        return None

    def leg(stream: Stream, address: Endpoint, relay: Endpoint) -> Leg:
        return Leg(stream, address, relay, Rule.EXACT, address)

    def rtcp_of(rtp_address: Endpoint, address: Endpoint) -> Endpoint | None:
        return None if address == rtp_address.offset(RTCP_PORT_OFFSET) else address

    caller = (leg(Stream.RTP, rtp.sender, rtp.relay), leg(Stream.RTCP, rtcp.sender, rtcp.relay))
    callee = (
        leg(Stream.RTP, rtp.target, rtp.relay_out),
        leg(Stream.RTCP, rtcp.target, rtcp.relay_out),
    )
    spec = StreamSpec(
        rtp.sender,
        rtp.relay,
        rtp.target,
        rtp.relay_out,
        caller_rtcp=rtcp_of(rtp.sender, rtcp.sender),
        callee_rtcp=rtcp_of(rtp.target, rtcp.target),
    )
    return Call(comment, (spec,), idle_timeout, now, caller, callee)
