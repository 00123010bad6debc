"""`lrkp-tsl flush`: what a stopped node left in its namespace's kernel, taken out.

A node stopped by SIGTERM leaves its table, its queue rule, its calls' conntrack entries and
the relay range in ip_local_reserved_ports, so that calls keep flowing. `flush`, run in the
relay namespace after the stop, removes each of them, and only what a node added: the
operator's own reserved ports stay. It refuses while a node runs there.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import BASE_NODE_ARGS, CONTROL, KAMAILIO_IP, Call, burst
from lrkp_lab.lab import NETNS_DIR, Lab
from lrkp_lab.node import LRKP_TSL, Controller, Node, clear_host
from lrkp_lab.parties import Peers
from lrkp_tsl import lock
from lrkp_tsl.dataplane.added import SUFFIX
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.dataplane.queue import XT_COMMENT

RESERVED = "net.ipv4.ip_local_reserved_ports"
OPERATORS = "8080,21000-21010"  # reserved by the operator, partly inside the relay range
QUEUE_NUM = "4712"
ARGS = (*BASE_NODE_ARGS, "--queue-num", QUEUE_NUM)


def table_present(lab: Lab) -> bool:
    return lab.run("relay", "nft", "list", "table", "ip", TABLE, check=False).returncode == 0


def raw_present(lab: Lab) -> bool:
    return lab.run("relay", "nft", "list", "table", "ip", "raw", check=False).returncode == 0


def queue_rules(lab: Lab) -> list[str]:
    listed = lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-S", "PREROUTING", check=False)
    return [line for line in listed.stdout.splitlines() if XT_COMMENT in line]


def conntrack_entries(lab: Lab, call: Call) -> list[str]:
    found = []
    for relay in (call.caller_relay, call.callee_relay):
        listed = lab.run("relay", "conntrack", "-L", "-p", "udp", "--dport", str(relay.port),
                         check=False)  # fmt: skip
        found += listed.stdout.splitlines()
    return found


def stored_calls(state: Path) -> int:
    with contextlib.closing(sqlite3.connect(state / "calls.sqlite3")) as db:
        return int(db.execute("select count(*) from calls").fetchone()[0])


def record_path(lab: Lab) -> Path:
    inode = os.stat(NETNS_DIR / lab.ns("relay")).st_ino
    return lock.lock_path(lock.DEFAULT_DIRECTORY, inode).with_suffix(SUFFIX)


def flush(lab: Lab, state: Path) -> subprocess.CompletedProcess[str]:
    """`lrkp-tsl flush` in the relay namespace, with the node's flags (no file)."""
    return lab.run("relay", *LRKP_TSL, "flush", "--config", "/dev/null", "--state-dir",
                   str(state), check=False)  # fmt: skip


@pytest.fixture
def host(lab: Lab) -> Iterator[Lab]:
    """The relay namespace with the operator's reserved ports and no raw table (so the node
    makes it); put back as it was after."""
    before = lab.sysctl("relay", RESERVED)
    for table in (TABLE, "raw"):
        lab.run("relay", "nft", "delete", "table", "ip", table, check=False)
    lab.set_sysctl("relay", RESERVED, OPERATORS)
    try:
        yield lab
    finally:
        clear_host(lab, "relay")
        lab.set_sysctl("relay", RESERVED, before)
        record_path(lab).unlink(missing_ok=True)


@contextlib.contextmanager
def running(lab: Lab, state: Path | None = None) -> Iterator[tuple[Node, Controller]]:
    node = Node(lab, "relay", *ARGS, state=state)
    kamailio = Controller(lab, "sip", KAMAILIO_IP)
    try:
        node.wait_ready(CONTROL, kamailio)
        yield node, kamailio
    finally:
        kamailio.close()
        node.stop()


def test_flush_removes_what_a_stopped_node_left_and_keeps_the_operators_ports(
    host: Lab, peers: Peers
) -> None:
    caller, callee = peers("a", 4200), peers("b", 6200)
    with running(host) as (node, kamailio):
        call = Call(kamailio, caller, callee, 20040, "flush@lab")
        burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"up")
        burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"down")
    assert node.proc.returncode == 0, node.output()
    # A restart (an upgrade) finds the range already reserved and adds nothing; the ports
    # are the node's all the same (on record), and SIGTERM leaves everything in place.
    with running(host, node.state) as (restarted, _kamailio):
        assert "ports 20000-21999 already reserved" in restarted.output()
    assert restarted.proc.returncode == 0, restarted.output()
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"stopped")
    assert table_present(host) and raw_present(host)
    assert len(queue_rules(host)) == 1 and f"--queue-num {QUEUE_NUM}" in queue_rules(host)[0]
    entries = len(conntrack_entries(host, call))
    assert entries >= 1
    assert host.sysctl("relay", RESERVED) == "8080,20000-21999"
    assert stored_calls(node.state) == 1

    flushed = flush(host, node.state)
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert flushed.stderr == ""
    for removed in (
        f"removed the queue rule ('{XT_COMMENT}', queue {QUEUE_NUM}",
        "removed iptables-nft's raw table (created for the queue rule, now empty)",
        f"removed table ip lrkp (4 flows) and its calls' conntrack entries ({entries})",
        "removed reserved ports 20000-20999,21011-21999",
        f"removed the state store's calls (1) from {node.state}",
    ):
        assert removed in flushed.stdout, flushed.stdout
    assert not table_present(host)
    assert queue_rules(host) == [] and not raw_present(host)
    assert conntrack_entries(host, call) == []
    assert host.sysctl("relay", RESERVED) == OPERATORS
    assert stored_calls(node.state) == 0
    assert not record_path(host).exists()
    caller.send(call.caller_relay, b"after the flush")
    callee.expect_nothing()

    again = flush(host, node.state)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith("lrkp-tsl flush: nothing to remove"), again.stdout
    assert host.sysctl("relay", RESERVED) == OPERATORS


def test_flush_is_refused_while_a_node_runs(host: Lab, peers: Peers) -> None:
    caller, callee = peers("a", 4210), peers("b", 6210)
    with running(host) as (node, kamailio):
        call = Call(kamailio, caller, callee, 20080, "running@lab")
        refused = flush(host, node.state)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"refused: a node, pid {node.proc.pid} " in refused.stderr, refused.stderr
        assert refused.stdout == ""
        # Nothing was touched: the call still flows, its state is all there.
        burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"still")
        assert table_present(host) and queue_rules(host)
        assert host.sysctl("relay", RESERVED) == "8080,20000-21999"
        assert stored_calls(node.state) == 1


def test_a_failed_start_leaves_an_earlier_nodes_raw_table_to_the_flush(host: Lab) -> None:
    """A start that fails takes back only what it added: iptables-nft's raw table, made by
    an earlier node (on record), stays, and the flush removes it."""
    with running(host) as (node, _kamailio):
        pass
    # Someone removed the rule and the table by hand; the empty raw table stays.
    host.run("relay", "iptables-nft", "-w", "-t", "raw", "-F")
    host.run("relay", "nft", "delete", "table", "ip", TABLE)
    assert raw_present(host) and queue_rules(host) == []
    control = host.udp_socket("relay", CONTROL[0], CONTROL[1])
    try:
        failed = Node(host, "relay", *ARGS, state=node.state)
        assert failed.proc.wait(30) == 2, failed.output()
        failed.stop()
    finally:
        control.close()
    assert "first packets: marked" in failed.output()  # it had added the rule, and took it back
    assert raw_present(host) and queue_rules(host) == [] and not table_present(host)
    flushed = flush(host, node.state)
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert "removed iptables-nft's raw table" in flushed.stdout
    assert not raw_present(host)
