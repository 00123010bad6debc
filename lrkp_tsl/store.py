"""The state store: every live call in an embedded SQLite database, `<state_dir>/calls.sqlite3`.

Why SQLite: stdlib, one file, atomic writes, readable by operators with `sqlite3`; WAL mode
makes a write an append (tens of µs) and a reader never blocks the node. With
`synchronous=NORMAL` a committed write survives the node being killed at any instant (the
WAL is in the OS before the commit returns); a power cut may lose the last writes, but it
also takes the kernel state with it, and Kamailio's retransmissions re-create new calls.

Schema (version 1, kept in `PRAGMA user_version`):

    calls     one row per call: its `S` addresses, idle timeout, start, when it went quiet
              (NULL while media flows), and per leg (caller/callee x rtp/rtcp) the SDP
              address, the latching rule and the learned address (NULL until learned).
              Times are Unix time (`datetime(started, 'unixepoch')`).
    removed   no longer written (it held tombstones of deleted calls for a change feed that
              replication through Redis replaced; a tombstone per ended call made the file
              grow without bound). Emptied at startup; kept in the schema so that the
              previous release can still open the file.
    `revision` in `calls` grows with every change (nothing reads it any more).

Versioning: a database with a higher version than this code knows is refused with a clear
error (an older node must not rewrite a newer one's data); lower versions are migrated in
`MIGRATIONS` order, inside one transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lrkp_tsl.errors import MediaError, StoreError
from lrkp_tsl.records import FIELDS, LEGS, StoredCall, decode, encode
from lrkp_tsl.session import Call

log = logging.getLogger("lrkp_tsl.store")

FILENAME = "calls.sqlite3"
SCHEMA_VERSION = 1
COLUMNS = [*FIELDS, "revision"]
# How long a write waits for a lock someone else holds (an operator's `sqlite3` shell):
# short, because the event loop waits with it. A write that times out is refused like a
# kernel error, and Kamailio's retransmission tries again.
BUSY_TIMEOUT = 0.25

# A row as `records.encode` makes it, as JSON text.
RECORD_JSON = "json_object(" + ", ".join(f"'{field}', {field}" for field in FIELDS) + ")"

MIGRATIONS: list[str] = [
    # 0 -> 1
    f"""
    CREATE TABLE calls (
        call_id TEXT PRIMARY KEY,
        caller TEXT NOT NULL,
        caller_relay TEXT NOT NULL,
        callee TEXT NOT NULL,
        callee_relay TEXT NOT NULL,
        idle_timeout REAL NOT NULL,
        started REAL NOT NULL,
        quiet_since REAL,
        {
        ", ".join(
            f"{leg}_sdp TEXT NOT NULL, {leg}_rule TEXT NOT NULL, {leg}_latched TEXT" for leg in LEGS
        )
    },
        revision INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE removed (
        call_id TEXT PRIMARY KEY,
        revision INTEGER NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
]


class SqliteStore:
    """The engine's `Store` (records.py) on SQLite. Not thread-safe: the event loop owns it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Engine times are monotonic; the file holds wall-clock time (survives a reboot).
        self._offset = time.time() - time.monotonic()
        try:
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            self._revision = self._db.execute(
                "SELECT coalesce(max(revision), 0) FROM calls"
            ).fetchone()[0]
            self._db.execute("DELETE FROM removed")  # an older release's tombstones
        except sqlite3.Error as exc:
            raise StoreError(f"state store {path}: {exc}") from exc
        self._put_sql = (
            f"INSERT OR REPLACE INTO calls ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in COLUMNS)})"
        )

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state store {self.path} has schema version {version}, newer than this "
                f"lrkp-tsl understands ({SCHEMA_VERSION}): it was written by a newer "
                "release. Run that release, or move the file away to start empty "
                "(live calls are then adopted from the kernel)."
            )
        if version == SCHEMA_VERSION:
            return
        steps = "".join(MIGRATIONS[version:])
        try:
            self._db.executescript(
                f"BEGIN IMMEDIATE; {steps}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        log.info("state store %s: schema version %d -> %d", self.path, version, SCHEMA_VERSION)

    @contextmanager
    def group(self) -> Iterator[None]:
        """The writes inside share one SQLite transaction: one WAL commit for a batch of
        commands (group commit) instead of one each. A write that fails fails alone (each
        is one statement); if the commit itself fails, StoreError: none of
        the writes is durable. If the transaction cannot start (an operator's shell holds
        the lock), the writes go one by one, each with its own result."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            log.debug("state store: no group transaction (%s); writing one by one", exc)
            yield
            return
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"state store {self.path}: committing a group: {exc}") from exc

    def records(self) -> list[tuple[str, str]]:
        """Every stored call as (Call-ID, its record as compact JSON: `records.encode`'s
        fields, wall-clock times), read on a connection of its own: callable from a worker
        thread (publishing.py republishes the table to Redis with it) while the event loop
        writes; WAL lets both run. One read transaction: the calls as of one commit.

        SQLite builds the JSON (json_object, in C, without Python's lock held while it
        steps): 15,000 records cost the event loop next to nothing, where decoding and
        encoding them in Python held it for most of a second. Times keep 15 significant
        digits (10 µs). Raises StoreError."""
        try:
            db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: opening for a read: {exc}") from exc
        try:
            return db.execute(f"SELECT call_id, {RECORD_JSON} FROM calls").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: reading calls: {exc}") from exc
        finally:
            db.close()

    @property
    def wall_offset(self) -> float:
        """Wall-clock time minus the engine's monotonic clock, as this store converts."""
        return self._offset

    def close(self) -> None:
        self._db.close()

    # -- the Store protocol -------------------------------------------------------------------

    def put(self, call: Call, quiet_since: float | None) -> None:
        self.put_record(encode(call, quiet_since, self._offset))

    def put_record(self, record: dict[str, object]) -> None:
        """`put` of a record already encoded (`records.encode`, with this store's
        `wall_offset`): a pair's store encodes once for here and for Redis."""
        self._revision += 1
        self._write(self._put_sql, [*record.values(), self._revision], str(record["call_id"]))

    def delete(self, call_id: str) -> None:
        """One statement: atomic alone, so inside `group` a failure stays this call's."""
        self._write("DELETE FROM calls WHERE call_id = ?", [call_id], call_id)

    def clear(self) -> int:
        """Forget every call (the node flushed its kernel state on exit); returns how many."""
        try:
            return self._db.execute("DELETE FROM calls").rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: clearing: {exc}") from exc

    def set_quiet(self, call_id: str, quiet_since: float | None) -> None:
        self._revision += 1
        self._write(
            "UPDATE calls SET quiet_since = ?, revision = ? WHERE call_id = ?",
            [None if quiet_since is None else quiet_since + self._offset, self._revision, call_id],
            call_id,
        )

    def load(self) -> list[StoredCall]:
        """Every stored call; a row that cannot be read is logged and skipped (it cannot be
        relayed as stored; if the kernel still relays it, it is adopted from there)."""
        calls = []
        try:
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM calls").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: reading calls: {exc}") from exc
        for row in rows:
            try:
                calls.append(self._decode(row))
            except (MediaError, ValueError, KeyError) as exc:
                log.error("state store: call %r unreadable, skipped: %s", row[0], exc)
        return calls

    # -- internals ----------------------------------------------------------------------------

    def _write(self, sql: str, row: list[object], call_id: str) -> None:
        try:
            self._db.execute(sql, row)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: writing {call_id!r}: {exc}") from exc

    def _decode(self, row: tuple[object, ...]) -> StoredCall:
        return decode(dict(zip(COLUMNS, row, strict=True)), self._offset)
