"""The replication feed of an active/standby pair, through Redis. An adapter (sockets).

The active node writes every change of its call table to its local Redis; that Redis is
the master, and the standby's local Redis is its replica (`REPLICAOF`), so Redis carries
the feed between the nodes: no protocol of our own. The standby node reads its local
replica. On takeover the new active promotes its Redis (`REPLICAOF NO ONE`,
`Publisher.promote`); a returning node makes its Redis a replica of the new active's
(`Follower.follow`), which makes Redis resynchronise it fully. The pure engine never
imports this module.

Keys (records are `lrkp_tsl.records.encode` dicts, serialised as compact JSON):

    lrkp:calls     hash: field = Call-ID, value = the call's record. The current table.
    lrkp:calls:new hash: a whole table being written by the active node's publisher, a
                   chunk at a time, then renamed to lrkp:calls with the reset entry
                   (`reset_fill_commands`, `reset_switch_commands`).
    lrkp:quiet     hash: field = Call-ID, value = JSON: when the call went quiet (wall-clock
                   seconds) or null (it has media), if that changed since its record was
                   written; it overrides the record's `quiet_since`.
    lrkp:changes   stream (XADD ... MAXLEN ~ 100000): one entry per change, fields
                   op=put id=<Call-ID> rec=<record>   a call was added or changed
                   op=del id=<Call-ID>                a call ended
                   op=quiet id=<Call-ID> q=<JSON>     its media went quiet (q: since when)
                                                      or live again (q: null)
                   op=reset                           the hashes were replaced as a whole
    lrkp:standby   string (expires): what the standby node last said about itself (JSON:
                   in sync or not, why, lag, calls), written by the standby into the
                   active's Redis, so that the active shows whether a standby follows it.
    lrkp:active    string (expires): the active node says it is active (JSON: its node
                   id), in its own Redis; an active node that finds another node's in the
                   peer's Redis, a master, knows both nodes are active (split brain).

Every change is written in a MULTI/EXEC transaction (HSET or HDEL or DEL+HSET, then XADD;
`Publisher.write` puts a batch of changes in one), so the hashes and the stream never
disagree, on the master or on a replica: Redis propagates a transaction to its replicas
wrapped in MULTI/EXEC and applies it there atomically. Each change sets or deletes one
field (last writer wins), so replaying changes on a state that already holds some of them
gives the same table: a reset may overlap the changes queued after it.

Why a stream *and* a hash: the hash alone is the state but says nothing about what changed
(a follower would have to diff 50k records); the stream alone is the changes but grows
without end, and a follower that starts (or falls behind) would need all of it. Together a
follower loads the hash once, then applies the stream from the ID it loaded at.

A consistent snapshot on a replica (`Follower.snapshot`): MULTI, XREVRANGE COUNT 1 (the
last stream ID), HGETALL of both hashes, INFO replication, EXEC. Redis runs client commands and the
master's replication stream on one thread, and runs both the master's transactions and
ours whole, so the snapshot shows the state after some transaction of the master and the
last stream ID is exactly that transaction's entry: applying every entry after it gives
the master's table, with nothing missing or applied twice.

The follower must reload the snapshot (`ReplicationGap`, raised by `Follower.changes`) when:
- the stream was trimmed past what it has read. XREAD from an ID older than the first
  entry gives no error, it just starts at the first entry left: `changes` checks, after
  every XREAD, XINFO STREAM's `first-entry` against the follower's ID, and whether anything
  was ever trimmed (`entries-added` > `length`; the publisher never XDELs). Conservative:
  a follower whose last entry was just trimmed but not the next one reloads needlessly
  (it is ~100,000 entries behind then, minutes at any real rate); a real gap is never missed;
- the stream vanished, or went back (its last ID is below the follower's): another history;
- the replica's `master_replid` is not the one the snapshot was taken under: Redis
  replaced the replica's data (a full resynchronisation, e.g. after the pair swapped
  roles). Redis 7.0 does not wake a blocked XREAD for that: it stays blocked through the
  reload, and its ID may still look valid in the new history; the check after it (at the
  latest when `block_ms` runs out) catches it. (A *master* turned replica by REPLICAOF
  does end its blocked XREADs, with the error `UNBLOCKED force unblock from blocking
  operation, instance state changed`.) `Follower.replication_id` gives the ID to callers.

What a takeover loses: Redis replication is asynchronous. The master answers EXEC before
the transaction reaches the replica, so the changes of the active's last moments are not
on the standby when the active dies: its replication lag, from the end of `put` to a
Follower on the replica returning the change, was p50 0.3 ms, p99 0.5 ms at 500 puts/s on
the lab's veth links (tests/netns/test_replication.py). `WAIT 1 <ms>` after each change
would make the active wait for the replica's acknowledgement (one round trip to the peer,
on the event loop); this module does not do it.

A Redis that restarted is empty (pair mode runs it without persistence): the publisher
notices it as an error on its next write (connections are never retried silently), and
the caller must then `reset` with its whole table, which `Publisher.needs_reset` records.
A follower whose master lost its data sees an empty snapshot (last ID 0-0) until that reset
arrives; a caller that would rather not drop its calls meanwhile can wait for the reset.

Every call is a few round trips on a short socket timeout, and every one may wait that
long: call them from worker threads, never from the node's event loop (publishing.py runs
the publisher, pair.py the follower and the health probes). Errors of every kind become
`ReplicationError`, naming the Redis and what failed.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from lrkp_tsl.errors import LrkpError

CALLS = "lrkp:calls"
CALLS_NEW = "lrkp:calls:new"
QUIET = "lrkp:quiet"
CHANGES = "lrkp:changes"
STANDBY = "lrkp:standby"
ACTIVE = "lrkp:active"
MAXLEN = 100_000
"""Stream entries kept (approximately, whole radix nodes): ~200 s of changes at 500/s."""
OPS = ("put", "del", "quiet", "reset")
ZERO_ID = "0-0"
"""The stream ID before any entry: what `snapshot` returns for a stream never written."""
RESET_CHUNK = 1000
"""Records per HSET in a reset (one transaction all the same)."""


class ReplicationError(LrkpError):
    """Redis could not take or give a change: unreachable, timed out, read-only, bad data."""

    code = "replication"


class ReplicationGap(ReplicationError):
    """The changes after the follower's ID are no longer all there: reload the snapshot."""

    code = "replication-gap"


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change stream, as a follower reads it."""

    stream_id: str
    op: str  # one of OPS
    call_id: str | None  # put, del, quiet
    record: dict[str, object] | None  # put
    quiet: float | None = None  # quiet: since when (wall-clock), None: live


@dataclass(frozen=True, slots=True)
class Put:
    """Insert or replace a call's record (`records.encode`)."""

    record: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Delete:
    """A call ended."""

    call_id: str


@dataclass(frozen=True, slots=True)
class Quiet:
    """A call's media went quiet (`since`, wall-clock seconds) or live again (None)."""

    call_id: str
    since: float | None


Op = Put | Delete | Quiet


def redacted(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _connect(url: str, timeout: float) -> redis.Redis:
    """A client that fails fast: no silent retry, no backoff, `timeout` on every socket op."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # redis-py 8's Redis() retries ten times with backoff up to 1 s by default (a
            # frozen Redis stalled a 50 ms-timeout ping 4.7 s); from_url happens not to, but
            # say it: one attempt, the caller decides (`needs_reset`).
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            protocol=2,  # the reply shapes parsed here (RESP3 would turn some into maps)
            # No CLIENT SETINFO round trips on connect (Redis 7.0 refuses them anyway).
            driver_info=None,
        )
    except (ValueError, redis.RedisError) as exc:
        raise ReplicationError(f"bad Redis URL {redacted(url)!r}: {exc}") from None
    # INFO as Redis sends it: redis-py's parser turns values that look like numbers into
    # numbers, and a replication ID is 40 hex digits that may all be decimal ones.
    client.set_response_callback("INFO", _raw)
    return client


def _raw(response: object, **options: object) -> object:
    return response


def _peer(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ReplicationError(f"peer URL {redacted(url)!r} is not redis://HOST[:PORT]")
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ReplicationError(f"peer URL {redacted(url)!r}: {exc}") from None
    return parts.hostname, port


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _info(text: str) -> dict[str, str]:
    """INFO's `key:value` lines."""
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            found[key.strip()] = value.strip()
    return found


def _json(text: str, what: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ReplicationError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ReplicationError(f"{what} is not a JSON object")
    return value


def _since(text: str, what: str) -> float | None:
    """A media state (`null`, or wall-clock seconds as JSON)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ReplicationError(f"{what} is not JSON: {exc}") from None
    if value is not None and not isinstance(value, int | float):
        raise ReplicationError(f"{what}: {value!r} is no time")
    return None if value is None else float(value)


class _Client:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.where = redacted(url)
        self.timeout = timeout
        self.redis = _connect(url, timeout)

    def _failed(self, what: str, exc: Exception) -> ReplicationError:
        kind = type(exc).__name__
        reason = f"Redis {self.where}: {what} failed ({kind}: {exc})"
        if isinstance(exc, redis.ReadOnlyError) or str(exc).startswith("READONLY"):
            reason += "; this Redis is a replica: promote it before writing to it"
        return ReplicationError(reason)

    def _command(self, what: str, *args: object) -> Any:
        try:
            return self.redis.execute_command(*args)  # type: ignore[no-untyped-call]
        except (redis.RedisError, OSError) as exc:
            raise self._failed(what, exc) from None

    def _transaction(
        self, what: str, commands: Iterable[tuple[object, ...]], raise_on_error: bool = True
    ) -> list[Any]:
        """`commands` in one MULTI/EXEC; the first failing one raises, unless
        `raise_on_error` is false: then its exception is in the list."""
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for command in commands:
                    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                return pipe.execute(raise_on_error=raise_on_error)
        except (redis.RedisError, OSError) as exc:
            raise self._failed(what, exc) from None

    def close(self) -> None:
        self.redis.close()


class ReplyError(Exception):
    """Redis answered a command with an error reply (`-ERR ...`)."""


class _Wire:
    """A bare RESP2 connection: the publisher's writes, by hand.

    Why not redis-py here: its pipeline costs 60-200 µs of CPU per change (each argument
    packed, each reply read line by line in Python), which in pair mode more than doubled
    the node's CPU per `S`+`D`. Here a batch is one bytes join, one send, and one parse of
    the whole answer. Only what `Publisher.write` needs: AUTH/SELECT from the URL, simple
    replies, no pub/sub, no RESP3. A failure of any kind closes the connection (a reply
    may be half read); the next call opens a new one."""

    def __init__(self, url: str, timeout: float) -> None:
        self.where = redacted(url)
        self.params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._at = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __del__(self) -> None:
        self.close()  # as redis-py's clients do: a forgotten publisher leaks nothing

    def call(self, commands: Sequence[Sequence[object]]) -> list[object]:
        """Send `commands` at once; their replies, in order (a `ReplyError` for each error
        reply). Raises OSError (and closes the connection) if Redis cannot be reached or
        does not answer within `timeout`."""
        try:
            if self._sock is None:
                self._open()
            return self._exchange(commands)
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        path = self.params.get("path")
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(path))
            except BaseException:
                sock.close()
                raise
        else:
            address = (str(self.params["host"]), int(self.params.get("port") or 6379))
            sock = socket.create_connection(address, timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buffer.clear()
        self._at = 0
        hello: list[list[object]] = []
        if self.params.get("password") is not None:
            user = self.params.get("username")
            hello.append(["AUTH", *([user] if user else []), self.params["password"]])
        if self.params.get("db"):
            hello.append(["SELECT", self.params["db"]])
        for reply in self._exchange(hello) if hello else []:
            if isinstance(reply, ReplyError):
                raise ReplyError(f"connecting: {reply}")

    def _exchange(self, commands: Sequence[Sequence[object]]) -> list[object]:
        assert self._sock is not None
        self._sock.sendall(b"".join(pack(command) for command in commands))
        replies: list[object] = []
        try:
            for _ in commands:
                replies.append(self._reply())
        except ConnectionError:
            # Redis says why before it hangs up (NOAUTH: it closes on an unauthenticated
            # client's long command): that is the news, not the closed connection.
            refused = next((r for r in replies if isinstance(r, ReplyError)), None)
            if refused is not None:
                raise refused from None
            raise
        return replies

    def _fill(self) -> None:
        assert self._sock is not None
        if self._at:
            del self._buffer[: self._at]
            self._at = 0
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        self._buffer += chunk

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n", self._at)) < 0:
            self._fill()
        line = bytes(self._buffer[self._at : end])
        self._at = end + 2
        return line

    def _reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buffer) - self._at < size + 2:
                self._fill()
            data = bytes(self._buffer[self._at : self._at + size])
            self._at += size + 2
            return data.decode(errors="replace")
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise ConnectionError(f"not a RESP reply: {line[:40]!r}")


class Publisher(_Client):
    """The active node's side: every change of the call table, into its local Redis.

    Call it from one thread (publishing.py's worker): changes must reach Redis in the order
    they happened. A change that failed with a timeout may still be applied, late, once
    Redis runs again (seen in the tests with a frozen Redis), even after a `reset` that
    followed it on a new connection: the call's next change, or the next reset, puts it
    right.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 0.5,
        *,
        maxlen: int = MAXLEN,
        reset_timeout: float = 10.0,
    ) -> None:
        super().__init__(url, timeout)
        self._wire = _Wire(url, timeout)
        self._trim = trim(maxlen)
        self._reset_timeout = reset_timeout
        self.needs_reset = True
        """True until a `reset` succeeds, and again after any error: Redis may then lack
        changes (unreachable, restarted empty) or hold a failed one, so the caller must
        `reset` with its table."""

    def write(self, ops: Sequence[Op]) -> None:
        """`ops` in order, in one transaction (all or, on an error, maybe none)."""
        if not ops:
            return
        changes = (c for op in ops for c in change_commands(op, self._trim))
        commands = [("MULTI",), *changes, ("EXEC",)]
        what = f"{len(ops)} changes" if len(ops) > 1 else _describe(ops[0])
        try:
            replies = self._wire.call(commands)
        except (OSError, ReplyError) as exc:
            self.needs_reset = True
            raise self._failed(what, exc) from None
        failure = transaction_failure(replies)
        if failure is not None:
            self.needs_reset = True
            raise self._failed(what, failure)

    def close(self) -> None:
        self._wire.close()
        super().close()

    def put(self, record: Mapping[str, object]) -> None:
        """Insert or replace the call's record (`records.encode`)."""
        self.write([Put(record)])

    def delete(self, call_id: str) -> None:
        """Forget the call (no error if unknown)."""
        self.write([Delete(call_id)])

    def reset(self, records: Iterable[Mapping[str, object]]) -> None:
        """Replace the whole table by `records`, and tell followers to reload it.

        One transaction, O(records): 0.4 s for 50k records on the dev VM (the tests), on
        its own connection and timeout (`reset_timeout`). Used on promotion and after an
        error (`needs_reset`). Changes made while it runs (from another thread) may be
        overwritten by it: give it the table as of its call, and nothing concurrently.
        """
        encoded = []
        for record in records:
            call_id = record["call_id"]
            if not isinstance(call_id, str):
                raise ReplicationError(f"record's call_id is not text: {call_id!r}")
            encoded.append((call_id, json.dumps(record, separators=(",", ":"))))
        self.reset_encoded(encoded)

    def reset_encoded(self, records: Sequence[tuple[str, str]]) -> None:
        """`reset` with records already JSON: (Call-ID, record) pairs."""
        commands = reset_commands(records, self._trim)
        bulk = _Client(self.url, self._reset_timeout)
        try:
            try:
                bulk._transaction(f"reset with {len(records)} calls", commands)
            finally:
                bulk.close()
        except ReplicationError:
            self.needs_reset = True
            raise
        self.needs_reset = False

    def promote(self) -> None:
        """Make this Redis a master (REPLICAOF NO ONE); it keeps its data."""
        self._command("REPLICAOF NO ONE", "REPLICAOF", "NO", "ONE")

    def size(self) -> int:
        """How many calls Redis holds (HLEN): the active compares it with its table, so a
        Redis restarted empty is noticed without waiting for the next change."""
        return int(str(self._command("size of the call table", "HLEN", CALLS)))


def trim(maxlen: int = MAXLEN) -> tuple[str, ...]:
    """XADD's approximate trim of the change stream."""
    return ("MAXLEN", "~", str(maxlen))


def change_commands(op: Op, trimmed: Sequence[str]) -> list[tuple[object, ...]]:
    """The commands of one change, hashes first, then its stream entry (module doc)."""
    if isinstance(op, Put):
        call_id = op.record["call_id"]
        if not isinstance(call_id, str):
            raise ReplicationError(f"record's call_id is not text: {call_id!r}")
        rec = json.dumps(op.record, separators=(",", ":"))
        return [
            ("HSET", CALLS, call_id, rec),
            ("HDEL", QUIET, call_id),
            ("XADD", CHANGES, *trimmed, "*", "op", "put", "id", call_id, "rec", rec),
        ]
    if isinstance(op, Delete):
        return [
            ("HDEL", CALLS, op.call_id),
            ("HDEL", QUIET, op.call_id),
            ("XADD", CHANGES, *trimmed, "*", "op", "del", "id", op.call_id),
        ]
    since = json.dumps(op.since)
    return [
        ("HSET", QUIET, op.call_id, since),
        ("XADD", CHANGES, *trimmed, "*", "op", "quiet", "id", op.call_id, "q", since),
    ]


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


_HSET_CALLS = b"*4\r\n" + _bulk(b"HSET") + _bulk(CALLS.encode())
_HSET_QUIET = b"*4\r\n" + _bulk(b"HSET") + _bulk(QUIET.encode())
_HDEL_CALLS = b"*3\r\n" + _bulk(b"HDEL") + _bulk(CALLS.encode())
_HDEL_QUIET = b"*3\r\n" + _bulk(b"HDEL") + _bulk(QUIET.encode())
_XADD = _bulk(b"XADD") + _bulk(CHANGES.encode())
_OP = {name: _bulk(b"op") + _bulk(name.encode()) + _bulk(b"id") for name in OPS}


def change_bytes(op: Op, trimmed: Sequence[str]) -> bytes:
    """`change_commands(op, trimmed)` packed (RESP2), built from constant pieces: the
    publisher packs every change on the event loop, and the generic `pack` cost ~30 µs per
    change there."""
    xadd = b"*%d\r\n" % (7 + len(trimmed) + 2 * isinstance(op, Put | Quiet))
    xadd += _XADD + b"".join(_bulk(part.encode()) for part in trimmed) + _bulk(b"*")
    if isinstance(op, Put):
        call_id = op.record["call_id"]
        if not isinstance(call_id, str):
            raise ReplicationError(f"record's call_id is not text: {call_id!r}")
        key = _bulk(call_id.encode())
        rec = _bulk(json.dumps(op.record, separators=(",", ":")).encode())
        return (
            _HSET_CALLS + key + rec + _HDEL_QUIET + key + xadd + _OP["put"] + key
            + _bulk(b"rec") + rec
        )  # fmt: skip
    key = _bulk(op.call_id.encode())
    if isinstance(op, Delete):
        return _HDEL_CALLS + key + _HDEL_QUIET + key + xadd + _OP["del"] + key
    since = _bulk(json.dumps(op.since).encode())
    return _HSET_QUIET + key + since + xadd + _OP["quiet"] + key + _bulk(b"q") + since


def reset_commands(
    records: Sequence[tuple[str, str]], trimmed: Sequence[str]
) -> list[tuple[object, ...]]:
    """The commands that replace the whole table by `records` ((Call-ID, JSON) pairs) and
    tell followers to reload it; send them in one MULTI/EXEC."""
    commands: list[tuple[object, ...]] = [("DEL", CALLS), ("DEL", QUIET)]
    for start in range(0, len(records), RESET_CHUNK):
        chunk = records[start : start + RESET_CHUNK]
        commands.append(("HSET", CALLS, *(text for pair in chunk for text in pair)))
    commands.append(("XADD", CHANGES, *trimmed, "*", "op", "reset"))
    return commands


def reset_fill_commands(
    records: Sequence[tuple[str, str]], chunk: int = RESET_CHUNK
) -> list[tuple[object, ...]]:
    """A whole table into CALLS_NEW, `chunk` records per command: each is a short step for
    Redis, where one transaction of 15,000 records held it (and its replica) for a few
    hundred ms, which on a small host is CPU the node needs. Followers never read it."""
    commands: list[tuple[object, ...]] = [("DEL", CALLS_NEW)]
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        commands.append(("HSET", CALLS_NEW, *(text for pair in part for text in pair)))
    return commands


def reset_switch_commands(filled: bool, trimmed: Sequence[str]) -> list[tuple[object, ...]]:
    """After `reset_fill_commands`, in one MULTI/EXEC: CALLS_NEW becomes the table (or
    the table is emptied, if nothing was `filled`), and followers are told to reload it."""
    table = ("RENAME", CALLS_NEW, CALLS) if filled else ("DEL", CALLS)
    return [table, ("DEL", QUIET), ("XADD", CHANGES, *trimmed, "*", "op", "reset")]


def parse(buffer: bytes | bytearray, at: int = 0) -> tuple[object, int] | None:
    """One RESP2 reply from `buffer` at `at`: (reply, where the next begins), or None if it
    is not all there yet. Error replies become `ReplyError`s, nil replies None."""
    end = buffer.find(b"\r\n", at)
    if end < 0:
        return None
    kind, rest, after = buffer[at : at + 1], bytes(buffer[at + 1 : end]), end + 2
    if kind == b"+":
        return rest.decode(), after
    if kind == b"-":
        return ReplyError(rest.decode(errors="replace")), after
    if kind == b":":
        return int(rest), after
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            return None
        return bytes(buffer[after : after + size]).decode(errors="replace"), after + size + 2
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            parsed = parse(buffer, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise ReplyError(f"not a RESP reply: {bytes(buffer[at : at + 40])!r}")


def pack(command: Sequence[object]) -> bytes:
    """One command in RESP2 (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(command)]
    for argument in command:
        data = argument if isinstance(argument, bytes) else str(argument).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def transaction_failure(replies: Sequence[object]) -> ReplyError | None:
    """The error of a MULTI ... EXEC's replies (each queued command's, then EXEC's array),
    if any: a command refused at queueing, EXECABORT, or a command failing inside."""
    done = replies[-1] if replies else None
    inside = done if isinstance(done, list) else [done]
    for reply in (*replies[:-1], *inside):
        if isinstance(reply, ReplyError):
            return reply
    return None if isinstance(done, list) else ReplyError("the transaction was discarded")


def _describe(op: Op) -> str:
    if isinstance(op, Put):
        return f"put of call {op.record.get('call_id')!r}"
    if isinstance(op, Delete):
        return f"delete of call {op.call_id!r}"
    return f"media state of call {op.call_id!r}"


class Status(_Client):
    """Read-only looks at a Redis for the pair's health probes (INFO, sizes), and the
    standby's report to the active. Quick calls on a short timeout; never the event loop."""

    def greeting(self, wait: float = 0.2) -> str | None:
        """What this Redis says to a new connection before any command: nothing, unless it
        refuses the client (protected mode: `-DENIED ...`, then it hangs up). A command
        sent at once races that refusal (the reset may come before the reply is read),
        so when a probe fails this asks without sending anything."""
        params: dict[str, Any] = parse_url(self.url)  # type: ignore[no-untyped-call]
        try:
            if params.get("path") is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(str(params["path"]))
            else:
                address = (str(params["host"]), int(params.get("port") or 6379))
                sock = socket.create_connection(address, timeout=self.timeout)
        except OSError:
            return None
        with sock:
            sock.settimeout(wait)
            try:
                said = sock.recv(1024)
            except OSError:
                return None
        return said.decode(errors="replace").strip().lstrip("-") or None

    def replication(self) -> dict[str, str]:
        """INFO replication (and `loading` from persistence)."""
        text = self._command("INFO replication", "INFO", "replication", "persistence")
        return _info(str(text))

    def size(self) -> int:
        """How many calls the table in this Redis holds (HLEN)."""
        return int(str(self._command("size of the call table", "HLEN", CALLS)))

    def last_change(self) -> str:
        """The ID of the change stream's last entry (ZERO_ID: none)."""
        last = self._command("last change", "XREVRANGE", CHANGES, "+", "-", "COUNT", "1")
        return str(last[0][0]) if last else ZERO_ID

    def report(self, status: Mapping[str, object], ttl: float) -> None:
        """The standby's status into the active's Redis (STANDBY, expires after `ttl`)."""
        text = json.dumps(status, separators=(",", ":"))
        self._command("standby report", "SET", STANDBY, text, "PX", str(int(ttl * 1000)))

    def announce_active(self, node: str, ttl: float) -> None:
        """This node is active (ACTIVE, in its own Redis, expiring after `ttl`)."""
        text = json.dumps({"node": node}, separators=(",", ":"))
        self._command("active announcement", "SET", ACTIVE, text, "PX", str(int(ttl * 1000)))

    def announced_active(self) -> str | None:
        """The node id that announced itself active in this Redis (None: none lately)."""
        text = self._command("active announcement", "GET", ACTIVE)
        if text is None:
            return None
        return str(_json(str(text), f"{self.where} {ACTIVE}").get("node"))

    def standby_report(self) -> dict[str, object] | None:
        """What the standby last reported (None: nothing, or it expired)."""
        text = self._command("standby report", "GET", STANDBY)
        return None if text is None else _json(str(text), f"{self.where} {STANDBY}")


class Follower(_Client):
    """The standby node's side: reads its local Redis, a replica of the active's.

    The status calls are quick (`timeout`); `snapshot` is O(table) (0.7 s for 50k calls,
    mostly JSON) and `changes` blocks in XREAD for up to `block_ms` (its socket timeout is
    `timeout` longer): call those two from a worker thread (redis-py's connection pool
    makes it safe to call the others meanwhile from another thread).
    """

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        super().__init__(url, timeout)
        self._readers: dict[int, redis.Redis] = {}
        self._replid: str | None = None

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        super().close()

    def snapshot(self) -> tuple[str, dict[str, dict[str, object]]]:
        """The last stream ID and the whole table, as of one instant (see the module doc).

        Also remembers the replica's replication ID at that instant: `changes` raises
        `ReplicationGap` once Redis has replaced its data since.
        """
        last, table, quiet, info = self._transaction(
            "snapshot",
            [
                ("XREVRANGE", CHANGES, "+", "-", "COUNT", "1"),
                ("HGETALL", CALLS),
                ("HGETALL", QUIET),
                ("INFO", "replication"),
            ],
        )
        stream_id = str(last[0][0]) if last else ZERO_ID
        records = {
            str(call_id): _json(str(text), f"{self.where} {CALLS}[{call_id!r}]")
            for call_id, text in table.items()
        }
        for call_id, text in quiet.items():
            record = records.get(str(call_id))
            if record is not None:  # a media state outlives its call only until its del
                record["quiet_since"] = _since(str(text), f"{self.where} {QUIET}[{call_id!r}]")
        self._replid = _info(str(info)).get("master_replid")
        return stream_id, records

    def _reader(self, block_ms: int) -> redis.Redis:
        reader = self._readers.get(block_ms)
        if reader is None:
            reader = _connect(self.url, self.timeout + max(block_ms, 0) / 1000)
            self._readers[block_ms] = reader
        return reader

    def changes(self, after: str, block_ms: int, count: int) -> list[Change]:
        """Up to `count` changes after stream ID `after`, waiting up to `block_ms` for one
        (0: do not wait; Redis's own BLOCK 0 would wait forever).

        Raises ReplicationGap when the changes after `after` are not all there any more
        (trimmed, another history, data replaced since `snapshot`): reload the snapshot.
        """
        block = ("BLOCK", block_ms) if block_ms > 0 else ()
        try:
            reply = self._reader(block_ms).execute_command(  # type: ignore[no-untyped-call]
                "XREAD", "COUNT", count, *block, "STREAMS", CHANGES, after
            )
        except (redis.RedisError, OSError) as exc:
            raise self._failed(f"XREAD after {after}", exc) from None
        self._check_gap(after)
        if not reply:
            return []
        entries = reply[CHANGES] if isinstance(reply, dict) else reply[0][1]
        return [self._change(str(stream_id), fields) for stream_id, fields in entries]

    def trimmed(self, after: str) -> bool:
        """Whether the changes after stream ID `after` are no longer all in the stream
        (trimmed past it, gone, or another history): then reload the snapshot. `changes`
        checks this itself (and the replication ID) and raises ReplicationGap."""
        return self._gap(after, replid=False) is not None

    def _check_gap(self, after: str) -> None:
        """After an XREAD from `after`: is every change after it still in the stream?

        Run after the XREAD, not before: what it reads only grows (trimmed entries, a
        replaced data set), so if nothing was missing now, nothing was at the XREAD."""
        reason = self._gap(after, replid=True)
        if reason is not None:
            raise ReplicationGap(f"Redis {self.where}: {reason}: reload the snapshot")

    def _gap(self, after: str, replid: bool) -> str | None:
        what = f"gap check from {after}"
        stream, info = self._transaction(
            what, [("XINFO", "STREAM", CHANGES), ("INFO", "replication")], raise_on_error=False
        )
        if isinstance(info, Exception):
            raise self._failed(what, info)
        now = _info(str(info)).get("master_replid")
        if replid and self._replid is not None and now != self._replid:
            return (
                f"its data was replaced since the snapshot (replication ID {self._replid} -> {now})"
            )
        if isinstance(stream, Exception):
            if "no such key" not in str(stream).lower():
                raise self._failed(what, stream)
            return None if after == ZERO_ID else f"{CHANGES} is gone (follower at {after})"
        if not isinstance(stream, dict):  # XINFO's flat [key, value, ...] reply
            stream = dict(zip(stream[::2], stream[1::2], strict=True))
        mark = _stream_id(after)
        last = str(stream["last-generated-id"])
        if _stream_id(last) < mark:
            return f"{CHANGES} ends at {last}, before the follower's {after} (another history)"
        trimmed = int(stream["entries-added"]) - int(stream["length"])
        first = stream["first-entry"]
        oldest = str(first[0]) if first else last
        if trimmed > 0 and _stream_id(oldest) > mark:
            return (
                f"{CHANGES} was trimmed past the follower ({trimmed} entries dropped, first "
                f"left {oldest}, follower at {after})"
            )
        return None

    def _change(self, stream_id: str, fields: Mapping[str, str]) -> Change:
        op = fields.get("op")
        what = f"{self.where} {CHANGES} entry {stream_id}"
        if op == "reset":
            return Change(stream_id, op, None, None)
        call_id = fields.get("id")
        if op not in OPS or call_id is None:
            raise ReplicationError(f"{what}: unknown change {dict(fields)!r}")
        if op == "del":
            return Change(stream_id, op, call_id, None)
        if op == "quiet":
            return Change(stream_id, op, call_id, None, _since(fields.get("q", ""), what))
        rec = fields.get("rec")
        if rec is None:
            raise ReplicationError(f"{what}: put without a record")
        return Change(stream_id, op, call_id, _json(rec, what))

    def follow(self, peer_url: str) -> None:
        """Make this Redis a replica of `peer_url`'s (REPLICAOF HOST PORT). Redis drops its
        own data and copies the peer's; poll `synced` to know when it is done."""
        host, port = _peer(peer_url)
        self._command(f"REPLICAOF {host} {port}", "REPLICAOF", host, str(port))

    def _replication(self) -> dict[str, str]:
        return _info(str(self._command("INFO replication", "INFO", "replication")))

    def synced(self) -> bool:
        """A replica whose link to its master is up and that is neither receiving nor
        loading a copy of the master's data."""
        info = _info(str(self._command("INFO replication", "INFO", "replication", "persistence")))
        return (
            info.get("role") == "slave"
            and info.get("master_link_status") == "up"
            and info.get("master_sync_in_progress") == "0"
            and info.get("loading") == "0"
        )

    def replication_id(self) -> str:
        """The replication history this Redis's data belongs to (master_replid): when it
        changes, Redis replaced the data (a full resynchronisation): reload the snapshot.
        Read it before `snapshot`, not after, so no change can slip between the two."""
        return self._replication().get("master_replid", "")
