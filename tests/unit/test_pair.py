"""The pair's replicated store: Redis failures never fail a command and are made good."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address
from pathlib import Path
from typing import cast

from lrkp_tsl.latching import Policy
from lrkp_tsl.media import CallMedia, Endpoint
from lrkp_tsl.pair import ReplicatedStore
from lrkp_tsl.replication import Publisher, ReplicationError
from lrkp_tsl.session import Call, CallTable
from lrkp_tsl.store import SqliteStore


class FakePublisher:
    def __init__(self) -> None:
        self.table: dict[str, Mapping[str, object]] = {}
        self.needs_reset = True
        self.down = False
        self.resets = 0

    def _check(self) -> None:
        if self.down:
            self.needs_reset = True
            raise ReplicationError("redis://peer: connection refused")

    def put(self, record: Mapping[str, object]) -> None:
        self._check()
        self.table[str(record["call_id"])] = record

    def delete(self, call_id: str) -> None:
        self._check()
        self.table.pop(call_id, None)

    def reset(self, records: Iterable[Mapping[str, object]]) -> None:
        self._check()
        self.table = {str(r["call_id"]): r for r in records}
        self.needs_reset = False
        self.resets += 1

    def size(self) -> int:
        self._check()
        return len(self.table)


def call(call_id: str, port: int) -> Call:
    table = CallTable(3600, Policy.STRICT)
    ip = IPv4Address("10.0.0.10")
    media = CallMedia(call_id, Endpoint(IPv4Address("10.0.0.21"), 4000), Endpoint(ip, port + 2),
                      Endpoint(IPv4Address("10.0.1.31"), 6000), Endpoint(ip, port))  # fmt: skip
    for action in table.on_set(media, 60, 0.0):
        table.applied(action)
    made = table.get(call_id)
    assert made is not None
    return made


def store(tmp_path: Path, active: list[bool]) -> tuple[ReplicatedStore, FakePublisher, list[str]]:
    publisher = FakePublisher()
    counted: list[str] = []
    replicated = ReplicatedStore(
        SqliteStore(tmp_path / "calls.sqlite3"),
        cast(Publisher, publisher),
        lambda: active[0],
        counted.append,
    )
    return replicated, publisher, counted


def test_the_active_publishes_and_a_standby_does_not(tmp_path: Path) -> None:
    active = [False]
    replicated, publisher, _ = store(tmp_path, active)
    replicated.put(call("c1", 20000), None)
    assert publisher.table == {} and len(replicated.load()) == 1
    active[0] = True
    replicated.put(call("c2", 20100), None)  # Redis needs the whole table: deferred...
    assert publisher.table == {}
    replicated.check(calls=2)  # ...to the periodic check, never on a command's path
    assert set(publisher.table) == {"c1", "c2"} and publisher.resets == 1
    replicated.delete("c1")
    assert set(publisher.table) == {"c2"}


def test_a_redis_outage_never_fails_a_command_and_is_made_good(tmp_path: Path) -> None:
    replicated, publisher, counted = store(tmp_path, [True])
    replicated.check(calls=0)
    replicated.put(call("c1", 20000), None)
    publisher.down = True
    replicated.put(call("c2", 20100), None)  # no exception: the command succeeds
    replicated.delete("c1")  # Redis needs the whole table now: not retried per command
    assert counted == ["error.replication", "replication.deferred"]
    assert [s.call.call_id for s in replicated.load()] == ["c2"]
    publisher.down = False
    replicated.check(calls=1)  # the periodic check republishes what Redis missed
    assert set(publisher.table) == {"c2"}


def test_a_redis_restarted_empty_is_refilled_by_the_check(tmp_path: Path) -> None:
    replicated, publisher, _ = store(tmp_path, [True])
    replicated.check(calls=0)
    replicated.put(call("c1", 20000), None)
    publisher.table.clear()  # Redis restarted without persistence
    replicated.check(calls=1)
    assert set(publisher.table) == {"c1"}
