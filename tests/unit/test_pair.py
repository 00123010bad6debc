"""The pair's replicated store and its publishing worker: Redis never holds a command, a
Redis failure never fails one, and whatever Redis missed is made good."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import cast

import pytest

from lrkp_tsl.latching import Policy
from lrkp_tsl.media import CallMedia, Endpoint
from lrkp_tsl.pair import ReplicatedStore
from lrkp_tsl.publishing import Publishing
from lrkp_tsl.replication import Delete, Op, Publisher, Put, Quiet, ReplicationError
from lrkp_tsl.session import Call, CallTable
from lrkp_tsl.store import SqliteStore


class FakePublisher:
    """Redis as a dict; `down` makes every call fail, `hold` makes writes wait for it."""

    def __init__(self) -> None:
        self.table: dict[str, Mapping[str, object]] = {}
        self.quiet: dict[str, float | None] = {}
        self.down = False
        self.resets = 0
        self.promoted = 0
        self.writes = 0
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()  # a write is waiting for `hold`
        self.threads: set[int] = set()

    def _check(self) -> None:
        self.threads.add(threading.get_ident())
        if self.down:
            raise ReplicationError("redis://peer: connection refused")

    def write(self, ops: Sequence[Op]) -> None:
        self._check()
        if not self.hold.is_set():
            self.holding.set()
            self.hold.wait()
        for op in ops:
            if isinstance(op, Put):
                self.table[str(op.record["call_id"])] = op.record
                self.quiet.pop(str(op.record["call_id"]), None)
            elif isinstance(op, Delete):
                self.table.pop(op.call_id, None)
                self.quiet.pop(op.call_id, None)
            elif isinstance(op, Quiet):
                self.quiet[op.call_id] = op.since
        self.writes += 1

    def reset_encoded(self, records: Iterable[tuple[str, str]]) -> None:
        self._check()
        self.table = {call_id: json.loads(text) for call_id, text in records}
        self.quiet = {}
        self.resets += 1

    def promote(self) -> None:
        self._check()
        self.promoted += 1

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


def wait_for(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.002)


class Setup:
    def __init__(self, tmp_path: Path, max_queued: int = 1000) -> None:
        self.active = [False]
        self.publisher = FakePublisher()
        self.local = SqliteStore(tmp_path / "calls.sqlite3")
        self.publishing = Publishing(
            cast(Publisher, self.publisher),
            self.local.records,
            self.local.wall_offset,
            max_queued=max_queued,
            retry_interval=0.01,
        )
        self.publishing.start()
        self.store = ReplicatedStore(self.local, self.publishing, lambda: self.active[0])

    def promote(self) -> None:
        self.active[0] = True
        self.publishing.master()

    def settled(self) -> bool:
        state = self.publishing.state()
        return state.queued == 0 and state.ok

    def redis_holds(self, *call_ids: str) -> None:
        wait_for(f"Redis holds {call_ids}", lambda: set(self.publisher.table) == set(call_ids))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    made = Setup(tmp_path)
    try:
        yield made
    finally:
        made.publisher.hold.set()
        made.publishing.close()
        made.local.close()


def test_the_active_publishes_and_a_standby_does_not(setup: Setup) -> None:
    setup.store.put(call("c1", 20000), None)  # standby: its local store only
    assert len(setup.store.load()) == 1
    setup.promote()  # REPLICAOF NO ONE, then the whole table (read from the store)
    setup.redis_holds("c1")
    assert setup.publisher.promoted == 1 and setup.publisher.resets == 1
    setup.store.put(call("c2", 20100), None)
    setup.store.set_quiet("c2", 5.0)  # the media state goes to the standby too
    setup.redis_holds("c1", "c2")
    wait_for("quiet replicated", lambda: "c2" in setup.publisher.quiet)
    assert setup.publisher.quiet["c2"] == pytest.approx(5.0 + setup.local.wall_offset)
    setup.store.delete("c1")
    setup.redis_holds("c2")
    assert threading.get_ident() not in setup.publisher.threads  # never the caller's thread


def test_a_stalled_redis_never_holds_a_command(setup: Setup) -> None:
    setup.promote()
    wait_for("promoted", setup.settled)
    setup.publisher.hold.clear()  # Redis stops answering (SIGSTOP)
    setup.store.put(call("c0", 19900), None)
    wait_for("the worker waits on Redis", setup.publisher.holding.is_set)
    for index in range(500):  # every one returns at once while Redis is frozen
        setup.store.put(call(f"c{index + 1}", 20000 + 4 * index), None)
    assert not setup.publisher.hold.is_set() and setup.publishing.state().queued == 500
    setup.publisher.hold.set()
    setup.redis_holds(*(f"c{index}" for index in range(501)))
    assert setup.publisher.writes < 100  # written in batches, not one transaction each


def test_a_redis_outage_never_fails_a_command_and_is_made_good(setup: Setup) -> None:
    setup.promote()
    setup.store.put(call("c1", 20000), None)
    setup.redis_holds("c1")
    setup.publisher.down = True
    setup.store.put(call("c2", 20100), None)  # no exception: the command succeeds
    setup.store.delete("c1")
    wait_for("the failure seen", lambda: setup.publishing.state().error is not None)
    assert [s.call.call_id for s in setup.store.load()] == ["c2"]
    setup.publisher.down = False  # Redis answers again: the whole table is republished
    setup.redis_holds("c2")
    wait_for("recovered", setup.settled)
    assert setup.publishing.state().error is None


def test_a_redis_restarted_empty_is_refilled_by_the_check(setup: Setup) -> None:
    setup.promote()
    setup.store.put(call("c1", 20000), None)
    setup.redis_holds("c1")
    setup.publisher.table.clear()  # Redis restarted without persistence
    setup.publishing.check(calls=1)
    setup.redis_holds("c1")


def test_a_full_queue_drops_changes_and_republishes_the_table(tmp_path: Path) -> None:
    made = Setup(tmp_path, max_queued=10)
    try:
        made.promote()
        wait_for("promoted", made.settled)
        made.publisher.hold.clear()
        made.store.put(call("c0", 19900), None)
        wait_for("the worker waits on Redis", made.publisher.holding.is_set)
        for index in range(50):  # bounded: 10 queued, the rest dropped
            made.store.put(call(f"c{index + 1}", 20000 + 4 * index), None)
        state = made.publishing.state()
        assert state.queued == 10 and state.dropped == 40
        made.publisher.hold.set()
        made.redis_holds(*(f"c{index}" for index in range(51)))  # nothing lost
        assert made.publisher.resets == 2  # promotion, then the dropped changes
    finally:
        made.publisher.hold.set()
        made.publishing.close()
        made.local.close()


def test_a_group_publishes_only_what_it_committed(setup: Setup) -> None:
    setup.promote()
    wait_for("promoted", setup.settled)
    with setup.store.group():
        setup.store.put(call("c1", 20000), None)
        assert setup.publishing.state().queued == 0  # not before the commit
    setup.redis_holds("c1")
    with pytest.raises(RuntimeError), setup.store.group():
        setup.store.put(call("c2", 20100), None)
        raise RuntimeError("the group fails: nothing of it is durable")
    setup.publishing.check(calls=1)
    setup.redis_holds("c1")


def test_standby_waits_for_the_writes_before_it(setup: Setup) -> None:
    """The follower makes Redis a replica only after the worker stopped writing to it."""
    setup.promote()
    wait_for("promoted", setup.settled)
    setup.publisher.hold.clear()
    setup.store.put(call("c1", 20000), None)
    wait_for("the worker waits on Redis", setup.publisher.holding.is_set)
    setup.active[0] = False
    stopped = setup.publishing.standby()
    assert not stopped.wait(0.05)  # a write is still in flight
    setup.publisher.hold.set()
    assert stopped.wait(5.0)
