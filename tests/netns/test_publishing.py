"""The active's changes into its Redis on the event loop: batched, in order, never waiting
for Redis, and made good after anything Redis did (froze, restarted empty, refused).

Real redis-server processes (lrkp_lab.redis) and a real state store; the event loop is the
test's own (asyncio.run), as the node's would be."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from lrkp_lab.lab import Lab
from lrkp_lab.redis import RedisServer
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import CallMedia, Endpoint
from lrkp_tsl.pair import ReplicatedStore
from lrkp_tsl.publishing import Publishing
from lrkp_tsl.records import encode
from lrkp_tsl.replication import CALLS, QUIET
from lrkp_tsl.session import Call, CallTable
from lrkp_tsl.store import SqliteStore


@pytest.fixture
def redis_server(lab: Lab) -> Iterator[RedisServer]:
    with RedisServer(lab, "relay", "10.201.1.1") as server:
        yield server


def call(index: int) -> Call:
    table = CallTable(3600, Policy.STRICT)
    ip = IPv4Address("10.0.0.10")
    port = 20000 + 4 * index
    media = CallMedia(f"c{index}", Endpoint(IPv4Address("10.0.0.21"), 4000),
                      Endpoint(ip, port + 2), Endpoint(IPv4Address("10.0.1.31"), 6000),
                      Endpoint(ip, port))  # fmt: skip
    for action in table.on_set(media, 60, 0.0):
        table.applied(action)
    made = table.get(f"c{index}")
    assert made is not None
    return made


class Active:
    """An active node's store and publisher, on the running event loop."""

    def __init__(self, server: RedisServer, tmp_path: Path, **options: float) -> None:
        self.server = server
        self.local = SqliteStore(tmp_path / "calls.sqlite3")
        self.publishing = Publishing(
            server.url, self.local.records, self.local.wall_offset, retry_interval=0.1,
            **options,  # type: ignore[arg-type]
        )  # fmt: skip
        self.store = ReplicatedStore(self.local, self.publishing, lambda: True)

    def __enter__(self) -> Active:
        self.publishing.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.publishing.close()
        self.local.close()

    def held(self) -> set[str]:
        client = self.server.client()
        try:
            return {str(key) for key in client.hkeys(CALLS)}
        except Exception:
            return set()
        finally:
            client.close()

    def executed(self) -> int:
        client = self.server.client()
        try:
            stats = client.info("commandstats")
            return int(stats.get("cmdstat_exec", {}).get("calls", 0))
        finally:
            client.close()


async def until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def test_changes_go_out_in_order_one_transaction_per_loop_turn(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async def test() -> None:
        with Active(redis_server, tmp_path) as active:
            active.store.put(call(0), None)  # before promotion: in the store only
            active.publishing.master()  # REPLICAOF NO ONE, then the whole table
            await until("promoted", lambda: active.publishing.state().ok)
            assert active.held() == {"c0"}
            before = active.executed()
            for index in range(1, 501):  # one event-loop turn
                active.store.put(call(index), 7.0)
            active.store.set_quiet("c1", None)
            active.store.delete("c2")
            await until("written", lambda: len(active.held()) == 500)
            assert active.executed() - before == 1  # all of it in one MULTI/EXEC
            # Replies are read every WATCH_INTERVAL, not as they come (they wake nothing).
            await until("acknowledged", lambda: active.publishing.state().written == 502)
            client = redis_server.client()
            assert json.loads(str(client.hget(CALLS, "c3")))["quiet_since"] == pytest.approx(
                7.0 + active.local.wall_offset, abs=1e-3
            )
            assert client.hget(QUIET, "c1") == "null"
            client.close()

    run(test)


def test_a_frozen_redis_never_holds_the_loop_and_misses_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async def test() -> None:
        with Active(redis_server, tmp_path) as active:
            active.publishing.master()
            await until("promoted", lambda: active.publishing.state().ok)
            redis_server.freeze()
            try:
                for index in range(200):  # the loop goes on, turn after turn
                    active.store.put(call(index), None)
                    await asyncio.sleep(0)
                await asyncio.sleep(0.3)  # shorter than the timeout: nothing fails
            finally:
                redis_server.thaw()
            await until("written", lambda: len(active.held()) == 200)
            assert active.publishing.state().error is None

    run(test)


def test_a_redis_that_stays_frozen_is_caught_up_by_a_reset(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async def test() -> None:
        with Active(redis_server, tmp_path, timeout=0.2, max_queued=50) as active:
            active.publishing.master()
            await until("promoted", lambda: active.publishing.state().ok)
            redis_server.freeze()
            try:
                for index in range(300):  # past max_queued and the timeout
                    active.store.put(call(index), None)
                    if index % 10 == 0:
                        await asyncio.sleep(0.01)
                await until("the failure seen", lambda: active.publishing.state().error is not None)
            finally:
                redis_server.thaw()
            await until("republished", lambda: active.held() == {f"c{i}" for i in range(300)})
            await until("recovered", lambda: active.publishing.state().ok)
            assert active.publishing.state().error is None

    run(test)


def test_a_redis_restarted_empty_is_refilled(redis_server: RedisServer, tmp_path: Path) -> None:
    async def test() -> None:
        with Active(redis_server, tmp_path) as active:
            active.publishing.master()
            for index in range(20):
                active.store.put(call(index), None)
            await until("written", lambda: len(active.held()) == 20)
            redis_server.kill()
            redis_server.start()  # empty, a master
            active.publishing.check(20)  # the node's periodic size check
            active.store.put(call(20), None)  # a change on the new connection
            await until("refilled", lambda: len(active.held()) == 21)
            resets = active.publishing.state().resets
            assert resets == 2, resets

    run(test)


def test_standby_stops_writing_at_once(redis_server: RedisServer, tmp_path: Path) -> None:
    async def test() -> None:
        with Active(redis_server, tmp_path) as active:
            active.publishing.master()
            await until("promoted", lambda: active.publishing.state().ok)
            assert active.publishing.standby().is_set()
            active.publishing.put(encode(call(1), None, active.local.wall_offset))
            await asyncio.sleep(0.2)
            assert active.held() == set() and active.publishing.state().queued == 0

    run(test)


def test_a_redis_made_a_replica_behind_the_nodes_back_is_taken_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The follower's last REPLICAOF can race a takeover; an operator can type one: the
    active's Redis then refuses every write (READONLY) until it is a master again."""

    async def test() -> None:
        with Active(redis_server, tmp_path) as active:
            active.publishing.master()
            await until("promoted", lambda: active.publishing.state().ok)
            client = redis_server.client()
            client.replicaof("10.201.1.99", 6379)  # nobody there
            try:
                active.store.put(call(1), None)  # READONLY: dropped, then republished
                await until("a master again", lambda: active.held() == {"c1"})
                assert client.info("replication")["role"] == "master"
            finally:
                client.replicaof("no", "one")
                client.close()

    run(test)
