"""The active node's changes into its Redis, off the event loop. An adapter (a thread).

Why a thread: every Redis call may wait (a frozen Redis: until its timeout; one restarted
empty: a republish of the whole table, 0.4 s of Redis time at 50k calls). On the event
loop that wait was every command's: before this module, one `S` took 1.3 s while Redis was
stopped for 0.2 s at 15,000 calls. Here the event loop only appends to a queue (`put`,
`delete`, `quiet`: a few µs, never a wait); the worker writes what it finds, in order, in
batches of up to BATCH changes per transaction.

Bounded: at most MAX_QUEUED changes wait. Beyond that (Redis stalled at a high rate), a
change is not queued and the worker republishes the whole table instead, read from the
state store on a SQLite connection of its own (every change is committed to the store
before it is queued, so that read holds every change that was dropped). The same reset
runs after any failed write (Redis may hold some of a batch or none of it), when Redis
holds a different number of calls than the node (`check`: a Redis restarted empty), and
on promotion. Changes queued before a reset are written again after it: each sets or
deletes one field (replication.py), so that changes nothing.

Role commands on this node's Redis go through the same queue, so they are ordered with the
writes: `master` (REPLICAOF NO ONE, then a reset) when the node takes the VIPs, `standby`
(stop writing) when it loses them. The follower (pair.py) makes Redis a replica of the
peer's only once the worker has stopped writing (the event `standby` returns), so the two
threads never give this Redis contradicting orders.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lrkp_tsl.errors import StoreError
from lrkp_tsl.pairhealth import PublishState
from lrkp_tsl.records import encode
from lrkp_tsl.replication import Delete, Op, Publisher, Put, Quiet, ReplicationError
from lrkp_tsl.session import Call

log = logging.getLogger("lrkp_tsl.pair")

MAX_QUEUED = 20_000
"""Changes waiting for Redis at most; past this the worker republishes the whole table."""
BATCH = 256
"""Changes per Redis transaction at most."""
RETRY_INTERVAL = 1.0
"""How often the worker tries again to reach a Redis that failed."""
IDLE_WAKE = 1.0
"""The worker looks at its state this often when nothing is queued."""
LINGER = 0.002
"""After the first change, the worker waits this long for more to write with it: under
load one transaction then carries several changes (a write costs the node ~100 µs of CPU
alone, ~25 µs per change in a batch of 8, mostly the system calls); the standby is that
much later, against a takeover gap of ~0.3 s."""


@dataclass(frozen=True, slots=True)
class _Put:
    call: Call
    quiet_since: float | None


@dataclass(frozen=True, slots=True)
class _Delete:
    call_id: str


@dataclass(frozen=True, slots=True)
class _Quiet:
    call_id: str
    since: float | None


@dataclass(frozen=True, slots=True)
class _Master:
    pass


@dataclass(frozen=True, slots=True)
class _Standby:
    stopped: threading.Event


@dataclass(frozen=True, slots=True)
class _Check:
    calls: int


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


_Item = _Put | _Delete | _Quiet | _Master | _Standby | _Check | _Stop


class Publishing:
    """The worker thread that writes the active node's changes to its Redis."""

    def __init__(
        self,
        publisher: Publisher,
        read_table: Callable[[], list[tuple[str, str]]],
        wall_offset: float,
        *,
        max_queued: int = MAX_QUEUED,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self.publisher = publisher
        self.read_table = read_table
        self.offset = wall_offset
        self.max_queued = max_queued
        self.retry_interval = retry_interval
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._dropped = 0  # by the event loop; the worker compares with what it has seen
        self._dropped_seen = 0
        # The worker's own state (only it writes these).
        self._master = False
        self._promoted = False
        self._broken = True  # Redis may lack changes: republish before writing any
        self._retry_at = 0.0
        self._error: str | None = None
        self._written = 0
        self._resets = 0
        self._thread: threading.Thread | None = None

    # -- the event loop's side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lrkp-publish", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """At exit: the worker writes what is queued (bounded by Redis's timeouts), then ends."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_Stop())
            thread.join(timeout=5.0)

    def put(self, call: Call, quiet_since: float | None) -> None:
        self._change(_Put(call, quiet_since))

    def delete(self, call_id: str) -> None:
        self._change(_Delete(call_id))

    def quiet(self, call_id: str, since: float | None) -> None:
        self._change(_Quiet(call_id, since))

    def master(self) -> None:
        """The node took the VIPs: make this Redis a master and publish the whole table."""
        self._queue.put(_Master())

    def standby(self) -> threading.Event:
        """The node lost the VIPs: stop writing. The event is set once the worker has."""
        stopped = threading.Event()
        self._queue.put(_Standby(stopped))
        return stopped

    def check(self, calls: int) -> None:
        """Compare the size of the table in Redis with `calls` (the node's, now), once every
        change before this is written: a difference means Redis lost or missed changes."""
        self._queue.put(_Check(calls))

    def state(self) -> PublishState:
        return PublishState(
            self._master,
            self._master and self._promoted and not self._broken,
            self._error,
            self._queue.qsize(),
            self._written,
            self._resets,
            self._dropped,
        )

    def _change(self, item: _Put | _Delete | _Quiet) -> None:
        if self._queue.qsize() >= self.max_queued:
            self._dropped += 1  # the worker republishes the table, which holds this change
            return
        self._queue.put(item)

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        pending: list[Op] = []
        while True:
            items = self._take()
            for item in items:
                if isinstance(item, _Put | _Delete | _Quiet):
                    if self._master and not self._broken:
                        pending.append(self._op(item))
                        if len(pending) >= BATCH:
                            self._write(pending)
                    continue  # else covered by the next reset
                self._write(pending)
                if isinstance(item, _Stop):
                    return
                if isinstance(item, _Master):
                    self._master, self._promoted, self._broken = True, False, True
                    self._retry_at = 0.0
                elif isinstance(item, _Standby):
                    self._master = False
                    self._error = None
                    item.stopped.set()
                else:
                    self._check(item.calls)
            self._write(pending)
            if self._dropped != self._dropped_seen and self._master and not self._broken:
                log.warning(
                    "replication: %d changes waited for Redis at once; republishing the "
                    "whole table instead",
                    self.max_queued,
                )
                self._broken = True
            recovering = self._master and (self._broken or not self._promoted)
            if recovering and time.monotonic() >= self._retry_at:
                self._recover()

    def _take(self) -> list[_Item]:
        """What is queued (waiting for the first item at most until the next retry)."""
        if self._master and (self._broken or not self._promoted):
            wait = max(0.0, self._retry_at - time.monotonic())
        else:
            wait = IDLE_WAKE
        try:
            items = [self._queue.get(timeout=wait)]
        except queue.Empty:
            return []
        if self._master and not self._broken and self._queue.qsize() < BATCH:
            time.sleep(LINGER)
        while len(items) < BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _op(self, item: _Put | _Delete | _Quiet) -> Op:
        if isinstance(item, _Put):
            return Put(encode(item.call, item.quiet_since, self.offset))
        if isinstance(item, _Delete):
            return Delete(item.call_id)
        return Quiet(item.call_id, None if item.since is None else item.since + self.offset)

    def _write(self, pending: list[Op]) -> None:
        if not pending:
            return
        try:
            self.publisher.write(pending)
            self._written += len(pending)
        except ReplicationError as error:
            self._failed(error)
        finally:
            pending.clear()

    def _check(self, calls: int) -> None:
        if not self._master or self._broken:
            return
        try:
            held = self.publisher.size()
        except ReplicationError as error:
            self._failed(error)
            return
        if held != calls:
            log.warning(
                "replication: this node's Redis holds %d calls, the node %d (Redis restarted "
                "or missed changes); republishing the whole table",
                held,
                calls,
            )
            self._broken = True

    def _recover(self) -> None:
        """Make Redis a master holding the whole table; on failure, again after a while."""
        seen = self._dropped
        try:
            if not self._promoted:
                self.publisher.promote()
                self._promoted = True
            started = time.monotonic()
            records = self.read_table()
            read = time.monotonic()
            self.publisher.reset_encoded(records)
        except (ReplicationError, StoreError) as error:
            self._failed(error)
            return
        self._dropped_seen = seen
        self._broken = False
        self._resets += 1
        recovered = self._error is not None
        self._error = None
        log.info(
            "replication: %spublished the whole table (%d calls; read in %.3f s, written in "
            "%.3f s)",
            "this node's Redis answers again: " if recovered else "",
            len(records),
            read - started,
            time.monotonic() - read,
        )

    def _failed(self, error: ReplicationError | StoreError) -> None:
        self._broken = True
        self._retry_at = time.monotonic() + self.retry_interval
        if self._error is None:  # once per outage; the pair's health reminds while it lasts
            log.error(
                "replication: %s; the standby misses changes until this node's Redis "
                "answers (retrying every %g s)",
                error.reason,
                self.retry_interval,
            )
        self._error = error.reason
