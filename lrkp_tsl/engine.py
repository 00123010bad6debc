"""The node's brain: commands, first packets, kernel events and time in; kernel changes,
replies and packet verdicts out. Pure: no sockets, no clock, no kernel bindings.

Drivers (the server calls these, passing `now` from one monotonic clock):
- `batch`: protocol-neutral operations (operations.py: relay a call, end it) from the
  front-ends, which own their protocols' codecs, replies and retransmission caches
  (lrkp_tsl/frontends/); applied together where they can be (group commit);
- `on_packet`: a queued first packet, known by an opaque id -> a verdict, now or later;
- `on_stream_events` / `on_events_lost`: conntrack entries started, expired or were removed;
- `on_timer`: whatever `next_deadline()` said was due;
- `restore` (startup) and `reinstall` (after the node's table vanished).
Verdicts for queued packets are collected and taken with `take_verdicts()`.

Every change of a call goes through `_commit`, in this order: the store (so a crash after
this point is repaired from the store at the next start), the kernel (one nftables
transaction), the call table, then conntrack entries of changed flows. A store failure
changes nothing; a kernel failure puts the store back and marks the call *suspect*: the
kernel may hold anything between the two views, and the call is resynchronised (extra
elements deleted, the table's view re-added) before anything else touches it, and on a
retry timer until it succeeds. So the call table and the kernel always agree again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network

from lrkp_tsl.activity import Activity
from lrkp_tsl.errors import KernelError, StoreError
from lrkp_tsl.kernel import (
    EMPTY,
    Counters,
    Kernel,
    KernelState,
    KernelView,
    Repair,
    StreamChange,
    StreamEvent,
    StreamKey,
)
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import Endpoint, Flow, InstalledFlow, PortRange
from lrkp_tsl.operations import (
    DONE,
    LRKPROXY,
    FrontEnd,
    Operation,
    Refused,
    Relay,
    Result,
    Stale,
)
from lrkp_tsl.ratelog import RateLimitedLog
from lrkp_tsl.records import Store, StoredCall
from lrkp_tsl.schedule import Schedule
from lrkp_tsl.session import (
    PROTOCOL,
    Call,
    CallTable,
    PacketEvent,
    Reason,
    Sync,
    Verdict,
    rebuild,
)
from lrkp_tsl.traffic import Tally, Traffic, call_summary, live_of

log = logging.getLogger("lrkp_tsl.engine")
calls_log = logging.getLogger("lrkp_tsl.calls")

# A source displaced from its relay ports stays refused this long after its last packet
# seen here (the kernel's `displaced` set does the same in the data path).
DISPLACED_GUARD = 10.0
# A first packet whose peer is not latched yet waits at most this long, this many per call
# (RTP older than this is useless to a jitter buffer anyway).
HOLD_TIMEOUT = 2.0
HOLD_MAX_PER_CALL = 64
# How soon a failed kernel change or conntrack deletion is tried again.
RETRY_INTERVAL = 1.0
# Calls compared with the kernel per step of `reconcile` (one event-loop turn each).
RECONCILE_CHUNK = 2000
# Calls repaired per kernel transaction after an inconsistent read (bounds one netlink
# batch: a call's deletions and additions are about 1 KiB).
REPAIR_BATCH = 64
# Due calls handled per timer run: a burst (every restored call checked one idle timeout
# after a restart) is spread over several turns of the event loop instead of stalling it.
TIMER_BUDGET = 256

# Commands applied in one kernel transaction at most (bounds one batch's netlink message).
GROUP_MAX = 32
# A promoted standby checks no call against its kernel sooner than this after the takeover:
# the parties' packets need the VRRP gap (~0.4 s) to arrive, and the active's last change of
# a call's media state may not have been replicated.
PROMOTE_GRACE = 5.0

TimerKey = tuple[str, str]  # ("call" | "held" | "retry" | "log", Call-ID or "")
RETRY: TimerKey = ("retry", "")
LOG_FLUSH: TimerKey = ("log", "")


@dataclass(frozen=True, slots=True)
class Settings:
    max_lifetime: float
    idle_timeout: float
    policy: Policy
    routed: tuple[IPv4Network, ...]
    ports: PortRange  # the relay port range


@dataclass(slots=True)
class Held:
    """A first packet whose sender is latched while the other party is not yet."""

    packet: int
    sender: Endpoint
    relay: Endpoint
    since: float


@dataclass(slots=True)
class _Item:
    """One operation of a batch, on its way through `Batch`."""

    op: Operation
    peer: str  # who asked, for logs
    done: Callable[[Result], None]
    committed: Callable[[], None] | None = None
    actions: list[Sync] = field(default_factory=list)
    old: Call | None = None
    error: KernelError | StoreError | Refused | None = None
    stale: Stale = ()

    def result(self) -> Result:
        if self.error is None and not self.stale:
            return DONE
        return Result(self.error, self.stale)


class Batch:
    """Operations that arrived together (one read of a control socket), applied together.

    Operations whose calls and relay endpoints are disjoint are committed as one group:
    each goes to the store, then all of them to the kernel in one transaction
    (`Kernel.change_many`), then each to the call table; each operation's `done` is called
    after its own kernel commit, so a reply sent from it still follows that commit (its
    `committed` sooner: right after that commit and the deletion of the conntrack entries of
    the flows a continuing call changed, before the table and the rest of conntrack). An
    operation that fails is refused alone: the others are committed without it. One
    touching what an earlier one of the batch touched (the same Call-ID or relay endpoint),
    or taking relay endpoints from another call, waits until the operations before it are
    applied, as if they had arrived one by one. A front-end that must decide an operation
    against the call as the earlier ones leave it (ng) asks `touches` first, and `flush`es.
    """

    __slots__ = ("_engine", "_group", "_now", "_touched")

    def __init__(self, engine: Engine, now: float) -> None:
        self._engine = engine
        self._now = now
        self._group: list[_Item] = []
        self._touched: set[Hashable] = set()

    def touches(self, call_id: str) -> bool:
        """Whether an operation waiting in the batch is about this call."""
        return call_id in self._touched

    def add(
        self,
        op: Operation,
        peer: str,
        done: Callable[[Result], None],
        committed: Callable[[], None] | None = None,
    ) -> None:
        """Apply `op` with the batch; `done(result)` once it is applied, or refused.

        `committed()`, if given, as soon as the change is in the store and the kernel (and a
        continuing call's changed flows have lost their conntrack entries), before the
        bookkeeping that follows (table, an ended call's conntrack entries, activity, logs;
        `done` comes after it): a reply sent from it promises what `done`'s would, sooner.
        Not called for a change that fails, nor for one applied alone (`done` follows at once
        there)."""
        engine, now = self._engine, self._now
        item = _Item(op, peer, done, committed)
        keys = engine._decide(item, now)
        if keys & self._touched:
            self.flush()
            keys = engine._decide(item, now)
        if not item.actions:  # nothing to change (a repeated S, a D of no call), or refused
            done(item.result())
            return
        if len(item.actions) == 1 and len(self._group) < GROUP_MAX:
            self._group.append(item)
            self._touched |= keys
            return
        # Several changes (ports taken from other calls): applied on its own, in order.
        self.flush()
        engine._apply_alone(item, now)
        done(item.result())

    def flush(self) -> None:
        """Commit what waits; every `done` of it has been called on return."""
        group, self._group, self._touched = self._group, [], set()
        self._engine._commit_group(group, self._now)


@dataclass(slots=True)
class ReadJournal:
    """What the node changed in the kernel since a read of its maps began: what the read
    saw there is out of date. The node's own changes leave those elements as it meant."""

    relays: set[Endpoint] = field(default_factory=set)  # relay endpoints of changed calls
    keys: set[StreamKey] = field(default_factory=set)  # flow keys added or deleted
    learning: set[Endpoint] = field(default_factory=set)  # learning endpoints changed
    reloaded: bool = False  # the whole table was reloaded and every call put back

    def note(self, before: KernelView, after: KernelView, calls: Iterable[Call | None]) -> None:
        for view in (before, after):
            self.learning |= view.learning
            self.relays |= view.learning
            for flow in view.flows:
                self.keys.add((flow.sender, flow.relay))
                self.relays.add(flow.relay)
        for call in calls:
            if call is not None:
                self.relays |= call.relay_endpoints()


@dataclass(slots=True)
class RestoreReport:
    """What startup reconciliation found; each non-empty case is also one log line."""

    intact: int = 0
    repaired: list[str] = field(default_factory=list)
    reinstalled: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    stray_flows: int = 0
    stray_learning: int = 0
    # Kernel flows of no call that form no call, left alone because the read was not
    # consistent (one of theirs may have been skipped): by comment, for the next read.
    doubtful: list[str] = field(default_factory=list)
    consistent: bool = True


def _sample(call_ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(c) for c in call_ids[:limit])
    return shown + (f" and {len(call_ids) - limit} more" if len(call_ids) > limit else "")


def _merge(*views: KernelView) -> KernelView:
    return KernelView(
        frozenset().union(*(v.flows for v in views)),
        frozenset().union(*(v.learning for v in views)),
    )


def _stream_key(call: Call, key: StreamKey) -> StreamKey:
    """The one key a stream is known by, whichever party sent first.

    A stream has one conntrack entry, keyed by its first sender's direction, and a lookup
    by the other direction finds the same entry: so both directions map to the smaller of
    the two keys, and a stream is never counted twice.
    """
    for flow in call.view().flows:
        if (flow.sender, flow.relay) == key:
            return min(key, (flow.target, flow.relay_out))
    return key


def _spread(call: Call) -> float:
    """1 s to one idle timeout, by Call-ID: when a call of unknown activity is checked."""
    fraction = (zlib.crc32(call.call_id.encode()) % 1000) / 1000
    return 1.0 + fraction * max(0.0, call.idle_timeout - 1.0)


def describe_streams(call: Call) -> str:
    """Who sends where, stream by stream, for the log: `caller A <-> R | callee B <-> R2`
    (an lrkproxy call's one stream), `stream 2: ...` before each stream of several, and
    the protocol of a call that is not lrkproxy's."""
    parts = []
    for index, spec in enumerate(call.streams):
        caller = spec.caller if spec.caller is not None else "(unknown)"
        callee = spec.callee if spec.callee is not None else "(unknown)"
        text = f"caller {caller} <-> {spec.caller_relay} | callee {callee} <-> {spec.callee_relay}"
        parts.append(f"stream {index + 1}: {text}" if len(call.streams) > 1 else text)
    if not parts:
        parts.append("no stream relayed yet")
    text = "; ".join(parts)
    return text if call.protocol == LRKPROXY else f"{call.protocol} call, {text}"


class _Described:
    """`describe_streams(call)`, computed when a log line that is emitted formats it."""

    __slots__ = ("call",)

    def __init__(self, call: Call) -> None:
        self.call = call

    def __str__(self) -> str:
        return describe_streams(self.call)


def _flow_tuple(
    flow: Flow | InstalledFlow,
) -> tuple[Endpoint, Endpoint, Endpoint | None, Endpoint | None]:
    return (flow.sender, flow.relay, flow.target, flow.relay_out)


_Found = dict[StreamKey, tuple[StreamKey, Counters] | None]
"""What an ending call's conntrack keys found (`Kernel.streams`), by key."""


def _touches_kernel(sync: Sync) -> bool:
    """Whether the change is one for the kernel: a change of the front-end's record only
    (an ng offer before its answer, a scheduled delete) is not."""
    return sync.before != sync.after or bool(sync.displaced)


def _summarised(sync: Sync, old: Call | None) -> bool:
    """The change ends a call with a summary line (a replica's removal has none)."""
    return sync.call is None and old is not None and sync.reason is not Reason.REPLICATED


def _end_keys(sync: Sync, old: Call | None) -> frozenset[StreamKey]:
    """Every key an ending call's entries can be found by: its flows' and the ones the
    kernel change removed (the same, unless the table and kernel disagreed)."""
    removed = frozenset((flow.sender, flow.relay) for flow in sync.before.flows ^ sync.after.flows)
    return removed if old is None else old.view().keys() | removed


class Engine:
    def __init__(self, settings: Settings, kernel: Kernel, store: Store) -> None:
        self.settings = settings
        self.kernel = kernel
        self.store = store
        self.table = CallTable(
            settings.max_lifetime, settings.policy, settings.routed, settings.ports
        )
        self.activity = Activity()
        self.schedule: Schedule[TimerKey] = Schedule()
        self.displaced: dict[StreamKey, float] = {}  # (source, relay) -> refused until
        self.remote_log = RateLimitedLog(log)
        self.held: dict[str, list[Held]] = {}
        self.suspect: dict[str, KernelView] = {}  # Call-ID -> what the kernel may hold too
        self.unverified: set[str] = set()  # loaded, not yet compared with the kernel
        # While a read of the kernel's maps is compared (`begin_read` to `reconcile`'s end):
        # what the node changed in the kernel since the read began. What the read saw there
        # is out of date, and never adopted.
        self.journal: ReadJournal | None = None
        self._reconciled = 0  # reads compared so far
        # A single node is always active; in a pair, only the node holding the VIPs is.
        self.active = True
        self.forget_pending: set[StreamKey] = set()
        self.stats: collections.Counter[str] = collections.Counter()
        # What ended streams carried, per call (traffic.py); drain: P answered empty (mgmt.py).
        self.traffic = Traffic()
        self.draining = False
        self._verdicts: list[tuple[int, Verdict]] = []
        # The control protocols served through this engine, by name (`attach`).
        self.front_ends: dict[str, FrontEnd] = {}

    # -- outputs ------------------------------------------------------------------------------

    def take_verdicts(self) -> list[tuple[int, Verdict]]:
        """Verdicts decided since the last call, oldest first (each packet exactly once)."""
        verdicts, self._verdicts = self._verdicts, []
        return verdicts

    def next_deadline(self) -> float | None:
        return self.schedule.next()

    # -- operations from the front-ends -----------------------------------------------------------

    def attach(self, front_end: FrontEnd) -> None:
        """A control protocol's adapter serves through this engine (operations.py)."""
        self.front_ends[front_end.protocol] = front_end

    def carried(self, call_id: str) -> tuple[Tally, Tally]:
        """What the call carried so far, (RTP, RTCP): its ended entries' counters and its
        live ones' (one conntrack exchange: for a query, never per packet)."""
        call = self.table.get(call_id)
        if call is None:
            return Tally(), Tally()
        try:
            live = self.kernel.counters(call.view().keys())
        except KernelError as error:
            self.stats["error.conntrack"] += 1
            log.error("[%s] counters not read: %s", call_id, error)
            live = {}
        return self.traffic.by_kind(call, live_of(call, live))

    def about(self, call: Call) -> Mapping[str, object]:
        """What the call's front-end says of it for humans (ng: its tags); {} if none."""
        front_end = self.front_ends.get(call.protocol)
        return front_end.describe(call) if front_end is not None else {}

    def batch(self, now: float) -> Batch:
        """Operations that arrived together, committed together (group commit)."""
        return Batch(self, now)

    def _decide(self, item: _Item, now: float) -> set[Hashable]:
        """The operation's changes (into `item.actions`), and what they touch: Call-IDs and
        relay endpoints, which a later operation of the same batch must not share."""
        op = item.op
        keys: set[Hashable] = {op.call_id}
        item.actions, item.stale, item.error = [], (), None
        try:
            if isinstance(op, Relay):
                item.actions = self.table.on_relay(op, self.settings.idle_timeout, now)
            else:
                call = self.table.get(op.call_id)
                if call is not None and call.protocol != op.protocol:
                    raise Refused(
                        PROTOCOL,
                        f"call {op.call_id!r} is relayed for the {call.protocol} protocol: "
                        "one Call-ID, one protocol",
                    )
                item.actions = self.table.on_delete(op.call_id, op.command)
                if call is not None and op.stale is not None:
                    item.stale = op.stale(call)
                    if item.stale:
                        item.actions = []
        except Refused as refusal:
            item.error = refusal
            return keys
        for action in item.actions:
            keys.add(action.call_id)
            for view in (action.before, action.after):
                keys.update(view.learning)
                for flow in view.flows:
                    keys.add(flow.relay)
                    keys.add(flow.relay_out)
            if action.call is not None:
                keys.update(action.call.reserved)
        return keys

    def _apply_alone(self, item: _Item, now: float) -> None:
        try:
            for action in item.actions:
                self._commit(action, now, item.peer)
        except (KernelError, StoreError) as error:
            item.error = error

    def _commit_group(self, group: list[_Item], now: float) -> None:
        """Store each, the kernel once for all, the conntrack entries of flows that go on
        rebound, then each one's `committed` (its reply can go), then table and the rest of
        conntrack for each; then each operation's outcome, in order."""
        if not group:
            return
        ready: list[_Item] = []
        try:
            with self._store_group():
                for item in group:
                    try:
                        item.old = self._prepare(item.actions[0], now)
                        ready.append(item)
                    except (KernelError, StoreError) as error:
                        item.error = error
        except StoreError as error:  # the group's commit: none of its writes is durable
            for item in ready:
                item.error = error
            ready = []
        if ready:
            self.stats["kernel.group_commits"] += 1
            self.stats["kernel.group_commands"] += len(ready)
            syncs = [item.actions[0] for item in ready]
            kernel = [_touches_kernel(sync) for sync in syncs]
            changes = [
                (sync.call_id, sync.before, sync.after, sync.displaced)
                for sync, touches in zip(syncs, kernel, strict=True)
                if touches
            ]
            refusals = iter(self.kernel.change_many(changes) if changes else ())
            results = [next(refusals) if touches else None for touches in kernel]
            done: list[tuple[_Item, Sync]] = []
            for item, sync, refused in zip(ready, syncs, results, strict=True):
                if refused is None:
                    done.append((item, sync))
                else:
                    self._refused(sync, item.old, now)
                    item.error = refused
            # A call that goes on relays its changed flows as the change says only once
            # their old conntrack entries are gone (NAT binds a flow at its first packet):
            # before its reply. An ending call's packets stop with its elements (the guard
            # drops them whatever conntrack holds): its entries go after the reply, once
            # the summary has read their counters.
            rebound = {
                flow
                for _item, sync in done
                if sync.call is not None
                for flow in sync.before.flows ^ sync.after.flows
            }
            self._forget(rebound, now)
            for item, _sync in done:  # in the store and the kernel: their replies may go
                if item.committed is not None:
                    self._committed(item)
            ends = self._read_ends([(sync, item.old) for item, sync in done])
            forget: set[Flow | InstalledFlow] = set()
            for item, sync in done:
                self._finish(sync, now, item.peer, item.old, None, forget, ends)
            self._forget(forget - rebound, now)
        for item in group:
            item.done(item.result())

    def _committed(self, item: _Item) -> None:
        """An operation's `committed`: whatever it raises is logged, and the group's
        bookkeeping goes on (the change is in the store and the kernel: the table must
        follow)."""
        assert item.committed is not None
        try:
            item.committed()
        except Exception:
            self.stats["error.internal.committed"] += 1
            log.exception("[%s] after its commit: internal error (the node carries on)",
                          item.op.call_id)  # fmt: skip

    def _store_group(self) -> contextlib.AbstractContextManager[None]:
        """One store transaction for a group's writes (every Store has `group`: the type
        checker sees to it, so a pair's store cannot lose the group commit again)."""
        return self.store.group()

    # -- first packets -------------------------------------------------------------------------

    def on_packet(self, packet: int, source: Endpoint, relay: Endpoint, now: float) -> None:
        """A packet to a learning relay endpoint: latch, hold or drop it; never lose it
        while its call can still use it. Its verdict comes out of `take_verdicts`."""
        if not self.active:  # the VIPs are elsewhere: nothing to learn here
            self.stats["packets.standby"] += 1
            self._verdicts.append((packet, Verdict.DROP))
            return
        until = self.displaced.get((source, relay))
        if until is not None:
            if now < until:
                # Still sending to the ports its call lost: never the new call's party.
                self.displaced[(source, relay)] = now + DISPLACED_GUARD
                self.stats["packets.displaced"] += 1
                self._verdicts.append((packet, Verdict.DROP))
                return
            del self.displaced[(source, relay)]
        try:
            decision = self.table.on_packet(source, relay, self._silent, now)
            for action in decision.actions:
                self._commit(action, now, f"packet from {source}")
        except (KernelError, StoreError) as error:
            self.stats[f"error.{error.code}"] += 1
            log.error("first packet %s -> %s dropped: %s", source, relay, error)
            self._verdicts.append((packet, Verdict.DROP))
            return
        self.stats[f"packets.{decision.event.value}"] += 1
        call_id = self.table.owner(relay)
        if decision.event is PacketEvent.STRANGER:
            self.note_remote(
                now, "strangers", "[%s] stranger %s -> %s dropped", call_id, source, relay
            )
        if decision.verdict is Verdict.HOLD and call_id is not None:
            held = self.held.setdefault(call_id, [])
            if len(held) < HOLD_MAX_PER_CALL:
                held.append(Held(packet, source, relay, now))
                self.schedule.set_earlier(("held", call_id), now + HOLD_TIMEOUT)
                return
            self.stats["packets.hold_dropped"] += 1
            self._verdicts.append((packet, Verdict.DROP))
            return
        accept = decision.verdict is Verdict.ACCEPT
        self._verdicts.append((packet, Verdict.ACCEPT if accept else Verdict.DROP))

    def note_remote(self, now: float, kind: str, message: str, *args: object) -> None:
        """A log line caused by remote input: rate-limited (ratelog.py)."""
        self.remote_log.log(now, logging.WARNING, kind, message, *args)
        due = self.remote_log.next_flush()
        if due is not None:
            self.schedule.set_earlier(LOG_FLUSH, due)

    def _silent(self, sender: Endpoint, relay: Endpoint) -> bool:
        return not self.kernel.is_seen(sender, relay)

    def _release(self, call_id: str, view: KernelView) -> None:
        """Accept held packets whose flow now exists, oldest first."""
        held = self.held.get(call_id)
        if not held:
            return
        keys = view.keys()
        waiting = []
        for item in held:
            if (item.sender, item.relay) in keys:
                self.stats["packets.released"] += 1
                self._verdicts.append((item.packet, Verdict.ACCEPT))
            else:
                waiting.append(item)
        if waiting:
            self.held[call_id] = waiting
        else:
            del self.held[call_id]
            self.schedule.clear(("held", call_id))

    def _drop_held(self, call_id: str, older_than: float | None = None) -> None:
        keep = []
        for item in self.held.pop(call_id, []):
            if older_than is not None and item.since > older_than:
                keep.append(item)
            else:
                self.stats["packets.hold_dropped"] += 1
                self._verdicts.append((item.packet, Verdict.DROP))
        if keep:
            self.held[call_id] = keep
            self.schedule.set(("held", call_id), keep[0].since + HOLD_TIMEOUT)
        else:
            self.schedule.clear(("held", call_id))

    # -- media activity --------------------------------------------------------------------------

    def on_stream_events(self, events: Iterable[StreamEvent], now: float) -> None:
        """Conntrack entries of relayed streams started, expired or were removed."""
        if not self.active:
            return  # what the standby relays, if anything, ends with its next promotion
        for event in events:
            call_id = self.table.owner(event.key[1])
            call = self.table.get(call_id) if call_id is not None else None
            if call is None or call_id is None:
                continue
            self.stats[f"streams.{event.change.value}"] += 1
            log.debug("[%s] stream %s -> %s %s", call_id, *event.key, event.change.value)
            if event.change is StreamChange.STARTED:
                self.traffic.on_started(call_id, event.key)
            elif event.counters is not None:
                self.traffic.on_ended(call, event.key, event.counters)
            key = _stream_key(call, event.key)
            if self.activity.on_event(call_id, event.change, key, now, call.idle_timeout):
                self._record_quiet(call_id)
                self._schedule_call(call)

    def on_events_lost(self, now: float) -> None:
        """The kernel dropped events (socket buffer full): what was live may have ended.

        Every live call is checked against the kernel one idle timeout from now; quiet
        calls are checked at their deadline anyway, which catches a lost start.
        """
        self.stats["streams.events_lost"] += 1
        live = self.activity.live_calls()
        log.warning(
            "conntrack events were lost (receive buffer full): %d live calls will be "
            "checked against the kernel within their idle timeout",
            len(live),
        )
        for call_id in live:
            call = self.table.get(call_id)
            if call is not None:
                self.activity.quiet(call_id, now)
                self._schedule_call(call)

    def _record_quiet(self, call_id: str) -> None:
        try:
            self.store.set_quiet(call_id, self.activity.quiet_since(call_id))
        except StoreError as error:
            # Only the restart-time idle clock depends on it; the call itself is fine.
            self.stats["error.store"] += 1
            log.error("[%s] media state not stored: %s", call_id, error)

    def _schedule_call(self, call: Call) -> None:
        """A call wakes at its maximum lifetime, when it may have been idle too long, or at
        the end its front-end scheduled (`end_at`). A call with no stream to relay yet (an
        ng offer waiting for its answer, which may ring for minutes) has no media to lack:
        only its lifetime and its scheduled end apply.

        Not while standby: the active node ends calls, and the standby follows."""
        if not self.active:
            return
        when = call.started + self.settings.max_lifetime
        quiet = self.activity.quiet_since(call.call_id)
        if quiet is not None and call.streams:
            when = min(when, quiet + call.idle_timeout)
        if call.end_at is not None:
            when = min(when, call.end_at)
        self.schedule.set(("call", call.call_id), when)

    # -- time ------------------------------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        """Handle what is due (at most TIMER_BUDGET of it; `next_deadline` says if more is)."""
        due = self.schedule.pop_due(now, TIMER_BUDGET)
        check: list[Call] = []
        for kind, key in due:
            if kind == "held":
                self._drop_held(key, older_than=now - HOLD_TIMEOUT)
            elif kind == "retry":
                self._retry(now)
            elif kind == "log":
                self.remote_log.flush(now)
                summary_due = self.remote_log.next_flush()
                if summary_due is not None:
                    self.schedule.set(LOG_FLUSH, summary_due)
            else:
                call = self.table.get(key)
                if call is None or not self.active:
                    continue
                if now >= call.started + self.settings.max_lifetime:
                    self._end(call, Reason.LIFETIME, f"{self.settings.max_lifetime:g} s", now)
                elif call.end_at is not None and now >= call.end_at:
                    self._end(call, Reason.DELETED, "delete-delay", now)
                elif call.streams:
                    check.append(call)
                else:
                    self._schedule_call(call)  # woken early (its end moved): nothing due
        if check:
            self._check_idle(check, now)

    def _check_idle(self, calls: list[Call], now: float) -> None:
        """End the calls the kernel confirms have no live stream; the others are live
        (an event was lost, or the node restarted): follow them by events from now on."""
        keys = {call.call_id: call.view().keys() for call in calls}
        try:
            alive = self.kernel.alive(frozenset().union(*keys.values()))
        except KernelError as error:
            self.stats["error.kernel"] += 1
            log.error("checking %d quiet calls against conntrack failed: %s", len(calls), error)
            for call in calls:
                self.schedule.set(("call", call.call_id), now + RETRY_INTERVAL)
            return
        for call in calls:
            found = {_stream_key(call, key) for key in keys[call.call_id] if key in alive}
            if found:
                self.stats["calls.found_live"] += 1
                log.debug("[%s] quiet by events, but live in the kernel", call.call_id)
                self.activity.live(call.call_id, found)
                self._record_quiet(call.call_id)
                self._schedule_call(call)
            else:
                self._end(call, Reason.IDLE, f"{call.idle_timeout:g} s", now)

    def delete(self, call_id: str, now: float) -> bool:
        """End a call at an operator's request (`lrkp-ctl delete`), as `D` does: False if
        there is no such call; raises KernelError or StoreError if it could not end."""
        actions = self.table.on_expire(call_id, Reason.OPERATOR)
        for action in actions:
            self._commit(action, now, "operator")
        return bool(actions)

    def _end(self, call: Call, reason: Reason, detail: str, now: float) -> None:
        for action in self.table.on_expire(call.call_id, reason, detail):
            try:
                self._commit(action, now, "timer")
            except (KernelError, StoreError) as error:
                self.stats[f"error.{error.code}"] += 1
                log.error("[%s] could not end (%s): %s", call.call_id, reason.value, error)
                self.schedule.set(("call", call.call_id), now + RETRY_INTERVAL)

    # -- applying changes ------------------------------------------------------------------------

    def _commit(
        self, sync: Sync, now: float, origin: str, quiet_since: float | None = None
    ) -> None:
        """Store, kernel, table, conntrack, in that order (see the module docstring).

        `quiet_since`: what to record as the call's quiet time (a replicated record's);
        by default the engine's own."""
        old = self._prepare(sync, now, quiet_since)
        if _touches_kernel(sync):
            try:
                self.kernel.change(sync.call_id, sync.before, sync.after, sync.displaced)
            except KernelError:
                self._refused(sync, old, now)
                raise
        self._finish(sync, now, origin, old, quiet_since)

    def _prepare(self, sync: Sync, now: float, quiet_since: float | None = None) -> Call | None:
        """Before the kernel: a suspect or unverified call made whole, then the store.
        Returns the call as the table holds it (None: new)."""
        call_id = sync.call_id
        old = self.table.get(call_id)
        self._note_change(sync.before, sync.after, old, sync.call)
        if call_id in self.suspect:
            self._resync(call_id)
        if call_id in self.unverified and sync.call is not None:
            self._verify_by_reinstall(call_id)
        self.unverified.discard(call_id)
        if sync.call is None:
            self.store.delete(call_id)
        elif quiet_since is not None:
            self.store.put(sync.call, quiet_since)
        else:
            quiet = self.activity.quiet_since(call_id) if old is not None else now
            self.store.put(sync.call, quiet)
        return old

    def _refused(self, sync: Sync, old: Call | None, now: float) -> None:
        """The kernel refused the change: the call is suspect, its record put back."""
        call_id = sync.call_id
        self.suspect[call_id] = _merge(self.suspect.get(call_id, EMPTY), sync.after)
        self.schedule.set_earlier(RETRY, now + RETRY_INTERVAL)
        self._restore_record(call_id, old)

    def _finish(
        self,
        sync: Sync,
        now: float,
        origin: str,
        old: Call | None,
        quiet_since: float | None = None,
        forget: set[Flow | InstalledFlow] | None = None,
        ends: dict[str, _Found | None] | None = None,
    ) -> None:
        """After the kernel committed: the table, conntrack entries of changed flows
        (into `forget` if given, for the caller to delete at once), activity, logs.

        `ends`: what `_read_ends` found for ending calls, by Call-ID (else read here)."""
        call_id = sync.call_id
        # What the front-end says of an ending call, while it still knows the call.
        about = (
            self.about(old)
            if old is not None and old.protocol != LRKPROXY and _summarised(sync, old)
            else None
        )
        self.table.applied(sync)
        summary = None
        changed = sync.before.flows ^ sync.after.flows
        if _summarised(sync, old):
            assert old is not None
            found = ends[call_id] if ends and call_id in ends else self._read_end(sync, old)
            if calls_log.isEnabledFor(logging.INFO):  # only the log line uses it
                summary = self._summary(old, sync, now, found, about)  # before entries go
            if found is not None and not found:
                # No entry either way for any of its flows, read after the kernel dropped its
                # elements: none can appear any more (the guard drops their packets before
                # conntrack), so there is nothing to delete.
                changed = frozenset()
        if forget is None:
            self._forget(changed, now)
        else:
            forget |= changed
        if sync.call is None:
            self.traffic.drop(call_id)
            self.activity.drop(call_id)
            self.schedule.clear(("call", call_id))
            self._drop_held(call_id)
            self.stats["calls.removed"] += 1
            self.stats[f"calls.removed.{sync.reason.value}"] += 1
            if old is not None:
                self.stats[f"protocol.{old.protocol}.ended"] += 1
            if summary is not None:
                calls_log.info(summary[0], extra={"call_summary": summary[1]})
            elif not _summarised(sync, old):
                calls_log.debug("[%s] removed: as on the active node", call_id)
            if sync.displaced:
                self._displace(call_id, sync.displaced, now)
            return
        self.stats[f"calls.{sync.reason.value}"] += 1
        if sync.reason is Reason.RELAYING:
            self.stats[f"protocol.{sync.call.protocol}.started"] += 1
        if old is None or quiet_since is not None:
            self.activity.quiet(call_id, now if quiet_since is None else quiet_since)
        elif not old.streams and sync.call.streams:
            self.activity.quiet(call_id, now)  # its first stream: the idle clock starts now
        self._schedule_call(sync.call)
        if sync.reason in (Reason.RELAYING, Reason.UPDATED):
            calls_log.info(
                "[%s] %s: %s, idle timeout %g s (%s)",
                call_id,
                sync.reason.value,
                _Described(sync.call),  # formatted only if the line is logged
                sync.call.idle_timeout,
                origin,
            )
        elif sync.reason is Reason.REPLICATED:
            calls_log.debug("[%s] replicated from the active node", call_id)
        else:
            calls_log.info("[%s] %s", call_id, sync.describe())
        self._release(call_id, sync.after)

    def _read_ends(self, ends: Sequence[tuple[Sync, Call | None]]) -> dict[str, _Found | None]:
        """The conntrack entries of the calls among `ends` that end with a summary, read in
        one exchange (a group's `D`s): by Call-ID, what their keys found (None: not read)."""
        keys: dict[str, frozenset[StreamKey]] = {
            sync.call_id: _end_keys(sync, old)
            for sync, old in ends
            if _summarised(sync, old) and sync.reason is not Reason.IDLE
        }
        if not keys:
            return {}
        try:
            found = self.kernel.streams({key for each in keys.values() for key in each})
        except KernelError as error:
            self.stats["error.conntrack"] += 1
            log.error("counters of %d ending calls not read: %s", len(keys), error)
            return dict.fromkeys(keys)
        return {
            call_id: {key: found[key] for key in each if key in found}
            for call_id, each in keys.items()
        }

    def _read_end(self, sync: Sync, old: Call) -> _Found | None:
        """`_read_ends` of one call (None: not read, or an idle call: nothing left)."""
        if sync.reason is Reason.IDLE:
            return None
        return self._read_ends([(sync, old)]).get(sync.call_id)

    def _summary(
        self,
        call: Call,
        sync: Sync,
        now: float,
        found: _Found | None,
        about: Mapping[str, object] | None,
    ) -> tuple[str, dict[str, object]]:
        """The call's one summary line (text, fields), with the counters of its live
        entries as `_read_ends` found them (an idle call has none left to read), and what
        its front-end says of it (`about`: None for lrkproxy's)."""
        live = {got[0]: got[1] for got in (found or {}).values() if got is not None}
        mine = live_of(call, live)
        tally = self.traffic.total(call, mine)
        heard = self.traffic.heard(call, mine)
        return call_summary(
            call, sync.reason.value, sync.describe(), tally, now - call.started, heard, about
        )

    def _displace(self, call_id: str, keys: frozenset[StreamKey], now: float) -> None:
        """Refuse, from now on, the sources a replaced call had latched on the ports its
        successor took: Kamailio reused live ports, and that party is still sending."""
        if len(self.displaced) > 65536:  # like the kernel set: bounded, oldest out first
            for key in sorted(self.displaced, key=self.displaced.__getitem__)[:1024]:
                del self.displaced[key]
        for key in keys:
            self.displaced[key] = now + DISPLACED_GUARD
        self.stats["calls.displaced_sources"] += len(keys)
        calls_log.warning(
            "[%s] its relay ports were reused while it was live: %s will not be learned "
            "into the new call while they keep sending",
            call_id,
            ", ".join(f"{source} at {relay}" for source, relay in sorted(keys)),
        )

    def _restore_record(self, call_id: str, old: Call | None) -> None:
        """Put the store back to what the table holds after a refused kernel change."""
        try:
            if old is None:
                self.store.delete(call_id)
            else:
                self.store.put(old, self.activity.quiet_since(call_id))
        except StoreError as error:
            self.stats["error.store"] += 1
            log.error("[%s] store not reverted after a kernel failure: %s", call_id, error)

    def _forget(self, flows: Iterable[Flow | InstalledFlow], now: float) -> None:
        self._forget_keys({(flow.sender, flow.relay) for flow in flows}, now)

    def _forget_keys(self, keys: set[StreamKey], now: float) -> None:
        if not keys:
            return
        try:
            self.kernel.forget(keys)
        except KernelError as error:
            # The new NAT binding is committed; until the old entries go, their streams
            # keep the old one. Not worth failing the command for: retried shortly.
            self.stats["error.conntrack"] += 1
            log.error(
                "conntrack entries of %d flows not deleted (will retry): %s", len(keys), error
            )
            self.forget_pending |= keys
            self.schedule.set_earlier(RETRY, now + RETRY_INTERVAL)

    def _verify_by_reinstall(self, call_id: str) -> None:
        """A loaded call changes before `reconcile` compared it with the kernel: put its
        whole view back first (adding what exists is a no-op), so that the change, which
        is computed against that view, leaves the kernel right whatever it held."""
        call = self.table.get(call_id)
        if call is not None:
            self.kernel.change(call_id, EMPTY, call.view())
            self.stats["kernel.verified_by_reinstall"] += 1

    def _resync(self, call_id: str) -> None:
        """Make the kernel hold exactly the table's view of a suspect call.

        Deletes everything the kernel may hold beyond that view (missing is fine) and
        re-adds the whole view (adding what exists is a no-op); raises KernelError if the
        kernel still refuses, leaving the call suspect. What another call has committed
        since at the same keys (it took the relay ports this change failed to take) is its
        own, and is left alone.
        """
        extra = self.suspect[call_id]
        call = self.table.get(call_id)
        desired = call.view() if call is not None else EMPTY
        self._note_change(extra, desired, call)
        stray = KernelView(
            frozenset(
                f
                for f in extra.flows - desired.flows
                if not self._held_by_other(call_id, f.relay, (f.sender, f.relay))
            ),
            frozenset(
                e for e in extra.learning - desired.learning if not self._held_by_other(call_id, e)
            ),
        )
        try:
            self.kernel.change(call_id, stray, desired)
        except KernelError:
            self.stats["kernel.resync_failed"] += 1
            raise
        del self.suspect[call_id]
        self.stats["kernel.resynced"] += 1
        log.warning("[%s] kernel state resynchronised with the call table", call_id)
        keys = {(flow.sender, flow.relay) for flow in extra.flows | desired.flows}
        self.forget_pending |= keys

    def _held_by_other(self, call_id: str, relay: Endpoint, key: StreamKey | None = None) -> bool:
        """Whether another call's view holds this learning endpoint (key None) or flow key."""
        owner = self.table.owner(relay)
        other = self.table.get(owner) if owner is not None and owner != call_id else None
        if other is None:
            return False
        view = other.view()
        if key is None:
            return relay in view.learning
        streams = view.keys()  # a method of KernelView, not a dict's
        return key in streams

    def _retry(self, now: float) -> None:
        for call_id in list(self.suspect):
            try:
                self._resync(call_id)
            except KernelError as error:
                log.error("[%s] kernel resync failed (will retry): %s", call_id, error)
        if self.forget_pending:
            keys, self.forget_pending = self.forget_pending, set()
            try:
                self.kernel.forget(keys)
            except KernelError as error:
                self.stats["error.conntrack"] += 1
                log.error("conntrack deletion retry failed: %s", error)
                self.forget_pending |= keys
        if self.suspect or self.forget_pending:
            self.schedule.set_earlier(RETRY, now + RETRY_INTERVAL)

    # -- startup and repair ----------------------------------------------------------------------

    def restore(
        self, stored: Iterable[StoredCall], state: KernelState, now: float
    ) -> RestoreReport:
        """`load`, then `reconcile` to the end: the whole startup in one call (tests)."""
        self.load(stored, now)
        report = RestoreReport()
        for _ in self.reconcile(state, now, report):
            pass
        return report

    def load(self, stored: Iterable[StoredCall], now: float) -> int:
        """Take back every stored call (startup, before the node answers anything).

        Each is *unverified* until `reconcile` has compared it with the kernel, or until a
        change touches it: that change first puts the call's whole view back in the kernel
        (so a change computed against the stored view is right whatever the kernel held).
        Idle clocks resume from the stored times: a call that was live is checked against
        the kernel within one idle timeout after the restart, spread over it. Returns how
        many calls.

        A record whose times come from the wall clock (stored before this boot, or by an
        older release: `StoredCall.estimated`) may have been aged by a clock step: a
        restart never makes such a call older than its maximum lifetime less one idle
        timeout (so it is not ended on the spot: it ends by idleness if its media is gone,
        or by its lifetime one idle timeout later), nor younger than new.
        """
        self.begin_read()
        conflicts = []
        capped = retimed = 0
        idle = self.settings.idle_timeout
        for record in sorted(stored, key=lambda r: r.call.started):
            if record.estimated:
                record, changed = self._cap_clocks(record, now)
                capped += changed
            call = record.call
            if call.idle_timeout != idle:
                # The kernel holds one idle policy for the node (its entries expire after
                # the node's timeout, whatever the call was set up with): the call follows
                # it, or it would end by the old one's reckoning. Stored at its next change.
                call = replace(call, idle_timeout=idle)
                retimed += 1
            for other in self.table.claimed(call.call_id, call.relay_endpoints()):
                conflicts.append(other)
                self.table.applied(Sync(other, EMPTY, None, Reason.REPLACED))
                self.activity.drop(other)
                self.unverified.discard(other)
                self._delete_record(other)
            self.table.applied(Sync(call.call_id, EMPTY, call, Reason.RELAYING))
            self.unverified.add(call.call_id)
            quiet = record.quiet_since
            if quiet is None:
                # It had media: check it against the kernel within its idle timeout (an
                # entry that is gone means no packet for a whole timeout), at a moment
                # spread by its Call-ID, so that 50k restored calls are not checked at once.
                quiet = now - call.idle_timeout + _spread(call)
            self.activity.quiet(call.call_id, quiet)
        for call in self.table:
            self._schedule_call(call)
        if capped:
            log.warning(
                "%d stored calls were written before this boot (or by an older release): "
                "their start times come from the wall clock, and were capped to at most %g s "
                "ago (their maximum lifetime less one idle timeout) or to now, so that a "
                "clock step cannot end live calls at startup",
                capped,
                max(0.0, self.settings.max_lifetime - self.settings.idle_timeout),
            )
        if retimed:
            log.info(
                "%d stored calls were set up with another idle timeout: they follow the "
                "node's %g s from now on",
                retimed,
                idle,
            )
        if conflicts:
            log.warning(
                "dropped %d stored calls whose relay ports a newer stored call holds: %s",
                len(conflicts),
                _sample(conflicts),
            )
        log.info("loaded %d calls from the store", len(self.table))
        return len(self.table)

    def begin_read(self) -> None:
        """A read of the kernel's maps for `reconcile` starts now: from here on, note the
        relay endpoints the node changes (what the read sees there is out of date)."""
        self.journal = ReadJournal()

    def _note_change(self, before: KernelView, after: KernelView, *calls: Call | None) -> None:
        """Record a kernel change while a read is compared (`ReadJournal`)."""
        if self.journal is not None:
            self.journal.note(before, after, calls)

    def _cap_clocks(self, record: StoredCall, now: float) -> tuple[StoredCall, bool]:
        """A wall-clock record's times within what a restart may give (see `load`)."""
        call, quiet = record.call, record.quiet_since
        oldest = now - max(0.0, self.settings.max_lifetime - call.idle_timeout)
        started = min(max(call.started, oldest), now)
        if quiet is not None:
            quiet = min(max(quiet, started), now)
        if started == call.started and quiet == record.quiet_since:
            return record, False
        return StoredCall(call.started_at(started), quiet, estimated=True), True

    def reconcile(
        self,
        state: KernelState,
        now: float,
        report: RestoreReport | None = None,
        *,
        final: bool = True,
    ) -> Iterator[int]:
        """Make the kernel hold exactly what the loaded calls need; yields after every
        RECONCILE_CHUNK calls, so the caller can let the event loop run in between.

        `state` is a read made after `begin_read` (or `load`). Calls touched since (a
        command, a learned packet, expiry) put their own view back when first touched and
        are skipped here. For the others, by what the read holds at their relay endpoints:
        - complete: taken as it is (no kernel work: the common restart);
        - partly there: repaired (stray elements deleted, the view re-added); nothing
          there (a reboot, a flushed ruleset): reinstalled. Either way media flows again.
        Then, elements at relay endpoints no call owns: adopted when they form a call (the
        store was lost, or this is the first start after an upgrade), else removed; so are
        elements of touched calls that are no key of theirs, and learning endpoints that
        belong to no call. What the read saw at relay endpoints the node changed since
        the read began (a call it ended meanwhile) is never adopted: it is removed if still
        there. One log line per case.

        A read that is not consistent (commands changed the ruleset while it ran) proves
        presence, never absence (kernel.KernelState): a call missing an element there has
        the elements it lacks deleted and added back in one transaction (right whether they
        were there or not), and flows that form no call are left for the next read
        (`report.doubtful`) rather than removed, unless this is the `final` read the caller
        will make: then they are removed (each of the reads merged into it lacked an
        element of theirs).
        """
        report = report if report is not None else RestoreReport()
        report.consistent = state.consistent
        first = self._reconciled == 0
        self._reconciled += 1
        # Kept up to date until the read is fully compared: the comparison yields to the
        # event loop, and commands meanwhile are changes made after the read too.
        journal = self.journal = self.journal or ReadJournal()
        if journal.reloaded:
            self.journal = None
            log.warning(
                "the node's table was reloaded while the kernel was read: every call was "
                "put back whole, and the read is out of date"
            )
            return
        by_relay: dict[Endpoint, list[InstalledFlow]] = {}
        for flow in state.flows:
            by_relay.setdefault(flow.relay, []).append(flow)
        handled: set[Endpoint] = set()
        pending = list(self.unverified)
        for start in range(0, len(pending), RECONCILE_CHUNK):
            self._reconcile_calls(
                pending[start : start + RECONCILE_CHUNK], by_relay, state, report, now, handled
            )
            yield start
        if not journal.reloaded:  # else the kernel holds every call anew: the read is stale
            self._reconcile_strays(by_relay, state, report, now, handled, final, journal)
        self.journal = None
        self._log_restore(report, first)

    def _reconcile_calls(
        self,
        call_ids: list[str],
        by_relay: dict[Endpoint, list[InstalledFlow]],
        state: KernelState,
        report: RestoreReport,
        now: float,
        handled: set[Endpoint],
    ) -> None:
        stray: list[InstalledFlow] = []
        install: list[tuple[str, KernelView]] = []
        redo: list[Repair] = []
        for call_id in call_ids:
            call = self.table.get(call_id)
            if call is None or call_id not in self.unverified:
                continue  # ended or touched since the snapshot
            self.unverified.discard(call_id)
            view = call.view()
            relays = call.relay_endpoints()
            handled |= relays
            present = [f for relay in relays for f in by_relay.get(relay, ())]
            wanted = {(f.sender, f.relay, f.target, f.relay_out) for f in view.flows}
            seen = {_flow_tuple(f) for f in present}
            have_learning = state.learning & relays
            if seen == wanted and have_learning == view.learning:
                report.intact += 1
                continue
            extra = [f for f in present if _flow_tuple(f) not in wanted]
            (report.repaired if present or have_learning else report.reinstalled).append(call_id)
            if state.consistent:
                stray += extra
                install.append((call_id, view))
                continue
            # What the read lacks may be there all the same, possibly with other data: each
            # such element is deleted (missing is fine) and added back, with the strays.
            unseen = {(f.sender, f.relay) for f in view.flows if _flow_tuple(f) not in seen}
            stale = unseen | {(f.sender, f.relay) for f in extra}
            redo.append((call_id, frozenset(stale), have_learning - view.learning, view))
        if stray:
            self._remove_strays(stray, (), now)
        if install:
            try:
                self.kernel.install(install)
                self._forget((f for _id, view in install for f in view.flows), now)
            except KernelError as error:
                self.stats["error.kernel"] += 1
                log.error(
                    "restoring %d calls in the kernel failed (will retry): %s", len(install), error
                )
                for call_id, view in install:
                    self.suspect[call_id] = _merge(self.suspect.get(call_id, EMPTY), view)
                self.schedule.set_earlier(RETRY, now + RETRY_INTERVAL)
        for start in range(0, len(redo), REPAIR_BATCH):
            self._repair(redo[start : start + REPAIR_BATCH], now)

    def _repair(self, redo: list[Repair], now: float) -> None:
        """Put calls back whole over what an inconsistent read saw of them (one batch)."""
        results = self.kernel.repair(redo)
        forget: set[StreamKey] = set()
        for (call_id, stale, _learning, view), error in zip(redo, results, strict=True):
            if error is None:
                forget |= stale | view.keys()
                continue
            self.stats["error.kernel"] += 1
            log.error("[%s] restoring the call in the kernel failed (will retry): %s",
                      call_id, error)  # fmt: skip
            self.suspect[call_id] = _merge(self.suspect.get(call_id, EMPTY), view)
            self.schedule.set_earlier(RETRY, now + RETRY_INTERVAL)
        self._forget_keys(forget, now)

    def _reconcile_strays(
        self,
        by_relay: dict[Endpoint, list[InstalledFlow]],
        state: KernelState,
        report: RestoreReport,
        now: float,
        handled: set[Endpoint],
        final: bool,
        journal: ReadJournal,
    ) -> None:
        unowned: list[InstalledFlow] = []
        stray: list[InstalledFlow] = []
        for relay, flows in by_relay.items():
            if relay in handled:
                continue  # compared with its call above
            owner = self.table.owner(relay)
            call = self.table.get(owner) if owner is not None else None
            # Elements the node added or deleted since the read are as it left them.
            mine = journal.keys
            if call is not None:  # a call touched since the read: what is no key of it is stale
                keys = call.view().keys()
                stray += [f for f in flows if (f.sender, f.relay) not in keys and
                          (f.sender, f.relay) not in mine]  # fmt: skip
            elif relay in journal.relays:
                # The node ended a call here since the read: never adopted from it.
                stray += [f for f in flows if (f.sender, f.relay) not in mine]
            else:
                unowned += flows
        adopted, orphans = rebuild(unowned, self.settings.idle_timeout, now)
        for call in adopted:
            relays = call.relay_endpoints()
            if self.table.claimed(call.call_id, relays) or call.call_id in self.table:
                orphans += [f for f in unowned if f.relay in call.relay_endpoints()]
                continue
            try:
                self.store.put(call, now)
            except StoreError as error:
                log.error("[%s] adopted call not stored: %s", call.call_id, error)
            self.table.applied(Sync(call.call_id, EMPTY, call, Reason.ADOPTED))
            self.activity.quiet(call.call_id, now)
            self._schedule_call(call)
            report.adopted.append(call.call_id)
        if state.consistent or final:
            stray += orphans
        else:
            report.doubtful += sorted({f.comment for f in orphans})
        stray_learning = [
            e
            for e in state.learning
            if e not in handled and e not in journal.learning and self._stale_learning(e)
        ]
        report.stray_flows += len(stray)
        report.stray_learning += len(stray_learning)
        if stray or stray_learning:
            self._remove_strays(stray, stray_learning, now)

    def _stale_learning(self, endpoint: Endpoint) -> bool:
        """A learning endpoint that no call's view has (now)."""
        owner = self.table.owner(endpoint)
        call = self.table.get(owner) if owner is not None else None
        return call is None or endpoint not in call.view().learning

    def _remove_strays(
        self, flows: list[InstalledFlow], learning: Iterable[Endpoint], now: float
    ) -> None:
        try:
            self.kernel.remove(flows, learning)
            self._forget(flows, now)
        except KernelError as error:
            # Strays relay nothing anyone asked for; they are retried at the next start.
            self.stats["error.kernel"] += 1
            log.error("stray kernel elements not removed: %s", error)

    def _delete_record(self, call_id: str) -> None:
        try:
            self.store.delete(call_id)
        except StoreError as error:
            log.error("[%s] stored record not deleted: %s", call_id, error)

    def _log_restore(self, report: RestoreReport, first: bool = True) -> None:
        total = report.intact + len(report.repaired) + len(report.reinstalled)
        if first or total:
            log.info(
                "restored %d calls from the store: %d intact in the kernel, %d repaired, "
                "%d reinstalled (others were changed before they were checked)%s",
                total,
                report.intact,
                len(report.repaired),
                len(report.reinstalled),
                "" if report.consistent else "; the ruleset changed during the read",
            )
        if report.repaired:
            log.warning(
                "kernel state of %d stored calls was incomplete and was repaired: %s",
                len(report.repaired),
                _sample(report.repaired),
            )
        if report.reinstalled:
            log.warning(
                "%d stored calls had no kernel state (reboot, or a flushed ruleset) and "
                "were reinstalled: %s",
                len(report.reinstalled),
                _sample(report.reinstalled),
            )
        if report.adopted:
            log.warning(
                "adopted %d calls found in the kernel with no stored record (lost state "
                "directory, or an upgrade); they relay where they were latched: %s",
                len(report.adopted),
                _sample(report.adopted),
            )
        if report.stray_flows or report.stray_learning:
            log.warning(
                "removed %d kernel flows and %d learning endpoints that belong to no call",
                report.stray_flows,
                report.stray_learning,
            )
        if report.doubtful:
            log.info(
                "%d groups of kernel flows of no call form no call in a read the ruleset "
                "changed during (one of their elements may have been skipped): left for the "
                "next read: %s",
                len(report.doubtful),
                _sample(report.doubtful),
            )

    def reinstall(self, now: float) -> int:
        """The node's table was reloaded empty: put every call back. Returns how many.

        Every call is then whole in the kernel (or suspect, and retried): none is left to
        compare with a read made before, and that read is out of date."""
        views = [(call.call_id, call.view()) for call in self.table]
        self.unverified.clear()
        if self.journal is not None:
            self.journal.reloaded = True
        try:
            self.kernel.install(views)
        except KernelError:
            for call_id, view in views:
                self.suspect[call_id] = _merge(self.suspect.get(call_id, EMPTY), view)
            self.schedule.set_earlier(RETRY, now + RETRY_INTERVAL)
            raise
        return len(views)

    def renew_streams(self, now: float) -> int:
        """The idle timeout policy was created anew (the table was deleted and put back):
        the live calls' conntrack entries lost it and would now run on the kernel's default
        UDP timeouts (30 s, 120 s), not the idle timeout. An entry cannot be given a policy
        again, so each is deleted: the next packet of its stream, either way, creates a new
        one through the NAT chain, which sets the policy (the maps were put back first, so
        nothing is lost). Each call is treated as quiet since its last packet, read from
        what its entries had left (a packet since the policy was lost counts as now); it is
        checked against the kernel before it ends, which finds the new entries of the
        calls whose media goes on. Returns how many calls had entries.
        """
        calls = [(call, call.view().keys()) for call in self.table]
        keys = [key for _call, mine in calls for key in mine]
        if not keys:
            return 0
        left = self.kernel.alive(keys)
        self.kernel.forget(left)
        renewed = 0
        for call, mine in calls:
            remaining = [left[key] for key in mine if key in left]
            if remaining:
                renewed += 1
                # The kernel reports whole seconds, rounded down: one more, never early.
                since = now - call.idle_timeout + min(call.idle_timeout, max(remaining) + 1)
                self.activity.quiet(call.call_id, since)
                self._schedule_call(call)
        self.stats["kernel.renewed_calls"] += renewed
        return renewed

    # -- an active/standby pair -----------------------------------------------------------------

    def follow(self, call_id: str, record: StoredCall | None, now: float) -> None:
        """Standby: make the call table, the kernel and the store hold what the active
        node has for `call_id` (None: it ended there), and its media state. Raises
        KernelError or StoreError (the caller resynchronises from the active's full table)."""
        current = self.table.get(call_id)
        if record is None:
            if current is not None:
                self._commit(Sync(call_id, current.view(), None, Reason.REPLICATED), now, "peer")
            return
        call = record.call
        if current == call:
            self._follow_media(call_id, record.quiet_since, now)
            return
        for other in self.table.claimed(call.call_id, call.relay_endpoints()):
            old = self.table.get(other)
            if old is not None:
                self._commit(Sync(other, old.view(), None, Reason.REPLICATED), now, "peer")
        before = current.view() if current is not None else EMPTY
        quiet = now if record.quiet_since is None else record.quiet_since
        self._commit(Sync(call_id, before, call, Reason.REPLICATED), now, "peer", quiet)
        if record.quiet_since is None:
            self._follow_media(call_id, None, now)
        self.stats["replication.applied"] += 1

    def follow_media(self, call_id: str, quiet_since: float | None, now: float) -> None:
        """Standby: the active node says the call's media went quiet at `quiet_since`, or
        is live (None). Kept, so that a takeover ends the call only when it really had no
        media for its idle timeout (`promote`). Raises StoreError."""
        if call_id in self.table:
            self._follow_media(call_id, quiet_since, now)
            self.stats["replication.applied"] += 1

    def _follow_media(self, call_id: str, quiet_since: float | None, now: float) -> bool:
        """The media state as the active has it (stored only if it changed); True if it did."""
        known = call_id in self.activity
        before = self.activity.quiet_since(call_id)
        if quiet_since is None:
            if known and before is None:
                return False
            self.activity.live(call_id, set())  # which streams: the new active's kernel says
        else:
            if known and before is not None and abs(before - quiet_since) < 0.001:
                return False
            self.activity.quiet(call_id, quiet_since)
        self.store.set_quiet(call_id, quiet_since)
        return True

    def follow_all(self, records: dict[str, StoredCall], now: float) -> int:
        """Standby: the active node's whole table (at start, or after a full resync).
        Only what differs is changed; returns how many calls changed."""
        changed = 0
        for step in self.follow_all_steps(records, now):
            changed = step
        return changed

    def follow_all_steps(self, records: dict[str, StoredCall], now: float) -> Iterator[int]:
        """`follow_all` in steps of RECONCILE_CHUNK changes; yields how many so far, so the
        caller lets the event loop run in between (a joining standby with 50k calls to add
        must still notice a takeover). Calls it had that the active has not are removed
        (after a split brain: those set up on this node alone; logged as one line)."""
        gone = [c.call_id for c in self.table if c.call_id not in records]
        if gone:
            log.warning(
                "following: %d calls of this node are not on the active node: removed "
                "(calls set up here while both nodes were active, or changes the active "
                "never published): %s",
                len(gone),
                _sample(gone),
            )
        changed = 0
        for call_id in gone:
            self.follow(call_id, None, now)
            changed += 1
            if changed % RECONCILE_CHUNK == 0:
                yield changed
        for call_id, record in records.items():
            if self.table.get(call_id) != record.call:
                self.follow(call_id, record, now)
            elif not self._follow_media(call_id, record.quiet_since, now):
                continue  # the same call, the same media state: nothing to do
            changed += 1
            if changed % RECONCILE_CHUNK == 0:
                yield changed
        yield changed

    def promote(self, now: float) -> None:
        """This node took the VIPs: answer commands, learn, end calls.

        Its table and kernel already hold what the active had (follow); media flows as
        soon as packets arrive here. Each call's idle clock goes on from what the active
        last said about its media (replicated with every change), as after a restart:
        - quiet since T: it ends at T + its idle timeout if this node's kernel has seen
          no packet of it by then, but never within PROMOTE_GRACE of the takeover (a
          change to live in the replication lag, clocks that differ a little);
        - live, or not known: counted from the takeover, so it ends only if no packet of
          it reaches this node for a whole idle timeout.
        """
        self.active = True
        for call in self.table:
            call_id = call.call_id
            quiet = self.activity.quiet_since(call_id) if call_id in self.activity else None
            earliest = now - call.idle_timeout + min(PROMOTE_GRACE, call.idle_timeout)
            self.activity.quiet(call_id, now if quiet is None else max(quiet, earliest))
            self._schedule_call(call)
        self.stats["pair.promoted"] += 1
        log.warning("active: this node holds the relay addresses; %d calls", len(self.table))

    def demote(self, now: float) -> None:
        """The VIPs went elsewhere: stop answering, learning and ending calls."""
        self.active = False
        for call in self.table:
            self.schedule.clear(("call", call.call_id))
        for call_id in list(self.held):
            self._drop_held(call_id)
        self.stats["pair.demoted"] += 1
        log.warning("standby: the relay addresses are elsewhere; following the active node")

    def shutdown(self) -> None:
        """Drop every held packet (the queue is about to close)."""
        for call_id in list(self.held):
            self._drop_held(call_id)
