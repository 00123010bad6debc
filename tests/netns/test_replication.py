"""The replication feed through real Redis servers: the active's (master, host `relay`) and
the standby's (its replica, host `relay2`), replicating over the lab's internal network."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from lrkp_lab.lab import Lab
from lrkp_lab.redis import RedisServer
from lrkp_lab.waiting import wait_for
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import CallMedia, Endpoint
from lrkp_tsl.records import StoredCall, decode, encode
from lrkp_tsl.replication import (
    CALLS,
    CHANGES,
    ZERO_ID,
    Change,
    Follower,
    Publisher,
    ReplicationError,
    ReplicationGap,
)
from lrkp_tsl.session import Call, CallTable

WALL = 1_700_000_000.0  # wall_offset: engine times + WALL are exact in binary floating point
MASTER_IP = "10.201.1.1"
REPLICA_IP = "10.201.1.2"


def ep(text: str) -> Endpoint:
    ip, port = text.split(":")
    return Endpoint(IPv4Address(ip), int(port))


def make_call(n: int, latched: bool = False) -> Call:
    """Call `call-<n>@lab`: a NAT'd caller, its RTP leg learned if `latched`."""
    table = CallTable(3600, Policy.AUTO)
    relay = 20000 + 4 * n
    media = CallMedia(
        f"call-{n}@lab", ep(f"192.168.1.20:{4000 + 2 * n}"), ep(f"10.201.1.1:{relay + 2}"),
        ep(f"8.8.8.8:{6000 + 2 * n}"), ep(f"10.201.1.1:{relay}"),
    )  # fmt: skip
    for action in table.on_set(media, 60, 100.0):
        table.applied(action)
    if latched:
        decision = table.on_packet(
            ep(f"10.201.1.20:{40000 + n}"), ep(f"10.201.1.1:{relay + 2}"), lambda s, r: True
        )
        for action in decision.actions:
            table.applied(action)
    call = table.get(media.call_id)
    assert call is not None
    if latched:
        assert call.caller[0].latched == ep(f"10.201.1.20:{40000 + n}")
    return call


def record(n: int, latched: bool = False, quiet: float | None = None) -> dict[str, object]:
    return encode(make_call(n, latched), quiet, WALL)


class Mirror:
    """What a standby does with the feed: a snapshot, then every change after it."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.reloads = 0
        self.seen: list[Change] = []
        self.reload()

    def reload(self) -> None:
        self.after, self.table = self.follower.snapshot()
        self.reloads += 1

    def step(self, block_ms: int = 200, count: int = 1000) -> list[Change]:
        changes = self.follower.changes(self.after, block_ms, count)
        for change in changes:
            self.seen.append(change)
            self.after = change.stream_id
            if change.op == "put":
                assert change.call_id is not None and change.record is not None
                self.table[change.call_id] = change.record
            elif change.op == "del":
                assert change.call_id is not None
                self.table.pop(change.call_id, None)
            else:
                self.reload()  # a reset: the hash is the whole new table
        return changes

    def catch_up(self, server: RedisServer, timeout: float = 5.0) -> None:
        """Apply changes until the mirror is at the last entry of `server`'s stream."""
        last = last_id(server)
        deadline = time.monotonic() + timeout
        while self.after != last:
            assert time.monotonic() < deadline, f"mirror at {self.after}, stream at {last}"
            self.step(block_ms=50)


def hash_of(server: RedisServer) -> dict[str, str]:
    client = server.client()
    try:
        return {str(k): str(v) for k, v in client.hgetall(CALLS).items()}
    finally:
        client.close()


def last_id(server: RedisServer) -> str:
    """The ID of the last entry of `server`'s stream (0-0: none)."""
    client = server.client()
    try:
        entries = client.xrevrange(CHANGES, count=1)
        return str(entries[0][0]) if entries else ZERO_ID
    finally:
        client.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


@pytest.fixture
def master(lab: Lab) -> Iterator[RedisServer]:
    with RedisServer(lab, "relay", MASTER_IP) as server:
        yield server


@pytest.fixture
def replica(lab: Lab, master: RedisServer) -> Iterator[RedisServer]:
    with RedisServer(lab, "relay2", REPLICA_IP) as server:
        follower = Follower(server.url)
        try:
            follower.follow(master.tcp_url)
            wait_for("the replica synced with the master", follower.synced)
        finally:
            follower.close()
        yield server


def test_puts_and_deletes_reach_a_follower_on_the_replica_in_order(
    master: RedisServer, replica: RedisServer
) -> None:
    publisher, follower = Publisher(master.url), Follower(replica.url)
    after, table = follower.snapshot()
    assert (after, table) == (ZERO_ID, {})
    first, second, moved = make_call(1), make_call(2), make_call(1, latched=True)
    publisher.put(encode(first, None, WALL))
    publisher.put(encode(second, 123.5, WALL))
    publisher.put(encode(moved, None, WALL))  # the caller's address learned
    publisher.delete("call-2@lab")

    changes: list[Change] = []
    deadline = time.monotonic() + 5
    while len(changes) < 4 and time.monotonic() < deadline:
        changes += follower.changes(changes[-1].stream_id if changes else after, 500, 10)
    assert [(c.op, c.call_id) for c in changes] == [
        ("put", "call-1@lab"),
        ("put", "call-2@lab"),
        ("put", "call-1@lab"),
        ("del", "call-2@lab"),
    ]
    ids = [c.stream_id for c in changes]
    assert sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) == ids
    assert changes[0].record == encode(first, None, WALL)
    assert changes[1].record is not None and changes[2].record is not None
    assert decode(changes[1].record, WALL) == StoredCall(second, 123.5)
    assert decode(changes[2].record, WALL) == StoredCall(moved, None)
    assert changes[3].record is None
    last, table = follower.snapshot()
    assert last == ids[-1]
    assert table == {"call-1@lab": encode(moved, None, WALL)}
    assert follower.changes(last, 0, 10) == []  # nothing more, and no waiting


def test_a_snapshot_plus_the_changes_after_it_give_the_full_state(
    master: RedisServer, replica: RedisServer
) -> None:
    """Snapshots taken while the active writes, each followed by the feed, end equal to
    the active's table: nothing missed, nothing applied twice."""
    publisher = Publisher(master.url)
    model: dict[str, dict[str, object]] = {}
    records = {n: [record(n, latched, quiet) for latched, quiet in ((False, None), (True, 7.0))]
               for n in range(100)}  # fmt: skip
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(3000):
                n = (i * 37) % 100
                if i % 7 == 3:
                    publisher.delete(f"call-{n}@lab")
                    model.pop(f"call-{n}@lab", None)
                else:
                    rec = records[n][i % 2]
                    publisher.put(rec)
                    model[f"call-{n}@lab"] = rec
                if i % 50 == 0:
                    time.sleep(0.001)  # let snapshots land mid-stream
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    mirrors: list[Mirror] = []
    try:
        while not done.is_set() and len(mirrors) < 20:
            mirror = Mirror(Follower(replica.url))
            if not done.is_set():
                mirrors.append(mirror)  # taken while the writer was writing
            time.sleep(0.02)
            for mirror in mirrors:
                mirror.step(block_ms=0)
    finally:
        writer.join()
    assert not failures, failures
    assert len(mirrors) >= 3, "the writer finished before three snapshots were taken"
    for mirror in mirrors:
        mirror.catch_up(master)
        assert mirror.table == model
        assert mirror.reloads == 1
    assert hash_of(master) == hash_of(replica)


def test_a_reset_replaces_the_whole_table_everywhere(
    master: RedisServer, replica: RedisServer
) -> None:
    publisher = Publisher(master.url)
    assert publisher.needs_reset  # nothing says this Redis holds our table yet
    for n in (1, 2, 3):
        publisher.put(record(n))
    mirror = Mirror(Follower(replica.url))
    mirror.catch_up(master)
    assert set(mirror.table) == {"call-1@lab", "call-2@lab", "call-3@lab"}

    publisher.reset([record(3, latched=True), record(4)])
    assert not publisher.needs_reset
    mirror.catch_up(master)
    assert mirror.seen[-1].op == "reset"
    assert mirror.reloads == 2
    assert mirror.table == {"call-3@lab": record(3, latched=True), "call-4@lab": record(4)}
    assert set(hash_of(replica)) == {"call-3@lab", "call-4@lab"}
    publisher.reset([])
    mirror.catch_up(master)
    assert mirror.table == {} and hash_of(master) == {}


def test_promote_then_the_old_master_follows_the_new_one(
    master: RedisServer, replica: RedisServer
) -> None:
    old = Publisher(master.url)
    for n in (1, 2):
        old.put(record(n))
    standby = Mirror(Follower(replica.url))
    standby.catch_up(master)

    new = Publisher(replica.url)
    with pytest.raises(ReplicationError, match=r"READONLY.*promote it"):  # replica: no writes
        new.put(record(3))
    assert new.needs_reset
    new.promote()  # takeover: the standby's Redis becomes a master, with its data
    new.reset(standby.table.values())
    new.put(record(3))
    assert set(hash_of(replica)) == {"call-1@lab", "call-2@lab", "call-3@lab"}
    # Split brain: the old master still takes writes of its own, which must not survive.
    old.put(record(9))
    old.delete("call-1@lab")

    returning = Follower(master.url)
    returning.snapshot()
    replid = returning.replication_id()
    outcome: list[object] = []

    def blocked_read() -> None:
        try:
            outcome.append(returning.changes(last_id(master), 5000, 10))
        except ReplicationError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=blocked_read)
    reader.start()
    time.sleep(0.2)  # the XREAD is blocked on the old master now
    started = time.monotonic()
    returning.follow(replica.tcp_url)
    took = wait_for("the returning node's Redis synced", returning.synced, timeout=10)
    reader.join(6)
    assert not reader.is_alive()
    print(f"\nREPLICAOF -> synced: {took * 1000:.0f} ms; blocked XREAD got {outcome!r}")
    assert took < 1.0, f"full resync took {took:.2f} s"
    assert hash_of(master) == hash_of(replica)
    assert set(hash_of(master)) == {"call-1@lab", "call-2@lab", "call-3@lab"}
    assert returning.replication_id() != replid
    # The blocked XREAD did not carry on silently into the new history.
    assert len(outcome) == 1 and isinstance(outcome[0], ReplicationError), outcome
    # The old follower position is refused: its data was replaced; a reload works.
    with pytest.raises(ReplicationGap, match="replaced"):
        returning.changes(last_id(master), 0, 10)
    last, table = returning.snapshot()
    assert table == standby.table | {"call-3@lab": record(3)}
    assert returning.changes(last, 0, 10) == []
    # And it follows the new active from there.
    new.delete("call-2@lab")
    wait_for("the delete reached the old master", lambda: "call-2@lab" not in hash_of(master))
    [change] = returning.changes(last, 1000, 10)
    assert (change.op, change.call_id) == ("del", "call-2@lab")
    print(f"elapsed since REPLICAOF: {time.monotonic() - started:.2f} s")


def test_a_full_resync_under_a_blocked_read_is_caught_when_it_returns(lab: Lab) -> None:
    """Redis 7.0 keeps an XREAD blocked while its replica reloads all its data from the
    master: the follower must still learn that its position means nothing any more."""
    debug = {"repl-diskless-sync-delay": "0", "enable-debug-command": "yes"}
    with (
        RedisServer(lab, "relay", MASTER_IP, config=debug) as master,
        RedisServer(lab, "relay2", REPLICA_IP) as replica,
    ):
        Publisher(master.url).reset([record(1)])
        follower = Follower(replica.url)
        follower.follow(master.tcp_url)
        wait_for("the replica synced", follower.synced)
        after, table = follower.snapshot()
        assert set(table) == {"call-1@lab"}
        outcome: list[object] = []

        def read() -> None:
            began = time.monotonic()
            try:
                outcome.append(follower.changes(after, 1000, 10))
            except ReplicationError as exc:
                outcome.append(exc)
            outcome.append(time.monotonic() - began)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.2)
        client = master.client()
        # A new replication ID on the master, then the link cut: the replica cannot
        # continue where it was and loads the master's whole data set again.
        client.execute_command("DEBUG", "CHANGE-REPL-ID")  # type: ignore[no-untyped-call]
        client.client_kill_filter(_type="replica")
        client.close()
        reader.join(5)
        assert len(outcome) == 2, outcome
        assert isinstance(outcome[0], ReplicationGap) and "replaced" in str(outcome[0])
        assert isinstance(outcome[1], float) and outcome[1] > 0.9  # it stayed blocked
        assert "Finished with success" in replica.log.read_text()


def test_an_unreachable_redis_is_an_error_at_once_not_a_hang(lab: Lab, master: RedisServer) -> None:
    publisher = Publisher(master.url, timeout=0.05)  # a write waits no longer than told
    publisher.reset([])
    assert not publisher.needs_reset

    master.freeze()  # connections are accepted by the kernel; nothing answers
    try:
        started = time.monotonic()
        with pytest.raises(ReplicationError, match=r"put of call 'call-1@lab' failed.*Timeout"):
            publisher.put(record(1))
        assert time.monotonic() - started < 0.3
        assert publisher.needs_reset
        follower = Follower(master.url, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(ReplicationError, match="snapshot failed"):
            follower.snapshot()
        with pytest.raises(ReplicationError, match="XREAD"):
            follower.changes(ZERO_ID, 100, 10)
        assert time.monotonic() - started < 1.5
    finally:
        master.thaw()
    # The put that timed out was applied all the same once Redis ran again: a timeout
    # says nothing about whether a change went through (the changes are idempotent).
    wait_for("the timed-out put landed", lambda: "call-1@lab" in hash_of(master))
    publisher.put(record(2, latched=True))  # a new connection: works again, in step
    assert json.loads(hash_of(master)["call-2@lab"]) == record(2, latched=True)
    assert publisher.needs_reset  # but the caller must still reset its table

    master.stop()  # refused
    started = time.monotonic()
    with pytest.raises(ReplicationError, match=str(master.socket)):
        publisher.delete("call-1@lab")
    with pytest.raises(ReplicationError):
        Publisher("unix:///nonexistent/redis.sock", timeout=0.05).put(record(1))
    assert time.monotonic() - started < 0.3

    # A peer that vanished from the network: the connect times out.
    with lab.inside("relay"):
        blackhole = Publisher("redis://10.201.1.99:26379", timeout=0.05)
        started = time.monotonic()
        with pytest.raises(ReplicationError, match=r"10\.201\.1\.99.*Timeout"):
            blackhole.put(record(1))
    assert time.monotonic() - started < 0.3
    with pytest.raises(ReplicationError, match="bad Redis URL"):
        Publisher("http://example/")
    with pytest.raises(ReplicationError, match="peer URL"):
        Follower(master.url).follow("unix:///x.sock")


def test_a_follower_left_behind_by_the_trimmed_stream_is_told_to_reload(
    master: RedisServer, replica: RedisServer
) -> None:
    publisher = Publisher(master.url, maxlen=100)
    mirror = Mirror(Follower(replica.url))
    assert mirror.after == ZERO_ID
    for n in range(10):
        publisher.put(record(n))
    mirror.catch_up(master)  # from 0-0, nothing trimmed yet: no gap
    assert not mirror.follower.trimmed(ZERO_ID)
    # A follower that keeps up is never told to reload, while the stream is trimmed.
    for round_ in range(20):
        for n in range(50):
            publisher.put(record(n, quiet=float(round_)))
        mirror.catch_up(master)
    client = master.client()
    info = client.xinfo_stream(CHANGES)
    assert info["entries-added"] == 1010 and info["length"] < 300  # trimmed, ~100 kept
    assert mirror.reloads == 1
    behind = mirror.after
    for n in range(500):
        publisher.put(record(n % 50, latched=True))
    wait_for("the replica has every entry", lambda: last_id(replica) == last_id(master))
    # XREAD itself would return the entries left, as if nothing had been lost.
    assert client.xread({CHANGES: behind}, count=1)
    assert mirror.follower.trimmed(behind) and not mirror.follower.trimmed(last_id(replica))
    with pytest.raises(ReplicationGap, match="trimmed past the follower"):
        mirror.step()
    mirror.reload()
    assert mirror.table == {f"call-{n}@lab": record(n, latched=True) for n in range(50)}
    mirror.catch_up(master)

    # A stream from another history (its last ID before ours), and a vanished stream.
    with pytest.raises(ReplicationGap, match="another history"):
        mirror.follower.changes("99999999999999-0", 0, 10)
    client.delete(CHANGES)
    wait_for("the replica lost the stream", lambda: _stream_gone(replica))
    with pytest.raises(ReplicationGap, match="is gone"):
        mirror.step(block_ms=0)
    client.close()


def _stream_gone(server: RedisServer) -> bool:
    client = server.client()
    try:
        return not client.exists(CHANGES)
    finally:
        client.close()


def test_500_puts_per_second_reach_a_follower_on_the_replica_in_order(
    lab: Lab, master: RedisServer, replica: RedisServer
) -> None:
    """Every put paced at 500/s reaches a Follower on the replica, in order; the costs and
    the lag are printed, not asserted: tests never fail on wall-clock time (this one failed
    twice under shared load on its old p50/p99 bars). bench/pair.py measures the lag of the
    real node pair beside its baseline."""
    base = record(1, latched=True)

    def put_costs(publisher: Publisher, count: int = 2000) -> list[float]:
        costs = []
        for i in range(count):
            began = time.perf_counter()
            publisher.put({**base, "call_id": f"idle-{i % 100}"})
            costs.append(time.perf_counter() - began)
        publisher.close()
        return costs

    # Back to back, nothing else running: over the Unix socket, and over TCP loopback
    # inside the relay's namespace.
    unix_costs = put_costs(Publisher(master.url))
    with lab.inside("relay"):
        tcp_costs = put_costs(Publisher(master.loopback_url))

    rate, seconds = 500, 10
    total = rate * seconds
    wait_for("the replica has every entry", lambda: last_id(replica) == last_id(master))
    publisher, follower = Publisher(master.url), Follower(replica.url)
    after, _ = follower.snapshot()
    done_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    order: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def follow() -> None:
        position = after
        try:
            while len(seen_at) < total and not stop.is_set():
                for change in follower.changes(position, 100, 1000):
                    now = time.monotonic()
                    assert change.call_id is not None
                    seen_at[change.call_id] = now
                    order.append(change.call_id)
                    position = change.stream_id
        except BaseException as exc:
            failures.append(exc)

    reader = threading.Thread(target=follow)  # in this process: it competes for the GIL
    reader.start()
    costs = []
    start = time.monotonic()
    try:
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            call_id = f"lag-{i}"
            began = time.perf_counter()
            publisher.put({**base, "call_id": call_id})
            costs.append(time.perf_counter() - began)
            done_at[call_id] = time.monotonic()
        wait_for("the follower saw every put", lambda: len(seen_at) == total, timeout=10)
    finally:
        stop.set()
        reader.join(5)
    elapsed = time.monotonic() - start
    assert not failures, failures
    assert order == [f"lag-{i}" for i in range(total)]
    lags = [seen_at[k] - done_at[k] for k in done_at]

    def us(values: list[float]) -> str:
        p50, p99 = percentile(values, 50) * 1e6, percentile(values, 99) * 1e6
        return f"p50 {p50:.0f} µs, p99 {p99:.0f} µs"

    print(
        f"\nPublisher.put back to back: Unix socket {us(unix_costs)}; TCP loopback "
        f"{us(tcp_costs)}\n{total} puts paced at {rate}/s ({elapsed:.1f} s), a Follower "
        f"thread in the same process: put {us(costs)}\n"
        f"lag put -> master -> replica -> Follower: p50 {percentile(lags, 50) * 1e3:.2f} ms,"
        f" p99 {percentile(lags, 99) * 1e3:.2f} ms, max {max(lags) * 1e3:.2f} ms"
    )


def test_a_reset_of_50k_calls_and_reloading_them(master: RedisServer, replica: RedisServer) -> None:
    base = record(1, latched=True)
    records = [{**base, "call_id": f"big-{i}"} for i in range(50_000)]
    publisher = Publisher(master.url)
    mirror = Mirror(Follower(replica.url))
    began = time.monotonic()
    publisher.reset(records)
    reset = time.monotonic() - began
    mirror.catch_up(master, timeout=30)
    seen = time.monotonic() - began
    began = time.monotonic()
    mirror.reload()
    reload = time.monotonic() - began
    assert len(mirror.table) == 50_000 and mirror.table["big-49999"] == records[-1]
    print(
        f"\nreset of 50,000 calls: {reset * 1e3:.0f} ms on the master (one transaction); "
        f"the follower on the replica had reloaded it {seen * 1e3:.0f} ms after the start; "
        f"a snapshot reload of 50,000 calls {reload * 1e3:.0f} ms"
    )
    assert reset < 5


def test_a_password_and_a_database_in_the_url_are_used(lab: Lab, master: RedisServer) -> None:
    """requirepass on the pair's Redis (examples/redis-pair.conf, its last lines): the
    publisher's own connection authenticates and selects the URL's database too."""
    admin = master.client()
    admin.config_set("requirepass", "s3cret")
    try:
        with pytest.raises(ReplicationError, match="NOAUTH"):
            Publisher(master.url).put(record(1))
        url = f"unix://{master.socket}?password=s3cret&db=2"
        publisher = Publisher(url)
        publisher.put(record(1))
        publisher.close()
        with lab.inside("relay"):
            tcp = Publisher(f"redis://:s3cret@127.0.0.1:{master.port}/2")
            tcp.put(record(2))
            tcp.close()
        admin.execute_command("AUTH", "s3cret")  # type: ignore[no-untyped-call]
        admin.execute_command("SELECT", "2")  # type: ignore[no-untyped-call]
        assert set(admin.hkeys(CALLS)) == {"call-1@lab", "call-2@lab"}
    finally:
        admin.config_set("requirepass", "")
        admin.close()
