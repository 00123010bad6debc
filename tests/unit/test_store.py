"""The SQLite state store: what goes in comes back out exactly, across a reopen."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from lrkp_tsl.errors import StoreError
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import CallMedia, Endpoint, InstalledFlow
from lrkp_tsl.operations import Relay, StreamSpec
from lrkp_tsl.records import FIELDS, StoredCall, decode, encode
from lrkp_tsl.session import Call, CallTable, rebuild
from lrkp_tsl.store import (
    FILENAME,
    MIGRATIONS,
    REBOOT_GAP,
    SCHEMA_VERSION,
    V1_FIELDS,
    SqliteStore,
    open_state,
)


def ep(text: str) -> Endpoint:
    ip, port = text.split(":")
    return Endpoint(IPv4Address(ip), int(port))


def learned_call() -> Call:
    """A NAT'd caller whose RTP leg is latched and RTCP leg still learning."""
    table = CallTable(3600, Policy.AUTO)
    media = CallMedia(
        "abc@host", ep("192.168.1.20:4000"), ep("10.0.0.10:20002"), ep("8.8.8.8:6000"),
        ep("10.0.0.10:20000"),
    )  # fmt: skip
    for action in table.on_set(media, 60, 100.0):
        table.applied(action)
    decision = table.on_packet(ep("10.0.0.99:55316"), ep("10.0.0.10:20002"), lambda s, r: True)
    for action in decision.actions:
        table.applied(action)
    call = table.get("abc@host")
    assert call is not None
    return call


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / FILENAME


def test_a_call_comes_back_exactly_after_a_reopen(path: Path) -> None:
    call = learned_call()
    store = SqliteStore(path)
    store.put(call, 123.5)
    store.close()
    [stored] = SqliteStore(path).load()
    # Times are stored as wall-clock time: back on the monotonic clock within clock jitter.
    assert stored.call.started == pytest.approx(call.started, abs=1e-3)
    assert replace(stored.call, started=call.started) == call
    assert stored.quiet_since == pytest.approx(123.5, abs=1e-3)


def test_adopted_calls_with_unrelated_rtcp_addresses_round_trip(path: Path) -> None:
    flows = [
        InstalledFlow("c", ep("10.0.0.1:4000"), ep("10.0.0.10:20002"), ep("10.0.0.2:6000"),
                      ep("10.0.0.10:20000")),
        InstalledFlow("c", ep("10.0.0.2:6000"), ep("10.0.0.10:20000"), ep("10.0.0.1:4000"),
                      ep("10.0.0.10:20002")),
        InstalledFlow("c", ep("10.0.0.1:7777"), ep("10.0.0.10:20003"), ep("10.0.0.2:6001"),
                      ep("10.0.0.10:20001")),
        InstalledFlow("c", ep("10.0.0.2:6001"), ep("10.0.0.10:20001"), ep("10.0.0.1:7777"),
                      ep("10.0.0.10:20003")),
    ]  # fmt: skip
    [call], orphans = rebuild(flows, 60, 5.0)
    assert orphans == []
    store = SqliteStore(path)
    store.put(call, None)
    [stored] = store.load()
    assert stored.call == call and stored.quiet_since is None


def rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_set_quiet_and_delete(path: Path) -> None:
    store = SqliteStore(path)
    call = learned_call()
    other = replace(call, call_id="other")
    store.put(call, None)
    store.put(other, None)
    store.set_quiet(call.call_id, 50.0)
    store.delete("other")
    [stored] = store.load()
    assert stored.call.call_id == "abc@host"
    assert stored.quiet_since == pytest.approx(50.0, abs=1e-3)


def test_an_ended_call_leaves_nothing_in_the_file(path: Path) -> None:
    """A tombstone per ended call made the file grow for as long as the node ran."""
    store = SqliteStore(path)
    call = learned_call()
    for n in range(100):
        store.put(replace(call, call_id=f"c{n}"), None)
        store.delete(f"c{n}")
    assert rows(path, "calls") == 0
    assert tables(path) == {"calls", "clock"}  # no table of tombstones any more


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def version_1_file(path: Path, calls: list[Call], *, clock: bool = True) -> None:
    """A state store as the last release before ng wrote it (schema version 1): its calls,
    a tombstone in `removed`, and the clock columns unless `clock` is False (the release
    before those)."""
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
        names = [*V1_FIELDS, "revision"]
        if clock:
            db.executescript(
                "ALTER TABLE calls ADD COLUMN boot_id TEXT; ALTER TABLE calls ADD COLUMN "
                "started_mono REAL; ALTER TABLE calls ADD COLUMN quiet_mono REAL;"
            )
            names += ["boot_id", "started_mono", "quiet_mono"]
        offset = time.time() - time.monotonic()
        for n, call in enumerate(calls):
            record = encode(call, 20.0, offset)
            values = [record[name] for name in V1_FIELDS] + [n]
            if clock:
                values += ["boot-1", call.started, 20.0]
            marks = ", ".join("?" for _ in names)
            db.execute(f"INSERT INTO calls ({', '.join(names)}) VALUES ({marks})", values)
        db.execute("INSERT INTO removed (call_id, revision, at) VALUES ('gone', 7, 1.0)")


def test_a_version_1_file_is_migrated_with_every_call_as_it_was(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", "lrkp_tsl.store")
    call = learned_call()
    version_1_file(path, [call, named(call, "second")])
    store = SqliteStore(path, boot="boot-1")
    stored = {s.call.call_id: s for s in store.load()}
    assert stored["abc@host"].call == call and stored["second"].call == named(call, "second")
    assert not stored["abc@host"].estimated  # the same boot: its monotonic times are exact
    assert stored["abc@host"].quiet_since == 20.0
    assert "schema version 1 -> 2 (2 calls kept)" in caplog.text
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        protocols = {row[0] for row in db.execute("SELECT protocol FROM calls")}
    assert protocols == {"lrkproxy"}
    assert tables(path) == {"calls", "clock"}  # the tombstones went with their table
    store.put(ng_call(), None)  # and the new columns take what version 1 could not hold
    assert "ng-1" in calls_in(path)


def test_an_earlier_releases_file_without_clock_columns_is_migrated_too(path: Path) -> None:
    version_1_file(path, [learned_call()], clock=False)
    [stored] = SqliteStore(path).load()
    assert stored.estimated and stored.call.call_id == "abc@host"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        have = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
    assert {"boot_id", "started_mono", "quiet_mono", "protocol", "streams"} <= have


def test_a_migration_that_fails_leaves_the_version_1_file_as_it_was(path: Path) -> None:
    version_1_file(path, [learned_call()])
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE calls_v2 (x)")  # in the migration's way: it must fail whole
    with pytest.raises(StoreError, match="calls_v2"):
        SqliteStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("SELECT call_id FROM calls").fetchall() == [("abc@host",)]
        assert db.execute("SELECT count(*) FROM removed").fetchone()[0] == 1


def test_a_version_1_file_is_read_without_writing_when_the_disk_is_full(path: Path) -> None:
    version_1_file(path, [learned_call()])
    reopened = SqliteStore.unavailable(path, StoreError("disk full"))
    [stored] = reopened.load()
    assert stored.call.started_at(100.0) == learned_call()


# -- calls that are not of lrkproxy's shape (ng) ----------------------------------------------


def ng_call() -> Call:
    """An ng call: audio with RTCP (the caller learned from the NAT its signalling came
    from, the callee reachable) and video with rtcp-mux whose callee is on hold at
    0.0.0.0; a third pair reserved for a rejected stream; a delete-delay; the front-end's
    record."""
    table = CallTable(3600, Policy.AUTO)
    audio = StreamSpec(
        ep("192.168.1.20:4000"), ep("10.0.0.10:39998"), ep("8.8.8.8:6000"),
        ep("10.0.1.10:39996"), caller_hint=IPv4Address("203.0.113.7"),
    )  # fmt: skip
    video = StreamSpec(
        ep("192.168.1.20:4002"), ep("10.0.0.10:39994"), None, ep("10.0.1.10:39992"), rtcp=False,
        caller_hint=IPv4Address("203.0.113.7"),
    )  # fmt: skip
    reserved = frozenset({ep("10.0.0.10:39990"), ep("10.0.0.10:39991")})
    op = Relay("ng-1", "ng", (audio, video), reserved=reserved, record='{"sides":[]}',
               end_at=130.0)  # fmt: skip
    for action in table.on_relay(op, 60, 100.0):
        table.applied(action)
    decision = table.on_packet(ep("203.0.113.7:55316"), ep("10.0.0.10:39998"),
                               lambda s, r: True, 100.5)  # fmt: skip
    for action in decision.actions:
        table.applied(action)
    call = table.get("ng-1")
    assert call is not None and call.caller[0].latched == ep("203.0.113.7:55316")
    return call


def test_an_ng_call_comes_back_exactly(path: Path) -> None:
    call = ng_call()
    store = SqliteStore(path)
    store.put(call, None)
    store.close()
    [stored] = SqliteStore(path).load()
    assert stored.call.started == pytest.approx(call.started, abs=1e-3)
    assert stored.call.end_at == pytest.approx(130.0, abs=1e-3)
    assert stored.call.started_at(call.started) == replace(call, end_at=stored.call.end_at)
    assert stored.call.protocol == "ng" and stored.call.record == '{"sides":[]}'
    with sqlite3.connect(path) as db:
        caller, streams = db.execute("SELECT caller, streams FROM calls").fetchone()
    assert caller is None and '"reserved":["10.0.0.10:39990","10.0.0.10:39991"]' in streams


def test_records_round_trip_whatever_the_shape() -> None:
    for call in (learned_call(), ng_call()):
        assert decode(encode(call, 5.0, 1000.0), 1000.0) == StoredCall(call, 5.0)
        assert list(encode(call, None, 0.0)) == FIELDS  # the store's and Redis's layout


def test_a_record_from_an_earlier_release_is_an_lrkproxy_call() -> None:
    record = encode(learned_call(), None, 0.0)
    for name in ("protocol", "streams", "record", "end_after"):
        del record[name]
    assert decode(record, 0.0).call == learned_call()


def test_a_delete_in_a_group_fails_alone(path: Path) -> None:
    store = SqliteStore(path)
    call = learned_call()
    store.put(call, None)
    with sqlite3.connect(path) as db:  # a delete that the database refuses
        db.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON calls WHEN old.call_id = 'abc@host' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    other = replace(call, call_id="other")
    with store.group():
        store.put(other, None)
        with pytest.raises(StoreError, match="refused"):
            store.delete("abc@host")
    assert sorted(s.call.call_id for s in store.load()) == ["abc@host", "other"]


def test_a_database_from_a_newer_release_is_refused(path: Path) -> None:
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this lrkp-tsl understands"):
        SqliteStore(path)


def test_an_unreadable_row_is_skipped_not_fatal(path: Path) -> None:
    store = SqliteStore(path)
    store.put(learned_call(), None)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE calls SET caller = 'not-an-address'")
    assert store.load() == []


def test_a_locked_store_fails_fast_instead_of_stalling_the_node(path: Path) -> None:
    store = SqliteStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # an operator's sqlite3 shell holding a write lock
    try:
        with pytest.raises(StoreError, match="locked"):
            store.put(learned_call(), None)
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_garbage_file_is_a_store_error(path: Path) -> None:
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(path)):
        SqliteStore(path)


def test_clear_forgets_every_call(path: Path) -> None:
    store = SqliteStore(path)
    store.put(learned_call(), None)
    assert store.clear() == 1
    assert store.load() == []
    assert rows(path, "calls") == 0


# -- clocks: what a restart makes of a call's age --------------------------------------------


def step_wall_clock(path: Path, seconds: float) -> None:
    """The wall clock stepped forward by `seconds` while the node was down: as the next
    start reads them, the stored wall-clock times are that much older."""
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE calls SET started = started - ?, quiet_since = quiet_since - ?",
            [seconds, seconds],
        )
        db.execute("UPDATE clock SET alive_wall = alive_wall - ?", [seconds])


def test_a_wall_clock_step_within_one_boot_changes_no_call_age(path: Path) -> None:
    call = learned_call()
    store = SqliteStore(path, boot="boot-1")
    store.put(call, 123.5)
    store.close()
    step_wall_clock(path, 3700)
    [stored] = SqliteStore(path, boot="boot-1").load()
    assert stored.call.started == call.started and stored.quiet_since == 123.5
    assert not stored.estimated


def test_after_a_reboot_an_age_counts_the_downtime_at_most_reboot_gap(path: Path) -> None:
    now = time.monotonic()
    call = replace(learned_call(), started=now - 100)
    store = SqliteStore(path, boot="boot-1")
    store.put(call, now - 30)
    store.alive(now, force=True)
    assert store._db is not None
    store._db.close()  # killed: no clean stop
    step_wall_clock(path, 3700)  # a reboot of 3700 s on the wall clock, or a step
    [stored] = SqliteStore(path, boot="boot-2").load()
    age = time.monotonic() - stored.call.started
    assert 100 + REBOOT_GAP <= age < 100 + REBOOT_GAP + 5
    assert time.monotonic() - stored.quiet_since == pytest.approx(age - 70, abs=5)  # type: ignore[operator]
    assert not stored.estimated


def test_a_row_an_older_release_wrote_is_estimated_from_the_wall_clock(path: Path) -> None:
    store = SqliteStore(path, boot="boot-1")
    store.put(learned_call(), None)
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE calls SET boot_id = NULL, started_mono = NULL, quiet_mono = NULL")
    [stored] = SqliteStore(path, boot="boot-1").load()
    assert stored.estimated
    [other_boot] = SqliteStore(path, boot="boot-3").load()  # and no clock of that boot
    assert other_boot.estimated


# -- a store that cannot be written, or cannot be used ----------------------------------------


def full(store: SqliteStore) -> None:
    """The disk is full, as SQLite reports it (SQLITE_FULL), for this store's connection."""
    db = store._db
    assert db is not None
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")


def freed(store: SqliteStore) -> None:
    assert store._db is not None
    store._db.execute("PRAGMA max_page_count = 1073741823")


def calls_in(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT call_id FROM calls")}


def named(call: Call, call_id: str) -> Call:
    return replace(call, call_id=call_id)


def test_a_full_disk_keeps_writes_in_memory_and_writes_them_when_it_can(path: Path) -> None:
    store = SqliteStore(path)
    call = learned_call()
    store.put(call, None)
    gone = named(call, "gone")
    store.put(gone, None)
    full(store)
    bulk = [named(call, f"bulk-{i}") for i in range(50)]
    with store.group():  # a group commit: none refused, none lost
        for each in bulk:
            store.put(each, 1.0)
    store.delete("gone")
    store.set_quiet("abc@host", 7.0)
    store.put(named(call, "late"), None)
    store.set_quiet("late", 9.0)
    assert not store.writable
    assert calls_in(path) == {"abc@host", "gone"}
    store.tick(time.monotonic() + 1)  # not yet due, and still full anyway
    assert not store.writable
    freed(store)
    store.tick(time.monotonic() + 10)
    assert store.writable
    stored = {s.call.call_id: s for s in store.load()}
    assert set(stored) == {"abc@host", "late"} | {c.call_id for c in bulk}
    assert stored["abc@host"].quiet_since == 7.0 and stored["late"].quiet_since == 9.0
    store.put(named(call, "after"), None)  # and writes go straight to the file again
    assert "after" in calls_in(path)


def test_a_store_locked_by_another_process_still_refuses_the_write(path: Path) -> None:
    store = SqliteStore(path)
    with sqlite3.connect(path, isolation_level=None) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            store.put(learned_call(), None)
        other.execute("ROLLBACK")
    assert store.writable  # a lock lasts seconds: Kamailio's retransmission tries again


@pytest.mark.parametrize(
    ("content", "label"),
    [
        (b"this is not a database\n" * 100, "bad"),
        (b"SQLite format 3\0" + b"\xff" * 600, "bad"),  # a header, then nothing of use
        (None, "newer"),
        ("foreign", "bad"),
    ],
)
def test_open_state_sets_a_file_it_cannot_use_aside_and_starts_empty(
    path: Path, content: bytes | str | None, label: str, caplog: pytest.LogCaptureFixture
) -> None:
    if content is None:
        SqliteStore(path).close()
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    elif content == "foreign":
        with sqlite3.connect(path) as db:
            db.executescript("CREATE TABLE calls (id INTEGER); PRAGMA user_version = 1;")
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    before = path.read_bytes()
    store = open_state(path)
    assert store.writable and store.load() == []
    found = path.parent.glob(f"{FILENAME}.{label}-*")
    (aside,) = (f for f in found if not f.name.endswith(("-wal", "-shm")))
    assert aside.read_bytes()[:100] == before[:100]  # moved, never rewritten
    assert f"Moved to {aside}" in caplog.text
    store.put(learned_call(), None)
    assert calls_in(path) == {"abc@host"}


def test_open_state_of_a_store_it_cannot_write_reads_what_it_holds(path: Path) -> None:
    store = SqliteStore(path)
    store.put(learned_call(), None)
    store.close()
    path.chmod(0o444)
    path.parent.chmod(0o555)  # as if the disk were full: nothing can be created there
    try:
        reopened = SqliteStore.unavailable(path, StoreError("disk full"))
        assert [s.call.call_id for s in reopened.load()] == ["abc@host"]
        assert not reopened.writable
        reopened.delete("abc@host")  # kept for later
    finally:
        path.parent.chmod(0o755)
        path.chmod(0o644)
    reopened.tick(time.monotonic() + 10)
    assert reopened.writable and calls_in(path) == set()
