"""The active node's changes into its Redis, on the event loop, never waiting. An adapter.

Nothing here waits for Redis. The event loop queues a change (`put`, `delete`, `quiet`: a
few µs, after the state store committed it); once per loop turn every queued change goes
out as one MULTI/EXEC, written to a non-blocking socket; the replies are read every
WATCH_INTERVAL (and at once while a reply is awaited), so they wake nothing: the cost of a
change is encoding it, and of a loop turn with changes one `send`. A frozen Redis only
makes the replies late and the unsent bytes grow. Why not a worker thread: the handoffs
alone (waking it, Python's lock passing between the two) cost the node ~200 µs of CPU per
`S`+`D`, as much again as the node's own work (bench/control_clients.py --pair, with the
writes disabled).

Failures: no reply within `timeout`, an error reply, a lost connection, more than
`max_queued` changes waiting or MAX_BUFFER bytes unsent. Then the connection is dropped, so
is what was queued (the state store has it), and a recovery task reconnects every
`retry_interval`, makes Redis a master, reads the whole table from the state store (in a
worker thread: SQLite builds the JSON, store.py), writes it into a key of its own a chunk
at a time, each answered before the next (neither Redis nor the loop is busy for long),
and switches it in with the reset entry in one transaction; changes made meanwhile are
kept and written after it. The same reset runs on promotion, and when Redis holds a
different number of calls than the node (`check`: a Redis restarted empty). A change both
in the table read and written after it changes nothing: each sets or deletes one field
(replication.py).

Roles: `master()` when the node takes the VIPs; `standby()` when it loses them: the
connection is dropped at once, so nothing more is written, and the follower makes Redis a
replica of the peer's, which discards whatever was still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.connection import parse_url

from lrkp_tsl.errors import StoreError
from lrkp_tsl.pairhealth import PublishState
from lrkp_tsl.replication import (
    CALLS,
    MAXLEN,
    Delete,
    Op,
    Put,
    Quiet,
    ReplicationError,
    ReplyError,
    change_bytes,
    pack,
    parse,
    redacted,
    reset_fill_commands,
    reset_switch_commands,
    transaction_failure,
    trim,
)

log = logging.getLogger("lrkp_tsl.pair")

MAX_QUEUED = 20_000
"""Changes waiting for Redis at most; past this the whole table is republished instead."""
MAX_BUFFER = 16 << 20
"""Bytes written but not yet taken by Redis at most (a frozen Redis)."""
TIMEOUT = 1.0
"""A change Redis has not answered within this long means Redis failed."""
RESET_TIMEOUT = 10.0
"""The same for a reset (0.4 s of Redis time at 50k calls)."""
RETRY_INTERVAL = 1.0
"""How often the recovery tries again to reach a Redis that failed."""
WATCH_INTERVAL = 0.1
FLUSH_DELAY = 0.002
"""Queued changes go out this long after the first of them: under load one transaction
then carries the changes of several commands (one `send`, one wake-up of Redis, instead of
one per loop turn); the standby is that much later, against a takeover gap of ~0.3 s."""
MULTI = pack(("MULTI",))
EXEC = pack(("EXEC",))
RESET_CHUNK_RECORDS = 500
"""Records per command of a reset: a few ms of Redis's time, and of the event loop's."""


@dataclass(slots=True)
class _Sent:
    """A batch written to Redis, waiting for its replies (they come in order)."""

    replies: int
    changes: int
    at: float
    timeout: float
    what: str
    transaction: bool = True
    check: int | None = None  # a size check: the calls Redis must hold
    done: asyncio.Future[list[object]] | None = None
    got: list[object] = field(default_factory=list)


class _Connection:
    """A non-blocking socket to Redis, read when asked (`read`, or while `listen`ing):
    replies to writes nobody awaits wake nothing."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_reply: Callable[[_Connection, object], None],
        on_lost: Callable[[_Connection, str], None],
    ) -> None:
        self.sock = sock
        self.loop = loop
        self.on_reply = on_reply
        self.on_lost = on_lost
        self.out = bytearray()
        self.buffer = bytearray()
        self.listening = False
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._lose(f"{type(error).__name__}: {error}")
            return
        if sent < len(data):
            self.out += data[sent:]
            self.loop.add_writer(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as error:
            self._lose(f"{type(error).__name__}: {error}")
            return
        del self.out[:sent]
        if not self.out:
            self.loop.remove_writer(self.sock.fileno())

    def read(self) -> None:
        """Every reply that has arrived, to `on_reply`, in order."""
        while not self.closed:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as error:
                self._lose(f"{type(error).__name__}: {error}")
                return
            if not chunk:
                self._lose("Redis closed the connection")
                return
            self.buffer += chunk
        at = 0
        try:
            while not self.closed and (parsed := parse(self.buffer, at)) is not None:
                reply, at = parsed
                self.on_reply(self, reply)
        except (ReplyError, ValueError) as error:
            self._lose(str(error))
            return
        del self.buffer[:at]

    def listen(self, on: bool) -> None:
        """Read replies as they arrive (while a reply is awaited), or only when asked."""
        if on != self.listening and not self.closed:
            self.listening = on
            if on:
                self.loop.add_reader(self.sock.fileno(), self.read)
            else:
                self.loop.remove_reader(self.sock.fileno())

    def close(self, flush: bool = False) -> None:
        if self.closed:
            return
        if flush and self.out:  # at exit: what is still unsent, briefly blocking
            with contextlib.suppress(OSError):
                self.sock.settimeout(0.2)
                self.sock.sendall(self.out)
        self.listen(False)
        if self.out:
            self.loop.remove_writer(self.sock.fileno())
        self.closed = True
        self.sock.close()

    def _lose(self, reason: str) -> None:
        self.close()
        self.on_lost(self, reason)


_Change = tuple[str, Any, Any]  # ("put", call, quiet) | ("del", call_id, None) | ("quiet", id, t)


class Publishing:
    """Writes the active node's changes to its Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        read_table: Callable[[], list[tuple[str, str]]],
        wall_offset: float,
        *,
        max_queued: int = MAX_QUEUED,
        timeout: float = TIMEOUT,
        reset_timeout: float = RESET_TIMEOUT,
        retry_interval: float = RETRY_INTERVAL,
        maxlen: int = MAXLEN,
    ) -> None:
        self.where = redacted(url)
        self.params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.read_table = read_table
        self.offset = wall_offset
        self.max_queued = max_queued
        self.timeout = timeout
        self.reset_timeout = reset_timeout
        self.retry_interval = retry_interval
        self._trim = trim(maxlen)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: _Connection | None = None
        self._waiting = 0  # replies awaited (recovery): read as they arrive meanwhile
        self._batching = 0
        self._pending: list[_Change] = []
        self._sent: deque[_Sent] = deque()
        self._flush_soon = False
        self._master = False
        self._ready = False  # master, and Redis holds the whole table: changes go out
        self._collecting = False  # a reset's table is being read: keep changes for after it
        self._recovery: asyncio.Task[None] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._error: str | None = None
        self._written = 0
        self._resets = 0
        self._dropped = 0

    # -- the event loop's side ---------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch = self._loop.call_later(WATCH_INTERVAL, self._watchdog)

    def close(self) -> None:
        """At exit: what is queued is written (into the socket), then the connection closed."""
        if self._watch is not None:
            self._watch.cancel()
        if self._recovery is not None:
            self._recovery.cancel()
        self._flush()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close(flush=True)

    def put(self, record: dict[str, object]) -> None:
        """A call's record (`records.encode`, with this publisher's `wall_offset`)."""
        self._change(("put", record, None))

    def delete(self, call_id: str) -> None:
        self._change(("del", call_id, None))

    def quiet(self, call_id: str, since: float | None) -> None:
        self._change(("quiet", call_id, since))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Changes queued inside go out together when it ends (not one loop turn later):
        a group commit's changes, in one transaction, without an extra loop turn."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching:
                self._flush_later()

    def master(self) -> None:
        """The node took the VIPs: make this Redis a master and publish the whole table."""
        self._master, self._ready = True, False
        self._recover_soon()

    def standby(self) -> threading.Event:
        """The node lost the VIPs: write nothing more (the connection is dropped now). The
        event, for the follower's thread, is set at once."""
        self._master = self._ready = self._collecting = False
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None
        self._pending.clear()
        self._drop_connection()
        self._error = None
        stopped = threading.Event()
        stopped.set()
        return stopped

    def check(self, calls: int) -> None:
        """Compare the size of the table in Redis with `calls` (the node's, now), after
        every change queued before: a difference means Redis lost or missed changes."""
        if not self._ready or self._connection is None:
            return
        self._flush()
        self._write([("HLEN", CALLS)], _Sent(1, 0, time.monotonic(), self.timeout,
                    "size of the call table", transaction=False, check=calls))  # fmt: skip

    def state(self) -> PublishState:
        return PublishState(
            self._master,
            self._ready,
            self._error,
            len(self._pending),
            self._written,
            self._resets,
            self._dropped,
        )

    # -- changes -------------------------------------------------------------------------------

    def _change(self, change: _Change) -> None:
        if not self._master or not (self._ready or self._collecting):
            return  # no Redis in step: the next reset's table read holds this change
        if len(self._pending) >= self.max_queued:
            self._dropped += 1
            self._fail(f"{self.max_queued} changes waited for Redis at once")
            return
        self._pending.append(change)
        if not self._batching:
            self._flush_later()

    def _flush_later(self) -> None:
        """Within FLUSH_DELAY: the changes of the next few commands go along."""
        if not self._flush_soon and self._ready and self._pending:
            self._flush_soon = True
            assert self._loop is not None
            self._loop.call_later(FLUSH_DELAY, self._flush)

    def _op(self, change: _Change) -> Op:
        kind, subject, value = change
        if kind == "put":
            return Put(subject)
        if kind == "del":
            return Delete(subject)
        return Quiet(subject, None if value is None else value + self.offset)

    def _flush(self) -> None:
        """Every queued change, in one transaction (once per loop turn)."""
        self._flush_soon = False
        if not self._ready or not self._pending or self._connection is None:
            return
        changes, self._pending = self._pending, []
        ops = [self._op(change) for change in changes]
        data = b"".join([MULTI, *(change_bytes(op, self._trim) for op in ops), EXEC])
        replies = 2 + sum(3 if isinstance(op, Put | Delete) else 2 for op in ops)
        what = f"{len(ops)} changes" if len(ops) > 1 else "a change"
        self._send(data, _Sent(replies, len(ops), time.monotonic(), self.timeout, what))

    def _write(self, commands: Sequence[Sequence[object]], sent: _Sent) -> None:
        self._send(b"".join(pack(command) for command in commands), sent)

    def _send(self, data: bytes, sent: _Sent) -> None:
        connection = self._connection
        if connection is None:
            return
        self._sent.append(sent)
        connection.write(data)
        if len(connection.out) > MAX_BUFFER:
            self._fail(f"Redis takes nothing ({MAX_BUFFER >> 20} MiB unsent)")

    # -- replies -------------------------------------------------------------------------------

    def _reply(self, connection: _Connection, reply: object) -> None:
        if connection is not self._connection:
            return
        if not self._sent:
            self._fail(f"a reply nobody asked for: {reply!r}")
            return
        sent = self._sent[0]
        sent.got.append(reply)
        if len(sent.got) < sent.replies:
            return
        self._sent.popleft()
        failure = (
            transaction_failure(sent.got)
            if sent.transaction
            else next((r for r in sent.got if isinstance(r, ReplyError)), None)
        )
        if failure is not None:
            if sent.done is not None and not sent.done.done():
                sent.done.set_exception(ReplicationError(f"{sent.what} failed ({failure})"))
            self._fail(f"{sent.what} failed ({failure})")
            return
        self._written += sent.changes
        if sent.done is not None and not sent.done.done():
            sent.done.set_result(sent.got)
        if sent.check is not None and sent.got[0] != sent.check:
            log.warning(
                "replication: this node's Redis holds %s calls, the node %d (Redis restarted "
                "or missed changes); republishing the whole table",
                sent.got[0],
                sent.check,
            )
            self._ready = False
            self._recover_soon()

    def _lost(self, connection: _Connection, reason: str) -> None:
        if connection is self._connection:
            self._fail(f"connection lost ({reason})")

    def _watchdog(self) -> None:
        assert self._loop is not None
        self._watch = self._loop.call_later(WATCH_INTERVAL, self._watchdog)
        if self._connection is not None and self._sent:
            self._connection.read()
        if self._sent:
            oldest = self._sent[0]
            if time.monotonic() - oldest.at > oldest.timeout:
                self._fail(f"{oldest.what}: no answer within {oldest.timeout:g} s")

    # -- failures and recovery -----------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self._error is None:  # once per outage; the pair's health reminds while it lasts
            log.error(
                "replication: Redis %s: %s; the standby misses changes until it answers "
                "(the whole table is republished then)",
                self.where,
                reason,
            )
        self._error = reason
        self._ready = False
        self._collecting = False
        self._pending.clear()
        self._drop_connection()
        self._recover_soon()

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        for sent in self._sent:
            if sent.done is not None and not sent.done.done():
                sent.done.set_exception(ReplicationError("connection dropped"))
        self._sent.clear()

    def _recover_soon(self) -> None:
        if not self._master or (self._recovery is not None and not self._recovery.done()):
            return
        assert self._loop is not None
        self._recovery = self._loop.create_task(self._recover())

    async def _recover(self) -> None:
        """Until Redis is a master holding the whole table (one reset), every retry_interval."""
        first = True
        while self._master and not self._ready:
            if not first:
                await asyncio.sleep(self.retry_interval)
            first = False
            try:
                await self._reset()
            except (ReplicationError, StoreError, OSError) as error:
                reason = error.reason if isinstance(error, ReplicationError | StoreError) else (
                    f"{type(error).__name__}: {error}")  # fmt: skip
                if self._error is None:
                    log.error("replication: Redis %s: %s (retrying every %g s)", self.where,
                              reason, self.retry_interval)  # fmt: skip
                self._error = reason
                self._collecting = False
                self._pending.clear()
                self._drop_connection()

    async def _reset(self) -> None:
        await self._connect()
        # Every time, not only on promotion (a no-op on a master): a Redis made a replica
        # behind the node's back (the follower's last REPLICAOF racing a takeover, an
        # operator) refuses every write until it is a master again.
        await self._command(("REPLICAOF", "NO", "ONE"), "REPLICAOF NO ONE")
        self._pending.clear()
        self._collecting = True  # changes from now on are written after the reset
        assert self._loop is not None
        started = time.monotonic()
        records = await self._loop.run_in_executor(None, self.read_table)
        read = time.monotonic()
        # The table into a key of its own, a chunk at a time, each answered before the next
        # (Redis is never busy long, nor is the loop), then switched in one transaction.
        for command in reset_fill_commands(records, RESET_CHUNK_RECORDS):
            await self._command(command, f"reset with {len(records)} calls", self.reset_timeout)
        switch = [("MULTI",), *reset_switch_commands(bool(records), self._trim), ("EXEC",)]
        assert self._loop is not None
        done: asyncio.Future[list[object]] = self._loop.create_future()
        self._write(switch, _Sent(len(switch), 0, time.monotonic(), self.timeout,
                                  f"reset with {len(records)} calls", done=done))  # fmt: skip
        await self._awaited(done)
        recovered = self._error is not None
        self._error = None
        self._resets += 1
        self._ready, self._collecting = True, False
        log.info(
            "replication: %spublished the whole table (%d calls; read in %.3f s, written in "
            "%.3f s)",
            "this node's Redis answers again: " if recovered else "",
            len(records),
            read - started,
            time.monotonic() - read,
        )
        self._flush()

    async def _connect(self) -> None:
        if self._connection is not None:
            return
        assert self._loop is not None
        path = self.params.get("path")
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = str(path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = (str(self.params["host"]), int(self.params.get("port") or 6379))
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self._loop.sock_connect(sock, address), self.timeout)
        except TimeoutError:
            sock.close()
            raise ReplicationError(f"connecting: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            sock.close()
            raise ReplicationError(f"connecting ({type(exc).__name__}: {exc})") from None
        self._connection = _Connection(sock, self._loop, self._reply, self._lost)
        if self.params.get("password") is not None:
            user = self.params.get("username")
            await self._command(("AUTH", *([user] if user else []), self.params["password"]),
                                "AUTH")  # fmt: skip
        if self.params.get("db"):
            await self._command(("SELECT", self.params["db"]), "SELECT")

    async def _command(
        self, command: Sequence[object], what: str, timeout: float | None = None
    ) -> list[object]:
        assert self._loop is not None
        done: asyncio.Future[list[object]] = self._loop.create_future()
        if self._connection is None:
            raise ReplicationError(f"{what}: not connected")
        self._write([command], _Sent(1, 0, time.monotonic(), timeout or self.timeout, what,
                                     transaction=False, done=done))  # fmt: skip
        return await self._awaited(done)

    async def _awaited(self, done: asyncio.Future[list[object]]) -> list[object]:
        """Its replies, read as they arrive meanwhile."""
        self._waiting += 1
        if self._connection is not None:
            self._connection.listen(True)
        try:
            return await done
        finally:
            self._waiting -= 1
            if self._waiting == 0 and self._connection is not None:
                self._connection.listen(False)
