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

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from ipaddress import IPv4Network

from lrkp_tsl.errors import MediaError
from lrkp_tsl.kernel import EMPTY, KernelView, StreamKey
from lrkp_tsl.latching import Policy, Rule, initial
from lrkp_tsl.media import (
    RTCP_PORT_OFFSET,
    CallMedia,
    Endpoint,
    Flow,
    InstalledFlow,
    PortRange,
    Stream,
)
from lrkp_tsl.ports import PortUse

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
    """One party's side of one stream."""

    stream: Stream
    sdp: Endpoint  # the address in the SDP (RTCP: + 1)
    relay: Endpoint  # the relay endpoint this party sends to and hears from
    rule: Rule
    latched: Endpoint | None  # the address flows use; None until learned


@dataclass(frozen=True, slots=True)
class Call:
    media: CallMedia
    idle_timeout: float
    started: float
    caller: tuple[Leg, Leg]  # RTP, RTCP
    callee: tuple[Leg, Leg]
    # The kernel view, computed once (a Call never changes; `replace` starts afresh).
    _view: KernelView | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def call_id(self) -> str:
        return self.media.call_id

    def legs(self) -> Iterator[Leg]:
        yield from self.caller
        yield from self.callee

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
        return self.media.relay_endpoints()

    def with_leg(self, old: Leg, new: Leg) -> Call:
        def swap(legs: tuple[Leg, Leg]) -> tuple[Leg, Leg]:
            first, second = legs
            return (new if first is old else first, new if second is old else second)

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
            Reason.DELETED: "deleted by the controlling layer (D)",
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
    media: CallMedia, policy: Policy, routed: Sequence[IPv4Network]
) -> tuple[tuple[Leg, Leg], tuple[Leg, Leg]]:
    def legs(sdp: Endpoint, relay: Endpoint) -> tuple[Leg, Leg]:
        made = []
        for stream, delta in ((Stream.RTP, 0), (Stream.RTCP, RTCP_PORT_OFFSET)):
            leg_sdp = sdp.offset(delta)
            rule, latched = initial(policy, leg_sdp, routed)
            made.append(Leg(stream, leg_sdp, relay.offset(delta), rule, latched))
        return made[0], made[1]

    return legs(media.caller, media.caller_relay), legs(media.callee, media.callee_relay)


def _keep_learned(old: tuple[Leg, Leg], new: tuple[Leg, Leg]) -> tuple[Leg, Leg]:
    """Legs whose SDP address and relay endpoint did not change keep what they learned."""
    kept = []
    for before, after in zip(old, new, strict=True):
        same = (before.sdp, before.relay, before.rule) == (after.sdp, after.relay, after.rule)
        kept.append(before if same else after)
    return kept[0], kept[1]


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
        existing = self._calls.get(media.call_id)
        if existing is not None and existing.media == media:
            return []
        caller, callee = _legs_for(media, self.policy, self.routed)
        welcome = {(leg.sdp, leg.relay) for leg in (*caller, *callee)}
        actions: list[Action] = []
        for owner in self.claimed(media):
            old = self._calls[owner]
            taken = media.relay_endpoints()
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
                    repr(media.call_id),
                    displaced - welcome,
                )
            )
        if existing is None:
            call = Call(media, idle_timeout, now, caller, callee)
            actions.append(Sync(media.call_id, EMPTY, call, Reason.RELAYING))
        else:
            call = Call(
                media,
                idle_timeout,
                existing.started,
                _keep_learned(existing.caller, caller),
                _keep_learned(existing.callee, callee),
            )
            actions.append(Sync(media.call_id, existing.view(), call, Reason.UPDATED))
        return actions

    def on_delete(self, call_id: str) -> list[Action]:
        call = self._calls.get(call_id)
        if call is None:
            return []
        return [Sync(call_id, call.view(), None, Reason.DELETED)]

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
    ) -> PacketDecision:
        """A packet from `source` to a learning `relay` endpoint reached userspace.

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
            leg = self._learner(candidates, source, silent)
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
        candidates: Iterable[Leg], source: Endpoint, silent: Callable[[Endpoint, Endpoint], bool]
    ) -> Leg | None:
        """The leg `source` may speak for: unlatched legs first (those whose SDP IP is the
        source's first), then latched legs whose sender went silent."""
        allowed = [leg for leg in candidates if leg.rule.accepts(source, leg.sdp)]
        unlatched = [leg for leg in allowed if leg.latched is None]
        if unlatched:
            unlatched.sort(key=lambda leg: leg.sdp.ip != source.ip)
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
        existing = self._calls.get(action.call_id)
        if existing is not None:
            view = existing.view()
            self.flow_count -= len(view.flows)
            self.learning_count -= len(view.learning)
            for endpoint in existing.relay_endpoints():
                if self._owner.get(endpoint) == action.call_id:
                    del self._owner[endpoint]
                    self.ports.release((endpoint.port,))
        if action.call is None:
            self._calls.pop(action.call_id, None)
            return
        self._calls[action.call_id] = action.call
        view = action.call.view()
        self.flow_count += len(view.flows)
        self.learning_count += len(view.learning)
        for endpoint in action.call.relay_endpoints():
            if self._owner.get(endpoint) is None:
                self.ports.take((endpoint.port,))
            self._owner[endpoint] = action.call_id

    def claimed(self, media: CallMedia) -> list[str]:
        """Call-IDs of other calls owning any of `media`'s relay endpoints."""
        return sorted(
            {
                owner
                for endpoint in media.relay_endpoints()
                if (owner := self._owner.get(endpoint)) not in (None, media.call_id)
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
        media = CallMedia(comment, rtp.sender, rtp.relay, rtp.target, rtp.relay_out)
    except MediaError:
        return None

    def leg(stream: Stream, address: Endpoint, relay: Endpoint) -> Leg:
        return Leg(stream, address, relay, Rule.EXACT, address)

    caller = (leg(Stream.RTP, rtp.sender, rtp.relay), leg(Stream.RTCP, rtcp.sender, rtcp.relay))
    callee = (
        leg(Stream.RTP, rtp.target, rtp.relay_out),
        leg(Stream.RTCP, rtcp.target, rtcp.relay_out),
    )
    return Call(media, idle_timeout, now, caller, callee)
