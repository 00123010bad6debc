"""A standby that cannot follow says so, and says when it follows again.

The pair of the lab (relay active, relay2 standby; tests/netns/test_pair.py) with calls
on it; replication is broken three ways, each checked in every place an operator looks
(the standby's log, `lrkp-ctl ping` on both nodes, the metrics), then restored:
- the active's Redis refuses the replica (protected mode, Redis 7's default: what the old
  examples/redis-pair.conf did, and the node said nothing);
- the active's Redis stops (and comes back empty);
- the link between the nodes drops every packet of Redis (no RST: only timeouts tell).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import pytest

from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, set_command
from lrkp_lab.pairlab import INTERNAL_VIP
from lrkp_lab.pairnodes import CONTROL, Members, running_pair
from lrkp_lab.waiting import wait_for

ALARM = "standby: NOT following the active node (a takeover now would lose calls)"
RECOVERED = "standby: following the active node again"
CUT_TABLE = "lrkp_test_cut"


@pytest.fixture
def members(lab: Lab) -> Iterator[Members]:
    with running_pair(lab, idle=60) as made:
        yield made


def set_up(members: Members, first: int, count: int) -> None:
    client = Controller(members.lab, "sip", "10.201.1.5")
    try:
        for index in range(first, first + count):
            port = 20000 + 4 * index
            body = set_command("S", "10.201.1.10", str(INTERNAL_VIP), str(INTERNAL_VIP),
                               "10.201.1.11", 4000 + 2 * index, port, port + 2,
                               6000 + 2 * index, f"health-{index}@lab")  # fmt: skip
            assert client.command(body, CONTROL) == body + b"OK"
    finally:
        client.close()


def in_sync(members: Members, calls: int) -> Callable[[], bool]:
    def check() -> bool:
        standby = members.pair_status("relay2")
        active = members.pair_status("relay")
        return bool(
            standby["in_sync"]
            and active["in_sync"]
            and standby["calls"] == calls
            and standby["active_calls"] == calls
        )

    return check


def alarms(members: Members) -> int:
    return members.nodes["relay2"].output().count(ALARM)


def broken(members: Members, before: int, broke: float, reason: str) -> float:
    """Every signal of a standby that cannot follow; returns seconds from the break to
    the first WARNING."""
    standby = members.nodes["relay2"]
    wait_for("the standby's WARNING", lambda: alarms(members) > before, 15.0, step=0.01)
    alarm = time.monotonic() - broke
    status = members.pair_status("relay2")
    assert not status["in_sync"] and status["state"] == "not following", status
    assert any(reason in problem for problem in status["problems"]), status["problems"]
    assert members.metrics("relay2")["lrkp_pair_in_sync"] == 0
    ping = members.lab.run("relay2", ".venv/bin/lrkp-ctl", "ping", check=False).stdout
    assert "pair: standby, NOT FOLLOWING" in ping, ping
    warning = [line for line in standby.output().splitlines() if ALARM in line][-1]
    assert reason in warning, warning
    # The active shows it too: its standby is not in sync (the standby's own report, or
    # no report at all once it cannot reach the active's Redis).
    wait_for("the active shows it", lambda: not members.pair_status("relay")["in_sync"], 10.0)
    assert members.metrics("relay")["lrkp_pair_in_sync"] == 0
    return alarm


def recovered(members: Members, before: int, calls: int) -> None:
    standby = members.nodes["relay2"]
    wait_for("in sync again", in_sync(members, calls), 20.0, step=0.05)
    assert standby.output().count(RECOVERED) > before
    assert members.metrics("relay2")["lrkp_pair_in_sync"] == 1
    assert members.metrics("relay")["lrkp_pair_in_sync"] == 1
    assert members.metrics("relay2")["lrkp_pair_peer_calls"] == calls


def test_a_standby_that_cannot_follow_says_so_and_when_it_follows_again(
    members: Members,
) -> None:
    lab = members.lab
    set_up(members, 0, 20)
    wait_for("in sync", in_sync(members, 20), 10.0, step=0.05)
    members.nodes["relay2"].wait_log("standby: in sync with the active node", 1.0)
    status = members.pair_status("relay2")
    assert status["link"] == "up" and status["lag"] < 1.0 and status["last_applied_id"] != "0-0"
    timings = {}

    # 1. The active's Redis refuses the replica (and the standby's probe): protected mode.
    master = members.redis["relay"].client()
    before, back = alarms(members), members.nodes["relay2"].output().count(RECOVERED)
    master.config_set("protected-mode", "yes")
    broke = time.monotonic()
    for client in master.client_list():
        if not client["addr"].startswith(("127.0.0.1", "/")) and client["addr"] != "":
            master.client_kill_filter(_id=client["id"])
    timings["refused"] = broken(members, before, broke, "protected mode")
    set_up(members, 20, 5)  # changes the standby cannot see
    status = members.pair_status("relay2")
    assert status["calls"] == 20
    master.config_set("protected-mode", "no")
    recovered(members, back, 25)

    # 2. The active's Redis stops, then comes back empty.
    before, back = alarms(members), members.nodes["relay2"].output().count(RECOVERED)
    members.redis["relay"].stop()
    broke = time.monotonic()
    timings["stopped"] = broken(members, before, broke, "does not answer this node")
    set_up(members, 25, 5)  # the active serves on: Redis is never on a command's path
    members.redis["relay"].start()
    recovered(members, back, 30)
    assert "published the whole table (30 calls" in members.nodes["relay"].output()

    # 3. The link between the nodes drops Redis's packets (no RST, no ICMP).
    port = members.redis["relay"].port
    before, back = alarms(members), members.nodes["relay2"].output().count(RECOVERED)
    cut = (
        f"table inet {CUT_TABLE} {{ chain out {{ type filter hook output priority 0; "
        f"tcp dport {port} ip daddr 10.201.1.1 drop; }}; chain in {{ type filter hook input "
        f"priority 0; tcp sport {port} ip saddr 10.201.1.1 drop; }}; }}"
    )
    lab.run("relay2", "nft", cut)
    broke = time.monotonic()
    try:
        timings["cut"] = broken(members, before, broke, "does not answer this node")
        set_up(members, 30, 5)
    finally:
        lab.run("relay2", "nft", "delete", "table", "inet", CUT_TABLE, check=False)
    recovered(members, back, 35)
    print("break -> first WARNING on the standby: " + ", ".join(
        f"{what} {seconds:.2f} s" for what, seconds in timings.items()))  # fmt: skip
    # Reminders are rate-limited: one WARNING per break, none repeated within a minute.
    assert alarms(members) == 3
    assert not re.search(r"following the active node: .* \(retrying\)\n.*\(retrying\)",
                         members.nodes["relay2"].output())  # fmt: skip
