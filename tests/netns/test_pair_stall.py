"""Redis never stalls the active node: a frozen or restarted Redis with 15,000 calls, while
commands flow.

Issue 19 measured, on one active node in pair mode with 15,000 calls: Redis SIGSTOPped for
0.2 s while an `S` arrived every 20 ms made one `S` take 1,297 ms (a put waiting for its
timeout, then the whole table republished on the event loop); Redis killed and restarted
empty, a `P` took 1,252 ms. The bar: `S` p99 under 50 ms.

Measured twice: by the node itself (its command-duration histogram: no command may take
more than 50 ms from reading it to its reply; this is what a Redis call on a command's path
shows, whatever else runs on the machine) and from the client (round trip of every `S`
and `D`, p99 under 50 ms: also catches the event loop being held by something else, while
commands wait unread; on a machine loaded by other work this one could exceed the bar
for reasons of its own: the node's figure is the one that cannot).
"""

from __future__ import annotations

import select
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lrkp_lab.lab import Lab
from lrkp_lab.load import fill
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.pairnodes import LONE_CONTROL, METRICS, lone_active
from lrkp_lab.redis import RedisServer
from lrkp_lab.scraping import metrics_text
from lrkp_lab.waiting import wait_for

CALLS = 15_000
PER_IP = 16_000  # relay ports 1024-65535, 4 per call
WINDOW = 64
BAR = 0.050


def body(index: int, verb: str = "S") -> bytes:
    relay = "10.201.1.1" if index < PER_IP else "10.201.2.1"
    port = 1024 + 4 * (index % PER_IP)
    party = 2000 + 2 * (index % 30000)
    return set_command(verb, "10.201.1.10", relay, relay, "10.201.1.11", party, port, port + 2,
                       party, f"stall-{index}@lab")  # fmt: skip


class Flow:
    """A Kamailio stand-in sending an S or a D every 20 ms whatever the replies do (open
    loop, as Kamailio's workers send: a stall delays every command sent meanwhile), on new
    calls above CALLS, each ended by the next command; times every round trip."""

    def __init__(self, lab: Lab) -> None:
        self.client = Controller(lab, "relay", "127.0.0.1")
        self.times: list[float] = []
        self.failures: list[bytes] = []
        self.missing = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Flow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()

    def _run(self) -> None:
        sock = self.client.sock
        pending: dict[bytes, tuple[float, bytes]] = {}
        sent = 0
        next_at = time.monotonic()
        drain_until: float | None = None
        while pending or drain_until is None:
            now = time.monotonic()
            if drain_until is None and self._stop.is_set():
                drain_until = now + 5.0
            if drain_until is not None and now > drain_until:
                break
            if drain_until is None and now >= next_at:
                index = CALLS + (sent // 2) % 2000
                command = body(index, "S" if sent % 2 == 0 else "D")
                cookie = self.client.cookie()
                pending[cookie] = (time.perf_counter(), command)
                sock.sendto(cookie + b" " + command, LONE_CONTROL)
                sent += 1
                next_at += 0.02
            wait = 0.05 if drain_until is not None else max(0.0, next_at - time.monotonic())
            if select.select([sock], [], [], wait)[0]:
                reply = sock.recv(4096)
                cookie, _, rest = reply.partition(b" ")
                if cookie not in pending:
                    continue
                started, command = pending.pop(cookie)
                self.times.append(time.perf_counter() - started)
                if rest != command + b"OK":
                    self.failures.append(reply)
        self.missing = len(pending)


def durations(lab: Lab) -> tuple[int, int]:
    """The node's command-duration histogram: (commands, commands within BAR)."""
    count = within = 0
    for family in text_string_to_metric_families(metrics_text(lab, "relay", METRICS[1])):
        if family.name != "lrkp_command_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = int(sample.value)
            elif sample.name.endswith("_bucket") and sample.labels.get("le") == str(BAR):
                within = int(sample.value)
    return count, within


@pytest.fixture
def active(lab: Lab) -> Iterator[tuple[Node, dict[str, RedisServer]]]:
    with lone_active(lab, "--log-level", "warning") as made:
        client = Controller(lab, "relay", "127.0.0.1")
        try:
            fill(client.sock, LONE_CONTROL, (body(index) for index in range(CALLS)), WINDOW)
        finally:
            client.close()
        yield made


def held(redis: RedisServer) -> int:
    """The calls in Redis's table (-1 while it does not answer)."""
    client = redis.client()
    try:
        return int(client.hlen("lrkp:calls"))
    except Exception:
        return -1
    finally:
        client.close()


def redis_holds(redis: RedisServer, calls: int) -> bool:
    return held(redis) == calls


def test_a_frozen_or_restarted_redis_never_delays_a_command(
    lab: Lab, active: tuple[Node, dict[str, RedisServer]]
) -> None:
    _node, redis = active
    master = redis["relay"]
    wait_for("Redis holds the table", lambda: redis_holds(master, CALLS), 30.0, step=0.1)
    before = durations(lab)
    with Flow(lab) as flow:
        time.sleep(1.0)
        master.freeze()  # SIGSTOP for 0.2 s, as in the issue
        time.sleep(0.2)
        master.thaw()
        time.sleep(2.0)
        master.kill()  # killed, restarted empty: the table republished
        master.start()
        # Asked of Redis (a small query), not of the node's log: on 2 cores, re-reading a
        # log of 15,000 calls 20 times a second took CPU from the node under test.
        wait_for("the whole table republished", lambda: held(master) >= CALLS, 30.0, step=0.1)
        time.sleep(2.0)
    after = durations(lab)
    commands, within = after[0] - before[0], after[1] - before[1]
    times = sorted(flow.times)
    p99 = times[int(0.99 * (len(times) - 1))]
    print(
        f"{len(times)} commands during a 0.2 s freeze and a restart of Redis at {CALLS} calls: "
        f"round trip p50 {1000 * statistics.median(times):.2f} ms, p99 {1000 * p99:.2f} ms, "
        f"max {1000 * times[-1]:.1f} ms; the node's own: {commands - within} of {commands} "
        f"over {1000 * BAR:.0f} ms"
    )
    assert flow.failures == [] and flow.missing == 0
    assert commands >= len(times) and within == commands, "a command took over 50 ms"
    assert p99 < BAR, f"S/D round trip p99 {1000 * p99:.1f} ms"
    # Nothing was lost: Redis holds the node's table again (republished by the worker;
    # the flow's last command may have been an S).
    wait_for(
        "Redis in step with the node",
        lambda: redis_holds(master, CALLS) or redis_holds(master, CALLS + 1),
        10.0,
    )
