"""An active/standby pair: which node is active, and the standby following the active.

The pair shares virtual IPs (keepalived, VRRPv3): the node's `internal_ip`/`external_ip`
are those VIPs, and Kamailio's `lrkproxy_sock` points at a VIP too. A node is active while
both relay VIPs are assigned in its network namespace, and standby otherwise (`RoleWatch`,
a bind test every ROLE_INTERVAL). Both nodes run the whole stack (table, queue rule,
control socket bound with IP_FREEBIND); only the engine's role differs.

Replication goes through Redis (replication.py): each node has its own redis-server. The
active writes every change of its call table to its Redis (`ReplicatedStore`, in the same
step as its local store, before `OK`); the standby's Redis is a replica of the active's,
and the standby reads the changes from it (`Following`, a worker thread blocking on the
change stream) and applies them to its own call table, kernel maps and store
(engine.follow). On takeover the new active promotes its Redis; a node that loses the VIPs
makes its Redis a replica of its peer's, which resynchronises it fully, and then reloads
the whole table from it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from lrkp_tsl.dataplane.role import local_addresses_present
from lrkp_tsl.engine import Engine
from lrkp_tsl.errors import LrkpError, MediaError
from lrkp_tsl.records import StoredCall, decode, encode
from lrkp_tsl.replication import Change, Follower, Publisher, ReplicationError, ReplicationGap
from lrkp_tsl.session import Call
from lrkp_tsl.store import SqliteStore

log = logging.getLogger("lrkp_tsl.pair")

ROLE_INTERVAL = 0.05
FOLLOW_BLOCK_MS = 200
FOLLOW_BATCH = 1000
# How often the active compares the size of the table in Redis with its own (a Redis
# restarted empty, or changes lost to a timeout, are republished at once).
CONSISTENCY_INTERVAL = 2.0
# A standby whose Redis cannot sync with the active's says so this often.
NOT_SYNCED_WARNING = 10.0


class ReplicatedStore:
    """The engine's Store: the local SQLite store, and, while active, the pair's Redis.

    A Redis failure never fails a command (the active keeps serving: the standby is the
    luxury); it is logged and counted, and once Redis answers again the whole table is
    published at once (`reset`, when the publisher `needs_reset`), so the standby cannot
    miss what happened meanwhile.
    """

    def __init__(
        self,
        local: SqliteStore,
        publisher: Publisher,
        active: Callable[[], bool],
        stats: Callable[[str], None],
    ) -> None:
        self.local = local
        self.publisher = publisher
        self.active = active
        self.count = stats
        self._failing = False

    def put(self, call: Call, quiet_since: float | None) -> None:
        self.local.put(call, quiet_since)
        if self.active():
            record = encode(call, quiet_since, self.local.wall_offset)
            self._publish(lambda: self.publisher.put(record))

    def delete(self, call_id: str) -> None:
        self.local.delete(call_id)
        if self.active():
            self._publish(lambda: self.publisher.delete(call_id))

    def set_quiet(self, call_id: str, quiet_since: float | None) -> None:
        # Not replicated: a promoted standby checks every call against its kernel anyway.
        self.local.set_quiet(call_id, quiet_since)

    def load(self) -> list[StoredCall]:
        return self.local.load()

    def publish_all(self) -> None:
        """The whole table to Redis (after it missed changes, or on promotion)."""
        offset = self.local.wall_offset
        records = [encode(s.call, s.quiet_since, offset) for s in self.local.load()]
        self.publisher.reset(records)
        log.info("replication: published the whole table (%d calls)", len(records))

    def check(self, calls: int) -> None:
        """Active: republish everything if Redis missed changes or lost its table. The
        quick size query first (short timeout): a hung Redis costs that, not a reset's."""
        try:
            size = self.publisher.size()
            if not self.publisher.needs_reset and size != calls:
                log.warning("replication: Redis holds a different table; republishing")
                self.publisher.needs_reset = True
            if self.publisher.needs_reset:
                self.publish_all()
            self._failing = False
        except ReplicationError as error:
            self._failed(error)

    def _publish(self, write: Callable[[], None]) -> None:
        """One change to Redis, unless Redis needs the whole table anyway: then the next
        `check` (within CONSISTENCY_INTERVAL) publishes it. Never on a command's path: a
        hung Redis would hold every command for the reset's timeout."""
        if self.publisher.needs_reset:
            self.count("replication.deferred")
            return
        try:
            write()
            self._failing = False
        except ReplicationError as error:
            self._failed(error)

    def _failed(self, error: ReplicationError) -> None:
        self.count("error.replication")
        if not self._failing:  # once per outage, not per change
            log.error("replication: %s; the standby is behind until Redis answers", error)
        self._failing = True


class Following:
    """The standby's reader: a worker thread that waits for this node's Redis to be in
    sync with the active's, loads the whole table, then follows the change stream, and
    hands everything to the event loop (the engine is not thread-safe)."""

    def __init__(
        self,
        follower: Follower,
        apply_all: Callable[[dict[str, StoredCall]], None],
        apply: Callable[[list[tuple[str, StoredCall | None]]], None],
        wall_offset: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.follower = follower
        self.apply_all = apply_all
        self.apply = apply
        self.offset = wall_offset
        self.loop = loop
        self._stop = threading.Event()
        self.resync = threading.Event()  # set by the loop when applying failed
        self._thread: threading.Thread | None = None
        self.loaded = False  # a whole table was loaded since following started

    def start(self) -> None:
        self.loaded = False
        self._stop = threading.Event()  # a thread still ending keeps its own
        self._thread = threading.Thread(target=self._run, name="lrkp-follow", daemon=True)
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

    def _run(self) -> None:
        stop = self._stop
        while not stop.is_set():
            try:
                self._follow_once(stop)
            except ReplicationGap as gap:
                log.warning("following: reloading the active's table (%s)", gap)
            except (LrkpError, OSError) as error:
                log.error("following the active node: %s (retrying)", error)
                stop.wait(1.0)

    def _follow_once(self, stop: threading.Event) -> None:
        waiting = time.monotonic()
        warned = waiting
        while not self.follower.synced():
            if stop.wait(0.05):
                return
            if time.monotonic() - warned >= NOT_SYNCED_WARNING:
                warned = time.monotonic()
                log.warning(
                    "following: this node's Redis has not been in sync with the active's "
                    "for %.0f s (is the peer's redis-server reachable, at its real address?)",
                    warned - waiting,
                )
        last, table = self.follower.snapshot()
        records = {call_id: self._decode(record) for call_id, record in table.items()}
        self.loop.call_soon_threadsafe(
            self.apply_all, {k: v for k, v in records.items() if v is not None}
        )
        self.loaded = True
        self.resync.clear()
        while not stop.is_set() and not self.resync.is_set():
            # Raises ReplicationGap when the table must be loaded again (a full resync of
            # this Redis, a stream trimmed past what was read).
            changes = self.follower.changes(last, FOLLOW_BLOCK_MS, FOLLOW_BATCH)
            if not changes:
                continue
            last = changes[-1].stream_id
            if any(change.op == "reset" for change in changes):
                return  # the active published its whole table: reload it
            batch = [(c.call_id, self._change(c)) for c in changes if c.call_id is not None]
            self.loop.call_soon_threadsafe(self.apply, batch)

    def _change(self, change: Change) -> StoredCall | None:
        return None if change.op == "del" or change.record is None else self._decode(change.record)

    def _decode(self, record: dict[str, object]) -> StoredCall | None:
        try:
            return decode(record, self.offset)
        except (MediaError, ValueError, KeyError) as error:
            log.error("following: a record cannot be read, skipped: %s", error)
            return None


class RoleWatch:
    """Active while this namespace holds both relay VIPs; acts on every change of role."""

    def __init__(
        self,
        vips: tuple[IPv4Address, ...],
        engine: Engine,
        store: ReplicatedStore,
        following: Following,
        peer_redis: str,
    ) -> None:
        self.vips = vips
        self.engine = engine
        self.store = store
        self.following = following
        self.peer_redis = peer_redis
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
            self.store.check(len(self.engine.table))

    def _become_active(self) -> None:
        now = time.monotonic()
        followed = self.following.loaded
        self.following.stop()
        try:
            self.store.publisher.promote()
            # A standby that followed holds what its Redis holds: nothing to publish.
            # One that never loaded the active's table (first start) publishes its own.
            self.store.publisher.needs_reset = not followed
        except ReplicationError as error:
            log.error("promoting this node's Redis failed: %s", error)
        self.engine.promote(now)
        self.changes += 1
        self._next_check = 0.0

    def _become_standby(self) -> None:
        self.engine.demote(time.monotonic())
        try:
            self.following.follower.follow(self.peer_redis)
        except ReplicationError as error:
            log.error("making this node's Redis a replica of %s failed: %s", self.peer_redis, error)
        self.following.start()
        self.changes += 1
