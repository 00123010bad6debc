"""Upgrades and self-repair against the real node: a rules file whose base chains changed,
a hand-changed chain priority, emptied maps and sets, a rule put ahead of the queue rule,
and the idle timeout of calls that survive a flushed ruleset.

Media is counted exactly (lrkp_lab.calls.Stream): the caller `c` sits behind a
port-remapping NAT (learned from its first packet), the callee `b` is reachable.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import BASE_NODE_ARGS, CONTROL, Call, Stream, burst
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.parties import PORTS, Party, Peers
from lrkp_tsl.admission import NodeLimits
from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.dataplane.nftwatch import RulesetWatch
from lrkp_tsl.dataplane.queue import QueueRule
from lrkp_tsl.defaults import DEFAULT_RULES
from lrkp_tsl.engine import Engine, Settings
from lrkp_tsl.frontends.lrkproxy import LrkproxyFrontEnd
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import Endpoint
from lrkp_tsl.protocol import NodeConfig
from lrkp_tsl.selfheal import SelfHeal
from tests.fakes import MemoryStore

REPAIRED = "repaired:"
# A repair happens within a check interval or two of the damage (selfheal.CHECK_INTERVAL).
REPAIR_WAIT = 10.0


@pytest.fixture
def streams(peers: Peers) -> Iterator[list[Stream]]:
    """Streams a test starts; stopped before their parties close, whatever happens."""
    started: list[Stream] = []
    yield started
    for stream in started:
        stream.stop()


def start(lab: Lab, nodes: list[Node], kamailio: Controller, *args: str, **kw: Path) -> Node:
    node = Node(lab, "relay", *BASE_NODE_ARGS, *args, **kw)
    nodes.append(node)
    node.wait_ready(CONTROL, kamailio)
    return node


def errors(node: Node) -> list[str]:
    return [line for line in node.output().splitlines() if " ERROR " in line]


def nft(lab: Lab, script: str, tmp_path: Path) -> None:
    path = tmp_path / f"script-{time.monotonic_ns()}.nft"
    path.write_text(script)
    lab.run("relay", "nft", "-f", str(path))


def guard_priority(lab: Lab) -> str:
    listing = lab.run("relay", "nft", "list", "chains", "ip").stdout
    match = re.search(r"chain guard \{\s*type filter hook prerouting priority ([^;]+);", listing)
    assert match, listing
    return match.group(1)


def rules_b(tmp_path: Path) -> Path:
    """An upgraded rules file: the guard at another priority, and one more rule."""
    text = DEFAULT_RULES.read_text()
    assert "priority -310;" in text
    text = text.replace("priority -310;", "priority -305;", 1)
    text = text.replace(
        "\t\tip daddr @relay_addrs udp dport @relay_ports jump relay_port\n",
        "\t\tip daddr @relay_addrs udp dport @relay_ports jump relay_port\n"
        '\t\tcounter comment "rules B"\n',
        1,
    )
    path = tmp_path / "lrkp-b.nft"
    path.write_text(text)
    return path


def new_nat_call(kamailio: Controller, peers: Peers, port: int, call_id: str) -> None:
    """A new call whose caller is behind NAT: its first packet must reach the node."""
    caller, callee = peers("c", 4000 + port % 1000), peers("b", 6000 + port % 1000)
    call = Call(kamailio, caller, callee, port, call_id)
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"first")
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"back")


def streaming(
    streams: list[Stream],
    kamailio: Controller,
    caller: Party,
    callee: Party,
    port: int,
    call_id: str,
) -> tuple[Stream, Stream]:
    """A call with media both ways at 50 packets/s (the caller latched first)."""
    call = Call(kamailio, caller, callee, port, call_id)
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")  # latches
    forward = Stream(caller, call.caller_relay, callee, b"A").start()
    backward = Stream(callee, call.callee_relay, caller, b"B").start()
    streams += [forward, backward]
    return forward, backward


# -- item 1: base chains whose priority, hook or type changed ---------------------------------


def test_an_upgraded_rules_file_with_another_guard_priority_keeps_live_calls(
    lab: Lab,
    nodes: list[Node],
    kamailio: Controller,
    peers: Peers,
    streams: list[Stream],
    tmp_path: Path,
) -> None:
    node = start(lab, nodes, kamailio)
    assert guard_priority(lab) == "raw - 10"
    forward, backward = streaming(
        streams, kamailio, peers("c", 4100), peers("b", 6100), 20100, "upgrade@lab"
    )
    time.sleep(1.0)
    node.stop(signal.SIGTERM)
    upgraded = start(lab, nodes, kamailio, "--rules", str(rules_b(tmp_path)), state=node.state)
    time.sleep(1.5)
    forward.stop()
    backward.stop()
    gaps = (forward.longest_gap(), backward.longest_gap())
    print(f"upgrade: lost {len(forward.lost())}/{len(forward.sent)} forward, "
          f"{len(backward.lost())}/{len(backward.sent)} backward; longest gaps {gaps}")  # fmt: skip
    assert forward.lost() == [] and backward.lost() == []
    assert guard_priority(lab) == "raw - 5"
    assert 'comment "rules B"' in lab.run("relay", "nft", "list", "chain", "ip", TABLE,
                                          "guard").stdout  # fmt: skip
    log = upgraded.output()
    assert "replaced base chain guard (prerouting priority -310 -> -305)" in log, log
    assert errors(upgraded) == []
    new_nat_call(kamailio, peers, 20200, "after-upgrade@lab")


def test_a_guard_priority_changed_by_hand_is_repaired_once(
    lab: Lab,
    nodes: list[Node],
    kamailio: Controller,
    peers: Peers,
    streams: list[Stream],
    tmp_path: Path,
) -> None:
    node = start(lab, nodes, kamailio)
    forward, backward = streaming(
        streams, kamailio, peers("c", 4110), peers("b", 6110), 20110, "by-hand@lab"
    )
    time.sleep(0.5)
    by_hand = (
        f"flush chain ip {TABLE} guard\ndelete chain ip {TABLE} guard\n"
        f"add chain ip {TABLE} guard {{ type filter hook prerouting priority 0; policy accept; }}\n"
    )
    nft(lab, by_hand, tmp_path)
    node.wait_log(REPAIRED, REPAIR_WAIT)
    time.sleep(3.0)  # a repair loop would have logged again meanwhile
    forward.stop()
    backward.stop()
    log = node.output()
    assert log.count(REPAIRED) == 1, log[-4000:]
    assert len(errors(node)) == 1, errors(node)  # the finding, said once
    assert "chain guard" in errors(node)[0]
    assert guard_priority(lab) == "raw - 10"
    print(f"hand-changed priority: longest gaps {forward.longest_gap():.3f} / "
          f"{backward.longest_gap():.3f} s")  # fmt: skip
    new_nat_call(kamailio, peers, 20210, "after-hand@lab")


def test_a_repair_that_keeps_failing_backs_off_and_says_so(
    lab: Lab,
    nodes: list[Node],
    kamailio: Controller,
    peers: Peers,
    streams: list[Stream],
    tmp_path: Path,
) -> None:
    rules = tmp_path / "lrkp.nft"
    rules.write_text(DEFAULT_RULES.read_text())
    node = start(lab, nodes, kamailio, "--rules", str(rules))
    rules.write_text("this is not an nftables ruleset\n")
    lab.run("relay", "nft", "flush", "ruleset")
    node.wait_log("repair failed", REPAIR_WAIT)
    time.sleep(8.0)  # a repair every check interval would fail 16 times meanwhile
    failed = node.output().count("repair failed")
    assert 2 <= failed <= 5, node.output()[-4000:]
    assert "next attempt in" in node.output()
    rules.write_text(DEFAULT_RULES.read_text())
    node.wait_log(REPAIRED, 40.0)
    new_nat_call(kamailio, peers, 20220, "after-backoff@lab")


# -- item 2: emptied maps and sets, a rule ahead of the queue rule -----------------------------


DAMAGE = {
    "dnat_to flushed": ("nft", f"flush map ip {TABLE} dnat_to", "map dnat_to"),
    "snat_to flushed": ("nft", f"flush map ip {TABLE} snat_to", "map snat_to"),
    "relay_ports emptied": ("nft", f"flush set ip {TABLE} relay_ports", "set relay_ports"),
    "relay_addrs emptied": ("nft", f"flush set ip {TABLE} relay_addrs", "set relay_addrs"),
    "rule ahead of the queue rule": (
        "iptables-nft",
        "-w -t raw -I PREROUTING 1 -j ACCEPT",
        "ahead of it",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_emptied_maps_and_sets_and_a_bypassed_queue_rule_are_repaired(
    lab: Lab,
    nodes: list[Node],
    kamailio: Controller,
    peers: Peers,
    streams: list[Stream],
    damage: str,
) -> None:
    node = start(lab, nodes, kamailio)
    # Both parties reachable: every packet needs the maps (nothing of it is learning).
    forward, backward = streaming(
        streams, kamailio, peers("a", 4120), peers("b", 6120), 20120, "damaged@lab"
    )
    time.sleep(0.5)
    tool, arguments, found = DAMAGE[damage]
    lab.run("relay", tool, *arguments.split())
    damaged_at = len(forward.sent)
    node.wait_log(REPAIRED, 5.0)
    repaired_at = len(forward.sent)
    time.sleep(1.0)
    new_nat_call(kamailio, peers, 20230, "after-damage@lab")
    time.sleep(2.0)  # no second repair
    forward.stop()
    backward.stop()
    log = node.output()
    assert log.count(REPAIRED) == 1, log[-4000:]
    (finding,) = errors(node)
    assert found in finding, finding
    # What was sent after the repair arrived; what the damage cost is printed.
    assert [seq for seq in forward.lost() if seq > repaired_at + 2] == []
    assert [seq for seq in backward.lost() if seq > repaired_at + 2] == []
    lost = len(forward.lost()) + len(backward.lost())
    after = (repaired_at - damaged_at) / 50
    print(f"{damage}: lost {lost} packets (50/s each way), repaired {after:.2f} s after")


# -- item 3: calls that survive a flushed ruleset keep their idle timeout ---------------------


def entry_timeouts(lab: Lab, port: int) -> list[int]:
    """Seconds left on the conntrack entries to relay port `port`."""
    listing = lab.run("relay", "conntrack", "-L", "-p", "udp", check=False).stdout
    return [int(line.split()[2]) for line in listing.splitlines() if f"dport={port} " in line]


def test_a_call_surviving_a_flushed_ruleset_keeps_its_idle_timeout(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers, streams: list[Stream]
) -> None:
    idle = 4
    node = start(lab, nodes, kamailio, "--idle-timeout", str(idle))
    forward, backward = streaming(
        streams, kamailio, peers("c", 4130), peers("b", 6130), 20130, "survivor@lab"
    )
    time.sleep(0.5)
    lab.run("relay", "nft", "flush", "ruleset")
    node.wait_log(REPAIRED, 5.0)
    repaired_at = len(forward.sent)
    time.sleep(1.0)
    timeouts = entry_timeouts(lab, 20130) + entry_timeouts(lab, 20132)
    forward.stop()
    backward.stop()
    stopped = max(*forward.arrivals.values(), *backward.arrivals.values())  # the last packet
    assert timeouts and max(timeouts) <= idle, timeouts  # the policy, not the kernel's 120 s
    assert [seq for seq in forward.lost() if seq > repaired_at + 2] == []
    assert [seq for seq in backward.lost() if seq > repaired_at + 2] == []
    node.wait_log(f"[survivor@lab] removed: no media for {idle} s", 30.0)
    print(f"flushed ruleset: the call ended {time.monotonic() - stopped:.1f} s after its last "
          f"packet (idle timeout {idle} s); lost {len(forward.lost())} + "
          f"{len(backward.lost())} packets")  # fmt: skip


class CountlessWatch(RulesetWatch):
    """The real kernel, read as a kernel before 6.14 reads it: no set counts."""

    def set_counts(self, family: str, table: str) -> dict[str, int | None] | None:
        counts = super().set_counts(family, table)
        return None if counts is None else dict.fromkeys(counts)


def test_without_set_counts_an_emptied_map_is_found_by_looking_up_calls(
    lab: Lab, dataplane: DataPlane
) -> None:
    limits = NodeLimits(frozenset({INTERNAL_IP, EXTERNAL_IP}), PORTS)
    node = NodeConfig(PORTS.start, PORTS.end, PORTS.start, str(INTERNAL_IP), str(EXTERNAL_IP))
    settings = Settings(3600.0, 60.0, Policy.STRICT, (), PORTS)
    engine = Engine(settings, dataplane, MemoryStore())
    front_end = LrkproxyFrontEnd(engine, node, limits)
    body = set_command("S", "10.201.1.11", str(INTERNAL_IP), str(INTERNAL_IP), "10.201.1.12",
                       4000, 20000, 20002, 6000, "countless@lab")  # fmt: skip
    assert front_end.on_datagram(b"1_1 " + body, "peer", "peer", 0.0) == b"1_1 " + body + b"OK"
    # Everything in the relay namespace: the queue rule is installed by a subprocess.
    with lab.inside("relay"):
        queue_rule = QueueRule("xt", 22333, dataplane.nft)
        heal = SelfHeal(
            dataplane, queue_rule, engine,
            lambda: dataplane.load([INTERNAL_IP, EXTERNAL_IP], PORTS, 60.0),
            [INTERNAL_IP, EXTERNAL_IP], PORTS, CountlessWatch(),
        )  # fmt: skip
        try:
            queue_rule.install(heal.watch)
            heal.arm()
            assert not heal.check(1.0)
            lab.run("relay", "nft", "flush", "map", "ip", TABLE, "snat_to")
            assert heal.check(2.0)
            flows = dataplane.nft.installed()
            assert len(flows) == 4 and all(f.target and f.relay_out for f in flows)
            assert not heal.check(3.0)  # the repair holds: nothing found on the next check
        finally:
            heal.close()
            queue_rule.remove()


@pytest.mark.parametrize("restore", ["iptables-nft-restore", "/nonexistent/iptables-restore"])
def test_the_queue_rule_is_installed_first_and_put_back_first(
    lab: Lab, dataplane: DataPlane, restore: str
) -> None:
    """In one iptables-nft-restore transaction, or in two where there is none."""

    def rules() -> list[str]:
        listing = lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-S", "PREROUTING").stdout
        return [line for line in listing.splitlines() if line.startswith("-A")]

    lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-A", "PREROUTING", "-j", "ACCEPT")
    with lab.inside("relay"):  # the rule is installed by a subprocess: in the relay's namespace
        rule = QueueRule("xt", 22333, dataplane.nft)
        rule.restore = restore
        try:
            with RulesetWatch() as watch:
                rule.install()
                assert "lrkp-tsl first packets" in rules()[0] and len(rules()) == 2
                assert rule.problem(watch) is None
                lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-I", "PREROUTING", "1",
                        "-j", "DROP")  # fmt: skip
                problem = rule.problem(watch)
                assert problem is not None and not problem.gone and "ahead of it" in problem.text
                rule.install(watch)
                assert "lrkp-tsl first packets" in rules()[0] and len(rules()) == 3
                assert rule.problem(watch) is None
        finally:
            rule.remove()
            lab.run("relay", "iptables-nft", "-w", "-t", "raw", "-F", check=False)


def test_a_stream_that_starts_while_a_map_is_empty_is_relayed_after_the_repair(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers, streams: list[Stream]
) -> None:
    """Its first packets get a conntrack entry without NAT, which they would keep alive for
    as long as they flow: the repair deletes the calls' entries, so the next packet makes
    a NATed one."""
    node = start(lab, nodes, kamailio)
    forward, backward = streaming(streams, kamailio, peers("a", 4140), peers("b", 6140), 20140,
                                  "rtcp-late@lab")  # fmt: skip
    caller_rtcp, callee_rtcp = peers("a", 4141), peers("b", 6141)
    caller_relay_rtcp = Endpoint(INTERNAL_IP, 20143)
    time.sleep(0.3)
    lab.run("relay", "nft", "flush", "map", "ip", TABLE, "dnat_to")
    for seq in range(10):  # RTCP starts now, while the map is empty (every 0.1 s)
        caller_rtcp.send(caller_relay_rtcp, b"early-%d" % seq)
        time.sleep(0.1)
    node.wait_log(REPAIRED, 5.0)
    while callee_rtcp.receive(0.2) is not None:
        pass  # whatever of it the repair let through
    burst(caller_rtcp, caller_relay_rtcp, callee_rtcp, Endpoint(INTERNAL_IP, 20141), 5, b"late")
    forward.stop()
    backward.stop()


def test_a_restart_with_another_idle_timeout_gives_live_calls_the_new_one(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers, streams: list[Stream]
) -> None:
    """The load makes the idle policy anew when its value changes, and the kernel takes the
    old one off every live entry: without a renewal the call's streams would run on the
    kernel's 120 s default, and the call would outlive its idle timeout by minutes."""
    first = start(lab, nodes, kamailio, "--idle-timeout", "60")
    forward, backward = streaming(
        streams, kamailio, peers("c", 4140), peers("b", 6140), 20140, "retimed@lab"
    )
    time.sleep(0.5)
    assert max(entry_timeouts(lab, 20140)) > 50  # the old policy
    first.stop()
    idle = 4
    node = start(lab, nodes, kamailio, "--idle-timeout", str(idle), state=first.state)
    node.wait_log(
        "idle timeout changed: the conntrack entries of 1 live calls renewed", REPAIR_WAIT
    )
    restarted_at = len(forward.sent)
    time.sleep(1.0)
    timeouts = entry_timeouts(lab, 20140) + entry_timeouts(lab, 20142)
    forward.stop()
    backward.stop()
    assert timeouts and max(timeouts) <= idle, timeouts  # the new policy, not 120 s
    assert [seq for seq in forward.lost() if seq > restarted_at + 2] == []
    assert [seq for seq in backward.lost() if seq > restarted_at + 2] == []
    assert "1 stored calls were set up with another idle timeout" in node.output()
    node.wait_log(f"[retimed@lab] removed: no media for {idle} s", 30.0)
