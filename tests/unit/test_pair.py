"""The pair's replicated store: the local store first, Redis only for what it committed.

The publisher itself (Redis on the event loop, never waiting) is tested against real
Redis servers: tests/netns/test_publishing.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import cast

import pytest

from lrkp_tsl.latching import Policy
from lrkp_tsl.media import CallMedia, Endpoint
from lrkp_tsl.pair import ReplicatedStore
from lrkp_tsl.publishing import Publishing
from lrkp_tsl.session import Call, CallTable
from lrkp_tsl.store import SqliteStore


class FakePublishing:
    """What the store hands the publisher, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, object]] = []
        self.batches = 0

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self.batches += 1
        yield

    def put(self, record: dict[str, object]) -> None:
        self.sent.append(("put", str(record["call_id"]), record["quiet_since"]))

    def delete(self, call_id: str) -> None:
        self.sent.append(("del", call_id, None))

    def quiet(self, call_id: str, since: float | None) -> None:
        self.sent.append(("quiet", call_id, since))


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


def store(tmp_path: Path, active: list[bool]) -> tuple[ReplicatedStore, FakePublishing]:
    publishing = FakePublishing()
    replicated = ReplicatedStore(
        SqliteStore(tmp_path / "calls.sqlite3"), cast(Publishing, publishing), lambda: active[0]
    )
    return replicated, publishing


def test_the_active_publishes_and_a_standby_does_not(tmp_path: Path) -> None:
    active = [False]
    replicated, publishing = store(tmp_path, active)
    replicated.put(call("c1", 20000), None)  # standby: its local store only
    assert publishing.sent == [] and len(replicated.load()) == 1
    active[0] = True
    replicated.put(call("c2", 20100), 3.0)
    replicated.set_quiet("c2", None)  # the media state goes to the standby too
    replicated.delete("c1")
    offset = replicated.local.wall_offset  # records carry wall-clock times
    assert publishing.sent == [("put", "c2", 3.0 + offset), ("quiet", "c2", None),
                               ("del", "c1", None)]  # fmt: skip
    assert {s.call.call_id for s in replicated.load()} == {"c2"}


def test_a_group_publishes_only_what_it_committed(tmp_path: Path) -> None:
    replicated, publishing = store(tmp_path, [True])
    with replicated.group():
        replicated.put(call("c1", 20000), None)
        replicated.put(call("c2", 20100), None)
        assert publishing.sent == []  # not before the commit
    assert [name for _, name, _ in publishing.sent] == ["c1", "c2"]
    assert publishing.batches == 1  # together, in one transaction
    with pytest.raises(RuntimeError), replicated.group():
        replicated.put(call("c3", 20200), None)
        raise RuntimeError("the group fails: none of its writes is durable")
    assert [name for _, name, _ in publishing.sent] == ["c1", "c2"]
    assert {s.call.call_id for s in replicated.load()} == {"c1", "c2"}
