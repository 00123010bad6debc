"""An active/standby pair: which node is active, the standby following the active, and
both watching whether the pair could take over right now.

The pair shares virtual IPs (keepalived, VRRPv3): the node's `internal_ip`/`external_ip`
are those VIPs, and Kamailio's `lrkproxy_sock` points at a VIP too. A node is active while
both relay VIPs are assigned in its network namespace, and standby otherwise (`RoleWatch`,
a bind test every ROLE_INTERVAL). Both nodes run the whole stack (table, queue rule,
control socket bound with IP_FREEBIND); only the engine's role differs.

Replication goes through Redis (replication.py): each node has its own redis-server. The
active writes every change of its call table, and of its calls' media state, to its Redis
(`ReplicatedStore` queues them after its local store commits; publishing.py's worker
thread writes them); the standby's Redis is a replica of the active's, and the standby
reads the changes from it (`Following`, a worker thread blocking on the change stream) and
applies them to its own call table, kernel maps and store (engine.follow). On takeover
the new active promotes its Redis and republishes its table; a node that loses the VIPs
makes its Redis a replica of its peer's, which resynchronises it fully, and then reloads
the whole table from it.

No Redis call ever runs on the event loop: the loop queues changes and reads what the
threads found (`Prober` every PROBE_INTERVAL, for pairhealth.py's verdicts and alarms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from lrkp_tsl.dataplane.role import local_addresses_present
from lrkp_tsl.engine import Engine
from lrkp_tsl.errors import LrkpError, MediaError
from lrkp_tsl.pairhealth import (
    PROBE_INTERVAL,
    PROBE_TIMEOUT,
    REPORT_TTL,
    FollowState,
    PairHealth,
    Probe,
)
from lrkp_tsl.publishing import Publishing
from lrkp_tsl.records import StoredCall, decode, encode
from lrkp_tsl.replication import Change, Follower, ReplicationError, ReplicationGap, Status
from lrkp_tsl.session import Call
from lrkp_tsl.store import SqliteStore

log = logging.getLogger("lrkp_tsl.pair")

ROLE_INTERVAL = 0.05
FOLLOW_BLOCK_MS = 200
FOLLOW_BATCH = 1000
# How often the active compares the size of the table in Redis with its own (a Redis
# restarted empty, or changes lost to a timeout, are republished at once).
CONSISTENCY_INTERVAL = 2.0
# How often the follower repeats REPLICAOF while its Redis is not in sync (a no-op while
# Redis already replicates the peer; it puts back a Redis that restarted as a master).
REPLICAOF_INTERVAL = 1.0
RETRY_INTERVAL = 1.0


class ReplicatedStore:
    """The engine's Store: the local SQLite store, and, while active, the pair's Redis.

    Redis is never waited for: a change is queued for the publishing worker after the
    local store has committed it (inside a group, once the group commits: a group whose
    commit fails publishes nothing). A Redis failure never fails a command (the active
    keeps serving: the standby is the luxury); the worker republishes the whole table once
    Redis answers again, so the standby cannot miss what happened meanwhile.
    """

    def __init__(
        self, local: SqliteStore, publishing: Publishing, active: Callable[[], bool]
    ) -> None:
        self.local = local
        self.publishing = publishing
        self.active = active
        self._held: list[Callable[[], None]] | None = None

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        if self._held is not None:  # nested: the outer group publishes
            yield
            return
        held: list[Callable[[], None]] = []
        self._held = held
        try:
            with self.local.group():
                yield
        finally:
            self._held = None
        with self.publishing.batch():  # committed: now the standby may see them, at once
            for publish in held:
                publish()

    def put(self, call: Call, quiet_since: float | None) -> None:
        if not self.active():
            self.local.put(call, quiet_since)
            return
        record = encode(call, quiet_since, self.local.wall_offset)  # once, for both
        self.local.put_record(call, quiet_since, record)
        self._publish(lambda: self.publishing.put(record))

    def delete(self, call_id: str) -> None:
        self.local.delete(call_id)
        if self.active():
            self._publish(lambda: self.publishing.delete(call_id))

    def set_quiet(self, call_id: str, quiet_since: float | None) -> None:
        self.local.set_quiet(call_id, quiet_since)
        if self.active():
            self._publish(lambda: self.publishing.quiet(call_id, quiet_since))

    def load(self) -> list[StoredCall]:
        return self.local.load()

    def _publish(self, publish: Callable[[], None]) -> None:
        if self._held is not None:
            self._held.append(publish)
        else:
            publish()


@dataclass(frozen=True, slots=True)
class Followed:
    """One change read from the active, for the event loop to apply."""

    op: str  # put, del, quiet
    call_id: str
    record: StoredCall | None  # put (None for a record that cannot be read: skipped)
    quiet_since: float | None  # quiet: engine time, None: live


class Following:
    """The standby's reader: a worker thread that makes this node's Redis a replica of the
    peer's (once the publishing worker has stopped writing to it), waits for it to be in
    sync, loads the whole table, then follows the change stream, and hands everything to
    the event loop (the engine is not thread-safe)."""

    def __init__(
        self,
        follower: Follower,
        peer: str,
        apply_all: Callable[[str, dict[str, StoredCall]], None],
        apply: Callable[[str, list[Followed]], None],
        wall_offset: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.follower = follower
        self.peer = peer
        self.apply_all = apply_all
        self.apply = apply
        self.offset = wall_offset
        self.loop = loop
        self._stop = threading.Event()
        self.resync = threading.Event()  # set by the loop when applying failed
        self._thread: threading.Thread | None = None
        self.loaded = False  # a whole table was handed over since following started
        self.error: str | None = None

    def state(self) -> FollowState:
        return FollowState(self.loaded, self.error)

    def start(self, ready: threading.Event) -> None:
        """Follow once `ready` is set (the publishing worker no longer writes to Redis)."""
        self.loaded = False
        self.error = None
        self._stop = threading.Event()  # a thread still ending keeps its own
        self._thread = threading.Thread(
            target=self._run, args=(self._stop, ready), name="lrkp-follow", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop following. Not joined: the thread ends after its blocking read (at most
        FOLLOW_BLOCK_MS), and what it still hands over is ignored by an active engine."""
        self._stop.set()
        self._thread = None

    def join(self) -> None:
        """At exit: wait for the thread (it ends within FOLLOW_BLOCK_MS)."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout=FOLLOW_BLOCK_MS / 1000 + 2)

    def _run(self, stop: threading.Event, ready: threading.Event) -> None:
        while not ready.wait(0.05):
            if stop.is_set():
                return
        while not stop.is_set():
            try:
                self._follow_once(stop)
            except ReplicationGap as gap:
                log.warning("following: reloading the active's table (%s)", gap)
            except LrkpError as error:
                self._failed(error.reason)
                stop.wait(RETRY_INTERVAL)
            except OSError as error:
                self._failed(str(error))
                stop.wait(RETRY_INTERVAL)

    def _failed(self, error: str) -> None:
        if self.error is None:  # the pair's health reminds while it lasts
            log.warning("following the active node: %s (retrying)", error)
        self.error = error

    def _follow_once(self, stop: threading.Event) -> None:
        ordered = 0.0
        while True:
            if time.monotonic() - ordered >= REPLICAOF_INTERVAL:
                self.follower.follow(self.peer)  # REPLICAOF: a no-op if already following
                ordered = time.monotonic()
            if self.follower.synced():
                break
            if stop.wait(0.05):
                return
        last, table = self.follower.snapshot()
        records = {call_id: self._decode(record) for call_id, record in table.items()}
        self.loop.call_soon_threadsafe(
            self.apply_all, last, {k: v for k, v in records.items() if v is not None}
        )
        self.loaded = True
        self.error = None
        self.resync.clear()
        while not stop.is_set() and not self.resync.is_set():
            # Raises ReplicationGap when the table must be loaded again (a full resync of
            # this Redis, a stream trimmed past what was read).
            changes = self.follower.changes(last, FOLLOW_BLOCK_MS, FOLLOW_BATCH)
            self.error = None
            if not changes:
                continue
            last = changes[-1].stream_id
            if any(change.op == "reset" for change in changes):
                return  # the active published its whole table: reload it
            batch = [self._change(c) for c in changes if c.call_id is not None]
            self.loop.call_soon_threadsafe(self.apply, last, batch)

    def _change(self, change: Change) -> Followed:
        assert change.call_id is not None
        if change.op == "quiet":
            since = None if change.quiet is None else change.quiet - self.offset
            return Followed("quiet", change.call_id, None, since)
        if change.op == "del" or change.record is None:
            return Followed("del", change.call_id, None, None)
        return Followed("put", change.call_id, self._decode(change.record), None)

    def _decode(self, record: dict[str, object]) -> StoredCall | None:
        try:
            return decode(record, self.offset)
        except (MediaError, ValueError, KeyError) as error:
            log.error("following: a record cannot be read, skipped: %s", error)
            return None


class Prober:
    """A worker thread that reads the Redis servers every PROBE_INTERVAL for the pair's
    health and hands each `Probe` to the event loop. The standby also writes its report
    (`PairHealth.report`) into the active's Redis, so that the active knows it is followed.
    Every Redis here answers within PROBE_TIMEOUT or counts as not answering."""

    def __init__(
        self,
        local_url: str,
        peer_url: str,
        role: Callable[[], str],
        report: Callable[[], dict[str, Any]],
        deliver: Callable[[Probe], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.local = Status(local_url, PROBE_TIMEOUT)
        self.peer = Status(peer_url, PROBE_TIMEOUT)
        self.node = uuid.uuid4().hex  # this process, in its active announcements
        self.role = role
        self.report = report
        self.deliver = deliver
        self.loop = loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lrkp-probe", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=4 * PROBE_TIMEOUT + 1)
        self.local.close()
        self.peer.close()

    def _run(self) -> None:
        while not self._stop.wait(PROBE_INTERVAL):
            role = self.role()
            if role == "standby":
                probe = self.standby()
            elif role == "active":
                probe = self.active()
            else:
                continue
            try:
                self.loop.call_soon_threadsafe(self.deliver, probe)
            except RuntimeError:  # the loop closed: the node is stopping
                return

    def standby(self) -> Probe:
        at = time.monotonic()
        peer: dict[str, str] | None = None
        peer_error = peer_calls = None
        try:
            peer = self.peer.replication()
            peer_calls = self.peer.size()
        except ReplicationError as error:
            peer_error = error.reason
            if "Timeout" not in peer_error and "DENIED" not in peer_error:
                said = self.peer.greeting()
                if said is not None:  # why it hangs up: the news, before redis-py's words
                    peer_error = f"it refuses this node: {said} ({peer_error})"
        if peer is not None and peer.get("role") == "master":
            with contextlib.suppress(ReplicationError):
                self.peer.report(self.report(), REPORT_TTL)
        local: dict[str, str] | None = None
        local_error = last = None
        try:
            local = self.local.replication()
            last = self.local.last_change()
        except ReplicationError as error:
            local_error = error.reason
        return Probe(at, local, local_error, last, peer, peer_error, peer_calls)

    def active(self) -> Probe:
        at = time.monotonic()
        try:
            self.local.announce_active(self.node, REPORT_TTL)
            local = self.local.replication()
            report = self.local.standby_report()
        except ReplicationError as error:
            return Probe(at, None, error.reason)
        return Probe(at, local, standby=report, peer_active=self._peer_active())

    def _peer_active(self) -> bool | None:
        """Whether the peer node is active too: its Redis is a master and another node
        announced itself active there (None: its Redis does not answer)."""
        try:
            if self.peer.replication().get("role") != "master":
                return False
            announced = self.peer.announced_active()
        except ReplicationError:
            return None
        return announced is not None and announced != self.node


class RoleWatch:
    """Active while this namespace holds both relay VIPs; acts on every change of role."""

    def __init__(
        self,
        vips: tuple[IPv4Address, ...],
        engine: Engine,
        publishing: Publishing,
        following: Following,
        health: PairHealth,
    ) -> None:
        self.vips = vips
        self.engine = engine
        self.publishing = publishing
        self.following = following
        self.health = health
        self.changes = 0
        self._next_check = 0.0

    def check(self) -> None:
        present = local_addresses_present(self.vips)
        if present and not self.engine.active:
            self._become_active()
        elif not present and (self.engine.active or self.changes == 0):
            self._become_standby()
        elif present and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + CONSISTENCY_INTERVAL
            self.publishing.check(len(self.engine.table))

    def _become_active(self) -> None:
        now = time.monotonic()
        self.following.stop()
        self.publishing.master()  # REPLICAOF NO ONE, then the whole table (its worker)
        self.engine.promote(now)
        self.health.became("active", now)
        self.changes += 1
        self._next_check = now + CONSISTENCY_INTERVAL

    def _become_standby(self) -> None:
        now = time.monotonic()
        self.engine.demote(now)
        self.following.start(self.publishing.standby())
        self.health.became("standby", now)
        self.changes += 1
