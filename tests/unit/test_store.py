"""The SQLite state store: what goes in comes back out exactly, across a reopen."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from lrkp_tsl.errors import StoreError
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import CallMedia, Endpoint, InstalledFlow
from lrkp_tsl.session import Call, CallTable, rebuild
from lrkp_tsl.store import FILENAME, SCHEMA_VERSION, SqliteStore


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
    other = replace(call, media=replace(call.media, call_id="other"))
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
        store.put(replace(call, media=replace(call.media, call_id=f"c{n}")), None)
        store.delete(f"c{n}")
    assert rows(path, "calls") == rows(path, "removed") == 0


def test_an_older_releases_tombstones_are_dropped_at_startup(path: Path) -> None:
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO removed (call_id, revision, at) VALUES ('gone', 7, 1.0)")
    SqliteStore(path).close()
    assert rows(path, "removed") == 0


def test_a_delete_in_a_group_fails_alone(path: Path) -> None:
    store = SqliteStore(path)
    call = learned_call()
    store.put(call, None)
    with sqlite3.connect(path) as db:  # a delete that the database refuses
        db.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON calls WHEN old.call_id = 'abc@host' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    other = replace(call, media=replace(call.media, call_id="other"))
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
    assert rows(path, "calls") == rows(path, "removed") == 0
