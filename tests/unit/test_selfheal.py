"""Self-healing's decisions without root: what a check finds, what the repair does, how
repairs are paced. The kernel is the in-memory fake and a fake ruleset watch; the real
thing is tests/netns/test_repair.py."""

from __future__ import annotations

import itertools
import logging
from ipaddress import IPv4Address
from typing import Any, cast

import pytest

from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.nftbatch import endpoint_bytes
from lrkp_tsl.dataplane.nftwatch import Fingerprint, RulesetWatch
from lrkp_tsl.dataplane.queue import QueueRule, RuleProblem
from lrkp_tsl.engine import Engine
from lrkp_tsl.errors import KernelError
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import PortRange
from lrkp_tsl.selfheal import RepairPacer, SelfHeal
from tests.unit.test_engine import (
    CALLER_RELAY,
    IDLE,
    NAT_CALLER_SDP,
    NAT_SOURCE,
    make,
    nat_call,
    ok,
    s_command,
)

ADDRS = (IPv4Address("10.0.0.10"), IPv4Address("10.0.1.10"))
PORTS = PortRange(20000, 40000)
TABLE = Fingerprint(7, 0, frozenset({("guard", 1, b"g")}), frozenset({("guard", 2, b"r")}))


class FakeWatch:
    """The parts of RulesetWatch self-healing reads, as plain attributes a test breaks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gen = 1
        self.table: Fingerprint | None = TABLE
        self.policy: int | None = 3
        self.counts: dict[str, int | None] | None = None  # None: from the engine's table
        self.elements: dict[str, set[bytes]] = {
            "relay_addrs": {a.packed for a in ADDRS},
            "relay_ports": {PORTS.start.to_bytes(2), PORTS.end.to_bytes(2)},
        }
        self.missing: set[bytes] = set()  # map keys the lookups do not find

    def generation(self) -> int:
        return self.gen

    def fingerprint(self, _family: str, _table: str) -> Fingerprint | None:
        return self.table

    def object_handle(self, *_args: Any) -> int | None:
        return self.policy

    def set_counts(self, _family: str, _table: str) -> dict[str, int | None] | None:
        if self.counts is not None:
            return self.counts
        table = self.engine.table
        return {"dnat_to": table.flow_count, "snat_to": table.flow_count,
                "learning": table.learning_count}  # fmt: skip

    def has_element(self, _family: str, _table: str, name: str, key: bytes) -> bool:
        if name in self.elements:
            return key in self.elements[name]
        return key not in self.missing

    def close(self) -> None:
        pass


class FakeQueueRule:
    def __init__(self) -> None:
        self.wrong: RuleProblem | None = None
        self.installed = 0

    def problem(self, _watch: object) -> RuleProblem | None:
        return self.wrong

    def install(self, _watch: object = None) -> None:
        self.installed += 1
        self.wrong = None


class Heal:
    def __init__(self, policy: Policy = Policy.STRICT) -> None:
        self.engine, self.kernel, self.store = make(policy)
        self.watch = FakeWatch(self.engine)
        self.queue = FakeQueueRule()
        self.reloads = 0
        self.reload_fails = False
        self.heal = SelfHeal(
            cast(DataPlane, None), cast(QueueRule, self.queue), self.engine, self.reload,
            ADDRS, PORTS, cast(RulesetWatch, self.watch),
        )  # fmt: skip
        self.heal.arm()

    def reload(self) -> None:
        self.reloads += 1
        if self.reload_fails:
            raise KernelError("loading rules: nft said: no")
        self.watch.table = TABLE
        for name in ("relay_addrs", "relay_ports"):
            self.watch.elements[name] = FakeWatch(self.engine).elements[name]

    def damage(self) -> None:
        self.watch.gen += 1


def test_nothing_is_read_beyond_the_generation_while_it_stays_the_same() -> None:
    h = Heal()
    h.watch.table = None  # would be found, if it were looked at
    assert not h.heal.check(1.0)
    h.damage()
    assert h.heal.check(1.5)


def test_a_generation_moved_by_the_node_itself_repairs_nothing() -> None:
    h = Heal()
    ok(h.engine, s_command("c1"))
    h.damage()
    assert not h.heal.check(1.0)
    assert h.reloads == 0 and h.kernel.calls["install"] == 0


def test_an_emptied_map_puts_the_calls_back_and_says_what_it_found(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Heal()
    ok(h.engine, s_command("c1"))
    ok(h.engine, s_command("c2", relay_port=20010))
    assert h.engine.table.flow_count == len(h.kernel.flows) == 8
    h.kernel.flows.clear()
    h.watch.counts = {"dnat_to": 0, "snat_to": 8, "learning": h.engine.table.learning_count}
    h.damage()
    with caplog.at_level(logging.WARNING, "lrkp_tsl.selfheal"):
        assert h.heal.check(1.0)
    assert len(h.kernel.flows) == 8
    assert h.reloads == 0  # the rules were fine: only the calls' elements went back
    assert "map dnat_to holds 0 elements, the live calls need 8" in caplog.text
    assert "snat_to" not in caplog.text.split("Repairing now")[0]
    assert "repaired: 2 live calls put back" in caplog.text


def test_counts_are_not_compared_while_a_call_is_suspect_or_unverified() -> None:
    h = Heal()
    ok(h.engine, s_command("c1"))
    h.watch.counts = {"dnat_to": 0, "snat_to": 0, "learning": 0}
    h.engine.suspect["c1"] = h.engine.table.get("c1").view()  # type: ignore[union-attr]
    h.damage()
    assert not h.heal.check(1.0)
    del h.engine.suspect["c1"]
    h.engine.unverified.add("c1")
    h.damage()
    assert not h.heal.check(2.0)
    h.engine.unverified.clear()
    h.damage()
    assert h.heal.check(3.0)


def test_without_kernel_counts_the_oldest_calls_elements_are_looked_up() -> None:
    h = Heal()
    ok(h.engine, s_command("c1"))
    h.watch.counts = {"dnat_to": None, "snat_to": None, "learning": None}
    h.damage()
    assert not h.heal.check(1.0)
    call = h.engine.table.get("c1")
    assert call is not None
    h.watch.missing = {
        endpoint_bytes(f.sender) + endpoint_bytes(f.relay) for f in call.view().flows
    }
    h.kernel.flows.clear()
    h.damage()
    assert h.heal.check(2.0)
    assert len(h.kernel.flows) == 4


def test_lost_relay_sets_reload_the_table() -> None:
    h = Heal()
    h.watch.elements["relay_ports"] = set()
    h.damage()
    assert h.heal.check(1.0)
    assert h.reloads == 1 and h.kernel.calls["install"] == 0


def test_a_queue_rule_put_behind_another_is_moved_back_and_only_that() -> None:
    h = Heal()
    h.queue.wrong = RuleProblem(False, "the first-packet queue rule is no longer first")
    h.damage()
    assert h.heal.check(1.0)
    assert h.queue.installed == 1 and h.reloads == 0 and h.kernel.calls["install"] == 0


def test_a_recreated_table_or_policy_renews_the_calls_conntrack_entries() -> None:
    h = Heal(Policy.STRICT)
    ok(h.engine, s_command("c1"))
    call = h.engine.table.get("c1")
    assert call is not None
    keys = sorted(call.view().keys(), key=str)
    h.kernel.entries = {keys[0]: 50.0}  # its last packet 10 s ago; the other stream ended
    h.watch.policy = 4  # deleted and created again: entries lost it
    h.damage()
    assert h.heal.check(100.0)
    assert h.kernel.forgotten[-1] == {keys[0]}
    assert h.kernel.entries == {}
    # Quiet since its last packet (10 s ago, to the second the kernel gives, rounded down:
    # so 9 s, never early), and due one idle timeout after that.
    assert h.engine.activity.quiet_since("c1") == pytest.approx(91.0)
    h.engine.on_timer(90.5 + IDLE)
    assert h.engine.table.get("c1") is not None
    h.engine.on_timer(91.0 + IDLE)
    assert h.engine.table.get("c1") is None


def test_a_recreated_table_renews_but_a_reloaded_one_does_not() -> None:
    h = Heal()
    ok(h.engine, s_command("c1"))
    h.watch.table = Fingerprint(7, 0, TABLE.chains, frozenset())  # a rule removed
    h.damage()
    assert h.heal.check(1.0)
    assert h.reloads == 1 and h.kernel.calls["alive"] == 0
    h.watch.table = Fingerprint(8, 0, TABLE.chains, TABLE.rules)  # deleted and made again
    h.damage()
    assert h.heal.check(2.0)
    assert h.kernel.calls["install"] == 1 and h.kernel.calls["alive"] == 1


def test_a_repair_that_fails_backs_off_and_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Heal()
    h.reload_fails = True
    h.watch.table = None
    h.damage()
    attempts = []
    with caplog.at_level(logging.ERROR, "lrkp_tsl.selfheal"):
        now = 0.0
        while now < 120.0:  # a check every half second for two minutes
            before = h.reloads
            h.heal.check(now)
            if h.reloads != before:
                attempts.append(now)
            now += 0.5
    assert attempts[:6] == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0]
    assert all(b - a <= RepairPacer.CAP for a, b in itertools.pairwise(attempts))
    assert "next attempt in 2 s" in caplog.text
    assert len(caplog.records) < 2 * len(attempts)
    h.reload_fails = False
    h.heal.check(attempts[-1] + RepairPacer.CAP)
    assert h.watch.table is TABLE


def test_the_pacer_spaces_out_repairs_that_keep_being_needed() -> None:
    pacer = RepairPacer()
    assert pacer.ready(0.0)
    assert [pacer.succeeded(t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert pacer.succeeded(3.0) == 1.0 and not pacer.ready(3.5) and pacer.ready(4.0)
    assert pacer.succeeded(4.0) == 2.0
    assert pacer.succeeded(100.0) == 0.0  # the fight is over: the window has passed
    assert [pacer.failed(t) for t in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert pacer.succeeded(200.0) == 0.0 and pacer.failures == 0


def test_the_call_tables_sums_are_what_the_kernel_holds_through_a_calls_life() -> None:
    engine, kernel, _store = make(Policy.AUTO)

    def agree() -> None:
        assert engine.table.flow_count == len(kernel.flows)
        assert engine.table.learning_count == len(kernel.learning)

    nat_call(engine)  # learning: no flow yet
    ok(engine, s_command("fixed", relay_port=20010))
    agree()
    engine.on_packet(1, NAT_SOURCE, CALLER_RELAY, 1.0)  # latched: flows appear
    agree()
    ok(engine, s_command("fixed", relay_port=20010, callee="10.0.1.32:6002"))  # re-INVITE
    agree()
    ok(engine, s_command("nat", verb="D", caller=NAT_CALLER_SDP))
    agree()
    ok(engine, s_command("taker", relay_port=20010))  # takes the ports of "fixed"
    agree()
    assert engine.table.flow_count > 0


def test_renewing_sets_each_calls_quiet_time_from_its_own_entries() -> None:
    engine, kernel, _store = make(Policy.STRICT)
    ok(engine, s_command("c1"))
    ok(engine, s_command("c2", relay_port=20010, caller="10.0.0.22:4000"))
    for call_id, left in (("c1", 30.0), ("c2", 59.0)):
        call = engine.table.get(call_id)
        assert call is not None
        key = sorted(call.view().keys(), key=str)[0]
        kernel.entries[key] = left
    assert engine.renew_streams(100.0) == 2
    assert kernel.entries == {}
    assert engine.activity.quiet_since("c1") == pytest.approx(100.0 - IDLE + 31.0)
    assert engine.activity.quiet_since("c2") == pytest.approx(100.0)  # capped: never later
