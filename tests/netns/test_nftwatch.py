"""The ruleset watch against the real kernel: the node's table and queue rule, broken as
operators break them, in the lab's relay namespace."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from inspect import signature
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.parties import PORTS
from lrkp_tsl.dataplane.nft import FAMILY, TABLE, NftTable
from lrkp_tsl.dataplane.nftwatch import Fingerprint, RulesetWatch
from lrkp_tsl.dataplane.queue import XT_COMMENT, xt_rule

QUEUE_NUM = 22333
NEEDLE = XT_COMMENT.encode()


@dataclass
class Node:
    """What the node installs in the relay namespace, and a watch opened there."""

    lab: Lab
    table: NftTable
    watch: RulesetWatch

    def load(self) -> None:
        """NftTable.load as the node calls it (its signature is growing: pass what it takes)."""
        extra = (
            {"idle_timeout": 60.0}
            if "idle_timeout" in signature(self.table.load).parameters
            else {}
        )
        self.table.load([INTERNAL_IP, EXTERNAL_IP], PORTS, **extra)

    def install(self) -> None:
        self.load()
        self.lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-A", *xt_rule(QUEUE_NUM))

    def fingerprint(self) -> Fingerprint | None:
        return self.watch.fingerprint(FAMILY, TABLE)

    def has_queue_rule(self) -> bool:
        return self.watch.has_rule("ip", "raw", "PREROUTING", NEEDLE)

    def shell(self, command: str) -> None:
        self.lab.run("relay", "sh", "-c", command)


def clean(lab: Lab) -> None:
    lab.run("relay", "nft", "delete", "table", "ip", "lrkp", check=False)
    lab.run("relay", "nft", "delete", "table", "inet", "filter", check=False)  # nftables.conf's
    lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-F", check=False)


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    clean(lab)
    with lab.inside("relay"):
        made = Node(lab, NftTable(), RulesetWatch())
    try:
        made.install()
        yield made
    finally:
        made.watch.close()
        made.table.close()
        clean(lab)


def listed_handles(node: Node) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """(chain, handle) of the table's chains and of its rules, from `nft -a list table`."""
    listing = node.lab.run("relay", "nft", "-a", "list", "table", "ip", "lrkp").stdout
    chains, rules, chain = set(), set(), None
    for line in listing.splitlines():
        found = re.search(r"# handle (\d+)$", line)
        header = re.match(r"\s*chain (\S+) \{", line)
        if header and found:
            chain = header.group(1)
            chains.add((chain, int(found.group(1))))
        elif line.strip() == "}":
            chain = None
        elif chain and found:
            rules.add((chain, int(found.group(1))))
    return chains, rules


def elements(first: int, count: int) -> tuple[str, str]:
    """`count` flows (dnat_to, snat_to element lists), distinct senders from index `first`."""
    dnat, snat = [], []
    for index in range(first, first + count):
        sender = IPv4Address(int(IPv4Address("10.60.0.0")) + index // 1000)
        key = f"{sender} . {10000 + index % 1000} . {INTERNAL_IP} . {20000 + index % 40000}"
        dnat.append(f"{key} : 10.61.0.1 . {30000 + index % 30000}")
        snat.append(f"{key} : {EXTERNAL_IP} . {20000 + index % 40000}")
    return ", ".join(dnat), ", ".join(snat)


def add_flows(table: NftTable, first: int, count: int) -> None:
    dnat, snat = elements(first, count)
    table.run_text(
        f"add element ip lrkp dnat_to {{ {dnat} }}\nadd element ip lrkp snat_to {{ {snat} }}",
        "adding test flows",
    )


def delete_flows(table: NftTable, first: int, count: int) -> None:
    dnat, _snat = elements(first, count)
    keys = ", ".join(item.split(" : ")[0] for item in dnat.split(", "))
    table.run_text(
        f"delete element ip lrkp dnat_to {{ {keys} }}\ndelete element ip lrkp snat_to {{ {keys} }}",
        "deleting test flows",
    )


def test_fingerprint_ignores_map_elements_and_reads_none(node: Node) -> None:
    before = node.fingerprint()
    assert before is not None
    # Exactly the chains and rules nft lists (with handles), and nothing of table raw.
    chains, rules = listed_handles(node)
    assert {(name, handle) for name, handle, _digest in before.chains} == chains
    assert {(chain, handle) for chain, handle, _digest in before.rules} == rules
    received = node.watch.bytes_received
    node.fingerprint()
    empty_cost = node.watch.bytes_received - received

    generation = node.watch.generation()
    for batch in range(3):
        add_flows(node.table, batch * 1000, 1000)
        now = node.watch.generation()
        assert now != generation, "each map transaction is a new generation"
        generation = now
    assert len(node.table.flow_keys()) == 3000

    received = node.watch.bytes_received
    assert node.fingerprint() == before
    assert node.watch.bytes_received - received == empty_cost, "the fingerprint read elements"
    assert node.has_queue_rule()

    delete_flows(node.table, 0, 2000)
    assert node.watch.generation() != generation
    assert node.fingerprint() == before
    assert len(node.table.flow_keys()) == 1000


def test_generation_counts_committed_transactions_only(node: Node) -> None:
    start = node.watch.generation()
    add_flows(node.table, 0, 1)
    assert node.watch.generation() == start + 1
    delete_flows(node.table, 0, 1)
    assert node.watch.generation() == start + 2
    # Reads and refused transactions commit nothing.
    node.table.listing()
    node.lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-C", *xt_rule(QUEUE_NUM))
    rc = node.lab.run("relay", "nft", "delete", "element", "ip", "lrkp", "learning",
                      "{ 10.9.9.9 . 9 }", check=False).returncode  # fmt: skip
    assert rc != 0
    assert node.watch.generation() == start + 2
    # The node's own reload is a transaction too (and gives its rules new handles).
    before = node.fingerprint()
    node.load()
    assert node.watch.generation() == start + 3
    assert before is not None and node.fingerprint() != before


def test_has_rule_finds_the_queue_rule_by_its_comment(node: Node) -> None:
    assert node.has_queue_rule()
    (handle,) = node.watch.matching_rules("ip", "raw", "PREROUTING", NEEDLE)
    listing = node.lab.run("relay", "nft", "-a", "list", "chain", "ip", "raw", "PREROUTING").stdout
    assert f"queue num {QUEUE_NUM}" in listing and f"# handle {handle}" in listing
    assert not node.watch.has_rule("ip", "raw", "PREROUTING", b"some other comment")
    assert not node.watch.has_rule("ip", "raw", "OUTPUT", NEEDLE)
    assert not node.watch.has_rule("ip", "raw", "NO_SUCH_CHAIN", NEEDLE)
    assert not node.watch.has_rule("ip", "no_such_table", "PREROUTING", NEEDLE)
    assert not node.watch.has_rule("ip6", "raw", "PREROUTING", NEEDLE)
    assert node.watch.fingerprint("ip", "no_such_table") is None


def test_watch_sees_only_its_own_namespace(node: Node) -> None:
    with node.lab.inside("a"):
        elsewhere = RulesetWatch()
    try:
        assert elsewhere.fingerprint(FAMILY, TABLE) is None
        assert not elsewhere.has_rule("ip", "raw", "PREROUTING", NEEDLE)
        assert node.fingerprint() is not None
    finally:
        elsewhere.close()


@dataclass(frozen=True)
class Breakage:
    command: str
    table_gone: bool  # fingerprint None
    table_changed: bool  # fingerprint differs (gone counts)
    rule_gone: bool  # has_rule False


BREAKAGES = {
    # systemctl restart nftables: ExecStop, then ExecStart (Debian's unit file).
    "systemctl restart nftables": Breakage(
        "nft flush ruleset && nft -f /etc/nftables.conf", True, True, True
    ),
    "nft flush ruleset": Breakage("nft flush ruleset", True, True, True),
    "nft delete table ip lrkp": Breakage("nft delete table ip lrkp", True, True, False),
    "nft flush chain ip lrkp guard": Breakage("nft flush chain ip lrkp guard", False, True, False),
    "iptables -t raw -F": Breakage("iptables -w -t raw -F", False, False, True),
    "iptables -t raw -D (our rule)": Breakage(
        "iptables-nft -w -t raw -D " + " ".join(f"'{a}'" for a in xt_rule(QUEUE_NUM)),
        False,
        False,
        True,
    ),
    # Not in the operators' list, but each silently disables the relay, and none of them
    # changes a rule handle (which is why a fingerprint holds more than handles).
    "table made dormant": Breakage(
        "nft add table ip lrkp '{ flags dormant; }'", False, True, False
    ),
    "guard policy drop": Breakage(
        "nft add chain ip lrkp guard '{ type filter hook prerouting priority -310; policy drop; }'",
        False,
        True,
        False,
    ),
    "rule replaced in place": Breakage(
        "nft replace rule ip lrkp nat_post handle {rule_handle} meta mark set 0", False, True, False
    ),
    # What the node itself does on a reload from scratch: the rule handles come back the same.
    "table deleted and reloaded identically": Breakage(
        "nft delete table ip lrkp && nft -f {listing}", False, True, False
    ),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_each_breakage_is_detected(node: Node, name: str, tmp_path: Path) -> None:
    breakage = BREAKAGES[name]
    before = node.fingerprint()
    generation = node.watch.generation()
    assert before is not None and node.has_queue_rule()
    listing = tmp_path / "lrkp.nft"
    listing.write_text(node.table.listing())
    (rule_handle,) = node.watch.matching_rules("ip", "lrkp", "nat_post", b"")
    command = breakage.command.replace("{listing}", str(listing))
    node.shell(command.replace("{rule_handle}", str(rule_handle)))

    after = node.fingerprint()
    assert node.watch.generation() != generation
    assert (after is None) == breakage.table_gone, before.differences(after)
    assert (after != before) == breakage.table_changed, before.differences(after)
    assert node.has_queue_rule() == (not breakage.rule_gone)
    if breakage.table_changed:
        assert before.differences(after), "a change must be explained"

    # Repair as the node would: reload the table, re-add the rule if missing.
    node.load()
    if not node.has_queue_rule():
        node.lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-A", *xt_rule(QUEUE_NUM))
    repaired = node.fingerprint()
    assert repaired is not None and node.has_queue_rule()
    assert len(node.watch.matching_rules("ip", "raw", "PREROUTING", NEEDLE)) == 1
    assert repaired.table_flags == 0, "the reload must also wake a dormant table"


def test_recreated_table_reuses_rule_handles(node: Node) -> None:
    """Why the table handle is part of the fingerprint: rule handles restart per table."""
    before = node.fingerprint()
    node.shell("nft delete table ip lrkp")
    node.load()
    after = node.fingerprint()
    assert before is not None and after is not None
    assert after.table_handle != before.table_handle
    assert after.rules == before.rules  # same handles, same expressions
    assert before.differences(after) == [
        f"table recreated (handle {before.table_handle} -> {after.table_handle})"
    ]


def test_flush_ruleset_gives_a_new_raw_table_whose_rule_handles_restart(node: Node) -> None:
    """After `flush ruleset`, iptables-nft -A recreates table ip raw, and our rule gets the
    handle the first rule of a fresh table always gets: a watch that remembered only the
    rule's handle (or chain and handle) would take the new rule for the old one."""
    handles = []
    raw_handles = []
    for _round in range(2):
        node.shell("nft flush ruleset")
        assert node.watch.fingerprint("ip", "raw") is None
        assert not node.has_queue_rule()
        node.lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-A", *xt_rule(QUEUE_NUM))
        raw = node.watch.fingerprint("ip", "raw")
        assert raw is not None
        raw_handles.append(raw.table_handle)
        handles.append(node.watch.matching_rules("ip", "raw", "PREROUTING", NEEDLE))
    assert handles[0] == handles[1] and len(handles[0]) == 1
    assert raw_handles[0] != raw_handles[1]


def test_detection_and_repair_in_one_check(node: Node) -> None:
    """One check as the daemon runs it: generation, then (only if it moved) the rest."""
    known = node.fingerprint()
    last = node.watch.generation()

    def check() -> list[str]:
        nonlocal known, last
        now = node.watch.generation()
        if now == last:
            return []
        fingerprint = node.fingerprint()
        repaired = []
        if fingerprint is None or fingerprint != known:
            node.load()
            repaired.append("table")
        if not node.has_queue_rule():
            node.lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-A", *xt_rule(QUEUE_NUM))
            repaired.append("queue rule")
        # Read the generation before the fingerprint: a change between them is seen next time.
        last = node.watch.generation()
        known = node.fingerprint()
        return repaired

    assert check() == []
    add_flows(node.table, 0, 10)
    assert check() == []  # the generation moved, the structure did not
    node.shell("nft flush ruleset")
    assert check() == ["table", "queue rule"]
    assert check() == []
    node.shell("iptables -w -t raw -F")
    assert check() == ["queue rule"]
