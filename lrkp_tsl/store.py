"""The state store: every live call in an embedded SQLite database, `<state_dir>/calls.sqlite3`.

Why SQLite: stdlib, one file, atomic writes, readable by operators with `sqlite3`; WAL mode
makes a write an append (tens of µs) and a reader never blocks the node. With
`synchronous=NORMAL` a committed write survives the node being killed at any instant (the
WAL is in the OS before the commit returns); a power cut may lose the last writes, but it
also takes the kernel state with it, and Kamailio's retransmissions re-create new calls.

Schema (version 2, kept in `PRAGMA user_version`):

    calls     one row per call (records.FIELDS, as a standby node receives them too): its
              protocol (`lrkproxy`, `ng`), idle timeout, start, when it went quiet (NULL
              while media flows), when it ends if nothing else ends it first (`end_after`
              seconds after its start: ng's delete-delay), the front-end's own record of it
              (ng: its sides and tags as JSON; NULL for lrkproxy) and its streams:
              - a call of lrkproxy's shape (one stream, RTP and RTCP, every address known:
                every lrkproxy call) in the columns `caller` .. `callee_rtcp_latched`, as in
                version 1: its `S` addresses, and per leg (caller/callee x rtp/rtcp) the
                SDP address, the latching rule and the learned address (NULL until
                learned); `streams` is NULL;
              - any other (an ng call: several streams, rtcp-mux, an address not known yet,
                relay ports reserved for streams not relayed yet) as JSON in `streams`
                (records.encode_streams), those columns NULL.
              Times are Unix time (`datetime(started, 'unixepoch')`).
    `revision` in `calls` grows with every change (nothing reads it any more).
    `boot_id`, `started_mono`, `quiet_mono` in `calls`: the same two times on the node's
              own clock (CLOCK_MONOTONIC), valid within the boot named by boot_id
              (/proc/sys/kernel/random/boot_id). NULL in a row an older release wrote: such
              a row falls back to wall-clock time.
    clock     one row: the boot id, monotonic and wall-clock time at which the node last
              said it was alive (at start, every ALIVE_INTERVAL, at a clean stop).

Version 1 (every release before ng) had the same table without `protocol`, `streams`,
`record` and `end_after`, its leg columns NOT NULL, the clock columns added in place by
later releases, and a table `removed` no longer written. It is migrated at startup, in
one transaction: the rows are copied as they are (each becomes an lrkproxy call of the same
shape) and `removed` is dropped. A version 1 node refuses a version 2 file (newer), and
sets it aside unchanged.

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
error (an older node must not rewrite a newer one's data); a lower version is migrated to
this one inside one transaction (`_migrate`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from lrkp_tsl.errors import MediaError, StoreError
from lrkp_tsl.records import FIELDS, LEGS, StoredCall, decode, encode
from lrkp_tsl.session import Call
from lrkp_tsl.walcheckpoint import BACKSTOP_PAGES, WalCheckpointer

log = logging.getLogger("lrkp_tsl.store")

FILENAME = "calls.sqlite3"
SCHEMA_VERSION = 2
CLOCK_COLUMNS = ["boot_id", "started_mono", "quiet_mono"]
V1_FIELDS = [field for field in FIELDS if field not in ("protocol", "streams", "record",
                                                        "end_after")]  # fmt: skip
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

# A row as `records.encode` makes it, as JSON text.
RECORD_JSON = "json_object(" + ", ".join(f"'{field}', {field}" for field in FIELDS) + ")"

MIGRATIONS: list[str] = [
    # 0 -> 1: version 1 as it was created (tests build version 1 files with it)
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

CALLS_V2 = f"""
    CREATE TABLE {{name}} (
        call_id TEXT PRIMARY KEY,
        caller TEXT,
        caller_relay TEXT,
        callee TEXT,
        callee_relay TEXT,
        idle_timeout REAL NOT NULL,
        started REAL NOT NULL,
        quiet_since REAL,
        {", ".join(f"{leg}_sdp TEXT, {leg}_rule TEXT, {leg}_latched TEXT" for leg in LEGS)},
        protocol TEXT NOT NULL DEFAULT 'lrkproxy',
        streams TEXT,
        record TEXT,
        end_after REAL,
        revision INTEGER NOT NULL,
        boot_id TEXT,
        started_mono REAL,
        quiet_mono REAL,
        CHECK ((streams IS NULL) = (caller IS NOT NULL))
    ) WITHOUT ROWID;
"""
"""Version 2's `calls` (`name`: where it is created): a row holds its streams either in
the lrkproxy-shaped columns or in `streams`, never both (the CHECK)."""


def migration(version: int, have: set[str], tables: set[str]) -> str:
    """The SQL that takes a file at schema `version` to SCHEMA_VERSION (one transaction's
    worth): `have` are the columns its `calls` has, `tables` its tables."""
    if version == 0:
        return CALLS_V2.format(name="calls") + CLOCK_TABLE
    kept = [*V1_FIELDS, "revision", *(name for name in CLOCK_COLUMNS if name in have)]
    columns = ", ".join(kept)
    return (
        CALLS_V2.format(name="calls_v2")
        + f"INSERT INTO calls_v2 ({columns}) SELECT {columns} FROM calls;"
        + "DROP TABLE calls; ALTER TABLE calls_v2 RENAME TO calls;"
        + ("DROP TABLE removed;" if "removed" in tables else "")
        + CLOCK_TABLE
    )


def _rows(db: sqlite3.Connection) -> list[dict[str, object]]:
    """Every row of `calls`, by column name (whichever columns the file's schema has)."""
    cursor = db.execute("SELECT * FROM calls")
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def boot_id() -> str:
    """This boot's id: the monotonic clock's times are comparable only within one boot."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""  # no /proc: never the same boot, wall-clock time then


# What an SQLite error means for the node (`classify`).
BAD = "bad"  # the file is no store this release can use: set aside at startup
UNAVAILABLE = "unavailable"  # it cannot be written now (disk full, I/O error): retried
BUSY = "busy"  # another process holds its lock (an operator's shell): refused, retried
DENIED = "denied"  # permissions, a read-only file system: a configuration error
# While the store cannot be written: how often it is tried again, and reported.
RETRY_INTERVAL = 5.0
REPORT_INTERVAL = 60.0


def classify(exc: sqlite3.Error) -> str:
    """BAD, UNAVAILABLE, BUSY or DENIED, by SQLite's error code."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return BUSY
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_NOMEM", "SQLITE_CANTOPEN")):
        return UNAVAILABLE
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")):
        return DENIED
    return BAD  # SQLITE_NOTADB, SQLITE_CORRUPT, SQLITE_ERROR (a schema not ours), ...


def store_wide(exc: sqlite3.Error) -> bool:
    """Whether a failed write says the store as a whole cannot be written (disk full, I/O
    error, a file system gone read-only, a corrupt file), rather than that one write
    failed (a constraint, a lock another process holds)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return classify(exc) == UNAVAILABLE or name.startswith(
        ("SQLITE_READONLY", "SQLITE_CORRUPT", "SQLITE_NOTADB")
    )


class StoreOpenError(StoreError):
    """The store cannot be opened; `kind` says what the node does about it (`classify`,
    or "newer": a newer release's schema)."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class _Unsaved:
    """A write the file has not taken yet: a put (call), a delete (neither), or a change
    of quiet time only."""

    call: Call | None
    quiet: float | None = None
    quiet_only: bool = False
    record: dict[str, object] | None = None  # the call's record, if already encoded


def open_state(path: Path, *, boot: str | None = None) -> SqliteStore:
    """The node's store at `path`, whatever the file holds; StoreError only for what no
    restart fixes (permissions: the unit's exit code 2).

    - A file that is no store this release can use (not a database, truncated, corrupt, a
      schema not ours, a newer release's) is set aside: renamed with a timestamp, never
      rewritten, with an ERROR saying where and why, and a new store started. The
      reconciliation then adopts the calls the kernel relays from the kernel.
    - A store that cannot be written now (disk full, I/O error, another process holding
      its lock) is read as far as it can be, and the node runs on without durable records
      until it can write again (`SqliteStore.tick`).
    """
    try:
        return SqliteStore(path, boot=boot)
    except StoreOpenError as error:
        if error.kind == DENIED:
            raise
        if error.kind in (UNAVAILABLE, BUSY):
            return SqliteStore.unavailable(path, error, boot=boot)
        failure = error
    try:
        aside = set_aside(path, "newer" if failure.kind == "newer" else "bad")
    except OSError as exc:
        raise StoreError(
            f"state store {path} cannot be used ({failure.reason}), nor moved aside: "
            f"{exc.strerror or exc}"
        ) from None
    if failure.kind == "newer":
        log.error(
            "%s. Moved to %s unchanged (this release never rewrites a newer one's data) and "
            "started an empty store: the calls the kernel relays are adopted back from it "
            "(calls still learning an address are lost). To go back to the newer release, "
            "stop this node and move the file back.",
            failure.reason,
            aside,
        )
    else:
        log.error(
            "%s: this is no state store this release can use. Moved to %s (kept for "
            "inspection) and started an empty store: the calls the kernel relays are adopted "
            "back from it (calls still learning an address are lost).",
            failure.reason,
            aside,
        )
    try:
        return SqliteStore(path, boot=boot)
    except StoreOpenError as error:
        if error.kind == DENIED:
            raise
        return SqliteStore.unavailable(path, error, boot=boot)


def set_aside(path: Path, label: str) -> Path:
    """Rename the store and its -wal and -shm files to `<name>.<label>-<time>`; the new path.
    (A -wal left beside a new store would be applied to it.)"""
    target = path.with_name(f"{path.name}.{label}-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists() or source.is_symlink():
            os.replace(source, Path(f"{target}{suffix}"))
    return target


class SqliteStore:
    """The engine's `Store` (records.py) on SQLite. Not thread-safe: the event loop owns it.

    A store that cannot be written (disk full, an I/O error, a file system gone read-only)
    does not stop the node: the write is kept in memory (`_unsaved`: the latest of each
    call), the command goes ahead, an ERROR says so (again every REPORT_INTERVAL), and the
    whole backlog is written in one transaction as soon as the file takes it again (tried
    every RETRY_INTERVAL by `tick`). A restart meanwhile loses those writes: latched calls
    are then adopted back from the kernel, calls still learning are lost, and a call ended
    meanwhile may be reinstalled until its idle timeout. A store locked by another process
    (an operator's `sqlite3` shell) refuses the write instead (StoreError): that lasts
    seconds, and Kamailio's retransmission tries again.
    """

    def __init__(self, path: Path, *, boot: str | None = None, connect: bool = True) -> None:
        self.path = path
        # Engine times are monotonic; the file holds them with this boot's id, and as
        # wall-clock time (which survives a reboot, and reads well in `sqlite3`).
        self._offset = time.time() - time.monotonic()
        self.boot_id = boot_id() if boot is None else boot
        self._db: sqlite3.Connection | None = None
        self._revision = 0
        self._previous: tuple[str, float, float] | None = None
        self._alive_due = 0.0
        self._unsaved: dict[str, _Unsaved] = {}
        self._failing_since: float | None = None  # monotonic: the store cannot be written
        self._failure = ""
        self._retry_due = 0.0
        self._report_due = 0.0
        self._group: list[tuple[str, _Unsaved]] | None = None  # a group's writes so far
        self._read: list[StoredCall] = []  # what a store opened unavailable could read
        self._checkpointer: WalCheckpointer | None = None
        self._put_sql = (
            f"INSERT OR REPLACE INTO calls ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in COLUMNS)})"
        )
        if connect:
            self._connect()
            self.alive(time.monotonic())

    @classmethod
    def unavailable(cls, path: Path, error: StoreError, *, boot: str | None = None) -> SqliteStore:
        """A store that cannot be opened for writing now: what the file holds is read if
        it can be (read-only), every write is kept for later, and `tick` tries again."""
        store = cls(path, boot=boot, connect=False)
        store._read = store._read_only()
        store._degrade(error.reason, time.monotonic())
        return store

    def _connect(self) -> None:
        """Open, migrate and check the file; StoreOpenError (with its kind) if it fails."""
        try:
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreOpenError(f"state store {self.path}: {exc}", classify(exc)) from exc
        try:
            self._db = db
            self._check(db)  # before anything is written: a file not ours stays as it is
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if self._checkpointer is not None:  # checkpoints off the event loop
                db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            self._migrate()
            db.execute(f"SELECT {', '.join(COLUMNS)} FROM calls LIMIT 0")  # ours, as we read
            self._revision = db.execute("SELECT coalesce(max(revision), 0) FROM calls").fetchone()[
                0
            ]
            self._previous = self._read_clock(db)
        except sqlite3.Error as exc:
            self._db = None
            db.close()
            raise StoreOpenError(f"state store {self.path}: {exc}", classify(exc)) from exc
        except BaseException:
            self._db = None
            db.close()
            raise

    def _check(self, db: sqlite3.Connection) -> None:
        """StoreOpenError if the file is a newer release's store, or no store of ours;
        reads only."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreOpenError(
                f"state store {self.path} has schema version {version}, newer than this "
                f"lrkp-tsl understands ({SCHEMA_VERSION}): it was written by a newer release",
                "newer",
            )
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "calls" not in tables:
            return
        have = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
        lacking = sorted({*(FIELDS if version >= 2 else V1_FIELDS), "revision"} - have)
        if version == 0 or lacking:
            raise StoreOpenError(
                f"state store {self.path}: its table calls is not the node's (schema version "
                f"{version}; lacking {', '.join(lacking) or 'nothing, but unversioned'})",
                BAD,
            )

    def _migrate(self) -> None:
        """An older file to this release's schema, in one transaction (see the module
        docstring): calls are copied as they are, none is lost or changed."""
        db = self._connection()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        have = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        steps = migration(version, have, tables)
        self._script(f"{steps} PRAGMA user_version = {SCHEMA_VERSION};")
        if version:
            count = db.execute("SELECT count(*) FROM calls").fetchone()[0]
            log.info(
                "state store %s: schema version %d -> %d (%d calls kept)",
                self.path,
                version,
                SCHEMA_VERSION,
                count,
            )

    def _connection(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    def _script(self, steps: str) -> None:
        """`steps` in one transaction."""
        db = self._connection()
        try:
            db.executescript(f"BEGIN IMMEDIATE; {steps} COMMIT;")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @property
    def writable(self) -> bool:
        """False while writes are kept in memory (see the class docstring)."""
        return self._failing_since is None

    @contextmanager
    def group(self) -> Iterator[None]:
        """The writes inside share one SQLite transaction: one WAL commit for a batch of
        commands (group commit) instead of one each. If the store cannot be written
        meanwhile, the group's writes are kept for later like any other (none is lost, none
        refused). If the transaction cannot start (an operator's shell holds the lock), the
        writes go one by one, each with its own result; if the commit itself fails for that
        reason, StoreError: none of the writes is durable."""
        db = self._db
        if db is None or not self.writable or self._group is not None:
            yield
            return
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            log.debug("state store: no group transaction (%s); writing one by one", exc)
            yield
            return
        self._group = []
        try:
            yield
        except BaseException:
            self._group = None
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        written, self._group = self._group, None
        if not db.in_transaction:
            return  # rolled back when the store failed inside: the writes are kept
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if not store_wide(exc):
                raise StoreError(f"state store {self.path}: committing a group: {exc}") from exc
            self._degrade(f"committing a group: {exc}", time.monotonic())
            for call_id, write in written:
                self._keep(call_id, write)

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

    def checkpoint_in_background(self) -> None:
        """Checkpoint the WAL on a thread of its own from now on (walcheckpoint.py), not
        inside the commit that fills it: the daemon's store (a short-lived tool's keeps
        SQLite's own checkpoints)."""
        if self._checkpointer is not None:
            return
        self._checkpointer = WalCheckpointer(self.path)
        if self._db is not None:
            try:
                self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            except sqlite3.Error as exc:  # SQLite keeps checkpointing by itself too
                log.warning("state store %s: %s", self.path, exc)
        self._checkpointer.start()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        now = time.monotonic()
        if not self.writable:
            self._retry(now)
        if not self.writable:
            log.error(
                "stopping: %d calls' records were never written to %s (%s): the next start "
                "adopts their calls back from the kernel if they are latched",
                len(self._unsaved),
                self.path,
                self._failure,
            )
        self.alive(now, force=True)  # a reboot after a clean stop: exact ages
        if self._db is not None:
            self._db.close()
            self._db = None

    def tick(self, now: float) -> None:
        """Called every half second or so: the node's sign of life (`alive`), and while
        the store cannot be written, a new try every RETRY_INTERVAL and a reminder every
        REPORT_INTERVAL."""
        if self.writable:
            self.alive(now)
            return
        if now >= self._retry_due:
            self._retry(now)
        if not self.writable and now >= self._report_due:
            self._report_due = now + REPORT_INTERVAL
            log.error(
                "state store %s still cannot be written (%s) after %.0f s: %d calls' records "
                "are kept in memory only (a restart now adopts latched calls back from the "
                "kernel; calls still learning would be lost); retrying every %g s",
                self.path,
                self._failure,
                now - (self._failing_since or now),
                len(self._unsaved),
                RETRY_INTERVAL,
            )

    def alive(self, now: float, *, force: bool = False) -> None:
        """Record that the node is alive now (at most every ALIVE_INTERVAL unless `force`):
        after a reboot, the age of each restored call is counted from here. A failure is
        logged, not raised: it only makes those ages less exact."""
        if self._db is None or not self.writable or (not force and now < self._alive_due):
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
        self._apply(call.call_id, _Unsaved(call, quiet_since))

    def put_record(self, call: Call, quiet_since: float | None, record: dict[str, object]) -> None:
        """`put` of a call whose record is already encoded (`records.encode`, with this
        store's `wall_offset`): a pair's store encodes once for here and for Redis."""
        self._apply(call.call_id, _Unsaved(call, quiet_since, record=record))

    def delete(self, call_id: str) -> None:
        """One statement: atomic alone, so inside `group` a failure stays this call's."""
        self._apply(call_id, _Unsaved(None))

    def set_quiet(self, call_id: str, quiet_since: float | None) -> None:
        self._apply(call_id, _Unsaved(None, quiet_since, quiet_only=True))

    def clear(self) -> int:
        """Forget every call (the node flushed its kernel state on exit); returns how many."""
        self._unsaved.clear()
        try:
            return self._connection().execute("DELETE FROM calls").rowcount
        except (sqlite3.Error, AssertionError) as exc:
            raise StoreError(
                f"state store {self.path}: clearing: {exc or 'not open'}; delete the file, or "
                "the next start reinstalls the calls it still holds"
            ) from exc

    def load(self) -> list[StoredCall]:
        """Every stored call; a row that cannot be read is logged and skipped (it cannot be
        relayed as stored; if the kernel still relays it, it is adopted from there)."""
        if self._db is None:
            return list(self._read)
        try:
            rows = _rows(self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: reading calls: {exc}") from exc
        return self._decode_all(rows)

    # -- internals ----------------------------------------------------------------------------

    def _apply(self, call_id: str, write: _Unsaved) -> None:
        """Write now, or keep it for later if the store cannot be written (in order: while
        anything is kept, everything is)."""
        if self._db is None or not self.writable:
            self._keep(call_id, write)
            return
        try:
            self._execute(self._db, call_id, write)
        except sqlite3.Error as exc:
            if not store_wide(exc):
                raise StoreError(f"state store {self.path}: writing {call_id!r}: {exc}") from exc
            earlier = self._group or []
            self._group = [] if self._group is not None else None
            if self._db.in_transaction:  # the group's earlier writes go with it
                self._db.execute("ROLLBACK")
            self._degrade(f"writing {call_id!r}: {exc}", time.monotonic())
            for earlier_id, earlier_write in earlier:
                self._keep(earlier_id, earlier_write)
            self._keep(call_id, write)
            return
        if self._group is not None:
            self._group.append((call_id, write))

    def _execute(self, db: sqlite3.Connection, call_id: str, write: _Unsaved) -> None:
        self._revision += 1
        if write.call is not None:
            record = write.record or encode(write.call, write.quiet, self._offset)
            clock = [self.boot_id, write.call.started, write.quiet]
            db.execute(self._put_sql, [*record.values(), self._revision, *clock])
        elif write.quiet_only:
            wall = None if write.quiet is None else write.quiet + self._offset
            db.execute(
                "UPDATE calls SET quiet_since = ?, quiet_mono = ?, revision = ? WHERE call_id = ?",
                [wall, write.quiet, self._revision, call_id],
            )
        else:
            db.execute("DELETE FROM calls WHERE call_id = ?", [call_id])

    def _keep(self, call_id: str, write: _Unsaved) -> None:
        """The latest write of each call, for when the store can be written again."""
        kept = self._unsaved.get(call_id)
        if write.quiet_only and kept is not None:
            if kept.call is not None:  # a put still to make: with this quiet time
                self._unsaved[call_id] = _Unsaved(kept.call, write.quiet)
            elif kept.quiet_only:
                self._unsaved[call_id] = write
            return  # a delete still to make: nothing left to update
        self._unsaved[call_id] = write

    def _degrade(self, reason: str, now: float) -> None:
        if self._failing_since is not None:
            return
        self._failing_since, self._failure = now, reason
        self._retry_due = now + RETRY_INTERVAL
        self._report_due = now + REPORT_INTERVAL
        log.error(
            "state store %s cannot be written (%s): the node goes on without durable "
            "records. Calls are set up, changed and ended as usual and their media flows, "
            "but a restart now would lose what changed since (latched calls are adopted back "
            "from the kernel, calls still learning are lost). Free the space or fix the "
            "disk: the store is tried again every %g s, and everything kept meanwhile is "
            "written at once.",
            self.path,
            reason,
            RETRY_INTERVAL,
        )

    def _retry(self, now: float) -> None:
        """Try to write everything kept in memory, in one transaction."""
        self._retry_due = now + RETRY_INTERVAL
        try:
            if self._db is None:
                self._connect()
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                for call_id, write in self._unsaved.items():
                    self._execute(db, call_id, write)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, StoreError) as exc:
            log.debug("state store %s: still not writable: %s", self.path, exc)
            return
        log.warning(
            "state store %s is written again after %.0f s: %d calls' records written",
            self.path,
            now - (self._failing_since or now),
            len(self._unsaved),
        )
        self._unsaved.clear()
        self._failing_since = None
        self._failure = ""
        self.alive(now, force=True)

    def _read_only(self) -> list[StoredCall]:
        """What the file holds, read without writing anything (a full disk: no -shm may be
        creatable, so read-only, then as an immutable file); [] if it cannot be read."""
        if not self.path.exists():
            return []
        for uri in (f"file:{self.path}?mode=ro", f"file:{self.path}?immutable=1"):
            try:
                db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT)
                try:
                    rows = _rows(db)  # this release's schema, or an earlier one's
                    self._previous = self._read_clock(db)
                finally:
                    db.close()
            except sqlite3.Error as exc:
                log.debug("state store %s not read (%s): %s", self.path, uri, exc)
                continue
            calls = self._decode_all(rows)
            log.warning("state store %s read without writing: %d calls", self.path, len(calls))
            return calls
        log.error("state store %s cannot be read either: starting with no stored call", self.path)
        return []

    def _decode_all(self, rows: list[dict[str, object]]) -> list[StoredCall]:
        calls = []
        for row in rows:
            try:
                calls.append(self._decode(row))
            except (MediaError, ValueError, KeyError, TypeError) as exc:
                log.error("state store: call %r unreadable, skipped: %s", row.get("call_id"), exc)
        return calls

    @staticmethod
    def _read_clock(db: sqlite3.Connection) -> tuple[str, float, float] | None:
        """(boot id, monotonic, wall-clock time) of the last `alive` before this start."""
        try:
            row = db.execute("SELECT boot_id, alive_mono, alive_wall FROM clock").fetchone()
        except sqlite3.OperationalError:
            return None  # an earlier release's file: no clock yet
        return None if row is None else (str(row[0]), float(row[1]), float(row[2]))

    def _decode(self, record: dict[str, object]) -> StoredCall:
        """A row back into a call, on this boot's monotonic clock (see the module docstring):
        exactly within one boot, by the last `alive` across a reboot, else from wall-clock
        time (`estimated`: the engine caps it)."""
        stored = decode(record, self._offset)
        boot = record.get("boot_id")
        started, quiet = record.get("started_mono"), record.get("quiet_mono")
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
        return StoredCall(stored.call.started_at(start), since)
