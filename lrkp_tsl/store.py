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
    `boot_id`, `started_mono`, `quiet_mono` in `calls`: the same two times on the node's
              own clock (CLOCK_MONOTONIC), valid within the boot named by boot_id
              (/proc/sys/kernel/random/boot_id). Added to version 1 in place (nullable): a
              release that does not know them leaves them NULL, and such a row falls back to
              wall-clock time, so the previous release can still open and write the file.

    clock     one row: the boot id, monotonic and wall-clock time at which the node last
              said it was alive (at start, every ALIVE_INTERVAL, at a clean stop).

Clocks: a call's maximum lifetime is counted from `started`. Wall-clock time alone would
age every call by a clock step across a restart (NTP correcting a wrong clock by +1 h ended
live calls at startup, "lasted 3701.8 s"). So:
- a restart on the same boot reads the monotonic times back, exactly;
- after a reboot (the monotonic clock starts again), a call's age is its exact age when the
  node was last alive (`clock`, same old boot) plus the time the node was down as the wall
  clock says it, at most REBOOT_GAP: a step inside the reboot moves ages by that much at most
  (a reboot that really lasted longer makes calls live that much past their lifetime);
- a row an older release wrote (no monotonic times) is read from wall-clock time, and the
  engine caps the age a restart may give it (engine.load).

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
from dataclasses import replace
from pathlib import Path

from lrkp_tsl.errors import MediaError, StoreError
from lrkp_tsl.records import FIELDS, LEGS, StoredCall, decode, encode
from lrkp_tsl.session import Call

log = logging.getLogger("lrkp_tsl.store")

FILENAME = "calls.sqlite3"
SCHEMA_VERSION = 1
CLOCK_COLUMNS = ["boot_id", "started_mono", "quiet_mono"]
COLUMNS = [*FIELDS, "revision", *CLOCK_COLUMNS]
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# How often the node records that it is alive (`clock`), and how much of a reboot's
# wall-clock duration counts towards the age of the calls it restores.
ALIVE_INTERVAL = 30.0
REBOOT_GAP = 120.0
CLOCK_TABLE = """
    CREATE TABLE IF NOT EXISTS clock (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        boot_id TEXT NOT NULL,
        alive_mono REAL NOT NULL,
        alive_wall REAL NOT NULL
    );
"""
# How long a write waits for a lock someone else holds (an operator's `sqlite3` shell):
# short, because the event loop waits with it. A write that times out is refused like a
# kernel error, and Kamailio's retransmission tries again.
BUSY_TIMEOUT = 0.25

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


def boot_id() -> str:
    """This boot's id: the monotonic clock's times are comparable only within one boot."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""  # no /proc: never the same boot, wall-clock time then


class SqliteStore:
    """The engine's `Store` (records.py) on SQLite. Not thread-safe: the event loop owns it."""

    def __init__(self, path: Path, *, boot: str | None = None) -> None:
        self.path = path
        # Engine times are monotonic; the file holds them with this boot's id, and as
        # wall-clock time (which survives a reboot, and reads well in `sqlite3`).
        self._offset = time.time() - time.monotonic()
        self.boot_id = boot_id() if boot is None else boot
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
        self._alive_due = 0.0
        self._previous = self._read_clock()
        self.alive(time.monotonic())
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
        if version < SCHEMA_VERSION:
            steps = "".join(MIGRATIONS[version:])
            self._script(f"{steps}; PRAGMA user_version = {SCHEMA_VERSION};")
            log.info("state store %s: schema version %d -> %d", self.path, version, SCHEMA_VERSION)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(calls)")}
        kinds = {"boot_id": "TEXT", "started_mono": "REAL", "quiet_mono": "REAL"}
        missing = [name for name in CLOCK_COLUMNS if name not in have]
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
        if missing or "clock" not in tables:  # version 1 of an earlier release, in place
            self._script(
                " ".join(f"ALTER TABLE calls ADD COLUMN {n} {kinds[n]};" for n in missing)
                + CLOCK_TABLE
            )

    def _script(self, steps: str) -> None:
        """`steps` in one transaction."""
        try:
            self._db.executescript(f"BEGIN IMMEDIATE; {steps} COMMIT;")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

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

    @property
    def wall_offset(self) -> float:
        """Wall-clock time minus the engine's monotonic clock, as this store converts."""
        return self._offset

    def close(self) -> None:
        self.alive(time.monotonic(), force=True)  # a reboot after a clean stop: exact ages
        self._db.close()

    def alive(self, now: float, *, force: bool = False) -> None:
        """Record that the node is alive now (at most every ALIVE_INTERVAL unless `force`):
        after a reboot, the age of each restored call is counted from here. A failure is
        logged, not raised: it only makes those ages less exact."""
        if not force and now < self._alive_due:
            return
        self._alive_due = now + ALIVE_INTERVAL
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO clock VALUES (0, ?, ?, ?)",
                [self.boot_id, now, now + self._offset],
            )
        except sqlite3.Error as exc:
            log.warning("state store %s: the node's clock not recorded: %s", self.path, exc)

    # -- the Store protocol -------------------------------------------------------------------

    def put(self, call: Call, quiet_since: float | None) -> None:
        self._revision += 1
        record = encode(call, quiet_since, self._offset)
        clock = [self.boot_id, call.started, quiet_since]
        self._write(self._put_sql, [*record.values(), self._revision, *clock], call.call_id)

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
        wall = None if quiet_since is None else quiet_since + self._offset
        self._write(
            "UPDATE calls SET quiet_since = ?, quiet_mono = ?, revision = ? WHERE call_id = ?",
            [wall, quiet_since, self._revision, call_id],
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

    def _read_clock(self) -> tuple[str, float, float] | None:
        """(boot id, monotonic, wall-clock time) of the last `alive` before this start."""
        try:
            row = self._db.execute("SELECT boot_id, alive_mono, alive_wall FROM clock").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: reading the clock: {exc}") from exc
        return None if row is None else (str(row[0]), float(row[1]), float(row[2]))

    def _decode(self, row: tuple[object, ...]) -> StoredCall:
        """A row back into a call, on this boot's monotonic clock (see the module docstring):
        exactly within one boot, by the last `alive` across a reboot, else from wall-clock
        time (`estimated`: the engine caps it)."""
        record = dict(zip(COLUMNS, row, strict=True))
        stored = decode(record, self._offset)
        boot, started, quiet = record["boot_id"], record["started_mono"], record["quiet_mono"]
        if started is None or not boot or (quiet is None) != (record["quiet_since"] is None):
            return replace(stored, estimated=True)  # an older release wrote or updated it
        start, since = float(str(started)), None if quiet is None else float(str(quiet))
        if boot != self.boot_id:
            if self._previous is None or self._previous[0] != boot:
                return replace(stored, estimated=True)
            _boot, alive_mono, alive_wall = self._previous
            now = time.monotonic()
            gap = min(max(0.0, now + self._offset - alive_wall), REBOOT_GAP)
            shift = now - gap - alive_mono  # old boot's clock + shift = this boot's clock
            start = min(start, alive_mono) + shift
            since = None if since is None else min(since, alive_mono) + shift
        return StoredCall(replace(stored.call, started=start), since)
